"""The round loop every strategy but FedMA's own runs in (instead of Flower's ``Strategy.start``).

It drives a Flower strategy through its public ``configure_train`` / ``aggregate_train`` and adds
what a deployment needs and ``start`` lacks:

* seeded client sampling (round ``r`` samples with ``numpy`` seeded by ``(seed, r)``), so two
  identical runs, and a resumed run, sample the same clients;
* a bounded wait for nodes: Flower's sampler waits forever for ``min_available_nodes``; here a
  round waits at most ``node_timeout`` seconds, then samples the nodes that are online (a lost
  node never stalls the run) and says so;
* replies sorted by node id before aggregation, so the float sums do not depend on arrival order;
* a history of every round (accuracy, loss, failed / missing clients, who was sampled) and a
  callback after each round (the per-round checkpoint).
"""

from __future__ import annotations

import time
from collections.abc import Iterable

import numpy as np
from flwr.serverapp import Grid


class SampledGrid(Grid):
    """A view of ``grid`` that lists only the round's sampled nodes (everything else is the
    underlying grid's)."""

    def __init__(self, grid, node_ids: list[int]):
        self._grid, self._nodes = grid, list(node_ids)

    def set_run(self, run) -> None:
        self._grid.set_run(run)

    @property
    def run(self):
        return self._grid.run

    def create_message(self, content, message_type, dst_node_id, group_id, ttl=None):
        return self._grid.create_message(content, message_type, dst_node_id, group_id, ttl)

    def get_node_ids(self) -> Iterable[int]:
        return list(self._nodes)

    def push_messages(self, messages):
        return self._grid.push_messages(messages)

    def pull_messages(self, message_ids):
        return self._grid.pull_messages(message_ids)

    def send_and_receive(self, messages, *, timeout=None):
        return self._grid.send_and_receive(messages, timeout=timeout)


def sample_nodes(grid, server_round: int, *, seed: int, fraction: float, min_clients: int,
                 node_timeout: float, sleep=time.sleep) -> tuple[list[int], str | None]:
    """The round's sampled node ids (sorted) and a note when fewer than ``min_clients`` nodes
    were online after waiting ``node_timeout`` seconds."""
    deadline = time.monotonic() + node_timeout
    online = sorted(int(n) for n in grid.get_node_ids())
    while len(online) < min_clients and time.monotonic() < deadline:
        sleep(min(1.0, max(deadline - time.monotonic(), 0.0)))
        online = sorted(int(n) for n in grid.get_node_ids())
    k = min(len(online), max(int(len(online) * fraction), min_clients))
    rng = np.random.default_rng([int(seed) & 0xFFFFFFFF, int(server_round)])
    # draw positions, not ids: node ids are unsigned 64-bit and numpy would round them
    sample = sorted(online[int(i)] for i in rng.choice(len(online), size=k, replace=False))
    note = None
    if len(online) < min_clients:
        note = (f"only {len(online)} node(s) online after waiting {node_timeout:g} s for "
                f"min-clients={min_clients}; sampled {k}")
    return sample, note


def _error_line(msg) -> str:
    lines = (msg.error.reason or "").strip().splitlines()
    return lines[-1] if lines else f"error code {msg.error.code}"


def run_rounds(strategy, grid, arrays, hist: dict, *, first_round: int, num_rounds: int,
               timeout: float, node_timeout: float, seed: int, fraction: float,
               min_clients: int, min_replies: int, train_config: dict, evaluate_fn,
               on_round=None):
    """Run rounds ``first_round .. num_rounds`` of ``strategy`` on ``grid`` from ``arrays``,
    appending to ``hist``; returns the final global arrays."""
    from flwr.app import ConfigRecord

    # the sample is drawn here; the strategy must take every node it is shown
    strategy.fraction_train = 1.0
    strategy.min_train_nodes = 1
    strategy.min_available_nodes = 1
    for r in range(first_round, num_rounds + 1):
        sample, note = sample_nodes(grid, r, seed=seed, fraction=fraction,
                                    min_clients=min_clients, node_timeout=node_timeout)
        notes = [note] if note else []
        replies, sent, origin = [], [], {}
        if sample:
            msgs = list(strategy.configure_train(r, arrays, ConfigRecord(dict(train_config)),
                                                 SampledGrid(grid, sample)))
            sent = sorted(m.metadata.dst_node_id for m in msgs)
            replies = list(grid.send_and_receive(msgs, timeout=timeout))
            # the SuperLink answers for a lost node itself (src = the SuperLink's id): find
            # the node from the message the reply answers (ids are set when pushed)
            origin = {m.metadata.message_id: m.metadata.dst_node_id for m in msgs
                      if m.metadata.message_id}

        def node_of(m, origin=origin):
            return origin.get(m.metadata.reply_to_message_id, m.metadata.src_node_id)

        replies.sort(key=node_of)
        got = {node_of(m) for m in replies}
        notes += [f"node {node_of(m)}: error: {_error_line(m)}"
                  for m in replies if m.has_error()]
        notes += [f"node {n}: no reply within round-timeout={timeout:g} s (slow, crashed or "
                  "lost)" for n in sent if n not in got]
        ok = sum(1 for m in replies if not m.has_error())
        agg = None
        if ok >= min_replies:
            agg, _ = strategy.aggregate_train(r, replies)
            good = {f"node {node_of(m)}" for m in replies if not m.has_error()}
            ok, notes = _strategy_report(strategy, r, ok, notes, good)
        if agg is None:
            notes.append(f"round skipped: {ok} result(s) < min-replies={min_replies}; the "
                         "global model is unchanged" if ok < min_replies else
                         "round skipped: the strategy produced no model")
            hist.setdefault("skipped", []).append(r)
        else:
            arrays = agg
        ev = evaluate_fn(r, arrays)
        hist["round"].append(r)
        hist["accuracy"].append(float(ev["accuracy"]))
        hist["loss"].append(float(ev["loss"]))
        hist["participants"][str(r)] = ok
        hist["sampled"][str(r)] = sample
        if notes:
            hist["failures"][str(r)] = notes
        if on_round is not None:
            on_round(r, arrays, hist)
    return arrays


def _strategy_report(strategy, r: int, ok: int, notes: list[str],
                     good: set[str]) -> tuple[int, list[str]]:
    """Add what the strategy itself reports for round ``r`` (neuralign's strategies keep
    ``participants`` / ``failures``): replies it discarded although they were no errors (e.g.
    an anchor mask that does not match) lower the count and get their line. Only notes on the
    nodes in ``good`` (``"node <id>"`` of the error-free replies) are taken: errors and missing
    replies are already noted here, each under its own node."""
    extra = [n for n in getattr(strategy, "failures", {}).get(r, [])
             if n.split(":", 1)[0] in good]
    reported = getattr(strategy, "participants", {}).get(r)
    if reported is not None:
        ok = min(ok, int(reported))
    return ok, notes + extra


def new_history(acc0: float, loss0: float) -> dict:
    return {"round": [0], "accuracy": [float(acc0)], "loss": [float(loss0)], "failures": {},
            "participants": {}, "sampled": {}, "skipped": []}


def client_failures(notes: list[str]) -> int:
    """How many clients a round's notes say failed (not the round-level notes)."""
    return sum(1 for n in notes if n.startswith("node "))
