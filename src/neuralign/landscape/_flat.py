"""Flat parameter vectors for path and surface code (not public API)."""

from __future__ import annotations

import copy
from collections.abc import Iterable

import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call

from neuralign.errors import DataError
from neuralign.utils import model_device as device_of
from neuralign.utils import split_batch


class Flat:
    """Maps a model's parameters to one flat vector and back; evaluates the model at a vector."""

    def __init__(self, model: nn.Module):
        self.model = copy.deepcopy(model)
        for p in self.model.parameters():
            p.requires_grad_(False)
        self.names = [n for n, _ in self.model.named_parameters()]
        self.shapes = [p.shape for _, p in self.model.named_parameters()]
        self.sizes = [p.numel() for _, p in self.model.named_parameters()]
        self.buffers = {k: v.clone() for k, v in self.model.named_buffers()}

    def vec(self, model_or_sd) -> torch.Tensor:
        sd = model_or_sd.state_dict() if isinstance(model_or_sd, nn.Module) else model_or_sd
        return torch.cat([sd[n].detach().reshape(-1).float() for n in self.names])

    def unflat(self, v: torch.Tensor) -> dict[str, torch.Tensor]:
        return {n: t.view(s) for n, t, s in zip(self.names, torch.split(v, self.sizes), self.shapes)}

    def loss(self, v: torch.Tensor, x: torch.Tensor, y: torch.Tensor, train_mode: bool = False) -> torch.Tensor:
        self.model.train(train_mode)
        bufs = {k: b.clone() for k, b in self.buffers.items()}
        out = functional_call(self.model, (self.unflat(v), bufs), (x,))
        return F.cross_entropy(out, y)

    def to_model(self, v: torch.Tensor) -> nn.Module:
        m = copy.deepcopy(self.model)
        sd = m.state_dict()
        sd.update({k: t.detach().clone() for k, t in self.unflat(v).items()})
        m.load_state_dict(sd)
        for p in m.parameters():
            p.requires_grad_(True)
        return m.eval()

    def uses_batchnorm(self) -> bool:
        return any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in self.model.modules())


def batches(loader: Iterable, device) -> Iterable:
    """Endless iterator over (x, y) batches of ``loader``."""
    while True:
        n = 0
        for batch in loader:
            x, y = split_batch(batch)
            n += 1
            yield x.to(device), y.to(device)
        if n == 0:
            raise DataError("the data loader yielded no batches; pass a non-empty loader")


def dev(model):
    return device_of(model)
