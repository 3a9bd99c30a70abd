"""Soft (Sinkhorn) weight matching: coordinate ascent over doubly-stochastic matrices computed
with POT's entropic Sinkhorn, annealing the entropy, then projected to hard permutations by one
LAP per group."""

from __future__ import annotations

import time
import warnings

import numpy as np
import ot
import torch

from neuralign.align.weight import _float, check_same_architecture, matched_keys, solve_lap
from neuralign.permute import _segment, unit_matrix
from neuralign.spec.core import Permutation, PermutationSpec, Place
from neuralign.utils import as_state_dict

__all__ = ["sinkhorn_matching"]


def _soft_take(t: torch.Tensor, place: Place, q: torch.Tensor) -> torch.Tensor:
    """Unit ``i`` of the result is ``sum_j q[i, j] * unit j`` of ``t``."""
    size = q.shape[0]
    seg, shape = _segment(t, place, size)
    v = seg.reshape(shape).movedim(place.axis + 1, -1) @ q.T.to(t.dtype)
    out = v.movedim(-1, place.axis + 1).reshape(seg.shape)
    if seg.shape == t.shape:
        return out
    res = t.clone()
    res.narrow(place.axis, place.start, seg.shape[place.axis]).copy_(out)
    return res


def sinkhorn_matching(spec: PermutationSpec, a, b, *, reg: float = 0.01, reg_start: float = 0.5,
                      max_iter: int = 20, seed: int = 0) -> Permutation:
    """Permutation aligning ``b`` to ``a`` via soft permutations (entropic OT, POT's Sinkhorn).

    Each sweep updates every group's doubly-stochastic matrix from the weight similarity with
    the other groups' soft matrices applied; the entropy ``reg`` (relative to the score range)
    anneals geometrically from ``reg_start`` to ``reg``; at the end each soft matrix is
    projected to the nearest hard permutation (LAP). ``info`` has the final soft matrices.
    """
    t0 = time.perf_counter()
    sd_a, sd_b = as_state_dict(a), as_state_dict(b)
    check_same_architecture(sd_a, sd_b, spec.keys)
    spec.validate(sd_a)
    keys = matched_keys(spec, sd_a)
    A = {k: _float(sd_a[k]) for k in keys}
    B = {k: _float(sd_b[k]) for k in keys}
    by_key = spec.key_places()
    soft = {n: torch.eye(g.size) for n, g in spec.groups.items()}
    gen = torch.Generator().manual_seed(seed)
    names = list(spec.groups)
    regs = np.geomspace(reg_start, reg, max(max_iter, 1))
    for it in range(max_iter):
        for i in torch.randperm(len(names), generator=gen).tolist():
            name, g = names[i], spec.groups[names[i]]
            s = torch.zeros(g.size, g.size, dtype=torch.float64)
            for pl in g.places:
                if pl.key not in B:
                    continue
                t = B[pl.key]
                for other, opl in by_key[pl.key]:
                    if other != name:
                        t = _soft_take(t, opl, soft[other])
                s += (unit_matrix(A[pl.key], pl, g.size) @ unit_matrix(t, pl, g.size).T).double()
            cost = (s.max() - s) / (s.max() - s.min()).clamp_min(1e-30)
            u = np.full(g.size, 1.0 / g.size)
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                plan = ot.sinkhorn(u, u, cost.numpy(), float(regs[it]), method="sinkhorn_log",
                                   numItermax=100)
            soft[name] = torch.as_tensor(plan * g.size, dtype=torch.float32)
    perm = Permutation({n: solve_lap(q) for n, q in soft.items()})
    perm.info = {"method": "sinkhorn", "soft": soft, "time_s": time.perf_counter() - t0,
                 "sweeps": max_iter}
    return perm
