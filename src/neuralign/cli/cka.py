"""``neuralign cka A B``: layer × layer CKA between two models."""

from __future__ import annotations

import typer

from neuralign.cli._common import console, table
from neuralign.cli.merge import data_loaders, load_models


def register(app: typer.Typer) -> None:
    @app.command("cka")
    def cka_cmd(
        a: str = typer.Argument(...), b: str = typer.Argument(...),
        data: str = typer.Option("digits"), data_root: str = typer.Option(None),
        kernel: str = typer.Option("linear", help="linear or rbf"),
        examples: int = typer.Option(512, help="examples of the validation split"),
        layers: str = typer.Option(None, help="comma-separated module names (default: the blocks)"),
        plot: str = typer.Option(None, help="write the heat-map to this PNG"),
        seed: int = typer.Option(0), allow_pickle: bool = typer.Option(False),
    ) -> None:
        """CKA (Kornblith et al.) between the layers of A and B on validation data."""
        from neuralign.landscape import layer_cka

        ma, mb = load_models([a, b], allow_pickle)
        _, val = data_loaders(data, data_root, seed)
        names = layers.split(",") if layers else None
        m, la, lb = layer_cka(ma, mb, val, layers_a=names, layers_b=names, kernel=kernel, n_examples=examples)
        console.print(table(f"CKA ({kernel})", ["A \\ B", *lb], [[n, *map(float, row)] for n, row in zip(la, m)]))
        if plot:
            from neuralign.landscape.plots import plot_cka

            plot_cka(m, la, lb, plot, title=f"CKA ({kernel})")
            console.print(f"wrote {plot}")
