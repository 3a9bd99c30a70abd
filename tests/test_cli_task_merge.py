"""``neuralign merge --method task-arithmetic|ties|dare|slerp``, in memory and out of core on
checkpoint folders; ``neuralign stitch``; ``neuralign barrier --per-layer``."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from typer.testing import CliRunner

from neuralign.cli import app
from neuralign.io import load_model, save_model
from neuralign.merge.sharded import ShardedCheckpoint, save_sharded
from neuralign.merge.task_vectors import align_then_merge, task_merge
from neuralign.models import get_model

runner = CliRunner()
KW = {"width": 16, "depth": 2, "num_classes": 10, "in_features": 64}
META = {"data": "digits", "data_seed": 0, "seed": 0}


@pytest.fixture(scope="module")
def d(tmp_path_factory):
    d = tmp_path_factory.mktemp("taskmerge")
    torch.manual_seed(0)
    base = get_model("mlp", **KW)
    save_model(base, d / "base.safetensors", metadata=META)
    for i in (1, 2):
        m = get_model("mlp", **KW)
        m.load_state_dict(base.state_dict())
        with torch.no_grad():
            for p in m.parameters():
                p.add_(0.05 * torch.randn_like(p))
        save_model(m, d / f"ft{i}.safetensors", metadata=META)
    torch.manual_seed(7)
    save_model(get_model("mlp", **KW), d / "other.safetensors", metadata=META)
    for n in ("base", "ft1", "ft2"):  # sharded folders (several shards) with a config
        save_sharded(load_file(str(d / f"{n}.safetensors")), d / f"{n}_dir",
                     max_shard_bytes=2500)
        (d / f"{n}_dir" / "config.json").write_text(json.dumps({"model_type": "tiny"}))
    return d


def _hashes(folder: Path) -> dict:
    return {str(p): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


def ok(*args):
    r = runner.invoke(app, [str(a) for a in args])
    assert r.exit_code == 0, (args, r.stdout, r.stderr)
    return r


def fails(d, *args, contains=None):
    before = _hashes(d)
    r = runner.invoke(app, [str(a) for a in args])
    lines = [ln for ln in r.stderr.splitlines() if ln.strip()]
    assert r.exit_code == 2, (args, r.stdout, r.stderr)
    assert len(lines) == 1 and lines[0].startswith("error: "), r.stderr
    if contains:
        assert contains in lines[0], lines[0]
    assert _hashes(d) == before
    return lines[0]


def _sd(path):
    return load_model(path).state_dict()


def _close(sd, ref):
    assert set(sd) == set(ref)
    for k in ref:
        assert torch.allclose(sd[k].float(), ref[k].float(), atol=1e-6), k


@pytest.mark.parametrize("method,extra,lib", [
    ("task-arithmetic", ["--scale", "0.7", "--coeffs", "1,0.5"],
     {"scale": 0.7, "weights": [1.0, 0.5]}),
    ("ties", ["--density", "0.3"], {"density": 0.3}),
    ("dare", ["--density", "0.6", "--combine", "ties", "--seed", "3"],
     {"density": 0.6, "combine": "ties", "seed": 3}),
])
def test_in_memory_matches_the_library(d, tmp_path, method, extra, lib):
    out = tmp_path / "m.safetensors"
    r = ok("merge", "--method", method, "--base", d / "base.safetensors", d / "ft1.safetensors",
           d / "ft2.safetensors", "--out", out, "--json", *extra)
    data = json.loads(r.stdout)
    assert data["streamed"] is False and len(data["validation"]) == 4
    base = load_model(d / "base.safetensors")
    ref = task_merge(base, [load_model(d / f"ft{i}.safetensors") for i in (1, 2)], method, **lib)
    _close(_sd(out), ref.state_dict())


def test_slerp_and_align_weight(d, tmp_path):
    out = tmp_path / "s.safetensors"
    ok("merge", "--method", "slerp", "--t", "0.3", "--base", d / "base.safetensors",
       d / "ft1.safetensors", "--out", out)
    ref = task_merge(load_model(d / "base.safetensors"), [load_model(d / "ft1.safetensors")],
                     "slerp", t=0.3)
    _close(_sd(out), ref.state_dict())
    # no shared origin: weight matching onto the first, then TIES relative to it
    out2 = tmp_path / "a.safetensors"
    ok("merge", "--method", "ties", "--align", "weight", d / "ft1.safetensors",
       d / "other.safetensors", "--out", out2)
    ms = [load_model(d / "ft1.safetensors"), load_model(d / "other.safetensors")]
    ref, _ = align_then_merge(ms, torch.zeros(2, 64), method="ties", density=0.2)
    _close(_sd(out2), ref.state_dict())


def test_streaming_matches_in_memory_and_keeps_the_layout(d, tmp_path):
    out = tmp_path / "merged"
    r = ok("merge", "--method", "dare", "--density", "0.5", "--seed", "1", "--base",
           d / "base_dir", d / "ft1_dir", d / "ft2_dir", "--out", out, "--json")
    assert json.loads(r.stdout)["streamed"] is True
    ck, src = ShardedCheckpoint.open(out), ShardedCheckpoint.open(d / "base_dir")
    assert ck.weight_map == src.weight_map and len(set(ck.weight_map.values())) > 1
    assert (out / "config.json").read_text() == (d / "base_dir" / "config.json").read_text()
    ref = task_merge(load_file(str(d / "base.safetensors")),
                     [load_file(str(d / f"ft{i}.safetensors")) for i in (1, 2)], "dare",
                     density=0.5, seed=1)
    _close({k: ck.get(k) for k in ck.weight_map}, ref)
    # existing output: --force replaces a folder this command wrote, never a foreign one
    fails(d, "merge", "--method", "ties", "--base", d / "base_dir", d / "ft1_dir", d / "ft2_dir",
          "--out", out, contains="--force")
    ok("merge", "--method", "ties", "--base", d / "base_dir", d / "ft1_dir", d / "ft2_dir",
       "--out", out, "--force")
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("keep")
    fails(d, "merge", "--method", "ties", "--base", d / "base_dir", d / "ft1_dir",
          d / "ft2_dir", "--out", foreign, "--force", contains="not a folder written")
    assert (foreign / "notes.txt").read_text() == "keep"
    # plain averaging of checkpoint folders streams too
    avg = tmp_path / "avg"
    ok("merge", d / "ft1_dir", d / "ft2_dir", "--out", avg, "--coeffs", "0.25,0.75")
    a, b = load_file(str(d / "ft1.safetensors")), load_file(str(d / "ft2.safetensors"))
    got = ShardedCheckpoint.open(avg)
    _close({k: got.get(k) for k in got.weight_map}, {k: 0.25 * a[k] + 0.75 * b[k] for k in a})


def test_bad_task_options_fail_in_one_line(d, tmp_path):
    b, f1, f2 = d / "base.safetensors", d / "ft1.safetensors", d / "ft2.safetensors"
    out = tmp_path / "o.safetensors"
    for args, hint in [
        (["--method", "ties", f1, f2], "--base"),
        (["--method", "ties", "--base", b, f1, f2, "--density", "1.5"], "--density"),
        (["--method", "task-arithmetic", "--base", b, f1, f2, "--density", "0.5"], "--density"),
        (["--method", "slerp", "--base", b, f1, f2], "exactly one"),
        (["--method", "ties", "--base", b, f1, f2, "--coeffs", "1"], "--coeffs"),
        (["--method", "ties", "--base", b, f1, f2, "--combine", "ties"], "dare"),
        (["--method", "dare", "--base", b, f1, f2, "--rescale", "bogus"], "--rescale"),
        (["--method", "ties", "--base", b, f1, f2, "--align", "cov"], "--align"),
        (["--method", "ties", "--base", b, f1, f2, "--repair"], "--repair"),
        (["--method", "ties", "--base", d / "missing.safetensors", f1, f2], "missing"),
        (["--method", "ties", "--base", b, f1, d / "other.safetensors"], None),
        ([f1, f2, "--scale", "2"], "--scale"),
        (["--method", "ties", "--base", d / "base_dir", d / "ft1_dir", d / "ft2_dir",
          "--data", "digits"], "--data"),
        (["--method", "ties", "--base", d / "base_dir", d / "ft1_dir", f2], "folder"),
    ]:
        if hint is None:  # other weights, same shapes: works; a different architecture fails
            continue
        fails(d, "merge", *args, "--out", out, contains=hint)
        assert not out.exists()
    fails(d, "merge", "--method", "ties", "--base", b, f1, f2, "--out", f1, "--force",
          contains="input")
    fails(d, "merge", "--method", "ties", "--base", d / "base_dir", d / "ft1_dir", d / "ft2_dir",
          "--out", d / "ft1_dir" / "inner", contains="input")


def test_stitch_and_per_layer_barrier(d, tmp_path):
    png = tmp_path / "s.png"
    r = ok("stitch", d / "ft1.safetensors", d / "ft2.safetensors", "--train-batches", "2",
           "--kind", "affine,rank-2", "--plot", png, "--json")
    res = json.loads(r.stdout)
    assert res["layers"] == ["layer1", "layer2"] and set(res["penalty"]) == {"affine", "rank-2"}
    assert png.stat().st_size > 0
    fails(d, "stitch", d / "ft1.safetensors", d / "ft2.safetensors", "--kind", "rank-0",
          contains="--kind")
    fails(d, "stitch", d / "ft1.safetensors", d / "ft2.safetensors", "--layers", "nope",
          "--train-batches", "1", contains="nope")
    fails(d, "stitch", d / "ft1.safetensors", d / "ft2.safetensors", "--plot",
          d / "ft1.safetensors", contains="input")
    r = ok("barrier", d / "ft1.safetensors", d / "other.safetensors", "--per-layer",
           "--points", "3", "--json")
    out = json.loads(r.stdout)
    res, per = out["curves"]["linear"], out["per_layer"]
    assert per["layers"] == ["layer1", "layer2", "classifier"]
    # merged through the last layer = the ordinary barrier (Eq. 24 -> Eq. 7)
    assert per["loss"][-1] == pytest.approx(res["barriers"]["loss_entezari"], abs=1e-6)
    assert per["accuracy"][-1] == pytest.approx(res["barriers"]["accuracy_entezari"], abs=1e-6)
    fails(d, "barrier", d / "ft1.safetensors", d / "ft2.safetensors", "--layers", "layer1",
          contains="--per-layer")


def test_align_scaling_recovers_a_planted_scaling_and_annealing_runs(d, tmp_path):
    from neuralign.align.scaling import apply_scaling
    from neuralign.permute import apply_permutation, random_permutation
    from neuralign.spec import spec_from_model

    a = load_model(d / "ft1.safetensors")
    spec = spec_from_model(a, torch.zeros(2, 64))
    g = torch.Generator().manual_seed(0)
    scales = {n: torch.rand(spec.groups[n].size, generator=g) * 3 + 0.2 for n in spec.groups}
    b = apply_permutation(apply_scaling(a, scales, spec), random_permutation(spec, 3), spec)
    save_model(b, tmp_path / "b.safetensors", metadata=META)
    out = tmp_path / "al.safetensors"
    r = ok("align", d / "ft1.safetensors", tmp_path / "b.safetensors", "--method", "scaling",
           "--out", out, "--json")
    assert set(json.loads(r.stdout)["scaled_groups"]) == set(spec.groups)
    got, ref = _sd(out), a.state_dict()
    for k in ref:
        assert torch.allclose(got[k], ref[k], atol=1e-4), k
    out2 = tmp_path / "an.safetensors"
    r = ok("align", d / "ft1.safetensors", d / "other.safetensors", "--method", "annealing",
           "--steps", "20", "--batches", "1", "--data", "digits", "--out", out2, "--json")
    res = json.loads(r.stdout)
    assert res["barrier"] <= res["barrier_init"] and res["steps"] == 20
    fails(d, "align", d / "ft1.safetensors", d / "other.safetensors", "--method", "annealing",
          "--out", tmp_path / "x.safetensors", contains="--data")
    fails(d, "align", d / "ft1.safetensors", d / "other.safetensors", "--method", "annealing",
          "--steps", "0", "--data", "digits", "--out", tmp_path / "x.safetensors",
          contains="--steps")
