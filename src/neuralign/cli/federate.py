"""``neuralign federate``: federated learning on Flower (FedAvg, FedProx, FedPFN, FedPNU, FedMA)."""

from __future__ import annotations

import json

import typer

from neuralign.cli._common import (
    DEVICE_OPT,
    FORCE_OPT,
    JSON_OPT,
    Report,
    dumps,
    fail,
    parse_options,
)
from neuralign.cli._guard import Output, check_outputs
from neuralign.cli._inputs import check_choice, check_data_name, check_device, check_range

ENGINES = ("inprocess", "simulation")
STRATEGY_NAMES = ("fedavg", "fedprox", "fedpfn", "fedpnu", "fedma")


def register(app: typer.Typer) -> None:
    @app.command("federate")
    def federate_cmd(
        strategy: str = typer.Option("fedavg", help=", ".join(STRATEGY_NAMES)),
        clients: int = typer.Option(10, help="number of clients (Dirichlet partitions)"),
        alpha: float = typer.Option(0.1, help="Dirichlet concentration of the label partition "
                                    "(small = heterogeneous)"),
        rounds: int = typer.Option(10, help="communication rounds"),
        data: str = typer.Option("fashion_mnist", help="fashion_mnist, digits or mnist1d"),
        subset: int = typer.Option(0, help="class-balanced training subset (0: all)"),
        test_subset: int = typer.Option(0, help="test subset for the server's evaluation"),
        data_root: str = typer.Option("", help="Fashion-MNIST folder (default location if empty)"),
        model: str = typer.Option("lenet", help="lenet or a neuralign model name (mlp, cnn, ...)"),
        model_option: list[str] = typer.Option(None, "--model-option", "-m",
                                               help="model argument key=value, e.g. width=8"),
        local_epochs: int = typer.Option(1, help="local epochs per round"),
        lr: float = typer.Option(0.03),
        batch_size: int = typer.Option(32),
        seed: int = typer.Option(0, help="seed of the model, partition and data order"),
        data_seed: int = typer.Option(0, "--data-seed", help="seed of the data split"),
        fraction: float = typer.Option(1.0, help="fraction of clients sampled per round"),
        min_clients: int = typer.Option(0, help="minimum clients per round (0: fraction*clients)"),
        min_replies: int = typer.Option(1, help="minimum results a round needs (else skipped)"),
        proximal_mu: float = typer.Option(0.01, help="FedProx proximal weight"),
        anchor_ratio: float = typer.Option(0.4, help="FedPFN / FedPNU mask ratio rho"),
        engine: str = typer.Option("inprocess", help="inprocess (no Ray) or simulation (Flower's "
                                   "Ray simulation engine)"),
        out: str = typer.Option("", help="write the history here (.json)"),
        save_model: str = typer.Option("", "--save-model", help="save the final global model "
                                       "(.safetensors)"),
        write_app: str = typer.Option("", help="instead of running, write a Flower App project "
                                      "for the deployment engine into this directory"),
        verbose: bool = typer.Option(False, help="show Flower's per-round log"),
        device: str = DEVICE_OPT,
        force: bool = FORCE_OPT,
        json_: bool = JSON_OPT,
    ) -> None:
        """Run federated learning locally, or write a Flower App for SuperLink/SuperNodes."""
        rep = Report(json_)
        strategy = check_choice(strategy, STRATEGY_NAMES, "--strategy")
        engine = check_choice(engine, ENGINES, "--engine")
        check_data_name(data)
        if ":" in data:
            fail("federate takes a built-in data set (fashion_mnist, digits, mnist1d)")
        for v, flag in ((clients, "--clients"), (rounds, "--rounds"),
                        (local_epochs, "--local-epochs"), (batch_size, "--batch-size"),
                        (min_replies, "--min-replies")):
            check_range(v, flag, lo=1)
        for v, flag in ((subset, "--subset"), (test_subset, "--test-subset"),
                        (min_clients, "--min-clients"), (proximal_mu, "--proximal-mu")):
            check_range(v, flag, lo=0)
        check_range(alpha, "--alpha", lo=0, lo_open=True)
        check_range(lr, "--lr", lo=0, lo_open=True)
        check_range(fraction, "--fraction", lo=0, hi=1, lo_open=True)
        check_range(anchor_ratio, "--anchor-ratio", lo=0, hi=1)
        if min_clients > clients:
            fail(f"--min-clients {min_clients} is more than --clients {clients}")
        check_device(device)
        if device and device != "cpu":
            fail("federate runs its clients on the CPU; --device cpu only")
        model_kwargs = parse_options(model_option, flag="-m/--model-option")
        check_outputs([Output("--out", out, "json"), Output("--save-model", save_model, "model", "federate"),
                       Output("--write-app", write_app, "dir")], [data_root] if data_root
                      else [], force=force)
        with rep.running():
            _run(rep, strategy, clients, alpha, rounds, data, subset, test_subset, data_root,
                 model, model_kwargs, local_epochs, lr, batch_size, seed, data_seed, fraction,
                 min_clients, min_replies, proximal_mu, anchor_ratio, engine, out, save_model,
                 write_app, verbose)


def _run(rep, strategy, clients, alpha, rounds, data, subset, test_subset, data_root, model,
         model_kwargs, local_epochs, lr, batch_size, seed, data_seed, fraction, min_clients,
         min_replies, proximal_mu, anchor_ratio, engine, out, save_model, write_app,
         verbose) -> None:
    import dataclasses
    import sys

    from neuralign.federated import FedTask, server
    from neuralign.federated.runner import build_run_config, run_federated

    fields = {f.name for f in dataclasses.fields(FedTask)}
    extra = {"data_seed": data_seed} if "data_seed" in fields else {}
    task = FedTask(dataset=data, subset=subset, test_subset=test_subset, data_root=data_root,
                   num_partitions=clients, alpha=alpha, model=model,
                   model_kwargs=json.dumps(model_kwargs), seed=seed, batch_size=batch_size,
                   local_epochs=local_epochs, lr=lr, **extra)
    options = dict(fraction=fraction, min_clients=min_clients or None, min_replies=min_replies,
                   proximal_mu=proximal_mu, anchor_ratio=anchor_ratio, anchor_seed=seed)
    if write_app:
        from neuralign.federated.deploy import write_flower_app

        path = write_flower_app(write_app, build_run_config(task, strategy, rounds, **options))
        rep.note(f"wrote {path}; start a SuperLink and {clients} SuperNodes (see "
                 f"docs/federated.md), then: flwr run {write_app} <connection>")
        rep.data.update(wrote=str(path))
        return

    def show(r, metrics):
        if "accuracy" in metrics:
            text = f"accuracy {metrics['accuracy']:.4f}, loss {metrics['loss']:.4f}"
        else:  # FedMA mid-pass
            text = f"matched layer {metrics.get('layer')} (width {metrics.get('width')})"
        print(f"round {r}/{rounds}: {text}", file=sys.stderr, flush=True)

    server.ROUND_HOOKS.append(show)
    try:
        hist = run_federated(task, strategy, rounds, engine=engine, verbose=verbose,
                             save_model=save_model or None, **options)
    finally:
        server.ROUND_HOOKS.remove(show)
    rows = [[r, a, lo] for r, a, lo in zip(hist["round"], hist["accuracy"], hist["loss"])]
    rep.table(f"{strategy} | {clients} clients | Dirichlet alpha={alpha} | {data}",
              ["round", "test accuracy", "test loss"], rows)
    rep.note(f"final accuracy {hist['final_accuracy']:.4f}, best "
             f"{hist['best_accuracy']:.4f} ({hist['seconds']:.1f} s)")
    for r, notes in hist["failures"].items():
        rep.note(f"round {r}: {len(notes)} client(s) failed: " + "; ".join(notes))
    if out:
        from neuralign.cli._guard import write_text_atomic

        write_text_atomic(out, dumps(hist))
        rep.note(f"wrote {out}")
    rep.data.update({k: v for k, v in hist.items() if not k.startswith("_")})
