"""``neuralign finetune``: any registered fine-tuning strategy, on plain or domain-shift data."""

from __future__ import annotations

from pathlib import Path

import typer

from neuralign.cli._common import console, parse_options, table
from neuralign.errors import NeuralignError


def _load_model(spec: str, weights: str | None, model_options: dict, data_kw: dict):
    """A checkpoint path (``.safetensors`` + sidecar) or a model name for ``get_model``."""
    from neuralign.io import load_model
    from neuralign.models import get_model

    if Path(spec).exists():
        if weights:
            raise NeuralignError("--weights is for model names; MODEL is already a checkpoint")
        return load_model(spec)
    if spec.endswith((".safetensors", ".pt", ".pth")):
        raise NeuralignError(f"checkpoint {spec} does not exist")
    kw = {**data_kw, **model_options}
    if weights:
        kw["weights"] = weights
    return get_model(spec, **kw)


def _split_list(values: list[str] | None) -> list[str] | None:
    if not values:
        return None
    out = [v.strip() for item in values for v in item.split(",") if v.strip()]
    return out or None


def register(app: typer.Typer) -> None:
    @app.command("finetune")
    def finetune_cmd(
        model: str = typer.Argument(
            None,
            help="a .safetensors checkpoint, or a model name "
            "(cnn, resnet20, torchvision:resnet50, timm:<name>, ...)",
        ),
        strategy: str = typer.Option(
            "full", "--strategy", "-s", help="a registered strategy (see --list-strategies)"
        ),
        anchor: list[str] = typer.Option(
            None,
            "--anchor",
            help="anchor checkpoint(s) for sherpa; repeat for a weight-averaged soup",
        ),
        option: list[str] = typer.Option(
            None, "--option", "-o", help="strategy option key=value (repeatable)"
        ),
        data: str = typer.Option(
            "digits",
            help="digits, fashion_mnist, mnist1d, "
            "rotated_fashion_mnist, or a DomainBed-layout folder",
        ),
        source_domains: list[str] = typer.Option(
            None,
            "--source-domains",
            help="source domains (comma-separated or repeated); default: all but the target",
        ),
        target_domain: str = typer.Option(
            None, "--target-domain", help="held-out domain (domain data); e.g. rot45 or sketch"
        ),
        classes: str = typer.Option(None, help="rotated_fashion_mnist: class ids, e.g. 0,1,2,3,4"),
        per_domain: int = typer.Option(None, help="rotated_fashion_mnist: images per domain"),
        epochs: int = typer.Option(5),
        lr: float = typer.Option(1e-3),
        batch_size: int = typer.Option(32),
        optimizer: str = typer.Option("sgd"),
        momentum: float = typer.Option(0.9),
        weight_decay: float = typer.Option(0.0),
        schedule: str = typer.Option("cosine", help="cosine, step, linear or constant"),
        select: str = typer.Option(
            "best_val", help="best_val (training-domain validation) or last"
        ),
        seed: int = typer.Option(0),
        weights: str = typer.Option(None, help="local pre-trained weights for a model name"),
        model_option: list[str] = typer.Option(
            None, "--model-option", "-m", help="model argument key=value, e.g. width=8"
        ),
        image_size: int = typer.Option(224, help="image size for folder data"),
        data_root: str = typer.Option(None, help="folder of Fashion-MNIST files"),
        subset: int = typer.Option(None, help="class-balanced training subset (plain data)"),
        device: str = typer.Option(None, help="cpu, cuda, cuda:1 (default: where the model is)"),
        reset_head: bool = typer.Option(
            False, "--reset-head", help="always start from a fresh head (a new label set with "
            "the same number of classes)"
        ),
        out: str = typer.Option(None, help="where to write the fine-tuned .safetensors"),
        weights_out: str = typer.Option(
            None, "--weights-out", help="per-layer learning-rate strategies: write the chosen "
            "layer weights as JSON here, and a bar plot beside it (.png)"
        ),
        list_strategies: bool = typer.Option(
            False, "--list-strategies", help="list the strategies and their options"
        ),
    ) -> None:
        """Fine-tune MODEL with a strategy; report in-distribution and OOD accuracy."""
        from neuralign.finetune import finetune, list_strategies as names
        from neuralign.finetune.api import _REGISTRY

        if list_strategies:
            rows = [
                [
                    n,
                    _REGISTRY[n].summary or (_REGISTRY[n].__doc__ or "").strip().split("\n")[0],
                    ", ".join(f"{k}={v!r}" for k, v in _REGISTRY[n].defaults.items()),
                ]
                for n in names()
            ]
            console.print(table("fine-tuning strategies", ["name", "what", "options"], rows))
            return
        if model is None:
            raise NeuralignError("give MODEL (a checkpoint or a model name), or --list-strategies")
        from neuralign.train import evaluate

        options = parse_options(option)
        if anchor:
            options["anchor"] = anchor[0] if len(anchor) == 1 else list(anchor)
        cls_ids = [int(c) for c in classes.split(",")] if classes else None
        if target_domain is not None:
            from neuralign.data.rotated import domain_splits

            ds = domain_splits(
                data,
                target_domain,
                source_domains=_split_list(source_domains),
                seed=seed,
                per_domain=per_domain,
                classes=cls_ids,
                image_size=image_size,
                root=data_root,
            )
            train_set, val_set, ood_set, num_classes = ds.train, ds.val, ds.test, ds.num_classes
            x0 = train_set[0][0]
            title = f"{strategy} on {data}: {', '.join(ds.source_domains)} -> {ds.test_domain}"
            id_name, ood_name = "ID (source val)", f"OOD ({ds.test_domain})"
        else:
            if source_domains:
                raise NeuralignError("--source-domains needs --target-domain")
            from neuralign.cli._common import load_cli_data

            sp = load_cli_data(data, seed=seed, root=data_root, subset=subset)
            train_set, val_set, ood_set, num_classes = sp.train, sp.val, sp.test, sp.num_classes
            x0 = train_set[0][0]
            title, id_name, ood_name = f"{strategy} on {data}", "val", "test"
        data_kw = {"num_classes": num_classes, "in_channels": int(x0.shape[0])}
        if x0.dim() == 3:
            data_kw["image_size"] = int(x0.shape[-1])
        net = _load_model(model, weights, parse_options(model_option), data_kw)
        res = finetune(
            net,
            train_set,
            strategy=strategy,
            epochs=epochs,
            lr=lr,
            num_classes=num_classes,
            val_data=val_set,
            seed=seed,
            device=device,
            progress=True,
            batch_size=batch_size,
            optimizer=optimizer,
            momentum=momentum,
            weight_decay=weight_decay,
            schedule=schedule,
            select=select,
            reset_head=True if reset_head else None,
            **options,
        )
        ev_id = evaluate(res.model, val_set, device=device)
        ev_ood = evaluate(res.model, ood_set, device=device)
        rows = [
            [id_name, ev_id["loss"], ev_id["accuracy"]],
            [ood_name, ev_ood["loss"], ev_ood["accuracy"]],
        ]
        console.print(table(title, ["split", "loss", "accuracy"], rows))
        scalar = (int, float, str, bool)
        simple = {
            k: v
            for k, v in res.info.items()
            if k != "options"
            and (
                isinstance(v, scalar)
                or (isinstance(v, list) and len(v) < 20 and all(isinstance(e, scalar) for e in v))
            )
        }
        if simple:
            console.print(simple, highlight=False)
        if weights_out:
            _save_layer_weights(res.info, strategy, weights_out)
        if out:
            _save(
                res.model,
                model,
                out,
                {
                    "strategy": strategy,
                    "options": res.info.get("options"),
                    "data": data,
                    "target_domain": target_domain,
                    "seed": seed,
                    "epochs": epochs,
                    "lr": lr,
                    "id_accuracy": ev_id["accuracy"],
                    "ood_accuracy": ev_ood["accuracy"],
                },
            )


def _save_layer_weights(info: dict, strategy: str, path: str) -> None:
    from neuralign.finetune.auto_lr import plot_layer_weights, save_layer_weights

    weights = info.get("layer_weights")
    if not weights:
        raise NeuralignError(f"strategy {strategy!r} chooses no per-layer weights; "
                             "--weights-out is for auto_rgn, layerwise_surprise, ... strategies")
    save_layer_weights({strategy: weights}, path)
    png = str(Path(path).with_suffix(".png"))
    plot_layer_weights({strategy: weights}, png)
    console.print(f"saved the layer weights to {path} and {png}")


def _save(model, source: str, out: str, metadata: dict) -> None:
    from neuralign.finetune.basic import OutputEnsemble
    from neuralign.finetune.levi import LEVI
    from neuralign.io import save_model

    if isinstance(model, LEVI):  # only what was trained, plus a reference to the large model
        from neuralign.finetune.levi_io import save_levi

        ref = source if source and source.endswith(".safetensors") else None
        save_levi(model, out, large_ref=ref, metadata=metadata)
        console.print(f"saved {out} (LEVI: trained parts only; large model: {ref or 'config'})")
        return

    if isinstance(model, OutputEnsemble):
        stem = out[: -len(".safetensors")] if out.endswith(".safetensors") else out
        paths = [f"{stem}.member{i}.safetensors" for i in range(len(model.members))]
        for i, (m, p) in enumerate(zip(model.members, paths)):
            save_model(m, p, metadata={**metadata, "ensemble_member": i})
        console.print(f"saved the {len(paths)} ensemble members as {stem}.member<i>.safetensors")
        return
    save_model(model, out, metadata=metadata)
    console.print(f"saved {out}")
