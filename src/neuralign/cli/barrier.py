"""``neuralign barrier A B``: the loss/accuracy curve along the straight line and its barriers."""

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
from neuralign.cli._inputs import check_choice, check_range
from neuralign.cli._models import ModelArgs
from neuralign.cli.merge import ALIGN_CHOICES, align_to_first


def curve_dict(c) -> dict:
    return {"t": list(map(float, c.t)), "loss": list(map(float, c.loss)),
            "accuracy": list(map(float, c.accuracy))}


def _per_layer(rep, ma, mb, val, names, points, bn_loader, paths) -> dict:
    """Eq. 24 for every layer: loss and accuracy barriers of the partial merges."""
    from neuralign.landscape.layerwise import partial_merge_barriers

    if names:
        from neuralign.cli.stitch import check_layers

        check_layers(names, (ma, mb), paths)
    res = {kind: partial_merge_barriers(ma, mb, val, layers=names, ts=points, kind=kind,
                                        bn_loader=bn_loader)
           for kind in ("loss", "accuracy")}
    lay = res["loss"].layers
    rep.table("partial-merge barriers (merged through the layer, separate heads after it)",
              ["merged through", "loss barrier", "accuracy barrier"],
              [[ly, res["loss"].barriers[i], res["accuracy"].barriers[i]]
               for i, ly in enumerate(lay)])
    return {"layers": lay, "loss": res["loss"].barriers, "accuracy": res["accuracy"].barriers}


def register(app: typer.Typer) -> None:
    @app.command("barrier")
    def barrier_cmd(
        a: str = typer.Argument(...), b: str = typer.Argument(...),
        data: str = typer.Option(None, help=DATA_OPT_HELP + " (validation split)"),
        data_seed: int = DATA_SEED_OPT,
        data_root: str = DATA_ROOT_OPT,
        image_size: int = IMAGE_SIZE_OPT,
        test_domain: str = TEST_DOMAIN_OPT,
        align: str = typer.Option("none", help="none, weight, activation or cov"),
        points: int = typer.Option(11, help="points on the curve (>= 3)"),
        repair_: bool = typer.Option(False, "--repair", help="also the curve with REPAIR"),
        bn_reset: bool = typer.Option(True, help="reset batch-norm statistics at every point"),
        fit_batches: int = typer.Option(8),
        per_layer: bool = typer.Option(False, "--per-layer", help="also the barrier of every "
                                       "partial merge (merged through layer i, separate heads "
                                       "after it; survey Eq. 24)"),
        layers: str = typer.Option(None, help="--per-layer: comma-separated blocks from input "
                                   "to output covering every parameter (default: the blocks)"),
        plot: str = typer.Option(None, help="write the curves to this .png"),
        seed: int = typer.Option(0),
        arch: str = ARCH_OPT,
        model_option: list[str] = MODEL_KW_OPT,
        allow_pickle: bool = PICKLE_OPT,
        device: str = DEVICE_OPT,
        force: bool = FORCE_OPT,
        json_: bool = JSON_OPT,
    ) -> None:
        """Interpolate A -> B and report loss/accuracy barriers (survey Eq. 2 and Eq. 7)."""
        rep = Report(json_)
        align = check_choice(align, ALIGN_CHOICES, "--align")
        check_range(points, "--points", lo=3)
        check_range(fit_batches, "--fit-batches", lo=1)
        names = [n.strip() for n in layers.split(",") if n.strip()] if layers else None
        if layers is not None and not per_layer:
            fail("--layers goes with --per-layer")
        if layers is not None and not names:
            fail("--layers names no module")
        margs = ModelArgs(arch, model_option, allow_pickle)
        dargs = _data.DataArgs(data, data_seed, data_root, image_size, test_domain)
        _flow.prepare([a, b], margs, dargs, [_flow.plot_output(plot)], force=force,
                      device=device)
        with rep.running():
            from neuralign.landscape import barrier, interpolation_curve
            from neuralign.merge import repair

            inp = _flow.open_inputs([a, b], margs, dargs, device=device)
            fit, val = _flow.loaders(inp, fit_batches=fit_batches)
            ma, mb = align_to_first(inp.models, align, fit, seed)
            curves = {"linear": interpolation_curve(ma, mb, val, points,
                                                    bn_loader=fit if bn_reset else None)}
            if repair_:
                curves["REPAIR"] = interpolation_curve(
                    ma, mb, val, points,
                    transform=lambda m, t: repair(ma, mb, m, fit, t) if 0 < t < 1 else m)
            result = {}
            for name, c in curves.items():
                rep.table(f"{name} interpolation ({align} alignment)", ["t", "loss", "accuracy"],
                          [[t, lo, acc] for t, lo, acc in zip(c.t, c.loss, c.accuracy)])
                bars = {f"{k}_{d}": barrier(c, k, d) for k in ("loss", "accuracy")
                        for d in ("frankle", "entezari")}
                rep.table(f"{name} barriers", ["barrier", "value"],
                          [[k.replace("_", " (") + ")", v] for k, v in bars.items()])
                result[name] = {**curve_dict(c), "barriers": bars}
            per = None
            if per_layer:
                per = _per_layer(rep, ma, mb, val, names, points,
                                                 fit if bn_reset else None, (a, b))
            if plot:
                from neuralign.landscape.plots import plot_curves

                plot_curves(curves, plot, kind="accuracy", title=f"{a} -> {b}")
                rep.note(f"wrote {plot}")
            rep.data.update(a=a, b=b, align=align, data=inp.data, data_seed=inp.data_seed,
                            split="val", curves=result, plot=plot)
            if per is not None:
                rep.data.update(per_layer=per)
