"""Models from anywhere: weights files load strictly, in_channels is honoured, seeds reproduce."""

import pytest
import torch
from safetensors.torch import save_file
from torch import nn

from neuralign.errors import ArchitectureMismatchError, CheckpointError, NeuralignError
from neuralign.io import load_model, read_info, save_model
from neuralign.models import get_model
from neuralign.models.weights import find_input_conv

tv = pytest.importorskip("torchvision")


def _save_plain(model, path):
    save_file({k: v.detach().contiguous() for k, v in model.state_dict().items()}, str(path))
    return path


def _equal_except(a: dict, b: dict, skip=()) -> bool:
    return all(torch.equal(a[k], b[k]) for k in a if not k.startswith(skip))


@pytest.fixture(scope="module")
def resnet18_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("w") / "resnet18.safetensors"
    model = get_model("torchvision:resnet18", seed=0)
    return model.state_dict(), _save_plain(model, path)


def test_get_model_seed_reproduces_and_leaves_the_global_rng_alone():
    torch.manual_seed(123)
    state = torch.random.get_rng_state()
    a, b = get_model("mlp", width=16, seed=7), get_model("mlp", width=16, seed=7)
    assert torch.equal(torch.random.get_rng_state(), state)
    assert torch.equal(a.classifier.weight, b.classifier.weight)
    assert not torch.equal(a.classifier.weight, get_model("mlp", width=16, seed=8)
                           .classifier.weight)


def test_torchvision_weights_load_strictly(resnet18_file):
    sd, path = resnet18_file
    m = get_model("torchvision:resnet18", weights=path)
    assert _equal_except(m.state_dict(), sd)


def test_torchvision_weights_with_a_new_head_keep_the_body(resnet18_file):
    sd, path = resnet18_file
    m = get_model("torchvision:resnet18", num_classes=10, weights=path, seed=1)
    assert m.fc.out_features == 10
    assert _equal_except(m.state_dict(), sd, skip=("fc.",))


@pytest.mark.parametrize("num_classes", [None, 10])
def test_weights_of_another_architecture_are_refused(tmp_path, num_classes):
    """Before: with num_classes the mismatched tensors were dropped and training started from
    a random init without a word."""
    other = _save_plain(get_model("torchvision:resnet34", seed=0), tmp_path / "r34.safetensors")
    kw = {"num_classes": num_classes} if num_classes else {}
    with pytest.raises(ArchitectureMismatchError, match="r34.safetensors does not fit ResNet.*"
                       r"96 unexpected \(first: 'layer1.2.") as info:
        get_model("torchvision:resnet18", weights=other, **kw)
    assert "\n" not in str(info.value)
    mlp = _save_plain(get_model("mlp", seed=0), tmp_path / "mlp.safetensors")
    with pytest.raises(ArchitectureMismatchError, match="mlp.safetensors does not fit"):
        get_model("torchvision:resnet18", weights=mlp, **kw)


def test_missing_weights_file_and_pickles(resnet18_file, tmp_path):
    sd, _ = resnet18_file
    with pytest.raises(NeuralignError, match="does not exist.*never downloads"):
        get_model("torchvision:resnet18", weights=tmp_path / "nope.safetensors")
    pt = tmp_path / "r18.pth"
    torch.save(sd, pt)
    with pytest.raises(CheckpointError, match="--allow-pickle"):
        get_model("torchvision:resnet18", weights=pt)
    m = get_model("torchvision:resnet18", weights=pt, allow_pickle=True)
    assert _equal_except(m.state_dict(), sd)


def test_in_channels_without_weights_replaces_the_input_conv():
    m = get_model("torchvision:resnet18", in_channels=1, num_classes=4, seed=0)
    assert m.conv1.in_channels == 1
    assert m.eval()(torch.randn(2, 1, 32, 32)).shape == (2, 4)
    assert get_model("torchvision:resnet18", in_channels=1, num_classes=4, seed=0
                     ).conv1.weight.equal(m.conv1.weight)


def test_in_channels_adapts_trained_rgb_weights(resnet18_file):
    sd, path = resnet18_file
    rgb = get_model("torchvision:resnet18", weights=path).eval()
    grey = get_model("torchvision:resnet18", weights=path, in_channels=1).eval()
    assert torch.allclose(grey.conv1.weight, sd["conv1.weight"].sum(1, keepdim=True))
    assert _equal_except(grey.state_dict(), sd, skip=("conv1.",))
    x = torch.randn(2, 1, 64, 64)
    with torch.no_grad():  # a grey image is the same picture in three equal colours
        assert torch.allclose(grey(x), rgb(x.expand(-1, 3, -1, -1)), atol=1e-4)
    six = get_model("torchvision:resnet18", weights=path, in_channels=6).eval()
    with torch.no_grad():
        assert torch.allclose(six(x.expand(-1, 6, -1, -1)), rgb(x.expand(-1, 3, -1, -1)),
                              atol=1e-4)


def test_checkpoint_of_an_adapted_model_reloads_without_the_weights_file(resnet18_file,
                                                                          tmp_path):
    _, path = resnet18_file
    copy = tmp_path / "copy.safetensors"
    copy.write_bytes(path.read_bytes())
    m = get_model("torchvision:resnet18", weights=copy, in_channels=1, num_classes=3)
    out = save_model(m, tmp_path / "m.safetensors")
    copy.unlink()  # the checkpoint holds every weight
    info = read_info(out)
    assert info["arch"] == "torchvision:resnet18"
    assert info["model_kwargs"]["in_channels"] == 1
    loaded = load_model(out)
    assert _equal_except(loaded.state_dict(), m.state_dict())
    # a file whose input conv already has one channel loads as is
    again = get_model("torchvision:resnet18", weights=out, in_channels=1, num_classes=3)
    assert _equal_except(again.state_dict(), m.state_dict())


def test_plain_state_dict_of_a_torchvision_model_via_arch(resnet18_file):
    sd, path = resnet18_file
    m = load_model(path, arch="torchvision:resnet18")
    assert _equal_except(m.state_dict(), sd)
    with pytest.raises(ArchitectureMismatchError, match="arch= 'torchvision:resnet34'"):
        load_model(path, arch="torchvision:resnet34")


def test_native_shape_arguments_are_accepted():
    """What the CLI passes for every model: 3 channels and the image size."""
    m = get_model("torchvision:resnet18", in_channels=3, image_size=32, num_classes=4).eval()
    assert m(torch.randn(1, 3, 32, 32)).shape == (1, 4)
    vit = get_model("torchvision:vit_b_16", in_channels=1, image_size=32, num_classes=4).eval()
    assert vit(torch.randn(1, 1, 32, 32)).shape == (1, 4)


def test_input_conv_must_be_unambiguous():
    two = nn.Sequential(nn.Conv2d(3, 4, 3), nn.Conv2d(3, 4, 3))
    with pytest.raises(NeuralignError, match="2 candidates"):
        find_input_conv(two)


def test_timm_weights_and_in_channels(tmp_path):
    pytest.importorskip("timm")
    src = get_model("timm:resnet18", seed=0)
    path = _save_plain(src, tmp_path / "t.safetensors")
    m = get_model("timm:resnet18", weights=path, num_classes=5, in_channels=1)
    assert m.conv1.in_channels == 1 and m.fc.out_features == 5
    assert torch.allclose(m.conv1.weight, src.conv1.weight.sum(1, keepdim=True))
    native = get_model("timm:resnet18", in_channels=2, seed=0)
    assert native.conv1.in_channels == 2
    r34 = _save_plain(get_model("timm:resnet34", seed=0), tmp_path / "t34.safetensors")
    with pytest.raises(ArchitectureMismatchError, match="does not fit"):
        get_model("timm:resnet18", weights=r34, num_classes=5)


def test_reference_models_take_weights_too(tmp_path):
    src = get_model("mlp", width=16, seed=0)
    path = _save_plain(src, tmp_path / "m.safetensors")
    assert torch.equal(get_model("mlp", width=16, weights=path).classifier.weight,
                       src.classifier.weight)
    with pytest.raises(ArchitectureMismatchError, match="layer1.0.weight"):
        get_model("mlp", width=32, weights=path)


def test_wrapper_prefixes_of_data_parallel_and_compile_are_removed(tmp_path):
    src = get_model("mlp", width=16, seed=0)
    sd = {f"module._orig_mod.{k}": v for k, v in src.state_dict().items()}
    torch.save(sd, tmp_path / "ddp.pt")
    m = load_model(tmp_path / "ddp.pt", arch="mlp", model_kwargs={"width": 16},
                   allow_pickle=True)
    assert torch.equal(m.classifier.weight, src.classifier.weight)
