"""``neuralign train`` and ``neuralign eval``."""

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
    parse_options,
)
from neuralign.cli._guard import check_outputs
from neuralign.cli._inputs import check_choice, check_data_name, check_device, check_range
from neuralign.cli._models import ModelArgs, _check_arch

OPTIMIZERS = ("sgd", "adam", "adamw")
SCHEDULES = ("cosine", "step", "linear", "constant")


def model_kwargs_for(splits, model: str = "") -> dict:
    """Constructor arguments that make ``model`` fit the data's input shape and classes."""
    import math

    x0 = splits.train[0][0]
    if not x0.is_floating_point():  # token ids: the model's own vocabulary and length
        return {"num_classes": splits.num_classes}
    c, *spatial = splits.input_shape
    kw = {"num_classes": splits.num_classes, "in_channels": c}
    if len(spatial) == 2:
        kw["image_size"] = spatial[0]
    if model == "mlp" and len(spatial) != 2:
        kw = {"num_classes": splits.num_classes,
              "in_features": math.prod(splits.input_shape)}
    return kw


def check_training(epochs, lr, batch_size, weight_decay, optimizer, schedule) -> None:
    check_range(epochs, "--epochs", lo=1)
    check_range(lr, "--lr", lo=0, lo_open=True)
    check_range(batch_size, "--batch-size", lo=1)
    check_range(weight_decay, "--weight-decay", lo=0)
    check_choice(optimizer, OPTIMIZERS, "--optimizer")
    check_choice(schedule, SCHEDULES, "--schedule")


def register(app: typer.Typer) -> None:
    @app.command("train")
    def train_cmd(
        model: str = typer.Option("mlp", "--model", "--arch", help="mlp, vgg11, vgg16, resnet20, "
                                  "cnn, torchvision:NAME, timm:NAME"),
        data: str = typer.Option("digits", help=DATA_OPT_HELP),
        out: str = typer.Option(..., help="where to write the .safetensors checkpoint"),
        seed: int = typer.Option(0, help="seed of the initialisation and the data order "
                                 "(the split comes from --data-seed)"),
        data_seed: int = typer.Option(0, "--data-seed", help="seed of the train/val/test split"),
        epochs: int = typer.Option(_flow.EPOCHS),
        lr: float = typer.Option(_flow.LR),
        batch_size: int = typer.Option(_flow.BATCH_SIZE),
        optimizer: str = typer.Option("sgd", help="sgd, adam or adamw"),
        schedule: str = typer.Option("cosine", help="cosine, step, linear or constant"),
        weight_decay: float = typer.Option(_flow.WEIGHT_DECAY),
        data_root: str = DATA_ROOT_OPT,
        image_size: int = IMAGE_SIZE_OPT,
        test_domain: str = TEST_DOMAIN_OPT,
        subset: int = typer.Option(None, help="class-balanced training subset size"),
        model_option: list[str] = typer.Option(None, "--model-option", "-m",
                                               help="model argument key=value, e.g. width=4"),
        device: str = DEVICE_OPT,
        force: bool = FORCE_OPT,
        json_: bool = JSON_OPT,
    ) -> None:
        """Train a model from scratch and save it (one .safetensors file with its record)."""
        rep = Report(json_)
        check_training(epochs, lr, batch_size, weight_decay, optimizer, schedule)
        check_range(subset, "--subset", lo=1)
        check_range(image_size, "--image-size", lo=1)
        check_device(device)
        _check_arch(model)
        opts = parse_options(model_option, flag="-m/--model-option")
        check_data_name(data)
        check_outputs([_flow.model_output("--out", out, "train")], _flow.data_input_paths(data),
                      force=force)
        with rep.running():
            import torch

            from neuralign.cli._inputs import device_available
            from neuralign.evaluation import evaluate
            from neuralign.io import save_model
            from neuralign.models import get_model
            from neuralign.train import train

            device_available(device)
            dargs = _data.DataArgs(data, data_seed, data_root, image_size, test_domain, subset)
            tok = _data.tokenizer_for([], [], model) if model.startswith("hf:") else None
            splits = _data.load(data, data_seed, dargs, tokenizer=tok)
            torch.manual_seed(seed)
            net = get_model(model, **{**model_kwargs_for(splits, model), **opts})
            if device:
                net.to(device)
            from neuralign.cli._models import check_accepts

            x = _data.example_batch(splits)
            check_accepts(net, x.to(device) if device else x, f"--model {model}")
            hist = train(net, splits.loader("train", batch_size, seed=seed), epochs=epochs,
                         lr=lr, optimizer=optimizer, schedule=schedule,
                         weight_decay=weight_decay, seed=seed, device=device)
            ev = {s: evaluate(net, splits.loader(s, _flow.EVAL_BATCH_SIZE), device=device)
                  for s in ("val", "test")}
            meta = _data.metadata("train", data, data_seed, seed, splits, epochs=epochs, lr=lr,
                                  batch_size=batch_size, val=ev["val"], test=ev["test"],
                                  seconds=hist.seconds)
            save_model(net.cpu(), out, metadata=_json_ready(meta))
            rep.table(f"{model} on {data} (seed {seed}, data seed {data_seed})",
                      ["split", "loss", "accuracy"],
                      [[s, ev[s]["loss"], ev[s]["accuracy"]] for s in ("val", "test")])
            rep.note(f"saved {out} ({hist.seconds:.1f} s of training)")
            rep.data.update(out=out, model=model, data=data, data_seed=data_seed, seed=seed,
                            seconds=hist.seconds, **ev)

    @app.command("eval")
    def eval_cmd(
        checkpoint: str = typer.Argument(..., help="a checkpoint: .safetensors (neuralign or "
                                         "plain), .pt/.bin with --allow-pickle, or a Hugging "
                                         "Face model folder"),
        data: str = typer.Option(None, help=DATA_OPT_HELP),
        split: str = typer.Option("test", help="train, val or test"),
        data_seed: int = DATA_SEED_OPT,
        data_root: str = DATA_ROOT_OPT,
        image_size: int = IMAGE_SIZE_OPT,
        test_domain: str = TEST_DOMAIN_OPT,
        batch_size: int = typer.Option(_flow.EVAL_BATCH_SIZE),
        arch: str = ARCH_OPT,
        model_option: list[str] = MODEL_KW_OPT,
        allow_pickle: bool = PICKLE_OPT,
        device: str = DEVICE_OPT,
        json_: bool = JSON_OPT,
    ) -> None:
        """Evaluate a saved model: loss and accuracy on a split of its data."""
        rep = Report(json_)
        check_choice(split, ("train", "val", "test"), "--split")
        check_range(batch_size, "--batch-size", lo=1)
        check_range(image_size, "--image-size", lo=1)
        margs = ModelArgs(arch, model_option, allow_pickle)
        dargs = _data.DataArgs(data, data_seed, data_root, image_size, test_domain)
        _flow.prepare([checkpoint], margs, dargs, device=device)
        with rep.running():
            from neuralign.evaluation import evaluate

            inp = _flow.open_inputs([checkpoint], margs, dargs, device=device)
            _data.warn_if_training_split(split, inp.data, inp.infos, [checkpoint])
            res = evaluate(inp.models[0], inp.splits.loader(split, batch_size), device=device)
            rep.table(f"{checkpoint} on {inp.data}/{split} (data seed {inp.data_seed})",
                      ["metric", "value"], [["loss", res["loss"]], ["accuracy", res["accuracy"]],
                                            ["examples", res["n"]]])
            rep.data.update(checkpoint=checkpoint, data=inp.data, data_seed=inp.data_seed,
                            split=split, **res)


def _json_ready(meta: dict) -> dict:
    from neuralign.cli._common import json_safe

    return json_safe(meta)


__all__ = ["check_training", "fail", "model_kwargs_for", "register"]
