"""Fixed neuron anchors across a federation (FedPFN / FedPNU), and a helper for your ClientApp.

The server draws the anchor mask (which weights stay fixed) and sends it **in full** with every
train message: an ``ArrayRecord`` under :data:`MASKS_KEY` holding one bit per weight (packed,
so it costs 1/32 of the model's size), plus its hash under :data:`HASH_KEY` in the config.
The client checks the hash against the mask it received and the model it was sent, keeps the
masked weights at their received values while it trains, and echoes the hash in its reply's
metrics. The server discards (and reports) any reply whose echo is missing or different, so a
client that trained with another mask, or with none, can never be averaged in silently.

Mask policy (:class:`MaskPolicy`): ``ratio`` of every hidden weight tensor, ``head_ratio`` of
the output layer (``None``: the output layer is never fixed), ``granularity`` ``"weight"`` or
``"neuron"`` (whole output rows / filters), and ``policy`` ``"fixed"`` (one mask for the whole
run, FedPFN) or ``"per-round"`` (a new mask each round, FedPNU). The draw is
:func:`neuralign.train.anchors.anchor_masks` on the model's parameter names and shapes.

In your own Flower ``ClientApp``::

    from neuralign.federated.anchors import fixed_anchors

    @app.train()
    def train(msg, context):
        model.load_state_dict(msg.content["arrays"].to_torch_state_dict())
        opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
        with fixed_anchors(model, msg, opt) as anchors:
            ...  # your usual training loop: forward, backward, opt.step()
        metrics = MetricRecord({"num-examples": n, **anchors.metrics})
        ...

Without anchors in the message (FedAvg, FedProx) the helper does nothing, so one ClientApp
serves every strategy.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib

import numpy as np
import torch
from torch import nn

from neuralign.errors import NeuralignError

__all__ = ["HASH_KEY", "MASKS_KEY", "AnchorSet", "MaskPolicy", "fixed_anchors", "mask_hash"]

MASKS_KEY = "anchor-masks"
HASH_KEY = "anchor-mask-hash"
POLICIES = ("fixed", "per-round")


@dataclasses.dataclass(frozen=True)
class MaskPolicy:
    """How the server draws the anchor mask of each round."""

    ratio: float = 0.4
    head_ratio: float | None = None
    granularity: str = "weight"
    policy: str = "fixed"
    seed: int = 0

    def __post_init__(self):
        if not 0.0 <= self.ratio < 1.0:
            raise NeuralignError(f"anchor ratio must lie in [0, 1), got {self.ratio}")
        if self.head_ratio is not None and not 0.0 <= self.head_ratio < 1.0:
            raise NeuralignError(f"anchor head ratio must lie in [0, 1), got {self.head_ratio}")
        if self.granularity not in ("weight", "neuron"):
            raise NeuralignError("anchor granularity must be 'weight' or 'neuron', got "
                                 f"{self.granularity!r}")
        if self.policy not in POLICIES:
            raise NeuralignError(f"anchor mask policy must be one of {POLICIES}, got "
                                 f"{self.policy!r}")

    def round_seed(self, server_round: int) -> int:
        return self.seed if self.policy == "fixed" else self.seed * 100_003 + int(server_round)

    def draw(self, state_dict, server_round: int) -> dict[str, torch.Tensor]:
        """The masks (True = fixed) of ``server_round`` for a model with ``state_dict``'s
        parameter names and shapes."""
        from neuralign.train.anchors import anchor_masks

        return anchor_masks(_shell(state_dict), self.ratio, head_ratio=self.head_ratio,
                            granularity=self.granularity, seed=self.round_seed(server_round))


def _shell(state_dict) -> nn.Module:
    """A module on the meta device whose parameters have ``state_dict``'s names and shapes."""
    root = nn.Module()
    for name, t in state_dict.items():
        if not torch.is_floating_point(t):
            continue
        *path, leaf = name.split(".")
        mod = root
        for p in path:
            if not hasattr(mod, p):
                mod.add_module(p, nn.Module())
            mod = getattr(mod, p)
        mod.register_parameter(leaf, nn.Parameter(torch.empty(t.shape, device="meta")))
    return root


def mask_hash(masks: dict[str, torch.Tensor]) -> int:
    """A 60-bit integer identifying ``masks`` (names, shapes and every bit)."""
    h = hashlib.sha256()
    for name in sorted(masks):
        m = masks[name]
        h.update(f"{name}:{tuple(m.shape)};".encode())
        h.update(np.packbits(m.detach().cpu().numpy().astype(bool).ravel()).tobytes())
    return int(h.hexdigest()[:15], 16)


def pack_masks(masks: dict[str, torch.Tensor]):
    """The masks as an ``ArrayRecord`` of packed bits (one ``uint8`` per 8 weights)."""
    from flwr.app import ArrayRecord

    return ArrayRecord({n: torch.from_numpy(np.packbits(m.cpu().numpy().astype(bool).ravel()))
                        for n, m in masks.items()})


def unpack_masks(record, model: nn.Module) -> dict[str, torch.Tensor]:
    """Masks from a packed ``ArrayRecord``, shaped like ``model``'s parameters (refuses any
    mask that names a parameter the model lacks or has the wrong number of bits)."""
    params = dict(model.named_parameters())
    out = {}
    for name, bits in record.to_torch_state_dict().items():
        if name not in params:
            raise NeuralignError(f"the anchor mask names {name!r}, which the model does not have;"
                                 " server and client must use the same architecture")
        shape = params[name].shape
        n = int(shape.numel())
        packed = bits.numpy().astype(np.uint8).ravel()
        if len(packed) != (n + 7) // 8:
            raise NeuralignError(f"the anchor mask of {name!r} has {8 * len(packed)} bits, the "
                                 f"parameter {n} entries (shape {tuple(shape)})")
        out[name] = torch.from_numpy(np.unpackbits(packed, count=n).astype(bool)).view(shape)
    return out


class AnchorSet:
    """The anchored entries of one model: masks plus the values they are kept at.

    Usable as a :func:`neuralign.train.train` callback (``after_backward`` zeroes the anchored
    gradients, ``after_step`` writes the values back bit-exactly) or through
    :func:`fixed_anchors` with any training loop.
    """

    def __init__(self, model: nn.Module, masks: dict[str, torch.Tensor] | None = None):
        self.masks = dict(masks or {})
        params = dict(model.named_parameters())
        for n, m in self.masks.items():
            if n not in params or tuple(params[n].shape) != tuple(m.shape):
                raise NeuralignError(f"anchor mask {n!r} does not fit the model (missing or "
                                     "another shape)")
        self.values = {n: params[n].detach().clone() for n in self.masks}
        # a message's mask is confirmed even when it is empty (ratio 0); no message: no hash
        self.hash = None if masks is None else mask_hash(self.masks)

    @property
    def metrics(self) -> dict:
        """What the reply's ``MetricRecord`` must carry (the mask hash; empty without anchors)."""
        return {} if self.hash is None else {HASH_KEY: self.hash}

    @torch.no_grad()
    def restore(self, model: nn.Module) -> None:
        params = dict(model.named_parameters())
        for n, m in self.masks.items():
            p = params[n]
            p.copy_(torch.where(m.to(p.device), self.values[n].to(p.device), p))

    @torch.no_grad()
    def mask_gradients(self, model: nn.Module) -> None:
        params = dict(model.named_parameters())
        for n, m in self.masks.items():
            if params[n].grad is not None:
                params[n].grad.masked_fill_(m.to(params[n].grad.device), 0.0)

    def check(self, model: nn.Module) -> bool:
        """True when every anchored entry of ``model`` still has its value, bit for bit."""
        params = dict(model.named_parameters())
        return all(torch.equal(params[n].detach().cpu()[m], self.values[n].cpu()[m])
                   for n, m in self.masks.items())

    # neuralign.train.train callback protocol
    def on_train_start(self, model, optimizer=None):
        self.restore(model)

    def after_backward(self, model, optimizer=None):
        self.mask_gradients(model)

    def after_step(self, model, optimizer=None):
        self.restore(model)


def anchors_from_message(model: nn.Module, msg) -> AnchorSet:
    """The :class:`AnchorSet` a train message asks for (``msg``: a Flower ``Message`` or its
    ``RecordDict``), built on ``model`` holding the received global weights. Refuses a mask
    whose hash differs from the one in the message's config."""
    content = getattr(msg, "content", msg)
    config = content.get("config", {})
    if MASKS_KEY not in content:
        if float(config.get("anchor-ratio", 0) or 0) > 0:
            raise NeuralignError("the message asks for anchors (anchor-ratio > 0) but carries no "
                                 f"{MASKS_KEY!r} record; update neuralign on the server")
        return AnchorSet(model)
    masks = unpack_masks(content[MASKS_KEY], model)
    got = mask_hash(masks)
    want = config.get(HASH_KEY)
    if want is None or int(want) != got:
        raise NeuralignError(f"anchor mask mismatch: the mask received hashes to {got:x}, the "
                             f"server's config says {want if want is None else f'{int(want):x}'}; "
                             "refusing to train")
    return AnchorSet(model, masks)


@contextlib.contextmanager
def fixed_anchors(model: nn.Module, msg, optimizer: torch.optim.Optimizer):
    """Keep the anchored weights of ``model`` fixed while your loop trains it with ``optimizer``.

    Gradients of anchored entries are zeroed (tensor hooks) and their values are written back
    after every ``optimizer.step()`` (weight decay and momentum would move them otherwise).
    Yields the :class:`AnchorSet`; put ``anchors.metrics`` into the reply's ``MetricRecord``.
    Load the received weights into ``model`` before entering.
    """
    anchors = anchors_from_message(model, msg)
    handles = []
    params = dict(model.named_parameters())
    for n, m in anchors.masks.items():
        handles.append(params[n].register_hook(
            lambda g, m=m: g.masked_fill(m.to(g.device), 0.0)))
    if anchors.masks:
        handles.append(optimizer.register_step_post_hook(
            lambda opt, args, kwargs: anchors.restore(model)))
    try:
        yield anchors
    finally:
        for h in handles:
            h.remove()
    if anchors.masks:
        anchors.restore(model)
