"""FedMA as a Flower strategy, one layer a round.

It runs in neuralign's round loop (:func:`neuralign.federated.rounds.run_rounds`, which
evaluates only the rounds :meth:`FedMA.evaluates` names) like every other strategy, and also
in Flower's own ``Strategy.start`` (which :meth:`FedMA.start` wraps the same way).

A *pass* over a chain of L layers takes L rounds (see :mod:`neuralign.federated.fedma`). At
the start of a pass the strategy takes the round's sampled nodes (under ``Strategy.start`` it
samples ``fraction`` of them itself, at least ``min_train_nodes``, seeded by ``seed`` and the
round), and the same clients carry the pass;
a client that fails sits out the rest of it. Each round sends every client its own model (all
layers below the current one global and frozen), matches the current layer across the
replies and sends the result back. The output layer is weighted per class by the clients'
``class-counts`` (``class_weighting=True``, FedMA's rule) or by their data sizes.

* Only a completed pass yields a global model: the central evaluation runs at those rounds
  only (no accuracy is reported, or repeated, for a mid-pass round).
* When ``num_rounds`` is not a multiple of L, the last round completes its pass by matching
  the remaining layers one after the other without retraining (one-shot matching), so the
  leftover rounds' training is kept and the run ends with a global model.
* ``independent_init=True``: in the first pass every client starts from its own random
  initialisation (as in the FedMA paper) instead of the shared global model.
* Fewer than ``min_replies`` results abandon the pass (reported); the next round starts a new
  pass from the last global model.
"""

from __future__ import annotations

import copy
import math

import numpy as np
import torch
from torch import nn

from neuralign.errors import NeuralignError
from neuralign.federated.fedma import chain_layers, matched_average_step
from neuralign.federated.strategies import _Reporting, fs


class FedMA(_Reporting, fs.FedAvg):
    method = "fedma"

    def __init__(self, model: nn.Module, *, threshold: float = 1.0, max_growth: float = 1.5,
                 iters: int = 3, matcher: str = "merge", independent_init: bool = False,
                 class_weighting: bool = True, seed: int = 0, num_rounds: int | None = None,
                 **kwargs):
        kwargs.setdefault("fraction_evaluate", 0.0)
        super().__init__(**kwargs)
        if matcher not in ("merge", "own"):
            raise NeuralignError(f"fedma matcher must be 'merge' or 'own', got {matcher!r}")
        if max_growth < 1.0:
            raise NeuralignError(f"fedma max_growth must be >= 1, got {max_growth}")
        chain = chain_layers(model)  # refuses normalisation layers before anything starts
        self.template = model
        self.layers = [n for n, _ in chain]
        self.base_width = {n: int(m.weight.shape[0]) for n, m in chain}
        self.threshold, self.max_growth, self.iters = float(threshold), float(max_growth), iters
        self.matcher, self.independent_init = matcher, bool(independent_init)
        self.class_weighting, self.seed = bool(class_weighting), int(seed)
        self.widths: dict[str, int] = {}
        self.one_shot: dict[str, list[str]] = {}
        self.global_widths: dict[str, int] = {}
        self._l = 0
        self._passes = 0
        self._client_sds: dict[int, dict] = {}
        self._complete: set[int] = {0}
        self._num_rounds = num_rounds  # the last round completes its pass (``start`` sets it)
        self._init_reporting()

    # -- the run -------------------------------------------------------------------------------
    def start(self, grid, initial_arrays, num_rounds: int = 3, timeout: float = 3600,
              train_config=None, evaluate_config=None, evaluate_fn=None):
        self._num_rounds = int(num_rounds)
        wrapped = None
        if evaluate_fn is not None:
            def wrapped(server_round, arrays):
                if self.evaluates(server_round):
                    return evaluate_fn(server_round, arrays)
                from neuralign.federated.server import ROUND_HOOKS

                for hook in list(ROUND_HOOKS):  # mid-pass: report the matched layer, no accuracy
                    hook(server_round, self.round_report(server_round))
                return None
        return super().start(grid=grid, initial_arrays=initial_arrays, num_rounds=num_rounds,
                             timeout=timeout, train_config=train_config,
                             evaluate_config=evaluate_config, evaluate_fn=wrapped)

    def evaluates(self, server_round: int) -> bool:
        """Whether ``server_round`` ended with a global model to evaluate (a completed pass, or
        round 0). A round loop other than ``start`` must evaluate only those rounds."""
        return server_round in self._complete

    def round_report(self, server_round: int) -> dict:
        """What a mid-pass round did (no accuracy): the layer it matched and its width."""
        return {"layer": self.layers[(self._l - 1) % len(self.layers)],
                "width": self.widths.get(str(server_round))}

    def _sample(self, grid, server_round: int) -> list[int]:
        nodes = sorted(int(n) for n in grid.get_node_ids())
        need = max(self.min_train_nodes, int(len(nodes) * self.fraction_train), 1)
        if len(nodes) < max(need, self.min_available_nodes):
            raise NeuralignError(f"FedMA round {server_round}: {len(nodes)} node(s) connected, "
                                 f"it needs {max(need, self.min_available_nodes)}")
        rng = np.random.default_rng([self.seed, server_round])
        # draw positions, not ids: node ids are unsigned 64-bit and numpy would round them
        return sorted(nodes[int(i)] for i in rng.choice(len(nodes), size=need, replace=False))

    def _own_init(self, k: int) -> dict:
        """The template re-initialised with its own seed (client ``k`` of the first pass)."""
        model = copy.deepcopy(self.template)
        torch.manual_seed(self.seed * 1_000_003 + 7919 * (k + 1))
        for m in model.modules():
            if m is not model and hasattr(m, "reset_parameters"):
                m.reset_parameters()
        return {k_: v.detach().clone() for k_, v in model.state_dict().items()}

    def configure_train(self, server_round, arrays, config, grid):
        from flwr.app import ArrayRecord, ConfigRecord, Message, MessageType, RecordDict

        if self._l == 0:  # a new pass: sample its clients, each starts from the global model
            glob = arrays.to_torch_state_dict()
            nodes = self._sample(grid, server_round)
            own = self.independent_init and self._passes == 0
            self._client_sds = {n: (self._own_init(k) if own else glob)
                                for k, n in enumerate(nodes)}
        l = self._l
        freeze = ",".join(f"{self.layers[k]}.{p}" for k in range(l) for p in ("weight", "bias")
                          if f"{self.layers[k]}.{p}" in next(iter(self._client_sds.values())))
        msgs = []
        for nid, sd in self._client_sds.items():
            conf = ConfigRecord(dict(config, **{"method": "fedma", "server-round": server_round,
                                                "freeze": freeze}))
            msgs.append(Message(RecordDict({"arrays": ArrayRecord(sd), "config": conf}),
                                dst_node_id=nid, message_type=MessageType.TRAIN,
                                group_id=str(server_round)))
        return self._record_sent(server_round, msgs)

    def aggregate_train(self, server_round, replies):
        from flwr.app import ArrayRecord

        ok = [m for m in self._record_replies(server_round, replies) if not m.has_error()]
        if len(ok) < max(self.min_replies, 1):
            self.failures.setdefault(server_round, []).append(
                f"FedMA pass abandoned: {len(ok)} result(s) < min_replies={self.min_replies}; "
                "the next round starts a new pass from the last global model")
            self._l, self._client_sds = 0, {}
            return None, None
        ids = [m.metadata.src_node_id for m in ok]
        sds = [m.content["arrays"].to_torch_state_dict() for m in ok]
        weights = [float(m.content["metrics"]["num-examples"]) for m in ok]
        cw = self._class_weights(ok) if self.class_weighting else None
        new = self._match(sds, weights, cw, self._l, server_round)
        self._l += 1
        L = len(self.layers)
        if self._l < L and server_round == self._num_rounds:  # leftover rounds: finish the pass
            self.one_shot[str(server_round)] = self.layers[self._l:]
            for k in range(self._l, L):
                new = self._match(new, weights, cw, k, None)
            self._l = L
        self._client_sds = dict(zip(ids, new))  # failed clients sit out the rest of the pass
        if self._l < L:
            return None, None
        self._l, self._passes = 0, self._passes + 1
        self._complete.add(server_round)
        glob = new[0]
        self.global_widths = {n: int(glob[f"{n}.weight"].shape[0]) for n in self.layers}
        return ArrayRecord(glob), None

    def _class_weights(self, replies) -> list[list[float]]:
        rows = []
        for m in replies:
            counts = m.content["metrics"].get("class-counts")
            if counts is None:
                raise NeuralignError(f"node {m.metadata.src_node_id} sent no 'class-counts'; "
                                     "FedMA's per-class output weighting needs them (send them "
                                     "from the ClientApp or use class_weighting=False)")
            rows.append([float(c) for c in counts])
        if len({len(r) for r in rows}) != 1:
            raise NeuralignError("clients sent class-counts of different lengths")
        return rows

    def _match(self, sds, weights, cw, l, server_round):
        name = self.layers[l]
        cap = math.ceil(self.max_growth * self.base_width[name])
        template = self.template if self.matcher == "merge" else None
        new, glob = matched_average_step(
            sds, weights, self.layers, l, threshold=self.threshold, max_width=cap,
            iters=self.iters, template=template,
            class_weights=cw if l == len(self.layers) - 1 else None)
        if server_round is not None:
            self.widths[str(server_round)] = int(glob[f"{name}.weight"].shape[0])
        return new

    def configure_evaluate(self, server_round, arrays, config, grid):
        return []

    def history_extras(self) -> dict:
        return {"widths": dict(self.widths), "global_widths": dict(self.global_widths),
                "one_shot_layers": dict(self.one_shot)}

    def summary(self) -> None:
        from neuralign.federated.strategies import LOG

        LOG.info("\t├──> FedMA: %d layers, fraction %.2f, threshold %.2f, max growth %.2f, "
            "matcher %s, class weighting %s, independent init %s", len(self.layers),
            self.fraction_train, self.threshold, self.max_growth, self.matcher,
            self.class_weighting, self.independent_init)
