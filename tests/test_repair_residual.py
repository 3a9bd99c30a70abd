"""Issue #15 item 1: REPAIR corrects every residual block's output (survey §4.4.1), not only the
pre-activations; the block corrections live in explicit per-channel affines that save and load."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from neuralign.merge import interpolate, repair, reset_bn
from neuralign.merge.repair import channel_stats, default_targets, residual_blocks
from neuralign.models import get_model

G = torch.Generator().manual_seed(0)
X = torch.randn(96, 1, 8, 8, generator=G)
ONE_BATCH = [(X, None)]
BATCHES = [(X[i:i + 32], None) for i in range(0, 96, 32)]
RESNET20_BLOCKS = [f"layer{s}.{b}" for s in (1, 2, 3) for b in range(3)]


def _resnet20(norm, seed):
    return get_model("resnet20", width=1, norm=norm, num_classes=10, in_channels=1,
                     seed=seed).eval()


def _torchvision_resnet(seed):
    tv = pytest.importorskip("torchvision")
    torch.manual_seed(seed)
    # torchvision's own BasicBlock (in-place `out += identity`, one ReLU module used twice)
    m = tv.models.resnet.ResNet(tv.models.resnet.BasicBlock, [1, 1, 1, 1], num_classes=10)
    m.conv1 = nn.Conv2d(1, 64, 3, 1, 1, bias=False)
    m.maxpool = nn.Identity()
    with torch.no_grad():  # some spread in the BN statistics, as a trained net has
        for bn in (x for x in m.modules() if isinstance(x, nn.BatchNorm2d)):
            bn.weight.uniform_(0.5, 1.5)
            bn.bias.normal_(0, 0.3)
    return reset_bn(m, BATCHES)


MODELS = {"resnet20-bn": lambda s: _resnet20("bn", s), "resnet20-ln": lambda s: _resnet20("ln", s),
          "torchvision": _torchvision_resnet}


def _gap(model, a, b, loader, names, t):
    """Largest |stat - target| over the named outputs' channels, relative to the layer's
    typical target std. A channel that is constant in ``model`` (a dead ReLU: no variance to
    rescale) is held to its mean only; at most 2% of the channels may be such."""
    sa, sb, sm = (channel_stats(m, loader, names) for m in (a, b, model))
    worst, dead, total = 0.0, 0, 0
    for n in names:
        gm = (1 - t) * sa[n][0] + t * sb[n][0]
        gs = (1 - t) * sa[n][1] + t * sb[n][1]
        scale = float(gs.mean())
        live = sm[n][1] > 1e-6 * scale
        dead, total = dead + int((~live).sum()), total + live.numel()
        worst = max(worst, float((sm[n][0] - gm).abs().max()) / scale,
                    float((sm[n][1] - gs)[live].abs().max()) / scale)
    assert dead <= 0.02 * total
    return worst


def test_residual_blocks_found_in_resnet20_and_torchvision():
    assert residual_blocks(_resnet20("bn", 0), X[:2]) == RESNET20_BLOCKS
    tvm = _torchvision_resnet(0)
    assert residual_blocks(tvm, X[:2]) == ["layer1.0", "layer2.0", "layer3.0", "layer4.0"]
    mlp = get_model("mlp", width=8, depth=2, image_size=8)
    assert residual_blocks(mlp, X[:2]) == []


@pytest.mark.parametrize("kind", sorted(MODELS))
def test_block_output_statistics_equal_their_targets(kind):
    a, b = MODELS[kind](0), MODELS[kind](1)
    t = 0.3
    mid = interpolate(a, b, t)
    blocks = residual_blocks(a, X[:2])
    r = repair(a, b, mid, ONE_BATCH, t)
    # with the data in one batch the correction is exact: block outputs and pre-activations
    assert _gap(r, a, b, ONE_BATCH, blocks, t) < 1e-3
    assert _gap(r, a, b, ONE_BATCH, default_targets(a, X[:2]), t) < 1e-3
    # correcting only the pre-activations (the old behaviour) leaves the block outputs off
    old = repair(a, b, mid, ONE_BATCH, t, blocks=[])
    assert _gap(old, a, b, ONE_BATCH, blocks, t) > 0.05
    assert list(old.state_dict()) == list(mid.state_dict())


@pytest.mark.parametrize("kind", ["resnet20-bn", "resnet20-ln"])
def test_block_statistics_with_minibatches_are_close(kind):
    """Several batches: REPAIR normalises each batch with its own statistics (as its inserted
    batch norms do), so the eval-mode statistics are near the targets, not equal."""
    a, b = MODELS[kind](0), MODELS[kind](1)
    mid = interpolate(a, b, 0.5)
    blocks = residual_blocks(a, X[:2])
    r = repair(a, b, mid, BATCHES, 0.5)
    old = repair(a, b, mid, BATCHES, 0.5, blocks=[])
    assert _gap(r, a, b, BATCHES, blocks, 0.5) < 0.1
    assert _gap(r, a, b, BATCHES, blocks, 0.5) < 0.2 * _gap(old, a, b, BATCHES, blocks, 0.5)


@pytest.mark.parametrize("kind", sorted(MODELS))
@pytest.mark.parametrize("t", [0.0, 0.37, 1.0])
def test_repair_of_a_model_merged_with_itself_is_the_same_function(kind, t):
    a = MODELS[kind](0)
    if kind != "resnet20-ln":  # REPAIR resets BN statistics: start from those of this data
        a = repair(a, a, a, ONE_BATCH, 0.5, blocks=[], targets=[])  # a BN reset, no correction
    r = repair(a, a, interpolate(a, a, t), ONE_BATCH, t)
    with torch.no_grad():
        ya, yr = a(X), r(X)
    torch.testing.assert_close(yr, ya, rtol=1e-3, atol=1e-3 * float(ya.abs().max()))


def test_repaired_model_saves_and_loads_through_io(tmp_path):
    from neuralign.io import load_into, load_model, save_model

    a, b = _resnet20("bn", 0), _resnet20("bn", 1)
    r = repair(a, b, interpolate(a, b, 0.5), BATCHES, 0.5)
    keys = [k for k in r.state_dict() if "repair_affine" in k]
    assert len(keys) == 2 * len(RESNET20_BLOCKS)
    assert set(r.state_dict()) - set(keys) == set(a.state_dict())
    assert type(r) is type(a) and isinstance(r, nn.Module)
    path = save_model(r, tmp_path / "r.safetensors")
    back = load_model(path)
    fresh = load_into(_resnet20("bn", 5), r.state_dict())
    with torch.no_grad():
        for m in (back, fresh):
            torch.testing.assert_close(m(X), r(X))
    # repairing again composes with the affines already there (no second set of keys)
    r2 = repair(a, b, r, BATCHES, 0.5)
    assert list(r2.state_dict()) == list(r.state_dict())


def test_repaired_model_is_still_permutable():
    from neuralign.permute import apply_permutation, random_permutation
    from neuralign.spec import spec_from_model

    a, b = _resnet20("ln", 0), _resnet20("ln", 1)
    r = repair(a, b, interpolate(a, b, 0.5), ONE_BATCH, 0.5)
    spec = spec_from_model(r, X[:2])
    p = apply_permutation(r, random_permutation(spec, seed=3), spec)
    assert not torch.equal(p.state_dict()["layer1.0.repair_affine.weight"],
                           r.state_dict()["layer1.0.repair_affine.weight"])
    with torch.no_grad():
        torch.testing.assert_close(p(X), r(X), rtol=1e-4, atol=1e-4)


def test_statistics_passes_read_each_batch_once_per_model():
    a, b = _resnet20("bn", 0), _resnet20("bn", 1)
    mid = interpolate(a, b, 0.5)
    calls = {"a": 0, "b": 0, "merged": 0}
    for name, m in (("a", a), ("b", b), ("merged", mid)):
        m.register_forward_hook(lambda *_, n=name: calls.__setitem__(n, calls[n] + 1))
    repair(a, b, mid, BATCHES, 0.5)
    # a and b: one statistics pass; the merged copy: the example batch that finds the
    # targets and the blocks, then one correction pass
    assert calls == {"a": 3, "b": 3, "merged": 2 + 3}


def test_fused_batch_norm_targets_equal_normalising_then_correcting(monkeypatch):
    """A batch-norm target's correction is fused with its normalisation, its output moments
    derived from its input's: the result equals running the batch norm in train mode and then
    measuring and correcting its output, batch by batch (the plain reading of REPAIR)."""
    import sys

    rp = sys.modules["neuralign.merge.repair"]  # the module (the package exports the function)

    def unfused(m, inputs, seen, goal, eps, scratch):
        def forward(x):
            inputs.update(x, 1)
            out = type(m).forward(m, x)
            mu, var = rp.batch_moments(out, 1)
            seen.merge(mu, var, out.numel() // out.shape[1])
            scale, shift = rp._affine(*(g.float() for g in goal), mu, var, eps)
            return out * scale.view(1, -1, 1, 1) + shift.view(1, -1, 1, 1)
        return forward

    a, b = _resnet20("bn", 0), _resnet20("bn", 1)
    mid = interpolate(a, b, 0.5)
    fused = repair(a, b, mid, BATCHES, 0.5)
    monkeypatch.setattr(rp, "_fused_batch_norm", unfused)
    plain = repair(a, b, mid, BATCHES, 0.5)
    assert list(fused.state_dict()) == list(plain.state_dict())
    for k, v in plain.state_dict().items():
        torch.testing.assert_close(fused.state_dict()[k], v, rtol=1e-4, atol=1e-5, msg=k)
    with torch.no_grad():
        torch.testing.assert_close(fused(X), plain(X), rtol=1e-4, atol=1e-4)
