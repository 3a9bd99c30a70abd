"""The task-vector half of ``neuralign merge``: ``--method task-arithmetic|ties|dare|slerp
--base BASE``, in memory for neuralign checkpoints (optionally ``--align weight`` first) and out
of core, tensor by tensor, for safetensors checkpoint folders (Hugging Face sharded directories
with ``model.safetensors.index.json``, or a folder with one ``model.safetensors``).

Torch-free until the options, inputs and outputs are checked.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from neuralign.cli import _data, _flow
from neuralign.cli._common import fail, json_safe
from neuralign.cli._guard import Output, check_outputs
from neuralign.cli._inputs import check_choice, check_range, parse_floats

TASK_METHODS = ("task-arithmetic", "ties", "dare", "slerp")
INDEX = "model.safetensors.index.json"
DEFAULT_DENSITY = {"ties": 0.2, "dare": 0.5}


@dataclass
class TaskOptions:
    base: str | None = None
    density: float | None = None
    scale: float = 1.0
    combine: str = "linear"
    rescale: str = "inverse"
    elect: str = "sum"
    t: float = 0.5

    def given(self) -> list[str]:
        """The task-only flags set away from their defaults (for non-task methods: an error)."""
        d = TaskOptions()
        names = {"base": "--base", "density": "--density", "scale": "--scale",
                 "combine": "--combine", "rescale": "--rescale", "elect": "--elect", "t": "--t"}
        return [flag for k, flag in names.items() if getattr(self, k) != getattr(d, k)]


def is_checkpoint_dir(path: str) -> bool:
    p = Path(path)
    return p.is_dir() and ((p / INDEX).is_file() or (p / "model.safetensors").is_file())


def streams(paths) -> bool:
    """Inputs that are safetensors checkpoint folders merge out of core."""
    return any(is_checkpoint_dir(p) for p in paths)


def all_sharded(paths) -> bool:
    """Every input a sharded folder (with an index): plain ``merge`` averages these out of core
    (a folder with one ``model.safetensors`` is still loaded as a model, as before)."""
    return all(Path(p).is_dir() and (Path(p) / INDEX).is_file() for p in paths)


def parse_task_weights(text: str | None, n: int):
    """``--coeffs`` for task methods: one weight per fine-tuned model, not normalised."""
    if text is None:
        return None
    w = parse_floats(text, n, "--coeffs", " (one per model besides --base)")
    for x in w:
        check_range(x, "--coeffs")
    return w


def check(method: str, models: list[str], opts: TaskOptions, *, align: str, coeffs, repair,
          options, data) -> dict:
    """Validate a task-vector merge's options (torch-free); return the library's keywords."""
    if align not in ("none", "weight"):
        fail(f"--method {method} aligns with --align weight only (got --align {align})")
    if opts.base is None and align == "none":
        fail(f"--method {method} needs --base, the checkpoint the models were fine-tuned from "
             "(models without a shared origin: --align weight)")
    if repair:
        fail(f"--repair applies to averaging methods, not --method {method}")
    if options:
        fail(f"--method {method} takes no -o options; use --density/--scale/--combine/...")
    n = len(models) - (1 if opts.base is None else 0)  # without --base the first is the origin
    if n < 1:
        fail(f"--method {method} needs at least one model besides the base")
    if method == "slerp":
        if n != 1:
            fail(f"--method slerp interpolates --base and exactly one model, got {n}")
        if coeffs is not None:
            fail("--method slerp takes --t, not --coeffs")
        check_range(opts.t, "--t", lo=0.0, hi=1.0)
    elif opts.t != 0.5:
        fail("--t applies to --method slerp only")
    density = opts.density if opts.density is not None else DEFAULT_DENSITY.get(method, 1.0)
    if method in ("ties", "dare"):
        check_range(density, "--density", lo=0.0, hi=1.0, lo_open=True)
    elif opts.density is not None:
        fail(f"--density applies to --method ties or dare, not {method}")
    check_range(opts.scale, "--scale")
    combine = check_choice(opts.combine, ("linear", "ties"), "--combine")
    rescale = check_choice(opts.rescale, ("inverse", "l1", "none"), "--rescale")
    elect = check_choice(opts.elect, ("sum", "count"), "--elect")
    if method != "dare" and (combine != "linear" or rescale != "inverse"):
        fail("--combine and --rescale apply to --method dare only")
    if method not in ("ties", "dare") and elect != "sum":
        fail("--elect applies to --method ties or dare only")
    if streams([*models, *([opts.base] if opts.base else [])]):
        if align != "none":
            fail("--align weight works on neuralign checkpoints, not on checkpoint folders")
        if data is not None:
            fail("checkpoint folders merge out of core without evaluation: drop --data")
    kw = {"weights": parse_task_weights(coeffs, n), "scale": opts.scale}
    if method in ("ties", "dare"):
        kw.update(density=density, elect=elect)
    if method == "dare":
        kw.update(combine=combine, rescale=None if rescale == "none" else rescale)
    if method == "slerp":
        kw = {"t": opts.t}
    return kw


def _replaceable(out: Path) -> bool:
    """An existing folder --force may replace: one this command wrote (its index says so)."""
    try:
        meta = json.loads((out / INDEX).read_text()).get("metadata", {})
    except (OSError, ValueError, AttributeError):
        return False
    return meta.get("merged_by") == "neuralign"


def run_streaming(method: str, models: list[str], opts: TaskOptions, kw: dict, out: str, *,
                  seed: int, force: bool, json_: bool, rep) -> None:
    """Out-of-core merge of checkpoint folders / safetensors files into the folder ``out``."""
    inputs = [*models, *([opts.base] if opts.base else [])]
    for p in inputs:
        if not (is_checkpoint_dir(p) or (p.endswith(".safetensors") and Path(p).is_file())):
            fail(f"{p}: not a safetensors checkpoint folder ({INDEX} or model.safetensors) or "
                 "file; merge checkpoint folders with checkpoint folders")
    o = Path(out)
    if o.suffix == ".safetensors":
        fail(f"--out {out}: checkpoint folders merge into a folder; give a folder name")
    if o.exists() and (not o.is_dir() or any(o.iterdir())):
        if not force:
            fail(f"--out {out} exists; pass --force to replace it")
        if not o.is_dir() or not _replaceable(o):
            fail(f"--out {out} exists and is not a folder written by 'neuralign merge'; "
                 "--force replaces only those: choose another path")
    check_outputs([Output("--out", out, "dir")], inputs, force=True)
    with rep.running():
        from neuralign.merge.sharded import merge_checkpoints

        lib = "linear" if method == "average" else method
        if method == "dare":
            kw = {**kw, "seed": seed}
        merge_checkpoints(models, out, lib, base=opts.base, overwrite=True,
                          progress=not json_, **kw)
        rep.note(f"saved {out} ({method}, out of core)")
        rep.data.update(out=out, inputs=list(models), base=opts.base, method=method,
                        streamed=True, options=json_safe(kw))


def run_in_memory(method: str, models: list[str], opts: TaskOptions, kw: dict, out: str, *,
                  align: str, seed: int, margs, dargs, fit_batches: int, bn_reset: bool,
                  force: bool, device, rep) -> None:
    """Load neuralign checkpoints, merge with the task-vector method (after weight matching
    with ``--align weight``), save a neuralign checkpoint; evaluate with --data."""
    paths = ([opts.base] if opts.base else []) + list(models)
    _flow.prepare(paths, margs, dargs, [_flow.model_output("--out", out, "merge")],
                  force=force, device=device)
    with rep.running():
        from neuralign.evaluation import evaluate
        from neuralign.io import save_model
        from neuralign.merge import reset_bn
        from neuralign.merge.task_vectors import align_then_merge, task_merge

        inp = _flow.open_inputs(paths, margs, dargs, need_data=False, device=device)
        fit, val = _flow.loaders(inp, fit_batches=fit_batches)
        ms = inp.models
        base, tuned = (ms[0], ms[1:]) if opts.base else (None, ms)
        lib_kw = dict(kw, seed=seed) if method == "dare" else kw
        if align == "weight":
            from neuralign.cli.align import example_input

            info = inp.infos[-1] or {}
            if inp.splits is not None:
                example = _data.example_batch(inp.splits)
            else:
                rec = info.get("input_shape")
                example = example_input(tuned[0], tuple(rec) if rec else None, models[0])
            if example is not None and device:
                example = example.to(device)
            merged, _ = align_then_merge(tuned, example, method=method, base=base, seed=seed,
                                         **lib_kw)
        else:
            merged = task_merge(base, tuned, method, **lib_kw)
        if fit is not None and bn_reset:
            merged = reset_bn(merged, fit)
        info = inp.infos[-1] or {}
        meta = _data.metadata("merge", inp.data, inp.data_seed if inp.data else None, seed,
                              inp.splits, inputs=list(models), base=opts.base, method=method,
                              align=align, options=json_safe(kw))
        if inp.splits is None:
            meta.update(input_shape=info.get("input_shape"), num_classes=info.get("num_classes"))
        save_model(merged.cpu() if device else merged, out, metadata=json_safe(meta))
        rows = []
        if val is not None:
            names = ([f"{opts.base} (base)"] if opts.base else []) + list(models)
            for name, m in [*zip(names, ms), (f"merged ({method})", merged)]:
                ev = evaluate(m, val, device=device)
                rows.append({"model": name, "loss": ev["loss"], "accuracy": ev["accuracy"]})
            rep.table(f"validation ({inp.data}, data seed {inp.data_seed})",
                      ["model", "loss", "accuracy"],
                      [[r["model"], r["loss"], r["accuracy"]] for r in rows])
        rep.note(f"saved {out}")
        rep.data.update(out=out, inputs=list(models), base=opts.base, method=method, align=align,
                        streamed=False, options=json_safe(kw), data=inp.data,
                        data_seed=inp.data_seed if inp.data else None, validation=rows)
