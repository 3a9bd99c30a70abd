"""The automatic per-layer strategies through ``neuralign.finetune.finetune``."""

import pytest
import torch
from torch.utils.data import TensorDataset

from neuralign.errors import NeuralignError
from neuralign.finetune import finetune, list_strategies
from neuralign.finetune.auto_lr import model_layers, plot_layer_weights, save_layer_weights
from neuralign.finetune.auto_lr.strategies import AutoRGN, _Rescore
from neuralign.models import get_model

AUTO = ["auto_rgn", "auto_snr", "auto_rgn_hessian", "auto_rgn_change",
        "auto_rgn_hessian_change", "layerwise_surprise", "layerwise_surprise_diff",
        "module_criticality"]


def tiny(seed=0):
    torch.manual_seed(seed)
    return get_model("cnn", width=4, num_classes=3)


def ds(n=48, seed=0, shift=0.0):
    g = torch.Generator().manual_seed(seed)
    return TensorDataset(torch.randn(n, 1, 10, 10, generator=g) + shift,
                         torch.randint(0, 3, (n,), generator=g))


def run(strategy, epochs=1, **kw):
    return finetune(tiny(), ds(n=32, seed=1, shift=0.5), strategy=strategy, epochs=epochs, lr=0.05,
                    batch_size=16, progress=False, **kw)


def test_registered():
    assert set(AUTO + ["cross_validation"]) <= set(list_strategies())


@pytest.mark.parametrize("name", AUTO)
def test_strategy_runs_and_zero_weights_freeze_exactly(name):
    model = tiny()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    opts = {} if name in ("auto_rgn", "auto_snr", "auto_rgn_hessian") else {"source_data": ds()}
    if name == "module_criticality":
        opts["top_k"] = 3
    if "hessian" in name:
        opts["lbfgs_steps"] = 4
    res = finetune(model, ds(n=32, seed=1, shift=0.5), strategy=name, epochs=2, lr=0.05,
                   batch_size=16, progress=False, **opts)
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())  # input intact
    w = res.info["layer_weights"]
    assert set(w) == {layer.name for layer in model_layers(model)}
    assert all(0.0 <= v <= 1.0 for v in w.values()) and max(w.values()) == pytest.approx(1.0)
    new = dict(res.model.named_parameters())
    for layer in w:  # a layer whose weight stayed 0 throughout never moved
        if all(h[layer] == 0.0 for h in res.info["weights_history"]):
            assert torch.equal(new[layer], before[layer]), layer
    # batch-norm parameters are frozen (weight 0) by default
    assert torch.equal(new["block1.0.1.weight"], before["block1.0.1.weight"])
    if name == "module_criticality":
        assert sum(v > 0 for v in w.values()) <= 3


def test_auto_rgn_recomputes_every_epoch_or_k_steps():
    res = finetune(
        tiny(), ds(seed=1), strategy="auto_rgn", epochs=3, lr=0.05, batch_size=16,
        progress=False)
    assert len(res.info["weights_history"]) == 3
    res = finetune(tiny(), ds(seed=1), strategy="auto_rgn", epochs=1, lr=0.05, batch_size=16,
                   progress=False, every=1)
    assert len(res.info["weights_history"]) == 1 + 3  # prepare + every one of 3 steps
    once = finetune(tiny(), ds(seed=1), strategy="auto_rgn", epochs=2, lr=0.05, batch_size=16,
                    progress=False, every="once")
    assert len(once.info["weights_history"]) == 1
    snr = finetune(tiny(), ds(seed=1), strategy="auto_snr", epochs=1, lr=0.05, batch_size=16,
                   progress=False, threshold=0.3)
    assert set(snr.info["layer_weights"].values()) <= {0.0, 1.0}
    assert snr.info["layer_weights"] == {k: float(v >= 0.3)
                                         for k, v in snr.info["raw_scores"].items()}
    with pytest.raises(NeuralignError, match="every"):
        run("auto_rgn", every="sometimes")


@pytest.mark.parametrize("rebuild", [False, True])
def test_in_place_rescaling_keeps_optimizer_state_unless_rebuild(rebuild):
    model, data = tiny(), ds()
    strat = AutoRGN(rebuild_optimizer=rebuild)
    from neuralign.finetune.api import FinetuneContext, as_loader

    loader = as_loader(data, batch_size=16, shuffle=True)
    ctx = FinetuneContext(batch_size=16)
    strat.prepare(model, loader, ctx)
    groups = strat.param_groups(model)
    for g in groups:
        g["lr"] = 0.01
    opt = torch.optim.Adam(groups)
    x, y = data.tensors
    torch.nn.functional.cross_entropy(model(x), y).backward()
    opt.step()
    assert len(opt.state) > 0
    for g in opt.param_groups:
        g["lr_scale"] = -1.0
    _Rescore(strat, loader, ctx).on_epoch_start(model, opt, 1)
    named = [g for g in opt.param_groups if g["name"] != "__frozen_norm__"]
    assert all(0 <= g["lr_scale"] <= 1 for g in named)
    assert (len(opt.state) == 0) == rebuild


def test_source_data_required_and_bad_options():
    with pytest.raises(NeuralignError, match="source_data"):
        run("auto_rgn_change")
    with pytest.raises(NeuralignError, match="source_data"):
        run("layerwise_surprise")
    with pytest.raises(NeuralignError, match="removal"):
        run("module_criticality", removal="zero", on="target")
    with pytest.raises(NeuralignError, match="does not accept"):
        run("auto_rgn", bins=8)
    with pytest.raises(NeuralignError, match="val_data"):
        run("cross_validation")


def test_cross_validation_and_criticality_selection_by_validation():
    res = run("cross_validation", granularity="block", val_data=ds(seed=3), max_len=1)
    cv = res.info["cv_val_accuracy"]
    assert list(cv) == [f"{b}..{b}" for b in res.info["layers"]]  # 5 single blocks
    assert res.info["chosen_blocks"] and set(res.info["layer_weights"].values()) <= {0.0, 1.0}
    res = run("module_criticality", val_data=ds(seed=3), on="target", removal="identity",
              pretune_epochs=[0, 1], granularity="block")
    assert set(res.info["val_accuracy_by_pretune"]) == {0, 1}
    assert res.info["pretune_epochs"] in (0, 1)
    assert list(res.info["layer_weights"]) == ["block1.0", "block1.1", "block2.0", "block2.1",
                                               "classifier"]


def test_torchvision_resnet_block_scores():
    tv = pytest.importorskip("torchvision")
    torch.manual_seed(0)
    model = tv.models.resnet18(num_classes=3).eval()
    data = ds(n=8, seed=2)
    x = data.tensors[0][:4].repeat(1, 3, 1, 1)
    y = data.tensors[1][:4]
    from neuralign.finetune.auto_lr import criticality_scores, gradient_weights

    layers = model_layers(model, "block")
    names = [layer.name for layer in layers]
    assert "layer1.0" in names and names[-1] == "fc" and "bn1" not in names
    w, _ = gradient_weights("rgn", model, [(x, y)], layers)
    assert max(w.values()) == pytest.approx(1.0)
    some = [layer for layer in layers if layer.name in ("conv1", "layer1.0", "layer2.0", "fc")]
    raw = criticality_scores(model, [(x, y)], some, removal="identity", granularity="block")
    assert set(raw) == {"conv1", "layer1.0", "layer2.0", "fc"}


def test_weights_are_saved_and_plotted(tmp_path):
    w = {"auto_rgn": {"a": 1.0, "b": 0.2}, "surprise": {"a": 0.0, "b": 1.0}}
    p = save_layer_weights(w, tmp_path / "w.json")
    import json

    assert json.loads(p.read_text()) == w
    png = plot_layer_weights(w, tmp_path / "w.png")
    assert png.stat().st_size > 1000
