"""Fine-tuning strategies behind one interface: ``finetune(model, data, strategy=...)``.

Every module of this package (and every sub-package, e.g. ``auto_lr``) is imported on first
import, so the strategies it registers with ``@register_strategy`` become available without
editing this file. A module that fails to import is skipped with a warning naming it.
"""

from __future__ import annotations

import importlib
import pkgutil
import warnings

from neuralign.finetune.api import (
    FinetuneContext,
    FinetuneResult,
    Strategy,
    finetune,
    get_strategy,
    list_strategies,
    register_strategy,
)

__all__ = [
    "FinetuneContext",
    "FinetuneResult",
    "Strategy",
    "finetune",
    "get_strategy",
    "list_strategies",
    "register_strategy",
]


def _discover() -> None:
    for info in sorted(pkgutil.iter_modules(__path__), key=lambda m: m.name):
        if info.name.startswith("_") or info.name == "api":
            continue
        try:
            importlib.import_module(f"{__name__}.{info.name}")
        except Exception as exc:  # another part's module must not break the interface
            warnings.warn(
                f"neuralign.finetune: skipped module {info.name!r} ({type(exc).__name__}: {exc})",
                stacklevel=2,
            )


_discover()
