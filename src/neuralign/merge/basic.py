"""Interpolation and averaging of aligned models; batch-norm statistics reset."""

from __future__ import annotations

import copy
from collections.abc import Iterable, Sequence

import torch
from torch import nn

from neuralign.errors import DataError
from neuralign.evaluation import iter_batches, to_device, use_channels_last
from neuralign.merge._util import (
    ModelLike,
    as_state_dict,
    check_finite,
    check_same_architecture,
    combine,
    device_of,
    like,
    normalize_weights,
    split_batch,
)


def interpolate(a: ModelLike, b: ModelLike, t: float = 0.5) -> ModelLike:
    """``(1 - t) * a + t * b`` for every floating-point tensor (buffers included).

    Integer buffers (``num_batches_tracked``) are taken from ``a``. Returns a new object of
    the same kind as ``a`` (model or state dict); the inputs are not modified.
    """
    sa, sb = as_state_dict(a), as_state_dict(b)
    check_finite(sa, "model A")
    check_finite(sb, "model B")
    check_same_architecture([sa, sb])
    return like(a, combine([sa, sb], [1.0 - t, t]))


def average(models: Sequence[ModelLike], weights: Sequence[float] | None = None) -> ModelLike:
    """Weighted average of aligned models (``weights`` are normalised to sum to 1)."""
    if len(models) == 0:
        raise ValueError("average() needs at least one model")
    sds = [as_state_dict(m) for m in models]
    for i, sd in enumerate(sds):
        check_finite(sd, f"model {i}")
    check_same_architecture(sds)
    return like(models[0], combine(sds, normalize_weights(weights, len(sds))))


uniform_soup = average

_NORMS = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)


def has_batchnorm(model: nn.Module) -> bool:
    return any(isinstance(m, _NORMS) for m in model.modules())


@torch.no_grad()
def reset_bn(model: nn.Module, loader: Iterable, *, max_batches: int | None = None) -> nn.Module:
    """A copy of ``model`` whose batch-norm running statistics are recomputed on ``loader``.

    Uses cumulative averaging (``momentum=None``) over the batches, with the batch norms in train
    mode, as Jordan et al. (REPAIR) and Ainsworth et al. (Git Re-Basin) do after interpolation.
    Every other module stays in eval mode (dropout off, so the statistics are those of the
    activations the model sees at test time). Models without batch norm are returned as an
    unchanged copy; the result is in eval mode.
    """
    model = copy.deepcopy(model)
    bns = [m for m in model.modules() if isinstance(m, _NORMS)]
    if not bns:
        return model
    saved = [(m.momentum, m.track_running_stats) for m in bns]
    for m in bns:
        m.reset_running_stats()
        m.momentum = None
        m.track_running_stats = True
    model.eval()
    for m in bns:
        m.train()
    dev = device_of(model)
    n = 0
    cl = use_channels_last(None, dev)
    with torch.no_grad():  # statistics only: no autograd graph
        for i, batch in enumerate(iter_batches(loader)):
            if max_batches is not None and i >= max_batches:
                break
            x, _ = split_batch(batch)
            model(to_device(x, dev, cl))
            n += 1
    if n == 0:
        raise DataError("the data loader yielded no batches; pass a non-empty loader to reset_bn")
    for m, (mom, trs) in zip(bns, saved):
        m.momentum = mom
        m.track_running_stats = trs
    model.eval()
    return model
