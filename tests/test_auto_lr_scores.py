"""Score computations of the automatic per-layer fine-tuning strategies (no training loop)."""

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from neuralign.errors import NeuralignError
from neuralign.finetune.auto_lr.criticality import (
    criticality_scores,
    identity_removal_,
    remove_module,
    top_k_weights,
)
from neuralign.finetune.auto_lr.grad_scores import (
    gradient_weights,
    per_example_gradients,
    rgn_scores,
    snr_scores,
)
from neuralign.finetune.auto_lr.layers import (
    model_layers,
    normalise_scores,
    param_groups_from_weights,
)
from neuralign.finetune.auto_lr.lbfgs import lbfgs_pairs, preconditioned_gradient, two_loop
from neuralign.finetune.auto_lr.surprise import surprise_scores


def mlp(seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(6, 8), nn.ReLU(), nn.Linear(8, 7), nn.ReLU(), nn.Linear(7, 3))


def data(n=20, seed=1, nb=3):
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(n, 6, generator=g), torch.randint(0, 3, (n,), generator=g))
            for _ in range(nb)]


def hand_grads(m, x, y):
    """Manual backprop of mean cross-entropy through Linear-ReLU-Linear-ReLU-Linear."""
    W1, b1, W2, b2, W3, b3 = (p.detach() for p in m.parameters())
    z1 = x @ W1.T + b1
    h1 = z1.clamp_min(0)
    z2 = h1 @ W2.T + b2
    h2 = z2.clamp_min(0)
    z3 = h2 @ W3.T + b3
    d3 = (z3.softmax(1) - F.one_hot(y, 3).float()) / len(y)
    d2 = (d3 @ W3) * (z2 > 0)
    d1 = (d2 @ W2) * (z1 > 0)
    return [d1.T @ x, d1.sum(0), d2.T @ h1, d2.sum(0), d3.T @ h2, d3.sum(0)]


def test_auto_rgn_matches_hand_computation():
    m, batches = mlp(), data()
    layers = model_layers(m, "tensor")
    assert [layer.name for layer in layers] == [n for n, _ in m.named_parameters()]
    params = [p.detach() for p in m.parameters()]
    per_batch = [[float(g.norm() / p.norm()) for g, p in zip(hand_grads(m, x, y), params)]
                 for x, y in batches]
    expected = torch.tensor(per_batch).mean(0)
    expected = expected / expected.max()
    w, _ = gradient_weights("rgn", m, batches, layers)
    assert torch.allclose(torch.tensor(list(w.values())), expected, atol=1e-5)
    assert max(w.values()) == pytest.approx(1.0)
    # the "gradient" average: ratio of the mean gradient
    mean_g = [sum(gs) / len(batches) for gs in zip(*[hand_grads(m, x, y) for x, y in batches])]
    raw_g = rgn_scores(m, batches, layers, average="gradient")
    exp_g = [float(g.norm() / p.norm()) for g, p in zip(mean_g, params)]
    assert torch.allclose(torch.tensor(list(raw_g.values())), torch.tensor(exp_g), atol=1e-6)


def test_block_granularity_and_norm_freezing():
    m = nn.Sequential(nn.Conv2d(1, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.Flatten(),
                      nn.Linear(4 * 4 * 4, 3))
    t = model_layers(m, "tensor")
    assert [layer.name for layer in t] == ["0.weight", "0.bias", "4.weight", "4.bias"]
    assert len(model_layers(m, "tensor", include_norm=True)) == 6
    b = model_layers(m, "block")
    assert [layer.name for layer in b] == ["0", "4"]
    groups = param_groups_from_weights(m, b, {"0": 0.5, "4": 1.0})
    assert [g["lr_scale"] for g in groups] == [0.5, 1.0, 0.0]
    assert groups[-1]["name"] == "__frozen_norm__" and len(groups[-1]["params"]) == 2
    with pytest.raises(NeuralignError, match="granularity"):
        model_layers(m, "neuron")


@pytest.mark.parametrize("opt", ["sgd", "adamw"])
def test_zero_weight_freezes_layer_exactly(opt):
    m, batches = mlp(), data()
    layers = model_layers(m, "tensor")
    w = {layer.name: 1.0 for layer in layers}
    w["2.weight"] = 0.0
    groups = param_groups_from_weights(m, layers, w)
    for g in groups:
        g["lr"] = 0.1 * g["lr_scale"]
    o = (torch.optim.SGD(groups, lr=0.1, momentum=0.9, weight_decay=1e-2) if opt == "sgd"
         else torch.optim.AdamW(groups, lr=0.1, weight_decay=1e-2))
    before = {n: p.detach().clone() for n, p in m.named_parameters()}
    for x, y in batches * 2:
        o.zero_grad()
        F.cross_entropy(m(x), y).backward()
        o.step()
    after = dict(m.named_parameters())
    assert torch.equal(after["2.weight"], before["2.weight"])
    assert not torch.equal(after["0.weight"], before["0.weight"])


def test_per_example_gradients_and_snr():
    m, batches = mlp(), data(n=6, nb=2)
    x, y = batches[0]
    names = ["0.weight", "4.bias"]
    g = per_example_gradients(m, x, y, names)
    for i in range(len(y)):
        ref = torch.autograd.grad(F.cross_entropy(m(x[i:i + 1]), y[i:i + 1]),
                                  [dict(m.named_parameters())[n] for n in names])
        assert torch.allclose(g["0.weight"][i], ref[0], atol=1e-6)
        assert torch.allclose(g["4.bias"][i], ref[1], atol=1e-6)
    layers = model_layers(m, "tensor")
    raw = snr_scores(m, batches, layers, statistic="per_example")
    hb = [hand_grads_pe(m, xb, yb) for xb, yb in batches]
    exp = torch.stack([torch.tensor([float((pg.mean(0) ** 2 / (pg.var(0) + 1e-8)).mean())
                                     for pg in h]) for h in hb]).mean(0)
    assert torch.allclose(torch.tensor(list(raw.values())), exp.float(), rtol=1e-3)


def hand_grads_pe(m, x, y):
    per = [hand_grads(m, x[i:i + 1], y[i:i + 1]) for i in range(len(y))]
    return [torch.stack(gs) for gs in zip(*per)]


def dense_bfgs_inverse(s_list, y_list, n):
    s, y = s_list[-1], y_list[-1]
    H = torch.eye(n, dtype=torch.float64) * float(s @ y / (y @ y))
    for s, y in zip(s_list, y_list):
        rho = 1 / (y @ s)
        V = torch.eye(n, dtype=torch.float64) - rho * torch.outer(y, s)
        H = V.T @ H @ V + rho * torch.outer(s, s)
    return H


def test_two_loop_matches_exact_inverse_hessian_on_quadratic():
    torch.manual_seed(0)
    n = 6
    Q = torch.randn(n, n, dtype=torch.float64)
    A = Q @ Q.T + n * torch.eye(n, dtype=torch.float64)
    g = torch.randn(n, dtype=torch.float64)
    # n A-conjugate steps: BFGS's hereditary property gives H = A^{-1} exactly
    dirs = []
    for v in torch.randn(n, n, dtype=torch.float64):
        for d in dirs:
            v = v - (d @ A @ v) / (d @ A @ d) * d
        dirs.append(v)
    ys = [A @ s for s in dirs]
    assert torch.allclose(two_loop(g, dirs, ys), torch.linalg.solve(A, g), atol=1e-8)
    # fewer, arbitrary pairs: equals the dense BFGS recursion
    s3 = list(torch.randn(3, n, dtype=torch.float64))
    y3 = [A @ s for s in s3]
    assert torch.allclose(two_loop(g, s3, y3), dense_bfgs_inverse(s3, y3, n) @ g, atol=1e-8)


def test_lbfgs_on_a_network_quadratic_gives_newton_step():
    torch.manual_seed(0)
    lin = nn.Linear(4, 1)
    x, y = torch.randn(64, 4), torch.randn(64, 1)
    batches = [(x[:32], y[:32]), (x[32:], y[32:])]
    layers = model_layers(lin, "tensor")
    hg = preconditioned_gradient(lin, batches, layers, memory=10, steps=25,
                                 loss_fn=F.mse_loss)
    X = torch.cat([x, torch.ones(64, 1)], 1).double()
    A = 2 * X.T @ X / 64
    theta = torch.cat([lin.weight.detach().reshape(-1), lin.bias.detach()]).double()
    g = A @ theta - 2 * X.T @ y.double().reshape(-1) / 64
    newton = torch.linalg.solve(A, g)
    got = torch.cat([hg["weight"].reshape(-1), hg["bias"]]).double()
    assert (got - newton).norm() / newton.norm() < 0.05
    assert (g.float() - got.float()).norm() / g.norm() > 0.1  # really preconditioned
    s, yl, _ = lbfgs_pairs(lambda t: (float(t @ t), 2 * t), torch.ones(3), steps=3)
    assert all(float(a @ b) > 0 for a, b in zip(s, yl))


def test_change_scores_vanish_for_identical_source_and_target():
    m, batches = mlp(), data()
    layers = model_layers(m, "tensor")
    w, raw = gradient_weights("rgn", m, batches, layers, source_batches=batches)
    assert max(raw.values()) == 0 and max(w.values()) == 0
    w2, _ = gradient_weights("rgn", m, batches, layers, source_batches=data(seed=5))
    assert max(w2.values()) == pytest.approx(1.0)


def test_surprise_zero_when_identical_and_grows_with_shift():
    m = mlp()
    layers = model_layers(m, "tensor")
    src = data(n=200, nb=2)
    assert max(surprise_scores(m, src, src, layers).values()) == pytest.approx(0.0, abs=1e-9)
    totals = []
    for shift in (0.3, 1.0, 3.0):
        tgt = [(x + shift, y) for x, y in data(n=200, nb=2, seed=7)]
        s = surprise_scores(m, src, tgt, layers)
        totals.append(s["0.weight"])
        assert s["0.weight"] == s["0.bias"]
    assert totals[0] < totals[1] < totals[2]
    d = surprise_scores(m, src, [(x + 3.0, y) for x, y in src], layers, diff=True)
    assert min(d.values()) >= 0


class Res(nn.Module):
    def __init__(self, c):
        super().__init__()
        self.conv1, self.bn1 = nn.Conv2d(c, c, 3, padding=1), nn.BatchNorm2d(c)
        self.conv2, self.bn2 = nn.Conv2d(c, c, 3, padding=1), nn.BatchNorm2d(c)

    def forward(self, x):
        return F.relu(x + self.bn2(self.conv2(F.relu(self.bn1(self.conv1(x))))))


def resnet(seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.ReLU(), Res(4), Res(4),
                         nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, 3)).eval()


def test_identity_removal_skips_a_residual_block():
    m = resnet()
    x = torch.randn(5, 1, 8, 8)
    removed = remove_module(m, "2", "identity", skip_if_shape_preserving=True, example_input=x)
    skipped = nn.Sequential(*[copy.deepcopy(c) for i, c in enumerate(m) if i != 2]).eval()
    assert torch.allclose(removed(x), skipped(x), atol=1e-6)
    assert not torch.allclose(m(x), skipped(x), atol=1e-3)
    conv = nn.Conv2d(4, 4, 3, padding=1)
    identity_removal_(conv)
    assert torch.allclose(conv(x.repeat(1, 4, 1, 1)), x.repeat(1, 4, 1, 1), atol=1e-6)
    bn = Res(4).bn1.eval()
    bn.running_mean.uniform_(), bn.running_var.uniform_(0.5, 2)
    identity_removal_(bn)
    z = torch.randn(3, 4, 5, 5)
    assert torch.allclose(bn(z), z, atol=1e-5)
    assert torch.equal(m(x), resnet()(x))  # the input model is untouched


def test_criticality_scores_and_top_k():
    m = resnet()
    x = torch.randn(16, 1, 8, 8)
    batches = [(x, m(x).argmax(1))]
    layers = model_layers(m, "block")
    for removal in ("identity", "random"):
        raw = criticality_scores(m, batches, layers, removal=removal, granularity="block")
        assert set(raw) == {"0", "2", "3", "6"} and max(raw.values()) > 0
    w = top_k_weights({"a": 3.0, "b": -1.0, "c": 1.0, "d": 2.0}, top_k=2)
    assert w == {"a": 1.0, "b": 0.0, "c": 0.0, "d": pytest.approx(2 / 3)}
    assert normalise_scores({"a": 0.0}) == {"a": 0.0}
    with pytest.raises(NeuralignError, match="removal"):
        criticality_scores(m, batches, layers, removal="zero")
