"""Every federated global model reloads with ``neuralign.io.load_model`` as the same function:
FedAvg and FedMA (which grows layer widths), LeNet and registry models, final model and
per-round checkpoint."""

from __future__ import annotations

import numpy as np
import pytest
import torch

pytest.importorskip("flwr", reason="Flower is not installed (pip install 'neuralign[fl]')")
pytest.importorskip("flwr_datasets", reason="flwr-datasets is not installed")

from neuralign.federated import FedTask
from neuralign.federated.fedma import resize_like
from neuralign.federated.models import LeNet
from neuralign.federated.runner import run_federated
from neuralign.io import load_model, load_state_dict, save_model
from neuralign.models import get_model, model_config


def _images16(tmp_path):
    """A tiny 16x16 two-class image set (LeNet needs >= 16x16; ``digits`` is 8x8)."""
    rng = np.random.default_rng(0)
    y = np.arange(240) % 2
    x = rng.normal(0, 1, (240, 1, 16, 16)).astype(np.float32)
    x[:, :, :8] += 1.5 * (2 * y[:, None, None, None] - 1)  # class shows in the upper half
    path = tmp_path / "img16.npz"
    np.savez(path, x=x, y=y)
    return f"npz:{path}"


def _global_model(task, path):
    """The in-memory global model the server evaluates, rebuilt from the saved tensors."""
    sd = load_state_dict(path)
    model = resize_like(task.build_model(), sd)
    model.load_state_dict(sd)
    return model.eval()


def _assert_same_function(task, path, x):
    ref = _global_model(task, path)
    got = load_model(path)
    assert {k: v.shape for k, v in got.state_dict().items()} == \
        {k: v.shape for k, v in ref.state_dict().items()}
    with torch.no_grad():
        assert torch.equal(got(x), ref(x))


@pytest.mark.parametrize("model, kwargs, strategy, rounds", [
    ("lenet", '{"width": 4, "hidden": 8}', "fedavg", 1),
    ("lenet", '{"width": 4, "hidden": 8}', "fedma", 4),
    ("mlp", '{"width": 8, "depth": 1}', "fedma", 2),
    ("mlp", '{"width": 8, "depth": 1}', "fedpfn", 1),
])
def test_federated_global_model_reloads_as_the_same_function(tmp_path, model, kwargs, strategy,
                                                             rounds):
    data = "digits" if model == "mlp" else _images16(tmp_path)
    task = FedTask(dataset=data, num_partitions=2, alpha=1.0, model=model, model_kwargs=kwargs,
                   lr=0.05, batch_size=32, seed=0)
    out, ckdir = tmp_path / "global.safetensors", tmp_path / "ck"
    h = run_federated(task, strategy, rounds=rounds, save_model=str(out),
                      checkpoint_dir=str(ckdir),
                      **({"fedma_max_growth": 2.0, "fedma_independent_init": True}
                         if strategy == "fedma" else {}))
    assert h["finished"]
    base = {k: v.shape for k, v in task.build_model().state_dict().items()}
    saved = {k: v.shape for k, v in load_state_dict(out).items()}
    if strategy == "fedma":
        assert saved != base  # the run grew some layer: the case load_model used to refuse
    x = torch.randn(5, *task.model_io()[0], generator=torch.Generator().manual_seed(1))
    _assert_same_function(task, out, x)
    _assert_same_function(task, ckdir / "last.safetensors", x)


def test_lenet_is_built_by_name_with_per_layer_widths_and_old_defaults():
    old = get_model("lenet", num_classes=10, in_channels=1, image_size=28)
    shapes = {k: tuple(v.shape) for k, v in old.state_dict().items()}
    assert shapes["features.0.weight"] == (6, 1, 5, 5)
    assert shapes["features.3.weight"] == (16, 6, 5, 5)
    assert shapes["fc.0.weight"] == (64, 16 * 4 * 4)
    m = get_model("lenet", in_channels=3, image_size=32, c1=5, c2=7, hidden=9)
    assert m.features[0].out_channels == 5 and m.features[3].out_channels == 7
    assert m.fc[0].out_features == 9 and m.fc[0].in_features == 7 * 5 * 5
    assert model_config(m)["name"] == "lenet"
    assert isinstance(m, LeNet)


def test_resized_lenet_records_its_grown_widths(tmp_path):
    m = get_model("lenet", image_size=16, width=4, hidden=8, seed=0)
    wide = get_model("lenet", image_size=16, c1=6, c2=13, hidden=11, seed=1)
    sd = wide.state_dict()
    resize_like(m, sd)
    m.load_state_dict(sd)
    kw = model_config(m)["kwargs"]
    assert (kw["c1"], kw["c2"], kw["hidden"]) == (6, 13, 11)
    path = save_model(m, tmp_path / "m.safetensors")
    x = torch.randn(3, 1, 16, 16)
    with torch.no_grad():
        assert torch.equal(load_model(path)(x), m.eval()(x))


def test_resized_registry_model_reloads_and_an_ordinary_mismatch_still_refuses(tmp_path):
    m = get_model("mlp", width=8, depth=2, seed=0)
    wide = get_model("mlp", width=8, depth=2, seed=1)
    sd = wide.state_dict()
    sd["layer1.0.weight"] = torch.randn(12, 64)
    sd["layer1.0.bias"] = torch.randn(12)
    sd["layer2.0.weight"] = torch.randn(8, 12)
    resize_like(m, sd)
    m.load_state_dict(sd)
    path = save_model(m, tmp_path / "m.safetensors")
    x = torch.randn(4, 1, 8, 8)
    with torch.no_grad():
        assert torch.equal(load_model(path)(x), m.eval()(x))
    # a checkpoint that records no resize is still loaded strictly
    plain = get_model("mlp", width=8, depth=2)
    path2 = save_model(plain, tmp_path / "p.safetensors")
    from safetensors.torch import load_file, save_file

    from neuralign.errors import ArchitectureMismatchError
    from neuralign.io.formats import header_metadata

    t = load_file(str(path2))
    t["layer1.0.weight"] = torch.randn(12, 64)
    save_file(t, str(path2), metadata=header_metadata(path2))
    with pytest.raises(ArchitectureMismatchError):
        load_model(path2)
