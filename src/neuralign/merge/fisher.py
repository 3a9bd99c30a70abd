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
    the model is evaluated in eval mode. A model whose parameters all belong to ``nn.Linear``
    layers fed ``(batch, features)`` (an MLP) needs no per-example gradients: one batch
    backward gives the same sums of squares (``_linear_squares``).
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
    linear_only = _linear_only(m)
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
        if linear_only and _linear_squares(m, x, y, acc):
            n += len(x)
            continue
        linear_only = False
        g = per_ex(params, x, y)
        for k in acc:
            acc[k] += g[k].square_().sum(0)
        n += len(x)
    if n == 0:
        raise DataError("the data loader yielded no batches; pass a non-empty loader for the Fisher")
    return {k: v / n for k, v in acc.items()}


def _linear_only(m: nn.Module) -> bool:
    """Every parameter belongs to an ``nn.Linear`` (an MLP): per-example squared gradients then
    come from one batch backward (``_linear_squares``)."""
    owners = {id(p) for mod in m.modules() if type(mod) is nn.Linear
              for p in mod.parameters(recurse=False)}
    ps = list(m.parameters())
    return bool(ps) and all(id(p) in owners and p.requires_grad for p in ps)


def _linear_squares(m: nn.Module, x: torch.Tensor, y: torch.Tensor, acc: dict) -> bool:
    """Add the per-example squared gradients of a batch to ``acc`` for a model whose parameters
    are all ``nn.Linear``'s, without materialising per-example gradients: with the summed loss,
    the gradient at a linear layer's output is per example (eval mode couples no examples), and
    example ``i``'s weight gradient is ``g_i x_i^T``, whose square sums to ``(g^2)^T (x^2)``.
    False (nothing added) when a linear layer sees other than ``(batch, features)`` inputs."""
    names = {mod: name for name, mod in m.named_modules() if type(mod) is nn.Linear}
    inputs, grads, ok = {}, {}, [True]

    def fwd(mod, inp, out):
        if inp[0].dim() != 2 or mod in inputs or not out.requires_grad:
            ok[0] = False
            return
        inputs[mod] = inp[0].detach()
        out.register_hook(lambda g, mod=mod: grads.__setitem__(mod, g.detach()))

    hs = [mod.register_forward_hook(fwd) for mod in names]
    try:
        with torch.enable_grad():
            out = m(x)
            if out.dim() != 2 or not ok[0]:
                return False
            # d log p / d out for each example: the summed loss leaves the rows per example
            loss = F.cross_entropy(out, y, reduction="sum")
            torch.autograd.grad(loss, [p for p in m.parameters()], allow_unused=True)
    finally:
        for h in hs:
            h.remove()
    if not ok[0] or len(grads) != len(names):
        return False
    for mod, name in names.items():
        g2, x2 = grads[mod].square(), inputs[mod].square()
        acc[f"{name}.weight" if name else "weight"] += g2.T @ x2
        if mod.bias is not None:
            acc[f"{name}.bias" if name else "bias"] += g2.sum(0)
    return True


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
