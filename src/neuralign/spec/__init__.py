"""Permutation specs: which tensor axes of a model share one permutation of hidden units."""

from __future__ import annotations

from torch import nn

from neuralign.errors import SpecError
from neuralign.spec.attention import bert_spec, is_bert_like, is_torchvision_vit, vit_spec
from neuralign.spec.core import Group, Permutation, PermutationSpec, Place, Probe
from neuralign.spec.trace import trace_spec

__all__ = [
    "Group",
    "Permutation",
    "PermutationSpec",
    "Place",
    "Probe",
    "SpecError",
    "bert_spec",
    "spec_from_model",
    "vit_spec",
]


def spec_from_model(model: nn.Module, example_input=None) -> PermutationSpec:
    """Derive the permutation spec of ``model``.

    torchvision ViTs and Hugging Face BERT-family encoders get programmatic specs (attention
    heads, within-head dims, MLP and residual stream); every other model is traced with torch.fx
    on ``example_input`` (a batch of inputs, e.g. ``torch.randn(2, 3, 32, 32)``). A model the
    tracer cannot follow raises ``SpecError`` naming the node.
    """
    if not isinstance(model, nn.Module):
        raise SpecError(f"spec_from_model needs an nn.Module, got {type(model).__name__}")
    if is_torchvision_vit(model):
        return vit_spec(model)
    if is_bert_like(model):
        return bert_spec(model)
    if example_input is None:
        raise SpecError("spec_from_model needs an example_input (a small batch of inputs) to "
                        "trace the model")
    return trace_spec(model, example_input)
