"""Checks on a federated run's settings, done before any model is built or client contacted.

Every engine goes through :func:`check_run_config` (``run_federated``, the CLI, and the ServerApp
of a generated Flower app on the deployment engine), so a bad setting ends in one line naming the
key and the fix, never in a hang (Flower waits forever for more nodes than exist) or in a run in
which every client fails and the global model silently stays at its start.
"""

from __future__ import annotations

import json
import math

from neuralign.errors import NeuralignError

STRATEGY_NAMES = ("fedavg", "fedprox", "fedpfn", "fedpnu", "fedma")
CLIENT_DATA = ("partition", "node")


def _num(cfg, key, default, kind=float):
    v = cfg.get(key, default)
    try:
        if isinstance(v, bool) or (kind is int and isinstance(v, float) and not v.is_integer()):
            raise ValueError
        v = kind(v)
    except (TypeError, ValueError):
        raise NeuralignError(f"{key} must be {'an integer' if kind is int else 'a number'}, "
                             f"got {cfg.get(key)!r}") from None
    if kind is float and not math.isfinite(v):
        raise NeuralignError(f"{key} must be a finite number, got {v}")
    return v


def _need(ok: bool, message: str) -> None:
    if not ok:
        raise NeuralignError(message)


def default_min_clients(num_clients: int, fraction: float, min_clients: int | None) -> int:
    """``min_clients``, or (0 / None) the rounded ``fraction * num_clients``, at least 1."""
    return int(min_clients or max(1, round(fraction * num_clients)))


def expected_sample(num_clients: int, fraction: float, min_clients: int) -> int:
    """How many clients a round samples when all are online."""
    m = default_min_clients(num_clients, fraction, min_clients)
    return min(num_clients, max(int(num_clients * fraction), m))


def check_run_config(cfg) -> None:
    """Raise a one-line :class:`NeuralignError` for the first impossible setting in ``cfg``
    (a Flower run config: ``strategy``, ``num-rounds``, ``task.*`` ...)."""
    strategy = str(cfg.get("strategy", "fedavg")).lower()
    _need(strategy in STRATEGY_NAMES, f"unknown strategy {strategy!r}; choose from "
          f"{', '.join(STRATEGY_NAMES)}")
    _need(_num(cfg, "num-rounds", 3, int) >= 1, "num-rounds (--rounds) must be >= 1")
    n = _num(cfg, "task.num-partitions", 10, int)
    _need(n >= 1, f"the number of clients (--clients, task.num-partitions) must be >= 1, got {n}")
    frac = _num(cfg, "fraction", 1.0)
    _need(0 < frac <= 1, f"fraction (--fraction) must lie in (0, 1], got {frac}")
    mc = _num(cfg, "min-clients", 0, int)
    _need(0 <= mc <= n, f"min-clients (--min-clients) {mc} must lie in [0, {n}] "
          f"(the number of clients)")
    mr = _num(cfg, "min-replies", 1, int)
    k = expected_sample(n, frac, mc)
    _need(1 <= mr <= k, f"min-replies (--min-replies) {mr} must lie in [1, {k}]: a round "
          f"samples {k} of {n} clients (fraction {frac}, min-clients {mc})")
    for key, default in (("task.alpha", 0.1), ("task.lr", 0.05)):
        v = _num(cfg, key, default)
        _need(v > 0, f"{key} (--{key.split('.')[-1]}) must be > 0, got {v}")
    for key in ("task.local-epochs", "task.batch-size"):
        v = _num(cfg, key, 1, int)
        _need(v >= 1, f"{key} (--{key.split('.')[-1]}) must be >= 1, got {v}")
    mom = _num(cfg, "task.momentum", 0.9)
    _need(0 <= mom < 1, f"task.momentum must lie in [0, 1), got {mom}")
    for key in ("task.weight-decay", "proximal-mu", "task.min-partition-size"):
        v = _num(cfg, key, 0)
        _need(v >= 0, f"{key} must be >= 0, got {v}")
    ratio = _num(cfg, "anchor-ratio", 0.4)
    _need(0 <= ratio < 1, f"anchor-ratio (--anchor-ratio) must lie in [0, 1), got {ratio}")
    _need(_num(cfg, "round-timeout", 600) > 0, "round-timeout (--round-timeout) must be > 0 "
          "seconds")
    _need(_num(cfg, "node-timeout", 0) >= 0, "node-timeout (--node-timeout) must be >= 0 seconds")
    mode = str(cfg.get("task.client-data", "partition"))
    _need(mode in CLIENT_DATA, f"task.client-data (--client-data) must be one of "
          f"{CLIENT_DATA}, got {mode!r}")
    try:
        kw = json.loads(str(cfg.get("task.model-kwargs", "{}")) or "{}")
    except json.JSONDecodeError as exc:
        raise NeuralignError(f"task.model-kwargs is not JSON: {exc.msg}") from None
    _need(isinstance(kw, dict), "task.model-kwargs must be a JSON object, e.g. {\"width\": 8}")
    _need(not (_flag(cfg, "resume") and not str(cfg.get("checkpoint-dir", ""))),
          "resume (--resume) needs checkpoint-dir (--checkpoint-dir), where the run's "
          "checkpoints are")


def _flag(cfg, key) -> bool:
    v = cfg.get(key, False)
    if isinstance(v, str):
        return v.strip().lower() in ("1", "true", "yes", "on")
    return bool(v)


def check_partitions(task) -> None:
    """Build the Dirichlet partitions now (cached for the clients), turning the partitioner's
    failure into one line: more clients than the data can give ``min_partition_size`` each."""
    from neuralign.errors import DataError

    try:
        parts = task.partitions()
    except DataError as exc:
        raise NeuralignError(f"cannot split the data for {task.num_partitions} clients: {exc}"
                             ) from None
    except ValueError as exc:  # flwr-datasets gives up sampling a valid partition
        raise NeuralignError(
            f"cannot split the data into {task.num_partitions} Dirichlet(alpha="
            f"{task.alpha}) partitions of at least {task.min_partition_size} samples "
            f"({str(exc).splitlines()[0][:160]}); use fewer clients, a larger alpha or a "
            "smaller min-partition-size") from None
    empty = [i for i, p in enumerate(parts) if len(p) == 0]
    if empty:
        raise NeuralignError(f"clients {empty[:5]} get no data; use fewer clients or a "
                             "larger alpha")
