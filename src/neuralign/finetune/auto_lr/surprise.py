"""Layerwise surprise (Eq. 1 of Agarwala et al., after Eastwood et al.'s unit-level surprise).

For every layer, the units are its post-activation outputs (``at="post_activation"``, the
default: the output of the first activation module that runs after the layer's module, skipping
normalisation, dropout and identity modules; a layer with no such activation, e.g. the head,
uses its own output; at block granularity the block's output), flattened; each unit's range
over source ∪ target is cut into ``bins`` equal bins, the bin frequencies give ``π^{k,src}`` and
``π^{k,tgt}``, and the layer's surprise is the mean over its ``K`` units

    s_ℓ = (1/K) Σ_k Σ_i π_i^{k,tgt} log(π_i^{k,tgt} / π_i^{k,src})     (reduce="mean")

as in the paper and Eastwood et al. ``reduce="sum"`` sums over units instead (the weights then
grow with layer size), ``at="output"`` reads the module's own (pre-activation) output.

Frequencies are smoothed by ``smoothing`` pseudo-counts so empty source bins stay finite.
Two passes over the data (ranges, then counts) keep memory at O(units · bins).
"""

from __future__ import annotations

import torch
from torch import nn

from neuralign.errors import NeuralignError
from neuralign.finetune.auto_lr.layers import Layer, is_norm_module, normalise_scores
from neuralign.utils import eval_mode


def _first_tensor(out):
    if isinstance(out, torch.Tensor):
        return out
    if isinstance(out, (list, tuple)) and out and isinstance(out[0], torch.Tensor):
        return out[0]
    if hasattr(out, "last_hidden_state"):
        return out.last_hidden_state
    raise NeuralignError(f"cannot read activations of type {type(out).__name__}")


_ACTIVATIONS: tuple[type, ...] = (
    nn.ReLU, nn.ReLU6, nn.LeakyReLU, nn.PReLU, nn.ELU, nn.SELU, nn.CELU, nn.GELU, nn.SiLU,
    nn.Mish, nn.Tanh, nn.Sigmoid, nn.Hardtanh, nn.Hardswish, nn.Hardsigmoid, nn.Softplus)
_PASS_THROUGH: tuple[type, ...] = (nn.Identity, nn.modules.dropout._DropoutNd)
AT = ("post_activation", "output")


def _eval_no_grad(model: nn.Module, batches: list, hooks: list) -> None:
    restore = eval_mode(model)
    try:
        with torch.no_grad():
            for x, _ in batches:
                model(x)
    finally:
        restore()
        for h in hooks:
            h.remove()


def resolve_units(model: nn.Module, x: torch.Tensor, module_names: list[str],
                  at: str = "post_activation") -> dict[str, tuple[str, int]]:
    """Where each module's units are read: ``{module: (module to hook, its call index)}``.

    With ``at="post_activation"`` a leaf module's units are the output of the first activation
    module called after it (normalisation, dropout and identity modules in between are
    skipped); when another module comes first, or for a non-leaf module (a block), the module's
    own output."""
    if at not in AT:
        raise NeuralignError(f"at must be one of {AT}, got {at!r}")
    if at == "output":
        return {m: (m, 0) for m in module_names}
    calls: list[tuple[str, nn.Module, int]] = []
    counts: dict[str, int] = {}

    def hook_for(name):
        def hook(mod, _inp, _out):
            calls.append((name, mod, counts.get(name, 0)))
            counts[name] = counts.get(name, 0) + 1
        return hook

    leaves = [(n, m) for n, m in model.named_modules() if n and not any(m.children())]
    _eval_no_grad(model, [(x, None)], [m.register_forward_hook(hook_for(n)) for n, m in leaves])
    out = {}
    for name in module_names:
        out[name] = (name, 0)
        mod = model.get_submodule(name)
        first = next((i for i, c in enumerate(calls) if c[0] == name), None)
        if first is None or any(mod.children()):
            continue
        for other, omod, k in calls[first + 1:]:
            if isinstance(omod, _ACTIVATIONS):
                out[name] = (other, k)
                break
            if not (is_norm_module(omod) or isinstance(omod, _PASS_THROUGH)):
                break
    return out


def _sweep(model: nn.Module, batches: list, targets: dict[str, tuple[str, int]], fn
           ) -> list[str]:
    """Run ``batches`` through ``model`` calling ``fn(name, acts(N, K))`` for every layer module
    ``name`` whose units ``targets[name]`` read. Returns the names in forward order."""
    mods = dict(model.named_modules())
    order: list[str] = []
    calls: dict[str, int] = {}
    by_hook: dict[str, list[tuple[str, int]]] = {}
    for name, (hooked, k) in targets.items():
        by_hook.setdefault(hooked, []).append((name, k))

    def reset(_m, _inp):
        calls.clear()

    def hook_for(hooked):
        def hook(_m, _inp, out):
            k = calls.get(hooked, 0)
            calls[hooked] = k + 1
            for name, want in by_hook[hooked]:
                if want != k:
                    continue
                a = _first_tensor(out).detach()
                if name not in order:
                    order.append(name)
                fn(name, a.reshape(a.shape[0], -1).float())
        return hook

    hooks = [model.register_forward_pre_hook(reset)]
    hooks += [mods[h].register_forward_hook(hook_for(h)) for h in by_hook]
    _eval_no_grad(model, batches, hooks)
    return order


def module_surprise(model: nn.Module, source_batches: list, target_batches: list,
                    module_names: list[str], *, bins: int = 8, smoothing: float = 1e-3,
                    reduce: str = "mean", at: str = "post_activation"
                    ) -> tuple[dict[str, float], list[str]]:
    """Surprise per module (its units read as ``at`` says) and the modules' forward order."""
    if bins < 2:
        raise NeuralignError(f"bins must be >= 2, got {bins}")
    if reduce not in ("sum", "mean"):
        raise NeuralignError(f"reduce must be 'sum' or 'mean', got {reduce!r}")
    targets = resolve_units(model, source_batches[0][0][:2], module_names, at)
    lo: dict[str, torch.Tensor] = {}
    hi: dict[str, torch.Tensor] = {}

    def ranges(name, a):
        mn, mx = a.min(0).values, a.max(0).values
        lo[name] = mn if name not in lo else torch.minimum(lo[name], mn)
        hi[name] = mx if name not in hi else torch.maximum(hi[name], mx)

    order = _sweep(model, source_batches, targets, ranges)
    _sweep(model, target_batches, targets, ranges)
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

    _sweep(model, source_batches, targets, counter("src"))
    _sweep(model, target_batches, targets, counter("tgt"))
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
                    smoothing: float = 1e-3, reduce: str = "mean",
                    at: str = "post_activation") -> dict[str, float]:
    """Raw layerwise surprise per layer; with ``diff=True`` the increment over the previous
    module in forward order, ``max(0, s_ℓ − s_{ℓ−1})`` (the paper prints ``min``, which could
    only be ≤ 0) with ``s_0 = 0``."""
    modules = list(dict.fromkeys(m for layer in layers for m in layer.module_names))
    per_mod, order = module_surprise(model, source_batches, target_batches, modules, bins=bins,
                                     smoothing=smoothing, reduce=reduce, at=at)
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
