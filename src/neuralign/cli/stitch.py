"""``neuralign stitch A B``: the stitching penalty of A's prefix -> φ -> B's suffix per layer."""

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


def parse_kinds(text: str) -> list[str]:
    """Comma-separated stitching kinds: affine, rank-K (K >= 1), perm-scale (torch-free)."""
    kinds = [k.strip().lower() for k in text.split(",") if k.strip()]
    if not kinds:
        fail("--kind needs at least one of affine, rank-K (e.g. rank-4), perm-scale")
    for k in kinds:
        if k in ("affine", "perm-scale"):
            continue
        rank = k.split("-", 1)[1] if k.startswith("rank-") else ""
        if not rank.isdigit() or int(rank) < 1:
            fail(f"--kind {k!r}: use affine, rank-K with K >= 1 (e.g. rank-4) or perm-scale")
    if len(set(kinds)) != len(kinds):
        fail(f"--kind {text!r} names a kind twice")
    return kinds


def check_layers(names, models, paths) -> None:
    for path, m in zip(paths, models):
        have = dict(m.named_modules())
        missing = [n for n in names if n not in have]
        if missing:
            fail(f"--layers: {path} has no module {missing[0]!r}")


def register(app: typer.Typer) -> None:
    @app.command("stitch")
    def stitch_cmd(
        a: str = typer.Argument(..., help="the model whose prefix is kept"),
        b: str = typer.Argument(..., help="the model whose suffix is kept"),
        data: str = typer.Option(None, help=DATA_OPT_HELP + " (φ trains on the training split; "
                                 "penalties on the validation split)"),
        data_seed: int = DATA_SEED_OPT,
        data_root: str = DATA_ROOT_OPT,
        image_size: int = IMAGE_SIZE_OPT,
        test_domain: str = TEST_DOMAIN_OPT,
        layers: str = typer.Option(None, help="comma-separated module names to stitch after "
                                   "(default: every block but the last)"),
        kind: str = typer.Option("affine,rank-4,perm-scale", help="comma-separated φ kinds: "
                                 "affine, rank-K, perm-scale"),
        epochs: int = typer.Option(1, help="epochs of φ training (0: least-squares start only)"),
        lr: float = typer.Option(1e-3, help="Adam learning rate of φ"),
        train_batches: int = typer.Option(None, help="training batches per epoch of φ "
                                          "(default: the whole training split)"),
        batch_size: int = typer.Option(128),
        plot: str = typer.Option(None, help="write penalty against depth to this .png"),
        seed: int = typer.Option(0),
        arch: str = ARCH_OPT,
        model_option: list[str] = MODEL_KW_OPT,
        allow_pickle: bool = PICKLE_OPT,
        device: str = DEVICE_OPT,
        force: bool = FORCE_OPT,
        json_: bool = JSON_OPT,
    ) -> None:
        """Stitch A's prefix to B's suffix through a trained φ at each layer; report the
        stitching penalty (mean accuracy of A and B minus the stitched model's)."""
        rep = Report(json_)
        kinds = parse_kinds(kind)
        check_range(epochs, "--epochs", lo=0)
        check_range(lr, "--lr", lo=0.0, lo_open=True)
        check_range(batch_size, "--batch-size", lo=1)
        if train_batches is not None:
            check_range(train_batches, "--train-batches", lo=1)
        names = [n.strip() for n in layers.split(",") if n.strip()] if layers else None
        if layers is not None and not names:
            fail("--layers names no module")
        if device not in (None, "cpu"):
            fail(f"--device {device}: stitch runs on the CPU for now; drop --device")
        device = None
        margs = ModelArgs(arch, model_option, allow_pickle)
        dargs = _data.DataArgs(data, data_seed, data_root, image_size, test_domain)
        _flow.prepare([a, b], margs, dargs, [_flow.plot_output(plot)], force=force,
                      device=device)
        with rep.running():
            from neuralign.landscape.stitching import plot_stitching, stitching_penalties

            inp = _flow.open_inputs([a, b], margs, dargs, device=device)
            if names:
                check_layers(names, inp.models, (a, b))
            train = inp.splits.loader("train", batch_size, shuffle=True, seed=seed)
            if train_batches is not None:
                train = [x for _, x in zip(range(train_batches), train)]
            _, val = _flow.loaders(inp)
            res = stitching_penalties(inp.models[0], inp.models[1], train, layers=names,
                                      kinds=kinds, eval_loader=val, epochs=epochs, lr=lr,
                                      seed=seed)
            rep.table(f"stitching penalty ({inp.data} validation; A {res['accuracy_a']:.4f}, "
                      f"B {res['accuracy_b']:.4f})", ["layer", *kinds],
                      [[ly, *[res["penalty"][k][i] for k in kinds]]
                       for i, ly in enumerate(res["layers"])])
            if plot:
                plot_stitching(res, plot, title=f"{a} -> φ -> {b}")
                rep.note(f"wrote {plot}")
            rep.data.update(a=a, b=b, data=inp.data, data_seed=inp.data_seed, split="val",
                            epochs=epochs, lr=lr, plot=plot, **res)
