"""FedMA-style matched averaging of J models with width growth (survey §5.2.1, Eq. 14-15).

Layer by layer (input to output), each model's units are matched to the global model's units
by the Hungarian algorithm (SciPy) on a cost matrix with slack columns: matching local unit
``i`` to global unit ``g`` costs ``||v_i - mean_g||^2``; starting a new global unit costs
``eps + f(k)`` for the ``k``-th new unit (``f`` grows linearly), so a unit that is far from
every global unit extends the global width (up to ``max_width``). A unit's vector ``v_i`` is
its incoming weights, expressed in the global units of the previous layer, and its bias.
The global unit is the weighted mean of the local units matched to it, computed entry by entry
over the models that have that input (a model contributes nothing to global inputs it lacks).
Output units (classes) are not matched. ``n_iter > 1`` re-matches each model against the
global model without its own contribution (PFNM/FedMA's iterative refinement). Every batch norm between two layers (before or after the
activation) is averaged with its units, over the models matched to each global unit.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
import torch
from scipy.optimize import linear_sum_assignment
from torch import nn

from neuralign.errors import NeuralignError
from neuralign.merge._chain import build_chain, chain_layers, cpu_state, layer_tensors
from neuralign.merge._util import as_state_dict, check_finite, normalize_weights


@dataclass
class MatchedAveragingResult:
    """``model``: the global model; ``widths``: its hidden widths; ``assignments[j][l]``: for
    model ``j`` and hidden layer ``l`` a LongTensor mapping each local unit to its global unit;
    ``layer_names``: the chain's Conv/Linear module names (the last one is the output layer)."""

    model: nn.Module
    widths: list[int]
    assignments: list[list[torch.Tensor]]
    layer_names: list[str]
    info: dict = field(default_factory=dict)


def _scatter_inputs(t: dict, assign_prev: torch.Tensor | None, g_prev: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Unit vectors in the global input basis and a mask of which entries this model has."""
    w = t["w"].double()
    out, _n_in, r = w.shape
    if assign_prev is None:
        ws, mask = w, torch.ones_like(w)
    else:
        ws = w.new_zeros(out, g_prev, r)
        ws[:, assign_prev] = w
        mask = w.new_zeros(out, g_prev, r)
        mask[:, assign_prev] = 1.0
    v = ws.reshape(out, -1)
    m = mask.reshape(out, -1)
    if t["b"] is not None:
        v = torch.cat([v, t["b"].double()[:, None]], 1)
        m = torch.cat([m, torch.ones(out, 1, dtype=m.dtype)], 1)
    return v, m


def _match(v: torch.Tensor, mean: torch.Tensor, eps: float, step: float, cap: int) -> torch.Tensor:
    """Assign rows of ``v`` to rows of ``mean`` or to new units; returns indices (>= len(mean) = new)."""
    n, g = v.shape[0], mean.shape[0]
    n_new = max(0, min(n, cap - g))
    cost = torch.cdist(v, mean) ** 2 if g else v.new_zeros(n, 0)
    if n_new:
        slack = (eps + step * torch.arange(1, n_new + 1, dtype=v.dtype)).expand(n, n_new)
        cost = torch.cat([cost, slack], 1)
    if cost.shape[1] < n:
        raise NeuralignError(f"max_width {cap} is smaller than a model's width {n}")
    rows, cols = linear_sum_assignment(cost.numpy())
    out = torch.empty(n, dtype=torch.long)
    out[torch.from_numpy(rows)] = torch.from_numpy(cols).long()
    # new units get consecutive indices after the existing ones
    new = out >= g
    if new.any():
        order = torch.argsort(out[new])
        idx = torch.empty_like(order)
        idx[order] = torch.arange(len(order))
        out[new] = g + idx
    return out


def matched_averaging(models: Sequence[nn.Module], *, weights: Sequence[float] | None = None,
                      slack: float = 1.0, growth_penalty: float = 0.1,
                      max_width: int | Sequence[int] | None = None, n_iter: int = 2,
                      seed: int = 0) -> MatchedAveragingResult:
    """Match and average ``models`` (MLP/VGG-style chains) into one global model that may be wider.

    ``slack`` scales the new-unit cost ``eps = slack * mean ||v||^2`` (the mean squared norm of
    the local unit vectors of that layer); ``growth_penalty`` scales ``f(k) = growth_penalty *
    mean ||v||^2 * k / d`` for the ``k``-th new unit of a layer of local width ``d``.
    ``max_width`` caps the global width of every hidden layer (an int, one int per hidden layer,
    or None for at most the sum of the local widths). ``weights`` (e.g. client data sizes) weight
    the averages. Models are processed in a random order drawn from ``seed``.
    """
    J = len(models)
    if J == 0:
        raise ValueError("matched_averaging needs at least one model")
    w = normalize_weights(weights, J)
    sds = [cpu_state(as_state_dict(m)) for m in models]
    for i, sd in enumerate(sds):
        check_finite(sd, f"model {i}")
    layers_all = [chain_layers(m) for m in models]
    depth = len(layers_all[0])
    if any(len(ls) != depth for ls in layers_all):
        raise NeuralignError("matched_averaging needs models of the same depth")
    tens = [layer_tensors(sd, ls) for sd, ls in zip(sds, layers_all)]
    n_out = {t[-1]["w"].shape[0] for t in tens}
    if len(n_out) != 1:
        raise NeuralignError("the models have different numbers of outputs")
    order = np.random.default_rng(seed).permutation(J).tolist()
    caps = [max_width] * (depth - 1) if max_width is None or isinstance(max_width, int) else list(max_width)
    if len(caps) != depth - 1:
        raise NeuralignError(f"max_width needs {depth - 1} values (one per hidden layer)")
    assign_prev: list[torch.Tensor | None] = [None] * J
    g_prev = None
    fused, widths, assignments = [], [], [[] for _ in range(J)]
    for l in range(depth):
        vm = [_scatter_inputs(tens[j][l], assign_prev[j], g_prev) for j in range(J)]
        has_norm = tens[0][l]["norm"] is not None
        extras = [tens[j][l]["norm"].double().T if has_norm else None for j in range(J)]
        if l == depth - 1:
            num = sum(w[j] * vm[j][0] * vm[j][1] for j in range(J))
            den = sum(w[j] * vm[j][1] for j in range(J))
            glob = num / den.clamp_min(1e-12)
            fused.append(_unpack(glob, tens[0][l], g_prev, None))
            break
        sq = torch.cat([v for v, _ in vm]).pow(2).sum(1).mean().item()
        d = max(v.shape[0] for v, _ in vm)
        eps, step = slack * sq, growth_penalty * sq / d
        cap = caps[l] if caps[l] is not None else sum(v.shape[0] for v, _ in vm)
        assign: list[torch.Tensor | None] = [None] * J
        for it in range(n_iter):
            for j in order:
                others = [k for k in order if k != j and assign[k] is not None]
                g = int(max((assign[k].max().item() + 1 for k in others), default=0))
                num = torch.zeros(g, vm[j][0].shape[1], dtype=torch.float64)
                den = torch.zeros_like(num)
                for k in others:
                    num.index_add_(0, assign[k], w[k] * vm[k][0] * vm[k][1])
                    den.index_add_(0, assign[k], w[k] * vm[k][1])
                used = den.sum(1) > 0
                remap = torch.cumsum(used.long(), 0) - 1
                for k in others:
                    assign[k] = remap[assign[k]]
                mean = (num / den.clamp_min(1e-12))[used]
                assign[j] = _match(vm[j][0], mean, eps, step, cap)
        g = int(max(a.max().item() for a in assign) + 1)
        num = torch.zeros(g, vm[0][0].shape[1], dtype=torch.float64)
        den = torch.zeros_like(num)
        cnt = torch.zeros(g, dtype=torch.float64)
        ext = torch.zeros(g, extras[0].shape[1], dtype=torch.float64) if has_norm else None
        for j in range(J):
            num.index_add_(0, assign[j], w[j] * vm[j][0] * vm[j][1])
            den.index_add_(0, assign[j], w[j] * vm[j][1])
            cnt.index_add_(0, assign[j], torch.full((len(assign[j]),), w[j], dtype=torch.float64))
            if has_norm:
                ext.index_add_(0, assign[j], w[j] * extras[j])
        glob = num / den.clamp_min(1e-12)
        norm = (ext / cnt[:, None]).T if has_norm else None
        fused.append(_unpack(glob, tens[0][l], g_prev, norm))
        widths.append(g)
        for j in range(J):
            assignments[j].append(assign[j].clone())
        assign_prev, g_prev = assign, g
    model = build_chain(models[0], layers_all[0], fused)
    return MatchedAveragingResult(model, widths, assignments, [L.name for L in layers_all[0]])


def _unpack(glob: torch.Tensor, t0: dict, g_prev: int | None, norm) -> dict:
    out_n = glob.shape[0]
    n_in = t0["w"].shape[1] if g_prev is None else g_prev
    r = t0["w"].shape[2]
    has_b = t0["b"] is not None
    wflat = glob[:, : n_in * r]
    dt = t0["w"].dtype
    return {"w": wflat.reshape(out_n, n_in, r).to(dt),
            "b": glob[:, n_in * r].to(dt) if has_b else None,
            "norm": None if norm is None else norm.to(dt)}
