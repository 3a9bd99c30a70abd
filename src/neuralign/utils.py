"""Small helpers shared by every layer."""

from __future__ import annotations

import random
from collections.abc import Mapping

import numpy as np
import torch
from torch import nn

StateDict = dict[str, torch.Tensor]


def seed_everything(seed: int) -> torch.Generator:
    """Seed Python, NumPy and torch; return a torch.Generator seeded the same way."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)
    return torch.Generator().manual_seed(seed)


def state_dict_of(model_or_sd: nn.Module | Mapping[str, torch.Tensor]) -> StateDict:
    """A detached copy-free view of the tensors of a model or a state dict."""
    if isinstance(model_or_sd, nn.Module):
        return {k: v.detach() for k, v in model_or_sd.state_dict().items()}
    if isinstance(model_or_sd, Mapping):
        return dict(model_or_sd)
    raise TypeError(f"expected an nn.Module or a state dict, got {type(model_or_sd).__name__}")


def model_device(model: nn.Module) -> torch.device:
    for p in model.parameters():
        return p.device
    for b in model.buffers():
        return b.device
    return torch.device("cpu")


def default_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")
