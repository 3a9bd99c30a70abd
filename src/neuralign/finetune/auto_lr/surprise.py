"""Layerwise surprise (Eq. 1 of Agarwala et al., after Eastwood et al.'s unit-level surprise).

For every layer, the outputs of its module (the parameterised module at tensor granularity, the
block at block granularity) are flattened to units; each unit's range over source ∪ target is
cut into ``bins`` equal bins, the bin frequencies give ``π^{k,src}`` and ``π^{k,tgt}``, and

    s_ℓ = Σ_k Σ_i π_i^{k,tgt} log(π_i^{k,tgt} / π_i^{k,src}).

Frequencies are smoothed by ``smoothing`` pseudo-counts so empty source bins stay finite.
Two passes over the data (ranges, then counts) keep memory at O(units · bins).
"""

from __future__ import annotations

import torch
from torch import nn

from neuralign.errors import NeuralignError
from neuralign.finetune.auto_lr.layers import Layer, normalise_scores


def _first_tensor(out):
    if isinstance(out, torch.Tensor):
        return out
    if isinstance(out, (list, tuple)) and out and isinstance(out[0], torch.Tensor):
        return out[0]
    if hasattr(out, "last_hidden_state"):
        return out.last_hidden_state
    raise NeuralignError(f"cannot read activations of type {type(out).__name__}")


def _sweep(model: nn.Module, batches: list, module_names: list[str], fn) -> list[str]:
    """Run ``batches`` through ``model`` calling ``fn(name, acts(N, K))`` per hooked module.

    Returns the module names in the order they first ran (the forward order)."""
    mods = dict(model.named_modules())
    order: list[str] = []

    def hook_for(name):
        def hook(_m, _inp, out):
            a = _first_tensor(out).detach()
            if name not in order:
                order.append(name)
            fn(name, a.reshape(a.shape[0], -1).float())
        return hook

    handles = [mods[n].register_forward_hook(hook_for(n)) for n in module_names]
    was = model.training
    model.eval()
    try:
        with torch.no_grad():
            for x, _ in batches:
                model(x)
    finally:
        model.train(was)
        for h in handles:
            h.remove()
    return order


def module_surprise(model: nn.Module, source_batches: list, target_batches: list,
                    module_names: list[str], *, bins: int = 8, smoothing: float = 1e-3,
                    reduce: str = "sum") -> tuple[dict[str, float], list[str]]:
    """Surprise per module and the modules' forward order."""
    if bins < 2:
        raise NeuralignError(f"bins must be >= 2, got {bins}")
    if reduce not in ("sum", "mean"):
        raise NeuralignError(f"reduce must be 'sum' or 'mean', got {reduce!r}")
    lo: dict[str, torch.Tensor] = {}
    hi: dict[str, torch.Tensor] = {}

    def ranges(name, a):
        mn, mx = a.min(0).values, a.max(0).values
        lo[name] = mn if name not in lo else torch.minimum(lo[name], mn)
        hi[name] = mx if name not in hi else torch.maximum(hi[name], mx)

    order = _sweep(model, source_batches, module_names, ranges)
    _sweep(model, target_batches, module_names, ranges)
    counts: dict[tuple[str, str], torch.Tensor] = {}

    def counter(which):
        def fn(name, a):
            width = (hi[name] - lo[name]).clamp_min(1e-12)
            idx = ((a - lo[name]) / width * bins).floor().long().clamp_(0, bins - 1)
            k = a.shape[1]
            flat = (torch.arange(k, device=a.device) * bins + idx).reshape(-1)
            c = counts.setdefault((which, name), torch.zeros(k * bins, device=a.device,
                                                             dtype=torch.float64))
            c.index_add_(0, flat, torch.ones_like(flat, dtype=torch.float64))
        return fn

    _sweep(model, source_batches, module_names, counter("src"))
    _sweep(model, target_batches, module_names, counter("tgt"))
    out = {}
    for name in module_names:
        if ("src", name) not in counts:
            raise NeuralignError(f"module {name!r} never ran in the forward pass")
        cs = counts[("src", name)].view(-1, bins) + smoothing
        ct = counts[("tgt", name)].view(-1, bins) + smoothing
        p, q = ct / ct.sum(1, keepdim=True), cs / cs.sum(1, keepdim=True)
        kl = (p * (p / q).log()).sum(1)
        out[name] = float(kl.sum() if reduce == "sum" else kl.mean())
    return out, order


def surprise_scores(model: nn.Module, source_batches: list, target_batches: list,
                    layers: list[Layer], *, diff: bool = False, bins: int = 8,
                    smoothing: float = 1e-3, reduce: str = "sum") -> dict[str, float]:
    """Raw layerwise surprise per layer; with ``diff=True`` the increment over the previous
    module in forward order, ``max(0, s_ℓ − s_{ℓ−1})`` (the paper prints ``min``, which could
    only be ≤ 0) with ``s_0 = 0``."""
    modules = list(dict.fromkeys(m for layer in layers for m in layer.module_names))
    per_mod, order = module_surprise(model, source_batches, target_batches, modules, bins=bins,
                                     smoothing=smoothing, reduce=reduce)
    if diff:
        prev, inc = 0.0, {}
        for m in order:
            inc[m] = max(0.0, per_mod[m] - prev)
            prev = per_mod[m]
        per_mod = inc
    return {layer.name: max(per_mod[m] for m in layer.module_names) for layer in layers}


def surprise_weights(model, source_batches, target_batches, layers, **kw):
    raw = surprise_scores(model, source_batches, target_batches, layers, **kw)
    return normalise_scores(raw), raw
