"""One call to run a federated experiment on one machine.

``engine="inprocess"`` (default) runs the ServerApp's round loop against a :class:`LocalGrid`
that calls the ClientApp in this process; ``engine="simulation"`` uses Flower's simulation
engine (Ray backend, one worker per CPU) with the very same ServerApp / ClientApp.
"""

from __future__ import annotations

import dataclasses

from neuralign.errors import NeuralignError
from neuralign.federated.task import FedTask


def build_run_config(task: FedTask, strategy: str, rounds: int, **options) -> dict:
    cfg = dict(task.to_run_config())
    cfg.update({"strategy": strategy, "num-rounds": int(rounds)})
    for k, v in options.items():
        if v is not None:
            cfg[k.replace("_", "-")] = v
    return cfg


def run_federated(task: FedTask | None = None, strategy: str = "fedavg", rounds: int = 3, *,
                  engine: str = "inprocess", client_timeout: float | None = None,
                  fraction: float = 1.0, min_clients: int | None = None, min_replies: int = 1,
                  proximal_mu: float = 0.01, anchor_ratio: float = 0.4,
                  anchor_seed: int | None = None, fedma_threshold: float | None = None,
                  fedma_max_growth: float | None = None, fedma_matcher: str | None = None,
                  save_model: str | None = None,
                  verbose: bool = False, **task_kwargs) -> dict:
    """Run ``rounds`` rounds of ``strategy`` with ``task.num_partitions`` clients.

    Returns the history: ``round``, ``accuracy`` and ``loss`` of the global model on the test
    set after every round (round 0 = initial model), ``final_accuracy``, ``best_accuracy``,
    ``failures`` (per round, the clients that crashed or timed out) and ``participants``.
    ``save_model`` writes the final global model to a ``.safetensors`` file.
    """
    task = task or FedTask()
    if task_kwargs:
        task = dataclasses.replace(task, **task_kwargs)
    cfg = build_run_config(task, strategy, rounds, fraction=fraction, min_clients=min_clients,
                           min_replies=min_replies,
                           proximal_mu=proximal_mu, anchor_ratio=anchor_ratio,
                           anchor_seed=anchor_seed if anchor_seed is not None else task.seed,
                           fedma_threshold=fedma_threshold, fedma_max_growth=fedma_max_growth,
                           fedma_matcher=fedma_matcher, save_model=save_model)
    from neuralign.federated.client import make_client_app
    from neuralign.federated.server import LAST_RESULT, make_server_app, run_server

    _quiet_flower(verbose)

    if engine == "inprocess":
        from neuralign.federated.local_grid import LocalGrid

        if client_timeout is not None:
            cfg["round-timeout"] = float(client_timeout)
        grid = LocalGrid(make_client_app(), task.num_partitions, cfg,
                         client_timeout=client_timeout)
        return run_server(grid, cfg)
    if engine == "simulation":
        from flwr.simulation import run_simulation

        LAST_RESULT.clear()
        server_app, client_app = make_server_app(), make_client_app()
        _with_run_config(server_app, client_app, cfg)
        run_simulation(server_app=server_app, client_app=client_app,
                       num_supernodes=task.num_partitions,
                       backend_config={"client_resources": {"num_cpus": 1, "num_gpus": 0.0},
                                       "init_args": {"num_cpus": 2, "include_dashboard": False}})
        if not LAST_RESULT:
            raise NeuralignError("the Flower simulation finished without a result; see its log")
        return dict(LAST_RESULT)
    raise NeuralignError(f"unknown engine {engine!r}; use 'inprocess' or 'simulation'")


def _with_run_config(server_app, client_app, cfg: dict) -> None:
    """``run_simulation`` has no run-config argument: wrap both apps so that they see ``cfg``
    (through a copy of their ``Context``; Flower forbids modifying ``run_config`` in place)."""
    from flwr.app import Context

    def extended(context):
        return Context(run_id=context.run_id, node_id=context.node_id,
                       node_config=context.node_config, state=context.state,
                       run_config={**dict(context.run_config), **cfg})

    main = server_app._main

    def server_main(grid, context):
        return main(grid, extended(context))

    server_app._main = server_main
    funcs = client_app._registered_funcs
    for key, fn in list(funcs.items()):
        def wrapped(msg, context, fn=fn):
            return fn(msg, extended(context))
        funcs[key] = wrapped

def _quiet_flower(verbose: bool) -> None:
    """Flower logs every round at INFO; keep warnings (client failures) unless verbose."""
    import logging

    from flwr.supercore.logger import FLOWER_LOGGER

    FLOWER_LOGGER.setLevel(logging.DEBUG if verbose else logging.WARNING)
