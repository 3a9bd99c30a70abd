"""``neuralign demo``: the main job on the embedded digits data, in well under a minute.

Trains two MLPs from different seeds, then prints the loss and accuracy along the straight line
between them: naively, and after aligning the second model's neurons to the first's by weight
matching and by activation matching; then the barriers under both definitions.
"""

from __future__ import annotations

import typer

from neuralign.cli._common import console, table


def register(app: typer.Typer) -> None:
    @app.command("demo")
    def demo(
        width: int = typer.Option(512, help="hidden width of the 3-layer MLPs"),
        epochs: int = typer.Option(20),
        points: int = typer.Option(11, help="interpolation points including both ends"),
        seeds: tuple[int, int] = typer.Option((0, 1), help="seeds of the two models"),
    ) -> None:
        """Train two MLPs on digits, align them, and compare naive vs aligned interpolation."""
        import torch

        from neuralign.align import align_models
        from neuralign.data import load_data
        from neuralign.landscape import barrier, interpolation_curve
        from neuralign.models import get_model
        from neuralign.train import evaluate, train

        splits = load_data("digits", seed=0)
        models = []
        for s in seeds:
            torch.manual_seed(s)
            m = get_model("mlp", width=width, depth=3, num_classes=10, image_size=8)
            train(m, splits.loader("train", 64, seed=s), epochs=epochs, lr=0.05,
                  weight_decay=5e-4, seed=s)
            models.append(m)
        a, b = models
        test = splits.loader("test", 512)
        console.print(table("endpoints (digits test set)", ["model", "loss", "accuracy"],
                            [[f"seed {s}", r["loss"], r["accuracy"]] for s, r in
                             zip(seeds, (evaluate(a, test), evaluate(b, test)))]))
        curves = {"naive": interpolation_curve(a, b, test, points)}
        for method, label in (("weight", "weight match"), ("activation", "activation match")):
            b_aligned, _, summary = align_models(a, b, method, loader=splits.loader("train", 256,
                                                                                      shuffle=False))
            curves[label] = interpolation_curve(a, b_aligned, test, points)
        ts = curves["naive"].t
        for metric in ("loss", "accuracy"):
            rows = [[f"{t:.1f}"] + [getattr(c, metric)[i] for c in curves.values()]
                    for i, t in enumerate(ts)]
            console.print(table(f"test {metric} along (1-t)·A + t·B", ["t", *curves], rows))
        console.print(table(
            "barriers (Frankle: max minus endpoint mean; Entezari: max above the chord)",
            ["path", "loss F", "loss E", "acc F", "acc E"],
            [[name] + [barrier(c, k, d) for k in ("loss", "accuracy")
                       for d in ("frankle", "entezari")] for name, c in curves.items()]))
