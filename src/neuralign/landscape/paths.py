"""Non-linear mode connectivity: Bezier / polygonal-chain curves (Garipov et al., 2018) and
AutoNEB (Draxler et al., 2018). Both return a :class:`Path` with its loss/accuracy profile."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field

import numpy as np
import torch
from torch import nn

from neuralign.landscape._flat import Flat, batches, dev
from neuralign.landscape.curves import Curve, _as_evaluator
from neuralign.merge._util import check_same_architecture
from neuralign.merge.basic import reset_bn
from neuralign.utils import as_state_dict

KINDS = ("bezier", "polychain", "polyline")


@dataclass
class Path:
    """A path between two models. ``kind``: ``bezier`` (quadratic, one control point),
    ``polychain`` (one bend) or ``polyline`` (AutoNEB pivots, equally spaced in ``t``)."""

    kind: str
    flat: Flat
    points: list[torch.Tensor]  # flat vectors: end points and control point(s) in order
    info: dict = field(default_factory=dict)

    def vector(self, t: float) -> torch.Tensor:
        p = self.points
        if self.kind == "bezier":
            return (1 - t) ** 2 * p[0] + 2 * t * (1 - t) * p[1] + t ** 2 * p[2]
        k = len(p) - 1
        s = min(max(t, 0.0), 1.0) * k
        i = min(int(s), k - 1)
        u = s - i
        return (1 - u) * p[i] + u * p[i + 1]

    def model_at(self, t: float, bn_loader: Iterable | None = None) -> nn.Module:
        m = self.flat.to_model(self.vector(t))
        return reset_bn(m, bn_loader) if bn_loader is not None else m

    def evaluate(self, evaluate, ts=11, bn_loader: Iterable | None = None) -> Curve:
        ts = np.linspace(0, 1, ts).tolist() if isinstance(ts, int) else [float(t) for t in ts]
        run = _as_evaluator(evaluate)
        res = [run(self.model_at(t, bn_loader)) for t in ts]
        acc = [float(r.get("accuracy", float("nan"))) for r in res]
        return Curve(ts, [float(r["loss"]) for r in res], None if np.isnan(acc).all() else acc,
                     {"kind": self.kind})


def _point(kind, a, theta, b, t):
    if kind == "bezier":
        return (1 - t) ** 2 * a + 2 * t * (1 - t) * theta + t ** 2 * b
    if t < 0.5:
        return a + 2 * t * (theta - a)
    return theta + (2 * t - 1) * (b - theta)


def fit_curve(a: nn.Module, b, loader: Iterable, *, kind: str = "bezier", epochs: int = 1,
              lr: float = 0.05, momentum: float = 0.9, weight_decay: float = 0.0,
              max_steps: int | None = None, seed: int = 0) -> Path:
    """Train the control point of a quadratic Bezier curve or one-bend polygonal chain.

    The end points are fixed; the control point starts at the midpoint ``(a + b) / 2``; every
    step samples ``t ~ U(0, 1)`` and takes an SGD step on the loss of ``phi(t)`` (Garipov et al.).
    Batch-norm layers use batch statistics during training; evaluate BN models on the path with
    ``bn_loader``.
    """
    if kind not in ("bezier", "polychain"):
        raise ValueError(f"kind must be 'bezier' or 'polychain', got {kind!r}")
    check_same_architecture([as_state_dict(a), as_state_dict(b)])
    flat = Flat(a)
    va, vb = flat.vec(a), flat.vec(b)
    theta = ((va + vb) / 2).clone().requires_grad_(True)
    opt = torch.optim.SGD([theta], lr=lr, momentum=momentum, weight_decay=weight_decay)
    gen = torch.Generator().manual_seed(seed)
    it = batches(loader, dev(a))
    n_per_epoch = sum(1 for _ in loader)
    steps = n_per_epoch * epochs if max_steps is None else max_steps
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, max(steps, 1))
    bn = flat.uses_batchnorm()
    losses = []
    for _ in range(steps):
        x, y = next(it)
        t = float(torch.rand((), generator=gen))
        loss = flat.loss(_point(kind, va, theta, vb, t), x, y, train_mode=bn)
        opt.zero_grad()
        loss.backward()
        opt.step()
        sched.step()
        losses.append(loss.item())
    return Path(kind, flat, [va, theta.detach().clone(), vb], {"train_loss": losses, "steps": steps})


def autoneb(a: nn.Module, b, loader: Iterable, *, n_pivots: int = 3, rounds: int = 3,
            steps: int = 100, lr: float = 0.05, spring: float = 1.0, insert_threshold: float = 0.0,
            max_pivots: int = 12, eval_batches: int = 4, seed: int = 0) -> Path:
    """AutoNEB (Draxler et al.): nudged-elastic-band pivots with automatic insertion.

    Pivots start evenly spaced on the straight line. Each NEB step moves every interior pivot
    ``p_i`` by ``lr * (F_L + F_S)``: ``F_L`` is minus the loss gradient with its component along
    the path tangent ``tau_i`` removed, ``F_S = spring * (|p_{i+1} - p_i| - |p_i - p_{i-1}|)
    tau_i`` (the survey's spring force, acting along the path). After each round of ``steps``
    the loss at every segment's midpoint is compared with its ends; one pivot is inserted at the
    midpoint of each segment whose barrier exceeds ``insert_threshold`` (until ``max_pivots``).
    """
    check_same_architecture([as_state_dict(a), as_state_dict(b)])
    flat = Flat(a)
    va, vb = flat.vec(a), flat.vec(b)
    torch.manual_seed(seed)
    pts = [va + (vb - va) * (i / (n_pivots + 1)) for i in range(n_pivots + 2)]
    it = batches(loader, dev(a))
    bn = flat.uses_batchnorm()
    eval_set = [next(it) for _ in range(eval_batches)]

    def eval_loss(v):
        with torch.no_grad():
            return float(np.mean([float(flat.loss(v, x, y, train_mode=bn)) for x, y in eval_set]))

    history = []
    for r in range(rounds):
        for _ in range(steps):
            x, y = next(it)
            new = list(pts)
            for i in range(1, len(pts) - 1):
                v = pts[i].clone().requires_grad_(True)
                g, = torch.autograd.grad(flat.loss(v, x, y, train_mode=bn), v)
                tau = pts[i + 1] - pts[i - 1]
                tau = tau / tau.norm().clamp_min(1e-12)
                f_l = -(g - (g @ tau) * tau)
                f_s = spring * ((pts[i + 1] - pts[i]).norm() - (pts[i] - pts[i - 1]).norm()) * tau
                new[i] = pts[i] + lr * (f_l + f_s)
            pts = new
        ends = [eval_loss(p) for p in pts]
        mids = [eval_loss((pts[i] + pts[i + 1]) / 2) for i in range(len(pts) - 1)]
        seg = [m - max(ends[i], ends[i + 1]) for i, m in enumerate(mids)]
        history.append({"round": r, "pivot_loss": ends, "segment_barrier": seg})
        if r == rounds - 1:
            break
        order = [i for i in np.argsort(seg)[::-1] if seg[i] > insert_threshold]
        for i in sorted(order[: max(0, max_pivots + 2 - len(pts))], reverse=True):
            pts.insert(i + 1, (pts[i] + pts[i + 1]) / 2)
    return Path("polyline", flat, [p.detach() for p in pts], {"history": history})
