"""``neuralign align A B``: permute checkpoint B so that its units line up with A's."""

from __future__ import annotations

import typer

from neuralign.cli._common import console, load_cli_data, table
from neuralign.errors import NeuralignError


def _example_input(model):
    """A dummy batch for tracing, from the model's config (when data is not given)."""
    from neuralign.align.api import example_input_for

    x = example_input_for(model)
    if x is None:
        raise NeuralignError("cannot infer the input shape of the model; pass --data so the "
                             "first batch serves as example input")
    return x


def register(app: typer.Typer) -> None:
    @app.command("align")
    def align_cmd(
        a: str = typer.Argument(..., help="reference checkpoint (.safetensors)"),
        b: str = typer.Argument(..., help="checkpoint to permute onto A"),
        out: str = typer.Option(..., help="where to write the aligned B (.safetensors)"),
        method: str = typer.Option("weight", help="weight, activation (=corr), cov, ste, sinkhorn"),
        data: str = typer.Option(None, help="data set for activation/STE matching (digits, "
                                 "fashion_mnist, mnist1d); also gives the example input"),
        data_root: str = typer.Option(None, help="folder of the data files (Fashion-MNIST)"),
        batches: int = typer.Option(20, help="batches of data for activation matching"),
        batch_size: int = typer.Option(256),
        restarts: int = typer.Option(0, help="weight matching: extra random restarts"),
        max_iter: int = typer.Option(100, help="weight matching: most sweeps"),
        seed: int = typer.Option(0),
        allow_pickle: bool = typer.Option(False, help="allow loading pickle (.pt) checkpoints"),
    ) -> None:
        """Align B to A (Git Re-Basin weight matching or activation matching) and save it."""
        import os

        from neuralign.align import align_models
        from neuralign.io import load_model, save_model

        if os.path.abspath(out) in (os.path.abspath(a), os.path.abspath(b)):
            raise NeuralignError(f"--out {out} would overwrite an input checkpoint; choose "
                                 "another path")
        model_a = load_model(a, allow_pickle=allow_pickle)
        model_b = load_model(b, allow_pickle=allow_pickle)
        loader, example = None, None
        if data is not None:
            splits = load_cli_data(data, seed=seed, root=data_root)
            loader = splits.loader("train", batch_size, shuffle=True, seed=seed)
        else:
            example = _example_input(model_a)
        options = {}
        if method in ("activation", "corr", "cov"):
            options["max_batches"] = batches
        if method == "ste":
            options["max_steps"] = batches
        aligned, _, summary = align_models(
            model_a, model_b, method, loader=loader, seed=seed, example_input=example,
            max_iter=max_iter, restarts=restarts, **options)
        save_model(aligned, out, metadata={"aligned_to": a, "source": b, "method": method,
                                           "seed": seed})
        rows = [[g["name"], g["size"], g["moved"]] for g in summary["groups"]]
        console.print(table(f"align {b} -> {a} ({method})", ["group", "units", "moved"], rows))
        rows = [["weight objective <A, B>", summary["weight_objective_before"],
                 summary["weight_objective_after"]]]
        if summary["objective_before"] is not None and method != "weight":
            rows.append([f"{method} objective", summary["objective_before"],
                         summary["objective_after"]])
        console.print(table("objective", ["", "before", "after"], rows))
        extra = f", {summary['sweeps']} sweeps" if summary.get("sweeps") else ""
        console.print(f"{len(summary['groups'])} groups, {summary['time_s']:.2f} s"
                      f"{extra}; saved {out}")
