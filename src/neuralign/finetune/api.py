"""The fine-tuning interface: ``finetune``, ``FinetuneResult``, ``Strategy`` and the registry.

A strategy is a subclass of :class:`Strategy` registered under a name::

    @register_strategy("mine")
    class Mine(Strategy):
        defaults = {"alpha": 0.5}          # the options it accepts, with defaults

        def param_groups(self, model):     # which parameters train, at which rate
            return [{"params": list(model.parameters()), "lr_scale": 1.0}]

``finetune(model, data, strategy="mine", alpha=0.3)`` then copies the model, gives it a new head
when the label set changes, calls ``prepare`` (alignment, freezing), ``fit`` (by default one call
of :func:`neuralign.train.train` with ``param_groups`` and ``callbacks``) and ``finalize``
(e.g. WiSE-FT interpolation), and returns a :class:`FinetuneResult`.
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch
from torch import nn
from torch.utils.data import DataLoader

from neuralign.errors import NeuralignError
from neuralign.finetune.heads import (  # noqa: F401 - part of this module's API
    head_module,
    head_out_features,
    head_param_names,
    new_head,
)
from neuralign.finetune.training import as_loader, run_training  # noqa: F401 - re-exported

__all__ = [
    "FinetuneContext",
    "FinetuneResult",
    "Strategy",
    "finetune",
    "get_strategy",
    "list_strategies",
    "register_strategy",
    "as_loader",
    "head_module",
    "head_param_names",
]

_REGISTRY: dict[str, type[Strategy]] = {}


# --------------------------------------------------------------------------- results, context


@dataclass
class FinetuneResult:
    """What :func:`finetune` returns: a new ``model``, the training ``history`` and ``info``."""

    model: nn.Module
    history: Any = None
    info: dict[str, Any] = field(default_factory=dict)


@dataclass
class FinetuneContext:
    """Everything a strategy may need besides the model and the training loader.

    Unknown attributes are looked up in ``extras`` (the strategy options, e.g. ``ctx.anchor``),
    so ``ctx.anchor`` and ``ctx.get("anchor")`` both work.
    """

    seed: int = 0
    device: torch.device | str | None = None
    num_classes: int | None = None
    val_loader: DataLoader | None = None
    epochs: int = 1
    lr: float = 1e-3
    batch_size: int = 32
    progress: bool = False
    train_kwargs: dict[str, Any] = field(default_factory=dict)
    train_data: Any = None
    original_model: nn.Module | None = None
    select: str = "last"
    bn: str = "train"
    extras: dict[str, Any] = field(default_factory=dict)

    def __getattr__(self, name: str) -> Any:
        extras = self.__dict__.get("extras", {})
        if name in extras:
            return extras[name]
        raise AttributeError(name)

    def get(self, name: str, default: Any = None) -> Any:
        if name in self.__dict__ and name != "extras":
            return self.__dict__[name]
        return self.__dict__.get("extras", {}).get(name, default)

    def train(
        self,
        model: nn.Module,
        loader: DataLoader,
        *,
        epochs: int | None = None,
        lr: float | None = None,
        param_groups: list[dict] | None = None,
        callbacks: Iterable[Any] = (),
        seed: int | None = None,
    ) -> Any:
        """One training run with the context's settings (what ``Strategy.fit`` calls)."""
        return run_training(
            model,
            loader,
            self,
            epochs=self.epochs if epochs is None else epochs,
            lr=self.lr if lr is None else lr,
            param_groups=param_groups,
            callbacks=list(callbacks),
            seed=self.seed if seed is None else seed,
        )


# --------------------------------------------------------------------------- strategies


class Strategy:
    """Base class of a fine-tuning strategy. Subclasses override any of the hooks.

    ``defaults`` lists the options the strategy accepts; an unknown option is an error that
    names the accepted ones. ``self.info`` is copied into ``FinetuneResult.info``.
    """

    name: ClassVar[str] = "base"
    defaults: ClassVar[dict[str, Any]] = {}
    #: short help line shown by ``neuralign finetune --list-strategies``
    summary: ClassVar[str] = ""

    def __init__(self, **options: Any) -> None:
        unknown = sorted(set(options) - set(self.defaults))
        if unknown:
            known = ", ".join(sorted(self.defaults)) or "none"
            raise NeuralignError(
                f"strategy {self.name!r} does not accept option(s) {', '.join(unknown)}; "
                f"accepted: {known}"
            )
        self.options: dict[str, Any] = {**self.defaults, **options}
        self.info: dict[str, Any] = {}

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.options})"

    # hooks -------------------------------------------------------------------------------
    def prepare(self, model: nn.Module, loader: DataLoader, ctx: FinetuneContext) -> nn.Module:
        """Change the (already copied, already re-headed) model before training."""
        return model

    def param_groups(self, model: nn.Module) -> list[dict] | None:
        """Parameter groups with optional ``lr_scale``; ``None`` trains every parameter."""
        return None

    def callbacks(self, model: nn.Module, loader: DataLoader, ctx: FinetuneContext) -> list:
        """Train-loop callbacks (see ``neuralign.train``)."""
        return []

    def fit(
        self, model: nn.Module, loader: DataLoader, ctx: FinetuneContext
    ) -> tuple[nn.Module, Any]:
        """Train; returns ``(model, history)``. The default is one ``ctx.train`` run."""
        history = ctx.train(
            model,
            loader,
            param_groups=self.param_groups(model),
            callbacks=self.callbacks(model, loader, ctx),
        )
        return model, history

    def finalize(self, model: nn.Module, ctx: FinetuneContext) -> nn.Module:
        """Post-process the trained model (WiSE-FT interpolation, ensembling, ...)."""
        return model


def register_strategy(name: str) -> Callable[[type[Strategy]], type[Strategy]]:
    """Class decorator: ``@register_strategy("name")`` on a ``Strategy`` subclass."""

    def deco(cls: type[Strategy]) -> type[Strategy]:
        if not (isinstance(cls, type) and issubclass(cls, Strategy)):
            raise TypeError(f"@register_strategy({name!r}) needs a Strategy subclass, got {cls!r}")
        old = _REGISTRY.get(name)
        if old is not None and old.__qualname__ != cls.__qualname__:
            raise NeuralignError(
                f"strategy name {name!r} is already registered by {old.__qualname__}"
            )
        cls.name = name
        _REGISTRY[name] = cls
        return cls

    return deco


def list_strategies() -> list[str]:
    """Names of every registered strategy, sorted."""
    return sorted(_REGISTRY)


def get_strategy(name: str | Strategy, **options: Any) -> Strategy:
    """A configured strategy instance (a ``Strategy`` instance is returned unchanged)."""
    if isinstance(name, Strategy):
        if options:
            raise NeuralignError("options cannot be given together with a Strategy instance")
        return name
    cls = _REGISTRY.get(name)
    if cls is None:
        raise NeuralignError(
            f"unknown fine-tuning strategy {name!r}; available: {', '.join(list_strategies())}"
        )
    try:
        return cls(**options)
    except TypeError as exc:  # a subclass with its own __init__ signature
        raise NeuralignError(f"bad options for strategy {name!r}: {exc}") from None


# --------------------------------------------------------------------------- the entry point


def finetune(
    model: nn.Module,
    train_data: Any,
    *,
    strategy: str | Strategy = "full",
    epochs: int = 1,
    lr: float = 1e-3,
    num_classes: int | None = None,
    val_data: Any = None,
    seed: int = 0,
    device: torch.device | str | None = None,
    progress: bool = True,
    batch_size: int = 32,
    optimizer: str = "sgd",
    momentum: float = 0.9,
    weight_decay: float = 0.0,
    schedule: str = "cosine",
    select: str = "last",
    reset_head: bool | None = None,
    bn: str = "train",
    train_options: Mapping[str, Any] | None = None,
    **options: Any,
) -> FinetuneResult:
    """Fine-tune a copy of ``model`` on ``train_data`` with a registered strategy.

    ``num_classes``: the label count of the new task; the head is replaced (seeded by ``seed``)
    when it differs from the model's head, or always when ``reset_head=True``.
    ``select="best_val"`` keeps the epoch with the best ``val_data`` accuracy (DomainBed's
    training-domain validation). ``options`` go to the strategy (``get_strategy(name, **options)``)
    and are also visible as ``ctx.<name>`` to its hooks.
    ``bn``: the batch-norm policy (``"frozen"``, ``"adapt"`` or ``"train"``, see
    :mod:`neuralign.finetune.bn`), applied by every strategy to every training run and gradient
    score, and recorded in ``info["bn"]``.
    """
    if not isinstance(model, nn.Module):
        raise NeuralignError(f"finetune needs an nn.Module, got {type(model).__name__}")
    if epochs < 0:
        raise NeuralignError(f"epochs must be >= 0, got {epochs}")
    if select not in ("last", "best_val"):
        raise NeuralignError(f"select must be 'last' or 'best_val', got {select!r}")
    if select == "best_val" and val_data is None:
        raise NeuralignError("select='best_val' needs val_data (training-domain validation data)")
    from neuralign.finetune.bn import check_bn_policy

    check_bn_policy(bn)
    strat = get_strategy(strategy, **options)
    loader = as_loader(train_data, batch_size=batch_size, shuffle=True, seed=seed)
    val_loader = None if val_data is None else as_loader(val_data, batch_size=max(batch_size, 256))
    train_kwargs = dict(
        optimizer=optimizer, momentum=momentum, weight_decay=weight_decay, schedule=schedule
    )
    train_kwargs.update(train_options or {})
    ctx = FinetuneContext(
        seed=seed,
        device=device,
        num_classes=num_classes,
        val_loader=val_loader,
        epochs=epochs,
        lr=lr,
        batch_size=batch_size,
        progress=progress,
        train_kwargs=train_kwargs,
        train_data=train_data,
        original_model=model,
        select=select,
        bn=bn,
        extras=dict(strat.options),
    )
    work = copy.deepcopy(model)
    current = head_out_features(work)
    if reset_head is False and num_classes is not None and current != num_classes:
        raise NeuralignError(
            f"the model's head has {current} outputs but num_classes={num_classes}; "
            "allow reset_head"
        )
    if reset_head or (num_classes is not None and current != num_classes):
        work = new_head(work, num_classes if num_classes is not None else current, seed)
        ctx.extras["_new_head"] = True
    if ctx.num_classes is None:
        ctx.num_classes = head_out_features(work)
    if device is not None:
        work = work.to(device)
    strat.info = {}
    work = strat.prepare(work, loader, ctx)
    work, history = strat.fit(work, loader, ctx)
    work = strat.finalize(work, ctx)
    work.eval()
    info = {"strategy": strat.name, "options": _printable(strat.options), "bn": bn, **strat.info}
    if "_selected_epochs" in ctx.extras:
        info["selected_epochs"] = ctx.extras["_selected_epochs"]
    return FinetuneResult(model=work, history=history, info=info)


def _printable(options: Mapping[str, Any]) -> dict[str, Any]:
    out = {}
    for k, v in options.items():
        out[k] = v if isinstance(v, (int, float, str, bool, type(None))) else type(v).__name__
    return out
