"""Module criticality (Algorithms 3 and 4 of Agarwala et al.).

A layer is "removed" and the increase of the loss measures how critical it is:

* ``removal="identity"``: convolutions get a Dirac kernel (``nn.init.dirac_``), linear layers
  the identity matrix (``nn.init.eye_``; rectangular: identity on the shared dimensions), biases
  zero, BatchNorm the affine map that undoes its normalisation. At block granularity a block
  whose output has its input's shape is replaced by ``nn.Identity`` (a residual block is
  skipped); other blocks get the per-module identities.
* ``removal="random"``: the layer is re-initialised with its own initialiser
  (``module.reset_parameters()``, Kaiming-uniform for ``nn.Conv2d``/``nn.Linear``), seeded.

Weights: ``max(0, L(f') − L(f))`` on the source or target minibatches, the top-K layers kept
(others 0), divided by the largest.
"""

from __future__ import annotations

import copy

import torch
import torch.nn.functional as F
from torch import nn

from neuralign.errors import NeuralignError
from neuralign.finetune.auto_lr.layers import Layer, is_norm_module, normalise_scores
from neuralign.utils import eval_mode

REMOVALS = ("identity", "random")


def batches_loss(model: nn.Module, batches: list, loss_fn=None) -> float:
    loss_fn = loss_fn or F.cross_entropy
    restore = eval_mode(model)
    try:
        with torch.no_grad():
            tot = sum(float(loss_fn(model(x), y)) * len(y) for x, y in batches)
    finally:
        restore()
    return tot / sum(len(b[1]) for b in batches)


@torch.no_grad()
def _identity_(module: nn.Module) -> None:
    if isinstance(module, nn.modules.conv._ConvNd) and not module.transposed:
        nn.init.dirac_(module.weight, groups=module.groups)
    elif isinstance(module, nn.Linear):
        nn.init.eye_(module.weight)
    elif isinstance(module, nn.modules.batchnorm._BatchNorm) and module.affine:
        if module.running_var is not None:
            module.weight.copy_(torch.sqrt(module.running_var + module.eps))
            module.bias.copy_(module.running_mean)
        else:
            module.weight.fill_(1.0)
            module.bias.zero_()
        return
    elif is_norm_module(module) and hasattr(module, "reset_parameters"):
        module.reset_parameters()
        return
    elif any(True for _ in module.parameters(recurse=False)):
        raise NeuralignError(f"no identity defined for {type(module).__name__}; "
                             "use removal='random' for this model")
    bias = getattr(module, "bias", None)
    if isinstance(bias, torch.Tensor):
        bias.zero_()


def identity_removal_(module: nn.Module) -> None:
    """Make every parameterised submodule of ``module`` an identity map, in place."""
    for m in module.modules():
        if any(True for _ in m.parameters(recurse=False)):
            _identity_(m)


def random_removal_(module: nn.Module, seed: int = 0) -> None:
    """Re-initialise every submodule of ``module`` with its own ``reset_parameters``."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        for m in module.modules():
            if any(True for _ in m.parameters(recurse=False)):
                if not hasattr(m, "reset_parameters"):
                    raise NeuralignError(f"{type(m).__name__} has no reset_parameters(); "
                                         "use removal='identity' for this model")
                m.reset_parameters()


def _shape_preserving(model: nn.Module, names: list[str], x: torch.Tensor) -> dict[str, bool]:
    mods = dict(model.named_modules())
    same: dict[str, bool] = {}

    def hook_for(n):
        def hook(_m, inp, out):
            same[n] = (isinstance(out, torch.Tensor) and len(inp) == 1
                       and isinstance(inp[0], torch.Tensor) and inp[0].shape == out.shape)
        return hook

    handles = [mods[n].register_forward_hook(hook_for(n)) for n in names if n]
    restore = eval_mode(model)
    try:
        with torch.no_grad():
            model(x)
    finally:
        restore()
        for h in handles:
            h.remove()
    return same


def _set_submodule(model: nn.Module, name: str, new: nn.Module) -> None:
    parent, _, leaf = name.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, leaf, new)


def remove_module(model: nn.Module, name: str, removal: str, *, seed: int = 0,
                  skip_if_shape_preserving: bool = False,
                  example_input: torch.Tensor | None = None) -> nn.Module:
    """A copy of ``model`` with module ``name`` removed (identity or random re-init)."""
    if removal not in REMOVALS:
        raise NeuralignError(f"removal must be one of {REMOVALS}, got {removal!r}")
    out = copy.deepcopy(model)
    if removal == "identity" and skip_if_shape_preserving:
        if example_input is None:
            raise NeuralignError("skipping a block needs an example input to check its shapes")
        if _shape_preserving(out, [name], example_input).get(name, False):
            _set_submodule(out, name, nn.Identity())
            return out
    target = out.get_submodule(name)
    if removal == "identity":
        identity_removal_(target)
    else:
        random_removal_(target, seed=seed)
    return out


def criticality_scores(model: nn.Module, batches: list, layers: list[Layer], *,
                       removal: str = "random", granularity: str = "tensor", seed: int = 0,
                       loss_fn=None) -> dict[str, float]:
    """Raw loss increase ``L(f') − L(f)`` per layer (layers sharing a module share it)."""
    if removal not in REMOVALS:
        raise NeuralignError(f"removal must be one of {REMOVALS}, got {removal!r}")
    base = batches_loss(model, batches, loss_fn)
    modules = list(dict.fromkeys(m for layer in layers for m in layer.module_names))
    per_mod = {}
    for i, m in enumerate(modules):
        removed = remove_module(model, m, removal, seed=seed + 1000 * i,
                                skip_if_shape_preserving=(granularity == "block"),
                                example_input=batches[0][0][:2])
        per_mod[m] = batches_loss(removed, batches, loss_fn) - base
    return {layer.name: max(per_mod[m] for m in layer.module_names) for layer in layers}


def top_k_weights(raw: dict[str, float], top_k: int | None) -> dict[str, float]:
    """Keep the ``top_k`` largest (positive) loss increases, zero the rest, divide by the max."""
    inc = {k: max(0.0, v) for k, v in raw.items()}
    if top_k is not None:
        if top_k < 1:
            raise NeuralignError(f"top_k must be >= 1 or None, got {top_k}")
        keep = set(sorted(inc, key=lambda k: -inc[k])[:top_k])
        inc = {k: (v if k in keep else 0.0) for k, v in inc.items()}
    return normalise_scores(inc)
