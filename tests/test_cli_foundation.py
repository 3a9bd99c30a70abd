import json

from typer.testing import CliRunner

from neuralign.cli import app

runner = CliRunner()


def test_help_lists_commands():
    res = runner.invoke(app, ["--help"])
    assert res.exit_code == 0 and "train" in res.output and "demo" in res.output


def test_train_then_eval(tmp_path):
    out = tmp_path / "a.safetensors"
    res = runner.invoke(app, ["train", "--model", "mlp", "--data", "digits", "--seed", "0",
                              "--epochs", "2", "--out", str(out), "-m", "width=32"])
    assert res.exit_code == 0, res.output
    meta = json.loads((tmp_path / "a.safetensors.json").read_text())
    assert meta["model"]["kwargs"]["width"] == 32 and meta["metadata"]["seed"] == 0
    res = runner.invoke(app, ["eval", str(out), "--data", "digits"])
    assert res.exit_code == 0 and "accuracy" in res.output


def test_cli_errors_are_one_line(tmp_path):
    from neuralign.cli._common import run_app
    import subprocess
    import sys

    assert run_app  # the entry point wraps NeuralignError
    proc = subprocess.run([sys.executable, "-m", "neuralign", "eval", str(tmp_path / "x.pt")],
                          capture_output=True, text=True)
    assert proc.returncode == 2
    assert "no such checkpoint" in proc.stderr and "Traceback" not in proc.stderr
