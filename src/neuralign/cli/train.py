"""``neuralign train`` and ``neuralign eval``."""

from __future__ import annotations

import typer

from neuralign.cli._common import console, load_cli_data, model_kwargs_for, parse_options, table


def register(app: typer.Typer) -> None:
    @app.command("train")
    def train_cmd(
        model: str = typer.Option("mlp", help="mlp, vgg11, vgg16, resnet20, cnn, "
                                  "torchvision:<name>, timm:<name>"),
        data: str = typer.Option("digits", help="digits (embedded), fashion_mnist, mnist1d"),
        out: str = typer.Option(..., help="where to write the .safetensors checkpoint"),
        seed: int = typer.Option(0, help="seed of the initialisation and the data order"),
        epochs: int = typer.Option(10),
        lr: float = typer.Option(0.05),
        batch_size: int = typer.Option(128),
        optimizer: str = typer.Option("sgd", help="sgd, adam or adamw"),
        schedule: str = typer.Option("cosine", help="cosine, step, linear or constant"),
        weight_decay: float = typer.Option(5e-4),
        data_root: str = typer.Option(None, help="folder of the data files (Fashion-MNIST)"),
        subset: int = typer.Option(None, help="class-balanced training subset size"),
        model_option: list[str] = typer.Option(None, "--model-option", "-m",
                                               help="model argument key=value, e.g. width=4"),
    ) -> None:
        """Train a model from scratch and save it (safetensors + JSON sidecar)."""
        import torch

        from neuralign.io import save_model
        from neuralign.models import get_model
        from neuralign.train import evaluate, train

        splits = load_cli_data(data, seed=seed, root=data_root, subset=subset)
        torch.manual_seed(seed)
        net = get_model(model, **model_kwargs_for(splits), **parse_options(model_option))
        hist = train(net, splits.loader("train", batch_size, seed=seed), epochs=epochs, lr=lr,
                     optimizer=optimizer, schedule=schedule, weight_decay=weight_decay, seed=seed)
        val, test = evaluate(net, splits.loader("val")), evaluate(net, splits.loader("test"))
        save_model(net, out, metadata={"data": data, "seed": seed, "epochs": epochs, "lr": lr,
                                       "val": val, "test": test, "seconds": hist.seconds})
        console.print(table(f"{model} on {data} (seed {seed})", ["split", "loss", "accuracy"],
                            [["val", val["loss"], val["accuracy"]],
                             ["test", test["loss"], test["accuracy"]]]))
        console.print(f"saved {out} ({hist.seconds:.1f} s of training)")

    @app.command("eval")
    def eval_cmd(
        checkpoint: str = typer.Argument(..., help="a .safetensors checkpoint"),
        data: str = typer.Option("digits"),
        split: str = typer.Option("test", help="train, val or test"),
        seed: int = typer.Option(0, help="seed of the data split"),
        data_root: str = typer.Option(None),
        allow_pickle: bool = typer.Option(False, help="allow loading a pickle (.pt) file"),
    ) -> None:
        """Evaluate a saved model: loss and accuracy on a split."""
        from neuralign.io import load_model
        from neuralign.train import evaluate

        net = load_model(checkpoint, allow_pickle=allow_pickle)
        splits = load_cli_data(data, seed=seed, root=data_root)
        res = evaluate(net, splits.loader(split))
        console.print(table(f"{checkpoint} on {data}/{split}", ["metric", "value"],
                            [["loss", res["loss"]], ["accuracy", res["accuracy"]],
                             ["examples", res["n"]]]))
