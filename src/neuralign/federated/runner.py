"""One call to run a federated experiment on one machine.

``engine="inprocess"`` (default) runs the ServerApp's round loop against a :class:`LocalGrid`
that calls the ClientApp in this process; ``engine="simulation"`` uses Flower's simulation
engine (Ray backend) with the very same ServerApp / ClientApp, started the way Flower 1.42 asks
instead of the deprecated ``run_simulation``: ``flower-superlink --simulation`` and ``flwr run``
(:mod:`neuralign.federated.launch`).
"""

from __future__ import annotations

import dataclasses

from neuralign.errors import NeuralignError
from neuralign.federated.task import FedTask


def build_run_config(task: FedTask, strategy: str, rounds: int, **options) -> dict:
    """The flat Flower run config of a run: ``task.*`` keys (with the model's input shape and
    class count, so nodes with their own data need no data set), ``strategy``, ``num-rounds``
    and every option not None (``min_clients`` -> ``min-clients``)."""
    cfg = dict(task.with_data_shape().to_run_config())
    cfg.update({"task.client-data": task.client_data, "strategy": strategy,
                "num-rounds": int(rounds)})
    for k, v in options.items():
        if v is not None:
            cfg[k.replace("_", "-")] = v
    return cfg


def check_before_start(task: FedTask, cfg: dict) -> None:
    """Every check that needs no client: settings, the partition, ``init``'s fit."""
    from neuralign.federated.validate import check_partitions, check_run_config

    check_run_config(cfg)
    if task.client_data == "partition":
        check_partitions(task)
    if cfg.get("checkpoint-dir") and not cfg.get("resume"):
        from neuralign.federated.checkpoint import check_fresh

        check_fresh(cfg["checkpoint-dir"])
    if cfg.get("init"):
        from neuralign.federated.checkpoint import load_init

        load_init(cfg["init"], task.build_model())


def run_federated(task: FedTask | None = None, strategy: str = "fedavg", rounds: int = 3, *,
                  engine: str = "inprocess", round_timeout: float | None = 600.0,
                  client_timeout: float | None = None, node_timeout: float = 0.0,
                  fraction: float = 1.0, min_clients: int | None = None, min_replies: int = 1,
                  proximal_mu: float = 0.01, anchor_ratio: float = 0.4,
                  anchor_seed: int | None = None, fedma_threshold: float | None = None,
                  fedma_max_growth: float | None = None, fedma_matcher: str | None = None,
                  checkpoint_dir: str | None = None, resume: bool = False,
                  init: str | None = None, save_model: str | None = None,
                  verbose: bool = False, **task_kwargs) -> dict:
    """Run ``rounds`` rounds of ``strategy`` with ``task.num_partitions`` clients.

    Returns the history: ``round``, ``accuracy`` and ``loss`` of the global model on the test
    set after every round (round 0 = initial model), ``final_accuracy``, ``best_accuracy``,
    ``failures`` (per round, the clients that crashed or timed out), ``participants`` (results
    aggregated), ``sampled`` (node ids, seeded by ``task.seed``) and ``skipped`` rounds.

    ``round_timeout``: seconds a round waits for a client (in process: each client's budget;
    a client still running then is dropped; None: no limit in process, 600 s elsewhere). ``node_timeout``: seconds a round waits for
    ``min_clients`` nodes to be online before it samples those that are. ``checkpoint_dir``:
    a checkpoint after every round; ``resume=True`` continues from it. ``init``: a
    ``.safetensors`` state dict of the task's model to start from. ``save_model`` writes the
    final global model. Every setting is checked before anything starts (one-line
    :class:`NeuralignError`); a run in which every round failed raises one too.
    """
    task = task or FedTask()
    if task_kwargs:
        try:
            task = dataclasses.replace(task, **task_kwargs)
        except TypeError as exc:
            raise NeuralignError(f"run_federated: {exc}") from None
    if engine not in ("inprocess", "simulation"):
        raise NeuralignError(f"unknown engine {engine!r}; use 'inprocess' or 'simulation'")
    if client_timeout is not None:
        round_timeout = client_timeout  # the older name
    cfg = build_run_config(task, strategy, rounds, fraction=fraction, min_clients=min_clients,
                           min_replies=min_replies, round_timeout=round_timeout,
                           node_timeout=node_timeout,
                           proximal_mu=proximal_mu, anchor_ratio=anchor_ratio,
                           anchor_seed=anchor_seed if anchor_seed is not None else task.seed,
                           fedma_threshold=fedma_threshold, fedma_max_growth=fedma_max_growth,
                           fedma_matcher=fedma_matcher, checkpoint_dir=checkpoint_dir,
                           resume=bool(resume) or None, init=init, save_model=save_model)
    check_before_start(task, cfg)
    from neuralign.federated.client import make_client_app
    from neuralign.federated.server import LAST_RESULT, run_server

    _quiet_flower(verbose)

    if engine == "inprocess":
        from neuralign.federated.local_grid import LocalGrid

        grid = LocalGrid(make_client_app(), task.num_partitions, cfg,
                         client_timeout=round_timeout)
        return run_server(grid, cfg)
    from neuralign.federated.launch import run_on_simulation_engine

    LAST_RESULT.clear()
    hist = run_on_simulation_engine(cfg, task.num_partitions, verbose=verbose)
    LAST_RESULT.update(hist)
    return hist


def _quiet_flower(verbose: bool) -> None:
    """Flower logs every round at INFO; keep warnings (client failures) unless verbose."""
    import logging

    logging.getLogger("flwr").setLevel(logging.DEBUG if verbose else logging.WARNING)
