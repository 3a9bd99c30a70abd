"""Fisher-weighted averaging (Matena & Raffel, 2022) with the diagonal Fisher.

The Fisher is taken, as in the authors' code, with labels from the model's own predictive
distribution and the expectation over classes computed exactly:
``F = mean_x sum_y p(y|x) (d log p(y|x) / d theta)^2`` (``labels="expected"``). The empirical
Fisher (the data's labels, ``labels="empirical"``) and a one-sample Monte-Carlo estimate
(``labels="sampled"``) are options. Merging follows their code too: each model's Fisher may be
normalised to unit L2 norm over all its entries (``normalize=True``), and the target model
(``models[0]``) has its Fisher floored at ``fisher_floor``, so that where no model has any
Fisher mass the target's value is kept.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Iterable, Sequence

import torch
from torch import nn
from torch.func import functional_call, jacrev, vmap

from neuralign.errors import DataError, NeuralignError
from neuralign.evaluation import iter_batches
from neuralign.merge._fisher_layers import run_alone as _run_alone
from neuralign.merge._fisher_layers import squares as _layer_squares
from neuralign.merge._fisher_layers import supported as _fast_supported
from neuralign.merge._util import (
    as_state_dict,
    check_finite,
    check_same_architecture,
    device_of,
    like,
    normalize_weights,
    split_batch,
)

LABELS = ("expected", "empirical", "sampled")


def fisher_diagonal(model: nn.Module, loader: Iterable, *, n_examples: int = 256,
                    labels: str = "expected", seed: int = 0, empirical: bool | None = None,
                    max_floats: int = 2 ** 25) -> dict[str, torch.Tensor]:
    """Diagonal Fisher of ``model``'s parameters over up to ``n_examples`` examples of ``loader``.

    ``labels``: ``"expected"`` (default) -- ``sum_y p(y|x) (d log p(y|x)/d theta)^2``, the exact
    expectation under the model's predictive distribution (Matena & Raffel's code);
    ``"empirical"`` -- the empirical Fisher, with the loader's labels; ``"sampled"`` -- one label
    drawn from the model per example (seeded). ``empirical=True/False`` is the older spelling of
    ``"empirical"``/``"sampled"``. The model is evaluated in eval mode. Per-example gradients come
    from ``torch.func`` (``vmap`` of ``jacrev``, batches split so that at most ``max_floats``
    gradient entries exist at once); a model whose parameters all belong to ``nn.Linear``
    layers fed ``(batch, features)``, ``nn.Conv2d`` layers and eval-mode batch norms needs
    none: one backward pass per class gives the same sums of squares
    (:mod:`neuralign.merge._fisher_layers`; on the first batch, the first example run alone
    must see what it saw in the batch, else the model mixes examples and ``torch.func``
    computes them).
    """
    if empirical is not None:
        labels = "empirical" if empirical else "sampled"
    if labels not in LABELS:
        raise NeuralignError(f"unknown Fisher labels '{labels}'; use one of {', '.join(LABELS)}")
    m = copy.deepcopy(model).eval()
    dev = device_of(m)
    params = {k: v.detach() for k, v in m.named_parameters()}
    buffers = {k: v.detach() for k, v in m.named_buffers()}
    gen = torch.Generator(device="cpu").manual_seed(seed)

    def logp(p, x, idx):
        out = functional_call(m, (p, buffers), (x.unsqueeze(0),))
        return torch.log_softmax(out, -1)[0][idx]

    per_ex = vmap(jacrev(logp), in_dims=(None, 0, 0))
    acc = {k: torch.zeros_like(v) for k, v in params.items()}
    n_params = sum(v.numel() for v in params.values())
    fast, checked = _fast_supported(m), False
    n = 0
    for batch in iter_batches(loader):
        if n >= n_examples:
            break
        x, y = split_batch(batch)
        x = x[: n_examples - n].to(dev)
        idx, w = _targets(m, x, y, labels, gen)
        if fast:
            alone = None
            if not checked and len(x) > 1:  # once: does the model keep the examples apart?
                checked, alone = True, _run_alone(m, x[:1], idx[:1])
                fast = alone is not None
            fast = fast and _layer_squares(m, x, idx, w, acc, max_floats, alone)
            if fast:
                n += len(x)
                continue
        chunk = max(1, max_floats // max(1, idx.shape[1] * n_params))
        for s in range(0, len(x), chunk):
            g = per_ex(params, x[s:s + chunk], idx[s:s + chunk])
            ws = w[s:s + chunk]
            for k in acc:
                acc[k] += torch.einsum("bk,bk...->...", ws, g[k].square())
        n += len(x)
    if n == 0:
        raise DataError("the data loader yielded no batches; pass a non-empty loader for the Fisher")
    return {k: v / n for k, v in acc.items()}


def _targets(m: nn.Module, x: torch.Tensor, y, labels: str, gen: torch.Generator):
    """Label indices (B, K) and their weights (B, K) for the Fisher's expectation."""
    if labels == "empirical":
        if y is None:
            raise DataError("the empirical Fisher needs labels, and the loader yields none; use "
                            "labels='expected' (the model's own predictive distribution)")
        idx = y[: len(x)].to(x.device).long()[:, None]
        return idx, torch.ones(idx.shape, dtype=x.dtype, device=x.device)
    with torch.no_grad():
        probs = torch.softmax(m(x), -1)
    if labels == "sampled":
        idx = torch.multinomial(probs.cpu(), 1, generator=gen).to(x.device)
        return idx, torch.ones(idx.shape, dtype=probs.dtype, device=x.device)
    idx = torch.arange(probs.shape[1], device=x.device).expand(len(x), -1)
    return idx, probs


def fisher_merge(models: Sequence[nn.Module], fishers: Sequence[dict] | None = None, *,
                 loader: Iterable | None = None, weights: Sequence[float] | None = None,
                 n_examples: int = 256, labels: str = "expected", normalize: bool = True,
                 fisher_floor: float = 1e-6, favor_target: bool = True):
    """``theta = sum_j c_j F_j theta_j / sum_j c_j F_j`` per parameter entry (Matena & Raffel).

    ``c_j = w_j`` (the ``weights``, equal by default), divided by ``||F_j||`` (the L2 norm of
    model ``j``'s whole diagonal Fisher) when ``normalize`` (their code's default). The target
    model ``models[0]`` has its Fisher floored at ``fisher_floor`` (``favor_target=False``:
    every model's), so an entry no model has Fisher mass on keeps the target's value. Buffers
    (batch-norm statistics) and parameters without a Fisher are averaged with ``w``. Without
    ``fishers`` they are computed on ``loader`` (``n_examples``, ``labels``: see
    :func:`fisher_diagonal`).
    """
    sds = [as_state_dict(m) for m in models]
    for i, sd in enumerate(sds):
        check_finite(sd, f"model {i}")
    check_same_architecture(sds)
    w = normalize_weights(weights, len(sds))
    if fishers is None:
        if loader is None:
            raise DataError("fisher_merge needs `fishers` or a `loader` to compute them")
        fishers = [fisher_diagonal(m, loader, n_examples=n_examples, labels=labels) for m in models]
    if len(fishers) != len(sds):
        raise NeuralignError(f"got {len(fishers)} Fishers for {len(sds)} models; pass one per model")
    for j, f in enumerate(fishers):
        for k, v in f.items():
            if k not in sds[0] or tuple(v.shape) != tuple(sds[0][k].shape):
                raise NeuralignError(f"model {j}'s Fisher entry '{k}' does not match a parameter "
                                     "of the models")
            if not torch.isfinite(v).all() or (v < 0).any():
                raise NeuralignError(f"model {j}'s Fisher entry '{k}' is negative or not finite")
    coeff = list(w)
    if normalize:
        for j, f in enumerate(fishers):
            norm = math.sqrt(sum(float(v.double().square().sum()) for v in f.values()))
            if norm == 0.0:
                raise NeuralignError(f"model {j}'s Fisher is zero everywhere, so it cannot be "
                                     "normalised; pass normalize=False")
            coeff[j] = w[j] / norm
    out = {}
    for k, v in sds[0].items():
        if not v.is_floating_point():
            out[k] = v.clone()
            continue
        if all(k in f for f in fishers):
            lhs = torch.zeros_like(v, dtype=torch.float64)
            rhs = torch.zeros_like(lhs)
            for j, (f, sd) in enumerate(zip(fishers, sds)):
                diag = f[k].double().to(lhs.device)
                if j == 0 or not favor_target:
                    diag = diag.clamp_min(fisher_floor)
                lhs += coeff[j] * diag
                rhs += coeff[j] * diag * sd[k].double()
            merged = torch.where(lhs > 0, rhs / lhs.where(lhs > 0, torch.ones_like(lhs)),
                                 sds[0][k].double())
            out[k] = merged.to(v.dtype)
        else:
            out[k] = sum(wj * sd[k].double() for wj, sd in zip(w, sds)).to(v.dtype)
    return like(models[0], out)
