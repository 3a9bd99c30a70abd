import json

import pytest
import torch

from neuralign.errors import ArchitectureMismatchError, CheckpointError
from neuralign.io import LazyStateDict, load_model, load_state_dict, save_model
from neuralign.models import get_model


@pytest.fixture
def saved(tmp_path):
    torch.manual_seed(0)
    m = get_model("resnet20", width=1, norm="bn", num_classes=10)
    m.stem[1].running_mean.uniform_()  # buffers round-trip too
    path = save_model(m, tmp_path / "a.safetensors", metadata={"seed": 0})
    return m, path


def test_round_trip_is_bit_exact_and_needs_no_architecture(saved):
    m, path = saved
    loaded = load_model(path)
    assert type(loaded) is type(m)
    sd, sd2 = m.state_dict(), loaded.state_dict()
    assert sd.keys() == sd2.keys()
    assert all(torch.equal(sd[k], sd2[k]) for k in sd)
    meta = json.loads(path.with_name(path.name + ".json").read_text())
    assert meta["model"]["name"] == "resnet20" and meta["metadata"]["seed"] == 0


def test_truncated_file_is_named(saved, tmp_path):
    _, path = saved
    bad = tmp_path / "t.safetensors"
    bad.write_bytes(path.read_bytes()[:5000])
    with pytest.raises(CheckpointError, match="t.safetensors: corrupt or truncated"):
        load_state_dict(bad)


def test_pickle_refused_without_opt_in(saved, tmp_path):
    m, _ = saved
    p = tmp_path / "m.pt"
    torch.save(m.state_dict(), p)
    with pytest.raises(CheckpointError, match="allow_pickle=True"):
        load_state_dict(p)
    sd = load_state_dict(p, allow_pickle=True)
    assert torch.equal(sd["classifier.weight"], m.classifier.weight)


def test_wrong_architecture_is_named(saved):
    _, path = saved
    with pytest.raises(ArchitectureMismatchError, match="a.safetensors does not fit ResNet20.*shape"):
        load_model(path, model=get_model("resnet20", width=2))
    with pytest.raises(ArchitectureMismatchError, match="missing"):
        load_model(path, model=get_model("mlp"))


def test_missing_file_and_sidecar(saved, tmp_path):
    _, path = saved
    with pytest.raises(CheckpointError, match="no such checkpoint"):
        load_model(tmp_path / "nope.safetensors")
    path.with_name(path.name + ".json").unlink()
    with pytest.raises(CheckpointError, match="no architecture recorded"):
        load_model(path)


def test_failed_write_leaves_the_old_file_intact(saved, monkeypatch):
    m, path = saved
    before = path.read_bytes()
    import safetensors.torch

    def boom(*a, **k):
        raise OSError("disk full")

    monkeypatch.setattr(safetensors.torch, "save_file", boom)
    with pytest.raises(OSError):
        save_model(m, path)
    assert path.read_bytes() == before
    assert not list(path.parent.glob(".*.tmp"))


def test_lazy_state_dict_reads_on_demand(saved):
    m, path = saved
    lazy = LazyStateDict(path)
    assert set(lazy) == set(m.state_dict())
    assert torch.equal(lazy["classifier.bias"], m.classifier.bias)
