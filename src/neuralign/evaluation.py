"""Evaluation shared by every layer: streaming loss and accuracy, and predictions."""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import (
    BatchSampler,
    DataLoader,
    Dataset,
    IterableDataset,
    SequentialSampler,
    Subset,
    TensorDataset,
    default_collate,
)

from neuralign.errors import DataError
from neuralign.progress import Progress
from neuralign.utils import eval_mode, model_device, split_batch

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


def _tensor_source(loader):
    """``(tensors, index)`` when ``loader`` is a DataLoader over a ``TensorDataset`` (or a
    ``Subset`` of one) with the default collate function, so that a batch is ``[t[i] for t in
    tensors]``; None otherwise."""
    if not isinstance(loader, DataLoader) or loader.batch_sampler is None:
        return None
    if loader.collate_fn is not default_collate or isinstance(loader.dataset, IterableDataset):
        return None
    if loader.persistent_workers and loader.num_workers > 0:
        return None  # its iterator is reused across epochs; keep the DataLoader's own
    ds, index = loader.dataset, None
    if type(ds) is Subset and type(ds.dataset) is TensorDataset:
        ds, index = ds.dataset, torch.as_tensor(ds.indices, dtype=torch.long)
    if type(ds) is not TensorDataset:  # a subclass may change __getitem__
        return None
    return ds.tensors, index


def iter_batches(loader):
    """Iterate ``loader`` once (one epoch). A DataLoader over in-memory tensors is read by index
    slicing (one gather per tensor and batch) instead of per-example ``__getitem__`` and
    ``collate``: the batches, their order and the random numbers drawn from the loader's
    generator are the same as iterating the DataLoader itself."""
    src = _tensor_source(loader)
    if src is None:
        yield from loader
        return
    tensors, index = src
    # as DataLoader.__iter__: the workers' base seed is drawn first, then the sampler runs
    torch.empty((), dtype=torch.int64).random_(generator=loader.generator)
    bs = loader.batch_sampler
    if (index is None and type(bs) is BatchSampler and type(bs.sampler) is SequentialSampler
            and bs.sampler.data_source is loader.dataset):
        # in order: the batches are consecutive ranges, copied without an index list
        n, size = len(loader.dataset), bs.batch_size
        stop = n - n % size if bs.drop_last else n
        for i in range(0, stop, size):
            yield [t[i:min(i + size, n)].clone(memory_format=torch.contiguous_format)
                   for t in tensors]
        return
    for idx in bs:
        i = torch.as_tensor(idx, dtype=torch.long)
        if index is not None:
            i = index[i]
        yield [torch.index_select(t, 0, i) for t in tensors]  # a copy, as collate makes


def use_channels_last(option: bool | None, device: torch.device) -> bool:
    """``channels_last=None`` (auto) means on for CPU: there image batches in channels-last
    layout run ResNet-20 about 10% and VGG-11 (max pooling) about 1.5x faster
    (docs/results/loop_speed.md)."""
    return device.type == "cpu" if option is None else bool(option)


def to_device(x: torch.Tensor, device: torch.device, channels_last: bool = False) -> torch.Tensor:
    """``x`` on ``device``; a 4-D floating-point batch in channels-last layout if asked (a new
    tensor when the layout changes; the values are the same)."""
    if channels_last and x.dim() == 4 and x.is_floating_point():
        _n, c, h, w = x.shape
        if c == 1 and x.is_contiguous():  # one channel: the same bytes, only the strides differ
            x = x.as_strided(x.shape, (h * w, 1, w, 1))
        else:
            return x.to(device, non_blocking=True, memory_format=torch.channels_last)
    return x.to(device, non_blocking=True)


def _targets(batch) -> tuple[torch.Tensor, torch.Tensor]:
    x, y = split_batch(batch)
    if y is None:
        raise DataError("each batch must be an (inputs, targets) pair to evaluate a model")
    return x, y


def evaluate(model: nn.Module, loader, *, loss_fn: LossFn | None = None, device=None,
             max_batches: int | None = None, progress: bool | None = None,
             channels_last: bool | None = None) -> dict[str, float]:
    """Mean loss and accuracy of ``model`` over ``loader`` in eval mode (the mode is restored),
    in one streaming pass under ``torch.inference_mode``. The default loss is cross-entropy for
    integer class targets and mean squared error otherwise; ``accuracy`` is NaN for non-class
    targets. ``progress``: None (default) writes plain lines to stderr only off a terminal and
    only when the pass takes more than 10 s; True also draws a bar on a terminal; False is
    silent. ``channels_last``: image batches in channels-last layout (default: on CPU)."""
    loader = as_loader(loader)
    device = torch.device(device) if device is not None else model_device(model)
    cl = use_channels_last(channels_last, device)
    restore = eval_mode(model)
    loss_sum = torch.zeros((), dtype=torch.float64, device=device)
    correct = torch.zeros((), dtype=torch.int64, device=device)
    n, classify = 0, True
    total = len(loader) if hasattr(loader, "__len__") else None
    if max_batches is not None and total is not None:
        total = min(total, max_batches)
    try:
        with torch.inference_mode(), Progress("evaluate", total,
                                              "auto" if progress is None else progress) as prog:
            for i, batch in enumerate(iter_batches(loader)):
                if max_batches is not None and i >= max_batches:
                    break
                x, y = _targets(batch)
                x, y = to_device(x, device, cl), y.to(device, non_blocking=True)
                out = model(x).float()
                classify = y.dtype == torch.int64 and out.dim() == 2
                if loss_fn is not None:
                    loss_sum += loss_fn(out, y).double() * y.shape[0]
                elif classify:
                    loss_sum += F.cross_entropy(out, y, reduction="sum")  # added in float64
                else:
                    loss_sum += F.mse_loss(out.squeeze(-1), y.float(), reduction="sum")
                if classify:
                    correct += (out.argmax(1) == y).sum()
                n += int(y.shape[0])
                if prog.advance(int(y.shape[0])):
                    prog.report(f"loss {float(loss_sum) / n:.4f}")
            if prog.printed:
                prog.line(f"done, loss {float(loss_sum) / max(n, 1):.4f}")
    finally:
        restore()
    if n == 0:
        raise DataError("the evaluation loader yields no batches; is the data set empty?")
    return {"loss": float(loss_sum) / n, "accuracy": int(correct) / n if classify else float("nan"),
            "n": n}


def predict(model: nn.Module, loader, *, device=None,
            channels_last: bool | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Concatenated outputs and targets over a loader, in eval mode (the mode is restored)."""
    loader = as_loader(loader)
    device = torch.device(device) if device is not None else model_device(model)
    cl = use_channels_last(channels_last, device)
    restore = eval_mode(model)
    outs, ys = [], []
    try:
        with torch.inference_mode():
            for batch in iter_batches(loader):
                x, y = _targets(batch)
                outs.append(model(to_device(x, device, cl)).float().cpu())
                ys.append(y)
    finally:
        restore()
    if not outs:
        raise DataError("the evaluation loader yields no batches; is the data set empty?")
    return torch.cat(outs), torch.cat(ys)
