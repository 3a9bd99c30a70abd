"""The command line takes data and split from the checkpoint: two models trained with different
seeds share one test split, commands default --data to what the checkpoint records, and
evaluating a model on data it was trained on is flagged."""

from __future__ import annotations

import json

import pytest
import torch
from typer.testing import CliRunner

from neuralign.cli import _data, _flow, app
from neuralign.cli._models import ModelArgs
from neuralign.io import read_info

runner = CliRunner()


def _train(tmp_path, name, *extra):
    out = tmp_path / name
    r = runner.invoke(app, ["train", "-m", "width=8", "--epochs", "1", "--out", str(out),
                            *extra])
    assert r.exit_code == 0, r.stderr
    return out


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    d = tmp_path_factory.mktemp("split")
    return _train(d, "a.safetensors", "--seed", "0"), _train(d, "b.safetensors", "--seed", "1")


def test_different_seeds_share_one_test_split(pair):
    a, b = pair
    ia, ib = read_info(a), read_info(b)
    assert (ia["seed"], ib["seed"]) == (0, 1)
    assert ia["data"] == ib["data"] == "digits" and ia["data_seed"] == ib["data_seed"] == 0
    assert ia["input_shape"] == [1, 8, 8] and ia["num_classes"] == 10
    assert ia["command"] == "train"
    tests = []
    for path in (a, b):
        inp = _flow.open_inputs([str(path)], ModelArgs(), _data.DataArgs())
        tests.append(inp.splits.test.tensors)
        train_x = inp.splits.train.tensors[0]
    xa, ya = tests[0]
    xb, yb = tests[1]
    assert torch.equal(xa, xb) and torch.equal(ya, yb)
    # and no test image of either model is in the training split they share
    train_rows = {tuple(r.tolist()) for r in train_x.flatten(1)}
    assert not any(tuple(r.tolist()) in train_rows for r in xa.flatten(1)[:50])
    # the command line reports the same split for both
    ra = json.loads(runner.invoke(app, ["eval", str(a), "--json"]).stdout)
    rb = json.loads(runner.invoke(app, ["eval", str(b), "--json"]).stdout)
    assert ra["data_seed"] == rb["data_seed"] == 0 and ra["n"] == rb["n"] == len(ya)


def test_eval_on_training_data_and_other_split_warn(pair):
    a, _ = pair
    r = runner.invoke(app, ["eval", str(a), "--split", "train"])
    assert r.exit_code == 0 and "warning:" in r.stderr and "train split" in r.stderr
    r = runner.invoke(app, ["eval", str(a), "--data-seed", "3"])
    assert r.exit_code == 0 and "data seed 3" in r.stderr
    r = runner.invoke(app, ["eval", str(a)])
    assert r.exit_code == 0 and r.stderr == ""


def test_commands_default_to_the_recorded_data(tmp_path):
    import numpy as np

    rng = np.random.default_rng(0)
    y = np.repeat(np.arange(3), 50)
    x = (rng.normal(size=(150, 1, 40)) + y[:, None, None]).astype(np.float32)
    np.savez(tmp_path / "d.npz", x=x, y=y)
    data = f"npz:{tmp_path / 'd.npz'}"
    a = _train(tmp_path, "a.safetensors", "--data", data, "--seed", "0")
    b = _train(tmp_path, "b.safetensors", "--data", data, "--seed", "1")
    r = runner.invoke(app, ["eval", str(a), "--json"])
    assert r.exit_code == 0, r.stderr
    assert json.loads(r.stdout)["data"] == data
    r = runner.invoke(app, ["barrier", str(a), str(b), "--points", "3", "--json"])
    assert r.exit_code == 0, r.stderr
    assert json.loads(r.stdout)["data"] == data
    out = tmp_path / "m.safetensors"
    r = runner.invoke(app, ["merge", str(a), str(b), "--out", str(out), "--json"])
    assert r.exit_code == 0, r.stderr
    info = read_info(out)
    assert info["data"] == data and info["command"] == "merge"
    assert info["input_shape"] == [1, 40] and info["num_classes"] == 3
    # align without data traces the recorded input shape
    r = runner.invoke(app, ["align", str(a), str(b), "--out", str(tmp_path / "al.safetensors"),
                            "--json"])
    assert r.exit_code == 0, r.stderr
    # given data that does not fit the model: one line, before any work
    r = runner.invoke(app, ["eval", str(a), "--data", "digits"])
    assert r.exit_code == 2 and "does not accept inputs" in r.stderr


def test_checkpoint_without_data_needs_data(tmp_path):
    from neuralign.io import save_model
    from neuralign.models import get_model

    p = tmp_path / "x.safetensors"
    save_model(get_model("mlp", width=8, in_features=64, num_classes=10), p)
    r = runner.invoke(app, ["eval", str(p)])
    assert r.exit_code == 2 and "--data is needed" in r.stderr
    assert runner.invoke(app, ["eval", str(p), "--data", "digits"]).exit_code == 0


def test_recorded_data_path_works_from_another_folder(tmp_path, monkeypatch):
    import numpy as np

    (tmp_path / "data").mkdir()
    (tmp_path / "elsewhere").mkdir()
    y = np.arange(60) % 3
    np.savez(tmp_path / "data" / "d.npz", x=np.random.default_rng(0).normal(
        size=(60, 5)).astype(np.float32) + y[:, None], y=y)
    monkeypatch.chdir(tmp_path / "data")
    r = runner.invoke(app, ["train", "--data", "npz:d.npz", "-m", "width=8", "--epochs", "1",
                            "--out", "m.safetensors"])
    assert r.exit_code == 0, r.stderr
    assert read_info(tmp_path / "data" / "m.safetensors")["data"] == \
        f"npz:{tmp_path / 'data' / 'd.npz'}"
    monkeypatch.chdir(tmp_path / "elsewhere")
    r = runner.invoke(app, ["eval", "../data/m.safetensors", "--json"])
    assert r.exit_code == 0, r.stderr
