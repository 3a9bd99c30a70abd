"""Data from anywhere (``neuralign.data.sources``) and ``federate`` output, through the CLI."""

from __future__ import annotations

import json
import sys

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from neuralign.cli import app
from neuralign.data import load_data
from neuralign.errors import DataError
from neuralign.io import read_info

runner = CliRunner()


def _ok(*args):
    r = runner.invoke(app, [str(a) for a in args])
    assert r.exit_code == 0, (args, r.stderr[-1500:])
    return r


def _strict(text):
    def bad(c):
        raise AssertionError(f"invalid JSON constant {c}")

    return json.loads(text, parse_constant=bad)


def _images(root, mode, n=6, size=(20, 24)):
    from PIL import Image

    rng = np.random.default_rng(0)
    ch = {"L": 1, "RGB": 3, "RGBA": 4}[mode]
    for c in range(2):
        (root / f"c{c}").mkdir(parents=True)
        for i in range(n):
            a = (rng.random((*size, ch)) * 100 + 100 * c).astype(np.uint8)
            Image.fromarray(a[..., 0] if ch == 1 else a, mode).save(root / f"c{c}" / f"{i}.png")


@pytest.mark.parametrize("mode,channels", [("L", 1), ("RGB", 3), ("RGBA", 4)])
def test_imagefolder_channels(tmp_path, mode, channels):
    _images(tmp_path / "d", mode)
    s = load_data(f"imagefolder:{tmp_path / 'd'}", image_size=12)
    assert s.input_shape == (channels, 12, 12)
    assert s.train[0][0].shape == (channels, 12, 12)


def test_domainbed_layout_needs_and_uses_test_domain(tmp_path):
    for d in ("art", "photo", "sketch"):
        _images(tmp_path / "pacs" / d, "RGB", n=4)
    name = f"imagefolder:{tmp_path / 'pacs'}"
    with pytest.raises(DataError, match="test domain"):
        load_data(name, image_size=8)
    s = load_data(name, image_size=8, test_domain="sketch")
    assert len(s.test) == 8 and len(s.train) + len(s.val) == 16
    assert all("sketch" in str(f) for f in s.test.files)
    assert not any("sketch" in str(f) for f in s.train.files)
    # through the CLI: train on two domains, evaluate on the held-out one
    out = tmp_path / "m.safetensors"
    _ok("train", "--model", "cnn", "--data", name, "--test-domain", "sketch", "--image-size", "8",
        "--epochs", "1", "--out", out)
    doc = _strict(_ok("eval", out, "--data", name, "--test-domain", "sketch", "--image-size",
                      "8", "--json").stdout)
    assert doc["n"] == 8


def test_npz_with_own_test_split(tmp_path):
    rng = np.random.default_rng(0)
    np.savez(tmp_path / "d.npz", x=rng.integers(0, 255, (40, 3, 6, 6), dtype=np.uint8),
             y=np.arange(40) % 4, x_test=rng.random((12, 3, 6, 6)).astype(np.float32),
             y_test=np.arange(12) % 4)
    s = load_data(f"npz:{tmp_path / 'd.npz'}", data_seed=3)
    assert len(s.test) == 12 and len(s.train) + len(s.val) == 40 and s.num_classes == 4
    assert float(s.train.tensors[0].max()) <= 1.0  # uint8 scaled to [0, 1]
    np.savez(tmp_path / "half.npz", x=np.zeros((10, 2)), y=np.arange(10) % 2,
             x_test=np.zeros((4, 2)))
    with pytest.raises(DataError, match="come together"):
        load_data(f"npz:{tmp_path / 'half.npz'}")
    np.savez(tmp_path / "bad.npz", x=np.full((10, 2), np.nan), y=np.arange(10) % 2)
    with pytest.raises(DataError, match="NaN"):
        load_data(f"npz:{tmp_path / 'bad.npz'}")
    r = runner.invoke(app, ["train", "--data", f"npz:{tmp_path / 'bad.npz'}", "--out",
                            str(tmp_path / "x.safetensors")])
    assert r.exit_code == 2 and "NaN" in r.stderr


def test_hf_disk_text_and_image(tmp_path):
    datasets = pytest.importorskip("datasets")
    from PIL import Image

    ds = datasets.Dataset.from_dict({"text": ["good", "bad", "fine", "awful"] * 5,
                                     "label": [1, 0, 1, 0] * 5})
    ds.save_to_disk(str(tmp_path / "text"))

    class Tok:  # the part of a Hugging Face tokenizer the source uses
        def __call__(self, texts, **kw):
            ids = [[len(t), 3, 0, 0] for t in texts]
            return {"input_ids": torch.tensor(ids)}

    s = load_data(f"hf-disk:{tmp_path / 'text'}", tokenizer=Tok())
    assert s.train.tensors[0].dtype == torch.int64 and s.num_classes == 2
    with pytest.raises(DataError, match="tokenizer"):
        load_data(f"hf-disk:{tmp_path / 'text'}")
    imgs = [Image.fromarray(np.full((10, 10, 3), 40 * i, np.uint8)) for i in range(6)] * 2
    dd = datasets.DatasetDict({
        "train": datasets.Dataset.from_dict({"image": imgs, "label": [0, 1] * 6}),
        "test": datasets.Dataset.from_dict({"image": imgs[:4], "label": [0, 1] * 2})})
    dd.save_to_disk(str(tmp_path / "img"))
    s = load_data(f"hf-disk:{tmp_path / 'img'}", image_size=8)
    assert s.input_shape == (3, 8, 8) and len(s.test) == 4


def make_splits(data_seed=0):
    """A ``module:function`` data hook (used by the test below)."""
    g = torch.Generator().manual_seed(data_seed)
    x, y = torch.randn(60, 1, 8, 8, generator=g), torch.arange(60) % 3
    from torch.utils.data import TensorDataset

    return TensorDataset(x[:40], y[:40]), TensorDataset(x[40:50], y[40:50]), \
        TensorDataset(x[50:], y[50:])


def test_module_function_hook(tmp_path, monkeypatch):
    monkeypatch.syspath_prepend(str(tmp_path))
    (tmp_path / "my_data.py").write_text(
        "import sys\nsys.path.insert(0, %r)\nfrom test_cli_sources import make_splits\n"
        % str(__import__("pathlib").Path(__file__).parent))
    s = load_data("my_data:make_splits", data_seed=1)
    assert len(s.train) == 40 and s.num_classes == 3 and s.input_shape == (1, 8, 8)
    out = tmp_path / "m.safetensors"
    _ok("train", "--data", "my_data:make_splits", "-m", "width=8", "--epochs", "1",
        "--out", out)
    assert read_info(out)["data"] == "my_data:make_splits"
    r = runner.invoke(app, ["eval", str(out), "--data", "my_data:nothing"])
    assert r.exit_code == 2 and "no function" in r.stderr
    sys.modules.pop("my_data", None)


@pytest.mark.parametrize("strategy", ["fedavg", "fedma"])
def test_federate_prints_rounds_and_writes_valid_json(tmp_path, strategy):
    pytest.importorskip("flwr")
    out = tmp_path / "h.json"
    r = _ok("federate", "--data", "digits", "--strategy", strategy, "--rounds", "2",
            "--clients", "2", "--model", "mlp", "-m", "width=16", "--out", out, "--json")
    assert "round 0/2" in r.stderr and "round 2/2" in r.stderr
    doc = _strict(r.stdout)
    hist = _strict(out.read_text())
    # FedMA measures the global model only when a pass completes (here after round 2: the MLP's
    # remaining layers are matched one-shot in the last round); its mid-pass round is listed
    # in what it did (participants, widths), never given an accuracy it did not measure
    assert doc["round"] == hist["round"] == ([0, 2] if strategy == "fedma" else [0, 1, 2])
    assert None not in hist["accuracy"] and len(hist["accuracy"]) == len(hist["round"])
    if strategy == "fedma":
        assert set(hist["participants"]) == {"1", "2"} and "1" in hist["widths"]
    r = runner.invoke(app, ["federate", "--data", "digits", "--rounds", "1", "--out", str(out)])
    assert r.exit_code == 2 and "--force" in r.stderr
