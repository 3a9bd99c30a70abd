"""Permutation specs: which tensor axes of a model share one permutation of hidden units."""

from __future__ import annotations

import copy
import hashlib
from collections import OrderedDict

from torch import nn

from neuralign.errors import SpecError
from neuralign.spec.attention import bert_spec, is_bert_like, is_torchvision_vit, vit_spec
from neuralign.spec.check import check_spec
from neuralign.spec.core import Coverage, Group, Permutation, PermutationSpec, Place, Probe
from neuralign.spec.trace import trace_spec

__all__ = [
    "Coverage",
    "Group",
    "Permutation",
    "PermutationSpec",
    "Place",
    "Probe",
    "SpecError",
    "bert_spec",
    "check_spec",
    "default_example_input",
    "is_bert_like",
    "is_torchvision_vit",
    "spec_from_model",
    "vit_spec",
]


def default_example_input(model: nn.Module):
    """A small example input for models that say what they take: Hugging Face models (token
    ids, or pixel values for vision configs) and torchvision ViTs; None otherwise."""
    import torch

    cfg = getattr(model, "config", None)
    if cfg is not None and hasattr(cfg, "model_type"):
        if hasattr(cfg, "image_size") and hasattr(cfg, "num_channels"):
            size = cfg.image_size if isinstance(cfg.image_size, int) else cfg.image_size[0]
            return {"pixel_values": torch.randn(2, cfg.num_channels, size, size)}
        vocab = getattr(cfg, "vocab_size", 100) or 100
        ids = torch.randint(0, min(vocab, 1000), (2, 8), generator=torch.Generator()
                            .manual_seed(0))
        x = {"input_ids": ids}
        if getattr(cfg, "use_cache", None) is not None:
            x["use_cache"] = False
        if getattr(cfg, "is_encoder_decoder", False):
            x["decoder_input_ids"] = ids[:, :4]
        return x
    if is_torchvision_vit(model):
        return torch.randn(2, 3, model.image_size, model.image_size)
    return None


def spec_from_model(model: nn.Module, example_input=None, *, check: bool = True) -> PermutationSpec:
    """Derive the permutation spec of ``model`` by tracing it on ``example_input``.

    ``example_input``: a batch (e.g. ``torch.randn(2, 3, 32, 32)``), a tuple of positional
    inputs, or a dict of keyword inputs (Hugging Face: ``{"input_ids": ...}``); Hugging Face
    models and torchvision ViTs get a default one. The model is traced with ``torch.export``;
    every group is exact by construction, anything the tracer cannot account for is fixed to
    the identity with a reason (``spec.coverage()``). A torchvision ViT without an example
    input keeps its hand-written spec (named per encoder layer), checked on a random input.
    With ``check`` (default) the spec is verified before it is returned: a random permutation
    of every group must leave every output unchanged (:func:`check_spec`).
    Raises ``SpecError`` when the model does not run, cannot be exported, or has nothing that
    can be permuted.
    """
    if not isinstance(model, nn.Module):
        raise SpecError(f"spec_from_model needs an nn.Module, got {type(model).__name__}")
    if example_input is None and is_torchvision_vit(model):
        spec = vit_spec(model)
        check_spec(model, spec, default_example_input(model))
        return spec
    if example_input is None:
        example_input = default_example_input(model)
    if example_input is None:
        raise SpecError("spec_from_model needs an example_input (a small batch of inputs) to "
                        "trace the model")
    key = _fingerprint(model, example_input) if check else None
    if key is not None and key in _CACHE:  # same architecture and input: verify, reuse
        spec = copy.deepcopy(_CACHE[key])
        try:
            spec.trace_info["check_rel_diff"] = check_spec(model, spec, example_input)
            return spec
        except SpecError:
            del _CACHE[key]
    spec = trace_spec(model, example_input)
    if check:
        spec.trace_info["check_rel_diff"] = check_spec(model, spec, example_input)
        _CACHE[key] = copy.deepcopy(spec)
        while len(_CACHE) > 32:
            _CACHE.popitem(last=False)
    return spec


_CACHE: OrderedDict = OrderedDict()


def _signature(x):
    if hasattr(x, "shape"):
        return ("t", tuple(x.shape), str(x.dtype))
    if isinstance(x, dict):
        return tuple((k, _signature(v)) for k, v in sorted(x.items()))
    if isinstance(x, (list, tuple)):
        return tuple(_signature(v) for v in x)
    return repr(x)


def _fingerprint(model: nn.Module, example_input) -> tuple:
    """Architecture (class, module tree, tensor shapes) and input signature. A cached spec is
    only reused after it passes :func:`check_spec` on the new model."""
    sd = tuple((k, tuple(v.shape), str(v.dtype)) for k, v in model.state_dict().items())
    tree = hashlib.sha1(repr(model).encode()).hexdigest()
    return (type(model).__module__, type(model).__qualname__, tree, sd,
            _signature(example_input))
