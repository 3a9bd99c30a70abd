"""Loading a weights file into a freshly built model, strictly, and changing its input channels.

Strict means: every tensor of the model comes from the file with the same shape, and the file
has nothing else. The one allowed exception is a new classifier head (the caller asked for
another ``num_classes``): then only the head's tensors may differ in shape, and the head keeps its
fresh initialisation. Anything else is a one-line ``ArchitectureMismatchError`` naming the first
mismatch.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
from torch import nn

from neuralign.errors import ArchitectureMismatchError, NeuralignError


def _shape(t) -> tuple:
    return tuple(t.shape)


def describe_mismatch(own: Mapping, sd: Mapping, skip=()) -> str | None:
    """The first missing / unexpected / other-shaped tensor between a model's state dict
    ``own`` and ``sd`` as one phrase, with totals; None when they fit."""
    missing = [k for k in own if k not in sd and k not in skip]
    unexpected = [k for k in sd if k not in own and k not in skip]
    shapes = [k for k in own if k in sd and k not in skip and _shape(own[k]) != _shape(sd[k])]
    if not (missing or unexpected or shapes):
        return None
    parts = []
    if shapes:
        k = shapes[0]
        parts.append(f"{len(shapes)} of another shape (first: {k!r} is {_shape(sd[k])} in the "
                     f"file, {_shape(own[k])} in the model)")
    if missing:
        parts.append(f"{len(missing)} missing from the file (first: {missing[0]!r} "
                     f"{_shape(own[missing[0]])})")
    if unexpected:
        parts.append(f"{len(unexpected)} unexpected (first: {unexpected[0]!r} "
                     f"{_shape(sd[unexpected[0]])})")
    return "; ".join(parts)


WRAPPER_PREFIXES = ("module.", "_orig_mod.")  # DataParallel / DDP, torch.compile


def unwrap(sd: Mapping, own: Mapping) -> Mapping:
    """``sd`` without a wrapper's prefix when every key carries it and none fits as is."""
    for prefix in WRAPPER_PREFIXES:
        if sd and all(k.startswith(prefix) for k in sd) and not any(k in own for k in sd):
            return unwrap({k[len(prefix):]: v for k, v in sd.items()}, own)
    return sd


def load_strict(model: nn.Module, sd: Mapping, source: str, *, new_head: str | None = None
                ) -> nn.Module:
    """Load ``sd`` into ``model`` strictly (see the module's docstring). ``new_head``: the head
    module's name when a fresh head of another size is wanted. The prefixes that
    ``nn.DataParallel`` and ``torch.compile`` put on every key are removed first."""
    from neuralign.models.affine import attach_saved_affines

    # a REPAIRed model's block-output affines (neuralign.models.affine): attached, then loaded
    attach_saved_affines(model, unwrap(sd, model.state_dict()))
    own = model.state_dict()
    sd = unwrap(sd, own)
    head_keys = set()
    if new_head:
        prefix = new_head + "."
        head_keys = {k for k in own if k.startswith(prefix)}
        if not any(k in sd and _shape(sd[k]) != _shape(own[k]) for k in head_keys):
            head_keys = set()  # the file's head already has the asked size: load it too
        else:
            head_keys |= {k for k in sd if k.startswith(prefix)}
    problem = describe_mismatch(own, sd, skip=head_keys)
    if problem:
        raise ArchitectureMismatchError(f"{source} does not fit {type(model).__name__}: "
                                        f"{problem}")
    body = {k: v for k, v in sd.items() if k not in head_keys}
    with torch.no_grad():
        result = model.load_state_dict(body, strict=not head_keys)
    missing = [k for k in result.missing_keys if k not in head_keys]
    if missing or result.unexpected_keys:  # cannot happen after the check above; be sure
        raise ArchitectureMismatchError(f"{source} does not fit {type(model).__name__}")
    return model


def find_input_conv(model: nn.Module, hint: str | None = None) -> str:
    """Name of the convolution that reads the input: ``hint`` (timm's ``first_conv``) or the
    only ``nn.Conv2d`` with 3 input channels."""
    if hint:
        name = hint if isinstance(hint, str) else hint[0]
        try:
            if isinstance(model.get_submodule(name), nn.Conv2d):
                return name
        except AttributeError:
            pass
    convs = [n for n, m in model.named_modules()
             if isinstance(m, nn.Conv2d) and m.in_channels == 3]
    if len(convs) != 1:
        raise NeuralignError(
            f"cannot tell which convolution of {type(model).__name__} reads the input "
            f"({len(convs)} candidates), so in_channels cannot be changed; use 3-channel inputs")
    return convs[0]


def set_input_channels(model: nn.Module, conv_name: str, channels: int,
                       keep_weights: bool) -> nn.Module:
    """Replace the input convolution by one reading ``channels`` channels. ``keep_weights``:
    derive its weights from the trained ones (summed over the input channels for 1 channel;
    cycled and rescaled by ``old / channels`` otherwise), so the response to a grey image that
    is the mean of the colours stays the same; else a fresh default initialisation."""
    if channels < 1:
        raise NeuralignError(f"in_channels must be >= 1, got {channels}")
    old = model.get_submodule(conv_name)
    if old.in_channels == channels:
        return model
    if old.groups != 1:
        raise NeuralignError(f"the input convolution {conv_name!r} is grouped; in_channels "
                             "cannot be changed")
    new = nn.Conv2d(channels, old.out_channels, old.kernel_size, old.stride, old.padding,
                    old.dilation, 1, old.bias is not None, old.padding_mode)
    new = new.to(device=old.weight.device, dtype=old.weight.dtype)
    if keep_weights:
        with torch.no_grad():
            w = old.weight
            if channels == 1:
                new.weight.copy_(w.sum(dim=1, keepdim=True))
            else:
                idx = torch.arange(channels) % old.in_channels
                new.weight.copy_(w[:, idx] * (old.in_channels / channels))
            if old.bias is not None:
                new.bias.copy_(old.bias)
    parent_name, _, child = conv_name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, new)
    return model
