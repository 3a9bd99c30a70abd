"""``neuralign merge A B [C ...]``: align (optionally), merge, REPAIR, save.

Also holds the small helpers the barrier / cka / surface / connect commands share.
"""

from __future__ import annotations

import os

import typer

from neuralign.cli._common import console, load_cli_data, parse_options, table
from neuralign.errors import NeuralignError

ALIGN_CHOICES = ("none", "weight", "activation", "cov")


def load_models(paths, allow_pickle=False):
    from neuralign.io import load_model

    return [load_model(p, allow_pickle=allow_pickle).eval() for p in paths]


def check_out(out, inputs):
    if out is not None and os.path.abspath(out) in {os.path.abspath(p) for p in inputs}:
        raise NeuralignError(f"--out {out} would overwrite an input checkpoint; choose another path")


def align_to_first(models, align, loader, seed=0):
    """Align every model after the first onto the first (neuralign.align.align_models)."""
    if align not in ALIGN_CHOICES:
        raise NeuralignError(f"--align must be one of {', '.join(ALIGN_CHOICES)}, got {align!r}")
    if align == "none":
        return list(models)
    if align in ("activation", "cov") and loader is None:
        raise NeuralignError(f"--align {align} needs --data")
    from neuralign.align import align_models

    method = "corr" if align == "activation" else align
    out = [models[0]]
    for m in models[1:]:
        aligned, _, _ = align_models(models[0], m, method, loader=loader, seed=seed)
        out.append(aligned.eval())
    return out


def data_loaders(data, data_root, seed, batch_size=256, fit_batches=None):
    """(fit loader on training data, evaluation loader on the validation split)."""
    if data is None:
        return None, None
    splits = load_cli_data(data, seed=seed, root=data_root)
    fit = splits.loader("train", batch_size, shuffle=False)
    if fit_batches is not None:
        fit = [b for i, b in zip(range(fit_batches), fit)]
    return fit, splits.loader("val", batch_size, shuffle=False)


def register(app: typer.Typer) -> None:
    @app.command("merge")
    def merge_cmd(
        checkpoints: list[str] = typer.Argument(..., help="two or more .safetensors checkpoints"),
        out: str = typer.Option(..., help="where to write the merged model (.safetensors)"),
        method: str = typer.Option("average", help="average, uniform-soup, greedy-soup, learned-soup, "
                                   "learned-soup-layer, fisher, ot, matched, zipit"),
        align: str = typer.Option("none", help="none, weight, activation or cov: align every model to "
                                  "the first before merging (not needed for ot/matched/zipit)"),
        repair_: bool = typer.Option(False, "--repair", help="REPAIR the merge of two models (needs --data)"),
        bn_reset: bool = typer.Option(True, help="reset batch-norm statistics on --data after merging"),
        weights: str = typer.Option(None, help="comma-separated model weights, e.g. 0.3,0.7"),
        data: str = typer.Option(None, help="digits, fashion_mnist or mnist1d: held-out data for soups, "
                                 "Fisher, activation alignment/OT, REPAIR and the report"),
        data_root: str = typer.Option(None),
        fit_batches: int = typer.Option(8, help="training batches used for BN reset / REPAIR / Fisher"),
        seed: int = typer.Option(0),
        option: list[str] = typer.Option(None, "--option", "-o", help="method option key=value "
                                         "(e.g. ground=activation, stop_at=2, max_width=64)"),
        allow_pickle: bool = typer.Option(False),
    ) -> None:
        """Merge models into one and save it; prints each model's and the merge's accuracy."""
        from neuralign.io import save_model
        from neuralign.merge import merge, repair
        from neuralign.merge._util import evaluate

        if len(checkpoints) < 2:
            raise NeuralignError("merge needs at least two checkpoints")
        check_out(out, checkpoints)
        models = load_models(checkpoints, allow_pickle)
        fit, val = data_loaders(data, data_root, seed, fit_batches=fit_batches)
        w = [float(x) for x in weights.split(",")] if weights else None
        if method.replace("_", "-") not in ("ot", "matched", "zipit"):
            models = align_to_first(models, align, fit, seed)
        held_out = val
        merged = merge(models, w, method, data=held_out, bn_loader=fit if bn_reset else None, seed=seed,
                       **parse_options(option))
        if repair_:
            if len(models) != 2 or fit is None:
                raise NeuralignError("--repair merges exactly two models and needs --data")
            t = 0.5 if w is None else w[1] / (w[0] + w[1])
            merged = repair(models[0], models[1], merged, fit, t)
        save_model(merged, out, metadata={"inputs": list(checkpoints), "method": method, "align": align,
                                          "repair": repair_, "weights": w})
        if val is not None:
            rows = [[p, *(evaluate(m, val)[k] for k in ("loss", "accuracy"))] for p, m in zip(checkpoints, models)]
            rows.append([f"merged ({method}{' + REPAIR' if repair_ else ''})", *(evaluate(merged, val)[k] for k in ("loss", "accuracy"))])
            console.print(table(f"validation ({data})", ["model", "loss", "accuracy"], rows))
        console.print(f"saved {out}")
