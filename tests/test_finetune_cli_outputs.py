"""What ``neuralign finetune`` writes: per-layer weights (JSON + plot) and LEVI checkpoints."""

from __future__ import annotations

import json

import torch
from typer.testing import CliRunner

from neuralign.cli import app
from neuralign.io import save_model
from neuralign.models import get_model


def _base(tmp_path):
    torch.manual_seed(0)
    p = tmp_path / "base.safetensors"
    save_model(get_model("cnn", num_classes=10, in_channels=1, image_size=8, width=4), p)
    return str(p)


def test_weights_out_writes_the_chosen_layer_weights(tmp_path):
    base = _base(tmp_path)
    w = tmp_path / "w.json"
    r = CliRunner().invoke(app, ["finetune", base, "-s", "auto_rgn", "--epochs", "1",
                                 "--weights-out", str(w)])
    assert r.exit_code == 0, r.output
    weights = json.loads(w.read_text())["auto_rgn"]
    assert max(weights.values()) == 1.0 and min(weights.values()) >= 0
    assert (tmp_path / "w.png").stat().st_size > 0
    assert (w.stat().st_mode & 0o777) == 0o666 & ~_umask()
    r = CliRunner().invoke(app, ["finetune", base, "-s", "full", "--epochs", "1",
                                 "--weights-out", str(tmp_path / "x.json")])
    assert r.exit_code == 2 and "chooses no per-layer weights" in r.stderr
    assert not (tmp_path / "x.json").exists()


def test_levi_checkpoint_keeps_only_trained_parts_and_reloads(tmp_path):
    from neuralign.finetune.levi import LEVI
    from neuralign.finetune.levi_io import load_levi

    base = _base(tmp_path)
    out = tmp_path / "levi.safetensors"
    r = CliRunner().invoke(app, ["finetune", base, "-s", "levi", "-o", "small=cnn4",
                                 "--epochs", "1", "--out", str(out)])
    assert r.exit_code == 0, r.output
    from neuralign.io import read_sidecar  # the record (header, or a legacy sidecar)

    assert read_sidecar(out)["large"] == {"path": base}
    model = load_levi(out)
    assert isinstance(model, LEVI)
    assert model(torch.randn(2, 1, 8, 8)).shape == (2, 10)


def _umask():
    import os

    m = os.umask(0)
    os.umask(m)
    return m
