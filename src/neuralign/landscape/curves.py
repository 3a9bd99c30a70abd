"""Linear interpolation curves and barriers (survey Eq. 2 and Eq. 7)."""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np
import torch
from torch import nn

from neuralign.errors import NeuralignError
from neuralign.evaluation import evaluate as _evaluate
from neuralign.merge.basic import interpolate, reset_bn
from neuralign.utils import ModelLike, as_state_dict


@dataclass
class Curve:
    """Loss (and accuracy) at positions ``t`` along a path; ``t=0`` is model A, ``t=1`` model B."""

    t: list[float]
    loss: list[float]
    accuracy: list[float] | None = None
    info: dict = field(default_factory=dict)

    def as_dict(self) -> dict:
        return {"t": list(self.t), "loss": list(self.loss), "accuracy": self.accuracy, **self.info}


def _as_evaluator(evaluate) -> Callable[[nn.Module], dict]:
    if callable(evaluate) and not isinstance(evaluate, (torch.utils.data.DataLoader,)):
        def run(model):
            out = evaluate(model)
            if isinstance(out, Mapping):
                return dict(out)
            return {"loss": float(out)}
        return run
    return lambda model: _evaluate(model, evaluate)


def interpolation_curve(
    a: nn.Module,
    b: ModelLike,
    evaluate,
    ts: Sequence[float] | int = 11,
    *,
    bn_loader: Iterable | None = None,
    transform: Callable[[nn.Module, float], nn.Module] | None = None,
) -> Curve:
    """Evaluate ``(1-t)·a + t·b`` at each ``t`` in ``ts`` (or at ``ts`` evenly spaced points).

    ``evaluate`` is a data loader (cross-entropy loss and accuracy are computed) or a callable
    ``model -> {"loss": ..., "accuracy": ...}`` (or ``model -> loss``). With ``bn_loader`` the
    batch-norm statistics of every interpolated model are reset on it; ``transform(model, t)``
    is applied to every point (for example REPAIR).
    """
    if not isinstance(a, nn.Module):
        raise TypeError("interpolation_curve needs model A as an nn.Module (B may be a state dict)")
    if isinstance(ts, int):
        if ts < 2:
            raise ValueError("an interpolation curve needs at least 2 points")
        ts = np.linspace(0.0, 1.0, ts).tolist()
    ts = [float(t) for t in ts]
    run = _as_evaluator(evaluate)
    sb = as_state_dict(b)
    losses, accs = [], []
    for t in ts:
        m = interpolate(a, sb, t)
        if bn_loader is not None:
            m = reset_bn(m, bn_loader)
        if transform is not None:
            m = transform(m, t)
        r = run(m)
        losses.append(float(r["loss"]))
        accs.append(float(r["accuracy"]) if r.get("accuracy") is not None else float("nan"))
    acc = None if all(np.isnan(accs)) else accs
    return Curve(t=ts, loss=losses, accuracy=acc)


def barrier(curve, kind: str = "loss", definition: str = "frankle") -> float:
    """Height of the barrier on a curve.

    ``definition="frankle"`` (survey Eq. 2): ``max_t L(t) - mean(L(0), L(1))``.
    ``definition="entezari"`` (survey Eq. 7): ``max_t [L(t) - ((1-t) L(0) + t L(1))]``, the
    height above the straight line between the end points (our ``t`` runs from A to B).
    For ``kind="accuracy"`` the sign is flipped (a barrier is an accuracy *drop*):
    ``mean(acc(0), acc(1)) - min_t acc(t)`` and ``max_t [((1-t) acc(0) + t acc(1)) - acc(t)]``.
    ``curve`` is a :class:`Curve` or a mapping with ``t`` and ``loss``/``accuracy``.
    """
    if isinstance(curve, Curve):
        t, vals = curve.t, getattr(curve, kind, None) if kind in ("loss", "accuracy") else None
    elif isinstance(curve, Mapping):
        t, vals = curve.get("t"), curve.get(kind)
    else:
        raise TypeError("barrier() takes a Curve or a mapping with 't' and 'loss'/'accuracy'")
    if kind not in ("loss", "accuracy"):
        raise NeuralignError(f"unknown barrier kind '{kind}'; use 'loss' or 'accuracy'")
    if vals is None:
        raise NeuralignError(f"the curve has no '{kind}' values; evaluate it with a labelled loader")
    if definition not in ("frankle", "entezari"):
        raise NeuralignError(f"unknown barrier definition '{definition}'; use 'frankle' or 'entezari'")
    t = np.asarray(t, dtype=np.float64)
    v = np.asarray(vals, dtype=np.float64)
    if len(t) < 2 or len(t) != len(v):
        raise NeuralignError("a curve needs at least 2 points and as many values as positions")
    order = np.argsort(t)
    t, v = t[order], v[order]
    t01 = (t - t[0]) / (t[-1] - t[0])
    sign = 1.0 if kind == "loss" else -1.0
    v = sign * v
    if definition == "frankle":
        return float(v.max() - 0.5 * (v[0] + v[-1]))
    line = (1 - t01) * v[0] + t01 * v[-1]
    return float((v - line).max())
