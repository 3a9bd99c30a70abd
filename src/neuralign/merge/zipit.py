"""ZipIt-style merging (Stoica et al., 2024) of two MLP/VGG-style chains.

At every hidden layer the features of both models (outputs of the layer, after its batch norm
if any, on ``loader``) are concatenated, their correlation matrix is computed, and features are
paired greedily by highest correlation -- a pair may come from the same model (``within=True``)
or must span both models (``within=False``, which reduces to permutation matching). A merge
matrix ``M`` (n × 2n, averaging each pair) and an unmerge matrix ``U`` (2n × n, copying the
merged feature back to both members) describe the zip: layer ``l`` of the merged model is
``M_l [W_A U_A; W_B U_B]`` with ``U`` of the previous layer. With ``stop_at=k`` only the first
``k`` hidden layers are zipped; the rest of both models is kept side by side (block-diagonal,
twice as wide) and the outputs are averaged, so the result is still a plain chain model.
The greedy pairing is sequential by nature (one pick per merged feature).
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field

import torch
from torch import nn

from neuralign.errors import NeuralignError
from neuralign.merge._chain import build_chain, chain_layers, layer_tensors, transport_cols
from neuralign.merge._util import as_state_dict, check_finite, check_same_architecture
from neuralign.merge.ot import _activations


@dataclass
class ZipResult:
    model: nn.Module
    merges: list[torch.Tensor] = field(default_factory=list)
    unmerges: list[torch.Tensor] = field(default_factory=list)


def _greedy_pairs(f: torch.Tensor, n_a: int, within: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """Pair 2n features greedily by correlation; returns (M (n × 2n), U (2n × n))."""
    f = f - f.mean(0)
    std = f.std(0).clamp_min(1e-8)
    corr = (f.T @ f) / (f.shape[0] - 1) / (std[:, None] * std[None, :])
    n2 = corr.shape[0]
    corr.fill_diagonal_(-float("inf"))
    if not within:
        corr[:n_a, :n_a] = -float("inf")
        corr[n_a:, n_a:] = -float("inf")
    n = n2 // 2
    M = torch.zeros(n, n2, dtype=torch.float64)
    for k in range(n):
        flat = int(torch.argmax(corr))
        i, j = divmod(flat, n2)
        M[k, i] = M[k, j] = 0.5
        corr[[i, j], :] = -float("inf")
        corr[:, [i, j]] = -float("inf")
    U = (M > 0).double().T.contiguous()
    return M, U


def zipit(models, loader: Iterable, *, stop_at: int | None = None, within: bool = True,
          n_samples: int = 512) -> ZipResult:
    """Zip two models of the same architecture into one (see the module docstring)."""
    if len(models) != 2:
        raise NeuralignError(f"zipit merges exactly two models, got {len(models)}")
    a, b = models
    sds = [as_state_dict(a), as_state_dict(b)]
    for i, sd in enumerate(sds):
        check_finite(sd, f"model {i}")
    check_same_architecture(sds)
    layers = chain_layers(a)
    L = len(layers)
    k = L - 1 if stop_at is None else int(stop_at)
    if not 0 <= k <= L - 1:
        raise NeuralignError(f"stop_at must be between 0 and {L - 1} (hidden layers), got {stop_at}")
    ta, tb = layer_tensors(sds[0], layers), layer_tensors(sds[1], layers)
    probe = [type("P", (), {"name": x.norm or x.name})() for x in layers[:-1]]
    fa = _activations(a, probe, loader, n_samples) if k else []
    fb = _activations(b, probe, loader, n_samples) if k else []
    out, merges, unmerges = [], [], []
    U_prev, n_a_prev = None, 0
    for l in range(L):
        A, B = dict(ta[l]), dict(tb[l])
        n_a = A["w"].shape[0]
        if U_prev is not None and l <= k:
            A = transport_cols(U_prev[:n_a_prev].to(A["w"].dtype), A)
            B = transport_cols(U_prev[n_a_prev:].to(B["w"].dtype), B)
        if l < k:
            M, U = _greedy_pairs(torch.cat([fa[l], fb[l]], 1), n_a, within)
            Mf = M.T.to(A["w"].dtype)  # (2n, n) for transport_rows: rows_to = Mf^T rows_from
            stacked = _stack_rows(A, B)
            from neuralign.merge._chain import transport_rows

            out.append(transport_rows(Mf, stacked))
            merges.append(M.float())
            unmerges.append(U.float())
            U_prev, n_a_prev = U, n_a
        elif l == L - 1:
            if k == L - 1:
                out.append(_avg(A, B))
            else:
                w = torch.cat([A["w"], B["w"]], 1) / 2
                bias = None if A["b"] is None else (A["b"] + B["b"]) / 2
                out.append({"w": w, "b": bias, "norm": None})
        elif l == k:
            out.append(_stack_rows(A, B))
        else:
            out.append(_block_diag(A, B))
    return ZipResult(build_chain(a, layers, out), merges, unmerges)


def _stack_rows(A, B):
    return {"w": torch.cat([A["w"], B["w"]], 0),
            "b": None if A["b"] is None else torch.cat([A["b"], B["b"]]),
            "norm": None if A["norm"] is None else torch.cat([A["norm"], B["norm"]], 1)}


def _block_diag(A, B):
    oa, ia, r = A["w"].shape
    ob, ib, _ = B["w"].shape
    w = A["w"].new_zeros(oa + ob, ia + ib, r)
    w[:oa, :ia] = A["w"]
    w[oa:, ia:] = B["w"]
    s = _stack_rows(A, B)
    s["w"] = w
    return s


def _avg(A, B):
    return {"w": (A["w"] + B["w"]) / 2, "b": None if A["b"] is None else (A["b"] + B["b"]) / 2,
            "norm": None if A["norm"] is None else (A["norm"] + B["norm"]) / 2}
