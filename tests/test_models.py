import pytest
import torch

from neuralign.errors import NeuralignError
from neuralign.models import block_names, get_head_name, get_model, model_config, replace_head
from neuralign.train import evaluate, train

REFERENCE = [
    ("mlp", {"width": 128, "depth": 2}),
    ("cnn", {"width": 16}),
    ("vgg11", {"width": 0.25, "norm": "bn"}),
    ("vgg11", {"width": 0.25, "norm": "none"}),
    ("vgg16", {"width": 0.125, "norm": "bn"}),
    ("resnet20", {"width": 1, "norm": "bn"}),
    ("resnet20", {"width": 1, "norm": "ln"}),
]


@pytest.mark.parametrize("name,kw", REFERENCE, ids=[f"{n}-{k.get('norm', '')}" for n, k in REFERENCE])
def test_reference_models_learn_digits_quickly(digits, name, kw):
    torch.manual_seed(0)
    model = get_model(name, num_classes=10, in_channels=1, image_size=8, **kw)
    opt = {"optimizer": "adam", "lr": 1e-3} if "vgg" in name else {"lr": 0.05}
    train(model, digits.loader("train", 64), epochs=4, progress=False, **opt)
    acc = evaluate(model, digits.loader("test"))["accuracy"]
    assert acc > 0.5, f"{name} reached only {acc:.2f} on digits (chance is 0.1)"


def test_vgg_and_resnet_accept_28_and_32_pixel_inputs():
    for size in (28, 32):
        x = torch.randn(2, 3, size, size)
        assert get_model("vgg11", in_channels=3, image_size=size)(x).shape == (2, 10)
        assert get_model("resnet20", in_channels=3, width=2)(x).shape == (2, 10)


def test_resnet20_width_multiplier():
    small = get_model("resnet20", width=1)
    wide = get_model("resnet20", width=4)
    assert wide.classifier.in_features == 4 * small.classifier.in_features == 256


def test_model_config_records_how_to_rebuild():
    m = get_model("resnet20", width=2, norm="ln", num_classes=7)
    assert model_config(m) == {"name": "resnet20",
                               "kwargs": {"width": 2, "norm": "ln", "num_classes": 7},
                               "version": 2}


def test_unknown_model_and_bad_arguments():
    with pytest.raises(NeuralignError, match="unknown model 'resnet21'"):
        get_model("resnet21")
    with pytest.raises(NeuralignError, match="bad arguments for model 'mlp'"):
        get_model("mlp", colour="red")
    with pytest.raises(NeuralignError, match="norm must be"):
        get_model("resnet20", norm="batch")


def test_head_and_blocks_of_reference_models():
    m = get_model("resnet20")
    assert get_head_name(m) == "classifier"
    assert block_names(m)[0] == "stem" and block_names(m)[-1] == "classifier"
    assert len(block_names(m)) == 11  # stem, 9 residual blocks, head
    new = replace_head(m, 3, seed=0)
    assert new.classifier.out_features == 3 and m.classifier.out_features == 10
    assert model_config(new)["kwargs"]["num_classes"] == 3
    assert torch.equal(new.stem[0].weight, m.stem[0].weight)


def test_torchvision_and_timm_models_when_installed():
    pytest.importorskip("torchvision")
    tv = get_model("torchvision:resnet18", num_classes=5).eval()
    assert get_head_name(tv) == "fc" and tv(torch.randn(1, 3, 32, 32)).shape == (1, 5)
    assert "layer4.1" in block_names(tv)
    vit = get_model("torchvision:vit_b_16", num_classes=4)
    assert get_head_name(vit) == "heads.head"
    timm = pytest.importorskip("timm")
    assert timm is not None
    tm = get_model("timm:resnet18", num_classes=3, in_channels=1).eval()
    assert get_head_name(tm) == "fc" and tm(torch.randn(1, 1, 32, 32)).shape == (1, 3)
    assert replace_head(tm, 7).fc.out_features == 7


def test_hf_path_must_exist(tmp_path):
    pytest.importorskip("transformers")
    with pytest.raises(NeuralignError, match="never downloads"):
        get_model(f"hf:{tmp_path / 'missing'}")
