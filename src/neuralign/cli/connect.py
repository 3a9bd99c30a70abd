"""``neuralign connect A B --curve bezier``: fit a low-loss path between two models."""

from __future__ import annotations

import typer

from neuralign.cli._common import console, load_cli_data, table
from neuralign.cli.merge import load_models
from neuralign.errors import NeuralignError


def register(app: typer.Typer) -> None:
    @app.command("connect")
    def connect_cmd(
        a: str = typer.Argument(...), b: str = typer.Argument(...),
        curve: str = typer.Option("bezier", help="bezier, polychain or autoneb"),
        data: str = typer.Option("digits"), data_root: str = typer.Option(None),
        epochs: int = typer.Option(5, help="bezier/polychain: epochs over the training split"),
        rounds: int = typer.Option(3, help="autoneb: rounds"), steps: int = typer.Option(100),
        lr: float = typer.Option(0.05), points: int = typer.Option(11),
        plot: str = typer.Option(None, help="write the loss along both paths to this PNG"),
        seed: int = typer.Option(0), allow_pickle: bool = typer.Option(False),
    ) -> None:
        """Fit a Bezier curve / polygonal chain (Garipov) or AutoNEB path (Draxler) between A and B."""
        from neuralign.landscape import autoneb, barrier, fit_curve, interpolation_curve

        if curve not in ("bezier", "polychain", "autoneb"):
            raise NeuralignError(f"--curve must be bezier, polychain or autoneb, got {curve!r}")
        ma, mb = load_models([a, b], allow_pickle)
        splits = load_cli_data(data, seed=seed, root=data_root)
        train = splits.loader("train", 128, shuffle=True, seed=seed)
        val = splits.loader("val", 256, shuffle=False)
        if curve == "autoneb":
            path = autoneb(ma, mb, train, rounds=rounds, steps=steps, lr=lr, seed=seed)
        else:
            path = fit_curve(ma, mb, train, kind=curve, epochs=epochs, lr=lr, seed=seed)
        bn = [x for _, x in zip(range(4), train)] if path.flat.uses_batchnorm() else None
        c = path.evaluate(val, points, bn_loader=bn)
        line = interpolation_curve(ma, mb, val, points, bn_loader=bn)
        rows = [[name, max(k.loss), barrier(k), barrier(k, "accuracy")] for name, k in (("line", line), (curve, c))]
        console.print(table("path vs straight line (validation)", ["path", "max loss", "loss barrier",
                                                                    "acc barrier"], rows))
        if plot:
            from neuralign.landscape.plots import plot_curves

            plot_curves({"straight line": line, curve: c}, plot, kind="loss", title=f"{a} -> {b}")
            console.print(f"wrote {plot}")
