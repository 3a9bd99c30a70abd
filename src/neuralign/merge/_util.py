"""Helpers shared by the merge and landscape modules (not public API)."""

from __future__ import annotations

import copy
from collections.abc import Iterable, Mapping, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from neuralign.errors import ArchitectureMismatchError, CheckpointError, DataError

StateDict = dict[str, torch.Tensor]
ModelLike = nn.Module | Mapping[str, torch.Tensor]


def as_state_dict(x: ModelLike) -> StateDict:
    if isinstance(x, nn.Module):
        return {k: v.detach() for k, v in x.state_dict().items()}
    if isinstance(x, Mapping):
        return {k: (v.detach() if isinstance(v, torch.Tensor) else v) for k, v in x.items()}
    raise TypeError(f"expected an nn.Module or a state dict, got {type(x).__name__}")


def check_finite(sd: Mapping[str, torch.Tensor], name: str = "model") -> None:
    for k, v in sd.items():
        if isinstance(v, torch.Tensor) and v.is_floating_point() and not torch.isfinite(v).all():
            raise CheckpointError(f"{name} has NaN or infinite values in '{k}'; it cannot be merged")


def check_same_architecture(sds: Sequence[Mapping[str, torch.Tensor]], what: str = "models") -> None:
    ref = sds[0]
    for i, sd in enumerate(sds[1:], start=1):
        if set(sd) != set(ref):
            missing = sorted(set(ref) ^ set(sd))[:3]
            raise ArchitectureMismatchError(
                f"{what} 0 and {i} have different parameters (e.g. {missing}); align or use "
                "method='ot' / matched_averaging for models of different architectures"
            )
        for k, v in ref.items():
            if tuple(v.shape) != tuple(sd[k].shape):
                raise ArchitectureMismatchError(
                    f"{what} 0 and {i} differ in shape at '{k}' ({tuple(v.shape)} vs "
                    f"{tuple(sd[k].shape)}); use method='ot' or matched_averaging for different widths"
                )


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


def split_batch(batch) -> tuple[torch.Tensor, torch.Tensor | None]:
    if isinstance(batch, torch.Tensor):
        return batch, None
    if isinstance(batch, (list, tuple)):
        return batch[0], (batch[1] if len(batch) > 1 else None)
    if isinstance(batch, Mapping):
        x = batch.get("x", batch.get("input", batch.get("inputs")))
        return x, batch.get("y", batch.get("label", batch.get("labels")))
    raise DataError(f"cannot read a batch of type {type(batch).__name__}; yield (inputs, targets)")


def device_of(model: nn.Module) -> torch.device:
    for p in model.parameters():
        return p.device
    return torch.device("cpu")


@torch.no_grad()
def evaluate(model: nn.Module, loader: Iterable, max_batches: int | None = None) -> dict:
    """Mean cross-entropy loss and accuracy of ``model`` on ``loader`` (eval mode)."""
    was = model.training
    model.eval()
    dev = device_of(model)
    tot_loss, correct, n = 0.0, 0, 0
    for i, batch in enumerate(loader):
        if max_batches is not None and i >= max_batches:
            break
        x, y = split_batch(batch)
        x, y = x.to(dev), y.to(dev)
        out = model(x)
        tot_loss += float(F.cross_entropy(out, y, reduction="sum"))
        correct += int((out.argmax(-1) == y).sum())
        n += len(y)
    model.train(was)
    if n == 0:
        raise DataError("the data loader yielded no batches; pass a non-empty loader")
    return {"loss": tot_loss / n, "accuracy": correct / n, "n": n}


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
