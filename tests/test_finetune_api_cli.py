"""The ``neuralign finetune`` command reaches every registered strategy and its options."""

from __future__ import annotations

import torch
from typer.testing import CliRunner

from neuralign.cli import app
from neuralign.finetune import list_strategies
from neuralign.io import load_model, save_model
from neuralign.models import get_model


def test_list_strategies_shows_every_registered_one():
    r = CliRunner().invoke(app, ["finetune", "--list-strategies"], terminal_width=200)
    assert r.exit_code == 0, r.output
    for name in list_strategies():
        assert name in r.output


def test_sherpa_from_the_command_line_with_a_soup_and_options(tmp_path):
    paths = []
    for seed in (0, 1, 2):
        torch.manual_seed(seed)
        p = tmp_path / f"m{seed}.safetensors"
        save_model(get_model("cnn", num_classes=10, in_channels=1, image_size=8, width=4), p)
        paths.append(str(p))
    out = tmp_path / "ft.safetensors"
    args = [
        "finetune",
        paths[0],
        "--strategy",
        "sherpa",
        "--anchor",
        paths[1],
        "--anchor",
        paths[2],
        "--data",
        "digits",
        "--epochs",
        "1",
        "--lr",
        "0.05",
        "-o",
        "head=anchor",
        "-o",
        "align_batches=2",
        "--out",
        str(out),
    ]
    r = CliRunner().invoke(app, args, terminal_width=200)
    assert r.exit_code == 0, r.output
    assert "accuracy" in r.output and "head" in r.output
    model = load_model(out)
    assert model.classifier.out_features == 10


def test_bad_option_is_a_one_line_error():
    r = CliRunner().invoke(
        app,
        ["finetune", "cnn", "--data", "digits", "-s", "wise_ft", "-o", "bogus=1", "--epochs", "1"],
    )
    assert r.exit_code != 0
    assert r.exit_code == 2 and "bogus" in r.stderr
