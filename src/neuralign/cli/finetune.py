"""``neuralign finetune``: any registered fine-tuning strategy, on plain or domain-shift data."""

from __future__ import annotations

from pathlib import Path

import typer

from neuralign.cli import _data, _flow
from neuralign.cli._common import (
    ARCH_OPT,
    DATA_OPT_HELP,
    DATA_ROOT_OPT,
    DATA_SEED_OPT,
    DEVICE_OPT,
    FORCE_OPT,
    JSON_OPT,
    PICKLE_OPT,
    Report,
    fail,
    json_safe,
    parse_options,
)
from neuralign.cli._guard import Output, check_outputs
from neuralign.cli._inputs import (
    check_checkpoint,
    check_choice,
    check_data_name,
    check_device,
    check_range,
)
from neuralign.cli._models import ModelArgs, _check_arch, load_one
from neuralign.cli.train import check_training


def _load_model(spec: str, weights: str | None, model_options: dict, data_kw: dict,
                margs: ModelArgs, device=None):
    """A checkpoint (any format ``load_one`` reads) or a model name for ``get_model``."""
    from neuralign.models import get_model

    if Path(spec).exists():
        if weights:
            fail("--weights is for model names; MODEL is already a checkpoint")
        return load_one(spec, margs, _info(spec), device)
    kw = {**data_kw, **model_options}
    if weights:
        kw["weights"] = weights
    return get_model(spec, **kw)


def _info(path: str) -> dict:
    from neuralign.io import read_info

    return read_info(path)


def _split_list(values: list[str] | None) -> list[str] | None:
    if not values:
        return None
    out = [v.strip() for item in values for v in item.split(",") if v.strip()]
    return out or None


def _outputs(out, weights_out, strategy) -> list[Output]:
    outs = [Output("--out", out, "model", "finetune")]
    if out and strategy == "ensemble":
        stem = out.removesuffix(".safetensors")
        outs = [Output("--out", f"{stem}.member{i}.safetensors", "model", "finetune")
                for i in range(8)]
    if weights_out:
        outs += [Output("--weights-out", weights_out, "json"),
                 Output("--weights-out (plot)", str(Path(weights_out).with_suffix(".png")),
                        "plot")]
    return outs


def register(app: typer.Typer) -> None:
    @app.command("finetune")
    def finetune_cmd(
        model: str = typer.Argument(None, help="a checkpoint (or Hugging Face folder), or a "
                                    "model name (cnn, resnet20, torchvision:resnet50, ...)"),
        strategy: str = typer.Option("full", "--strategy", "-s",
                                     help="a registered strategy (see --list-strategies)"),
        anchor: list[str] = typer.Option(None, "--anchor", help="anchor checkpoint(s) for "
                                         "sherpa; repeat for a weight-averaged soup"),
        option: list[str] = typer.Option(None, "--option", "-o",
                                         help="strategy option key=value (repeatable)"),
        data: str = typer.Option(None, help=DATA_OPT_HELP + ", rotated_fashion_mnist, or a "
                                 "DomainBed folder with --target-domain (default: the "
                                 "checkpoint's, else digits)"),
        data_seed: int = DATA_SEED_OPT,
        source_domains: list[str] = typer.Option(None, "--source-domains", help="source "
                                                 "domains (comma-separated or repeated)"),
        target_domain: str = typer.Option(None, "--target-domain", help="held-out domain "
                                          "(rotated_fashion_mnist or a DomainBed folder)"),
        classes: str = typer.Option(None, help="rotated_fashion_mnist: class ids, e.g. 0,1,2"),
        per_domain: int = typer.Option(None, help="rotated_fashion_mnist: images per domain"),
        epochs: int = typer.Option(_flow.EPOCHS),
        lr: float = typer.Option(_flow.LR),
        batch_size: int = typer.Option(_flow.BATCH_SIZE),
        optimizer: str = typer.Option("sgd", help="sgd, adam or adamw"),
        momentum: float = typer.Option(0.9),
        weight_decay: float = typer.Option(_flow.WEIGHT_DECAY),
        schedule: str = typer.Option("cosine", help="cosine, step, linear or constant"),
        select: str = typer.Option("best_val", help="best_val (training-domain validation) "
                                   "or last"),
        seed: int = typer.Option(0),
        weights: str = typer.Option(None, help="local pre-trained weights for a model name"),
        model_option: list[str] = typer.Option(None, "--model-option", "-m",
                                               help="model argument key=value, e.g. width=8"),
        arch: str = ARCH_OPT,
        allow_pickle: bool = PICKLE_OPT,
        image_size: int = typer.Option(None, help="image size for folder data (default 224)"),
        data_root: str = DATA_ROOT_OPT,
        subset: int = typer.Option(None, help="class-balanced training subset (plain data)"),
        device: str = DEVICE_OPT,
        reset_head: bool = typer.Option(False, "--reset-head", help="always start from a "
                                        "fresh head (a new label set, same class count)"),
        out: str = typer.Option(None, help="where to write the fine-tuned .safetensors"),
        weights_out: str = typer.Option(None, "--weights-out", help="per-layer learning-rate "
                                        "strategies: the chosen layer weights as JSON, and a "
                                        "bar plot beside it (.png)"),
        list_strategies: bool = typer.Option(False, "--list-strategies",
                                             help="list the strategies and their options"),
        force: bool = FORCE_OPT,
        json_: bool = JSON_OPT,
    ) -> None:
        """Fine-tune MODEL with a strategy; report in-distribution and OOD accuracy."""
        rep = Report(json_)
        if list_strategies:
            with rep.running():
                _list(rep)
            return
        if model is None:
            fail("give MODEL (a checkpoint or a model name), or --list-strategies")
        check_training(epochs, lr, batch_size, weight_decay, optimizer, schedule)
        check_choice(select, ("best_val", "last"), "--select")
        check_range(momentum, "--momentum", lo=0, hi=1)
        for v, flag in ((subset, "--subset"), (per_domain, "--per-domain"),
                        (image_size, "--image-size")):
            check_range(v, flag, lo=1)
        check_device(device)
        is_ckpt = Path(model).exists()
        if is_ckpt:
            margs, model_kw = ModelArgs(arch, model_option, allow_pickle), {}
            check_checkpoint(model, allow_pickle=allow_pickle)
        elif model.endswith((".safetensors", ".pt", ".pth", ".bin")):
            fail(f"{model}: no such checkpoint")
        else:
            if arch:
                fail("--arch is for checkpoints; MODEL is already a model name")
            _check_arch(model)
            margs = ModelArgs(None, None, allow_pickle)
            model_kw = parse_options(model_option, flag="-m/--model-option")
        for a in anchor or []:
            check_checkpoint(a, allow_pickle=allow_pickle)
        if weights:
            check_checkpoint(weights, allow_pickle=True)
        if target_domain is None:
            check_data_name(data, extra=("rotated_fashion_mnist",))
        inputs = [p for p in [model if is_ckpt else None, *(anchor or []), weights,
                              data if data and Path(data).exists() else None] if p]
        check_outputs(_outputs(out, weights_out, strategy), inputs, force=force)
        with rep.running():
            _run(rep, model, is_ckpt, margs, model_kw, strategy, anchor, option, data, data_seed,
                 source_domains, target_domain, classes, per_domain, epochs, lr, batch_size,
                 optimizer, momentum, weight_decay, schedule, select, seed, weights, image_size,
                 data_root, subset, device, reset_head, out, weights_out)


def _per_layer(strategy: str) -> bool:
    from neuralign.finetune.api import _REGISTRY

    try:
        from neuralign.finetune.auto_lr.strategies import _PerLayer
    except ImportError:  # pragma: no cover - layout changed: decide after training
        return True
    cls = _REGISTRY.get(strategy)
    return cls is None or issubclass(cls, _PerLayer)


def _list(rep: Report) -> None:
    from neuralign.finetune import list_strategies as names
    from neuralign.finetune.api import _REGISTRY

    rows = [[n, _REGISTRY[n].summary or (_REGISTRY[n].__doc__ or "").strip().split("\n")[0],
             ", ".join(f"{k}={v!r}" for k, v in _REGISTRY[n].defaults.items())]
            for n in names()]
    rep.table("fine-tuning strategies", ["name", "what", "options"], rows)
    rep["strategies"] = [{"name": r[0], "summary": r[1],
                          "options": dict(_REGISTRY[r[0]].defaults)} for r in rows]


def _run(rep, model, is_ckpt, margs, model_kw, strategy, anchor, option, data, data_seed,
         source_domains, target_domain, classes, per_domain, epochs, lr, batch_size, optimizer,
         momentum, weight_decay, schedule, select, seed, weights, image_size, data_root, subset,
         device, reset_head, out, weights_out) -> None:
    from neuralign.cli._inputs import device_available
    from neuralign.evaluation import evaluate
    from neuralign.finetune import finetune
    from neuralign.finetune.api import get_strategy

    device_available(device)
    options = parse_options(option)
    get_strategy(strategy, **options)  # unknown strategy or option: fail before any work
    if weights_out and not _per_layer(strategy):
        fail(f"strategy {strategy!r} chooses no per-layer weights; --weights-out is for "
             "auto_rgn, layerwise_surprise, ... strategies")
    if anchor:
        loaded = [load_one(a, margs, _info(a), device) for a in anchor]
        options["anchor"] = loaded[0] if len(loaded) == 1 else loaded
    info = _info(model) if is_ckpt else {}
    cls_ids = [int(c) for c in classes.split(",")] if classes else None
    if target_domain is not None:
        from neuralign.data.rotated import domain_splits

        data = data or info.get("data") or "rotated_fashion_mnist"
        dseed = data_seed if data_seed is not None else 0
        ds = domain_splits(data, target_domain, source_domains=_split_list(source_domains),
                           seed=dseed, per_domain=per_domain, classes=cls_ids,
                           image_size=image_size or 224, root=data_root)
        train_set, val_set, ood_set, num_classes = ds.train, ds.val, ds.test, ds.num_classes
        title = f"{strategy} on {data}: {', '.join(ds.source_domains)} -> {ds.test_domain}"
        id_name, ood_name = "ID (source val)", f"OOD ({ds.test_domain})"
    else:
        if source_domains:
            fail("--source-domains needs --target-domain")
        dargs = _data.DataArgs(data, data_seed, data_root, image_size, None, subset)
        if data is None and not info.get("data"):
            dargs.data = "digits"
        data, dseed = _data.resolve(dargs, [info], paths=[model])
        sp = _data.load(data, dseed, dargs, model_image_size=_data.model_image_size([info]),
                        tokenizer=_data.tokenizer_for(
                            [model] if is_ckpt else [], [info],
                            margs.arch or (model if model.startswith("hf:") else None)))
        train_set, val_set, ood_set, num_classes = sp.train, sp.val, sp.test, sp.num_classes
        title, id_name, ood_name = f"{strategy} on {data}", "val", "test"
    x0 = train_set[0][0]
    data_kw = {"num_classes": num_classes}
    if x0.is_floating_point():  # images / features (not token ids)
        data_kw["in_channels"] = int(x0.shape[0])
        if x0.dim() == 3:
            data_kw["image_size"] = int(x0.shape[-1])
    net = _load_model(model, weights, model_kw, data_kw, margs, device)
    res = finetune(net, train_set, strategy=strategy, epochs=epochs, lr=lr,
                   num_classes=num_classes, val_data=val_set, seed=seed, device=device,
                   progress=True, batch_size=batch_size, optimizer=optimizer, momentum=momentum,
                   weight_decay=weight_decay, schedule=schedule, select=select,
                   reset_head=True if reset_head else None, **options)
    ev_id = evaluate(res.model, val_set, device=device)
    ev_ood = evaluate(res.model, ood_set, device=device)
    rep.table(title, ["split", "loss", "accuracy"],
              [[id_name, ev_id["loss"], ev_id["accuracy"]],
               [ood_name, ev_ood["loss"], ev_ood["accuracy"]]])
    scalar = (int, float, str, bool)
    simple = {k: v for k, v in res.info.items() if k != "options" and (
        isinstance(v, scalar) or (isinstance(v, list) and len(v) < 20
                                  and all(isinstance(e, scalar) for e in v)))}
    if simple:
        rep.table("strategy details", ["key", "value"], [[k, v] for k, v in simple.items()])
    if weights_out:
        _save_layer_weights(rep, res.info, strategy, weights_out)
    rep.data.update(model=model, strategy=strategy, data=data, data_seed=dseed, seed=seed,
                    id={"name": id_name, **ev_id}, ood={"name": ood_name, **ev_ood},
                    info=json_safe(simple), out=out)
    if out:
        meta = _data.metadata(
            "finetune", data, dseed, seed, None, strategy=strategy,
            options=res.info.get("options"), target_domain=target_domain, epochs=epochs, lr=lr,
            batch_size=batch_size, input_shape=list(x0.shape), num_classes=num_classes,
            id_accuracy=ev_id["accuracy"], ood_accuracy=ev_ood["accuracy"])
        _save(rep, res.model.cpu() if device else res.model, model, out, json_safe(meta))


def _save_layer_weights(rep, info: dict, strategy: str, path: str) -> None:
    from neuralign.cli._common import dumps
    from neuralign.cli._guard import write_text_atomic
    from neuralign.finetune.auto_lr import plot_layer_weights

    weights = info.get("layer_weights")
    if not weights:
        fail(f"strategy {strategy!r} chooses no per-layer weights; "
             "--weights-out is for auto_rgn, layerwise_surprise, ... strategies")
    write_text_atomic(path, dumps({strategy: dict(weights)}))  # 0644, atomic, no NaN
    png = str(Path(path).with_suffix(".png"))
    plot_layer_weights({strategy: weights}, png)
    rep.note(f"saved the layer weights to {path} and {png}")
    rep["layer_weights"] = dict(weights)


def _save(rep, model, source: str, out: str, metadata: dict) -> None:
    from neuralign.finetune.basic import OutputEnsemble
    from neuralign.finetune.levi import LEVI
    from neuralign.io import save_model

    if isinstance(model, LEVI):  # only what was trained, plus a reference to the large model
        from neuralign.finetune.levi_io import save_levi

        ref = source if source and source.endswith(".safetensors") else None
        save_levi(model, out, large_ref=ref, metadata=metadata)
        rep.note(f"saved {out} (LEVI: trained parts only; large model: {ref or 'config'})")
        return

    if isinstance(model, OutputEnsemble):
        stem = out.removesuffix(".safetensors")
        paths = [f"{stem}.member{i}.safetensors" for i in range(len(model.members))]
        for i, (m, p) in enumerate(zip(model.members, paths)):
            save_model(m, p, metadata={**metadata, "ensemble_member": i})
        if len(paths) > 8:
            fail(f"an ensemble of {len(paths)} members: at most 8 are written")
        rep.note(f"saved the {len(paths)} ensemble members as {stem}.member<i>.safetensors")
        return
    save_model(model, out, metadata=metadata)
    rep.note(f"saved {out}")
