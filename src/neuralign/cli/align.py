"""``neuralign align A B``: permute checkpoint B so that its units line up with A's."""

from __future__ import annotations

import typer

from neuralign.cli import _data, _flow
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
)
from neuralign.cli._inputs import check_choice, check_range, parse_shape
from neuralign.cli._models import ModelArgs

METHODS = ("weight", "activation", "corr", "cov", "ste", "sinkhorn", "annealing", "scaling")
DATA_METHODS = ("activation", "corr", "cov", "ste", "annealing")


def _align_other(method, ma, mb, loader, example, batches, steps, seed):
    """annealing (Entezari: minimise the barrier on ``batches`` training batches) or scaling
    (permutations x positive scalings); returns (aligned B, table rows, extra JSON)."""
    import torch

    from neuralign.permute import apply_permutation
    from neuralign.spec import spec_from_model

    spec = spec_from_model(ma, example)
    if method == "annealing":
        from neuralign.align.annealing import annealing_matching

        batches_ = [x for _, x in zip(range(batches), loader)]
        perm = annealing_matching(spec, ma, mb, batches_, steps=steps, seed=seed)
        aligned = apply_permutation(mb, perm, spec)
        extra = {k: perm.info[k] for k in ("barrier_init", "barrier", "accepted", "steps",
                                           "time_s")}
    else:
        from neuralign.align.scaling import scaling_matching

        res = scaling_matching(spec, ma, mb, example, seed=seed)
        perm, aligned = res.permutation, res.aligned
        extra = {"scaled_groups": res.info["scaled_groups"],
                 "unscaled": {k: str(v) for k, v in res.info["unscaled"].items()}}
    groups = [{"name": n, "size": spec.groups[n].size,
               "moved": int((perm[n] != torch.arange(spec.groups[n].size)).sum())}
              for n in spec.groups]
    return aligned.eval(), groups, extra


def example_input(model, shape, what: str):
    """A dummy batch for tracing: --input-shape, else the model's recorded config."""
    import torch

    if shape is not None:
        if len(shape) == 1:  # a sequence of token ids
            return torch.ones(2, shape[0], dtype=torch.long)
        return torch.zeros(2, *shape)
    from neuralign.align.api import example_input_for

    x = example_input_for(model)
    if x is None and not hasattr(model, "config"):
        fail(f"cannot tell the input shape of {what}: pass --data (its first batch is traced) "
             "or --input-shape C,H,W")
    return x


def register(app: typer.Typer) -> None:
    @app.command("align")
    def align_cmd(
        a: str = typer.Argument(..., help="reference model (checkpoint or Hugging Face folder)"),
        b: str = typer.Argument(..., help="model to permute onto A"),
        out: str = typer.Option(..., help="where to write the aligned B (.safetensors)"),
        method: str = typer.Option("weight", help="weight, activation (=corr), cov, ste, "
                                   "sinkhorn, annealing (simulated annealing on the barrier; "
                                   "needs data), scaling (permutations x positive scalings)"),
        data: str = typer.Option(None, help=DATA_OPT_HELP + "; activation/STE matching need it"),
        data_seed: int = DATA_SEED_OPT,
        data_root: str = DATA_ROOT_OPT,
        image_size: int = IMAGE_SIZE_OPT,
        test_domain: str = TEST_DOMAIN_OPT,
        input_shape: str = INPUT_SHAPE_OPT,
        batches: int = typer.Option(20, help="batches of data for activation matching; for STE "
                                    "the number of steps (Git Re-Basin's SGD, lr 1e-2; the "
                                    "best permutation seen is kept)"),
        batch_size: int = typer.Option(_flow.EVAL_BATCH_SIZE),
        restarts: int = typer.Option(0, help="weight matching: extra random restarts"),
        max_iter: int = typer.Option(100, help="weight matching: most sweeps"),
        steps: int = typer.Option(500, help="annealing: swap proposals (its budget)"),
        seed: int = typer.Option(0, help="seed of the matching (restarts, data order)"),
        arch: str = ARCH_OPT,
        model_option: list[str] = MODEL_KW_OPT,
        allow_pickle: bool = PICKLE_OPT,
        device: str = DEVICE_OPT,
        force: bool = FORCE_OPT,
        json_: bool = JSON_OPT,
    ) -> None:
        """Align B to A (Git Re-Basin weight matching or activation matching) and save it."""
        rep = Report(json_)
        method = check_choice(method, METHODS, "--method")
        check_range(batches, "--batches", lo=1)
        check_range(batch_size, "--batch-size", lo=1)
        check_range(restarts, "--restarts", lo=0)
        check_range(max_iter, "--max-iter", lo=1)
        check_range(steps, "--steps", lo=1)
        shape = parse_shape(input_shape)
        if method in DATA_METHODS and data is None:
            what = "evaluates the barrier" if method == "annealing" else "matches activations"
            fail(f"--method {method} {what} on data: it needs --data")
        margs = ModelArgs(arch, model_option, allow_pickle)
        dargs = _data.DataArgs(data, data_seed, data_root, image_size, test_domain)
        _flow.prepare([a, b], margs, dargs, [_flow.model_output("--out", out, "align")],
                      force=force,
                      device=device)
        with rep.running():
            from neuralign.align import align_models
            from neuralign.io import save_model

            inp = _flow.open_inputs([a, b], margs, dargs, need_data=method in DATA_METHODS,
                                    device=device, check_fit="run")
            ma, mb = inp.models
            loader, example = None, None
            if inp.splits is not None:
                loader = inp.splits.loader("train", batch_size, shuffle=True, seed=seed)
                example = _data.example_batch(inp.splits)
            else:
                recorded = (inp.infos[0] or {}).get("input_shape")
                example = example_input(ma, shape or (tuple(recorded) if recorded else None), a)
            options = {}
            if method in ("activation", "corr", "cov"):
                options["max_batches"] = batches
            if method == "ste":
                options["max_steps"] = batches
            if example is not None and device:
                example = example.to(device)
            if method in ("annealing", "scaling"):
                if device:
                    fail(f"--method {method} runs on the CPU for now; drop --device")
                aligned, groups, extra = _align_other(method, ma, mb, loader, example, batches,
                                                      steps, seed)
                info_b = inp.infos[1] or {}
                meta = _data.metadata(
                    "align", info_b.get("data") or inp.data, info_b.get("data_seed"),
                    info_b.get("seed"), None, aligned_to=a, source=b, method=method,
                    align_seed=seed, align_data=inp.data,
                    input_shape=info_b.get("input_shape"),
                    num_classes=info_b.get("num_classes"))
                save_model(aligned.cpu(), out, metadata=json_safe(meta))
                rep.table(f"align {b} -> {a} ({method})", ["group", "units", "moved"],
                          [[g["name"], g["size"], g["moved"]] for g in groups])
                if method == "annealing":
                    rep.table("barrier on the training batches", ["", "before", "after"],
                              [["loss barrier", extra["barrier_init"], extra["barrier"]]])
                rep.note(f"{len(groups)} groups; saved {out}")
                rep.data.update(out=out, a=a, b=b, method=method, groups=groups, **extra)
                return
            aligned, _, summary = align_models(ma, mb, method, loader=loader, seed=seed,
                                               example_input=example, max_iter=max_iter,
                                               restarts=restarts, **options)
            info_b = inp.infos[1] or {}
            meta = _data.metadata(
                "align", info_b.get("data") or inp.data, info_b.get("data_seed"),
                info_b.get("seed"), None, aligned_to=a, source=b, method=method,
                align_seed=seed, align_data=inp.data,
                input_shape=info_b.get("input_shape"), num_classes=info_b.get("num_classes"))
            save_model(aligned.cpu(), out, metadata=json_safe(meta))
            groups = [{"name": g["name"], "size": g["size"], "moved": g["moved"]}
                      for g in summary["groups"]]
            rep.table(f"align {b} -> {a} ({method})", ["group", "units", "moved"],
                      [[g["name"], g["size"], g["moved"]] for g in groups])
            rows = [["weight objective <A, B>", summary["weight_objective_before"],
                     summary["weight_objective_after"]]]
            if summary["objective_before"] is not None and method != "weight":
                rows.append([f"{method} objective", summary["objective_before"],
                             summary["objective_after"]])
            rep.table("objective", ["", "before", "after"], rows)
            extra = f", {summary['sweeps']} sweeps" if summary.get("sweeps") else ""
            rep.note(summary["coverage"])
            rep.note(f"{len(groups)} groups, {summary['time_s']:.2f} s{extra}; saved {out}")
            rep.data.update(out=out, a=a, b=b, method=method, groups=groups,
                            weight_objective_before=summary["weight_objective_before"],
                            weight_objective_after=summary["weight_objective_after"],
                            objective_before=summary["objective_before"],
                            objective_after=summary["objective_after"],
                            seconds=summary["time_s"], coverage=summary["coverage"],
                            free_fraction=summary["free_fraction"])
