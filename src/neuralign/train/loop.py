"""The one training / evaluation loop everything else reuses."""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from neuralign.errors import DataError, NeuralignError
from neuralign.evaluation import (  # noqa: F401 - re-exported
    LossFn,
    as_loader,
    evaluate,
    iter_batches,
    predict,
    to_device,
    use_channels_last,
)
from neuralign.progress import Progress
from neuralign.utils import model_device, split_batch


@dataclass
class History:
    """Per-epoch training metrics (and validation metrics when a ``val_loader`` is given)."""

    epochs: list[dict] = field(default_factory=list)
    seconds: float = 0.0

    @property
    def final(self) -> dict:
        return self.epochs[-1] if self.epochs else {}

    def as_dict(self) -> dict:
        return {"epochs": self.epochs, "seconds": self.seconds}


def _schedule(kind: str, total: int, warmup: int) -> Callable[[int], float]:
    if kind not in ("cosine", "step", "constant", "linear"):
        raise NeuralignError(f"schedule must be cosine, step, linear or constant, got {kind!r}")

    def factor(step: int) -> float:
        if warmup and step < warmup:
            return (step + 1) / warmup
        if kind == "constant":
            return 1.0
        p = (step - warmup) / max(1, total - warmup)
        if kind == "cosine":
            return 0.5 * (1 + math.cos(math.pi * p))
        if kind == "linear":
            return 1.0 - p
        return 0.1 ** int(p * 3 + 1e-9)  # step: x0.1 at 1/3 and 2/3 of training

    return factor


def make_optimizer(name: str, groups: list[dict], lr: float, momentum: float,
                   weight_decay: float) -> torch.optim.Optimizer:
    name = name.lower()
    if name == "sgd":
        return torch.optim.SGD(groups, lr=lr, momentum=momentum, weight_decay=weight_decay,
                               nesterov=momentum > 0)
    if name == "adam":
        return torch.optim.Adam(groups, lr=lr, weight_decay=weight_decay)
    if name == "adamw":
        return torch.optim.AdamW(groups, lr=lr, weight_decay=weight_decay)
    raise NeuralignError(f"optimizer must be sgd, adam or adamw, got {name!r}")


def _hooks(callbacks: Sequence, hook: str) -> list[Callable]:
    """The callbacks' ``hook`` methods, looked up once (an empty list costs nothing per step)."""
    return [fn for fn in (getattr(cb, hook, None) for cb in callbacks) if fn is not None]


def _call(fns: Sequence[Callable], *args) -> None:
    for fn in fns:
        fn(*args)


def _forward(forward, x, compiled: bool):
    if not compiled:
        return forward(x)
    try:
        return forward(x)
    except Exception as exc:  # compiler failures come in many types
        if "torch._dynamo" not in type(exc).__module__ and "inductor" not in type(exc).__module__:
            raise
        msg = str(exc).strip().splitlines()[0][:160] if str(exc).strip() else type(exc).__name__
        raise NeuralignError(f"torch.compile cannot compile this model ({msg}); train without "
                             "compile=True") from None


def _diverged(loss: torch.Tensor, epoch: int, i: int):
    raise NeuralignError(f"training diverged (loss {float(loss.detach())}) at epoch {epoch + 1}, "
                         f"step {i + 1}; lower the learning rate")


def train(model: nn.Module, loader, *, epochs: int = 10, lr: float = 0.05,
          optimizer: str = "sgd", momentum: float = 0.9, weight_decay: float = 0.0,
          schedule: str = "cosine", warmup_steps: int = 0, label_smoothing: float = 0.0,
          param_groups: list[dict] | None = None, callbacks: Iterable = (),
          regularizer: Callable[[nn.Module], torch.Tensor] | None = None,
          loss_fn: LossFn | None = None, val_loader=None, device=None, progress: bool = True,
          seed: int = 0, batch_size: int = 128, max_steps: int | None = None,
          channels_last: bool | None = None, compile: bool = False) -> History:
    """Train ``model`` in place. Returns the per-epoch history.

    ``param_groups`` are dicts with ``params`` and an optional ``lr_scale``: at every step each
    group's rate is ``lr * lr_scale * schedule(step)``, read afresh, so callbacks may change
    ``lr_scale`` in place without rebuilding the optimizer.

    ``device``: where to train (the model is moved there, batches follow). ``progress``: a bar
    on a terminal, plain lines on stderr elsewhere (one per epoch and at most one every 10 s in
    between); False is silent. A DataLoader over a ``TensorDataset`` is read by slicing its
    tensors, in the order the DataLoader itself would give (``iter_batches``).
    ``channels_last``: image batches in channels-last layout (None: on CPU, where it is faster;
    the model's parameters keep their layout). ``compile=True`` runs the training steps through
    ``torch.compile(model)``: faster per step once compiled, but compiling takes long on a CPU,
    so it pays only for long runs (measured in docs/results/loop_speed.md); off by default.
    """
    if epochs < 1:
        raise NeuralignError(f"epochs must be >= 1, got {epochs}")
    loader = as_loader(loader, batch_size=batch_size, shuffle=True, seed=seed)
    if not hasattr(loader, "__len__"):
        raise DataError("training needs a DataLoader or a Dataset (something with a length)")
    if len(loader) == 0:
        raise DataError("the training loader yields no batches; is the data set empty?")
    device = torch.device(device) if device is not None else model_device(model)
    cl = use_channels_last(channels_last, device)
    model.to(device)
    callbacks = list(callbacks)
    if param_groups is None:
        param_groups = [{"params": [p for p in model.parameters() if p.requires_grad]}]
    groups = [dict(g, params=list(g["params"])) for g in param_groups]
    groups = [g for g in groups if g["params"]]
    if not groups:
        raise NeuralignError("nothing to train: every parameter is frozen")
    for g in groups:
        g.setdefault("lr_scale", 1.0)
    opt = make_optimizer(optimizer, groups, lr, momentum, weight_decay)
    steps_per_epoch = len(loader) if max_steps is None else min(len(loader), max_steps)
    total = epochs * steps_per_epoch
    factor = _schedule(schedule, total, warmup_steps)
    if loss_fn is None:
        loss_fn = lambda out, y: F.cross_entropy(out, y, label_smoothing=label_smoothing)
    after_backward = _hooks(callbacks, "after_backward")
    after_step = _hooks(callbacks, "after_step")
    forward = torch.compile(model) if compile else model
    check_each_step = device.type == "cpu"  # elsewhere a per-step check would sync the device
    torch.manual_seed(seed)
    history = History()
    start = time.perf_counter()
    step = 0
    _call(_hooks(callbacks, "on_train_start"), model, opt)
    with Progress("train", total, progress) as prog:
        for epoch in range(epochs):
            model.train()
            _call(_hooks(callbacks, "on_epoch_start"), model, opt, epoch)
            loss_sum = torch.zeros((), dtype=torch.float64, device=device)
            correct = torch.zeros((), dtype=torch.int64, device=device)
            seen, classify = 0, True
            for i, batch in enumerate(iter_batches(loader)):
                if i >= steps_per_epoch:
                    break
                x, y = split_batch(batch)
                if y is None:
                    raise DataError("each training batch must be an (inputs, targets) pair")
                x, y = to_device(x, device, cl), y.to(device, non_blocking=True)
                f = factor(step)
                for g in opt.param_groups:  # lr_scale may have been changed by a callback
                    g["lr"] = lr * g["lr_scale"] * f
                out = _forward(forward, x, compile)
                loss = loss_fn(out, y)
                if regularizer is not None:
                    loss = loss + regularizer(model)
                if check_each_step and not torch.isfinite(loss):
                    _diverged(loss, epoch, i)
                opt.zero_grad(set_to_none=True)
                loss.backward()
                _call(after_backward, model, opt)
                opt.step()
                _call(after_step, model, opt)
                n = y.shape[0]
                seen += n
                loss_sum += loss.detach() * n
                classify = y.dtype == torch.int64 and out.dim() == 2
                if classify:
                    correct += (out.detach().argmax(1) == y).sum()
                step += 1
                if prog.advance(n):
                    prog.report(f"epoch {epoch + 1}/{epochs}, loss {float(loss_sum) / seen:.4f}")
            train_loss = float(loss_sum) / seen
            if not math.isfinite(train_loss):
                _diverged(loss_sum, epoch, i)
            metrics = {"epoch": epoch + 1, "train_loss": train_loss,
                       "train_accuracy": int(correct) / seen if classify else float("nan")}
            if val_loader is not None:
                ev = evaluate(model, val_loader, loss_fn=loss_fn, device=device, progress=False,
                              channels_last=cl)
                metrics.update(val_loss=ev["loss"], val_accuracy=ev["accuracy"])
            history.epochs.append(metrics)
            prog.line(f"epoch {epoch + 1}/{epochs}, " + ", ".join(
                f"{k} {v:.4f}" for k, v in metrics.items() if k != "epoch"))
            _call(_hooks(callbacks, "on_epoch_end"), model, opt, epoch, metrics)
    history.seconds = time.perf_counter() - start
    model.eval()
    return history
