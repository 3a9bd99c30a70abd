"""Auto-SNR as Lee et al.'s 0/1 mask, and layerwise surprise as the paper's mean over
post-activation units (each test fails on the earlier implementation)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import TensorDataset

from neuralign.finetune import finetune, list_strategies
from neuralign.finetune.auto_lr import model_layers, snr_scores, surprise_scores
from neuralign.finetune.auto_lr.surprise import resolve_units
from neuralign.models import get_model


def mlp(seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(6, 5), nn.ReLU(), nn.Linear(5, 3))


def batches(n=16, nb=3, seed=1, shift=0.0):
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(n, 6, generator=g) + shift, torch.randint(0, 3, (n,), generator=g))
            for _ in range(nb)]


def test_lee_snr_statistic_matches_hand_computation():
    m, bs = mlp(), batches()
    layers = model_layers(m, "tensor")
    raw = snr_scores(m, bs, layers)  # statistic="units"
    params = dict(m.named_parameters())
    exp = {k: 0.0 for k in raw}
    for x, y in bs:
        grads = torch.autograd.grad(F.cross_entropy(m(x), y), [params[k] for k in raw])
        for k, g in zip(raw, grads):
            g = g.double()
            exp[k] += float((g * g / (torch.var(g, dim=0, keepdim=True) + 1e-8)).mean()) / len(bs)
    for k in raw:
        assert raw[k] == pytest.approx(exp[k], rel=1e-6)


def test_auto_snr_is_a_zero_one_mask_and_scaled_is_kept_by_name():
    assert {"auto_snr", "auto_snr_scaled"} <= set(list_strategies())
    ds = TensorDataset(torch.cat([b[0] for b in batches()]), torch.cat([b[1] for b in batches()]))
    kw = dict(epochs=1, lr=0.05, batch_size=16, progress=False, every="once")
    res = finetune(mlp(), ds, strategy="auto_snr", **kw)
    w, raw = res.info["layer_weights"], res.info["raw_scores"]
    assert set(w.values()) <= {0.0, 1.0}
    assert w == {k: float(v >= 0.95) for k, v in raw.items()}
    assert res.info["options"]["threshold"] == 0.95
    scaled = finetune(mlp(), ds, strategy="auto_snr_scaled", **kw)
    ws, rs = scaled.info["layer_weights"], scaled.info["raw_scores"]
    top = max(rs.values())
    assert ws == pytest.approx({k: v / top for k, v in rs.items()})
    assert any(0 < v < 1 for v in ws.values())


def test_per_example_snr_refuses_batch_statistics():
    from neuralign.errors import NeuralignError

    torch.manual_seed(0)
    ds = TensorDataset(torch.randn(32, 1, 10, 10), torch.randint(0, 3, (32,)))
    cnn = get_model("cnn", width=4, num_classes=3)
    with pytest.raises(NeuralignError, match="per-example"):
        finetune(cnn, ds, strategy="auto_snr_scaled", bn="adapt", epochs=1, progress=False,
                 batch_size=16)
    res = finetune(cnn, ds, strategy="auto_snr_scaled", bn="frozen", epochs=1, progress=False,
                   batch_size=16)
    assert res.info["bn"] == "frozen"


def hand_surprise(src: np.ndarray, tgt: np.ndarray, bins=8, smoothing=1e-3) -> np.ndarray:
    """Per unit KL(target || source) of equal-width histograms over source ∪ target."""
    out = []
    for k in range(src.shape[1]):
        lo, hi = min(src[:, k].min(), tgt[:, k].min()), max(src[:, k].max(), tgt[:, k].max())
        if hi <= lo:
            out.append(0.0)
            continue
        cs = np.histogram(src[:, k], bins=bins, range=(lo, hi))[0] + smoothing
        ct = np.histogram(tgt[:, k], bins=bins, range=(lo, hi))[0] + smoothing
        p, q = ct / ct.sum(), cs / cs.sum()
        out.append(float((p * np.log(p / q)).sum()))
    return np.array(out)


def test_surprise_is_the_mean_over_post_activation_units():
    m = mlp()
    src, tgt = batches(n=64, nb=2, seed=3), batches(n=64, nb=2, seed=4, shift=1.0)
    layers = model_layers(m, "tensor")
    raw = surprise_scores(m, src, tgt, layers)
    with torch.no_grad():
        post = lambda bs: torch.relu(m[0](torch.cat([b[0] for b in bs]))).double().numpy()
        logits = lambda bs: m(torch.cat([b[0] for b in bs])).double().numpy()
        exp_hidden = hand_surprise(post(src), post(tgt)).mean()
        exp_head = hand_surprise(logits(src), logits(tgt)).mean()
    assert raw["0.weight"] == pytest.approx(exp_hidden, rel=1e-4, abs=1e-9)
    assert raw["2.weight"] == pytest.approx(exp_head, rel=1e-4, abs=1e-9)
    summed = surprise_scores(m, src, tgt, layers, reduce="sum")
    assert summed["0.weight"] == pytest.approx(5 * raw["0.weight"], rel=1e-6)
    pre = surprise_scores(m, src, tgt, layers, at="output")
    with torch.no_grad():
        pre_act = lambda bs: m[0](torch.cat([b[0] for b in bs])).double().numpy()
        assert pre["0.weight"] == pytest.approx(hand_surprise(pre_act(src), pre_act(tgt)).mean(),
                                                rel=1e-4)


def test_post_activation_skips_batch_norm_and_stops_at_the_next_layer():
    cnn = get_model("cnn", width=4, num_classes=3)  # conv -> BN -> ReLU; head has no activation
    names = ["block1.0.0", "block2.1.0", "classifier"]
    t = resolve_units(cnn, torch.randn(2, 1, 10, 10), names)
    assert t["block1.0.0"] == ("block1.0.2", 0)
    assert t["block2.1.0"] == ("block2.1.2", 0)
    assert t["classifier"] == ("classifier", 0)
