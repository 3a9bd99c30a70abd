"""Evaluation shared by every layer: streaming loss and accuracy, and predictions."""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, Dataset

from neuralign.errors import DataError
from neuralign.utils import model_device, split_batch

LossFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


def as_loader(data, batch_size: int = 128, shuffle: bool = False, seed: int = 0):
    """Accept a DataLoader (or any iterable of batches), a Dataset or an ``(x, y)`` pair."""
    from neuralign.data.core import make_loader

    if isinstance(data, tuple) and len(data) == 2 and all(torch.is_tensor(t) for t in data):
        data = torch.utils.data.TensorDataset(*data)
    if isinstance(data, Dataset):
        return make_loader(data, batch_size=batch_size, shuffle=shuffle, seed=seed)
    if isinstance(data, DataLoader) or hasattr(data, "__iter__"):
        return data
    raise DataError(f"expected a DataLoader, a Dataset or an (x, y) pair, got {type(data).__name__}")


def _targets(batch) -> tuple[torch.Tensor, torch.Tensor]:
    x, y = split_batch(batch)
    if y is None:
        raise DataError("each batch must be an (inputs, targets) pair to evaluate a model")
    return x, y


@torch.no_grad()
def evaluate(model: nn.Module, loader, *, loss_fn: LossFn | None = None, device=None,
             max_batches: int | None = None) -> dict[str, float]:
    """Mean loss and accuracy of ``model`` over ``loader`` in eval mode (the mode is restored),
    in one streaming pass. The default loss is cross-entropy for integer class targets and mean
    squared error otherwise; ``accuracy`` is NaN for non-class targets."""
    loader = as_loader(loader)
    device = torch.device(device) if device is not None else model_device(model)
    was_training = model.training
    model.eval()
    loss_sum, correct, n, classify = 0.0, 0, 0, True
    try:
        for i, batch in enumerate(loader):
            if max_batches is not None and i >= max_batches:
                break
            x, y = _targets(batch)
            x, y = x.to(device), y.to(device)
            out = model(x).float()
            classify = y.dtype == torch.int64 and out.dim() == 2
            if loss_fn is not None:
                loss = float(loss_fn(out, y)) * y.shape[0]
            elif classify:
                loss = float(F.cross_entropy(out, y, reduction="sum"))
            else:
                loss = float(F.mse_loss(out.squeeze(-1), y.float(), reduction="sum"))
            loss_sum += loss
            if classify:
                correct += int((out.argmax(1) == y).sum())
            n += int(y.shape[0])
    finally:
        model.train(was_training)
    if n == 0:
        raise DataError("the evaluation loader yields no batches; is the data set empty?")
    return {"loss": loss_sum / n, "accuracy": correct / n if classify else float("nan"), "n": n}


@torch.no_grad()
def predict(model: nn.Module, loader, *, device=None) -> tuple[torch.Tensor, torch.Tensor]:
    """Concatenated outputs and targets over a loader, in eval mode (the mode is restored)."""
    loader = as_loader(loader)
    device = torch.device(device) if device is not None else model_device(model)
    was_training = model.training
    model.eval()
    outs, ys = [], []
    try:
        for batch in loader:
            x, y = _targets(batch)
            outs.append(model(x.to(device)).float().cpu())
            ys.append(y)
    finally:
        model.train(was_training)
    if not outs:
        raise DataError("the evaluation loader yields no batches; is the data set empty?")
    return torch.cat(outs), torch.cat(ys)
