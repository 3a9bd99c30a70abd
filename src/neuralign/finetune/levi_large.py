"""LEVI's large model: freeze it, train its head, or adapt it with LoRA (``configure_large``)."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from neuralign.errors import NeuralignError

LARGE_MODES = ("frozen", "half", "lora", "full")


def _head_module_names(model: nn.Module) -> set[str]:
    from neuralign.models import get_head_name

    try:
        return {get_head_name(model)}
    except NeuralignError:
        return set()


def configure_large(model: nn.Module, mode: str, *, lora_r: int = 8, lora_alpha: float | None = None,
                    lora_targets: Sequence[str] | None = None, seed: int = 0) -> nn.Module:
    """Set which weights of ``model`` (in place; LEVI passes its own copy) train: ``frozen`` none,
    ``half`` the top half of its blocks, ``lora`` only LoRA adapters injected by PEFT into its
    Linear/Conv2d layers (all but the classifier head unless ``lora_targets``), ``full`` all."""
    if mode not in LARGE_MODES:
        raise NeuralignError(f"unknown large-model mode {mode!r}; use one of {', '.join(LARGE_MODES)}")
    heads = _head_module_names(model)
    for p in model.parameters():
        p.requires_grad_(mode == "full")
    if mode == "half":
        from neuralign.models import block_names

        blocks = [b for b in block_names(model) if b not in heads]
        for name in blocks[len(blocks) // 2:]:
            for p in model.get_submodule(name).parameters():
                p.requires_grad_(True)
    elif mode == "lora":
        try:
            from peft import LoraConfig, inject_adapter_in_model
        except ImportError as exc:
            raise NeuralignError("LoRA needs PEFT: pip install 'neuralign[hf]' (peft)") from exc
        if lora_targets is None:
            lora_targets = [n for n, m in model.named_modules()
                            if isinstance(m, (nn.Linear, nn.Conv2d)) and n not in heads]
        if not lora_targets:
            raise NeuralignError("no Linear/Conv2d layers to put LoRA adapters on; pass lora_targets")
        cfg = LoraConfig(r=lora_r, lora_alpha=lora_alpha or lora_r, lora_dropout=0.0,
                         target_modules=list(lora_targets), bias="none")
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            model = inject_adapter_in_model(cfg, model)
        for n, p in model.named_parameters():
            p.requires_grad_("lora_" in n)
    return model


def _direct_trainable(m: nn.Module) -> bool:
    return any(p.requires_grad for p in m.parameters(recurse=False))
