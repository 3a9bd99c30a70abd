"""Resizing a model's Conv2d / Linear layers to other widths (FedMA grows them), recorded in the
model's config so that its checkpoint rebuilds the resized model.

A LeNet records its new widths as constructor arguments (``c1``, ``c2``, ``hidden``...); any
other model records the resized layers' weight shapes as ``layer_shapes`` in its config, which
:func:`neuralign.io.load_model` applies (with :func:`resize_layers`) after rebuilding it.
"""

from __future__ import annotations

import copy
from collections.abc import Mapping, Sequence

from torch import nn

from neuralign.errors import ArchitectureMismatchError


def _replace(model: nn.Module, name: str, new: nn.Module) -> None:
    parent = model.get_submodule(name.rsplit(".", 1)[0]) if "." in name else model
    setattr(parent, name.rsplit(".", 1)[-1], new)


def _resized(name: str, m: nn.Module, shape: tuple) -> nn.Module:
    if isinstance(m, nn.Linear):
        if len(shape) != 2:
            raise ArchitectureMismatchError(f"cannot resize Linear {name} to shape {list(shape)}")
        return nn.Linear(shape[1], shape[0], bias=m.bias is not None)
    if m.groups != 1:
        raise ArchitectureMismatchError(f"cannot resize grouped convolution {name}")
    if tuple(shape[2:]) != tuple(m.weight.shape[2:]):
        raise ArchitectureMismatchError(f"cannot resize {name}: kernel {list(shape[2:])} is not "
                                        f"the layer's {list(m.weight.shape[2:])}")
    return nn.Conv2d(shape[1], shape[0], m.kernel_size, m.stride, m.padding, m.dilation,
                     bias=m.bias is not None, padding_mode=m.padding_mode)


def resize_layers(model: nn.Module, shapes: Mapping[str, Sequence[int]]) -> nn.Module:
    """Give the Conv2d / Linear layers named in ``shapes`` (module name -> weight shape) those
    shapes, in place (fresh weights, to be loaded afterwards), and record it in the model's
    config. A name that is not a Conv2d / Linear of ``model`` is an error."""
    layers = {n: m for n, m in model.named_modules() if isinstance(m, (nn.Conv2d, nn.Linear))}
    unknown = sorted(set(shapes) - set(layers))
    if unknown:
        raise ArchitectureMismatchError(f"cannot resize {unknown[0]!r}: {type(model).__name__} "
                                        "has no Conv2d / Linear layer of that name")
    changed = {}
    for name, shape in shapes.items():
        shape = tuple(int(s) for s in shape)
        m = layers[name]
        if shape != tuple(m.weight.shape):
            _replace(model, name, _resized(name, m, shape))
            changed[name] = list(shape)
    if changed:
        _record(model, changed)
    return model


def _record(model: nn.Module, changed: dict) -> None:
    from neuralign.models.lenet import LeNet
    from neuralign.models.registry import _CONFIG_ATTR

    cfg = getattr(model, _CONFIG_ATTR, None)
    if cfg is None:  # not built by get_model: nothing recorded, nothing to keep true
        return
    cfg = copy.deepcopy(cfg)
    if isinstance(model, LeNet) and cfg.get("name") == "lenet":
        cfg["kwargs"].update(model.widths(), in_channels=model.features[0].in_channels,
                             num_classes=model.classifier.out_features)
    else:
        cfg["layer_shapes"] = {**(cfg.get("layer_shapes") or {}), **changed}
    setattr(model, _CONFIG_ATTR, cfg)
