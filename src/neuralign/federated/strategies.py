"""Server strategies: subclasses of Flower's message-based ``FedAvg``.

* ``FedAvg``   - McMahan et al.; plus a record of failed / timed-out clients per round.
* ``FedProx``  - Flower's FedProx (sends ``proximal-mu``); clients add ``mu/2 ||w - w_g||^2``.
* ``FedPFN``   - every client trains with the same fixed-anchor mask (TNA-PFN, fixed seed for
  the whole run); the server averages and writes the anchor values back bit-exactly.
* ``FedPNU``   - partial neuron update: every round a fresh shared mask (seed = seed + round,
  neuron granularity) picks the neurons that stay fixed in that round; the rest are updated.
* ``FedMA``    - layer-wise matched averaging with changing widths needs its own server loop:
  see :mod:`neuralign.federated.fedma`.
"""

from __future__ import annotations

from collections.abc import Iterable
from logging import WARNING

import torch

from neuralign.errors import NeuralignError


def _flower():
    try:
        from flwr.serverapp import strategy as fs
    except ImportError as exc:  # pragma: no cover
        raise NeuralignError("federated learning needs Flower >= 1.40: "
                             "pip install 'neuralign[fl]'") from exc
    return fs


fs = _flower()


def _drop_evaluate_notice(record) -> bool:
    # Federated (client-side) evaluation is off by design: the server evaluates centrally.
    return "fraction_evaluate is set to 0.0" not in str(record.msg)


def _install_log_filter() -> None:
    from flwr.supercore.logger import FLOWER_LOGGER

    if _drop_evaluate_notice not in FLOWER_LOGGER.filters:
        FLOWER_LOGGER.addFilter(_drop_evaluate_notice)


_install_log_filter()


class _Reporting:
    """Mixin: remember which clients failed (error reply) or never answered, per round."""

    method = "fedavg"

    min_replies = 1

    def _init_reporting(self) -> None:
        self.failures: dict[int, list[str]] = {}
        self.participants: dict[int, int] = {}
        self._sent: dict[int, set[int]] = {}

    def _record_sent(self, server_round: int, messages: Iterable) -> list:
        messages = list(messages)
        self._sent[server_round] = {m.metadata.dst_node_id for m in messages}
        return messages

    def _record_replies(self, server_round: int, replies: Iterable) -> list:
        replies = list(replies)
        sent = self._sent.get(server_round, set())
        got = {m.metadata.src_node_id for m in replies}
        notes = [f"node {m.metadata.src_node_id}: error: "
                 f"{(m.error.reason or '').strip().splitlines()[-1:] or ['?']}"
                 for m in replies if m.has_error()]
        notes += [f"node {n}: no reply (timed out or lost)" for n in sorted(sent - got)]
        ok = sum(1 for m in replies if not m.has_error())
        self.participants[server_round] = ok
        if notes:
            self.failures[server_round] = notes
            from flwr.supercore import log

            log(WARNING, "round %s: %d of %d clients failed; aggregating the other %d",
                server_round, len(notes), len(sent) or len(replies), ok)
        return replies

    def _config(self, config, server_round: int):
        config["method"] = self.method
        return config

    def configure_train(self, server_round, arrays, config, grid):
        config = self._config(config, server_round)
        msgs = super().configure_train(server_round, arrays, config, grid)
        return self._record_sent(server_round, msgs)

    def aggregate_train(self, server_round, replies):
        replies = self._record_replies(server_round, replies)
        ok = sum(1 for m in replies if not m.has_error())
        if ok < self.min_replies:  # too few results: keep the previous global model
            self.failures.setdefault(server_round, []).append(
                f"round skipped: {ok} result(s) < min_replies={self.min_replies}; "
                "the global model is unchanged")
            return None, None
        return super().aggregate_train(server_round, replies)


class FedAvg(_Reporting, fs.FedAvg):
    method = "fedavg"

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self._init_reporting()


class FedProx(_Reporting, fs.FedProx):
    method = "fedprox"

    def __init__(self, proximal_mu: float = 0.01, **kwargs):
        super().__init__(proximal_mu=proximal_mu, **kwargs)
        self._init_reporting()


class FedPFN(_Reporting, fs.FedAvg):
    """FedAvg with fixed neuron anchors shared by all clients for the whole run.

    ``masks`` (name -> bool tensor) lets the server write the anchor values of the previous
    global model back after averaging, so float round-off in the weighted mean never moves
    them; build them with :func:`neuralign.train.anchors.anchor_masks` on the global model.
    """

    method = "fedpfn"

    def __init__(self, anchor_ratio: float = 0.4, anchor_seed: int = 0,
                 granularity: str = "weight", masks: dict | None = None, **kwargs):
        super().__init__(**kwargs)
        if not 0.0 <= anchor_ratio < 1.0:
            raise NeuralignError(f"anchor_ratio must lie in [0, 1), got {anchor_ratio}")
        self.anchor_ratio = anchor_ratio
        self.anchor_seed = anchor_seed
        self.granularity = granularity
        self.masks = masks
        self._last_arrays = None
        self._init_reporting()

    def _round_seed(self, server_round: int) -> int:
        return self.anchor_seed

    def _config(self, config, server_round):
        config = super()._config(config, server_round)
        config["anchor-ratio"] = float(self.anchor_ratio)
        config["anchor-seed"] = int(self._round_seed(server_round))
        config["anchor-granularity"] = self.granularity
        return config

    def configure_train(self, server_round, arrays, config, grid):
        self._last_arrays = arrays
        return super().configure_train(server_round, arrays, config, grid)

    def aggregate_train(self, server_round, replies):
        arrays, metrics = super().aggregate_train(server_round, replies)
        if arrays is not None and self.masks and self._last_arrays is not None:
            arrays = self._restore_anchors(arrays, server_round)
        return arrays, metrics

    def _restore_anchors(self, arrays, server_round):
        from flwr.app import ArrayRecord

        new = arrays.to_torch_state_dict()
        old = self._last_arrays.to_torch_state_dict()
        for name, mask in self.masks.items():
            if name in new:
                new[name] = torch.where(mask, old[name].to(new[name].dtype), new[name])
        return ArrayRecord(new)

    def summary(self) -> None:
        super().summary()
        from logging import INFO

        from flwr.supercore import log

        log(INFO, "\t└──> anchors: ratio %.2f, seed %d, granularity %s (%s)",
            self.anchor_ratio, self.anchor_seed, self.granularity, self.method)


class FedPNU(FedPFN):
    """Partial neuron update: each round a new shared subset of neurons stays fixed."""

    method = "fedpnu"

    def __init__(self, anchor_ratio: float = 0.4, anchor_seed: int = 0,
                 granularity: str = "neuron", mask_fn=None, **kwargs):
        super().__init__(anchor_ratio=anchor_ratio, anchor_seed=anchor_seed,
                         granularity=granularity, **kwargs)
        self.mask_fn = mask_fn  # server_round -> masks, to restore exactly (optional)

    def _round_seed(self, server_round: int) -> int:
        return self.anchor_seed * 100_003 + server_round

    def aggregate_train(self, server_round, replies):
        if self.mask_fn is not None:
            self.masks = self.mask_fn(self._round_seed(server_round))
        return super().aggregate_train(server_round, replies)


STRATEGIES = ("fedavg", "fedprox", "fedpfn", "fedpnu", "fedma")


def make_strategy(name: str, *, num_clients: int, fraction: float = 1.0,
                  min_clients: int | None = None, min_replies: int = 1,
                  proximal_mu: float = 0.01,
                  anchor_ratio: float = 0.4, anchor_seed: int = 0, model=None):
    """A configured strategy by name (FedMA returns its settings object, run by its own loop).

    ``min_clients`` is the minimum number of clients a round samples (Flower's
    ``min_train_nodes``); a round in which some sampled clients crash or time out still
    aggregates the others, as long as at least ``min_replies`` results arrived (otherwise the
    round is skipped and the global model kept).
    """
    name = name.lower()
    if name not in STRATEGIES:
        raise NeuralignError(f"unknown strategy {name!r}; choose from {', '.join(STRATEGIES)}")
    m = min_clients if min_clients is not None else max(1, int(round(fraction * num_clients)))
    common = dict(fraction_train=fraction, fraction_evaluate=0.0, min_train_nodes=m,
                  min_available_nodes=m)
    strat = _make(name, common, proximal_mu, anchor_ratio, anchor_seed, model, m, fraction)
    strat.min_replies = int(min_replies)
    return strat


def _make(name, common, proximal_mu, anchor_ratio, anchor_seed, model, m, fraction):
    if name == "fedavg":
        return FedAvg(**common)
    if name == "fedprox":
        return FedProx(proximal_mu=proximal_mu, **common)
    if name in ("fedpfn", "fedpnu"):
        from neuralign.train.anchors import anchor_masks

        if name == "fedpfn":
            masks = None if model is None else anchor_masks(model, anchor_ratio, seed=anchor_seed)
            return FedPFN(anchor_ratio=anchor_ratio, anchor_seed=anchor_seed, masks=masks, **common)
        mask_fn = None
        if model is not None:
            def mask_fn(seed, model=model):
                return anchor_masks(model, anchor_ratio, seed=seed, granularity="neuron")
        return FedPNU(anchor_ratio=anchor_ratio, anchor_seed=anchor_seed, mask_fn=mask_fn,
                      **common)
    from neuralign.federated.fedma import FedMAConfig

    return FedMAConfig(min_clients=m, fraction=fraction)
