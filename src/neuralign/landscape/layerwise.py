"""Layer-wise connectivity (survey §6.2, Eq. 24) and CKA restricted to the symmetry group (§6.3).

**Partial-merge barrier.** Merge two (aligned) models up to layer ``i`` and keep their own layers
after it, a two-headed model. With the trunk ``θ_{≤i}(t) = (1-t) θ^A_{≤i} + t θ^B_{≤i}`` (our
``t`` runs from A to B, as in :func:`~neuralign.landscape.interpolation_curve`), Eq. 24 reads

    B_i = max_t (1-t) [L(θ^A_{>i}; θ_{≤i}(t)) - L(θ^A)] + t [L(θ^B_{>i}; θ_{≤i}(t)) - L(θ^B)].

When ``i`` is the last layer both heads are empty, the two models coincide with the
interpolated one, and ``B_i`` is the ordinary barrier above the straight line (Eq. 7,
``barrier(curve, definition="entezari")``). With ``kind="accuracy"`` the accuracy drop is used.

**G-CKA.** Linear CKA is invariant to every orthogonal map of the units. Restricted to the
intertwiner group of ReLU (permutations times positive diagonal scalings, Godfrey et al.), the
kernel compares units only as units: each unit's activations are divided by their root mean
square over the examples (removing D) before the linear Gram matrix (invariant to P) is formed.
The result is invariant to ``P D`` and, unlike plain CKA, changes under rotations that mix units.
(A sign flip of a unit also leaves it unchanged; ReLU features are non-negative, so it does not
arise between ReLU layers.)
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

import numpy as np
import torch
from torch import nn

from neuralign.errors import NeuralignError
from neuralign.landscape.analysis import _center_gram, default_layers, features
from neuralign.landscape.curves import _as_evaluator
from neuralign.merge._util import like
from neuralign.merge.basic import reset_bn
from neuralign.utils import as_state_dict, check_same_architecture

__all__ = ["LayerwiseResult", "group_cka", "layer_group_cka", "partial_merge",
           "partial_merge_barriers"]


def _block_of(keys: Sequence[str], layers: Sequence[str]) -> dict[str, int]:
    out = {}
    for k in keys:
        for i, name in enumerate(layers):
            if k == name or k.startswith(name + "."):
                out[k] = i
                break
    return out


def partial_merge(a: nn.Module, b, layers: Sequence[str], i: int, t: float, head: str = "a"):
    """The model whose layers ``layers[:i+1]`` are ``(1-t) a + t b`` and whose later layers are
    those of ``a`` (``head="a"``) or ``b`` (``head="b"``)."""
    sa, sb = as_state_dict(a), as_state_dict(b)
    owner = _block_of(list(sa), layers)
    out = {}
    for k, va in sa.items():
        src = sa if head == "a" else sb
        if owner[k] <= i and va.is_floating_point():
            out[k] = torch.lerp(va, sb[k].to(va.dtype), float(t))
        else:
            out[k] = src[k].clone()
    return like(a, out)


@dataclass
class LayerwiseResult:
    """``barriers[i]``: Eq. 24 with the trunk merged through ``layers[i]``; ``curves[i]``: the
    losses (or accuracies) of both heads at each ``t``."""

    layers: list[str]
    t: list[float]
    barriers: list[float]
    curves: list[dict] = field(default_factory=list)
    kind: str = "loss"

    def as_dict(self) -> dict:
        return {"layers": self.layers, "t": self.t, "barriers": self.barriers,
                "curves": self.curves, "kind": self.kind}


def partial_merge_barriers(a: nn.Module, b, evaluate, *, layers: Sequence[str] | None = None,
                           ts: Sequence[float] | int = 11, kind: str = "loss",
                           bn_loader: Iterable | None = None) -> LayerwiseResult:
    """Eq. 24 for every layer ``i`` (``a`` and ``b`` aligned beforehand).

    ``layers``: the blocks from input to output that split the parameters (default the models'
    blocks); every parameter must belong to one. ``evaluate``: a loader or a callable, as for
    :func:`~neuralign.landscape.interpolation_curve`; ``bn_loader`` resets batch-norm
    statistics of every evaluated model.
    """
    if not isinstance(a, nn.Module):
        raise NeuralignError("partial_merge_barriers needs model A as an nn.Module")
    if kind not in ("loss", "accuracy"):
        raise NeuralignError(f"unknown barrier kind {kind!r}; use 'loss' or 'accuracy'")
    sa, sb = as_state_dict(a), as_state_dict(b)
    check_same_architecture([sa, sb], hint="align the models first; partial merging needs one "
                            "architecture")
    layers = list(layers) if layers is not None else default_layers(a)
    owner = _block_of(list(sa), layers)
    stray = [k for k in sa if k not in owner]
    if stray:
        raise NeuralignError(f"tensor {stray[0]!r} belongs to none of the layers {layers}; pass "
                             "layers that cover every parameter")
    if isinstance(ts, int):
        if ts < 2:
            raise NeuralignError("a path needs at least 2 points")
        ts = np.linspace(0.0, 1.0, ts).tolist()
    ts = sorted(float(t) for t in ts)
    if ts[0] != 0.0 or ts[-1] != 1.0:
        raise NeuralignError("ts must include both end points 0 and 1")
    run = _as_evaluator(evaluate)

    def value(m: nn.Module) -> float:
        if bn_loader is not None:
            m = reset_bn(m, bn_loader)
        r = run(m)
        if r.get(kind) is None:
            raise NeuralignError(f"the evaluation gives no '{kind}'; use a labelled loader")
        return float(r[kind])

    sign = 1.0 if kind == "loss" else -1.0
    la, lb = value(like(a, dict(sa))), value(like(a, dict(sb)))
    barriers, curves = [], []
    for i in range(len(layers)):
        head_a, head_b, gaps = [], [], []
        for t in ts:
            va = value(partial_merge(a, sb, layers, i, t, "a"))
            vb = value(partial_merge(a, sb, layers, i, t, "b"))
            head_a.append(va)
            head_b.append(vb)
            gaps.append(sign * ((1 - t) * (va - la) + t * (vb - lb)))
        barriers.append(float(max(gaps)))
        curves.append({"t": ts, "head_a": head_a, "head_b": head_b})
    return LayerwiseResult(layers=layers, t=ts, barriers=barriers, curves=curves, kind=kind)


def _unit_normalised(x: torch.Tensor) -> torch.Tensor:
    x = x.reshape(x.shape[0], -1).double()
    rms = x.pow(2).mean(0).sqrt()
    return x / torch.where(rms > 1e-12, rms, torch.ones_like(rms))


def group_cka(x: torch.Tensor, y: torch.Tensor, group: str = "relu") -> float:
    """CKA of two representations (N, units) of the same examples, invariant to the symmetry
    ``group``: ``"relu"`` (permutation × positive scaling, see the module docstring) or
    ``"orthogonal"`` (plain linear CKA)."""
    if x.shape[0] != y.shape[0]:
        raise NeuralignError(f"CKA needs the same examples: {x.shape[0]} vs {y.shape[0]} rows")
    if group == "orthogonal":
        xs, ys = x.reshape(len(x), -1).double(), y.reshape(len(y), -1).double()
    elif group == "relu":
        xs, ys = _unit_normalised(x), _unit_normalised(y)
    else:
        raise NeuralignError(f"unknown symmetry group {group!r}; use 'relu' or 'orthogonal'")
    kx, ky = _center_gram(xs @ xs.T), _center_gram(ys @ ys.T)
    den = (kx * kx).sum().sqrt() * (ky * ky).sum().sqrt()
    return float((kx * ky).sum() / den.clamp_min(1e-30))


def layer_group_cka(model_a: nn.Module, model_b: nn.Module, loader: Iterable, *,
                    layers: Sequence[str] | None = None, group: str = "relu",
                    n_examples: int = 512) -> dict[str, float]:
    """G-CKA between the same layer of two models (the diagonal of a layer × layer map)."""
    layers = list(layers) if layers is not None else default_layers(model_a)
    fa = features(model_a, loader, layers, n_examples)
    fb = features(model_b, loader, layers, n_examples)
    return {n: group_cka(fa[n], fb[n], group) for n in layers}

