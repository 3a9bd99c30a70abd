"""``neuralign barrier A B``: the loss/accuracy curve along the straight line and its barriers."""

from __future__ import annotations

import typer

from neuralign.cli._common import console, table
from neuralign.cli.merge import align_to_first, data_loaders, load_models


def register(app: typer.Typer) -> None:
    @app.command("barrier")
    def barrier_cmd(
        a: str = typer.Argument(...), b: str = typer.Argument(...),
        data: str = typer.Option("digits", help="digits, fashion_mnist or mnist1d (validation split)"),
        data_root: str = typer.Option(None),
        align: str = typer.Option("none", help="none, weight, activation or cov"),
        points: int = typer.Option(11, help="points on the curve"),
        repair_: bool = typer.Option(False, "--repair", help="also the curve with REPAIR"),
        bn_reset: bool = typer.Option(True, help="reset batch-norm statistics at every point"),
        fit_batches: int = typer.Option(8),
        plot: str = typer.Option(None, help="write the curves to this PNG"),
        seed: int = typer.Option(0),
        allow_pickle: bool = typer.Option(False),
    ) -> None:
        """Interpolate A -> B and report loss/accuracy barriers (survey Eq. 2 and Eq. 7)."""
        from neuralign.landscape import barrier, interpolation_curve
        from neuralign.merge import repair

        ma, mb = load_models([a, b], allow_pickle)
        fit, val = data_loaders(data, data_root, seed, fit_batches=fit_batches)
        ma, mb = align_to_first([ma, mb], align, fit, seed)
        curves = {"linear": interpolation_curve(ma, mb, val, points, bn_loader=fit if bn_reset else None)}
        if repair_:
            curves["REPAIR"] = interpolation_curve(
                ma, mb, val, points, transform=lambda m, t: repair(ma, mb, m, fit, t) if 0 < t < 1 else m)
        for name, c in curves.items():
            console.print(table(f"{name} interpolation ({align} alignment)", ["t", "loss", "accuracy"],
                                [[t, l, acc] for t, l, acc in zip(c.t, c.loss, c.accuracy)]))
            rows = [[f"{k} ({d})", barrier(c, k, d)] for k in ("loss", "accuracy") for d in ("frankle", "entezari")]
            console.print(table(f"{name} barriers", ["barrier", "value"], rows))
        if plot:
            from neuralign.landscape.plots import plot_curves

            plot_curves(curves, plot, kind="accuracy", title=f"{a} -> {b}")
            console.print(f"wrote {plot}")
