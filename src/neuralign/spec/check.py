"""The property every spec must have: a random permutation leaves the model's function alone.

:func:`check_spec` applies a random permutation of every group and compares all outputs on an
example input. Derived specs and hand-written ones go through the same check.
"""

from __future__ import annotations

import copy

import torch
from torch import nn

from neuralign.errors import SpecError
from neuralign.utils import eval_mode


def _tensors(out) -> list[torch.Tensor]:
    if isinstance(out, torch.Tensor):
        return [out] if out.is_floating_point() else [out.float()]
    if isinstance(out, dict) or hasattr(out, "items"):
        return [t for v in out.values() for t in _tensors(v)]
    if isinstance(out, (list, tuple)):
        return [t for v in out for t in _tensors(v)]
    return []


def _run(model, x):
    with torch.no_grad():
        if isinstance(x, dict):
            return _tensors(model(**x))
        if isinstance(x, (tuple, list)):
            return _tensors(model(*x))
        return _tensors(model(x))


def randomise_norm_stats(model: nn.Module, seed: int = 0, inplace: bool = False) -> nn.Module:
    """A copy whose batch-norm statistics and norm affine parameters are random, and whose
    all-zero parameters (zero-initialised heads, biases, LayerScale) are small random values, so
    a check sees them (fresh models have mean 0, variance 1, weight 1, bias 0, zero heads)."""
    model = (model if inplace else copy.deepcopy(model)).eval()
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            if p.is_floating_point() and p.numel() > 1 and not p.any():
                p.copy_(torch.randn(p.shape, generator=g) * 0.02)
        for m in model.modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.running_mean is not None:
                m.running_mean.copy_(torch.randn(m.running_mean.shape, generator=g) * 0.1)
                m.running_var.copy_(torch.rand(m.running_var.shape, generator=g) + 0.5)
            for name in ("weight", "bias"):
                p = getattr(m, name, None)
                if isinstance(p, torch.Tensor) and p.dim() == 1 and not isinstance(
                        m, (nn.Linear, nn.modules.conv._ConvNd, nn.Embedding)):
                    p.copy_((torch.rand(p.shape, generator=g) + 0.5) if name == "weight"
                            else torch.randn(p.shape, generator=g) * 0.1)
    return model


def check_spec(model: nn.Module, spec, example_input, seed: int = 0, tol: float = 1e-4,
               raise_error: bool = True) -> float:
    """Apply a random permutation of every group of ``spec`` to ``model`` and compare every
    output on ``example_input``. Returns the largest difference relative to the output scale
    (``max |a - b| / max(max |a|, 1e-3)``); raises SpecError above ``tol`` unless
    ``raise_error=False``."""
    from neuralign.permute import apply_permutation, random_permutation

    restore = eval_mode(model)
    try:
        perm = random_permutation(spec, seed)
        permuted = apply_permutation(model, perm, spec).eval()
        outs_a, outs_b = _run(model, example_input), _run(permuted, example_input)
    finally:
        restore()
    worst = 0.0
    for a, b in zip(outs_a, outs_b):
        if a.shape != b.shape:
            worst = float("inf")
            continue
        scale = max(a.abs().max().item() if a.numel() else 0.0, 1e-3)
        worst = max(worst, (a - b).abs().max().item() / scale if a.numel() else 0.0)
    if raise_error and not worst < tol:
        raise SpecError(f"the spec does not preserve {type(model).__name__}: a random permutation "
                        f"moves its outputs by {worst:.2g} (relative); some axis it permutes "
                        "feeds an operation the spec does not account for")
    return worst
