"""``neuralign merge A B [C ...]``: align (optionally), merge, REPAIR, save.

Also holds the alignment helper the barrier / cka / surface / connect commands share.
"""

from __future__ import annotations

import typer

from neuralign.cli import _data, _flow, _taskmerge
from neuralign.cli._common import (
    ARCH_OPT,
    DATA_OPT_HELP,
    DATA_ROOT_OPT,
    DATA_SEED_OPT,
    DEVICE_OPT,
    FORCE_OPT,
    IMAGE_SIZE_OPT,
    INPUT_SHAPE_OPT,
    JSON_OPT,
    MODEL_KW_OPT,
    PICKLE_OPT,
    TEST_DOMAIN_OPT,
    Report,
    fail,
    json_safe,
    parse_options,
    warn,
)
from neuralign.cli._inputs import check_choice, check_range, parse_floats, parse_shape
from neuralign.cli._models import ModelArgs

ALIGN_CHOICES = ("none", "weight", "activation", "cov")
TASK_METHODS = _taskmerge.TASK_METHODS
# The -o/--option keys each merge method takes (tests check them against the functions).
METHOD_OPTIONS = {
    "average": (), "uniform-soup": (), "greedy-soup": (),
    "learned-soup": ("epochs", "lr", "max_batches"),
    "learned-soup-layer": ("epochs", "lr", "max_batches"),
    "fisher": ("n_examples", "labels", "normalize", "fisher_floor", "favor_target"),
    "ot": ("reference", "ground", "n_samples"),  # ground: weight, activation, preactivation
    "matched": ("slack", "growth_penalty", "max_width", "n_iter"),
    "zipit": ("stop_at", "alpha", "beta", "within", "n_samples"),
}
NEEDS_DATA = ("greedy-soup", "learned-soup", "learned-soup-layer", "zipit", "fisher")
SELF_ALIGNING = ("ot", "matched", "zipit")


def align_to_first(models, align, loader, seed=0, example=None):
    """Align every model after the first onto the first (neuralign.align.align_models)."""
    if align == "none":
        return list(models)
    if align in ("activation", "cov") and loader is None:
        fail(f"--align {align} needs --data")
    from neuralign.align import align_models

    method = "corr" if align == "activation" else align
    out = [models[0]]
    for m in models[1:]:
        aligned, _, _ = align_models(models[0], m, method, loader=loader, seed=seed,
                                     example_input=example)
        out.append(aligned.eval())
    return out


def parse_coeffs(text: str | None, n: int, extrapolate: bool, flag: str = "--coeffs"):
    if text is None:
        return None
    w = parse_floats(text, n, flag)
    for x in w:
        check_range(x, flag, lo=None if extrapolate else 0.0, hi=None if extrapolate else 1.0)
    total = sum(w)
    if abs(total) < 1e-12:
        fail(f"{flag} {text}: the coefficients sum to 0")
    if abs(total - 1) > 1e-6:
        warn(f"{flag} {text} sums to {total:g}; the coefficients are divided by it")
    return w


def _task_merge(method, checkpoints, topts, out, align, coeffs, repair_, option, data, seed,
                force, json_, rep, margs, dargs, fit_batches, bn_reset, device) -> None:
    """``--method task-arithmetic|ties|dare|slerp``: options first, then in memory or out of
    core (checkpoint folders)."""
    from neuralign.cli._inputs import check_device

    align = check_choice(align, ALIGN_CHOICES, "--align")
    check_device(device)
    check_range(fit_batches, "--fit-batches", lo=1)
    kw = _taskmerge.check(method, list(checkpoints), topts, align=align, coeffs=coeffs,
                          repair=repair_, options=option, data=data)
    if _taskmerge.streams([*checkpoints, *([topts.base] if topts.base else [])]):
        _taskmerge.run_streaming(method, list(checkpoints), topts, kw, out, seed=seed,
                                 force=force, json_=json_, rep=rep)
    else:
        _taskmerge.run_in_memory(method, list(checkpoints), topts, kw, out, align=align,
                                 seed=seed, margs=margs, dargs=dargs, fit_batches=fit_batches,
                                 bn_reset=bn_reset, force=force, device=device, rep=rep)


def register(app: typer.Typer) -> None:
    @app.command("merge")
    def merge_cmd(
        checkpoints: list[str] = typer.Argument(..., help="two or more models"),
        out: str = typer.Option(..., help="where to write the merged model (.safetensors)"),
        method: str = typer.Option("average", help=", ".join((*METHOD_OPTIONS, *TASK_METHODS))
                                   + " (the last four: task vectors, need --base)"),
        base: str = typer.Option(None, help="task methods: the pre-trained checkpoint the models "
                                 "were fine-tuned from (a neuralign file or a checkpoint folder)"),
        density: float = typer.Option(None, help="ties/dare: fraction of each task vector kept "
                                      "(default 0.2 for ties, 0.5 for dare)"),
        scale: float = typer.Option(1.0, help="task methods: base + scale * merged task vector"),
        combine: str = typer.Option("linear", help="dare: linear or ties"),
        rescale: str = typer.Option("inverse", help="dare: inverse (1/density), l1 or none"),
        elect: str = typer.Option("sum", help="ties/dare: sign election by sum or count"),
        t: float = typer.Option(0.5, "--t", help="slerp: 0 = --base, 1 = the model"),
        align: str = typer.Option("none", help="none, weight, activation or cov: align every "
                                  "model to the first before merging (not for ot/matched/zipit)"),
        repair_: bool = typer.Option(False, "--repair", help="REPAIR the merge of two models "
                                     "(needs data)"),
        bn_reset: bool = typer.Option(True, help="reset batch-norm statistics on the training "
                                      "data after merging"),
        coeffs: str = typer.Option(None, "--coeffs", help="mixing coefficients, one per model, "
                                   "in [0, 1], e.g. 0.3,0.7 (default: equal)"),
        weights_alias: str = typer.Option(None, "--weights", hidden=True),
        extrapolate: bool = typer.Option(False, "--extrapolate", help="allow --coeffs outside "
                                         "[0, 1]"),
        data: str = typer.Option(None, help=DATA_OPT_HELP),
        data_seed: int = DATA_SEED_OPT,
        data_root: str = DATA_ROOT_OPT,
        image_size: int = IMAGE_SIZE_OPT,
        test_domain: str = TEST_DOMAIN_OPT,
        fit_batches: int = typer.Option(8, help="training batches for BN reset / REPAIR"),
        input_shape: str = INPUT_SHAPE_OPT,
        seed: int = typer.Option(0),
        option: list[str] = typer.Option(None, "--option", "-o", help="method option key=value "
                                         "(e.g. ot: ground=activation|preactivation|weight; "
                                         "zipit: stop_at=2 alpha=0.3 beta=0.125; fisher: "
                                         "labels=expected|empirical normalize=true; matched: "
                                         "max_width=64)"),
        arch: str = ARCH_OPT,
        model_option: list[str] = MODEL_KW_OPT,
        allow_pickle: bool = PICKLE_OPT,
        device: str = DEVICE_OPT,
        force: bool = FORCE_OPT,
        json_: bool = JSON_OPT,
    ) -> None:
        """Merge models into one and save it; reports each model's and the merge's accuracy."""
        rep = Report(json_)
        method = check_choice(method, (*METHOD_OPTIONS, *TASK_METHODS), "--method")
        topts = _taskmerge.TaskOptions(base, density, scale, combine, rescale, elect, t)
        if method in TASK_METHODS:
            _task_merge(method, checkpoints, topts, out, align, coeffs, repair_, option, data,
                        seed, force, json_, rep, ModelArgs(arch, model_option, allow_pickle),
                        _data.DataArgs(data, data_seed, data_root, image_size, test_domain),
                        fit_batches, bn_reset, device)
            return
        if topts.given():
            fail(f"{', '.join(topts.given())} only apply to --method {'|'.join(TASK_METHODS)}")
        if len(checkpoints) < 2:
            fail("merge needs at least two checkpoints")
        align = check_choice(align, ALIGN_CHOICES, "--align")
        options = parse_options(option, allowed=METHOD_OPTIONS[method],
                                what=f"option of --method {method}")
        if weights_alias is not None:
            if coeffs is not None:
                fail("give --coeffs only (--weights is its old name)")
            warn("--weights is deprecated: use --coeffs")
            coeffs = weights_alias
        w = parse_coeffs(coeffs, len(checkpoints), extrapolate)
        check_range(fit_batches, "--fit-batches", lo=1)
        shape = parse_shape(input_shape)
        if method == "average" and _taskmerge.all_sharded(checkpoints):
            if align != "none" or repair_ or data is not None:
                fail("checkpoint folders average out of core: drop --align/--repair/--data")
            _taskmerge.run_streaming("average", list(checkpoints), topts, {"weights": w}, out,
                                     seed=seed, force=force, json_=json_, rep=rep)
            return
        if repair_ and len(checkpoints) != 2:
            fail("--repair merges exactly two models")
        if method in SELF_ALIGNING and align != "none":
            fail(f"--method {method} matches units itself: drop --align {align}")
        margs = ModelArgs(arch, model_option, allow_pickle)
        dargs = _data.DataArgs(data, data_seed, data_root, image_size, test_domain)
        _flow.prepare(checkpoints, margs, dargs, [_flow.model_output("--out", out, "merge")],
                      force=force, device=device)
        with rep.running():
            from neuralign.evaluation import evaluate
            from neuralign.io import save_model
            from neuralign.merge import merge, repair

            need = method in NEEDS_DATA or repair_ or align in ("activation", "cov")
            inp = _flow.open_inputs(checkpoints, margs, dargs, need_data=need, device=device)
            fit, val = _flow.loaders(inp, fit_batches=fit_batches)
            models = inp.models
            if method not in SELF_ALIGNING and align != "none":
                from neuralign.cli.align import example_input

                example = None
                if inp.splits is not None:
                    example = _data.example_batch(inp.splits)
                else:
                    rec = (inp.infos[0] or {}).get("input_shape")
                    example = example_input(models[0], shape or (tuple(rec) if rec else None),
                                            checkpoints[0])
                if example is not None and device:
                    example = example.to(device)
                models = align_to_first(models, align, fit, seed, example)
            merged = merge(models, w, method, data=val, bn_loader=fit if bn_reset else None,
                           seed=seed, **options)
            if repair_:
                t = 0.5 if w is None else w[1] / (w[0] + w[1])
                merged = repair(models[0], models[1], merged, fit, t)
            info = inp.infos[0] or {}
            meta = _data.metadata("merge", inp.data, inp.data_seed if inp.data else None,
                                  seed, inp.splits, inputs=list(checkpoints), method=method,
                                  align=align, repair=repair_, coeffs=w)
            if inp.splits is None:
                meta.update(input_shape=info.get("input_shape"),
                            num_classes=info.get("num_classes"))
            save_model(merged.cpu() if device else merged, out, metadata=json_safe(meta))
            rows = []
            if val is not None:
                label = f"merged ({method}{' + REPAIR' if repair_ else ''})"
                for name, m in [*zip(checkpoints, models), (label, merged)]:
                    ev = evaluate(m, val, device=device)
                    rows.append({"model": name, "loss": ev["loss"], "accuracy": ev["accuracy"]})
                rep.table(f"validation ({inp.data}, data seed {inp.data_seed})",
                          ["model", "loss", "accuracy"],
                          [[r["model"], r["loss"], r["accuracy"]] for r in rows])
            rep.note(f"saved {out}")
            rep.data.update(out=out, inputs=list(checkpoints), method=method, align=align,
                            repair=repair_, coeffs=w, data=inp.data,
                            data_seed=inp.data_seed if inp.data else None, validation=rows)
