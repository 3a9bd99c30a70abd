"""Fisher-weighted averaging (Matena & Raffel, 2022) with the diagonal empirical Fisher."""

from __future__ import annotations

import copy
from collections.abc import Iterable, Sequence

import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call, grad, vmap

from neuralign.errors import DataError
from neuralign.evaluation import iter_batches
from neuralign.merge._util import (
    as_state_dict,
    check_finite,
    check_same_architecture,
    device_of,
    like,
    normalize_weights,
    split_batch,
)


def fisher_diagonal(model: nn.Module, loader: Iterable, *, n_examples: int = 256,
                    empirical: bool = True, seed: int = 0) -> dict[str, torch.Tensor]:
    """Diagonal Fisher ``E[(d log p(y|x) / d theta)^2]`` over up to ``n_examples`` examples.

    ``empirical=True`` uses the data labels (the empirical Fisher); ``False`` samples ``y`` from
    the model's predictive distribution (seeded). Per-example gradients via ``torch.func``;
    the model is evaluated in eval mode.
    """
    m = copy.deepcopy(model).eval()
    dev = device_of(m)
    params = {k: v.detach() for k, v in m.named_parameters()}
    buffers = {k: v.detach() for k, v in m.named_buffers()}
    gen = torch.Generator(device="cpu").manual_seed(seed)

    def logp(p, x, y):
        out = functional_call(m, (p, buffers), (x.unsqueeze(0),))
        return -F.cross_entropy(out, y.unsqueeze(0))

    per_ex = vmap(grad(logp), in_dims=(None, 0, 0))
    acc = {k: torch.zeros_like(v) for k, v in params.items()}
    n = 0
    for batch in iter_batches(loader):
        if n >= n_examples:
            break
        x, y = split_batch(batch)
        x = x[: n_examples - n].to(dev)
        if not empirical or y is None:
            with torch.no_grad():
                probs = torch.softmax(m(x), -1).cpu()
            y = torch.multinomial(probs, 1, generator=gen)[:, 0]
        y = y[: len(x)].to(dev)
        g = per_ex(params, x, y)
        for k in acc:
            acc[k] += (g[k] ** 2).sum(0)
        n += len(x)
    if n == 0:
        raise DataError("the data loader yielded no batches; pass a non-empty loader for the Fisher")
    return {k: v / n for k, v in acc.items()}


def fisher_merge(models: Sequence[nn.Module], fishers: Sequence[dict] | None = None, *,
                 loader: Iterable | None = None, weights: Sequence[float] | None = None,
                 n_examples: int = 256, eps: float = 1e-8):
    """``theta = sum_j w_j F_j theta_j / sum_j w_j F_j`` per parameter entry (``F_j + eps``).

    Buffers (batch-norm statistics) and parameters without a Fisher are averaged with ``w``.
    With equal Fishers this is exactly the weighted average.
    """
    sds = [as_state_dict(m) for m in models]
    for i, sd in enumerate(sds):
        check_finite(sd, f"model {i}")
    check_same_architecture(sds)
    w = normalize_weights(weights, len(sds))
    if fishers is None:
        if loader is None:
            raise DataError("fisher_merge needs `fishers` or a `loader` to compute them")
        fishers = [fisher_diagonal(m, loader, n_examples=n_examples) for m in models]
    out = {}
    for k, v in sds[0].items():
        if not v.is_floating_point():
            out[k] = v.clone()
            continue
        if all(k in f for f in fishers):
            num = sum(wj * (f[k].double() + eps) * sd[k].double() for wj, f, sd in zip(w, fishers, sds))
            den = sum(wj * (f[k].double() + eps) for wj, f in zip(w, fishers))
            out[k] = (num / den).to(v.dtype)
        else:
            out[k] = sum(wj * sd[k].double() for wj, sd in zip(w, sds)).to(v.dtype)
    return like(models[0], out)
