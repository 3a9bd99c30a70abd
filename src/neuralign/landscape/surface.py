"""Filter-normalised random-direction loss surfaces (Li et al., 2018) and three-model planes."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field

import numpy as np
import torch
from torch import nn

from neuralign.landscape._flat import Flat
from neuralign.landscape.curves import _as_evaluator
from neuralign.merge._util import check_same_architecture
from neuralign.merge.basic import reset_bn
from neuralign.utils import as_state_dict


@dataclass
class Surface:
    """``loss[i, j]`` (and ``accuracy``) at ``origin + xs[j] * d1 + ys[i] * d2`` (1-D: ``ys`` empty,
    ``loss`` of shape (len(xs),)). ``points`` gives named models' coordinates (plane surfaces)."""

    xs: np.ndarray
    ys: np.ndarray
    loss: np.ndarray
    accuracy: np.ndarray | None
    points: dict = field(default_factory=dict)


def filter_normalized_direction(model: nn.Module, seed: int = 0, *, ignore_1d: bool = True) -> dict:
    """A random Gaussian direction with every filter (row of a weight, along axis 0) rescaled to
    the norm of the corresponding filter of ``model``. 1-D parameters (biases, norm affines) get
    a zero direction (``ignore_1d``, as Li et al.) or are scaled to the parameter's norm."""
    g = torch.Generator().manual_seed(seed)
    out = {}
    for n, p in model.named_parameters():
        d = torch.randn(p.shape, generator=g, dtype=torch.float32).to(p.device)
        if p.dim() <= 1:
            out[n] = torch.zeros_like(p) if ignore_1d else d * p.norm() / d.norm().clamp_min(1e-12)
            continue
        pf, df = p.detach().reshape(p.shape[0], -1), d.reshape(p.shape[0], -1)
        df = df * (pf.norm(dim=1, keepdim=True) / df.norm(dim=1, keepdim=True).clamp_min(1e-12))
        out[n] = df.reshape(p.shape)
    return out


def _grid(flat, origin, d1, d2, xs, ys, evaluate, bn_loader):
    run = _as_evaluator(evaluate)
    shape = (len(ys), len(xs)) if d2 is not None else (len(xs),)
    loss, acc = np.zeros(shape), np.zeros(shape)
    for j, x in enumerate(xs):
        for i, y in enumerate(ys if d2 is not None else [0.0]):
            v = origin + x * d1 + (y * d2 if d2 is not None else 0)
            m = flat.to_model(v)
            if bn_loader is not None:
                m = reset_bn(m, bn_loader)
            r = run(m)
            idx = (i, j) if d2 is not None else (j,)
            loss[idx] = r["loss"]
            acc[idx] = r.get("accuracy", np.nan)
    return loss, (None if np.isnan(acc).all() else acc)


def loss_surface(model: nn.Module, evaluate, *, dims: int = 2, steps: int = 11, span: float = 1.0,
                 seed: int = 0, bn_loader: Iterable | None = None) -> Surface:
    """1-D or 2-D loss surface around ``model`` along filter-normalised random directions,
    at coordinates ``linspace(-span, span, steps)``. ``evaluate``: a loader or a callable."""
    if dims not in (1, 2):
        raise ValueError("dims must be 1 or 2")
    flat = Flat(model)
    o = flat.vec(model)
    d1 = flat.vec(filter_normalized_direction(model, seed))
    d2 = flat.vec(filter_normalized_direction(model, seed + 1)) if dims == 2 else None
    xs = np.linspace(-span, span, steps)
    ys = xs.copy() if dims == 2 else np.array([])
    loss, acc = _grid(flat, o, d1, d2, xs, ys, evaluate, bn_loader)
    return Surface(xs, ys, loss, acc, {"model": (0.0, 0.0)})


def plane_surface(a: nn.Module, b, c, evaluate, *, steps: int = 11, margin: float = 0.2,
                  bn_loader: Iterable | None = None) -> Surface:
    """Loss on the plane through three models (Garipov et al.): origin ``a``, first axis towards
    ``b``, second axis the part of ``c - a`` orthogonal to it; coordinates in parameter-space
    units, ``margin`` (fraction of the extent) around the three points."""
    check_same_architecture([as_state_dict(a), as_state_dict(b), as_state_dict(c)])
    flat = Flat(a)
    va, vb, vc = flat.vec(a), flat.vec(b), flat.vec(c)
    u = vb - va
    lu = u.norm()
    e1 = u / lu.clamp_min(1e-12)
    w = vc - va
    cx = float(w @ e1)
    v = w - cx * e1
    lv = v.norm()
    e2 = v / lv.clamp_min(1e-12)
    pts = {"A": (0.0, 0.0), "B": (float(lu), 0.0), "C": (cx, float(lv))}
    xlo, xhi = min(0.0, cx), max(float(lu), cx)
    ylo, yhi = 0.0, float(lv)
    mx, my = margin * (xhi - xlo), margin * max(yhi - ylo, 1e-6)
    xs = np.linspace(xlo - mx, xhi + mx, steps)
    ys = np.linspace(ylo - my, yhi + my, steps)
    loss, acc = _grid(flat, va, e1, e2, xs, ys, evaluate, bn_loader)
    return Surface(xs, ys, loss, acc, pts)
