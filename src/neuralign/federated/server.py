"""Server side: the Flower ``ServerApp`` and the round loop shared by every engine.

Run config keys read by the ServerApp (besides the ``task.*`` keys of :class:`FedTask`):
``strategy`` (fedavg | fedprox | fedpfn | fedpnu | fedma), ``num-rounds``, ``fraction``,
``min-clients``, ``min-replies`` (fewer results skip the round),
``proximal-mu``, ``anchor-ratio``, ``anchor-seed``, ``round-timeout``
(seconds a round waits for replies), ``save-model`` (a .safetensors path for the final global
model), and FedMA's ``fedma-threshold`` / ``fedma-max-growth`` / ``fedma-matcher``.
"""

from __future__ import annotations

import json
import math
import os
import time
from pathlib import Path

from neuralign.federated.task import FedTask
from neuralign.train import evaluate

LAST_RESULT: dict = {}  # the history of the last ServerApp run in this process
# Called as hook(round, {"accuracy": ..., "loss": ...}) after every central evaluation (the CLI
# prints each round with it).
ROUND_HOOKS: list = []


def json_safe(obj):
    """``obj`` with NaN/Inf floats as None (FedMA's incomplete passes), so the history file is
    valid JSON."""
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {k: json_safe(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [json_safe(v) for v in obj]
    return obj


def central_evaluator(task: FedTask):
    """``evaluate_fn(round, arrays) -> MetricRecord`` on the task's test set."""
    from flwr.app import MetricRecord

    from neuralign.federated.client import model_from_arrays

    loader = task.test_loader()

    def evaluate_fn(server_round: int, arrays):
        model = model_from_arrays(task, arrays)
        ev = evaluate(model, loader)
        metrics = {"accuracy": float(ev["accuracy"]), "loss": float(ev["loss"])}
        for hook in ROUND_HOOKS:
            hook(server_round, dict(metrics))
        return MetricRecord(metrics)

    return evaluate_fn


def run_server(grid, run_config: dict) -> dict:
    """Run the configured strategy on ``grid``; return the history (also written to
    ``task.output`` when set)."""
    from flwr.app import ArrayRecord, ConfigRecord

    from neuralign.federated.strategies import make_strategy, strategy_options

    task = FedTask.from_run_config(run_config)
    name = str(run_config.get("strategy", "fedavg")).lower()
    rounds = int(run_config.get("num-rounds", 3))
    timeout = float(run_config.get("round-timeout", 3600))
    min_clients = int(run_config.get("min-clients", 0)) or None
    model = task.build_model()
    t0 = time.time()
    strategy = make_strategy(
        name, num_clients=task.num_partitions, fraction=float(run_config.get("fraction", 1.0)),
        min_clients=min_clients, min_replies=int(run_config.get("min-replies", 1)),
        proximal_mu=float(run_config.get("proximal-mu", 0.01)),
        anchor_ratio=float(run_config.get("anchor-ratio", 0.4)),
        anchor_seed=int(run_config.get("anchor-seed", task.seed)), model=model,
        **strategy_options(run_config))
    evaluate_fn = central_evaluator(task)
    train_config = ConfigRecord({"local-epochs": task.local_epochs, "lr": task.lr})
    result = strategy.start(grid=grid, initial_arrays=ArrayRecord(model.state_dict()),
                            num_rounds=rounds, timeout=timeout, train_config=train_config,
                            evaluate_fn=evaluate_fn)
    ev = result.evaluate_metrics_serverapp
    hist = {
        "_final_arrays": result.arrays,
        "round": sorted(ev),
        "accuracy": [float(ev[r]["accuracy"]) for r in sorted(ev)],
        "loss": [float(ev[r]["loss"]) for r in sorted(ev)],
        "failures": {str(k): v for k, v in strategy.failures.items()},
        "participants": {str(k): v for k, v in strategy.participants.items()},
    }
    hist.update(getattr(strategy, "history_extras", dict)())  # FedMA: widths per round
    hist.update(strategy=name, rounds=rounds, seconds=time.time() - t0, finished=True,
                task=task.to_run_config())
    accs = [a for a in hist["accuracy"][1:] if not math.isnan(a)]
    hist["final_accuracy"] = hist["accuracy"][-1]
    hist["best_accuracy"] = max(accs) if accs else float("nan")
    save = str(run_config.get("save-model", ""))
    if save:
        from neuralign.federated.client import model_from_arrays
        from neuralign.io import save_model

        final = hist.pop("_final_arrays", None)
        if final is not None:
            meta = {"command": "federate", "data": task.dataset,
                    "data_seed": getattr(task, "data_seed", 0), "seed": task.seed,
                    "federated": {k: v for k, v in hist.items() if k != "task"}}
            save_model(model_from_arrays(task, final), save, metadata=json_safe(meta))
    hist.pop("_final_arrays", None)
    LAST_RESULT.clear()
    LAST_RESULT.update(hist)
    if task.output:
        out = Path(task.output)
        out.parent.mkdir(parents=True, exist_ok=True)
        tmp = out.with_suffix(out.suffix + ".tmp")
        tmp.write_text(json.dumps(json_safe(hist), indent=1, allow_nan=False))
        os.replace(tmp, out)
    return hist


def make_server_app():
    """The Flower ``ServerApp`` (Message API) whose ``main`` runs :func:`run_server`."""
    from flwr.serverapp import ServerApp

    app = ServerApp()

    @app.main()
    def _main(grid, context) -> None:
        run_server(grid, dict(context.run_config))

    return app
