"""``neuralign align`` end to end on tiny checkpoints."""

import torch
from typer.testing import CliRunner

from neuralign.cli import app
from neuralign.io import load_model, save_model
from neuralign.models import get_model
from neuralign.permute import apply_permutation, random_permutation
from neuralign.spec import spec_from_model


def _ckpts(tmp_path):
    torch.manual_seed(0)
    a = get_model("mlp", num_classes=10, in_channels=1, image_size=8, width=32)
    spec = spec_from_model(a, torch.zeros(2, 1, 8, 8))
    b = apply_permutation(a, random_permutation(spec, 1), spec)
    save_model(a, str(tmp_path / "a.safetensors"))
    save_model(b, str(tmp_path / "b.safetensors"))
    return a


def test_cli_align_weight_and_activation(tmp_path):
    a = _ckpts(tmp_path)
    runner = CliRunner()
    for method, extra in (("weight", []), ("activation", ["--data", "digits", "--batches", "2"])):
        out = tmp_path / f"{method}.safetensors"
        res = runner.invoke(app, ["align", str(tmp_path / "a.safetensors"),
                                  str(tmp_path / "b.safetensors"), "--out", str(out),
                                  "--method", method, *extra])
        assert res.exit_code == 0, res.output
        assert "moved" in res.output and "objective" in res.output
        assert "coverage: 100.0% of" in res.output  # what the spec lets move is printed
        c = load_model(str(out))
        for k, v in a.state_dict().items():
            assert torch.allclose(v, c.state_dict()[k], atol=1e-6), k


def test_cli_align_refuses_to_overwrite_and_mismatch(tmp_path):
    _ckpts(tmp_path)
    other = get_model("mlp", num_classes=10, in_channels=1, image_size=8, width=16)
    save_model(other, str(tmp_path / "o.safetensors"))
    runner = CliRunner()
    res = runner.invoke(app, ["align", str(tmp_path / "a.safetensors"),
                              str(tmp_path / "b.safetensors"), "--out",
                              str(tmp_path / "b.safetensors")])
    assert res.exit_code != 0
    res = runner.invoke(app, ["align", str(tmp_path / "a.safetensors"),
                              str(tmp_path / "o.safetensors"), "--out",
                              str(tmp_path / "x.safetensors")])
    assert res.exit_code != 0
    assert not (tmp_path / "x.safetensors").exists()
