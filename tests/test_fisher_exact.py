"""Issue 15 item 3: Fisher merging as Matena & Raffel -- the Fisher under the model's own
predictive distribution with the exact expectation over classes, the empirical Fisher as an
option, per-model normalisation and the floor on the target model."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from neuralign.errors import DataError, NeuralignError
from neuralign.merge import fisher_diagonal, fisher_merge

torch.set_num_threads(1)


def brute_force(model, xs, ys, labels):
    """One example and one class at a time, with autograd."""
    model = model.eval()
    params = dict(model.named_parameters())
    acc = {k: torch.zeros_like(p) for k, p in params.items()}
    for x, y in zip(xs, ys):
        logp = torch.log_softmax(model(x[None]), -1)[0]
        probs = logp.exp().detach()
        classes = range(len(probs)) if labels == "expected" else [int(y)]
        for c in classes:
            grads = torch.autograd.grad(logp[c], list(params.values()), retain_graph=True)
            weight = probs[c] if labels == "expected" else 1.0
            for k, g in zip(params, grads):
                acc[k] += weight * g.square()
    return {k: v / len(xs) for k, v in acc.items()}


def tiny_mlp():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(5, 6), nn.Tanh(), nn.Linear(6, 4, bias=False), nn.ReLU(),
                         nn.Linear(4, 3))


def tiny_cnn():
    torch.manual_seed(1)
    m = nn.Sequential(nn.Conv2d(1, 3, 3, padding=1), nn.BatchNorm2d(3), nn.ReLU(),
                      nn.AdaptiveAvgPool2d(2), nn.Flatten(), nn.Linear(12, 4))
    m[1].running_mean.normal_()
    m[1].running_var.uniform_(0.5, 2.0)
    return m.eval()


@pytest.mark.parametrize("labels", ["expected", "empirical"])
@pytest.mark.parametrize("make", [tiny_mlp, tiny_cnn], ids=["mlp", "cnn"])
def test_fisher_matches_brute_force(make, labels):
    model = make()
    shape = (5,) if make is tiny_mlp else (1, 4, 4)
    g = torch.Generator().manual_seed(2)
    xs = torch.randn(23, *shape, generator=g)
    n_cls = 3 if make is tiny_mlp else 4
    ys = torch.randint(0, n_cls, (23,), generator=g)
    loader = [(xs[i:i + 8], ys[i:i + 8]) for i in range(0, 23, 8)]
    got = fisher_diagonal(model, loader, n_examples=20, labels=labels, max_floats=500)
    ref = brute_force(model, xs[:20], ys[:20], labels)
    assert sorted(got) == sorted(ref)
    for k in ref:
        torch.testing.assert_close(got[k], ref[k], rtol=1e-4, atol=1e-8)


def test_expected_fisher_needs_no_labels_and_empirical_refuses_without_them():
    model = tiny_mlp()
    xs = torch.randn(10, 5)
    f = fisher_diagonal(model, [(xs, None)])  # the default: the model's own distribution
    ref = brute_force(model, xs, [None] * 10, "expected")
    torch.testing.assert_close(f["0.weight"], ref["0.weight"], rtol=1e-4, atol=1e-8)
    with pytest.raises(DataError, match="empirical Fisher needs labels"):
        fisher_diagonal(model, [(xs, None)], labels="empirical")
    with pytest.raises(NeuralignError, match="unknown Fisher labels"):
        fisher_diagonal(model, [(xs, None)], labels="true")


def _pair():
    a, b = tiny_mlp(), tiny_mlp()
    torch.manual_seed(5)
    for p in b.parameters():
        p.data.add_(torch.randn_like(p))
    return a, b


def test_floor_keeps_the_target_where_no_model_has_fisher_mass():
    a, b = _pair()
    fa = {k: torch.rand_like(p) + 0.1 for k, p in a.named_parameters()}
    fb = {k: torch.rand_like(p) + 0.1 for k, p in b.named_parameters()}
    fa["2.weight"][0, 0] = fb["2.weight"][0, 0] = 0.0
    merged = fisher_merge([a, b], [fa, fb], normalize=False).state_dict()
    assert merged["2.weight"][0, 0] == pytest.approx(float(a.state_dict()["2.weight"][0, 0]))
    both = fisher_merge([a, b], [fa, fb], normalize=False, favor_target=False).state_dict()
    mean = (a.state_dict()["2.weight"][0, 0] + b.state_dict()["2.weight"][0, 0]) / 2
    assert both["2.weight"][0, 0] == pytest.approx(float(mean))
    # elsewhere the Fisher-weighted average
    k = "0.weight"
    want = (fa[k] * a.state_dict()[k] + fb[k] * b.state_dict()[k]) / (fa[k] + fb[k])
    torch.testing.assert_close(merged[k], want, rtol=1e-5, atol=1e-6)


def test_normalisation_divides_each_fisher_by_its_norm():
    a, b = _pair()
    fa = {k: torch.rand_like(p) for k, p in a.named_parameters()}
    fb = {k: 1000.0 * torch.rand_like(p) for k, p in b.named_parameters()}
    na = torch.sqrt(sum(v.square().sum() for v in fa.values()))
    nb = torch.sqrt(sum(v.square().sum() for v in fb.values()))
    merged = fisher_merge([a, b], [fa, fb], weights=[0.3, 0.7]).state_dict()
    k = "0.weight"
    ca, cb = 0.3 / na, 0.7 / nb
    want = (ca * fa[k] * a.state_dict()[k] + cb * fb[k] * b.state_dict()[k]) / (ca * fa[k] + cb * fb[k])
    torch.testing.assert_close(merged[k], want, rtol=1e-4, atol=1e-6)
    # scaling one Fisher changes nothing with normalisation, everything without it
    fb2 = {k: v * 1e-3 for k, v in fb.items()}
    torch.testing.assert_close(fisher_merge([a, b], [fa, fb2], weights=[0.3, 0.7]).state_dict()[k],
                               merged[k], rtol=1e-5, atol=1e-6)
    raw = fisher_merge([a, b], [fa, fb2], weights=[0.3, 0.7], normalize=False).state_dict()[k]
    assert not torch.allclose(raw, merged[k], atol=1e-3)
    zero = {k: torch.zeros_like(v) for k, v in fb.items()}
    with pytest.raises(NeuralignError, match="zero everywhere"):
        fisher_merge([a, b], [fa, zero])


class _MixesBatch(nn.Module):
    """Eval-mode forward that couples the examples of a batch (subtracts the batch mean)."""

    def forward(self, x):
        return x - x.mean(0, keepdim=True)


def _conv_net(inplace=False, mix=False):
    torch.manual_seed(3)
    m = nn.Sequential(nn.Conv2d(2, 4, 3, stride=2, padding=1, bias=False),
                      nn.BatchNorm2d(4), _MixesBatch() if mix else nn.Identity(),
                      nn.ReLU(inplace=inplace), nn.Conv2d(4, 3, 2, dilation=2),
                      nn.Tanh(), nn.Flatten(),
                      nn.Linear(3 * 5 * 5, 5), nn.BatchNorm1d(5), nn.Linear(5, 4))
    for bn in (m[1], m[8]):
        bn.running_mean.normal_()
        bn.running_var.uniform_(0.5, 2.0)
        bn.weight.data.uniform_(0.5, 1.5)
        bn.bias.data.normal_()
    return m.eval()


@pytest.mark.parametrize("case", ["plain", "inplace-relu", "mixes-batch"])
@pytest.mark.parametrize("labels", ["expected", "empirical"])
def test_fisher_batch_backward_path_for_convs_and_norms(case, labels, monkeypatch):
    """Conv2d (stride, dilation, no bias; 49 and 25 output positions: a grouped convolution
    and unfolded patches), BatchNorm2d/1d and Linear squares from batch
    backward passes equal one-example-at-a-time autograd; chunked unfolds (small max_floats)
    too. An in-place ReLU rewriting a conv output, or a forward mixing the examples of a batch,
    sends the model to torch.func, which is exact there as well."""
    import neuralign.merge.fisher as fm

    model = _conv_net(inplace=case == "inplace-relu", mix=case == "mixes-batch")
    used = []
    real = fm._layer_squares
    monkeypatch.setattr(fm, "_layer_squares", lambda *a: used.append(real(*a)) or used[-1])
    g = torch.Generator().manual_seed(4)
    xs, ys = torch.randn(21, 2, 14, 14, generator=g), torch.randint(0, 4, (21,), generator=g)
    loader = [(xs[i:i + 8], ys[i:i + 8]) for i in range(0, 21, 8)]
    got = fisher_diagonal(model, loader, n_examples=19, labels=labels, max_floats=300)
    ref = brute_force(model, xs[:19], ys[:19], labels)
    assert all(v.abs().max() > 0 for v in ref.values()) or case == "mixes-batch"
    assert fm._fast_supported(model)
    fast_used = len(used) == len(loader) and all(used)
    assert fast_used == (case == "plain")
    if case == "mixes-batch" and labels == "expected":
        return  # the class weights p(y|x) come from a batch forward, which this model mixes
    for k in ref:
        torch.testing.assert_close(got[k], ref[k], rtol=1e-4, atol=1e-8)


def test_fisher_batch_backward_path_for_a_conv_with_one_output_position():
    import neuralign.merge.fisher as fm

    torch.manual_seed(6)
    model = nn.Sequential(nn.Conv2d(2, 3, 3, padding=1, stride=2), nn.Tanh(), nn.Flatten(),
                          nn.Linear(3, 4)).eval()
    g = torch.Generator().manual_seed(7)
    xs, ys = torch.randn(10, 2, 2, 2, generator=g), torch.randint(0, 4, (10,), generator=g)
    assert model(xs).shape == (10, 4) and fm._fast_supported(model)
    got = fisher_diagonal(model, [(xs, ys)], n_examples=10, labels="expected")
    ref = brute_force(model, xs, ys, "expected")
    for k in ref:
        torch.testing.assert_close(got[k], ref[k], rtol=1e-4, atol=1e-8)


@pytest.mark.parametrize("mix", [False, True])
def test_fisher_checks_mixing_on_the_first_batch_of_two_or_more(mix, monkeypatch):
    """A first batch of one example cannot mix; the check runs on the next batch."""
    import neuralign.merge.fisher as fm

    model = _conv_net(mix=mix)
    used = []
    real = fm._layer_squares
    monkeypatch.setattr(fm, "_layer_squares", lambda *a: used.append(real(*a)) or used[-1])
    g = torch.Generator().manual_seed(8)
    xs, ys = torch.randn(12, 2, 14, 14, generator=g), torch.randint(0, 4, (12,), generator=g)
    loader = [(xs[:1], ys[:1]), (xs[1:7], ys[1:7]), (xs[7:], ys[7:])]
    got = fisher_diagonal(model, loader, n_examples=12, labels="empirical")
    assert used[0] and (used == [True, False] if mix else used == [True] * 3)
    ref = brute_force(model, xs, ys, "empirical")
    for k in ref:
        torch.testing.assert_close(got[k], ref[k], rtol=1e-4, atol=1e-8)
