"""torchvision, timm and Hugging Face models, built offline and filled strictly.

``weights`` is a local file (safetensors; a pickle only with ``allow_pickle=True``) loaded
strictly: a file of another architecture is an error, never a silent random initialisation. With
``num_classes`` the head may be new (fresh), everything else must come from the file.
``in_channels`` replaces the input convolution (adapting trained weights, see
``set_input_channels``) or is refused; it is never ignored.

For ``hf:<dir>``: the class is ``config.architectures[0]`` (else ``AutoModel``); with
``num_classes``, ``AutoModelForSequenceClassification``. ``weights=None`` loads the directory's
own weights, ``weights=False`` builds the
architecture from ``config.json`` only (used when a checkpoint supplies the weights), a file loads
that file strictly.
"""

from __future__ import annotations

import contextlib
import inspect
from pathlib import Path

from torch import nn

from neuralign.errors import ArchitectureMismatchError, NeuralignError
from neuralign.models.weights import find_input_conv, load_strict, set_input_channels


def _require(module: str, extra: str):
    try:
        return __import__(module)
    except ImportError as exc:
        raise NeuralignError(
            f"{module} is not installed; install it with: pip install 'neuralign[{extra}]'"
        ) from exc


def read_weights(path, allow_pickle: bool = False) -> dict:
    from neuralign.io import load_state_dict

    if not isinstance(path, (str, Path)):
        raise NeuralignError(f"weights must be a local file path, got {type(path).__name__} "
                             "(neuralign never downloads weights)")
    if not Path(path).exists():
        raise NeuralignError(f"weights file {path} does not exist (neuralign never downloads "
                             "weights: pass the path of a local file)")
    return load_state_dict(path, allow_pickle=allow_pickle)


def _head_name(model: nn.Module) -> str | None:
    from neuralign.models.adapters import get_head_name

    try:
        return get_head_name(model)
    except NeuralignError:
        return None


def _fill(model: nn.Module, sd: dict | None, source: str, num_classes, in_channels,
          conv_hint=None) -> nn.Module:
    """Load ``sd`` (if any) strictly, then set the input channels."""
    change = in_channels is not None and in_channels != 3  # 3: what these models are built for
    conv = find_input_conv(model, conv_hint) if change else None
    if sd is None:
        if conv is not None:
            set_input_channels(model, conv, in_channels, keep_weights=False)
        return model
    key = f"{conv}.weight" if conv is not None else None
    if key is not None and key in sd and sd[key].ndim == 4 and sd[key].shape[1] == in_channels:
        set_input_channels(model, conv, in_channels, keep_weights=False)  # file already fits
        conv = None
    load_strict(model, sd, source, new_head=_head_name(model) if num_classes else None)
    if conv is not None:
        set_input_channels(model, conv, in_channels, keep_weights=True)
    return model


def torchvision_model(name: str, num_classes=None, weights=None, in_channels=None,
                      image_size=None, allow_pickle=False, **kw) -> nn.Module:
    _require("torchvision", "vision")
    import torchvision

    try:
        builder = torchvision.models.get_model_builder(name)
    except ValueError as exc:
        raise NeuralignError(f"torchvision has no model {name!r}") from exc
    sd = read_weights(weights, allow_pickle) if weights else None
    extra = {"num_classes": num_classes} if num_classes else {}
    try:  # image_size matters to the few models that take it (ViT); convnets pool it away
        model = builder(weights=None, **extra, **kw, **(
            {"image_size": image_size} if image_size is not None else {}))
    except TypeError as exc:
        if image_size is None or "image_size" not in str(exc):
            raise NeuralignError(f"bad arguments for torchvision:{name}: {exc}") from exc
        try:
            model = builder(weights=None, **extra, **kw)
        except TypeError as exc2:
            raise NeuralignError(f"bad arguments for torchvision:{name}: {exc2}") from exc2
    return _fill(model, sd, str(weights), num_classes, in_channels)


def timm_model(name: str, num_classes=None, weights=None, in_channels=None, image_size=None,
               allow_pickle=False, **kw) -> nn.Module:
    _require("timm", "vision")
    import timm

    extra = dict(kw)
    if num_classes is not None:
        extra["num_classes"] = num_classes
    if image_size is not None and "img_size" in inspect.signature(timm.create_model).parameters:
        extra["img_size"] = image_size
    sd = read_weights(weights, allow_pickle) if weights else None
    if sd is None and in_channels is not None:
        extra["in_chans"] = in_channels  # timm builds any channel count natively
    try:
        model = timm.create_model(name, pretrained=False, **extra)
    except (RuntimeError, TypeError, ValueError) as exc:
        raise NeuralignError(f"timm cannot build {name!r}: {str(exc).splitlines()[0]}") from exc
    if sd is None:
        return model
    hint = (getattr(model, "pretrained_cfg", None) or {}).get("first_conv")
    return _fill(model, sd, str(weights), num_classes, in_channels, conv_hint=hint)


def _hf_check_shape_args(config, in_channels, image_size, path) -> None:
    for arg, value, attr in (("in_channels", in_channels, "num_channels"),
                             ("image_size", image_size, "image_size")):
        if value is None:
            continue
        have = getattr(config, attr, None)
        if have is None:
            raise NeuralignError(f"hf:{path} is not an image model ({type(config).__name__} "
                                 f"has no {attr}); do not pass {arg}")
        if have != value:
            raise NeuralignError(f"hf:{path} expects {attr}={have}, not {value}; neuralign "
                                 "does not resize Hugging Face models")


def hf_model(path: str, num_classes=None, weights=None, in_channels=None, image_size=None,
             allow_pickle=False, **kw) -> nn.Module:
    _require("transformers", "hf")
    import transformers

    folder = Path(path)
    if not (folder / "config.json").is_file():
        raise NeuralignError(
            f"hf:{path}: not a local Hugging Face model directory (no config.json); neuralign "
            "never downloads weights: pass the path of a saved model (config.json + weights)")
    try:
        config = transformers.AutoConfig.from_pretrained(str(folder), local_files_only=True, **kw)
    except (OSError, ValueError, KeyError) as exc:
        raise NeuralignError(f"hf:{path}: cannot read config.json "
                             f"({str(exc).splitlines()[0][:160]})") from exc
    _hf_check_shape_args(config, in_channels, image_size, path)
    auto = _hf_class(transformers, config)
    if num_classes is not None:
        auto = transformers.AutoModelForSequenceClassification
        config.num_labels = num_classes
    if weights is None:
        return _hf_pretrained(auto, folder, config, num_classes is not None)
    try:
        with _quiet_transformers():
            model = (auto.from_config(config) if hasattr(auto, "from_config")
                     else auto(config))
    except ValueError as exc:
        raise NeuralignError(f"hf:{path}: {str(exc).splitlines()[0][:200]}") from exc
    if weights is False:
        return model
    sd = read_weights(weights, allow_pickle)
    return load_strict(model, sd, str(weights),
                       new_head=_head_name(model) if num_classes is not None else None)


def _hf_class(transformers, config):
    """The class the folder was saved from (``config.architectures[0]``, so a fine-tuned
    classifier keeps its head), else ``AutoModel``."""
    names = getattr(config, "architectures", None) or []
    cls = getattr(transformers, names[0], None) if names else None
    if isinstance(cls, type) and issubclass(cls, transformers.PreTrainedModel):
        return cls
    return transformers.AutoModel


@contextlib.contextmanager
def _quiet_transformers():
    """No loading reports or progress bars from transformers: neuralign reports what matters
    (as one-line errors) itself."""
    from transformers.utils import logging as hf_logging

    level = hf_logging.get_verbosity()
    bars = hf_logging.is_progress_bar_enabled()
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        hf_logging.set_verbosity(level)
        if bars:
            hf_logging.enable_progress_bar()


def _hf_pretrained(auto, folder: Path, config, new_head: bool) -> nn.Module:
    from neuralign.io.formats import hf_weight_file

    hf_weight_file(folder)  # a one-line error when the directory has no weights
    try:
        with _quiet_transformers():
            model, info = auto.from_pretrained(str(folder), config=config,
                                               local_files_only=True, output_loading_info=True,
                                               ignore_mismatched_sizes=True)
    except (OSError, ValueError, RuntimeError) as exc:
        raise NeuralignError(f"hf:{folder}: cannot load ({str(exc).splitlines()[0][:200]})"
                             ) from exc
    head = _head_name(model) if new_head else None

    def in_head(key: str) -> bool:
        return bool(head) and key.startswith(head + ".")

    bad = [(k, "missing from the weights") for k in info.get("missing_keys", [])
           if not in_head(k)]
    for item in info.get("mismatched_keys", []):
        key = item if isinstance(item, str) else item[0]
        if not in_head(key):
            shapes = (f": {tuple(item[1])} in the file, {tuple(item[2])} in the model"
                      if not isinstance(item, str) and len(item) >= 3 else "")
            bad.append((key, "of another shape" + shapes))
    if bad:
        raise ArchitectureMismatchError(
            f"hf:{folder}: the weights do not fit {type(model).__name__} built from its "
            f"config.json ({len(bad)} tensors; first: {bad[0][0]!r} {bad[0][1]})")
    return model
