"""Fuzz suite of the command line: every command × bad inputs, bad outputs and out-of-range
options ends in exit status 2 with ONE line on stderr (no traceback), writes nothing, and leaves
every input byte-for-byte unchanged; the cases that make sense succeed."""

from __future__ import annotations

import hashlib
import json
import os
import warnings
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from neuralign.cli import app
from neuralign.io import read_info, save_model
from neuralign.models import get_model

runner = CliRunner()
MLP_KW = {"width": 16, "depth": 2, "num_classes": 10, "in_features": 64}
META = {"data": "digits", "data_seed": 0, "seed": 0}


def _mlp(seed, **kw):
    torch.manual_seed(seed)
    return get_model("mlp", **{**MLP_KW, **kw})


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    d = tmp_path_factory.mktemp("fuzz")
    from safetensors.torch import save_file

    save_model(_mlp(0), d / "good.safetensors", metadata=META)
    save_model(_mlp(1), d / "good2.safetensors", metadata={**META, "seed": 1})
    save_model(_mlp(2, width=8), d / "other.safetensors", metadata=META)
    raw = (d / "good.safetensors").read_bytes()
    (d / "truncated.safetensors").write_bytes(raw[: len(raw) // 2])
    (d / "zero.safetensors").write_bytes(b"")
    (d / "garbage.safetensors").write_bytes(b"not a checkpoint at all" * 10)
    sd = _mlp(3).state_dict()
    torch.save(sd, d / "pickle.pt")
    save_file({k: v.contiguous() for k, v in sd.items()}, str(d / "plain.safetensors"))
    for name, val in (("nan", float("nan")), ("inf", float("inf"))):
        m = _mlp(4)
        with torch.no_grad():
            next(iter(m.parameters()))[0, 0] = val
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            save_model(m, d / f"{name}.safetensors", metadata=META)
    (d / "folder").mkdir()
    (d / "plot.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"0" * 32)
    (d / "hist.json").write_text("{}")
    return d


def _hashes(folder: Path) -> dict:
    return {str(p): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


def _fails(args, folder: Path, *, contains: str | None = None):
    """Run ``args``: exit 2, one line on stderr, no traceback, ``folder`` unchanged."""
    before = _hashes(folder)
    r = runner.invoke(app, [str(a) for a in args])
    lines = [ln for ln in r.stderr.splitlines() if ln.strip()]
    assert r.exit_code == 2, (args, r.exit_code, r.stdout, r.stderr)
    assert len(lines) == 1 and lines[0].startswith("error: "), (args, r.stderr)
    assert "Traceback" not in r.output
    if contains:
        assert contains in lines[0], (contains, lines[0])
    assert _hashes(folder) == before, f"{args} changed a file"
    return lines[0]


def _ok(args):
    r = runner.invoke(app, [str(a) for a in args])
    assert r.exit_code == 0, (args, r.stdout, r.stderr)
    return r


# Each command with a model input X (and, for two-model commands, the good model as A).
def _command(name, x, out_dir):
    return {
        "eval": ["eval", x],
        "align": ["align", "GOOD", x, "--out", out_dir / "o.safetensors"],
        "merge": ["merge", "GOOD", x, "--out", out_dir / "o.safetensors"],
        "barrier": ["barrier", "GOOD", x, "--points", "3"],
        "cka": ["cka", "GOOD", x, "--examples", "16"],
        "surface": ["surface", x, "--steps", "2", "--dims", "1"],
        "connect": ["connect", "GOOD", x, "--epochs", "1", "--points", "3"],
        "finetune": ["finetune", x, "--epochs", "1", "--out", out_dir / "o.safetensors"],
        "merge-ties": ["merge", "--method", "ties", "--base", "GOOD", "GOOD", x, "--out",
                       out_dir / "o.safetensors"],
        "stitch": ["stitch", "GOOD", x, "--train-batches", "1", "--kind", "affine"],
    }[name]


COMMANDS = ["eval", "align", "merge", "barrier", "cka", "surface", "connect", "finetune",
            "merge-ties", "stitch"]
TWO_MODEL = ["align", "merge", "barrier", "cka", "connect", "merge-ties", "stitch"]
BAD_INPUTS = {
    "truncated": ("truncated.safetensors", "truncated"),
    "zero-byte": ("zero.safetensors", "empty"),
    "garbage": ("garbage.safetensors", "safetensors"),
    "pickle": ("pickle.pt", "--allow-pickle"),
    "no-record": ("plain.safetensors", "--arch"),
    "nan": ("nan.safetensors", None),
    "inf": ("inf.safetensors", None),
    "missing": ("missing.safetensors", "no such checkpoint"),
    "directory": ("folder", "folder"),
}


def _resolve(args, d):
    return [d / "good.safetensors" if a == "GOOD" else a for a in args]


@pytest.mark.parametrize("kind", list(BAD_INPUTS))
@pytest.mark.parametrize("command", COMMANDS)
def test_bad_model_input(files, tmp_path, command, kind):
    name, hint = BAD_INPUTS[kind]
    args = _resolve(_command(command, files / name, tmp_path), files)
    line = _fails(args, files, contains=hint)
    if kind in ("nan", "inf"):
        assert "nan" in line.lower() or "inf" in line.lower() or "finite" in line.lower()
    assert not any(tmp_path.iterdir()), "an output was written"


@pytest.mark.parametrize("command", TWO_MODEL)
def test_other_architecture(files, tmp_path, command):
    args = _resolve(_command(command, files / "other.safetensors", tmp_path), files)
    if command in ("cka", "stitch"):  # any two models' representations compare / stitch
        _ok(args)
        return
    _fails(args, files)
    assert not any(tmp_path.iterdir())


@pytest.mark.parametrize("command", [c for c in COMMANDS if c != "finetune"])
def test_unknown_data(files, tmp_path, command):
    args = _resolve(_command(command, files / "good2.safetensors", tmp_path), files)
    _fails([*args, "--data", "bogus"], files, contains="unknown data")
    _fails([*args, "--data", f"npz:{tmp_path / 'none.npz'}"], files, contains="does not exist")


def test_data_that_is_not_data(files, tmp_path):
    g = files / "good.safetensors"
    _fails(["eval", g, "--data", f"npz:{g}"], files, contains="npz")
    _fails(["eval", g, "--data", f"imagefolder:{g}"], files, contains="not a folder")
    _fails(["eval", g, "--data", f"imagefolder:{files / 'folder'}"], files, contains="class")
    _fails(["federate", "--data", "bogus"], files, contains="unknown data")
    _fails(["federate", "--data", f"npz:{g}"], files, contains="built-in")


def test_unknown_data_train_finetune(files, tmp_path):
    _fails(["train", "--data", "bogus", "--out", tmp_path / "t.safetensors"], files,
           contains="unknown data")
    _fails(["finetune", files / "good.safetensors", "--data", "imagefolder:" + str(tmp_path /
           "nope"), "--out", tmp_path / "t.safetensors"], files, contains="does not exist")


# ------------------------------------------------------------------ outputs


def _outputs_of(command, files, target):
    """The command with its output option pointing at ``target``."""
    g, g2 = files / "good.safetensors", files / "good2.safetensors"
    return {
        "train": ["train", "--epochs", "1", "-m", "width=8", "--out", target],
        "align": ["align", g, g2, "--out", target],
        "merge": ["merge", g, g2, "--out", target],
        "finetune": ["finetune", g, "--epochs", "1", "--out", target],
        "barrier": ["barrier", g, g2, "--points", "3", "--plot", target],
        "cka": ["cka", g, g2, "--examples", "16", "--plot", target],
        "surface": ["surface", g, "--steps", "2", "--dims", "1", "--plot", target],
        "connect": ["connect", g, g2, "--epochs", "1", "--points", "3", "--plot", target],
        "federate": ["federate", "--data", "digits", "--rounds", "1", "--clients", "2",
                     "--out", target],
        "merge-ties": ["merge", "--method", "ties", "--base", g, g, g2, "--out", target],
        "stitch": ["stitch", g, g2, "--train-batches", "1", "--kind", "affine", "--plot",
                   target],
    }[command]


OUT_COMMANDS = ["train", "align", "merge", "merge-ties", "stitch", "finetune", "barrier", "cka",
                "surface", "connect",
                "federate"]
SUFFIX = {"stitch": ".png", "barrier": ".png", "cka": ".png", "surface": ".png", "connect": ".png",
          "federate": ".json"}


@pytest.mark.parametrize("command", OUT_COMMANDS)
def test_output_is_an_input_or_another_kind(files, command):
    # (train has no input checkpoint: good.safetensors is not its output, so --force refuses)
    # output = input checkpoint: never written over, --force or not
    for force in ([], ["--force"]):
        _fails([*_outputs_of(command, files, files / "good.safetensors"), *force], files)
    # an existing file of another kind is never replaced
    other = files / ("plot.png" if SUFFIX.get(command) != ".png" else "hist.json")
    _fails([*_outputs_of(command, files, other), "--force"], files)
    # a folder as output
    _fails(_outputs_of(command, files, files / "folder"), files, contains="folder")


@pytest.mark.parametrize("command", OUT_COMMANDS)
def test_output_folder_missing_or_read_only(files, tmp_path, command):
    suffix = SUFFIX.get(command, ".safetensors")
    _fails(_outputs_of(command, files, tmp_path / "no" / f"x{suffix}"), files,
           contains="does not exist")
    if os.geteuid() == 0:  # root writes into read-only folders: use a file system that refuses
        ro = Path("/sys")
    else:
        ro = tmp_path / "ro"
        ro.mkdir()
        ro.chmod(0o555)
    _fails(_outputs_of(command, files, ro / f"x{suffix}"), files, contains="cannot write")


@pytest.mark.parametrize("command", ["barrier", "cka", "surface", "stitch"])
def test_plot_never_replaces_a_checkpoint(files, tmp_path, command):
    ck = tmp_path / "x.safetensors"
    ck.write_bytes((files / "good.safetensors").read_bytes())
    before = ck.read_bytes()
    _fails(_outputs_of(command, files, ck), files, contains=".png")
    _fails([*_outputs_of(command, files, ck), "--force"], files)
    assert ck.read_bytes() == before


def test_existing_output_needs_force_and_same_kind(files, tmp_path):
    out = tmp_path / "m.safetensors"
    args = ["merge", files / "good.safetensors", files / "good2.safetensors", "--out", out]
    _ok(args)
    assert (out.stat().st_mode & 0o777) == 0o666 & ~_umask()
    first = out.read_bytes()
    _fails(args, files, contains="--force")
    assert out.read_bytes() == first
    _ok([*args, "--force", "--coeffs", "0.3,0.7"])
    assert out.read_bytes() != first
    assert read_info(out)["coeffs"] == [0.3, 0.7]


def _umask():
    m = os.umask(0)
    os.umask(m)
    return m


# ------------------------------------------------------------------ options


def _g(files):
    return files / "good.safetensors", files / "good2.safetensors"


OUT_OF_RANGE = [
    ("eval", ["--split", "bogus"], "--split"),
    ("eval", ["--batch-size", "0"], "--batch-size"),
    ("eval", ["--device", "gpu7"], "--device"),
    ("merge", ["--device", "cuda:99"], "--device"),
    ("train", ["--device", "cuda:99"], "--device"),
    ("demo", ["--points", "0"], "--points"),
    ("demo", ["--device", "tpu"], "--device"),
    ("align", ["--method", "bogus"], "--method"),
    ("align", ["--method", "activation", "--batches", "0"], "--batches"),
    ("align", ["--input-shape", "0,8"], "--input-shape"),
    ("align", ["--method", "annealing"], "--data"),
    ("align", ["--method", "annealing", "--data", "digits", "--steps", "0"], "--steps"),
    ("align", ["--method", "scaling", "--device", "cuda:99"], "--device"),
    ("merge", ["--method", "bogus"], "--method"),
    ("merge", ["-o", "bogus=1"], "bogus"),
    ("merge", ["--method", "ot", "-o", "bogus=1"], "bogus"),
    ("merge", ["-o", "noequals"], "key=value"),
    ("merge", ["--coeffs", "1.5,-0.5"], "--coeffs"),
    ("merge", ["--coeffs", "0.5"], "2 models"),
    ("merge", ["--coeffs", "a,b"], "--coeffs"),
    ("merge", ["--align", "bogus"], "--align"),
    ("merge", ["--method", "ot", "--align", "weight"], "--align"),
    ("merge", ["--method", "ties"], "--base"),
    ("merge", ["--density", "0.5"], "--density"),
    ("merge", ["--method", "ties", "--align", "weight", "--density", "1.5"], "--density"),
    ("merge", ["--method", "ties", "--align", "weight", "--density", "nan"], "--density"),
    ("merge", ["--method", "dare", "--align", "weight", "--combine", "bogus"], "--combine"),
    ("merge", ["--method", "dare", "--align", "weight", "--rescale", "bogus"], "--rescale"),
    ("merge", ["--method", "ties", "--align", "weight", "--elect", "bogus"], "--elect"),
    ("merge", ["--method", "slerp", "--align", "weight", "--t", "1.5"], "--t"),
    ("merge", ["--method", "ties", "--align", "weight", "--scale", "inf"], "--scale"),
    ("merge", ["--method", "ties", "--align", "activation"], "--align"),
    ("merge", ["--method", "ties", "--align", "weight", "--repair"], "--repair"),
    ("merge", ["--method", "ties", "--align", "weight", "--coeffs", "1,2,3"], "--coeffs"),
    ("merge", ["--method", "ties", "--align", "weight", "-o", "x=1"], "-o"),
    ("stitch", ["--kind", "bogus"], "--kind"),
    ("stitch", ["--kind", "rank-0"], "--kind"),
    ("stitch", ["--kind", "affine,affine"], "--kind"),
    ("stitch", ["--epochs", "-1"], "--epochs"),
    ("stitch", ["--lr", "0"], "--lr"),
    ("stitch", ["--train-batches", "0"], "--train-batches"),
    ("stitch", ["--layers", ","], "--layers"),
    ("stitch", ["--device", "cuda:99"], "--device"),
    ("barrier", ["--layers", "layer1"], "--per-layer"),
    ("barrier", ["--per-layer", "--layers", "nope"], "nope"),
    ("barrier", ["--points", "0"], "--points"),
    ("barrier", ["--points", "2"], "--points"),
    ("barrier", ["--points", "abc"], "points"),
    ("cka", ["--examples", "1"], "--examples"),
    ("cka", ["--kernel", "bogus"], "--kernel"),
    ("surface", ["--steps", "0"], "--steps"),
    ("surface", ["--dims", "3"], "--dims"),
    ("surface", ["--span", "0"], "--span"),
    ("connect", ["--curve", "bogus"], "--curve"),
    ("connect", ["--epochs", "0"], "--epochs"),
    ("connect", ["--lr", "-1"], "--lr"),
    ("train", ["--batch-size", "0"], "--batch-size"),
    ("train", ["--epochs", "0"], "--epochs"),
    ("train", ["--lr", "0"], "--lr"),
    ("train", ["--lr", "nan"], "--lr"),
    ("train", ["--optimizer", "bogus"], "--optimizer"),
    ("train", ["--model", "bogus"], "unknown model"),
    ("train", ["-m", "width"], "key=value"),
    ("finetune", ["--epochs", "0"], "--epochs"),
    ("finetune", ["-s", "bogus"], "bogus"),
    ("finetune", ["-o", "bogus=1"], "bogus"),
    ("finetune", ["--select", "bogus"], "--select"),
    ("federate", ["--rounds", "0"], "--rounds"),
    ("federate", ["--clients", "0"], "--clients"),
    ("federate", ["--alpha", "0"], "--alpha"),
    ("federate", ["--fraction", "1.5"], "--fraction"),
    ("federate", ["--strategy", "bogus"], "--strategy"),
    ("federate", ["--engine", "bogus"], "--engine"),
]


@pytest.mark.parametrize("command,extra,hint", OUT_OF_RANGE,
                         ids=[f"{c}{''.join(e)}" for c, e, _ in OUT_OF_RANGE])
def test_out_of_range_options(files, tmp_path, command, extra, hint):
    a, b = _g(files)
    base = {
        "eval": ["eval", a], "align": ["align", a, b, "--out", tmp_path / "o.safetensors"],
        "merge": ["merge", a, b, "--out", tmp_path / "o.safetensors"],
        "barrier": ["barrier", a, b], "cka": ["cka", a, b], "surface": ["surface", a],
        "connect": ["connect", a, b], "stitch": ["stitch", a, b],
        "train": ["train", "--out", tmp_path / "o.safetensors"],
        "finetune": ["finetune", a, "--out", tmp_path / "o.safetensors"],
        "federate": ["federate", "--data", "digits"],
        "demo": ["demo"],
    }[command]
    _fails([*base, *extra], files, contains=hint)
    assert not any(tmp_path.iterdir())


# ------------------------------------------------------------------ what should work


def test_plain_state_dict_with_arch(files):
    r = _ok(["eval", files / "plain.safetensors", "--arch", "mlp",
             *[x for k, v in MLP_KW.items() for x in ("-m", f"{k}={v}")], "--data", "digits",
             "--json"])
    assert json.loads(r.stdout)["n"] > 0
    # the wrong width is an error naming the mismatch, not a silent partial load
    _fails(["eval", files / "plain.safetensors", "--arch", "mlp", "-m", "width=8", "-m",
            "in_features=64", "--data", "digits"], files, contains="does not fit")


def test_pickle_with_allow_pickle(files):
    args = ["eval", files / "pickle.pt", "--arch", "mlp",
            *[x for k, v in MLP_KW.items() for x in ("-m", f"{k}={v}")], "--data", "digits"]
    _fails(args, files, contains="--allow-pickle")
    _ok([*args, "--allow-pickle"])


def _strict(text):
    def bad(c):
        raise AssertionError(f"invalid JSON constant {c}")

    return json.loads(text, parse_constant=bad)


@pytest.mark.parametrize("command", ["eval", "barrier", "cka", "surface", "merge", "align",
                                     "connect", "train", "finetune", "demo"])
def test_json_is_valid_and_only_json(files, tmp_path, command):
    a, b = _g(files)
    args = {
        "connect": ["connect", a, b, "--epochs", "1", "--points", "3", "--curve", "polychain"],
        "train": ["train", "--epochs", "1", "-m", "width=8", "--out", tmp_path / "t.safetensors"],
        "finetune": ["finetune", a, "--epochs", "1", "--subset", "100"],
        "demo": ["demo", "--epochs", "1", "--width", "16", "--points", "3"],
        "eval": ["eval", a], "barrier": ["barrier", a, b, "--points", "3"],
        "cka": ["cka", a, b, "--examples", "16"],
        "surface": ["surface", a, "--steps", "2", "--dims", "1"],
        "merge": ["merge", a, b, "--out", tmp_path / "m.safetensors"],
        "align": ["align", a, b, "--out", tmp_path / "m.safetensors"],
    }[command]
    r = _ok([*args, "--json"])
    doc = _strict(r.stdout)
    assert isinstance(doc, dict) and doc
    assert "┃" not in r.stdout  # no table on stdout


def test_nan_anchor_and_weights_file_refused(files, tmp_path):
    g = files / "good.safetensors"
    _fails(["finetune", g, "-s", "sherpa", "--anchor", files / "nan.safetensors", "--epochs", "1",
            "--out", tmp_path / "o.safetensors"], files)
    _fails(["finetune", "mlp", "--weights", files / "inf.safetensors", "--epochs", "1",
            "--out", tmp_path / "o.safetensors"], files)
    assert not any(tmp_path.iterdir())


def test_merge_weights_is_a_deprecated_alias_of_coeffs(files, tmp_path):
    out = tmp_path / "m.safetensors"
    a, b = _g(files)
    r = _ok(["merge", a, b, "--weights", "0.25,0.75", "--out", out])
    assert "deprecated" in r.stderr and "--coeffs" in r.stderr
    assert read_info(out)["coeffs"] == [0.25, 0.75]
    _fails(["merge", a, b, "--weights", "0.5,0.5", "--coeffs", "0.5,0.5", "--out",
            tmp_path / "n.safetensors"], files, contains="--coeffs")
    r = _ok(["merge", a, b, "--coeffs", "1.5,-0.5", "--extrapolate", "--out",
             tmp_path / "x.safetensors"])


def test_merge_option_keys_match_the_methods():
    """The -o keys the CLI accepts are the keyword arguments of each merge function."""
    import inspect

    from neuralign.cli.merge import METHOD_OPTIONS
    from neuralign.merge import api, fisher, matched, ot, soups, zipit

    internal = {"models", "loader", "data", "weights", "fishers", "evaluate", "bn_loader",
                "per_layer", "seed"}
    funcs = {"learned-soup": soups.learned_soup, "fisher": fisher.fisher_merge,
             "ot": ot.ot_fusion, "matched": matched.matched_averaging, "zipit": zipit.zipit,
             "greedy-soup": soups.greedy_soup}
    assert set(METHOD_OPTIONS) == set(api.METHODS)
    for method, fn in funcs.items():
        params = set(inspect.signature(fn).parameters) - internal
        assert params == set(METHOD_OPTIONS[method]), (method, params)
