"""Server side: the Flower ``ServerApp`` and the round loop shared by every engine.

Run config keys read by the ServerApp (besides the ``task.*`` keys of :class:`FedTask`):
``strategy`` (fedavg | fedprox | fedpfn | fedpnu | fedma), ``num-rounds``, ``fraction``,
``min-clients`` (a round waits for this many nodes, at most ``node-timeout`` seconds),
``min-replies`` (fewer results skip the round), ``round-timeout`` (seconds a round waits for
replies), ``proximal-mu``, ``anchor-ratio``, ``anchor-seed``, ``checkpoint-dir`` (a checkpoint
after every round), ``resume`` (continue from it), ``init`` (a .safetensors to start from),
``save-model`` (a .safetensors path for the final global model), and FedMA's
``fedma-threshold`` / ``fedma-max-growth`` / ``fedma-matcher``. Every key is checked before the
run starts (:mod:`neuralign.federated.validate`).
"""

from __future__ import annotations

import json
import math
import time
from pathlib import Path

from neuralign.federated.checkpoint import json_safe
from neuralign.federated.task import FedTask
from neuralign.train import evaluate

LAST_RESULT: dict = {}  # the history of the last ServerApp run in this process
# Called as hook(round, {"accuracy": ..., "loss": ...}) after every central evaluation (the CLI
# prints each round with it).
ROUND_HOOKS: list = []


def central_evaluator(task: FedTask):
    """``evaluate_fn(round, arrays) -> MetricRecord`` on the task's test set."""
    from flwr.app import MetricRecord

    from neuralign.federated.client import model_from_arrays

    loader = task.test_loader()

    def evaluate_fn(server_round: int, arrays):
        model = model_from_arrays(task, arrays)
        ev = evaluate(model, loader)
        metrics = {"accuracy": float(ev["accuracy"]), "loss": float(ev["loss"])}
        for hook in tuple(ROUND_HOOKS):
            hook(server_round, dict(metrics))
        return MetricRecord(metrics)

    return evaluate_fn


def _flag(cfg, key) -> bool:
    from neuralign.federated.validate import _flag as flag

    return flag(cfg, key)


def prepare_model(task: FedTask, run_config: dict):
    """The initial global model: the task's, or ``init``'s weights when they fit it."""
    model = task.build_model()
    init = str(run_config.get("init", ""))
    if init:
        from neuralign.federated.checkpoint import load_init

        model.load_state_dict(load_init(init, model))
    return model


def run_server(grid, run_config: dict) -> dict:
    """Run the configured strategy on ``grid``; return the history (also written to
    ``task.output`` when set). Checks every setting first (one-line errors); raises when every
    round failed (the history is still written)."""
    from flwr.app import ArrayRecord

    from neuralign.federated.strategies import make_strategy
    from neuralign.federated.validate import (
        check_partitions,
        check_run_config,
        default_min_clients,
    )

    run_config = dict(run_config)
    check_run_config(run_config)
    task = FedTask.from_run_config(run_config)
    if task.client_data == "partition":
        check_partitions(task)
    name = str(run_config.get("strategy", "fedavg")).lower()
    rounds = int(run_config.get("num-rounds", 3))
    timeout = float(run_config.get("round-timeout", 600))
    node_timeout = float(run_config.get("node-timeout", 0))
    min_clients = int(run_config.get("min-clients", 0)) or None
    min_replies = int(run_config.get("min-replies", 1))
    fraction = float(run_config.get("fraction", 1.0))
    ckpt_dir = str(run_config.get("checkpoint-dir", ""))
    if ckpt_dir and not _flag(run_config, "resume"):
        from neuralign.federated.checkpoint import check_fresh

        check_fresh(ckpt_dir)
    model = prepare_model(task, run_config)
    t0 = time.time()
    strategy = make_strategy(
        name, num_clients=task.num_partitions, fraction=fraction,
        min_clients=min_clients, min_replies=min_replies,
        proximal_mu=float(run_config.get("proximal-mu", 0.01)),
        anchor_ratio=float(run_config.get("anchor-ratio", 0.4)),
        anchor_seed=int(run_config.get("anchor-seed", task.seed)), model=model)
    evaluate_fn = central_evaluator(task)
    train_config = {"local-epochs": task.local_epochs, "lr": task.lr}
    if name == "fedma":
        hist = _run_fedma(grid, task, model, strategy, rounds, train_config, evaluate_fn,
                          timeout, run_config)
    else:
        from neuralign.federated import checkpoint
        from neuralign.federated import rounds as loop

        resumed = checkpoint.read_checkpoint(ckpt_dir, run_config) \
            if ckpt_dir and _flag(run_config, "resume") else None
        if resumed is not None:
            sd, hist = resumed
            model.load_state_dict(sd)
            hist.setdefault("resumed_at", []).append(int(hist["round"][-1]))
            t0 -= float(hist.get("seconds", 0.0))
        else:
            ev0 = evaluate_fn(0, ArrayRecord(model.state_dict()))
            hist = loop.new_history(ev0["accuracy"], ev0["loss"])

        def on_round(r, arrays, h):
            if ckpt_dir:
                h["seconds"] = time.time() - t0
                checkpoint.write_checkpoint(ckpt_dir, _model(task, arrays), h, run_config)

        m = default_min_clients(task.num_partitions, fraction, min_clients)
        hist["_final_arrays"] = loop.run_rounds(
            strategy, grid, ArrayRecord(model.state_dict()), hist,
            first_round=int(hist["round"][-1]) + 1, num_rounds=rounds, timeout=timeout,
            node_timeout=node_timeout, seed=task.seed, fraction=fraction, min_clients=m,
            min_replies=min_replies, train_config=train_config, evaluate_fn=evaluate_fn,
            on_round=on_round)
    hist.update(strategy=name, rounds=rounds, seconds=time.time() - t0, finished=True,
                task=task.to_run_config())
    accs = [a for a in hist["accuracy"][1:] if not math.isnan(a)]
    hist["final_accuracy"] = hist["accuracy"][-1]
    hist["best_accuracy"] = max(accs) if accs else float("nan")
    ran = hist["round"][1:]
    all_failed = bool(ran) and all(r in hist.get("skipped", []) for r in ran) \
        and name != "fedma"
    final = hist.pop("_final_arrays", None)
    save = str(run_config.get("save-model", ""))
    if save and final is not None and not all_failed:
        from neuralign.io import save_model

        meta = {"command": "federate", "data": task.dataset,
                "data_seed": getattr(task, "data_seed", 0), "seed": task.seed,
                "federated": {k: v for k, v in hist.items() if k != "task"}}
        save_model(_model(task, final), save, metadata=json_safe(meta))
    if all_failed:
        hist["finished"] = False
    LAST_RESULT.clear()
    LAST_RESULT.update(hist)
    if task.output:
        from neuralign.io import atomic_write

        text = json.dumps(json_safe(hist), indent=1, allow_nan=False)
        atomic_write(task.output, lambda tmp: Path(tmp).write_text(text))
    if all_failed:
        from neuralign.errors import NeuralignError

        first = next(iter(hist["failures"].values()), ["?"])
        raise NeuralignError(f"every round failed ({len(ran)} of {len(ran)}); nothing was "
                             f"trained{' or saved' if save else ''}. Round {ran[0]}: "
                             f"{first[0][:300]}")
    return hist


def _model(task, arrays):
    from neuralign.federated.client import model_from_arrays

    return model_from_arrays(task, arrays)


def _run_fedma(grid, task, model, strategy, rounds, train_config, evaluate_fn, timeout,
               run_config) -> dict:
    from flwr.app import ConfigRecord

    from neuralign.errors import NeuralignError
    from neuralign.federated.fedma import run_fedma

    if _flag(run_config, "resume"):
        raise NeuralignError("--resume is not supported for fedma (its passes keep per-client "
                             "models between rounds); rerun it, or use --init")
    strategy.threshold = float(run_config.get("fedma-threshold", strategy.threshold))
    strategy.max_growth = float(run_config.get("fedma-max-growth", strategy.max_growth))
    strategy.matcher = str(run_config.get("fedma-matcher", strategy.matcher))
    if strategy.matcher not in ("merge", "own"):
        raise NeuralignError("fedma-matcher must be 'merge' or 'own', got "
                             f"{strategy.matcher!r}")
    return run_fedma(grid, task, model, strategy, rounds, ConfigRecord(train_config),
                     evaluate_fn, timeout)


def make_server_app(run_config: dict | None = None):
    """The Flower ``ServerApp`` (Message API) whose ``main`` runs :func:`run_server` with the
    context's run config (extended by ``run_config`` when given)."""
    from flwr.serverapp import ServerApp

    app = ServerApp()
    extra = dict(run_config or {})

    @app.main()
    def _main(grid, context) -> None:
        run_server(grid, {**dict(context.run_config), **extra})

    return app
