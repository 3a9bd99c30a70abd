import json
import math
import os
import warnings

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from neuralign.errors import ArchitectureMismatchError, CheckpointError, NeuralignError
from neuralign.io import (
    LazyStateDict,
    load_model,
    load_state_dict,
    read_info,
    read_record,
    save_model,
    save_state_dict,
)
from neuralign.models import get_model


@pytest.fixture
def saved(tmp_path):
    m = get_model("resnet20", width=1, norm="bn", num_classes=10, seed=0)
    m.stem[1].running_mean.uniform_()  # buffers round-trip too
    path = save_model(m, tmp_path / "a.safetensors",
                      metadata={"seed": 3, "data": "digits", "data_seed": 0})
    return m, path


def _equal(a, b):
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


def test_one_file_round_trip_is_bit_exact_and_needs_no_architecture(saved, tmp_path):
    m, path = saved
    loaded = load_model(path)
    assert type(loaded) is type(m) and _equal(m, loaded) and not loaded.training
    assert sorted(os.listdir(tmp_path)) == ["a.safetensors"]  # no sidecar, no temp file
    with safe_open(str(path), "pt") as f:
        meta = f.metadata()
    assert meta["format"] == "neuralign/2"
    record = json.loads(meta["neuralign"])
    assert record["model"]["name"] == "resnet20" and record["metadata"]["seed"] == 3


def test_read_info_is_flat_and_cheap(saved):
    _, path = saved
    info = read_info(path)
    assert info["arch"] == "resnet20" and info["format"] == "neuralign"
    assert info["model_kwargs"] == {"width": 1, "norm": "bn", "num_classes": 10}
    assert info["data"] == "digits" and info["seed"] == 3 and info["data_seed"] == 0


def _legacy(tmp_path, m):
    """A checkpoint as neuralign 1 wrote it: bare safetensors + JSON sidecar."""
    path = tmp_path / "old.safetensors"
    save_file({k: v.contiguous() for k, v in m.state_dict().items()}, str(path))
    (tmp_path / "old.safetensors.json").write_text(json.dumps(
        {"format": "neuralign/1", "model": {"name": "resnet20", "kwargs": {"width": 1}},
         "metadata": {"seed": 5}}))
    return path


def test_legacy_sidecar_still_read_and_dropped_on_resave(saved, tmp_path):
    m, _ = saved
    path = _legacy(tmp_path, m)
    assert _equal(load_model(path), m)
    info = read_info(path)
    assert info["arch"] == "resnet20" and info["seed"] == 5
    assert info["format"] == "neuralign-sidecar"
    save_model(load_model(path), path)  # re-saved as one file: the stale sidecar goes
    assert not (tmp_path / "old.safetensors.json").exists()
    assert read_info(path)["format"] == "neuralign" and _equal(load_model(path), m)


def test_header_wins_over_a_stale_sidecar(saved, tmp_path):
    m, path = saved
    (tmp_path / "a.safetensors.json").write_text(json.dumps(
        {"format": "neuralign/1", "model": {"name": "mlp", "kwargs": {}}}))
    assert _equal(load_model(path), m)


def test_plain_safetensors_needs_arch_then_loads_strictly(saved, tmp_path):
    m, _ = saved
    plain = tmp_path / "plain.safetensors"
    save_file({k: v.contiguous() for k, v in m.state_dict().items()}, str(plain))
    with pytest.raises(CheckpointError, match="no architecture recorded.*arch="):
        load_model(plain)
    assert read_info(plain) == {"arch": None, "model_kwargs": {}, "format": "safetensors"}
    loaded = load_model(plain, arch="resnet20", model_kwargs={"width": 1})
    assert _equal(loaded, m)
    with pytest.raises(ArchitectureMismatchError, match=r"'stem.0.weight' is \(16, 1, 3, 3\) "
                       r"in the file, \(32, 1, 3, 3\) in the model"):
        load_model(plain, arch="resnet20", model_kwargs={"width": 2})


def test_pickled_state_dict_only_with_opt_in(saved, tmp_path):
    m, _ = saved
    p = tmp_path / "m.pt"
    torch.save(m.state_dict(), p)
    with pytest.raises(CheckpointError, match="--allow-pickle.*allow_pickle=True"):
        load_model(p, arch="resnet20", model_kwargs={"width": 1})
    assert read_info(p)["arch"] is None
    loaded = load_model(p, arch="resnet20", model_kwargs={"width": 1}, allow_pickle=True)
    assert _equal(loaded, m)
    # a training checkpoint {"state_dict": ...} too
    torch.save({"state_dict": m.state_dict(), "epoch": 3}, tmp_path / "ckpt.pth")
    assert _equal(load_model(tmp_path / "ckpt.pth", arch="resnet20",
                             model_kwargs={"width": 1}, allow_pickle=True), m)


def test_wrong_architecture_names_the_first_mismatch(saved):
    _, path = saved
    with pytest.raises(ArchitectureMismatchError, match="a.safetensors does not fit ResNet20.*"
                       "another shape.*stem.0.weight"):
        load_model(path, model=get_model("resnet20", width=2))
    with pytest.raises(ArchitectureMismatchError, match="missing from the file.*unexpected"):
        load_model(path, arch="mlp")


@pytest.mark.parametrize("value", [float("nan"), float("inf")])
def test_nonfinite_weights_refused_on_every_load(tmp_path, value):
    bad = get_model("resnet20", width=1, num_classes=10, seed=0)
    with torch.no_grad():
        bad.layer2[0].conv1.weight[0, 0, 0, 0] = value
    path = tmp_path / "bad.safetensors"
    with pytest.warns(RuntimeWarning, match="NaN/infinite"):
        save_model(bad, path)
    what = "NaN" if math.isnan(value) else "infinite"
    for load in (load_model, load_state_dict, lambda p: dict(LazyStateDict(p))):
        with pytest.raises(CheckpointError, match=f"'layer2.0.conv1.weight'.*{what}"):
            load(path)
    assert not torch.isfinite(load_model(path, check_finite=False)
                              .layer2[0].conv1.weight).all()


def test_metadata_is_strict_json_nan_as_null(saved, tmp_path):
    m, _ = saved
    p = save_model(m, tmp_path / "x.safetensors",
                   metadata={"history": [0.5, float("nan")], "best": float("inf")})
    with safe_open(str(p), "pt") as f:
        raw = f.metadata()["neuralign"]
    assert "NaN" not in raw and "Infinity" not in raw
    info = read_info(p)
    assert info["history"] == [0.5, None] and info["best"] is None


@pytest.mark.parametrize("case", ["missing", "directory", "zero", "truncated", "garbage",
                                  "header_only"])
def test_bad_files_are_one_line_errors(saved, tmp_path, case):
    _, path = saved
    target = tmp_path / "t.safetensors"
    if case == "directory":
        target = tmp_path / "folder"
        target.mkdir()
    elif case == "zero":
        target.write_bytes(b"")
    elif case == "truncated":
        target.write_bytes(path.read_bytes()[:5000])
    elif case == "garbage":
        target.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00not json at all!")
    elif case == "header_only":
        data = path.read_bytes()
        n = int.from_bytes(data[:8], "little")
        target.write_bytes(data[:8 + n])
    for fn in (load_model, load_state_dict, read_info, read_record, LazyStateDict):
        with pytest.raises(NeuralignError) as info:
            fn(target)
        assert "\n" not in str(info.value) and str(target.name) in str(info.value)


def test_save_refuses_to_overwrite_other_kinds_and_pickle_names(saved, tmp_path):
    m, _ = saved
    png = tmp_path / "plot.safetensors"
    png.write_bytes(b"\x89PNG\r\n\x1a\n" + b"\x00" * 100)
    before = png.read_bytes()
    with pytest.raises(CheckpointError, match="not a safetensors checkpoint"):
        save_model(m, png)
    assert png.read_bytes() == before
    with pytest.raises(CheckpointError, match="use a .safetensors name"):
        save_model(m, tmp_path / "m.pt")
    with pytest.raises(CheckpointError, match="directory"):
        save_model(m, tmp_path)


def test_files_are_world_readable(saved, tmp_path):
    m, _ = saved
    old = os.umask(0o022)
    try:
        p = save_model(m, tmp_path / "sub" / "m.safetensors")
        assert (p.stat().st_mode & 0o777) == 0o644
        save_model(m, p)  # replacing keeps the mode
        assert (p.stat().st_mode & 0o777) == 0o644
    finally:
        os.umask(old)


def test_inputs_are_not_modified(saved, tmp_path):
    m, path = saved
    before = {k: v.clone() for k, v in m.state_dict().items()}
    save_model(m, tmp_path / "b.safetensors")
    assert all(torch.equal(before[k], v) for k, v in m.state_dict().items())
    data = path.read_bytes()
    load_model(path)
    read_info(path)
    assert path.read_bytes() == data


def test_lazy_state_dict_reads_on_demand(saved):
    m, path = saved
    lazy = LazyStateDict(path)
    assert list(lazy) and set(lazy) == set(m.state_dict())
    assert torch.equal(lazy["classifier.bias"], m.classifier.bias)


def test_save_state_dict_keeps_a_custom_record(tmp_path):
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        p = save_state_dict({"w": torch.ones(2)}, tmp_path / "s.safetensors",
                            {"levi": {"task": "cls"}})
    assert read_record(p)["levi"] == {"task": "cls"}


def test_unwritable_target_is_a_one_line_error(saved, tmp_path):
    m, _ = saved
    (tmp_path / "file").write_text("x")
    with pytest.raises(CheckpointError, match="cannot write"):
        save_model(m, tmp_path / "file" / "m.safetensors")


def test_a_file_that_is_no_checkpoint_is_named(tmp_path):
    png = tmp_path / "plot.png"
    png.write_bytes(b"\x89PNG\r\n\x1a\n" + bytes(64))
    for fn in (load_state_dict, lambda p: load_model(p, arch="mlp", allow_pickle=True)):
        with pytest.raises(CheckpointError, match="not a checkpoint"):
            fn(png)


def test_lazy_reads_of_sharded_checkpoints(tmp_path):
    tensors = {f"layer{i}.weight": torch.full((4, 4), float(i)) for i in range(4)}
    save_file({k: tensors[k] for k in ("layer0.weight", "layer1.weight")},
              str(tmp_path / "s-1.safetensors"))
    save_file({k: tensors[k] for k in ("layer2.weight", "layer3.weight")},
              str(tmp_path / "s-2.safetensors"))
    index = tmp_path / "model.safetensors.index.json"
    index.write_text(json.dumps({"weight_map": {
        k: ("s-1.safetensors" if k in ("layer0.weight", "layer1.weight") else "s-2.safetensors")
        for k in tensors}}))
    lazy = LazyStateDict(index)
    assert set(lazy) == set(tensors) and len(lazy) == 4
    assert torch.equal(lazy["layer3.weight"], tensors["layer3.weight"])
    assert all(torch.equal(v, tensors[k]) for k, v in load_state_dict(index).items())
    (tmp_path / "s-2.safetensors").write_bytes(b"")
    with pytest.raises(CheckpointError, match="s-2.safetensors: empty file"):
        LazyStateDict(index)


def test_read_info_reads_no_tensor(saved, monkeypatch):
    _, path = saved
    import safetensors
    import safetensors.torch

    def boom(*a, **k):
        raise AssertionError("read_info must not read tensors")

    monkeypatch.setattr(safetensors.torch, "load_file", boom)
    monkeypatch.setattr(safetensors, "safe_open", boom)
    assert read_info(path)["arch"] == "resnet20"
