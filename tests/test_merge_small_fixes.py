"""Issue #15 item 7: greedy soup scores every candidate the same way; ``reset_bn`` runs with
dropout off; the ``"ln"`` reference models normalise over channels only (old checkpoints load as
what they were); the RBF-CKA bandwidth is Kornblith's median (zeros included)."""

from __future__ import annotations

import warnings

import pytest
import torch
from torch import nn

from neuralign.landscape import cka
from neuralign.merge import greedy_soup, reset_bn
from neuralign.models import get_model

G = torch.Generator().manual_seed(0)
X = torch.randn(96, 1, 8, 8, generator=G)
Y = torch.randint(0, 3, (96,), generator=G)
BATCHES = [(X[i:i + 32], Y[i:i + 32]) for i in range(0, 96, 32)]


def _bn_mlp(seed):
    torch.manual_seed(seed)
    m = nn.Sequential(nn.Flatten(), nn.Linear(64, 16), nn.BatchNorm1d(16), nn.ReLU(),
                      nn.Dropout(0.5), nn.Linear(16, 16), nn.BatchNorm1d(16), nn.ReLU(),
                      nn.Linear(16, 3))
    with torch.no_grad():  # stale statistics, far from the data's
        for bn in (m[2], m[6]):
            bn.running_mean.fill_(5.0)
            bn.running_var.fill_(40.0)
    return m.eval()


def test_greedy_soup_scores_every_candidate_with_the_same_bn_reset():
    models = [_bn_mlp(s) for s in range(3)]
    ref = reset_bn(models[0], BATCHES).state_dict()["2.running_mean"]
    seen = []

    def evaluate(model):
        rm = model.state_dict()["2.running_mean"]
        seen.append(bool((rm - 5.0).abs().max() > 1e-3))  # True: statistics were reset
        return {"accuracy": 0.5, "loss": 1.0}

    res = greedy_soup(models, BATCHES, evaluate=evaluate, bn_loader=BATCHES)
    # individuals (ranking), the first ingredient and every soup candidate: all reset
    assert len(seen) >= 2 * len(models) - 1 and all(seen), seen
    assert not torch.equal(res.model.state_dict()["2.running_mean"], models[0][2].running_mean)
    assert ref.abs().max() < 4  # the reset statistics are the data's, not the stale ones
    # without bn_loader nothing is reset, for anyone
    seen.clear()
    greedy_soup(models, BATCHES, evaluate=evaluate)
    assert seen and not any(seen)


def test_reset_bn_runs_with_dropout_off():
    m = _bn_mlp(0)
    r = reset_bn(m, BATCHES)
    assert all(not d.training for d in r.modules() if isinstance(d, nn.Dropout))
    # the second BN's input, computed with eval-mode dropout and batch-normalised first BN
    with torch.no_grad():
        means = torch.stack([m[5](torch.relu(_bn_train(m[2], m[1](xb.flatten(1))))).mean(0)
                             for xb, _ in BATCHES])
    torch.testing.assert_close(r[6].running_mean, means.mean(0), rtol=1e-5, atol=1e-6)
    r2 = reset_bn(m, BATCHES)  # deterministic: no dropout noise
    torch.testing.assert_close(r2[6].running_mean, r[6].running_mean, rtol=0, atol=0)


def _bn_train(bn, h):
    return (h - h.mean(0)) / torch.sqrt(h.var(0, unbiased=False) + bn.eps) * bn.weight + bn.bias


@pytest.mark.parametrize("name", ["resnet20", "vgg11", "cnn"])
def test_ln_reference_models_normalise_over_channels_only(name):
    kw = {"width": 0.25} if name == "vgg11" else {"width": 4} if name == "cnn" else {}
    m = get_model(name, norm="ln", num_classes=3, in_channels=1, image_size=8, **kw).eval()
    norms = [(n, mod) for n, mod in m.named_modules() if "norm" in type(mod).__name__.lower()
             or isinstance(mod, (nn.GroupNorm, nn.LayerNorm))]
    assert norms
    _, ln = norms[0]
    with torch.no_grad():
        ln.weight.uniform_(0.5, 2)
        ln.bias.normal_()
    c = ln.weight.shape[0]
    x = torch.randn(4, c, 5, 5, generator=G) * 3 + 1
    mu = x.mean(1, keepdim=True)
    var = x.var(1, keepdim=True, unbiased=False)
    ref = (x - mu) / torch.sqrt(var + ln.eps) * ln.weight.view(1, -1, 1, 1) + ln.bias.view(1, -1, 1, 1)
    torch.testing.assert_close(ln(x), ref, rtol=1e-5, atol=1e-5)
    # still a LayerNorm for the code that treats norm layers specially (freezing, FedMA refusal)
    assert isinstance(ln, nn.LayerNorm)


def test_old_group_norm_ln_checkpoints_load_as_what_they_were(tmp_path):
    from safetensors.torch import load_file

    from neuralign.io import load_model, save_model, save_state_dict

    old = get_model("resnet20", norm="gn1", num_classes=3, in_channels=1, seed=0).eval()
    assert isinstance(old.stem[1], nn.GroupNorm) and old.stem[1].num_groups == 1
    # a checkpoint written before channel-only LN: it records norm="ln" and no version
    path = tmp_path / "old.safetensors"
    save_state_dict(old.state_dict(), path, {"model": {"name": "resnet20", "kwargs": {
        "norm": "ln", "num_classes": 3, "in_channels": 1, "seed": 0}}, "metadata": {}})
    with pytest.warns(UserWarning, match="gn1"):
        back = load_model(path)
    x = torch.randn(2, 1, 8, 8, generator=G)
    torch.testing.assert_close(back(x), old(x))
    assert set(load_file(path)) == set(back.state_dict())
    # a new "ln" checkpoint round-trips as channel-only LN without a warning
    new = get_model("resnet20", norm="ln", num_classes=3, in_channels=1, seed=0).eval()
    p2 = save_model(new, tmp_path / "new.safetensors")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        back2 = load_model(p2)
    torch.testing.assert_close(back2(x), new(x))
    assert not isinstance(back2.stem[1], nn.GroupNorm)


def _kornblith_rbf_cka(x, y):
    """Kornblith et al.'s ``gram_rbf`` (threshold 1): bandwidth from the median of ALL squared
    distances, the zero diagonal included; numpy's median (mean of the two middle values)."""
    def gram(z):
        z = z.double()
        dots = z @ z.T
        sq = dots.diag()
        d2 = (-2 * dots + sq[:, None] + sq[None, :])
        flat = d2.flatten().sort().values
        n = flat.numel()
        med = (flat[(n - 1) // 2] + flat[n // 2]) / 2
        return torch.exp(-d2 / (2 * med))

    def centre(k):
        n = k.shape[0]
        h = torch.eye(n, dtype=k.dtype) - 1 / n
        return h @ k @ h

    kx, ky = centre(gram(x)), centre(gram(y))
    return float((kx * ky).sum() / ((kx * kx).sum().sqrt() * (ky * ky).sum().sqrt()))


@pytest.mark.parametrize("n", [9, 10])
def test_rbf_cka_bandwidth_is_kornblith_median_with_zeros(n):
    x = torch.randn(n, 5, generator=G)
    y = torch.tanh(x @ torch.randn(5, 7, generator=G)) + 0.3 * torch.randn(n, 7, generator=G)
    got = cka(x, y, kernel="rbf")
    assert got == pytest.approx(_kornblith_rbf_cka(x, y), abs=1e-9)
