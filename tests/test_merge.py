"""Tests for neuralign.merge: interpolation, BN reset, REPAIR, soups, Fisher, OT, matched averaging, ZipIt."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from neuralign.errors import ArchitectureMismatchError, CheckpointError, DataError, NeuralignError
from neuralign.merge import (
    average,
    fisher_diagonal,
    fisher_merge,
    greedy_soup,
    interpolate,
    learned_soup,
    matched_averaging,
    merge,
    ot_fusion,
    repair,
    reset_bn,
)
from neuralign.merge._util import evaluate
from neuralign.merge.zipit import zipit
from neuralign.models import get_model
from neuralign.permute import apply_permutation, random_permutation
from neuralign.spec import spec_from_model

torch.set_num_threads(1)


def mlp(width=16, seed=0, bn=True):
    torch.manual_seed(seed)
    layers = [nn.Flatten(), nn.Linear(16, width)]
    if bn:
        layers.append(nn.BatchNorm1d(width))
    layers += [nn.ReLU(), nn.Linear(width, width), nn.ReLU(), nn.Linear(width, 3)]
    return nn.Sequential(*layers).eval()


def data(n=96, seed=0, classes=3):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 1, 4, 4, generator=g)
    y = (x.flatten(1)[:, :classes].argmax(1))
    return [(x[i:i + 32], y[i:i + 32]) for i in range(0, n, 32)]


def permuted_copy(model, x, seed=1):
    spec = spec_from_model(model, x)
    return apply_permutation(model, random_permutation(spec, seed=seed), spec).eval()


def test_interpolate_endpoints_and_no_mutation():
    a, b = mlp(seed=0), mlp(seed=1)
    before = {k: v.clone() for k, v in a.state_dict().items()}
    for t, ref in ((0.0, a), (1.0, b)):
        m = interpolate(a, b, t)
        for k, v in m.state_dict().items():
            assert torch.allclose(v.float(), ref.state_dict()[k].float())
    mid = interpolate(a.state_dict(), b.state_dict(), 0.5)
    assert isinstance(mid, dict)
    assert torch.allclose(mid["1.weight"], (a.state_dict()["1.weight"] + b.state_dict()["1.weight"]) / 2)
    assert all(torch.equal(v, a.state_dict()[k]) for k, v in before.items())


def test_merge_errors_are_one_line():
    a, wide = mlp(16), mlp(24)
    with pytest.raises(ArchitectureMismatchError, match="method='ot'"):
        average([a, wide])
    bad = {k: v.clone() for k, v in a.state_dict().items()}
    bad["1.weight"][0, 0] = float("nan")
    with pytest.raises(CheckpointError, match="NaN"):
        interpolate(a, bad, 0.5)
    with pytest.raises(DataError, match="no batches"):
        reset_bn(a, [])
    with pytest.raises(DataError, match="no batches"):
        repair(a, a, a, [], 0.5)
    with pytest.raises(NeuralignError, match="unknown merge method"):
        merge([a, a], method="magic")
    with pytest.raises(DataError, match="held-out data"):
        merge([a, a], method="greedy-soup")
    for err in (ArchitectureMismatchError, CheckpointError, DataError):
        assert issubclass(err, NeuralignError)


def test_reset_bn_recomputes_statistics():
    a = mlp()
    loader = data()
    r = reset_bn(a, loader)
    xs = torch.cat([x for x, _ in loader]).flatten(1)
    h = a[1](xs)
    assert torch.allclose(r[2].running_mean, h.mean(0), atol=1e-5)
    assert torch.equal(a[2].running_mean, torch.zeros(16))  # input untouched


def _train_pair(norm, epochs=1):
    from neuralign.align import activation_matching
    from neuralign.data import load_data
    from neuralign.train import train

    s = load_data("digits")
    loader = s.loader("train", batch_size=64)
    ms = []
    for seed in (0, 1):
        torch.manual_seed(seed)
        m = get_model("resnet20", width=1, norm=norm, num_classes=10, in_channels=1)
        train(m, loader, epochs=epochs, lr=0.05, progress=False, seed=seed)
        ms.append(m.eval())
    a, b = ms
    spec = spec_from_model(a, next(iter(loader))[0][:2])
    b = apply_permutation(b, activation_matching(a, b, loader, spec=spec), spec)
    return a, b, s


@pytest.mark.slow
def test_repair_folds_and_lowers_midpoint_loss_resnet20_ln():
    a, b, s = _train_pair("ln", epochs=3)
    fit = s.loader("train", batch_size=128, shuffle=False)
    val = s.loader("val", batch_size=270)
    mid = interpolate(a, b, 0.5)
    plain = evaluate(reset_bn(mid, fit), val)["loss"]
    r = repair(a, b, mid, fit, 0.5)
    assert type(r) is type(a)
    # the original tensors, plus the residual blocks' output affines (neuralign.models.affine)
    shapes = {k: v.shape for k, v in r.state_dict().items() if ".repair_affine." not in k}
    assert shapes == {k: v.shape for k, v in a.state_dict().items()}
    assert evaluate(r, val)["loss"] < plain - 0.1


def test_repair_matches_target_statistics_and_keeps_bn_architecture():
    torch.manual_seed(0)
    a = get_model("resnet20", width=1, norm="bn", num_classes=10, in_channels=1).eval()
    b = permuted_copy(get_model("resnet20", width=1, norm="bn", num_classes=10, in_channels=1), torch.randn(2, 1, 8, 8))
    x = torch.randn(64, 1, 8, 8)
    loader = [(x[:32], None), (x[32:], None)]
    r = repair(a, b, interpolate(a, b, 0.5), loader, 0.5, blocks=[])  # pre-activations only
    assert list(r.state_dict()) == list(a.state_dict())
    from neuralign.merge.repair import channel_stats

    name = "layer1.0.norm1"
    sa, sb, sr = (channel_stats(m, loader, [name])[name] for m in (a, b, r))
    assert torch.allclose(sr[0], (sa[0] + sb[0]) / 2, atol=2e-2)
    assert torch.allclose(sr[1], (sa[1] + sb[1]) / 2, rtol=5e-2, atol=2e-2)


def test_repair_norm_free_mlp_statistics():
    a, b = mlp(bn=False, seed=0), mlp(bn=False, seed=1)
    loader = data(128)
    r = repair(a, b, interpolate(a, b, 0.3), loader, 0.3)
    from neuralign.merge.repair import channel_stats

    sa, sb, sr = (channel_stats(m, loader, ["3"])["3"] for m in (a, b, r))
    assert torch.allclose(sr[1], 0.7 * sa[1] + 0.3 * sb[1], rtol=0.05, atol=1e-3)
    assert list(r.state_dict()) == list(a.state_dict())


def test_greedy_soup_never_worse_than_best_single():
    loader = data(96, seed=3)
    models = [mlp(seed=s, bn=False) for s in range(4)]
    res = greedy_soup(models, loader)
    best = max(evaluate(m, loader)["accuracy"] for m in models)
    assert evaluate(res.model, loader)["accuracy"] >= best
    assert res.info["ingredients"][0] == res.info["order"][0]
    assert math.isclose(sum(res.weights), 1.0)


def test_learned_soup_improves_held_out_loss():
    loader = data(96, seed=4)
    models = [mlp(seed=s, bn=False) for s in range(3)]
    uni = evaluate(average(models), loader)["loss"]
    for per_layer in (False, True):
        res = learned_soup(models, loader, per_layer=per_layer, epochs=10, lr=0.1)
        assert evaluate(res.model, loader)["loss"] < uni
        w = torch.as_tensor(res.weights)
        assert torch.allclose(w.sum(0), torch.ones(w.shape[1:]) if w.dim() > 1 else torch.tensor(1.0), atol=1e-5)


def test_fisher_of_an_mlp_without_per_example_gradients_matches_vmap(monkeypatch):
    import neuralign.merge.fisher as fm

    torch.manual_seed(0)
    mlp = nn.Sequential(nn.Linear(6, 8), nn.ReLU(), nn.Linear(8, 8, bias=False), nn.ReLU(),
                        nn.Linear(8, 3))
    xs = torch.randn(40, 6)
    batches = list(zip(xs.split(16), torch.randint(0, 3, (40,)).split(16)))
    assert fm._fast_supported(mlp)
    for empirical in (True, False):
        fast = fisher_diagonal(mlp, batches, n_examples=37, empirical=empirical)
        monkeypatch.setattr(fm, "_fast_supported", lambda m: False)
        ref = fisher_diagonal(mlp, batches, n_examples=37, empirical=empirical)
        monkeypatch.undo()
        assert sorted(fast) == sorted(ref)
        for k in ref:
            torch.testing.assert_close(fast[k], ref[k], rtol=1e-5, atol=1e-9)


def test_fisher_equal_fishers_equals_average_and_weights_matter():
    a, b = mlp(seed=0), mlp(seed=1)
    f = fisher_diagonal(a, data(), n_examples=64)
    assert all(torch.isfinite(v).all() and (v >= 0).all() for v in f.values())
    # equal Fishers: the average (entries without Fisher mass keep the target's value unless
    # every model is floored alike, favor_target=False)
    fm, avg = fisher_merge([a, b], [f, f], favor_target=False), average([a, b])
    for k, v in avg.state_dict().items():
        assert torch.allclose(fm.state_dict()[k].float(), v.float(), atol=1e-6)
    big = {k: v * 0 + 1e6 for k, v in f.items()}
    small = {k: v * 0 for k, v in f.items()}
    fm = fisher_merge([a, b], [big, small], normalize=False)
    assert torch.allclose(fm.state_dict()["1.weight"], a.state_dict()["1.weight"], atol=1e-5)


def test_ot_fusion_reproduces_model_from_permuted_copy_vgg11():
    torch.manual_seed(0)
    a = get_model("vgg11", norm="bn", width=0.125, num_classes=10, in_channels=1, image_size=8).eval()
    x = torch.randn(16, 1, 8, 8)
    b = permuted_copy(a, x[:2])
    assert not torch.allclose(a.features[0][0].weight, b.features[0][0].weight)
    for ground in ("weight", "activation"):
        fused = ot_fusion([a, b], ground=ground, loader=[(x, None)]).model.eval()
        assert torch.allclose(fused(x), a(x), atol=1e-4)


def test_ot_fusion_different_widths_takes_reference_shape():
    a, wide = mlp(16, seed=0), mlp(24, seed=1)
    res = ot_fusion([a, wide])
    assert res.model[1].weight.shape == (16, 16)
    assert res.transports[1][0].shape == (24, 16)
    assert torch.allclose(res.transports[1][0].sum(), torch.tensor(1.0, dtype=torch.float64))
    with pytest.raises(ArchitectureMismatchError, match="sequential chain"):
        ot_fusion([get_model("resnet20", width=1, num_classes=10, in_channels=1)] * 2)


def test_matched_averaging_permuted_copies_and_growth():
    a = mlp(16, seed=0)
    x = torch.randn(8, 1, 4, 4)
    b = permuted_copy(a, x[:2])
    res = matched_averaging([a, b, a])
    assert res.widths == [16, 16]
    assert torch.allclose(res.model.eval()(x), a(x), atol=1e-5)
    assert sorted(res.assignments[1][0].tolist()) == list(range(16))
    c, d = mlp(16, seed=5), mlp(24, seed=6)
    grown = matched_averaging([a, c, d], slack=0.05)
    assert all(16 < w <= 16 + 16 + 24 for w in grown.widths)
    assert grown.model(x).shape == (8, 3)
    capped = matched_averaging([a, c, d], slack=0.05, max_width=30)
    assert capped.widths == [30, 30]
    assert capped.model[1].weight.shape == (30, 16)


def test_zipit_partial_zip_is_ensemble_and_permuted_copy_is_exact():
    a, b = mlp(16, seed=0), mlp(16, seed=1)
    loader = data(128)
    x = loader[0][0]
    z0 = zipit([a, b], loader, stop_at=0).model.eval()
    assert torch.allclose(z0(x), (a(x) + b(x)) / 2, atol=1e-5)
    full = zipit([a, b], loader)
    assert full.model[1].weight.shape == (16, 16) and full.merges[0].shape == (16, 32)
    c = permuted_copy(a, x[:2])
    zc = zipit([a, c], loader, within=False).model.eval()
    assert torch.allclose(zc(x), a(x), atol=1e-5)


def test_merge_dispatch():
    a, b = mlp(seed=0), mlp(seed=1)
    loader = data()
    for method in ("average", "uniform-soup", "fisher", "ot", "matched"):
        m = merge([a, b], method=method, data=loader, bn_loader=loader)
        assert m(loader[0][0]).shape == (32, 3)
