"""``get_model``: one call for the reference models and for torchvision, timm and Hugging Face.

The model remembers how it was built (``model_config``), so checkpoints can rebuild it.
"""

from __future__ import annotations

import copy
import inspect
from collections.abc import Callable
from pathlib import Path

from torch import nn

from neuralign.errors import NeuralignError
from neuralign.models.reference import MLP, VGG, ResNet20, SmallCNN

_CONFIG_ATTR = "_neuralign_config"


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


def _require(module: str, extra: str):
    try:
        return __import__(module)
    except ImportError as exc:
        raise NeuralignError(
            f"{module} is not installed; install it with: pip install 'neuralign[{extra}]'"
        ) from exc


def _torchvision(name: str, num_classes=None, weights=None, in_channels=None, image_size=None,
                 **kw):
    _require("torchvision", "vision")
    import torchvision

    try:
        builder = torchvision.models.get_model_builder(name)
    except ValueError as exc:
        raise NeuralignError(f"torchvision has no model {name!r}") from exc
    model = builder(weights=None, **({"num_classes": num_classes} if num_classes else {}), **kw)
    if weights:
        _load_local_weights(model, weights, strict_head=num_classes is None)
    return model


def _timm(name: str, num_classes=None, weights=None, in_channels=None, image_size=None, **kw):
    _require("timm", "vision")
    import timm

    extra = {}
    if num_classes is not None:
        extra["num_classes"] = num_classes
    if in_channels is not None:
        extra["in_chans"] = in_channels
    if image_size is not None and "img_size" in inspect.signature(timm.create_model).parameters:
        extra["img_size"] = image_size
    try:
        model = timm.create_model(name, pretrained=False, **extra, **kw)
    except RuntimeError as exc:
        raise NeuralignError(f"timm cannot build {name!r}: {exc}") from exc
    if weights:
        _load_local_weights(model, weights, strict_head=num_classes is None)
    return model


def _hf(path: str, num_classes=None, weights=None, in_channels=None, image_size=None, **kw):
    _require("transformers", "hf")
    import transformers

    if not Path(path).exists():
        raise NeuralignError(
            f"hf:{path}: no such local directory; neuralign never downloads weights: pass the "
            "path of a saved model (config.json + weights)"
        )
    if num_classes is None:
        return transformers.AutoModel.from_pretrained(path, local_files_only=True, **kw)
    return transformers.AutoModelForSequenceClassification.from_pretrained(
        path, num_labels=num_classes, local_files_only=True, **kw)


def _load_local_weights(model: nn.Module, path, strict_head: bool) -> None:
    from neuralign.io import load_state_dict

    sd = load_state_dict(path, allow_pickle=str(path).endswith((".pt", ".pth")))
    own = model.state_dict()
    if not strict_head:  # a new head: keep the pre-trained body, drop mismatched head tensors
        sd = {k: v for k, v in sd.items() if k in own and own[k].shape == v.shape}
    missing, unexpected = model.load_state_dict(sd, strict=False)
    if strict_head and (missing or unexpected):
        raise NeuralignError(f"weights {path} do not fit the model: missing {missing[:3]}, "
                             f"unexpected {unexpected[:3]}")


def get_model(name: str, **kwargs) -> nn.Module:
    """Build a model by name: a reference model or ``torchvision:``/``timm:``/``hf:`` one."""
    if ":" in name:
        source, _, sub = name.partition(":")
        builders = {"torchvision": _torchvision, "timm": _timm, "hf": _hf}
        if source not in builders:
            raise NeuralignError(f"unknown model source {source!r}; use torchvision:, timm: or hf:")
        model = builders[source](sub, **kwargs)
    else:
        if name not in REFERENCE_MODELS:
            raise NeuralignError(f"unknown model {name!r}; available: {', '.join(list_models())}")
        try:
            model = REFERENCE_MODELS[name](**kwargs)
        except TypeError as exc:
            raise NeuralignError(f"bad arguments for model {name!r}: {exc}") from exc
    setattr(model, _CONFIG_ATTR, {"name": name, "kwargs": copy.deepcopy(kwargs)})
    return model


def model_config(model: nn.Module) -> dict | None:
    """How ``model`` was built (``{"name", "kwargs"}``), or None if not built by ``get_model``."""
    cfg = getattr(model, _CONFIG_ATTR, None)
    return copy.deepcopy(cfg) if cfg is not None else None


def set_model_config(model: nn.Module, name: str, kwargs: dict) -> nn.Module:
    setattr(model, _CONFIG_ATTR, {"name": name, "kwargs": copy.deepcopy(kwargs)})
    return model
