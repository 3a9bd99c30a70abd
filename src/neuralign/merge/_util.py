"""Helpers shared by the merge and landscape modules (not public API)."""

from __future__ import annotations

import copy
from collections.abc import Iterable, Mapping, Sequence

import torch
from torch import nn

from neuralign.errors import DataError
from neuralign.evaluation import evaluate  # noqa: F401 - shared by merge and landscape
from neuralign.utils import (  # noqa: F401 - re-exported for the merge modules
    ModelLike,
    StateDict,
    as_state_dict,
    check_finite,
    split_batch,
)
from neuralign.utils import check_same_architecture as _check_same
from neuralign.utils import model_device as device_of  # noqa: F401

MERGE_HINT = ("align them first, or use method='ot' / matched_averaging for models of "
              "different architectures")


def check_same_architecture(sds) -> None:
    _check_same(sds, hint=MERGE_HINT)


def combine(sds: Sequence[Mapping[str, torch.Tensor]], weights: Sequence[float]) -> StateDict:
    """Weighted sum of float tensors; non-float tensors (counters) are taken from the first."""
    out: StateDict = {}
    for k, v in sds[0].items():
        if isinstance(v, torch.Tensor) and v.is_floating_point():
            acc = torch.zeros_like(v, dtype=torch.float64)
            for w, sd in zip(weights, sds):
                acc += float(w) * sd[k].to(torch.float64)
            out[k] = acc.to(v.dtype)
        else:
            out[k] = v.clone() if isinstance(v, torch.Tensor) else v
    return out


def like(template: ModelLike, sd: StateDict) -> ModelLike:
    """Return ``sd`` as the same kind of object as ``template`` (a new model or a state dict)."""
    if isinstance(template, nn.Module):
        m = copy.deepcopy(template)
        m.load_state_dict(sd)
        return m
    return sd


def first_batch(loader: Iterable) -> tuple[torch.Tensor, torch.Tensor | None]:
    for batch in loader:
        return split_batch(batch)
    raise DataError("the data loader yielded no batches; pass a non-empty loader")


def weighted_layers(model: nn.Module) -> list[tuple[str, nn.Module]]:
    return [(n, m) for n, m in model.named_modules() if isinstance(m, (nn.Linear, nn.Conv1d, nn.Conv2d))]


def normalize_weights(weights: Sequence[float] | None, n: int) -> list[float]:
    if weights is None:
        return [1.0 / n] * n
    if len(weights) != n:
        raise ValueError(f"got {len(weights)} weights for {n} models; pass one weight per model")
    s = float(sum(weights))
    if s <= 0:
        raise ValueError("merge weights must sum to a positive number")
    return [float(w) / s for w in weights]
