"""The fine-tuning interface and the basic strategies: each trains exactly what it should."""

from __future__ import annotations

import copy

import pytest
import torch
from torch.utils.data import TensorDataset

from neuralign.errors import NeuralignError
from neuralign.finetune import (
    FinetuneResult,
    Strategy,
    finetune,
    get_strategy,
    list_strategies,
    register_strategy,
)
from neuralign.models import SmallCNN, block_names, get_head_name


def _data(n=48, classes=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 1, 8, 8, generator=g)
    y = torch.randint(0, classes, (n,), generator=g)
    return TensorDataset(x, y)


def _model(num_classes=5, seed=0):
    torch.manual_seed(seed)
    return SmallCNN(in_channels=1, num_classes=num_classes, width=4)


def _changed(a, b):
    sa, sb = a.state_dict(), b.state_dict()
    return {k for k in sa if not torch.equal(sa[k], sb[k])}


KW = dict(epochs=1, lr=0.05, batch_size=16, progress=False, num_classes=3)


def test_registry_lists_the_basic_strategies():
    names = list_strategies()
    for n in ["full", "linear_probe", "lp_ft", "half", "wise_ft", "ensemble"]:
        assert n in names


def test_unknown_strategy_and_option_errors_name_the_problem():
    with pytest.raises(NeuralignError, match="unknown fine-tuning strategy 'nope'.*full"):
        get_strategy("nope")
    with pytest.raises(NeuralignError, match="does not accept option.*bogus.*accepted: alpha"):
        get_strategy("wise_ft", bogus=1)
    with pytest.raises(NeuralignError, match="best_val"):
        finetune(_model(), _data(), strategy="full", select="best_val", **KW)


def test_full_trains_everything_new_head_input_untouched():
    m = _model(num_classes=5)
    before = copy.deepcopy(m.state_dict())
    res = finetune(m, _data(), strategy="full", **KW)
    assert isinstance(res, FinetuneResult)
    assert all(torch.equal(before[k], v) for k, v in m.state_dict().items())  # input untouched
    head = get_head_name(res.model)
    assert res.model.get_submodule(head).out_features == 3
    start = finetune(m, _data(), strategy="full", **{**KW, "epochs": 0}).model
    changed = _changed(start, res.model)
    weights = {k for k, _ in res.model.named_parameters() if k.endswith("weight")}
    assert weights <= changed  # (a conv bias before BN gets no gradient)
    assert res.info["strategy"] == "full"


def test_linear_probe_changes_only_the_head_and_keeps_bn_statistics():
    m = _model()
    start = finetune(m, _data(), strategy="full", **{**KW, "epochs": 0}).model
    res = finetune(m, _data(), strategy="linear_probe", **KW)
    head = get_head_name(res.model)
    changed = _changed(start, res.model)
    assert changed == {f"{head}.weight", f"{head}.bias"}
    assert all(p.requires_grad for p in res.model.parameters())  # flags restored


def test_half_changes_only_the_top_half():
    m = _model()
    start = finetune(m, _data(), strategy="full", **{**KW, "epochs": 0}).model
    res = finetune(m, _data(), strategy="half", **KW)
    blocks = block_names(m)
    top = blocks[len(blocks) // 2 :]
    bottom = blocks[: len(blocks) // 2]
    assert bottom and top
    changed = _changed(start, res.model)
    assert changed, "nothing trained"
    assert not any(k.startswith(tuple(b + "." for b in bottom)) for k in changed)
    top_params = [
        k
        for k, _ in res.model.named_parameters()
        if k.startswith(tuple(t + "." for t in top)) and k.endswith("weight")
    ]
    assert top_params and set(top_params) <= changed
    assert res.info["trained_blocks"] == top


def test_lp_ft_and_wise_ft_endpoints():
    m = _model()
    d = _data()
    res = finetune(m, d, strategy="lp_ft", probe="sgd", lp_epochs=1, **KW)
    assert set(res.history) == {"lp", "ft"} and res.info["lp_epochs"] == 1
    full = finetune(m, d, strategy="full", seed=3, **KW).model
    w1 = finetune(m, d, strategy="wise_ft", alpha=1.0, seed=3, **KW)
    w0 = finetune(m, d, strategy="wise_ft", alpha=0.0, seed=3, **KW)
    start = finetune(m, d, strategy="full", seed=3, **{**KW, "epochs": 0}).model
    for k, v in full.state_dict().items():
        torch.testing.assert_close(w1.model.state_dict()[k], v)
        if v.is_floating_point():  # integer buffers (num_batches_tracked) come from the tuned one
            torch.testing.assert_close(w0.model.state_dict()[k], start.state_dict()[k])
    wh = finetune(m, d, strategy="wise_ft", alpha=0.5, seed=3, **KW).model
    k = f"{get_head_name(wh)}.weight"
    torch.testing.assert_close(
        wh.state_dict()[k], 0.5 * (full.state_dict()[k] + start.state_dict()[k])
    )


def test_ensemble_averages_member_probabilities():
    m = _model()
    d = _data()
    res = finetune(m, d, strategy="ensemble", m=2, **KW)
    members = list(res.model.members)
    assert len(members) == 2
    assert not torch.equal(members[0].classifier.weight, members[1].classifier.weight)
    x = d.tensors[0][:5]
    with torch.no_grad():
        p = sum(mm.eval()(x).softmax(-1) for mm in members) / 2
        torch.testing.assert_close(res.model(x).exp(), p)


def test_custom_strategy_param_groups_and_callbacks_are_used():
    seen = []

    @register_strategy("_test_headonly_scale")
    class _T(Strategy):
        defaults = {"scale": 0.0}

        def param_groups(self, model):
            head = get_head_name(model)
            body = [p for n, p in model.named_parameters() if not n.startswith(head + ".")]
            return [
                {"params": body, "lr_scale": self.options["scale"]},
                {"params": list(model.get_submodule(head).parameters()), "lr_scale": 1.0},
            ]

        def callbacks(self, model, loader, ctx):
            class CB:
                def on_epoch_end(self, model, opt, epoch, metrics):
                    seen.append((epoch, ctx.scale, [g["lr_scale"] for g in opt.param_groups]))

            return [CB()]

    m = _model()
    start = finetune(m, _data(), strategy="full", **{**KW, "epochs": 0}).model
    res = finetune(m, _data(), strategy="_test_headonly_scale", scale=0.0, **KW)
    head = get_head_name(m)
    params = {k for k, _ in res.model.named_parameters()}
    assert _changed(start, res.model) & params == {f"{head}.weight", f"{head}.bias"}
    assert seen == [(0, 0.0, [0.0, 1.0])]


def test_best_val_selection_keeps_a_trained_epoch():
    d = _data()
    res = finetune(
        _model(),
        d,
        strategy="full",
        val_data=_data(seed=1),
        select="best_val",
        **{**KW, "epochs": 2},
    )
    assert res.info["selected_epochs"][0] in (0, 1)


@pytest.mark.parametrize("name", ["torchvision:mobilenet_v3_small", "timm:resnet10t"])
def test_linear_probe_on_real_architectures_replaces_and_trains_only_the_head(name):
    pytest.importorskip(name.split(":")[0])
    from neuralign.models import get_model

    torch.manual_seed(0)
    try:
        m = get_model(name, num_classes=10)
    except NeuralignError as exc:  # an architecture this timm version lacks
        pytest.skip(str(exc))
    g = torch.Generator().manual_seed(0)
    d = TensorDataset(
        torch.randn(8, 3, 32, 32, generator=g), torch.randint(0, 4, (8,), generator=g)
    )
    res = finetune(
        m,
        d,
        strategy="linear_probe",
        epochs=1,
        lr=0.05,
        batch_size=4,
        num_classes=4,
        progress=False,
    )
    head = get_head_name(res.model)
    assert res.model.get_submodule(head).out_features == 4
    start = finetune(m, d, strategy="full", epochs=0, num_classes=4, progress=False).model
    changed = _changed(start, res.model)
    assert changed == {f"{head}.weight", f"{head}.bias"}, sorted(changed)[:5]
