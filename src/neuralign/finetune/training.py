"""How a strategy's model is trained: loaders, freezing what no group names, the batch-norm
policy (``neuralign.finetune.bn``), and selecting the epoch by training-domain validation accuracy."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from torch import nn
from torch.utils.data import DataLoader, Dataset

from neuralign.errors import NeuralignError

if TYPE_CHECKING:
    from neuralign.finetune.api import FinetuneContext


def as_loader(
    data: Any, *, batch_size: int = 32, shuffle: bool = False, seed: int = 0
) -> DataLoader:
    """A deterministic DataLoader from a dataset (a loader is returned unchanged)."""
    from neuralign.train import as_loader as _train_as_loader

    if data is None:
        raise NeuralignError("no data given: pass a dataset, a DataLoader or an (x, y) pair")
    if isinstance(data, Dataset) and len(data) == 0:
        raise NeuralignError("the data set is empty")
    return _train_as_loader(data, batch_size=batch_size, shuffle=shuffle, seed=seed)


class _BestVal:
    """Callback: keep the weights of the epoch with the best validation accuracy."""

    def __init__(self) -> None:
        self.best_acc, self.best_epoch, self.best_state = -1.0, -1, None

    def on_epoch_end(
        self, model: nn.Module, optimizer: Any, epoch: int, metrics: Any = None
    ) -> None:
        acc = float((metrics or {}).get("val_accuracy", float("nan")))
        if acc > self.best_acc:
            self.best_acc, self.best_epoch = acc, epoch
            self.best_state = {k: v.detach().clone() for k, v in model.state_dict().items()}


def run_training(
    model: nn.Module,
    loader: DataLoader,
    ctx: FinetuneContext,
    *,
    epochs: int,
    lr: float,
    param_groups: list[dict] | None,
    callbacks: list,
    seed: int,
) -> Any:
    """Train in place: freeze what no group names, apply the ``ctx.bn`` batch-norm policy,
    select by val."""
    from neuralign.train import train

    if epochs == 0:
        return None
    flags = {n: p.requires_grad for n, p in model.named_parameters()}
    if param_groups is None:
        param_groups = [{"params": [p for p in model.parameters() if p.requires_grad]}]
    param_groups = [dict(g, params=list(g["params"])) for g in param_groups]
    param_groups = [g for g in param_groups if g["params"]]
    chosen = {id(p) for g in param_groups for p in g["params"]}
    if not chosen:
        raise NeuralignError("the strategy selected no trainable parameter")
    for p in model.parameters():
        if id(p) not in chosen:
            p.requires_grad_(False)
    from neuralign.finetune.bn import BNPolicy, trained_param_ids

    policy = BNPolicy(model, ctx.bn, trained_param_ids(param_groups, model))
    best = None
    extra = {}
    if ctx.select == "best_val" and ctx.val_loader is not None:
        best = _BestVal()
        callbacks = [*callbacks, best]
        extra["val_loader"] = ctx.val_loader
    try:
        with policy:
            history = train(
                model,
                loader,
                epochs=epochs,
                lr=lr,
                param_groups=param_groups,
                callbacks=callbacks,
                device=ctx.device,
                progress=ctx.progress,
                seed=seed,
                **ctx.train_kwargs,
                **extra,
            )
    finally:
        for n, p in model.named_parameters():
            p.requires_grad_(flags[n])
    if best is not None and best.best_state is not None:
        model.load_state_dict(best.best_state)
        ctx.extras.setdefault("_selected_epochs", []).append(best.best_epoch)
    return history
