"""Server strategies: subclasses of Flower's message-based ``FedAvg``.

* ``FedAvg``   - McMahan et al.; plus a record of failed / timed-out clients per round.
* ``FedProx``  - Flower's FedProx (sends ``proximal-mu``); clients add ``mu/2 ||w - w_g||^2``.
* ``FedPFN``   - every client trains with the same fixed-anchor mask, sent in full with each
  train message and confirmed by hash (:mod:`neuralign.federated.anchors`); by default one
  per-weight mask for the whole run; the server averages and writes the anchor values back.
* ``FedPNU``   - partial neuron update: FedPFN with a mask of whole neurons redrawn every round.
* ``FedMA``    - layer-wise matched averaging with width growth: :mod:`neuralign.federated.fedma`.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable

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


# Flower logs through the standard logger "flwr"; neuralign's notes go there too
LOG = logging.getLogger("flwr")


def _install_log_filter() -> None:
    if _drop_evaluate_notice not in LOG.filters:
        LOG.addFilter(_drop_evaluate_notice)


_install_log_filter()


class _Reporting:
    """Mixin: remember which clients failed (error reply) or never answered, per round."""

    method = "fedavg"

    min_replies = 1

    def _init_reporting(self) -> None:
        self.failures: dict[int, list[str]] = {}
        self.participants: dict[int, int] = {}
        self._sent: dict[int, set[int]] = {}
        self._sent_msgs: dict[int, list] = {}

    def _record_sent(self, server_round: int, messages: Iterable) -> list:
        messages = list(messages)
        self._sent[server_round] = {m.metadata.dst_node_id for m in messages}
        self._sent_msgs = {server_round: messages}  # their ids are set when pushed
        return messages

    def node_of(self, server_round: int, reply) -> int:
        """The node a reply answers for: the SuperLink answers for a lost node itself (under
        its own id), so the node is found from the message the reply answers."""
        origin = {m.metadata.message_id: m.metadata.dst_node_id
                  for m in self._sent_msgs.get(server_round, ()) if m.metadata.message_id}
        return origin.get(reply.metadata.reply_to_message_id, reply.metadata.src_node_id)

    def _record_replies(self, server_round: int, replies: Iterable) -> list:
        replies = list(replies)
        sent = self._sent.get(server_round, set())
        got = {self.node_of(server_round, m) for m in replies}
        notes = [f"node {self.node_of(server_round, m)}: error: "
                 f"{((m.error.reason or '').strip().splitlines() or ['?'])[-1]}"
                 for m in replies if m.has_error()]
        notes += [f"node {n}: no reply (timed out or lost)" for n in sorted(sent - got)]
        ok = sum(1 for m in replies if not m.has_error())
        self.participants[server_round] = ok
        if notes:
            self.failures[server_round] = notes
            LOG.warning("round %s: %d of %d clients failed; aggregating the other %d",
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
    """FedAvg with fixed neuron anchors shared by all clients (TNA-PFN in federated form).

    Every round the server draws the mask of :class:`~neuralign.federated.anchors.MaskPolicy`
    (``mask_policy="fixed"``: one mask for the run; ``"per-round"``: a new one each round),
    sends it in full with the train message (packed bits plus a hash) and, after averaging,
    writes the anchored values of the previous global model back, so float round-off in the
    weighted mean never moves them. Replies that do not echo the mask's hash are discarded and
    reported (the client trained with another mask, or none).
    """

    method = "fedpfn"

    def __init__(self, anchor_ratio: float = 0.4, anchor_seed: int = 0,
                 granularity: str = "weight", mask_policy: str = "fixed",
                 head_ratio: float | None = None, **kwargs):
        super().__init__(**kwargs)
        from neuralign.federated.anchors import MaskPolicy

        self.policy = MaskPolicy(ratio=float(anchor_ratio), head_ratio=head_ratio,
                                 granularity=granularity, policy=mask_policy,
                                 seed=int(anchor_seed))
        self.anchor_ratio, self.anchor_seed = self.policy.ratio, self.policy.seed
        self.granularity, self.mask_policy = granularity, mask_policy
        self.head_ratio = head_ratio
        self.masks: dict = {}
        self.mask_hashes: dict[int, int] = {}
        self._last_arrays = None
        self._init_reporting()

    def _config(self, config, server_round):
        from neuralign.federated.anchors import HASH_KEY

        config = super()._config(config, server_round)
        config["anchor-ratio"] = float(self.policy.ratio)
        config["anchor-seed"] = int(self.policy.round_seed(server_round))
        config["anchor-granularity"] = self.policy.granularity
        config["anchor-policy"] = self.policy.policy
        if self.policy.head_ratio is not None:
            config["anchor-head-ratio"] = float(self.policy.head_ratio)
        config[HASH_KEY] = self.mask_hashes[server_round]
        return config

    def configure_train(self, server_round, arrays, config, grid):
        from neuralign.federated.anchors import MASKS_KEY, mask_hash, pack_masks

        self._last_arrays = arrays
        if self.policy.policy == "per-round" or not self.masks:
            self.masks = self.policy.draw(arrays.to_torch_state_dict(), server_round)
        self.mask_hashes[server_round] = mask_hash(self.masks)
        msgs = super().configure_train(server_round, arrays, config, grid)
        packed = pack_masks(self.masks)
        for m in msgs:
            m.content[MASKS_KEY] = packed
        return msgs

    def aggregate_train(self, server_round, replies):
        arrays, metrics = super().aggregate_train(server_round, replies)
        if arrays is not None and self.masks and self._last_arrays is not None:
            arrays = self._restore_anchors(arrays)
        return arrays, metrics

    def _record_replies(self, server_round, replies):
        """Also drop (and report) the replies whose mask hash is missing or not this round's."""
        from neuralign.federated.anchors import HASH_KEY

        replies = super()._record_replies(server_round, replies)
        want = self.mask_hashes.get(server_round)
        kept, bad = [], []
        for m in replies:
            rec = None if m.has_error() or "metrics" not in m.content else m.content["metrics"]
            got = None if rec is None else rec.get(HASH_KEY)
            if not m.has_error() and (got is None or int(got) != want):
                bad.append(f"node {m.metadata.src_node_id}: anchor mask mismatch (reply "
                           f"{'has no mask hash' if got is None else f'hash {int(got):x}'}, "
                           f"server {want:x}); reply discarded")
                continue
            if rec is not None:
                del rec[HASH_KEY]  # not a metric to average
            kept.append(m)
        if bad:
            LOG.warning("round %s: %s", server_round, "; ".join(bad))
            self.failures.setdefault(server_round, []).extend(bad)
            self.participants[server_round] -= len(bad)
        return kept

    def _restore_anchors(self, arrays):
        from flwr.app import ArrayRecord

        new = arrays.to_torch_state_dict()
        old = self._last_arrays.to_torch_state_dict()
        for name, mask in self.masks.items():
            if name in new:
                new[name] = torch.where(mask, old[name].to(new[name].dtype), new[name])
        return ArrayRecord(new)

    def summary(self) -> None:
        super().summary()
        p = self.policy
        LOG.info("\t└──> anchors: ratio %.2f, head ratio %s, seed %d, %s, %s mask (%s)",
            p.ratio, p.head_ratio, p.seed, p.granularity, p.policy, self.method)


class FedPNU(FedPFN):
    """Partial neuron update: FedPFN whose mask picks whole neurons and is redrawn each round."""

    method = "fedpnu"

    def __init__(self, anchor_ratio: float = 0.4, anchor_seed: int = 0,
                 granularity: str = "neuron", mask_policy: str = "per-round", **kwargs):
        super().__init__(anchor_ratio=anchor_ratio, anchor_seed=anchor_seed,
                         granularity=granularity, mask_policy=mask_policy, **kwargs)


STRATEGIES = ("fedavg", "fedprox", "fedpfn", "fedpnu", "fedma")


def make_strategy(name: str, *, num_clients: int, fraction: float = 1.0,
                  min_clients: int | None = None, min_replies: int = 1,
                  proximal_mu: float = 0.01,
                  anchor_ratio: float = 0.4, anchor_seed: int = 0,
                  anchor_granularity: str | None = None, anchor_policy: str | None = None,
                  anchor_head_ratio: float | None = None, model=None, **fedma_options):
    """A configured strategy by name.

    ``min_clients`` is the minimum number of clients a round samples (Flower's
    ``min_train_nodes``); a round in which some sampled clients crash or time out still
    aggregates the others, as long as at least ``min_replies`` results arrived (otherwise the
    round is skipped and the global model kept).

    Anchors (FedPFN / FedPNU): ``anchor_granularity`` ``"weight"`` | ``"neuron"`` and
    ``anchor_policy`` ``"fixed"`` | ``"per-round"`` (defaults: FedPFN weight / fixed, FedPNU
    neuron / per-round), ``anchor_head_ratio`` the output layer's ratio (None: not fixed).
    FedMA: ``model`` (the initial global model, required) and the keyword options of
    :class:`neuralign.federated.fedma_strategy.FedMA` (``threshold``, ``max_growth``, ``matcher``,
    ``independent_init``, ``class_weighting``, ``seed``, ``num_rounds``).
    """
    name = name.lower()
    if name not in STRATEGIES:
        raise NeuralignError(f"unknown strategy {name!r}; choose from {', '.join(STRATEGIES)}")
    if fedma_options and name != "fedma":
        raise NeuralignError(f"options {sorted(fedma_options)} apply to FedMA only, not {name}")
    m = min_clients if min_clients is not None else max(1, round(fraction * num_clients))
    common = {"fraction_train": fraction, "fraction_evaluate": 0.0, "min_train_nodes": m,
              "min_available_nodes": m}
    if name == "fedavg":
        strat = FedAvg(**common)
    elif name == "fedprox":
        strat = FedProx(proximal_mu=proximal_mu, **common)
    elif name in ("fedpfn", "fedpnu"):
        anchors = {k: v for k, v in (("granularity", anchor_granularity),
                                     ("mask_policy", anchor_policy)) if v is not None}
        cls = FedPFN if name == "fedpfn" else FedPNU
        strat = cls(anchor_ratio=anchor_ratio, anchor_seed=anchor_seed,
                    head_ratio=anchor_head_ratio, **anchors, **common)
    else:
        from neuralign.federated.fedma_strategy import FedMA

        if model is None:
            raise NeuralignError("FedMA needs the initial model: make_strategy('fedma', "
                                 "model=..., ...)")
        strat = FedMA(model, **fedma_options, **common)
    strat.min_replies = int(min_replies)
    return strat


def strategy_options(run_config) -> dict:
    """The keyword options of :func:`make_strategy` set by a Flower run config.

    Keys: ``anchor-granularity``, ``anchor-policy``, ``anchor-head-ratio`` (FedPFN / FedPNU);
    ``fedma-threshold``, ``fedma-max-growth``, ``fedma-matcher``, ``fedma-independent-init``,
    ``fedma-class-weighting`` (FedMA; its sampling seed is ``task.seed``). Absent keys keep the
    strategy's defaults.
    """
    name = str(run_config.get("strategy", "fedavg")).lower()
    out: dict = {}
    for key, conv in (("anchor-granularity", str), ("anchor-policy", str),
                      ("anchor-head-ratio", float)):
        if str(run_config.get(key, "")) != "":
            out[key.replace("-", "_")] = conv(run_config[key])
    if name == "fedma":
        for key, conv in (("fedma-threshold", float), ("fedma-max-growth", float),
                          ("fedma-matcher", str), ("fedma-independent-init", _flag),
                          ("fedma-class-weighting", _flag)):
            if str(run_config.get(key, "")) != "":
                out[key[len("fedma-"):].replace("-", "_")] = conv(run_config[key])
        out["seed"] = int(run_config.get("task.seed", 0))  # FedMA's seeded client sampling
        out["num_rounds"] = int(run_config.get("num-rounds", 3))  # the last completes its pass
    return out


def _flag(v) -> bool:
    if isinstance(v, bool):
        return v
    s = str(v).strip().lower()
    if s in ("1", "true", "yes", "on"):
        return True
    if s in ("0", "false", "no", "off"):
        return False
    raise NeuralignError(f"expected a boolean (true/false), got {v!r}")
