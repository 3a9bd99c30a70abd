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
    from neuralign.io import read_info

    info = read_info(out)
    assert info["model_kwargs"]["width"] == 32 and info["seed"] == 0
    assert info["data"] == "digits" and info["data_seed"] == 0
    assert info["input_shape"] == [1, 8, 8] and info["num_classes"] == 10
    assert not (tmp_path / "a.safetensors.json").exists()  # one file per checkpoint
    res = runner.invoke(app, ["eval", str(out), "--json"])  # data from the checkpoint
    assert res.exit_code == 0, res.output
    ev = json.loads(res.stdout)
    assert ev["data"] == "digits" and ev["split"] == "test" and 0 <= ev["accuracy"] <= 1


def test_cli_errors_are_one_line(tmp_path):
    import subprocess
    import sys

    from neuralign.cli._common import run_app

    assert run_app  # the entry point wraps NeuralignError
    proc = subprocess.run([sys.executable, "-m", "neuralign", "eval", str(tmp_path / "x.pt")],
                          capture_output=True, text=True, check=False)
    assert proc.returncode == 2
    assert "no such checkpoint" in proc.stderr and "Traceback" not in proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1
