"""Output-level shift: the same inputs with relabelled classes (CIFAR-10F's ``y -> 9 - y``)."""

from __future__ import annotations

import torch
from torch.utils.data import TensorDataset

from neuralign.errors import DataError


def flip_labels(y: torch.Tensor, num_classes: int) -> torch.Tensor:
    """``num_classes - 1 - y`` (a new tensor)."""
    y = torch.as_tensor(y)
    if y.numel() and (int(y.min()) < 0 or int(y.max()) >= num_classes):
        raise DataError(f"labels must lie in [0, {num_classes}) to flip them")
    return (num_classes - 1) - y


def permute_labels(y: torch.Tensor, perm) -> torch.Tensor:
    """``perm[y]``: any relabelling given as a permutation of ``range(num_classes)``."""
    perm = torch.as_tensor(perm, dtype=torch.long)
    if not torch.equal(perm.sort().values, torch.arange(len(perm))):
        raise DataError("perm must be a permutation of range(num_classes)")
    y = torch.as_tensor(y)
    if y.numel() and int(y.max()) >= len(perm):
        raise DataError(f"label {int(y.max())} has no entry in a permutation of {len(perm)}")
    return perm[y]


def flip_dataset(dataset: TensorDataset, num_classes: int) -> TensorDataset:
    """A ``TensorDataset`` with the same inputs and flipped labels."""
    x, y = dataset.tensors[:2]
    return TensorDataset(x, flip_labels(y, num_classes))
