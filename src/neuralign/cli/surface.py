"""``neuralign surface A [B C]``: filter-normalised loss surface around A, or the A-B-C plane."""

from __future__ import annotations

import typer

from neuralign.cli._common import console
from neuralign.cli.merge import data_loaders, load_models
from neuralign.errors import NeuralignError


def register(app: typer.Typer) -> None:
    @app.command("surface")
    def surface_cmd(
        checkpoints: list[str] = typer.Argument(..., help="one model (random directions) or three (plane)"),
        data: str = typer.Option("digits"), data_root: str = typer.Option(None),
        dims: int = typer.Option(2, help="1 or 2 (one model only)"),
        steps: int = typer.Option(11), span: float = typer.Option(1.0),
        bn_reset: bool = typer.Option(True, help="reset batch-norm statistics at every point"),
        plot: str = typer.Option(None, help="write the surface to this PNG"),
        seed: int = typer.Option(0), allow_pickle: bool = typer.Option(False),
    ) -> None:
        """Loss surface (Li et al. 2018 filter-normalised directions, or Garipov's three-model plane)."""
        from neuralign.landscape import loss_surface, plane_surface

        if len(checkpoints) not in (1, 3):
            raise NeuralignError("surface takes one checkpoint or three")
        models = load_models(checkpoints, allow_pickle)
        fit, val = data_loaders(data, data_root, seed, fit_batches=4)
        bn = fit if bn_reset else None
        if len(models) == 1:
            s = loss_surface(models[0], val, dims=dims, steps=steps, span=span, seed=seed, bn_loader=bn)
        else:
            s = plane_surface(*models, val, steps=steps, bn_loader=bn)
        console.print(f"loss: min {s.loss.min():.4f}, max {s.loss.max():.4f} over {s.loss.size} points")
        if plot:
            from neuralign.landscape.plots import plot_surface

            plot_surface(s, plot, title=" / ".join(checkpoints))
            console.print(f"wrote {plot}")
