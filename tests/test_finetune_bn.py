"""One batch-norm policy for every strategy, and gradient scores taken in the training mode."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.utils.data import TensorDataset

from neuralign.errors import NeuralignError
from neuralign.finetune import finetune
from neuralign.merge import reset_bn
from neuralign.models import get_model

KW = dict(epochs=1, lr=0.05, batch_size=16, progress=False)


def cnn(seed=0, classes=3):
    torch.manual_seed(seed)
    return get_model("cnn", width=4, num_classes=classes)  # conv (with bias) -> BN -> ReLU


def data(n=32, seed=1, shift=0.5, classes=3):
    g = torch.Generator().manual_seed(seed)
    return TensorDataset(torch.randn(n, 1, 10, 10, generator=g) + shift,
                         torch.randint(0, classes, (n,), generator=g))


def bn_stats(model):
    return {k: v.clone() for k, v in model.state_dict().items() if "running" in k}


def stats_changed(a, b):
    sa, sb = bn_stats(a), bn_stats(b)
    return any(not torch.equal(sa[k], sb[k]) for k in sa)


def record_modes(model):
    """Per batch-norm layer, the train flags seen at every forward that builds a graph (the
    scoring passes and the training steps; evaluation runs under no_grad). The hooks are plain
    closures, so they survive ``finetune``'s deepcopy and report on the copy."""
    seen: dict[int, set] = {}
    bns = [m for m in model.modules() if isinstance(m, nn.BatchNorm2d)]

    def hook_for(i):
        def hook(mod, _inp):
            if torch.is_grad_enabled():
                seen.setdefault(i, set()).add(mod.training)
        return hook

    for i, m in enumerate(bns):
        m.register_forward_pre_hook(hook_for(i))
    return seen


@pytest.mark.parametrize("strategy", ["auto_rgn", "auto_rgn_hessian", "auto_snr",
                                      "auto_rgn_change"])
@pytest.mark.parametrize("bn", [None, "frozen", "adapt"])
def test_gradient_scores_are_taken_in_the_training_mode(strategy, bn):
    model = cnn()
    seen = record_modes(model)
    kw = {} if bn is None else {"bn": bn}
    if strategy == "auto_rgn_change":
        kw["source_data"] = data(seed=7, shift=0.0)
    res = finetune(model, data(), strategy=strategy, **{**KW, "epochs": 2}, **kw)
    assert len(res.info["weights_history"]) >= 1 and len(seen) == 4
    for i, flags in seen.items():
        assert len(flags) == 1, f"BN layer {i}: scoring and training used different modes"
    flags = {next(iter(f)) for f in seen.values()}
    if bn == "frozen":
        assert flags == {False}
    if bn == "adapt":
        assert flags == {True}


def test_pre_bn_biases_do_not_set_the_max_under_batch_statistics():
    res = finetune(cnn(), data(), strategy="auto_rgn", bn="adapt", every="once", **KW)
    raw, w = res.info["raw_scores"], res.info["layer_weights"]
    pre_bn_biases = [k for k in raw if k.endswith(".0.bias") and k.startswith("block")]
    assert pre_bn_biases
    for k in pre_bn_biases:  # batch statistics cancel a per-channel shift: zero gradient
        assert raw[k] < 1e-4 * max(raw.values()) and w[k] < 1e-4
    top = max(w, key=w.get)
    assert top not in pre_bn_biases and w[top] == 1.0
    assert res.info["bn"] == "adapt" and res.info["score_mode"]["bn"] == "adapt"
    # in eval mode (frozen statistics) the same biases do move the output, and train so
    frozen = finetune(cnn(), data(), strategy="auto_rgn", bn="frozen", every="once", **KW)
    assert max(frozen.info["raw_scores"][k] for k in pre_bn_biases) > 1e-4


def test_scoring_changes_neither_weights_nor_statistics():
    from neuralign.finetune.auto_lr import model_layers, rgn_scores

    m = cnn()
    before = {k: v.clone() for k, v in m.state_dict().items()}
    x, y = data()[:16]
    rgn_scores(m, [(x, y)], model_layers(m), bn="adapt")
    assert all(torch.equal(before[k], v) for k, v in m.state_dict().items())


@pytest.mark.parametrize("strategy", ["full", "linear_probe", "auto_rgn", "cross_validation",
                                      "lp_ft"])
def test_every_strategy_applies_and_records_the_policy(strategy):
    base = cnn()
    extra = {"val_data": data(16, seed=5)} if strategy == "cross_validation" else {}
    runs = {bn: finetune(base, data(), strategy=strategy, bn=bn, **KW, **extra)
            for bn in ("frozen", "adapt")}
    for bn, res in runs.items():
        assert res.info["bn"] == bn
    assert not stats_changed(base, runs["frozen"].model)  # eval mode throughout
    assert stats_changed(base, runs["adapt"].model)  # every layer re-estimates


def test_train_policy_follows_what_the_strategy_trains():
    base = cnn()
    lp = finetune(base, data(), strategy="linear_probe", **KW)  # default bn="train"
    assert lp.info["bn"] == "train" and not stats_changed(base, lp.model)
    full = finetune(base, data(), strategy="full", **KW)
    assert stats_changed(base, full.model)
    # per-layer strategies freeze the BN affine parameters (weight 0): frozen statistics too
    rgn = finetune(base, data(), strategy="auto_rgn", **KW)
    assert not stats_changed(base, rgn.model)


def test_bad_policy_is_named():
    with pytest.raises(NeuralignError, match="bn must be one of"):
        finetune(cnn(), data(), strategy="full", bn="sometimes", **KW)


def test_bn_adapt_only_re_estimates_statistics():
    base = cnn()
    d = data(seed=3, shift=2.0)
    res = finetune(base, d, strategy="bn_adapt", **KW)
    sa, sb = base.state_dict(), res.model.state_dict()
    for k in sa:
        if "running" not in k and "num_batches" not in k:
            assert torch.equal(sa[k], sb[k]), k
    ref = reset_bn(base, torch.utils.data.DataLoader(d, batch_size=16))
    for k, v in ref.state_dict().items():
        if "running" in k:
            assert torch.allclose(sb[k], v, atol=1e-6), k
    assert stats_changed(base, res.model) and res.info["bn"] == "adapt"
    with pytest.raises(NeuralignError, match="label set"):
        finetune(base, d, strategy="bn_adapt", num_classes=5, **KW)
