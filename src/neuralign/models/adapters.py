"""Which module of a model is its classifier head, and what its blocks are.

Works for the reference models, torchvision (``fc``, ``classifier``, ``heads``), timm
(``get_classifier`` / ``reset_classifier``) and Hugging Face models (``classifier``, ``score``).
"""

from __future__ import annotations

import copy

from torch import nn

from neuralign.errors import NeuralignError

_HEAD_CANDIDATES = ("classifier", "fc", "head", "heads", "score", "last_linear")


def _last_linear(module: nn.Module, prefix: str) -> str | None:
    found = None
    for name, m in module.named_modules(prefix=prefix):
        if isinstance(m, nn.Linear):
            found = name
    return found


def get_head_name(model: nn.Module) -> str:
    """Qualified name of the final ``nn.Linear`` that produces the logits."""
    get_cls = getattr(model, "get_classifier", None)  # timm
    if callable(get_cls):
        head = get_cls()
        for name, m in model.named_modules():
            if m is head and isinstance(m, nn.Linear):
                return name
    children = dict(model.named_children())
    for cand in _HEAD_CANDIDATES:
        if cand in children:
            sub = children[cand]
            if isinstance(sub, nn.Linear):
                return cand
            name = _last_linear(sub, cand)
            if name is not None:
                return name
    name = _last_linear(model, "")
    if name is None:
        raise NeuralignError(f"cannot find a classifier head (no nn.Linear) in "
                             f"{type(model).__name__}; pass the head's module name explicitly")
    return name


def get_submodule(model: nn.Module, name: str) -> nn.Module:
    try:
        return model.get_submodule(name)
    except AttributeError as exc:
        raise NeuralignError(f"{type(model).__name__} has no module {name!r}") from exc


def _set_submodule(model: nn.Module, name: str, new: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, new)


def replace_head(model: nn.Module, num_classes: int, seed: int | None = None) -> nn.Module:
    """A copy of ``model`` whose head is a freshly initialised Linear with ``num_classes`` outputs."""
    import torch

    new_model = copy.deepcopy(model)
    name = get_head_name(new_model)
    old = new_model.get_submodule(name)
    if seed is not None:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            head = nn.Linear(old.in_features, num_classes, bias=old.bias is not None)
    else:
        head = nn.Linear(old.in_features, num_classes, bias=old.bias is not None)
    head = head.to(device=old.weight.device, dtype=old.weight.dtype)
    _set_submodule(new_model, name, head)
    cfg = getattr(new_model, "_neuralign_config", None)
    if cfg is not None:
        cfg["kwargs"]["num_classes"] = num_classes
    return new_model


def _has_params(m: nn.Module) -> bool:
    return any(True for _ in m.parameters())


def _is_stack(m: nn.Module) -> bool:
    """A container of several blocks (not a conv + norm pair such as a ResNet stem)."""
    if not isinstance(m, (nn.Sequential, nn.ModuleList)):
        return False
    members = [c for c in m.children() if _has_params(c)]
    composite = sum(any(True for _ in c.children()) for c in members)
    weighted = sum(isinstance(c, (nn.Linear, nn.Conv1d, nn.Conv2d)) for c in members)
    return len(members) > 1 and (composite > 1 or weighted > 1)


def block_names(model: nn.Module) -> list[str]:
    """Ordered blocks from input to output, for "half" fine-tuning, per-block distances and
    block-granularity learning rates. Top-level children, with stacks (``nn.Sequential`` /
    ``nn.ModuleList`` of several parameterised modules, also one level down as in torchvision's
    ``encoder.layers`` or Hugging Face's ``encoder.layer``) expanded into their members."""
    names: list[str] = []
    for name, child in model.named_children():
        if not _has_params(child):
            continue
        if _is_stack(child):
            names += [f"{name}.{n}" for n, c in child.named_children() if _has_params(c)]
            continue
        inner = [(n, c) for n, c in child.named_children() if _is_stack(c)]
        if len(inner) == 1:
            for n, c in child.named_children():
                if not _has_params(c):
                    continue
                if c is inner[0][1]:
                    names += [f"{name}.{n}.{k}" for k, g in c.named_children() if _has_params(g)]
                else:
                    names.append(f"{name}.{n}")
        else:
            names.append(name)
    return names
