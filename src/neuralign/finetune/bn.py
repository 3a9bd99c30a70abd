"""One batch-norm policy for every fine-tuning strategy (``finetune(..., bn=...)``).

Fine-tuning results on shifted inputs depend as much on what the batch-norm layers do as on
which weights move (re-estimating the statistics alone can be worth tens of points), so the
policy is one explicit setting, applied by one helper to every training run and every
gradient score of every strategy, and recorded in ``FinetuneResult.info["bn"]``:

* ``"frozen"`` (Lee et al.'s code: the whole network in eval mode): every batch-norm layer
  normalises with its running statistics and never updates them. Its affine parameters
  follow the strategy (a strategy that trains them trains them).
* ``"adapt"``: every batch-norm layer normalises with batch statistics and updates its running
  statistics while training, whether or not the strategy trains its affine parameters (which
  again follow the strategy).
* ``"train"`` (the default; plain PyTorch practice): a batch-norm layer is in train mode while
  training iff the strategy trains its affine parameters; a layer the strategy freezes is frozen
  whole (statistics included). Layers without affine parameters are in train mode.

"Trains" is decided once per run from the optimizer parameter groups: a parameter trains when
it is in a group whose ``lr_scale`` is > 0 or which is marked ``"rescored": True`` (per-layer
strategies whose rates are recomputed during training). Outside training (``model.eval()``)
every layer is in eval mode as usual.

Scores that need the model "as it trains" (Auto-RGN, Auto-SNR, +Hessian, +Change) are computed
inside :func:`training_mode` with the same policy, so scoring and training see one mode.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from torch import nn

from neuralign.errors import NeuralignError

__all__ = [
    "BN_POLICIES",
    "DEFAULT_BN",
    "check_bn_policy",
    "bn_modules",
    "trained_param_ids",
    "bn_train_flags",
    "BNPolicy",
    "training_mode",
]

BN_POLICIES = ("frozen", "adapt", "train")
DEFAULT_BN = "train"
_BN = nn.modules.batchnorm._BatchNorm


def check_bn_policy(policy: str) -> str:
    if policy not in BN_POLICIES:
        raise NeuralignError(f"bn must be one of {', '.join(BN_POLICIES)}, got {policy!r}")
    return policy


def bn_modules(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """``(name, module)`` of every batch-norm layer (any ``_BatchNorm`` subclass)."""
    return [(n, m) for n, m in model.named_modules() if isinstance(m, _BN)]


def trained_param_ids(param_groups: Iterable[dict] | None, model: nn.Module) -> set[int]:
    """Ids of the parameters a run trains: in a group with ``lr_scale > 0`` or ``rescored``.

    ``None`` (no groups given) means every parameter that requires a gradient."""
    if param_groups is None:
        return {id(p) for p in model.parameters() if p.requires_grad}
    out: set[int] = set()
    for g in param_groups:
        if g.get("rescored") or float(g.get("lr_scale", 1.0)) > 0:
            out.update(id(p) for p in g["params"])
    return out


def bn_train_flags(model: nn.Module, policy: str, trained: set[int] | None) -> dict[str, bool]:
    """Per batch-norm layer: is it in train mode while the model trains under ``policy``?"""
    check_bn_policy(policy)
    flags = {}
    for name, mod in bn_modules(model):
        if policy == "frozen":
            flags[name] = False
        elif policy == "adapt":
            flags[name] = True
        else:
            params = list(mod.parameters(recurse=False))
            flags[name] = (not params) or trained is None or any(id(p) in trained for p in params)
    return flags


class BNPolicy:
    """Context manager: while active, every forward of ``model`` in train mode puts each
    batch-norm layer in the mode ``policy`` gives it (a forward pre-hook on the root module, so
    ``model.train()`` calls inside a training loop cannot undo it). On exit the hook is removed
    and the layers' flags follow the model's mode again."""

    def __init__(self, model: nn.Module, policy: str, trained: set[int] | None = None) -> None:
        self.model = model
        self.flags = bn_train_flags(model, policy, trained)
        self._mods = dict(bn_modules(model))
        self._handle: Any = None

    def _hook(self, module: nn.Module, _inputs: Any) -> None:
        if module.training:
            for name, flag in self.flags.items():
                self._mods[name].training = flag

    def __enter__(self) -> BNPolicy:
        if self.flags:
            self._handle = self.model.register_forward_pre_hook(self._hook)
        return self

    def __exit__(self, *exc: Any) -> None:
        if self._handle is not None:
            self._handle.remove()
            self._handle = None
        was = self.model.training
        for mod in self._mods.values():
            mod.training = was


class training_mode:
    """Context manager: ``model.train()`` with the batch-norm ``policy`` applied (the mode a
    training run uses), restoring the previous mode on exit. Scores of gradients use this.

    Forward passes in train mode update batch-norm running statistics; with ``keep_buffers``
    (the default) every buffer is restored on exit, so scoring never changes the model."""

    def __init__(self, model: nn.Module, policy: str, trained: set[int] | None = None, *,
                 keep_buffers: bool = True) -> None:
        self.model, self.was = model, model.training
        self.bn = BNPolicy(model, policy, trained)
        self.keep_buffers = keep_buffers
        self._saved: dict[str, Any] = {}

    def __enter__(self) -> nn.Module:
        if self.keep_buffers:
            self._saved = {n: b.detach().clone() for n, b in self.model.named_buffers()}
        self.model.train()
        self.bn.__enter__()
        self.bn._hook(self.model, ())  # apply now too: functional_call bypasses root hooks
        return self.model

    def __exit__(self, *exc: Any) -> None:
        self.bn.__exit__(*exc)
        self.model.train(self.was)
        if self._saved:
            import torch

            with torch.no_grad():
                for n, b in self.model.named_buffers():
                    if n in self._saved:
                        b.copy_(self._saved[n])
            self._saved = {}

    def bn_in_train_mode(self) -> list[str]:
        """Names of the batch-norm layers this mode puts in train mode."""
        return [n for n, f in self.bn.flags.items() if f]
