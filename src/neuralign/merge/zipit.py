"""ZipIt! (Stoica et al., 2024) for N >= 2 MLP/VGG-style chains of the same architecture.

At every zipped hidden layer the post-activation features of all models on ``loader`` (after
the nonlinearity, and after a batch norm that follows it -- where ZipIt's graphs place their
merge points) are concatenated, ``N n`` features, and their correlation matrix is computed.
Features are then merged greedily until ``n`` groups remain: repeatedly the two most correlated
groups that may still be merged become one. A merged group's correlation with any other group
is the minimum over its members (complete linkage), and two options of the authors' matching
shape which merges are allowed:

* ``alpha`` (α, multi-way merging): a merge that would give an already formed group a second
  feature of one model has its similarity scaled by ``alpha``; ``alpha = 0`` forbids it (each
  group then holds at most one feature per model, except a same-model pair formed first where
  ``beta`` allows it). Joining a feature of a model the group has no member from is never
  scaled, so N copies of a feature still zip into one group.
* ``beta`` (β, same-model budget): each model may take part in at most
  ``floor(beta * (N - 1) n / N)`` merges between two groups made of its own features only.
  ``beta = 0``: every merge spans models (with ``alpha = 0`` and two models this is permutation
  matching); ``beta = 1``: no limit.

The merge matrix ``M`` (groups x ``N n``) averages a group's members and the unmerge matrix
``U`` (``N n`` x groups) copies it back to every member; layer ``l`` of the merged model is
``M_l [W_1 U_1; ...; W_N U_N]`` with ``U`` of the previous layer split by model. With
``stop_at=k`` only the first ``k`` hidden layers are zipped and the rest of all models is kept
side by side (block-diagonal, N times as wide), their outputs averaged, so the result is still a
plain chain model; ``stop_at=0`` is the output ensemble. Batch norms between two layers are
merged with their units. The greedy merging is sequential by nature (one merge per step, each
step vectorised over all pairs).
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field

import torch
from torch import nn

from neuralign.errors import NeuralignError
from neuralign.merge._chain import (
    build_chain,
    chain_features,
    chain_layers,
    cpu_state,
    layer_tensors,
    transport_cols,
    transport_rows,
)
from neuralign.merge._util import as_state_dict, check_finite, check_same_architecture


@dataclass
class ZipResult:
    """``merges[l]`` (groups x N n) and ``unmerges[l]`` (N n x groups) for every zipped layer."""

    model: nn.Module
    merges: list[torch.Tensor] = field(default_factory=list)
    unmerges: list[torch.Tensor] = field(default_factory=list)


def zip_features(f: torch.Tensor, n_models: int, *, alpha: float, beta: float,
                 units: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Greedy ZipIt matching of the features ``f`` (rows, N n; model j's block is the j-th
    ``n`` columns). Returns ``(M, U)``: ``M`` (groups x N n) averages each group, ``U`` copies it
    back. Stops early (more groups) only when no admissible merge is left.

    Features constant on the data (dead units) have no correlation: two equal constant features
    get similarity 1, any other pair with one of them 0. Ties are broken by distance: ``1e-6``
    times the squared distance of the features (and of ``units``, one descriptor row per
    feature, e.g. its incoming weights), each over its mean, is subtracted from the similarity,
    so that a feature's exact copy is preferred."""
    n_all = f.shape[1]
    n = n_all // n_models
    f = f.double()
    penalty = _scaled_sq_dist(f.T)
    if units is not None:
        penalty = penalty + _scaled_sq_dist(units.double())
    sim = _correlation(f) - 1e-6 * penalty
    z = _Zip(n_all, n_models, n, alpha, beta)
    for _ in range(n_all - n):
        flat = int(torch.argmax((sim * z.scale).masked_fill(~z.ok, -float("inf"))))
        i, j = sorted(divmod(flat, n_all))
        if not z.ok[i, j]:
            break  # nothing admissible is left: the layer keeps more groups
        row = torch.minimum(sim[i], sim[j])
        sim[i], sim[:, i] = row, row
        z.merge(i, j)
    groups = z.members[z.active]
    U = groups.T.double().contiguous()
    M = groups.double() / groups.sum(1, keepdim=True)
    return M, U


class _Zip:
    """Book-keeping of the greedy zip: groups, the models they span, same-model budgets, which
    pairs of groups may still merge (``ok``) and the factor on their similarity (``scale``:
    ``alpha`` where the merge would give a formed group a second feature of one model)."""

    def __init__(self, n_all: int, n_models: int, n: int, alpha: float, beta: float):
        self.alpha = alpha
        owner = torch.arange(n_all) // n
        self.models_in = nn.functional.one_hot(owner, n_models).bool()
        self.members = torch.eye(n_all, dtype=torch.bool)
        self.active = torch.ones(n_all, dtype=torch.bool)
        self.budget = torch.full((n_models,), int(beta * ((n_all - n) // n_models) + 1e-9))
        same = owner[:, None] == owner[None, :]
        self.ok = ~same | (self.budget[owner] > 0)[:, None]
        self.ok.fill_diagonal_(False)
        self.scale = torch.ones(n_all, n_all, dtype=torch.float64)

    def _single(self) -> torch.Tensor:
        return self.active & (self.models_in.sum(1) == 1)

    def merge(self, i: int, j: int) -> None:
        single = self._single()
        within = bool(single[i] and single[j] and torch.equal(self.models_in[i], self.models_in[j]))
        self.members[i] |= self.members[j]
        self.models_in[i] |= self.models_in[j]
        self.active[j] = False
        self.ok[j], self.ok[:, j] = False, False
        single = self._single()
        overlap = (self.models_in & self.models_in[i]).any(1)
        row = self.active.clone()
        row[i] = False
        if self.alpha <= 0:  # a formed group takes no second feature from any model
            row &= ~overlap
        if bool(single[i]):  # a group of one model's features: merging it with another is
            m = int(self.models_in[i].nonzero()[0])  # a same-model merge (budgeted)
            if self.budget[m] - int(within) <= 0:
                row &= ~(single & self.models_in[:, m])
        self.ok[i], self.ok[:, i] = row, row
        srow = torch.where(overlap, self.alpha, 1.0).double()
        self.scale[i], self.scale[:, i] = srow, srow
        if within:
            m = int(self.models_in[i].nonzero()[0])
            self.budget[m] -= 1
            if self.budget[m] <= 0:  # no more merges between groups of model m's features only
                only = self._single() & self.models_in[:, m]
                self.ok[only[:, None] & only[None, :]] = False


def _correlation(f: torch.Tensor) -> torch.Tensor:
    """Correlation of the feature columns. A feature constant on the data (a dead unit) has no
    correlation: two equal constant features get 1, any other pair with one gets 0."""
    mean = f.mean(0)
    fc = f - mean
    std = fc.std(0)
    const = std <= 1e-9 * (1.0 + f.abs().amax(0))
    std = torch.where(const, torch.ones_like(std), std)
    corr = (fc.T @ fc) / max(f.shape[0] - 1, 1) / (std[:, None] * std[None, :])
    either = const[:, None] | const[None, :]
    equal = (mean[:, None] - mean[None, :]).abs() <= 1e-6 * (1.0 + mean.abs()[:, None] + mean.abs()[None, :])
    both = const[:, None] & const[None, :]
    return torch.where(either, (both & equal).double(), corr)


def _scaled_sq_dist(v: torch.Tensor) -> torch.Tensor:
    d = torch.cdist(v, v) ** 2
    return d / d.mean().clamp_min(1e-30)


def zipit(models, loader: Iterable, *, stop_at: int | None = None, alpha: float = 0.3,
          beta: float = 0.125, within: bool | None = None, n_samples: int = 512) -> ZipResult:
    """Zip ``models`` (two or more, same architecture) into one; see the module docstring.

    ``alpha``/``beta`` default to the authors' matching-function defaults (0.3, 0.125).
    ``within`` is the older shorthand: ``False`` is ``alpha=0, beta=0`` (cross-model pairs
    only: permutation matching for two models), ``True`` is ``alpha=0, beta=1``.
    ``n_samples`` inputs of ``loader`` give the features."""
    n_models = len(models)
    if n_models < 2:
        raise NeuralignError(f"zipit merges two or more models, got {n_models}")
    if within is not None:
        alpha, beta = 0.0, (1.0 if within else 0.0)
    if not 0.0 <= float(alpha) <= 1.0:
        raise NeuralignError(f"zipit alpha must be in [0, 1] (0: no multi-way merges), got {alpha}")
    if not 0.0 <= float(beta) <= 1.0:
        raise NeuralignError(f"zipit beta must be in [0, 1] (0: no same-model merges), got {beta}")
    sds = [cpu_state(as_state_dict(m)) for m in models]
    for i, sd in enumerate(sds):
        check_finite(sd, f"model {i}")
    check_same_architecture(sds)
    layers = chain_layers(models[0])
    n_layers = len(layers)
    k = n_layers - 1 if stop_at is None else int(stop_at)
    if not 0 <= k <= n_layers - 1:
        raise NeuralignError(f"stop_at must be between 0 and {n_layers - 1} (hidden layers), got {stop_at}")
    tens = [layer_tensors(sd, layers) for sd in sds]
    posts = [L.post for L in layers[:k]]
    feats = [chain_features(m, posts, loader, n_samples, "ZipIt") for m in models] if k else []
    out, merges, unmerges = [], [], []
    u_prev = None
    for l in range(n_layers):
        ts = [dict(t[l]) for t in tens]
        if u_prev is not None and l <= k:
            blocks = u_prev.split(u_prev.shape[0] // n_models)
            ts = [transport_cols(ub.to(t["w"].dtype), t) for ub, t in zip(blocks, ts)]
        if l < k:
            stacked = _stack_rows(ts)
            M, U = zip_features(torch.cat([f[l] for f in feats], 1), n_models, alpha=alpha,
                                beta=beta, units=_descriptors(stacked))
            out.append(transport_rows(M.T.to(ts[0]["w"].dtype), stacked))
            merges.append(M.float())
            unmerges.append(U.float())
            u_prev = U
        elif l == n_layers - 1:
            out.append(_mean(ts) if k == n_layers - 1 else _mean_of_heads(ts))
        elif l == k:
            out.append(_stack_rows(ts))
        else:
            out.append(_block_diag(ts))
    return ZipResult(build_chain(models[0], layers, out), merges, unmerges)


def _descriptors(t: dict) -> torch.Tensor:
    """One row per unit: incoming weights (in the merged input basis), bias, norm parameters."""
    parts = [t["w"].reshape(t["w"].shape[0], -1)]
    if t["b"] is not None:
        parts.append(t["b"][:, None])
    if t["norm"] is not None:
        parts.append(t["norm"].T)
    return torch.cat(parts, 1)


def _cat(ts, key, dim):
    return None if ts[0][key] is None else torch.cat([t[key] for t in ts], dim)


def _stack_rows(ts):
    return {"w": _cat(ts, "w", 0), "b": _cat(ts, "b", 0), "norm": _cat(ts, "norm", 1)}


def _block_diag(ts):
    out_sizes = [t["w"].shape[0] for t in ts]
    in_sizes = [t["w"].shape[1] for t in ts]
    w = ts[0]["w"].new_zeros(sum(out_sizes), sum(in_sizes), ts[0]["w"].shape[2])
    o = i = 0
    for t, a, b in zip(ts, out_sizes, in_sizes):
        w[o:o + a, i:i + b] = t["w"]
        o, i = o + a, i + b
    return {**_stack_rows(ts), "w": w}


def _mean(ts):
    return {key: None if ts[0][key] is None else sum(t[key] for t in ts) / len(ts)
            for key in ("w", "b", "norm")}


def _mean_of_heads(ts):
    """The output layer over the side-by-side features of all models: their outputs averaged."""
    return {"w": _cat(ts, "w", 1) / len(ts),
            "b": None if ts[0]["b"] is None else sum(t["b"] for t in ts) / len(ts), "norm": None}
