"""Small helpers shared by every layer."""

from __future__ import annotations

import random
from collections.abc import Mapping

import numpy as np
import torch
from torch import nn

from neuralign.errors import ArchitectureMismatchError, CheckpointError, DataError

StateDict = dict[str, torch.Tensor]
ModelLike = nn.Module | Mapping[str, torch.Tensor]


def eval_mode(*models: nn.Module):
    """Put ``models`` in eval mode; returns a function that gives every module back its own
    mode. (``model.train(was)`` restores only the top: it would switch on the submodules a user
    had put in eval mode, such as frozen batch norms.)"""
    saved = [(m, m.training) for model in models for m in model.modules()]
    for model in models:
        model.eval()

    def restore() -> None:
        for m, was in saved:
            m.training = was
    return restore


def seed_everything(seed: int) -> torch.Generator:
    """Seed Python, NumPy and torch; return a torch.Generator seeded the same way."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)
    return torch.Generator().manual_seed(seed)


def as_state_dict(x: ModelLike) -> StateDict:
    """A detached, copy-free view of the tensors of a model or a state dict."""
    if isinstance(x, nn.Module):
        return {k: v.detach() for k, v in x.state_dict().items()}
    if isinstance(x, Mapping):
        return {k: (v.detach() if isinstance(v, torch.Tensor) else v) for k, v in x.items()}
    raise TypeError(f"expected an nn.Module or a state dict, got {type(x).__name__}")


def check_same_architecture(sds, keys=None, hint: str = "use models of one architecture") -> None:
    """One-line ``ArchitectureMismatchError`` unless every state dict has the tensors of the first
    with the same shapes (only ``keys`` are compared for shape when given)."""
    ref = sds[0]
    for i, sd in enumerate(sds[1:], start=1):
        if set(sd) != set(ref):
            diff = sorted(set(ref) ^ set(sd))
            raise ArchitectureMismatchError(
                f"models 0 and {i} have different tensors ({len(diff)} differ, e.g. {diff[0]!r}); "
                f"{hint}")
        for k in keys if keys is not None else ref:
            if tuple(ref[k].shape) != tuple(sd[k].shape):
                raise ArchitectureMismatchError(
                    f"models 0 and {i} differ in shape at {k!r} ({tuple(ref[k].shape)} vs "
                    f"{tuple(sd[k].shape)}); {hint}")


def first_nonfinite(sd: Mapping[str, torch.Tensor]) -> tuple[str, str] | None:
    """``(name, "NaN" or "infinite")`` of the first floating tensor with such values, or None."""
    for k, v in sd.items():
        if isinstance(v, torch.Tensor) and v.is_floating_point() and not torch.isfinite(v).all():
            return k, "NaN" if bool(torch.isnan(v).any()) else "infinite"
    return None


def check_finite(sd: Mapping[str, torch.Tensor], name: str = "model") -> None:
    """One-line ``CheckpointError`` naming the first tensor of ``sd`` with NaN/Inf values."""
    bad = first_nonfinite(sd)
    if bad is not None:
        raise CheckpointError(f"{name} has {bad[1]} values in '{bad[0]}'; it cannot be merged "
                              "or aligned")


def split_batch(batch) -> tuple[torch.Tensor, torch.Tensor | None]:
    """``(inputs, targets)`` of a batch: a tensor, a tuple/list, or a dict with x/y keys."""
    if isinstance(batch, torch.Tensor):
        return batch, None
    if isinstance(batch, (list, tuple)):
        return batch[0], (batch[1] if len(batch) > 1 else None)
    if isinstance(batch, Mapping):
        x = batch.get("x", batch.get("input", batch.get("inputs")))
        return x, batch.get("y", batch.get("label", batch.get("labels")))
    raise DataError(f"cannot read a batch of type {type(batch).__name__}; yield (inputs, targets)")


def model_device(model: nn.Module) -> torch.device:
    for p in model.parameters():
        return p.device
    for b in model.buffers():
        return b.device
    return torch.device("cpu")


def default_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")
