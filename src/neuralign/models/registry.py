"""``get_model``: one call for the reference models and for torchvision, timm and Hugging Face.

The model remembers how it was built (``model_config``), so checkpoints can rebuild it.
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from pathlib import Path

from torch import nn

from neuralign.errors import NeuralignError
from neuralign.models.reference import MLP, VGG, ResNet20, SmallCNN

_CONFIG_ATTR = "_neuralign_config"

# Architecture version of the reference models, recorded with every config (and so in every
# checkpoint). 2: ``norm="ln"`` in the convolutional models is a channel-only LayerNorm; before
# (no version recorded) it was GroupNorm(1, C), now ``norm="gn1"``. Same tensors, another
# function: checkpoints without a version are rebuilt as what they were (``rebuild_kwargs``).
ARCH_VERSION = 2
_CONV_REFERENCE = ("vgg11", "vgg16", "resnet20", "cnn")


def _mlp(num_classes=10, in_channels=1, image_size=8, in_features=None, **kw):
    if in_features is None:
        in_features = in_channels * image_size * image_size
    return MLP(in_features=in_features, num_classes=num_classes, **kw)


def _vgg(cfg):
    def build(num_classes=10, in_channels=1, image_size=28, **kw):
        return VGG(cfg, in_channels=in_channels, num_classes=num_classes, image_size=image_size,
                   **kw)
    return build


def _resnet20(num_classes=10, in_channels=1, image_size=None, **kw):
    return ResNet20(in_channels=in_channels, num_classes=num_classes, **kw)


def _cnn(num_classes=10, in_channels=1, image_size=None, **kw):
    return SmallCNN(in_channels=in_channels, num_classes=num_classes, **kw)


REFERENCE_MODELS: dict[str, Callable[..., nn.Module]] = {
    "mlp": _mlp,
    "vgg11": _vgg("vgg11"),
    "vgg16": _vgg("vgg16"),
    "resnet20": _resnet20,
    "cnn": _cnn,
}


def list_models() -> list[str]:
    return sorted(REFERENCE_MODELS) + ["torchvision:<name>", "timm:<name>", "hf:<path>"]


_EXTERNAL = ("torchvision", "timm", "hf")


def _external(source: str):
    from neuralign.models import external

    return {"torchvision": external.torchvision_model, "timm": external.timm_model,
            "hf": external.hf_model}[source]


def _build(name: str, kwargs: dict, weights, allow_pickle: bool) -> nn.Module:
    if ":" in name:
        source, _, sub = name.partition(":")
        if source not in _EXTERNAL:
            raise NeuralignError(f"unknown model source {source!r} in {name!r}; use "
                                 "torchvision:<name>, timm:<name> or hf:<dir>")
        if not sub:
            raise NeuralignError(f"{name!r} names no model; e.g. torchvision:resnet18")
        return _external(source)(sub, weights=weights, allow_pickle=allow_pickle, **kwargs)
    if name not in REFERENCE_MODELS:
        raise NeuralignError(f"unknown model {name!r}; available: {', '.join(list_models())}")
    try:
        model = REFERENCE_MODELS[name](**kwargs)
    except TypeError as exc:
        raise NeuralignError(f"bad arguments for model {name!r}: {exc}") from exc
    if weights:
        from neuralign.models.external import read_weights
        from neuralign.models.weights import load_strict

        load_strict(model, read_weights(weights, allow_pickle), str(weights))
    return model


def get_model(name: str, *, seed: int | None = None, weights=None, allow_pickle: bool = False,
              **kwargs) -> nn.Module:
    """Build a model by name: a reference model (``mlp``, ``resnet20``...) or
    ``torchvision:<name>``, ``timm:<name>``, ``hf:<dir>``.

    ``seed`` makes the initialisation reproducible (without touching the global RNG state);
    ``weights`` is a local file loaded strictly (a file of another architecture is an error; with
    ``num_classes`` only the head may differ and is then fresh); ``allow_pickle`` lets that file
    be a PyTorch pickle. ``in_channels`` changes the input convolution of torchvision/timm
    models. The model remembers how it was built (``model_config``)."""
    if not isinstance(name, str) or not name:
        raise NeuralignError(f"a model name must be a non-empty string, got {name!r}")
    if seed is None:
        model = _build(name, kwargs, weights, allow_pickle)
    else:
        import torch

        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            model = _build(name, kwargs, weights, allow_pickle)
    if name.startswith("hf:") and Path(name[3:]).exists():
        name = "hf:" + str(Path(name[3:]).resolve())  # rebuildable from any working folder
    recorded = copy.deepcopy(kwargs)
    if weights not in (None, False):
        recorded["weights"] = str(weights)
    setattr(model, _CONFIG_ATTR, _config(name, recorded))
    return model


def _config(name: str, kwargs: dict) -> dict:
    cfg = {"name": name, "kwargs": kwargs}
    if name in REFERENCE_MODELS:
        cfg["version"] = ARCH_VERSION
    return cfg


def rebuild_kwargs(name: str, kwargs: dict, version: int | None) -> dict:
    """The constructor kwargs that rebuild a checkpoint's model from its recorded config
    (``version`` as recorded; None when absent). A convolutional reference model recorded with
    ``norm="ln"`` and no version was built with GroupNorm(1, C): it is rebuilt with
    ``norm="gn1"``, the same function, and a warning says so."""
    kwargs = dict(kwargs)
    if (name in _CONV_REFERENCE and kwargs.get("norm") == "ln"
            and (version is None or int(version) < 2)):
        import warnings

        warnings.warn(f"this {name} checkpoint predates channel-only LayerNorm (architecture "
                      "version 2): its norm='ln' was GroupNorm(1, C), so it is rebuilt with "
                      "norm='gn1' (the function it was trained as)", UserWarning, stacklevel=3)
        kwargs["norm"] = "gn1"
    return kwargs


def model_config(model: nn.Module) -> dict | None:
    """How ``model`` was built (``{"name", "kwargs"}``, and ``"version"`` for reference models),
    or None if not built by ``get_model``."""
    cfg = getattr(model, _CONFIG_ATTR, None)
    return copy.deepcopy(cfg) if cfg is not None else None


def set_model_config(model: nn.Module, name: str, kwargs: dict) -> nn.Module:
    setattr(model, _CONFIG_ATTR, _config(name, copy.deepcopy(kwargs)))
    return model
