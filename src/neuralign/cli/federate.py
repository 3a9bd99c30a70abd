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
        round_timeout: float = typer.Option(600.0, help="seconds a round waits for a client's "
                                            "reply; later replies are dropped (in process: "
                                            "each client's budget)"),
        node_timeout: float = typer.Option(120.0, help="seconds a round waits for "
                                           "--min-clients nodes to be online before it samples "
                                           "those that are (deployments)"),
        checkpoint_dir: str = typer.Option("", "--checkpoint-dir", help="write the global model "
                                           "and history here after every round"),
        resume: bool = typer.Option(False, "--resume", help="continue from the last round "
                                    "checkpointed in --checkpoint-dir (same settings)"),
        init: str = typer.Option("", "--init", help="start from this checkpoint of the task's "
                                 "model (.safetensors)"),
        client_data: str = typer.Option("partition", "--client-data", help="partition: each "
                                        "client a Dirichlet partition of --data; node: each "
                                        "SuperNode its own file (data-path in its node config)"),
        write_node_data: str = typer.Option("", "--write-node-data", help="instead of running, "
                                            "write each client's partition as node-<i>.npz "
                                            "into this directory"),
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
        check_range(anchor_ratio, "--anchor-ratio", lo=0, hi=1, hi_open=True)
        check_range(round_timeout, "--round-timeout", lo=0, lo_open=True)
        check_range(node_timeout, "--node-timeout", lo=0)
        client_data = check_choice(client_data, ("partition", "node"), "--client-data")
        if min_clients > clients:
            fail(f"--min-clients {min_clients} is more than --clients {clients}")
        if resume and not checkpoint_dir:
            fail("--resume needs --checkpoint-dir (where the run's checkpoints are)")
        if client_data == "node" and not write_app:
            fail("--client-data node is for deployments (each SuperNode reads its own file); "
                 "use it with --write-app")
        check_device(device)
        if device and device != "cpu":
            fail("federate runs its clients on the CPU; --device cpu only")
        model_kwargs = parse_options(model_option, flag="-m/--model-option")
        if init:
            from neuralign.io.formats import check_exists

            check_exists(init)
        outputs = [Output("--out", out, "json"),
                   Output("--save-model", save_model, "model", "federate"),
                   Output("--write-app", write_app, "dir"),
                   Output("--write-node-data", write_node_data, "dir")]
        if checkpoint_dir and not resume:
            outputs.append(Output("--checkpoint-dir", checkpoint_dir, "dir"))
        inputs = [p for p in (data_root, init) if p]
        if resume and checkpoint_dir:
            inputs.append(checkpoint_dir)
        check_outputs(outputs, inputs, force=force)
        settings = {
            "strategy": strategy, "clients": clients, "alpha": alpha, "rounds": rounds,
            "data": data, "subset": subset, "test_subset": test_subset, "data_root": data_root,
            "model": model, "model_kwargs": model_kwargs, "local_epochs": local_epochs,
            "lr": lr, "batch_size": batch_size, "seed": seed, "data_seed": data_seed,
            "client_data": client_data, "force": force}
        options = {"fraction": fraction, "min_clients": min_clients or None,
                   "min_replies": min_replies, "round_timeout": round_timeout,
                   "node_timeout": node_timeout, "proximal_mu": proximal_mu,
                   "anchor_ratio": anchor_ratio, "anchor_seed": seed,
                   "checkpoint_dir": checkpoint_dir or None, "resume": resume or None,
                   "init": init or None}
        with rep.running():
            _run(rep, settings, options, engine, out, save_model, write_app, write_node_data,
                 verbose)


def _run(rep, settings, options, engine, out, save_model, write_app, write_node_data,
         verbose) -> None:
    import sys
    from pathlib import Path

    from neuralign.federated import FedTask, server
    from neuralign.federated.rounds import client_failures
    from neuralign.federated.runner import build_run_config, check_before_start, run_federated

    st = settings
    task = FedTask(dataset=st["data"], subset=st["subset"], test_subset=st["test_subset"],
                   data_root=st["data_root"], num_partitions=st["clients"], alpha=st["alpha"],
                   model=st["model"], model_kwargs=json.dumps(st["model_kwargs"]),
                   seed=st["seed"], batch_size=st["batch_size"],
                   local_epochs=st["local_epochs"], lr=st["lr"], data_seed=st["data_seed"],
                   client_data=st["client_data"])
    strategy, rounds, clients = st["strategy"], st["rounds"], st["clients"]
    if write_app or write_node_data:
        cfg = build_run_config(task, strategy, rounds, **options)
        check_before_start(task, cfg)
    if write_node_data:
        from neuralign.federated.node_data import write_node_data as write_nodes

        paths = write_nodes(task, write_node_data)
        rep.note(f"wrote {len(paths)} node data files into {write_node_data} (node-0.npz ... "
                 f"node-{len(paths) - 1}.npz); start SuperNode i with --node-config "
                 "'data-path=\".../node-i.npz\"'")
        rep.data.update(wrote_node_data=[str(p) for p in paths])
    if write_app:
        from neuralign.federated.deploy import write_flower_app

        path = write_flower_app(write_app, cfg)
        rep.note(f"wrote {path}; start a SuperLink and {clients} SuperNodes (see "
                 f"docs/federated.md), then: flwr run {write_app} <connection>")
        rep.data.update(wrote=str(path))
    if write_app or write_node_data:
        return

    def show(r, metrics):
        if "accuracy" in metrics:
            text = f"accuracy {metrics['accuracy']:.4f}, loss {metrics['loss']:.4f}"
        else:  # FedMA mid-pass
            text = f"matched layer {metrics.get('layer')} (width {metrics.get('width')})"
        print(f"round {r}/{rounds}: {text}", file=sys.stderr, flush=True)

    ck = options.get("checkpoint_dir")
    if ck and st["force"] and not options.get("resume"):  # --force: a new run replaces it
        from neuralign.federated.checkpoint import CHECKPOINT, HISTORY

        for name in (CHECKPOINT, HISTORY):
            (Path(ck) / name).unlink(missing_ok=True)
    server.ROUND_HOOKS.append(show)
    try:
        hist = run_federated(task, strategy, rounds, engine=engine, verbose=verbose,
                             save_model=save_model or None, **options)
    finally:
        server.ROUND_HOOKS.remove(show)
    rows = [[r, a, lo] for r, a, lo in zip(hist["round"], hist["accuracy"], hist["loss"])]
    rep.table(f"{strategy} | {clients} clients | Dirichlet alpha={st['alpha']} | {st['data']}",
              ["round", "test accuracy", "test loss"], rows)
    rep.note(f"final accuracy {hist['final_accuracy']:.4f}, best "
             f"{hist['best_accuracy']:.4f} ({hist['seconds']:.1f} s)")
    for k in hist.get("resumed_at", []):
        rep.note(f"resumed from the checkpoint of round {k}")
    for r, notes in hist["failures"].items():
        n = client_failures(notes)
        other = [x for x in notes if not x.startswith("node ")]
        nodes = [x for x in notes if x.startswith("node ")]
        if n:
            more = f" (+{n - 1} more)" if n > 1 else ""
            rep.note(f"round {r}: {n} client(s) failed: {nodes[0]}{more}")
        for x in other:
            rep.note(f"round {r}: {x}")
    if out:
        from neuralign.cli._guard import write_text_atomic

        write_text_atomic(out, dumps(hist))
        rep.note(f"wrote {out}")
    rep.data.update({k: v for k, v in hist.items() if not k.startswith("_")})
