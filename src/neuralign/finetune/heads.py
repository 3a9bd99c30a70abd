"""The classifier head of a model being fine-tuned: find it, count its outputs, replace it."""

from __future__ import annotations

from torch import nn


def head_module(model: nn.Module) -> tuple[str, nn.Module]:
    """``(name, module)`` of the classifier head, via ``neuralign.models.get_head_name``."""
    from neuralign.models import get_head_name

    name = get_head_name(model)
    return name, model.get_submodule(name)


def head_param_names(model: nn.Module) -> list[str]:
    name, _ = head_module(model)
    return [k for k, _ in model.named_parameters() if k == name or k.startswith(name + ".")]


def head_out_features(model: nn.Module) -> int | None:
    _, head = head_module(model)
    out = getattr(head, "out_features", None)
    if out is None:
        ws = [p for p in head.parameters() if p.dim() >= 1]
        out = ws[-1].shape[0] if ws else None
    return out


def new_head(model: nn.Module, num_classes: int, seed: int) -> nn.Module:
    """A copy of ``model`` with a freshly initialised head (initialisation seeded)."""
    from neuralign.models import replace_head

    return replace_head(model, num_classes, seed=seed)
