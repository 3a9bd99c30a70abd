"""``neuralign surface A [B C]``: filter-normalised loss surface around A, or the A-B-C plane."""

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
    JSON_OPT,
    MODEL_KW_OPT,
    PICKLE_OPT,
    TEST_DOMAIN_OPT,
    Report,
    fail,
)
from neuralign.cli._inputs import check_range
from neuralign.cli._models import ModelArgs


def register(app: typer.Typer) -> None:
    @app.command("surface")
    def surface_cmd(
        checkpoints: list[str] = typer.Argument(..., help="one model (random directions) or "
                                                "three (plane)"),
        data: str = typer.Option(None, help=DATA_OPT_HELP),
        data_seed: int = DATA_SEED_OPT,
        data_root: str = DATA_ROOT_OPT,
        image_size: int = IMAGE_SIZE_OPT,
        test_domain: str = TEST_DOMAIN_OPT,
        dims: int = typer.Option(2, help="1 or 2 (one model only)"),
        steps: int = typer.Option(11, help="grid points per axis (>= 2)"),
        span: float = typer.Option(1.0, help="coordinates in [-span, span] (> 0)"),
        bn_reset: bool = typer.Option(True, help="reset batch-norm statistics at every point"),
        plot: str = typer.Option(None, help="write the surface to this .png"),
        seed: int = typer.Option(0),
        arch: str = ARCH_OPT,
        model_option: list[str] = MODEL_KW_OPT,
        allow_pickle: bool = PICKLE_OPT,
        device: str = DEVICE_OPT,
        force: bool = FORCE_OPT,
        json_: bool = JSON_OPT,
    ) -> None:
        """Loss surface (Li et al. 2018 filter-normalised directions, or Garipov's plane)."""
        rep = Report(json_)
        if len(checkpoints) not in (1, 3):
            fail("surface takes one checkpoint or three")
        if dims not in (1, 2):
            fail(f"--dims must be 1 or 2, got {dims}")
        check_range(steps, "--steps", lo=2)
        check_range(span, "--span", lo=0, lo_open=True)
        margs = ModelArgs(arch, model_option, allow_pickle)
        dargs = _data.DataArgs(data, data_seed, data_root, image_size, test_domain)
        _flow.prepare(checkpoints, margs, dargs, [_flow.plot_output(plot)], force=force,
                      device=device)
        with rep.running():
            from neuralign.landscape import loss_surface, plane_surface

            inp = _flow.open_inputs(checkpoints, margs, dargs, device=device)
            fit, val = _flow.loaders(inp, fit_batches=4)
            bn = fit if bn_reset else None
            if len(inp.models) == 1:
                s = loss_surface(inp.models[0], val, dims=dims, steps=steps, span=span,
                                 seed=seed, bn_loader=bn)
            else:
                s = plane_surface(*inp.models, val, steps=steps, bn_loader=bn)
            import numpy as np

            loss = np.asarray(s.loss, dtype=float)
            if not np.isfinite(loss).all():
                from neuralign.cli._common import warn

                warn(f"{int((~np.isfinite(loss)).sum())} of {loss.size} points have a "
                     "non-finite loss (the span leaves the region where the model computes)")
            rep.note(f"loss: min {np.nanmin(loss):.4f}, max {np.nanmax(loss):.4f} over "
                     f"{loss.size} points")
            if plot:
                from neuralign.landscape.plots import plot_surface

                plot_surface(s, plot, title=" / ".join(checkpoints))
                rep.note(f"wrote {plot}")
            rep.data.update(checkpoints=list(checkpoints), data=inp.data,
                            data_seed=inp.data_seed, loss=loss.tolist(),
                            coords={k: np.asarray(v).tolist() for k, v in vars(s).items()
                                    if k != "loss" and hasattr(v, "__len__")
                                    and not isinstance(v, str)},
                            min_loss=float(np.nanmin(loss)), max_loss=float(np.nanmax(loss)),
                            plot=plot)
