"""Loading: tensors from any supported file, and models rebuilt from what a checkpoint records
(or from an architecture the caller names), always strictly and never with non-finite weights."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING

from neuralign.errors import ArchitectureMismatchError, CheckpointError, NeuralignError
from neuralign.io.checkpoint import read_record, sidecar_path
from neuralign.io.formats import assert_finite, check_exists, is_hf_dir, read_tensors

if TYPE_CHECKING:  # torch is imported when a load happens, not with the package
    from torch import nn


def load_state_dict(path, *, allow_pickle: bool = False, check_finite: bool = True,
                    map_location="cpu") -> dict:
    """Every tensor of a checkpoint: a safetensors file, a PyTorch pickle (only with
    ``allow_pickle``), a Hugging Face directory or a sharded ``*.index.json``. Non-finite floats
    are a ``CheckpointError`` naming the first bad tensor unless ``check_finite=False``."""
    sd = read_tensors(path, allow_pickle=allow_pickle)
    if check_finite:
        for k, v in sd.items():
            assert_finite(k, v, path)
    if str(map_location) != "cpu":
        sd = {k: v.to(map_location) for k, v in sd.items()}
    return sd


def load_into(model: nn.Module, state_dict: Mapping, source: str = "state dict") -> nn.Module:
    """Load ``state_dict`` into ``model`` strictly, with a one-line error naming the first
    mismatch."""
    from neuralign.models.weights import load_strict

    return load_strict(model, state_dict, source)


_ARCH_HINT = ("pass arch= (CLI: --arch), e.g. 'resnet20', 'torchvision:resnet18', "
              "'timm:resnet18', 'hf:<model dir>', with model_kwargs= (CLI: -m key=value)")


def _rebuild(name: str, kwargs: dict) -> nn.Module:
    """The architecture only: the checkpoint supplies every weight."""
    from neuralign.models import get_model

    kwargs = {k: v for k, v in kwargs.items() if k not in ("weights", "allow_pickle", "seed")}
    if name.startswith("hf:"):
        kwargs["weights"] = False
        try:
            return get_model(name, **kwargs)
        except NeuralignError as exc:
            raise type(exc)(f"{exc} (the checkpoint's architecture is {name}: if that folder "
                            "moved, pass arch='hf:<its new place>')") from exc
    return get_model(name, **kwargs)


def load_model(path, *, arch: str | None = None, model_kwargs: dict | None = None,
               allow_pickle: bool = False, check_finite: bool = True,
               model: nn.Module | None = None) -> nn.Module:
    """A model in eval mode from ``path``:

    - a neuralign checkpoint (architecture in its header, or in an older version's sidecar);
    - a plain ``.safetensors`` or a ``.pt``/``.pth``/``.bin`` state dict (pickles only with
      ``allow_pickle=True``) with ``arch`` and ``model_kwargs`` saying what to build;
    - a Hugging Face model directory (``config.json`` + weights, sharded or not).

    ``arch`` overrides what the file records (its kwargs are reused when the names agree);
    ``model`` fills a given module instead. Loading is strict: a file that does not fit is an
    ``ArchitectureMismatchError`` naming the first mismatched tensor; non-finite weights are a
    ``CheckpointError`` unless ``check_finite=False``."""
    path = check_exists(path)
    if model_kwargs is not None and not isinstance(model_kwargs, Mapping):
        raise NeuralignError(f"model_kwargs must be a dict, got {type(model_kwargs).__name__}")
    if path.is_dir():
        return _load_dir(path, arch, model_kwargs, allow_pickle, check_finite, model)
    record = read_record(path) if model is None else {}
    sd = load_state_dict(path, allow_pickle=allow_pickle, check_finite=check_finite)
    if model is None:
        cfg = record.get("model") or {}
        name = arch or cfg.get("name")
        if not name:
            side = sidecar_path(path).name
            raise CheckpointError(f"{path}: no architecture recorded (neither in its header nor "
                                  f"in a {side} sidecar); {_ARCH_HINT}")
        if model_kwargs is not None:
            kwargs = dict(model_kwargs)
        elif name == cfg.get("name"):
            from neuralign.models.registry import rebuild_kwargs

            kwargs = rebuild_kwargs(name, cfg.get("kwargs") or {}, cfg.get("version"))
        else:
            kwargs = {}
        model = _rebuild(name, kwargs)
    try:
        load_into(model, sd, source=str(path))
    except ArchitectureMismatchError as exc:
        if arch and not record:
            raise ArchitectureMismatchError(f"{exc} (is --arch/arch= {arch!r} with these "
                                            "model kwargs right?)") from exc
        raise
    return model.eval()


def _load_dir(path: Path, arch, model_kwargs, allow_pickle, check_finite, model) -> nn.Module:
    from neuralign.models import get_model

    if not is_hf_dir(path):
        raise CheckpointError(f"{path} is a directory, not a checkpoint (a Hugging Face model "
                              "directory would hold config.json and weights)")
    same = (arch is None or (arch.startswith("hf:")
                             and Path(arch[3:]).resolve() == path.resolve()))
    if model is not None or not same:
        sd = load_state_dict(path, allow_pickle=allow_pickle, check_finite=check_finite)
        if model is None:
            model = _rebuild(arch, dict(model_kwargs or {}))
        return load_into(model, sd, source=str(path)).eval()
    net = get_model(f"hf:{path}", allow_pickle=allow_pickle, **dict(model_kwargs or {}))
    if check_finite:
        for k, v in net.state_dict().items():
            assert_finite(k, v, path)
    return net.eval()
