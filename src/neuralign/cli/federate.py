"""``neuralign federate``: federated learning on Flower (FedAvg, FedProx, FedPFN, FedPNU, FedMA)."""

from __future__ import annotations

import json

import typer

from neuralign.cli._common import console, parse_options, table


def register(app: typer.Typer) -> None:
    @app.command("federate")
    def federate_cmd(
        strategy: str = typer.Option("fedavg", help="fedavg, fedprox, fedpfn, fedpnu or fedma"),
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
        fraction: float = typer.Option(1.0, help="fraction of clients sampled per round"),
        min_clients: int = typer.Option(0, help="minimum clients per round (0: fraction*clients)"),
        min_replies: int = typer.Option(1, help="minimum results a round needs (else skipped)"),
        proximal_mu: float = typer.Option(0.01, help="FedProx proximal weight"),
        anchor_ratio: float = typer.Option(0.4, help="FedPFN / FedPNU mask ratio rho"),
        engine: str = typer.Option("inprocess", help="inprocess (no Ray) or simulation (Flower's "
                                   "Ray simulation engine)"),
        out: str = typer.Option("", help="write the history (JSON) here"),
        save_model: str = typer.Option("", help="save the final global model (.safetensors)"),
        write_app: str = typer.Option("", help="instead of running, write a Flower App project "
                                      "for the deployment engine into this directory"),
        verbose: bool = typer.Option(False, help="show Flower's per-round log"),
    ) -> None:
        """Run federated learning locally, or write a Flower App for SuperLink/SuperNodes."""
        from neuralign.errors import NeuralignError
        from neuralign.federated import FedTask
        from neuralign.federated.runner import build_run_config, run_federated
        from neuralign.federated.strategies import STRATEGIES

        if strategy.lower() not in STRATEGIES:
            raise NeuralignError(f"unknown strategy {strategy!r}; choose from "
                                 f"{', '.join(STRATEGIES)}")
        task = FedTask(dataset=data, subset=subset, test_subset=test_subset, data_root=data_root,
                       num_partitions=clients, alpha=alpha, model=model,
                       model_kwargs=json.dumps(parse_options(model_option)), seed=seed,
                       batch_size=batch_size, local_epochs=local_epochs, lr=lr)
        options = dict(fraction=fraction, min_clients=min_clients or None, min_replies=min_replies,
                       proximal_mu=proximal_mu, anchor_ratio=anchor_ratio, anchor_seed=seed)
        if write_app:
            from neuralign.federated.deploy import write_flower_app

            path = write_flower_app(write_app, build_run_config(task, strategy.lower(), rounds,
                                                                **options))
            console.print(f"wrote {path}\nstart a SuperLink and {clients} SuperNodes (see "
                          "docs/federated.md), then: flwr run " + write_app + " <connection>")
            return
        hist = run_federated(task, strategy.lower(), rounds, engine=engine, verbose=verbose,
                             save_model=save_model or None, **options)
        rows = [[r, a, lo] for r, a, lo in zip(hist["round"], hist["accuracy"], hist["loss"])]
        console.print(table(f"{strategy} | {clients} clients | Dirichlet alpha={alpha} | {data}",
                            ["round", "test accuracy", "test loss"], rows))
        console.print(f"final accuracy {hist['final_accuracy']:.4f}, best "
                      f"{hist['best_accuracy']:.4f} ({hist['seconds']:.1f} s)")
        for r, notes in hist["failures"].items():
            console.print(f"[yellow]round {r}: {len(notes)} client(s) failed[/]: "
                          + "; ".join(notes))
        if out:
            from pathlib import Path

            Path(out).write_text(json.dumps(hist, indent=1))
            console.print(f"wrote {out}")

