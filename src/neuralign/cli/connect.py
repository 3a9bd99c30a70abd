"""``neuralign connect A B --curve bezier``: fit a low-loss path between two models."""

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
)
from neuralign.cli._inputs import check_choice, check_range
from neuralign.cli._models import ModelArgs
from neuralign.cli.barrier import curve_dict


def register(app: typer.Typer) -> None:
    @app.command("connect")
    def connect_cmd(
        a: str = typer.Argument(...), b: str = typer.Argument(...),
        curve: str = typer.Option("bezier", help="bezier, polychain or autoneb"),
        data: str = typer.Option(None, help=DATA_OPT_HELP),
        data_seed: int = DATA_SEED_OPT,
        data_root: str = DATA_ROOT_OPT,
        image_size: int = IMAGE_SIZE_OPT,
        test_domain: str = TEST_DOMAIN_OPT,
        epochs: int = typer.Option(5, help="bezier/polychain: epochs over the training split"),
        rounds: int = typer.Option(3, help="autoneb: rounds"),
        steps: int = typer.Option(100, help="autoneb: steps per round"),
        lr: float = typer.Option(0.05), points: int = typer.Option(11),
        batch_size: int = typer.Option(_flow.BATCH_SIZE),
        plot: str = typer.Option(None, help="write the loss along both paths to this .png"),
        seed: int = typer.Option(0),
        arch: str = ARCH_OPT,
        model_option: list[str] = MODEL_KW_OPT,
        allow_pickle: bool = PICKLE_OPT,
        device: str = DEVICE_OPT,
        force: bool = FORCE_OPT,
        json_: bool = JSON_OPT,
    ) -> None:
        """Fit a Bezier curve / polygonal chain (Garipov) or AutoNEB path (Draxler)."""
        rep = Report(json_)
        curve = check_choice(curve, ("bezier", "polychain", "autoneb"), "--curve")
        for v, flag in ((epochs, "--epochs"), (rounds, "--rounds"), (steps, "--steps"),
                        (batch_size, "--batch-size")):
            check_range(v, flag, lo=1)
        check_range(points, "--points", lo=3)
        check_range(lr, "--lr", lo=0, lo_open=True)
        margs = ModelArgs(arch, model_option, allow_pickle)
        dargs = _data.DataArgs(data, data_seed, data_root, image_size, test_domain)
        _flow.prepare([a, b], margs, dargs, [_flow.plot_output(plot)], force=force,
                      device=device)
        with rep.running():
            from neuralign.landscape import autoneb, barrier, fit_curve, interpolation_curve

            inp = _flow.open_inputs([a, b], margs, dargs, device=device)
            ma, mb = inp.models
            train = inp.splits.loader("train", batch_size, shuffle=True, seed=seed)
            val = inp.splits.loader("val", _flow.EVAL_BATCH_SIZE, shuffle=False)
            if curve == "autoneb":
                path = autoneb(ma, mb, train, rounds=rounds, steps=steps, lr=lr, seed=seed)
            else:
                path = fit_curve(ma, mb, train, kind=curve, epochs=epochs, lr=lr, seed=seed)
            bn = [x for _, x in zip(range(4), train)] if path.flat.uses_batchnorm() else None
            c = path.evaluate(val, points, bn_loader=bn)
            line = interpolation_curve(ma, mb, val, points, bn_loader=bn)
            rows, result = [], {}
            for name, k in (("line", line), (curve, c)):
                r = {"max_loss": float(max(k.loss)), "loss_barrier": barrier(k),
                     "accuracy_barrier": barrier(k, "accuracy")}
                rows.append([name, r["max_loss"], r["loss_barrier"], r["accuracy_barrier"]])
                result[name] = {**curve_dict(k), **r}
            rep.table("path vs straight line (validation)",
                      ["path", "max loss", "loss barrier", "acc barrier"], rows)
            if plot:
                from neuralign.landscape.plots import plot_curves

                plot_curves({"straight line": line, curve: c}, plot, kind="loss",
                            title=f"{a} -> {b}")
                rep.note(f"wrote {plot}")
            rep.data.update(a=a, b=b, curve=curve, data=inp.data, data_seed=inp.data_seed,
                            paths=result, plot=plot)
