"""A per-channel affine map applied to a module's output, kept as an explicit module.

REPAIR corrects the statistics of every residual block's output. That correction sits after the
residual addition, where it cannot be folded into the weights (the identity shortcut carries the
uncorrected stream on, and a shift cannot pass a ReLU). It is therefore kept as a
:class:`ChannelAffine` child named ``repair_affine`` of the block, applied by a forward hook on
the block, so no module of the model is replaced and every original state-dict key is unchanged;
the model gains the tensors ``<block>.repair_affine.weight`` and ``.bias``. Loading a state dict
with such keys (``neuralign.io.load_model``, ``load_into``, ``get_model(weights=...)``) attaches
the same affines first (:func:`attach_saved_affines`), so a saved repaired model loads as it was.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
from torch import nn

AFFINE_NAME = "repair_affine"


class ChannelAffine(nn.Module):
    """``y = weight * x + bias`` per channel (axis 1 of an ``(N, C, ...)`` tensor)."""

    def __init__(self, channels: int):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(channels))
        self.bias = nn.Parameter(torch.zeros(channels))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = [1] * x.dim()
        shape[1] = -1
        return x * self.weight.view(shape) + self.bias.view(shape)

    def extra_repr(self) -> str:
        return f"{self.weight.shape[0]}"


def _apply_output_affine(module: nn.Module, inputs, output):
    return getattr(module, AFFINE_NAME)(output)


def output_affine(module: nn.Module) -> ChannelAffine | None:
    """The affine attached to ``module``'s output, or None."""
    aff = module._modules.get(AFFINE_NAME)
    return aff if isinstance(aff, ChannelAffine) else None


def attach_output_affine(module: nn.Module, channels: int) -> ChannelAffine:
    """Give ``module`` an output affine (the identity when new; an existing one is returned
    as is), on the device and in the dtype of its parameters."""
    aff = output_affine(module)
    if aff is not None:
        return aff
    if AFFINE_NAME in module._modules or hasattr(module, AFFINE_NAME):
        raise ValueError(f"{type(module).__name__} already has an attribute {AFFINE_NAME!r}")
    ref = next(module.parameters(), None)
    aff = ChannelAffine(channels)
    if ref is not None:
        aff = aff.to(device=ref.device, dtype=ref.dtype)
    module.add_module(AFFINE_NAME, aff)
    module.register_forward_hook(_apply_output_affine)
    return aff


def attach_saved_affines(model: nn.Module, state_dict: Mapping) -> list[str]:
    """Attach an output affine to every module of ``model`` that ``state_dict`` has one for
    (keys ``<module>.repair_affine.weight``) and that lacks it; returns their names. Modules
    the model does not have are left to the strict check to report."""
    suffix = f"{AFFINE_NAME}.weight"
    mods = dict(model.named_modules())
    added = []
    for key in state_dict:
        if not (key == suffix or key.endswith("." + suffix)):
            continue
        name = key[:-len(suffix)].rstrip(".")
        mod = mods.get(name)
        if mod is None or output_affine(mod) is not None:
            continue
        attach_output_affine(mod, int(state_dict[key].shape[0]))
        added.append(name)
    return added
