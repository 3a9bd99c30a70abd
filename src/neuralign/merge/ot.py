"""OT fusion (Singh & Jaggi, 2020): layer-wise optimal transport of units, then averaging.

Each model is aligned to the reference model (``models[reference]``, whose architecture and
widths the fused model takes) one layer at a time: the incoming weights are first expressed in
the reference's units of the previous layer, then a transport plan ``T`` between this layer's
units is found with POT (exact EMD, uniform marginals) for a ground cost between units:

* ``ground="weight"``: squared distance of the aligned incoming weights and bias;
* ``ground="activation"``: squared distance of the units' post-activation outputs on data (after
  the nonlinearity, and after a batch norm that follows it), as otfusion computes them;
* ``ground="preactivation"``: the same on the Conv/Linear outputs before any norm or
  nonlinearity (this library's earlier activation cost; the survey's description of Singh &
  Jaggi).

The aligned layer is ``diag(1/nu) T^T W``; batch norms between two layers travel with their
units. Output units (classes) are not transported. Different widths are supported; for equal
widths ``T`` is a permutation.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

import numpy as np
import ot
import torch
from torch import nn

from neuralign.errors import DataError, NeuralignError
from neuralign.merge._chain import (
    build_chain,
    chain_features,
    chain_layers,
    cpu_state,
    layer_tensors,
    transport_cols,
    transport_rows,
)
from neuralign.merge._util import as_state_dict, check_finite, normalize_weights

GROUNDS = ("weight", "activation", "preactivation")


@dataclass
class FusionResult:
    model: nn.Module
    transports: list[list[torch.Tensor]] = field(default_factory=list)  # [model][layer] (n_from, n_to)


def _emd(cost: torch.Tensor) -> torch.Tensor:
    n_from, n_to = cost.shape
    mu = np.full(n_from, 1.0 / n_from)
    nu = np.full(n_to, 1.0 / n_to)
    c = cost.cpu().numpy().astype(np.float64)
    c = c / max(c.max(), 1e-12)
    T = ot.emd(mu, nu, c, numItermax=1_000_000)
    return torch.from_numpy(T)


def ot_fusion(models: Sequence[nn.Module], *, weights: Sequence[float] | None = None,
              reference: int = 0, ground: str = "weight", loader: Iterable | None = None,
              n_samples: int = 512) -> FusionResult:
    """Fuse ``models`` (MLP/VGG-style chains, widths may differ) into ``models[reference]``'s shape.

    ``ground``: ``"weight"`` (no data), ``"activation"`` (post-activation outputs on ``loader``,
    as otfusion) or ``"preactivation"`` (Conv/Linear outputs on ``loader``); ``n_samples``
    inputs are used for the activation costs. See the module docstring."""
    if ground not in GROUNDS:
        raise NeuralignError(f"unknown OT ground cost '{ground}'; use one of {', '.join(GROUNDS)}")
    if ground != "weight" and loader is None:
        raise DataError(f"OT fusion with ground='{ground}' needs a `loader` (data to run the models on)")
    w = normalize_weights(weights, len(models))
    ref = models[reference]
    ref_layers = chain_layers(ref)
    sds = [cpu_state(as_state_dict(m)) for m in models]
    for i, sd in enumerate(sds):
        check_finite(sd, f"model {i}")
    per_model_layers = [chain_layers(m) for m in models]
    for i, ls in enumerate(per_model_layers):
        if len(ls) != len(ref_layers):
            raise NeuralignError(f"model {i} has {len(ls)} layers, the reference {len(ref_layers)}; "
                                 "OT fusion needs the same depth")
    tens = [layer_tensors(sd, ls) for sd, ls in zip(sds, per_model_layers)]
    acts = None
    if ground != "weight":
        pick = (lambda L: L.post) if ground == "activation" else (lambda L: L.node)
        acts = [chain_features(m, [pick(L) for L in ls[:-1]], loader, n_samples, "OT fusion")
                for m, ls in zip(models, per_model_layers)]
    ref_t = tens[reference]
    aligned_all, transports = [], []
    for i in range(len(models)):
        if i == reference:
            aligned_all.append(ref_t)
            transports.append([])
            continue
        prev = None
        aligned, plans = [], []
        for l, t in enumerate(tens[i]):
            t = dict(t)
            if prev is not None:
                t = transport_cols(prev.to(t["w"].dtype), t)
            if l == len(tens[i]) - 1:
                if t["w"].shape[0] != ref_t[l]["w"].shape[0]:
                    raise NeuralignError("the models have different numbers of outputs")
                aligned.append(t)
                break
            if ground == "weight":
                fa = _unit_features(ref_t[l])
                fb = _unit_features(t)
                if fa.shape[1] != fb.shape[1]:
                    raise NeuralignError(f"layer {l}: incoming sizes differ after alignment")
                cost = torch.cdist(fb.double(), fa.double()) ** 2
            else:
                cost = torch.cdist(acts[i][l].T.contiguous(), acts[reference][l].T.contiguous()) ** 2
            T = _emd(cost)
            M = (T * T.shape[1]).to(t["w"].dtype)  # T / nu with nu = 1/n_to
            plans.append(T)
            aligned.append(transport_rows(M, t))
            prev = M
        aligned_all.append(aligned)
        transports.append(plans)
    fused = []
    for l in range(len(ref_layers)):
        f = {}
        for key in ("w", "b", "norm"):
            if ref_t[l][key] is None:
                f[key] = None
            else:
                f[key] = sum(wj * a[l][key].double() for wj, a in zip(w, aligned_all)).to(ref_t[l][key].dtype)
        fused.append(f)
    return FusionResult(build_chain(ref, ref_layers, fused), transports)


def _unit_features(t: dict) -> torch.Tensor:
    f = t["w"].reshape(t["w"].shape[0], -1)
    if t["b"] is not None:
        f = torch.cat([f, t["b"][:, None]], 1)
    return f
