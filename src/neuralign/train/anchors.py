"""TNA-PFN: training-time neuron alignment with partially fixed neuron anchors.

Li et al. ("Improving Model Fusion by Training-time Neuron Alignment with Fixed Neuron
Anchors") fix a random subset of the weights at their (shared) initial values for the whole of
training. Models that start from the same initialisation and share the mask then train inside
the same permutation subspace, which lowers the barrier of linear mode connectivity between
them. The paper's theorem uses a two-layer net ``v^T relu(U x)`` with separate mask ratios
``rho_U`` (hidden weights) and ``rho_v`` (output weights); here ``ratio`` is ``rho_U`` for
every hidden weight tensor and ``head_ratio`` is ``rho_v`` for the classifier head.

``FixedNeuronAnchors`` is a callback of :func:`neuralign.train.train`:

* ``after_backward`` zeroes the gradients of the fixed entries, so optimizer statistics
  (momentum buffers, Adam moments) of those entries stay clean;
* ``after_step`` writes the fixed values back, bit-exactly, because weight decay and
  momentum would otherwise still move them.

Choices where the paper's text is silent (all options, defaults documented in
``docs/federated.md``): the mask is drawn per weight (``granularity="weight"``) or per output
neuron (``"neuron"``, whole rows / filters); exactly ``round(ratio * n)`` entries per tensor
are fixed; biases and normalisation parameters are never fixed by default; the fixed value is
the value the weight had when the anchors were created (``fill=None``) or a constant
(``fill=0.0`` gives random pruning at initialisation, the paper's baseline).
"""

from __future__ import annotations

import zlib
from collections.abc import Callable, Iterable, Mapping

import torch
from torch import nn

from neuralign.errors import NeuralignError

__all__ = ["FixedNeuronAnchors", "anchor_masks"]

LayerSelector = str | Iterable[str] | Callable[[str, torch.Tensor], bool]


def _weight_names(model: nn.Module, include_bias: bool) -> list[str]:
    """Names of the parameters that carry neurons (>= 2-D weights; biases on request)."""
    names = []
    for name, p in model.named_parameters():
        if p.ndim >= 2 or (include_bias and name.endswith("bias") and p.ndim == 1):
            names.append(name)
    return names


def _head_prefix(model: nn.Module, weight_names: list[str]) -> str:
    """Module prefix of the classifier head: the last >= 2-D weight in registration order."""
    multi = [n for n in weight_names if n.endswith("weight")]
    if not multi:
        return ""
    return multi[-1].rsplit(".", 1)[0]


def _select(model: nn.Module, layers: LayerSelector, include_bias: bool) -> tuple[list, str]:
    names = _weight_names(model, include_bias)
    # Skip 1-D parameters of normalisation layers even when biases are asked for.
    norm_types = (nn.modules.batchnorm._NormBase, nn.LayerNorm, nn.GroupNorm)
    norm_prefixes = {n for n, m in model.named_modules() if isinstance(m, norm_types)}
    names = [n for n in names if n.rsplit(".", 1)[0] not in norm_prefixes]
    head = _head_prefix(model, names)
    params = dict(model.named_parameters())
    if layers == "hidden":
        chosen = [n for n in names if n.rsplit(".", 1)[0] != head]
    elif layers == "all":
        chosen = list(names)
    elif callable(layers):
        chosen = [n for n in names if layers(n, params[n])]
    elif isinstance(layers, str):
        raise NeuralignError(f"unknown layers={layers!r}: use 'hidden', 'all', a list of "
                             "parameter names or a predicate(name, tensor) -> bool")
    else:
        wanted = list(layers)
        missing = [n for n in wanted if n not in params]
        if missing:
            raise NeuralignError(f"layers names parameters the model does not have: {missing[:3]}"
                                 f" (available: {list(params)[:6]}...)")
        chosen = wanted
    return chosen, head


def _stable_seed(seed: int, name: str) -> int:
    return (int(seed) * 1_000_003 + zlib.crc32(name.encode())) % (2**63 - 1)


def _draw_mask(shape: torch.Size, ratio: float, granularity: str, seed: int) -> torch.Tensor:
    """Boolean mask with exactly ``round(ratio * n)`` True entries (True = fixed)."""
    g = torch.Generator().manual_seed(seed)
    if granularity == "neuron" and len(shape) >= 1:
        rows = shape[0]
        k = int(round(ratio * rows))
        row_mask = torch.zeros(rows, dtype=torch.bool)
        row_mask[torch.randperm(rows, generator=g)[:k]] = True
        return row_mask.view(-1, *([1] * (len(shape) - 1))).expand(shape).clone()
    n = int(torch.Size(shape).numel())
    k = int(round(ratio * n))
    flat = torch.zeros(n, dtype=torch.bool)
    flat[torch.randperm(n, generator=g)[:k]] = True
    return flat.view(shape)


def anchor_masks(
    model: nn.Module,
    ratio: float | Mapping[str, float] = 0.4,
    *,
    head_ratio: float | None = None,
    layers: LayerSelector = "hidden",
    granularity: str = "weight",
    include_bias: bool = False,
    seed: int = 0,
) -> dict[str, torch.Tensor]:
    """The boolean masks (True = fixed) that :class:`FixedNeuronAnchors` would use.

    Depends only on the parameter names and shapes, the options and ``seed``: two models of
    one architecture get the same masks.
    """
    if granularity not in ("weight", "neuron"):
        raise NeuralignError(f"granularity must be 'weight' or 'neuron', got {granularity!r}")
    chosen, head = _select(model, layers, include_bias)
    params = dict(model.named_parameters())
    ratios: dict[str, float] = {}
    for n in chosen:
        if isinstance(ratio, Mapping):
            r = ratio.get(n, ratio.get(n.rsplit(".", 1)[0], 0.0))
        else:
            r = float(ratio)
        ratios[n] = r
    if head_ratio is not None and head:
        for n in params:
            if n.rsplit(".", 1)[0] == head and (params[n].ndim >= 2 or include_bias):
                ratios[n] = float(head_ratio)
    masks = {}
    for n, r in ratios.items():
        if not 0.0 <= r <= 1.0:
            raise NeuralignError(f"mask ratio for {n} must lie in [0, 1], got {r}")
        if r == 0.0:
            continue
        masks[n] = _draw_mask(params[n].shape, r, granularity, _stable_seed(seed, n))
    return masks


class FixedNeuronAnchors:
    """Keep a fixed random subset of weights at their initial values during training (TNA-PFN).

    Args:
        model: the model whose current values become the anchors (its shared initialisation).
            The model is not modified here (except with ``fill`` set, at training start).
        ratio: mask ratio rho (fraction of entries fixed) for every selected tensor, or a
            mapping ``{parameter or module name: ratio}``. Default 0.4.
        head_ratio: if set, also fix this fraction of the head's weights (rho_v of the paper's
            theorem; ``ratio`` is then rho_U). Default: the head is not fixed.
        layers: ``"hidden"`` (all >= 2-D weights except the classifier head; default),
            ``"all"``, a list of parameter names, or a predicate ``(name, tensor) -> bool``.
        granularity: ``"weight"`` (each entry independently; default) or ``"neuron"``
            (whole output rows / conv filters).
        include_bias: also fix entries of the biases of the selected layers.
        seed: mask seed; models sharing it (and the architecture) share the mask.
        epochs: apply the anchors only during the first ``epochs`` epochs (None: always).
        fill: ``None`` (fixed at the initial value) or a constant; ``fill=0.0`` turns this
            into random pruning at initialisation with the same mask.
        values: optional state dict with the values to fix (default: the model's own).
    """

    def __init__(
        self,
        model: nn.Module,
        ratio: float | Mapping[str, float] = 0.4,
        *,
        head_ratio: float | None = None,
        layers: LayerSelector = "hidden",
        granularity: str = "weight",
        include_bias: bool = False,
        seed: int = 0,
        epochs: int | None = None,
        fill: float | None = None,
        values: Mapping[str, torch.Tensor] | None = None,
    ) -> None:
        if epochs is not None and epochs < 0:
            raise NeuralignError(f"epochs must be >= 0 or None, got {epochs}")
        self.ratio = ratio
        self.head_ratio = head_ratio
        self.granularity = granularity
        self.seed = seed
        self.epochs = epochs
        self.fill = fill
        self.masks = anchor_masks(model, ratio, head_ratio=head_ratio, layers=layers,
                                  granularity=granularity, include_bias=include_bias, seed=seed)
        params = dict(model.named_parameters())
        src = dict(values) if values is not None else {n: p.detach() for n, p in params.items()}
        self.values: dict[str, torch.Tensor] = {}
        for n, m in self.masks.items():
            if n not in src:
                raise NeuralignError(f"values has no entry {n!r} to anchor")
            if tuple(src[n].shape) != tuple(params[n].shape):
                raise NeuralignError(f"values[{n!r}] has shape {tuple(src[n].shape)}, the model "
                                     f"{tuple(params[n].shape)}")
            v = src[n].detach().clone().to(params[n].dtype)
            if fill is not None:
                v = torch.full_like(v, float(fill))
            self.values[n] = v
        self.active = True

    # -- information -----------------------------------------------------------------------
    @property
    def num_fixed(self) -> int:
        return int(sum(int(m.sum()) for m in self.masks.values()))

    def fraction_fixed(self, model: nn.Module) -> float:
        """Fraction of all of ``model``'s parameters that are anchored."""
        total = sum(p.numel() for p in model.parameters())
        return self.num_fixed / max(total, 1)

    def __repr__(self) -> str:
        return (f"FixedNeuronAnchors(ratio={self.ratio}, head_ratio={self.head_ratio}, "
                f"granularity={self.granularity!r}, tensors={len(self.masks)}, "
                f"fixed={self.num_fixed}, seed={self.seed}, epochs={self.epochs})")

    # -- operations ------------------------------------------------------------------------
    def _params(self, model: nn.Module) -> dict[str, nn.Parameter]:
        params = dict(model.named_parameters())
        for n, m in self.masks.items():
            if n not in params or tuple(params[n].shape) != tuple(m.shape):
                raise NeuralignError(f"model does not fit the anchors: parameter {n!r} is missing "
                                     "or has another shape (build the anchors on this model)")
        return params

    @torch.no_grad()
    def restore(self, model: nn.Module) -> None:
        """Write the fixed values back into ``model`` (in place, bit-exact)."""
        params = self._params(model)
        for n, m in self.masks.items():
            p = params[n]
            m_d = m.to(p.device)
            p.copy_(torch.where(m_d, self.values[n].to(p.device), p))

    @torch.no_grad()
    def mask_gradients(self, model: nn.Module) -> None:
        """Zero the gradients of the fixed entries (in place)."""
        params = self._params(model)
        for n, m in self.masks.items():
            g = params[n].grad
            if g is not None:
                g.masked_fill_(m.to(g.device), 0.0)

    def apply(self, model: nn.Module) -> nn.Module:
        """A copy of ``model`` with the fixed values written in (the input is untouched)."""
        import copy

        out = copy.deepcopy(model)
        self.restore(out)
        return out

    def check(self, model: nn.Module) -> bool:
        """True when every fixed entry of ``model`` equals its anchor value bit for bit."""
        params = self._params(model)
        return all(torch.equal(params[n].detach().cpu()[m], self.values[n].cpu()[m])
                   for n, m in self.masks.items())

    # -- training-loop callback --------------------------------------------------------------
    def on_train_start(self, model: nn.Module, optimizer=None) -> None:
        self.active = self.epochs is None or self.epochs > 0
        if self.active:
            self.restore(model)

    def on_epoch_start(self, model: nn.Module, optimizer=None, epoch: int = 0) -> None:
        self.active = self.epochs is None or epoch < self.epochs

    def after_backward(self, model: nn.Module, optimizer=None) -> None:
        if self.active:
            self.mask_gradients(model)

    def after_step(self, model: nn.Module, optimizer=None) -> None:
        if self.active:
            self.restore(model)
