"""What a "layer" is for per-layer learning rates, and how weights become parameter groups.

Two granularities:

* ``"tensor"`` (Lee et al.'s released Auto-RGN code): every parameter tensor is a layer
  (``conv1.weight`` and ``conv1.bias`` get separate rates).
* ``"block"``: the model's ordered top-level blocks (``neuralign.models.block_names`` when the
  model comes from ``get_model``, otherwise its top-level children).

Normalisation-layer parameters (BatchNorm, LayerNorm, GroupNorm, InstanceNorm) are frozen
(weight 0) as in the paper unless ``include_norm=True``.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn

from neuralign.errors import NeuralignError

GRANULARITIES = ("tensor", "block")
_NORM_TYPES: tuple[type, ...] = (nn.modules.batchnorm._NormBase, nn.LayerNorm, nn.GroupNorm)
if hasattr(nn, "RMSNorm"):
    _NORM_TYPES = _NORM_TYPES + (nn.RMSNorm,)


@dataclass
class Layer:
    """One unit that gets one learning rate: a name, its parameter names and owning modules."""

    name: str
    param_names: list[str]
    module_names: list[str] = field(default_factory=list)


def is_norm_module(module: nn.Module) -> bool:
    name = type(module).__name__.lower()
    return isinstance(module, _NORM_TYPES) or name.endswith("norm") or "norm2d" in name


def _owners(model: nn.Module) -> dict[str, tuple[str, nn.Module]]:
    """Parameter name -> (owning module name, owning module)."""
    out = {}
    for mname, mod in model.named_modules():
        for pname, _ in mod.named_parameters(recurse=False):
            full = f"{mname}.{pname}" if mname else pname
            out.setdefault(full, (mname, mod))
    return out


def norm_param_names(model: nn.Module) -> list[str]:
    return [p for p, (_, mod) in _owners(model).items() if is_norm_module(mod)]


def model_blocks(model: nn.Module) -> list[str]:
    """Ordered top-level block names (input to output)."""
    try:
        from neuralign.models import block_names

        names = list(block_names(model))
    except Exception:  # noqa: BLE001 - models block_names cannot read fall back
        names = []
    if names:
        return names
    return [n for n, m in model.named_children() if any(True for _ in m.parameters())]


def model_layers(model: nn.Module, granularity: str = "tensor",
                 include_norm: bool = False) -> list[Layer]:
    """The scored layers of ``model`` in parameter (≈ forward) order.

    Frozen normalisation parameters are not part of any returned layer (see ``frozen_params``).
    """
    if granularity not in GRANULARITIES:
        raise NeuralignError(f"granularity must be one of {GRANULARITIES}, got {granularity!r}")
    owners = _owners(model)
    names = [n for n, p in model.named_parameters() if p.requires_grad]
    if not names:
        raise NeuralignError("the model has no trainable parameters to weight")
    skip = set() if include_norm else set(norm_param_names(model))
    if granularity == "tensor":
        return [Layer(n, [n], [owners[n][0]]) for n in names if n not in skip]
    blocks = model_blocks(model)
    layers: list[Layer] = []
    taken: set[str] = set()
    for b in blocks:
        ps = [n for n in names if (n == b or n.startswith(b + ".")) and n not in taken]
        taken.update(ps)
        ps = [n for n in ps if n not in skip]
        if ps:
            layers.append(Layer(b, ps, [b]))
    for n in names:  # parameters outside every block become their own layer
        if n not in taken and n not in skip:
            layers.append(Layer(n, [n], [owners[n][0]]))
    if not layers:
        raise NeuralignError("no layer left to weight: every trainable parameter is a norm "
                             "parameter; pass include_norm=True")
    return layers


def frozen_params(model: nn.Module, layers: list[Layer]) -> list[str]:
    """Trainable parameter names not covered by ``layers`` (the frozen norm parameters)."""
    inside = {p for layer in layers for p in layer.param_names}
    return [n for n, p in model.named_parameters() if p.requires_grad and n not in inside]


def normalise_scores(scores: dict[str, float]) -> dict[str, float]:
    """Divide every score by the largest (Lee et al.); all-zero or non-finite scores give 0."""
    vals = torch.tensor([float(v) for v in scores.values()], dtype=torch.float64)
    vals = torch.nan_to_num(vals, nan=0.0, posinf=0.0, neginf=0.0).clamp_min(0.0)
    top = float(vals.max()) if len(vals) else 0.0
    if top <= 0:
        return {k: 0.0 for k in scores}
    return {k: float(v) / top for k, v in zip(scores, vals.tolist())}


def param_groups_from_weights(model: nn.Module, layers: list[Layer],
                              weights: dict[str, float], *, rescored: bool = False) -> list[dict]:
    """One optimizer parameter group per layer with ``lr_scale = weights[layer]``.

    ``rescored=True`` marks the layer groups as recomputed during training: the batch-norm
    policy ``"train"`` then counts them as trained whatever their current weight.

    Parameters outside the layers (frozen norm parameters) go into one group with
    ``lr_scale = 0``: with every optimizer in ``torch.optim`` a zero rate leaves them exactly
    unchanged, weight decay and momentum included.
    """
    params = dict(model.named_parameters())
    groups = [{"params": [params[n] for n in layer.param_names], "lr_scale": float(
        weights.get(layer.name, 0.0)), "name": layer.name, "rescored": rescored}
        for layer in layers]
    rest = frozen_params(model, layers)
    if rest:
        groups.append({"params": [params[n] for n in rest], "lr_scale": 0.0,
                       "name": "__frozen_norm__"})
    return groups


def set_group_scales(optimizer: torch.optim.Optimizer, weights: dict[str, float]) -> None:
    """Update ``lr_scale`` of the optimizer's named groups in place (keeps optimizer state)."""
    for group in optimizer.param_groups:
        name = group.get("name")
        if name in weights:
            group["lr_scale"] = float(weights[name])


def layer_param_norms(model: nn.Module, layers: list[Layer]) -> dict[str, float]:
    params = dict(model.named_parameters())
    return {layer.name: float(torch.sqrt(sum(params[n].detach().double().pow(2).sum()
                                             for n in layer.param_names))) for layer in layers}
