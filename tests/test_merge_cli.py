"""CLI tests for merge / barrier / cka / surface / connect (tiny random MLPs on digits)."""

from __future__ import annotations

import torch
from typer.testing import CliRunner

from neuralign.cli import app
from neuralign.io import load_model, save_model
from neuralign.models import get_model

runner = CliRunner()


def _ckpts(tmp_path, n=2):
    paths = []
    for s in range(n):
        torch.manual_seed(s)
        m = get_model("mlp", width=16, depth=2, num_classes=10, in_features=64)
        p = tmp_path / f"m{s}.safetensors"
        save_model(m, p)
        paths.append(str(p))
    return paths


def test_merge_cli_align_repair_and_errors(tmp_path):
    a, b = _ckpts(tmp_path)
    out = tmp_path / "merged.safetensors"
    r = runner.invoke(app, ["merge", a, b, "--out", str(out), "--align", "weight", "--repair", "--data", "digits"])
    assert r.exit_code == 0, r.output
    merged = load_model(out)
    assert merged(torch.randn(3, 1, 8, 8)).shape == (3, 10)
    assert "merged (average + REPAIR)" in r.output
    r = runner.invoke(app, ["merge", a, b, "--out", a])
    assert r.exit_code == 2 and "is an input" in r.stderr
    r = runner.invoke(app, ["merge", a, b, "--out", str(tmp_path / "n.safetensors"),
                            "--method", "nope"])
    assert r.exit_code == 2 and "--method 'nope' is not one of" in r.stderr


def test_barrier_cka_surface_connect_cli(tmp_path):
    a, b = _ckpts(tmp_path)
    png = tmp_path / "curve.png"
    r = runner.invoke(app, ["barrier", a, b, "--data", "digits", "--points", "3", "--plot", str(png)])
    assert r.exit_code == 0, r.output
    assert png.exists() and "loss (entezari)" in r.output
    r = runner.invoke(app, ["cka", a, b, "--data", "digits", "--examples", "64", "--plot", str(tmp_path / "cka.png")])
    assert r.exit_code == 0, r.output
    assert (tmp_path / "cka.png").exists()
    r = runner.invoke(app, ["surface", a, "--data", "digits", "--steps", "2", "--dims", "1", "--plot", str(tmp_path / "s.png")])
    assert r.exit_code == 0, r.output
    r = runner.invoke(app, ["connect", a, b, "--data", "digits", "--curve", "polychain", "--epochs", "1", "--points", "3"])
    assert r.exit_code == 0, r.output
    assert "polychain" in r.output
