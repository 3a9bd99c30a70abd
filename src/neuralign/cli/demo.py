"""``neuralign demo``: the main job on the embedded digits data, in well under a minute.

Trains two MLPs from different seeds, then prints the loss and accuracy along the straight line
between them: naively, and after aligning the second model's neurons to the first's by weight
matching and by activation matching; then the barriers under both definitions.
"""

from __future__ import annotations

import typer

from neuralign.cli._common import DEVICE_OPT, JSON_OPT, Report
from neuralign.cli._inputs import check_device, check_range


def register(app: typer.Typer) -> None:
    @app.command("demo")
    def demo(
        width: int = typer.Option(512, help="hidden width of the 3-layer MLPs"),
        epochs: int = typer.Option(20),
        points: int = typer.Option(11, help="interpolation points including both ends"),
        seeds: tuple[int, int] = typer.Option((0, 1), help="seeds of the two models"),
        device: str = DEVICE_OPT,
        json_: bool = JSON_OPT,
    ) -> None:
        """Train two MLPs on digits, align them, and compare naive vs aligned interpolation."""
        rep = Report(json_)
        check_range(width, "--width", lo=1)
        check_range(epochs, "--epochs", lo=1)
        check_range(points, "--points", lo=3)
        check_device(device)
        with rep.running():
            _demo(rep, width, epochs, points, seeds, device)


def _demo(rep, width, epochs, points, seeds, device) -> None:
    import inspect

    import torch

    from neuralign.align import align_models
    from neuralign.cli._inputs import device_available
    from neuralign.data import load_data
    from neuralign.evaluation import evaluate
    from neuralign.landscape import barrier, interpolation_curve
    from neuralign.models import get_model
    from neuralign.train import train

    device_available(device)
    kw = {"data_seed": 0} if "data_seed" in inspect.signature(load_data).parameters else {}
    splits = load_data("digits", **kw)
    models = []
    for s in seeds:
        torch.manual_seed(s)
        m = get_model("mlp", width=width, depth=3, num_classes=10, image_size=8)
        train(m, splits.loader("train", 64, seed=s), epochs=epochs, lr=0.05,
              weight_decay=5e-4, seed=s, device=device)
        models.append(m.cpu())
    a, b = models
    test = splits.loader("test", 512)
    ends = [evaluate(a, test), evaluate(b, test)]
    rep.table("endpoints (digits test set)", ["model", "loss", "accuracy"],
              [[f"seed {s}", r["loss"], r["accuracy"]] for s, r in zip(seeds, ends)])
    curves = {"naive": interpolation_curve(a, b, test, points)}
    for method, label in (("weight", "weight match"), ("activation", "activation match")):
        b_aligned, _, _ = align_models(a, b, method,
                                       loader=splits.loader("train", 256, shuffle=False))
        curves[label] = interpolation_curve(a, b_aligned, test, points)
    ts = curves["naive"].t
    for metric in ("loss", "accuracy"):
        rows = [[f"{t:.1f}"] + [getattr(c, metric)[i] for c in curves.values()]
                for i, t in enumerate(ts)]
        rep.table(f"test {metric} along (1-t)·A + t·B", ["t", *curves], rows)
    bars = {name: {f"{k}_{d}": barrier(c, k, d) for k in ("loss", "accuracy")
                   for d in ("frankle", "entezari")} for name, c in curves.items()}
    rep.table("barriers (Frankle: max minus endpoint mean; Entezari: max above the chord)",
              ["path", "loss F", "loss E", "acc F", "acc E"],
              [[name, *b.values()] for name, b in bars.items()])
    rep.data.update(seeds=list(seeds), endpoints=ends, barriers=bars,
                    curves={n: {"t": list(map(float, c.t)), "loss": list(map(float, c.loss)),
                                "accuracy": list(map(float, c.accuracy))}
                            for n, c in curves.items()})
