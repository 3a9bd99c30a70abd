"""Simulated annealing over permutations that minimises the barrier directly (Entezari et al.,
2022; survey §4.2).

The state is one permutation per group of the spec (so any architecture the spec covers); a move
swaps two units of one randomly chosen group; the energy is the loss barrier of the linear path
from ``a`` to the permuted ``b`` (survey Eq. 7 by default: the largest height of the loss above
the straight line between the end points, over interior points ``ts``; with ``ts=(0.5,)`` it is
the loss of the averaged model minus the end points' mean, the objective of Entezari et al.).
The end points compute the same function under every permutation, so their losses are computed
once. Moves that lower the energy are kept; others with probability ``exp(-dE / T)``, with ``T``
cooled geometrically from ``t0`` to ``t0 * t_final`` over the budget. The best state visited is
returned, so the result is never worse than the starting permutation (the identity by default).
"""

from __future__ import annotations

import copy
import math
import time
from collections.abc import Callable, Mapping, Sequence

import torch
from torch import nn

from neuralign.errors import NeuralignError, SpecError
from neuralign.evaluation import evaluate as _evaluate
from neuralign.permute import check_permutation, take_units
from neuralign.spec.core import Permutation, PermutationSpec
from neuralign.utils import as_state_dict, check_same_architecture

__all__ = ["annealing_matching"]


def _evaluator(evaluate) -> Callable[[nn.Module], float]:
    if callable(evaluate) and not isinstance(evaluate, torch.utils.data.DataLoader):
        def run(model):
            out = evaluate(model)
            return float(out["loss"] if isinstance(out, Mapping) else out)
        return run
    return lambda model: float(_evaluate(model, evaluate)["loss"])


class _Energy:
    """Barrier of the path a -> P(b) at interior points, with one working model reused."""

    def __init__(self, a: nn.Module, sd_b: Mapping, evaluate, ts: Sequence[float], kind: str):
        self.model = copy.deepcopy(a).eval()
        self.sd_a = {k: v.detach().clone() for k, v in a.state_dict().items()}
        self.run = _evaluator(evaluate)
        self.ts = [float(t) for t in ts]
        self.kind = kind
        self.la = self.run(self.model)
        self._load(sd_b, 1.0)
        self.lb = self.run(self.model)
        self.evals = 0

    def _load(self, sd_b: Mapping, t: float) -> None:
        sd = {}
        for k, va in self.sd_a.items():
            if va.is_floating_point():
                sd[k] = torch.lerp(va, sd_b[k].to(va.dtype), t)
            else:
                sd[k] = va
        self.model.load_state_dict(sd)

    def __call__(self, sd_b: Mapping) -> float:
        worst = -math.inf
        for t in self.ts:
            self._load(sd_b, t)
            loss = self.run(self.model)
            line = (1 - t) * self.la + t * self.lb if self.kind == "entezari" else \
                0.5 * (self.la + self.lb)
            worst = max(worst, loss - line)
        self.evals += 1
        return worst


def annealing_matching(spec: PermutationSpec, a: nn.Module, b, evaluate, *, steps: int = 500,
                       time_budget_s: float | None = None, t0: float | None = None,
                       t_final: float = 1e-3, ts: Sequence[float] = (0.25, 0.5, 0.75),
                       definition: str = "entezari", seed: int = 0,
                       init: Mapping[str, torch.Tensor] | None = None,
                       groups: Sequence[str] | None = None) -> Permutation:
    """Search permutations of ``b`` (model or state dict) that minimise the barrier to ``a``.

    ``evaluate``: a data loader (cross-entropy) or a callable ``model -> loss`` (or a mapping
    with ``loss``), as for :func:`neuralign.landscape.interpolation_curve`. The budget is
    ``steps`` proposals and, when given, ``time_budget_s`` seconds (whichever ends first).
    ``t0`` defaults to a tenth of the starting energy's magnitude (plus a small floor).
    ``groups`` restricts the moves to some groups. Seeded: the same seed gives the same result.
    The result's ``info``: ``barrier`` (best), ``barrier_init``, ``history`` (best per step),
    ``accepted``, ``steps``, ``evaluations``, ``seed``, ``time_s``.
    """
    if not isinstance(a, nn.Module):
        raise NeuralignError("annealing_matching needs model A as an nn.Module (B may be a state "
                             "dict)")
    if steps < 1:
        raise NeuralignError(f"steps must be >= 1, got {steps}")
    if definition not in ("entezari", "frankle"):
        raise NeuralignError(f"unknown barrier definition {definition!r}; use 'entezari' or "
                             "'frankle'")
    ts = list(ts)
    if not ts or any(not 0.0 < float(t) < 1.0 for t in ts):
        raise NeuralignError("ts must be interior points of the path, each in (0, 1)")
    sd_a, sd_b = as_state_dict(a), as_state_dict(b)
    check_same_architecture([sd_a, sd_b], keys=spec.keys,
                            hint="alignment needs two models of the same architecture")
    spec.validate(sd_a)
    names = list(spec.groups) if groups is None else list(groups)
    for n in names:
        if n not in spec.groups:
            raise SpecError(f"group {n!r} is not in the spec (groups: {list(spec.groups)[:5]}...)")
    names = [n for n in names if spec.groups[n].size >= 2]
    perm = Permutation.identity(spec)
    if init is not None:
        check_permutation(init, spec)
        perm.update({k: torch.as_tensor(v).long().clone() for k, v in init.items()})

    def permuted(p: Mapping[str, torch.Tensor]) -> dict:
        out = dict(sd_b)
        for name, g in spec.groups.items():
            for pl in g.places:
                out[pl.key] = take_units(out[pl.key], pl, g.size, p[name].to(out[pl.key].device))
        return out

    t_start = time.perf_counter()
    energy = _Energy(a, sd_b, evaluate, ts, definition)
    cur_sd = permuted(perm)
    cur = energy(cur_sd)
    start = cur
    best, best_perm = cur, Permutation({k: v.clone() for k, v in perm.items()})
    if init is not None:  # the identity is always a candidate: never worse than no alignment
        e_id = energy(dict(sd_b))
        if e_id < best:
            best, best_perm = e_id, Permutation.identity(spec)
    temp0 = float(t0) if t0 is not None else 0.1 * abs(cur) + 1e-6
    if temp0 <= 0:
        raise NeuralignError(f"t0 must be positive, got {t0}")
    gen = torch.Generator().manual_seed(seed)
    history, accepted, done = [best], 0, 0
    for step in range(steps if names else 0):
        if time_budget_s is not None and time.perf_counter() - t_start > time_budget_s:
            break
        temp = temp0 * (t_final ** (step / max(steps - 1, 1)))
        name = names[int(torch.randint(len(names), (1,), generator=gen))]
        g = spec.groups[name]
        i, j = torch.randperm(g.size, generator=gen)[:2].tolist()
        swap = torch.arange(g.size)
        swap[i], swap[j] = j, i
        cand_sd = dict(cur_sd)
        for pl in g.places:
            cand_sd[pl.key] = take_units(cur_sd[pl.key], pl, g.size, swap.to(cur_sd[pl.key].device))
        e = energy(cand_sd)
        u = float(torch.rand((), generator=gen))
        if e <= cur or u < math.exp(-(e - cur) / temp):
            cur, cur_sd = e, cand_sd
            perm[name] = perm[name][swap]
            accepted += 1
            if e < best:
                best, best_perm = e, Permutation({k: v.clone() for k, v in perm.items()})
        history.append(best)
        done += 1
    best_perm.info = {"method": "annealing", "barrier": best, "barrier_init": start,
                      "history": history, "accepted": accepted, "steps": done,
                      "evaluations": energy.evals, "seed": seed, "definition": definition,
                      "ts": ts, "time_s": time.perf_counter() - t_start}
    return best_perm
