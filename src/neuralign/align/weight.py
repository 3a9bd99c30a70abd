"""Weight matching (Ainsworth et al., Git Re-Basin §3.2): coordinate ascent over permutation
groups, one linear assignment problem per group, until a sweep gains less than ``tol`` (relative)
or no group changes."""

from __future__ import annotations

import time
from collections.abc import Mapping, Sequence

import numpy as np
import torch
from scipy.optimize import linear_sum_assignment

from neuralign.align.order import has_heads, staged_start
from neuralign.errors import NeuralignError, SpecError
from neuralign.permute import check_permutation, take_units, unit_matrix
from neuralign.spec.core import Permutation, PermutationSpec
from neuralign.utils import as_state_dict
from neuralign.utils import check_same_architecture as check_architectures

__all__ = ["check_same_architecture", "solve_lap", "weight_matching", "weight_objective"]


def solve_lap(score: torch.Tensor) -> torch.Tensor:
    """The permutation ``p`` maximising ``sum_i score[i, p[i]]`` (SciPy's solver, the only one)."""
    s = score.detach().to("cpu", torch.float64).numpy()
    if not np.isfinite(s).all():
        s = np.nan_to_num(s, nan=0.0, posinf=0.0, neginf=0.0)
    _, cols = linear_sum_assignment(s, maximize=True)
    return torch.as_tensor(cols, dtype=torch.long)


def check_same_architecture(sd_a: Mapping, sd_b: Mapping, keys: Sequence[str] | None = None):
    """Both models hold the same tensors (of the same shapes for ``keys``)."""
    check_architectures([sd_a, sd_b], keys=keys, hint="alignment needs two models of the same "
                        "architecture")


_STATS = ("running_mean", "running_var")
TOL = 1e-3  # default stopping tolerance: relative gain of one sweep
CACHE_MAX_NUMEL = 2 ** 28  # compared weights above which no similarity matrix is kept (1 GiB)


def matched_keys(spec: PermutationSpec, sd: Mapping, include_buffers: bool = False) -> list[str]:
    """Tensors weight matching compares: the spec's float tensors, without batch-norm running
    statistics unless ``include_buffers`` (as Git Re-Basin: they are not weights)."""
    return [k for k in spec.keys if sd[k].is_floating_point()
            and (include_buffers or not k.endswith(_STATS))]


def _float(t: torch.Tensor) -> torch.Tensor:
    return t.detach().float() if t.is_floating_point() else t.detach()


def weight_objective(spec: PermutationSpec, a, b, include_buffers: bool = False) -> float:
    """``sum_k <A_k, B_k>`` over the tensors weight matching compares (its objective)."""
    sd_a, sd_b = as_state_dict(a), as_state_dict(b)
    return float(sum((_float(sd_a[k]).double() * _float(sd_b[k]).double()).sum()
                     for k in matched_keys(spec, sd_a, include_buffers)))


class _State:
    """Model b with the current permutation applied, and the fixed matrices of model a."""

    def __init__(self, spec: PermutationSpec, sd_a: Mapping, sd_b: Mapping, init: Permutation,
                 include_buffers: bool = False):
        self.spec = spec
        self.keys = matched_keys(spec, sd_a, include_buffers)
        self.A = {k: _float(sd_a[k]) for k in self.keys}
        self.B = {k: _float(sd_b[k]).to(self.A[k].device) for k in self.keys}
        self.perm = Permutation({n: torch.as_tensor(init[n]).long().clone()
                                 for n in spec.groups})
        for name, g in spec.groups.items():
            p = self.perm[name]
            if not torch.equal(p, torch.arange(g.size)):
                self._take(name, p)
        self.t_score = self.t_lap = self.gain = 0.0
        self.amats = {name: [(pl, unit_matrix(self.A[pl.key], pl, g.size)) for pl in g.places
                             if pl.key in self.A]
                      for name, g in spec.groups.items()}
        # A group's similarity matrix changes only when a group sharing one of its tensors is
        # re-permuted; until then solving it again cannot gain, so the sweep skips it.
        keys = {n: {pl.key for pl, _ in m} for n, m in self.amats.items()}
        self.neighbours = {n: [h for h in keys if h != n and keys[h] & keys[n]] for n in keys}
        self.stale = dict.fromkeys(spec.groups, True)
        self.skipped = 0
        # Each group's last similarity matrix, with the tensors of b it was computed from: later
        # sweeps move few units, so the next score adds only the columns that changed. Off for
        # a group on two axes of one tensor (its own moves change columns too), and for models
        # where the matrices would outweigh the weights or the older tensors kept (up to two
        # more copies of b) would exceed CACHE_MAX_NUMEL.
        self.S: dict[str, torch.Tensor] = {}
        self.seen: dict[str, list[torch.Tensor]] = {}
        numel = sum(t.numel() for t in self.A.values())
        big = (sum(g.size ** 2 for g in spec.groups.values()) > 2 * numel
               or numel > CACHE_MAX_NUMEL)
        self.cached = {n: not big and len({(pl.key, pl.axis) for pl, _ in m})
                       == len({pl.key for pl, _ in m}) for n, m in self.amats.items()}

    def _take(self, name: str, rel: torch.Tensor) -> None:
        g = self.spec.groups[name]
        for pl in g.places:
            if pl.key in self.B:
                self.B[pl.key] = take_units(self.B[pl.key], pl, g.size, rel.to(self.B[pl.key].device))

    def score(self, name: str) -> torch.Tensor:
        """``S[i, j]`` = similarity of unit i of a and current unit j of b (one GEMM per place,
        or, from the group's last matrix, one per place over the columns of b that changed)."""
        g, mats = self.spec.groups[name], self.amats[name]
        s = self.S.get(name)
        if s is None:
            for pl, am in mats:
                term = am @ unit_matrix(self.B[pl.key], pl, g.size).T
                s = term if s is None else s.add_(term)
        else:
            for (pl, am), old in zip(mats, self.seen[name]):
                new = self.B[pl.key]
                if new is old:
                    continue
                d = unit_matrix(new - old, pl, g.size)
                # a column changed where its difference has a nonzero (or NaN) extreme: two
                # vectorised reductions, several times faster than ne(0).any(0)
                cols = (d.amax(0).ne(0) | d.amin(0).ne(0)).nonzero().squeeze(1)
                # gather the changed columns when the products they save (n per column and
                # row) outweigh copying them (two floats per row, ~16 flops' worth): for a
                # wide group even 99% changed columns are worth gathering
                if (d.shape[1] - len(cols)) * g.size > 16 * len(cols):
                    am, d = am.index_select(1, cols), d.index_select(1, cols)
                s.addmm_(am, d.T)
        if s is not None and self.cached[name]:
            self.S[name] = s
            self.seen[name] = [self.B[pl.key] for pl, _ in mats]
        return s

    def _moved(self, name: str, rel: torch.Tensor) -> None:
        """Group ``name``'s units of b were reordered by ``rel``: so are its matrix's columns."""
        if name in self.S:
            self.S[name] = self.S[name].index_select(1, rel)
            self.seen[name] = [self.B[pl.key] for pl, _ in self.amats[name]]

    def step(self, name: str, rtol: float) -> bool:
        if not self.stale[name]:
            self.skipped += 1
            return False
        self.stale[name] = False
        t0 = time.perf_counter()
        solved = self._rank_one(name)
        if solved is None:
            s = self.score(name)
            if s is None:
                return False
            s64 = s.double().cpu()
            t1 = time.perf_counter()
            rel = solve_lap(s64)
            idx = torch.arange(len(rel))
            old, new = float(s64[idx, idx].sum()), float(s64[idx, rel].sum())
        else:
            t1 = time.perf_counter()
            rel, old, new = solved
        self.t_score += t1 - t0
        self.t_lap += time.perf_counter() - t1
        if new - old <= rtol * max(abs(old), 1e-30):
            return False
        self.gain += new - old
        self._take(name, rel)
        self._moved(name, rel)
        self.perm[name] = self.perm[name][rel]
        for h in self.neighbours[name]:
            self.stale[h] = True
        return True

    def _rank_one(self, name: str):
        """A group compared through one vector only (a bias: the staged start of a transformer's
        MLP groups) has the rank-1 score ``u vᵀ``; pairing the units in sorted order is an
        exact optimum (rearrangement inequality), where the LAP solver is slowest (ties
        everywhere: 27 s for a 3072-unit group). ``(rel, old, new)`` or None."""
        (pl, am), *more = self.amats[name] or [(None, None)]
        if more or am is None or am.shape[1] != 1:
            return None
        u = am[:, 0].double()
        v = unit_matrix(self.B[pl.key], pl, self.spec.groups[name].size)[:, 0].double()
        rel = torch.empty(len(u), dtype=torch.long)
        rel[torch.argsort(u, stable=True)] = torch.argsort(v, stable=True)
        return rel, float(u @ v), float(u @ v[rel])

    def head_score(self, name: str) -> torch.Tensor:
        """Similarity of whole heads that ignores how dims inside a head are ordered:
        ``sum_places ||X_a[i] X_b[j]^T||_F^2`` with ``X[i]`` the (inner, rest) block of head i."""
        g = self.spec.groups[name]
        s = None
        for pl in g.places:
            if pl.key not in self.A or pl.inner == 1:
                continue
            xa, xb = (_head_blocks(t[pl.key], pl, g.size) for t in (self.A, self.B))
            term = torch.einsum("iar,jbr->ijab", xa, xb).pow(2).sum((2, 3))
            s = term if s is None else s + term
        return s

    def init_heads(self, name: str) -> None:
        s = self.head_score(name)
        if s is not None:
            rel = solve_lap(s)
            self._take(name, rel)
            self._moved(name, rel)
            self.perm[name] = self.perm[name][rel]

    def objective(self) -> float:
        """The objective now: float32 dot products per tensor, summed in float64 (done twice
        per run; the sweeps track the gains from S)."""
        return float(sum(float(torch.dot(self.A[k].reshape(-1), self.B[k].reshape(-1)))
                         for k in self.keys))


def _head_blocks(t: torch.Tensor, place, size: int) -> torch.Tensor:
    """``(size, inner, rest)``: the block of each head, dims inside the head on axis 1."""
    from neuralign.permute import _segment

    seg, shape = _segment(t, place, size)
    v = seg.reshape(shape).movedim(place.axis + 1, 0).movedim(place.axis + 2, 1)
    return v.reshape(size, place.inner, -1)


def _run(spec, sd_a, sd_b, init, names, max_iter, seed, rtol, tol, include_buffers=False):
    t0 = time.perf_counter()
    st = _State(spec, sd_a, sd_b, init, include_buffers)
    for n in names:  # attention heads first, by a score blind to within-head order
        if spec.groups[n].kind == "heads":
            st.init_heads(n)
    start = st.objective()
    hist, times = [start], [time.perf_counter() - t0]
    gen = torch.Generator().manual_seed(seed)
    sweeps, stopped = 0, "max_iter"
    for _ in range(max_iter):
        sweeps += 1
        before = st.gain
        changed = False
        for i in torch.randperm(len(names), generator=gen).tolist():
            changed |= st.step(names[i], rtol)
        hist.append(start + st.gain)  # each accepted LAP adds its gain in S
        times.append(time.perf_counter() - t0)
        if not changed:
            stopped = "converged"
            break
        if st.gain - before <= tol * max(abs(hist[-2]), 1e-30):
            stopped = "tol"
            break
    elapsed = time.perf_counter() - t0
    final = st.objective()
    st.perm.info = {"method": "weight", "objective": final, "objective_init": hist[0],
                    "objective_history": hist, "time_history_s": times, "sweeps": sweeps,
                    "converged": stopped == "converged", "stopped": stopped, "tol": tol,
                    "time_s": elapsed, "time_per_sweep_s": elapsed / max(sweeps, 1), "seed": seed,
                    "score_time_s": st.t_score, "lap_time_s": st.t_lap,
                    "groups_skipped": st.skipped}
    return st.perm


def weight_matching(spec: PermutationSpec, a, b, max_iter: int = 100, seed: int = 0, *,
                    init: Mapping[str, torch.Tensor] | None = None,
                    groups: Sequence[str] | None = None, restarts: int = 0,
                    tol: float = TOL, rtol: float = 1e-7,
                    include_buffers: bool = False) -> Permutation:
    """Find the permutation that, applied to ``b``, maximises ``sum_k <A_k, P(B)_k>``.

    ``a`` and ``b`` are models or state dicts. Coordinate ascent visits the groups in a random
    order (seeded) each sweep and solves one LAP per group (a group's new assignment is kept when
    it improves the objective by more than ``rtol``, relative). It stops after a sweep whose gain
    is at most ``tol`` times the objective (default ``TOL`` = 1e-3; on torchvision ResNet-50 the
    sweeps after that add about 0.15% in all, docs/results/alignment_speed.md), after a sweep in
    which no group changed (full convergence; ``tol=0`` runs until then), or after ``max_iter``
    sweeps. Groups none of whose tensors changed since they were last solved are skipped; the
    others update their last similarity matrix over the columns of ``b`` that changed.
    ``init`` starts from a given permutation (e.g. from activation matching); ``groups``
    restricts the optimisation to some groups (the others keep their ``init``);
    ``restarts > 0`` also runs from that many random starting permutations and keeps the best
    objective (the remedy for residual nets, where single runs can miss the optimum).
    Batch-norm running statistics are permuted with their group but not compared, unless
    ``include_buffers=True``.
    The result's ``info`` holds the objective per sweep, sweeps, and times.
    """
    if not (tol >= 0 and rtol >= 0) or max_iter < 1:
        raise NeuralignError(f"weight matching needs tol >= 0, rtol >= 0 and max_iter >= 1 "
                             f"(got tol={tol}, rtol={rtol}, max_iter={max_iter})")
    sd_a, sd_b = as_state_dict(a), as_state_dict(b)
    check_same_architecture(sd_a, sd_b, spec.keys)
    spec.validate(sd_a)
    names = list(spec.groups) if groups is None else list(groups)
    for n in names:
        if n not in spec.groups:
            raise SpecError(f"group {n!r} is not in the spec (groups: {list(spec.groups)[:5]}...)")
    base = Permutation.identity(spec)
    if init is None and groups is None and has_heads(spec):  # attention: start in stages
        init = staged_start(spec, sd_a, sd_b, seed, max_iter=max_iter, rtol=rtol, tol=tol)
    if init is not None:
        check_permutation(init, spec)
        base.update({k: torch.as_tensor(v).long() for k, v in init.items()})
    best = _run(spec, sd_a, sd_b, base, names, max_iter, seed, rtol, tol, include_buffers)
    runs = [best.info["objective"]]
    for r in range(1, restarts + 1):
        gen = torch.Generator().manual_seed(seed * 1000 + r)
        start = Permutation(base)
        for n in names:
            start[n] = torch.randperm(spec.groups[n].size, generator=gen)
        cand = _run(spec, sd_a, sd_b, start, names, max_iter, seed + r, rtol, tol,
                    include_buffers)
        runs.append(cand.info["objective"])
        if cand.info["objective"] > best.info["objective"]:
            best = cand
    best.info["restart_objectives"] = runs
    return best
