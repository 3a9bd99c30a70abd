"""Writing checkpoints and reading what they record.

A checkpoint is ONE ``.safetensors`` file. Its header's ``__metadata__`` (a str -> str map) holds
``{"format": "neuralign/2", "neuralign": "<JSON record>"}``; the record is
``{"model": {"name", "kwargs"}, "metadata": {...}}`` (or, for special writers such as LEVI, their
own keys). Checkpoints of older versions kept the record in a JSON sidecar ``NAME.json``; it is
still read. A save is one atomic rename (see ``neuralign.io.atomic``).

Non-finite weights may be saved (a diverged run is evidence worth keeping; a ``RuntimeWarning``
says so), but every load refuses them unless asked not to.
"""

from __future__ import annotations

import json
import math
import warnings
from collections.abc import Mapping
from pathlib import Path

from neuralign.errors import CheckpointError
from neuralign.io.atomic import atomic_write
from neuralign.io.formats import (
    PICKLE_SUFFIXES,
    check_exists,
    header_metadata,
    is_hf_dir,
    looks_like_safetensors,
)

FORMAT = "neuralign/2"
LEGACY_FORMAT = "neuralign/1"
RECORD_KEY = "neuralign"


def sidecar_path(path) -> Path:
    """Where checkpoints of neuralign < 2 kept their record (read, never written)."""
    return Path(str(path) + ".json")


def _finite(obj):
    """``obj`` with NaN/Inf floats as None (JSON null): strict JSON, and a run's weights are
    never lost to a NaN in its history."""
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    if isinstance(obj, Mapping):
        return {str(k): _finite(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_finite(v) for v in obj]
    return obj


def _encode_record(record: dict) -> str:
    try:
        return json.dumps(_finite(record), allow_nan=False, default=str, sort_keys=True)
    except (TypeError, ValueError) as exc:
        raise CheckpointError(f"checkpoint metadata is not JSON: {exc}") from exc


def _check_target(path: Path) -> None:
    if path.suffix in PICKLE_SUFFIXES:
        raise CheckpointError(f"{path}: neuralign writes safetensors; use a .safetensors name")
    if path.is_dir():
        raise CheckpointError(f"{path} is a directory; give a file name ending in .safetensors")
    if path.exists() and path.stat().st_size > 0 and not looks_like_safetensors(path):
        raise CheckpointError(f"{path} exists and is not a safetensors checkpoint; "
                              "refusing to overwrite it")


def _warn_nonfinite(tensors: Mapping, path: Path) -> None:
    import torch

    for k, v in tensors.items():
        if v.is_floating_point() and not bool(torch.isfinite(v).all()):
            warnings.warn(f"saving {path} with NaN/infinite values in {k!r}; loading it will "
                          "fail unless check_finite=False", RuntimeWarning, stacklevel=3)
            return


def save_state_dict(state_dict: Mapping, path, metadata: dict | None = None) -> Path:
    """Save tensors (shared storage copied apart) with ``metadata`` as the checkpoint's record,
    in one atomic write. ``metadata`` is stored as JSON (NaN/Inf as null; other objects as
    their ``str``)."""
    from safetensors.torch import save_file

    path = Path(path)
    _check_target(path)
    header = {"format": FORMAT, RECORD_KEY: _encode_record(dict(metadata or {}))}
    tensors = {k: v.detach().to("cpu").contiguous().clone() for k, v in state_dict.items()}
    _warn_nonfinite(tensors, path)
    try:
        atomic_write(path, lambda tmp: save_file(tensors, str(tmp), metadata=header))
    except OSError as exc:  # read-only folder, disk full...: nothing was replaced
        raise CheckpointError(f"cannot write {path}: {exc.strerror or exc}") from exc
    side = sidecar_path(path)
    if side.is_file():  # a stale record of an older version: the header now rules
        try:
            if json.loads(side.read_text()).get("format") == LEGACY_FORMAT:
                side.unlink()
        except (OSError, ValueError, AttributeError):
            pass
    return path


def save_model(model, path, *, metadata: dict | None = None) -> Path:
    """Save ``model``'s state dict and how to rebuild it (``model_config``) in one file."""
    from neuralign.models import model_config

    record = {"model": model_config(model), "metadata": dict(metadata or {})}
    return save_state_dict(model.state_dict(), path, record)


def read_record(path) -> dict:
    """The record a checkpoint carries: from its header, else from a legacy sidecar, else {}."""
    path = check_exists(path)
    if path.is_dir():
        if is_hf_dir(path):
            return {}
        raise CheckpointError(f"{path} is a directory, not a checkpoint file")
    if path.suffix == ".safetensors" or looks_like_safetensors(path):
        meta = header_metadata(path)
        if RECORD_KEY in meta:
            try:
                record = json.loads(meta[RECORD_KEY])
            except json.JSONDecodeError as exc:
                raise CheckpointError(f"{path}: corrupt neuralign record in the header "
                                      f"({exc.msg})") from exc
            return {"format": meta.get("format", FORMAT), **record}
    side = sidecar_path(path)
    if not side.is_file():
        return {}
    try:
        record = json.loads(side.read_text())
    except json.JSONDecodeError as exc:
        raise CheckpointError(f"{side}: corrupt JSON sidecar ({exc.msg} at line {exc.lineno})"
                              ) from exc
    return record if isinstance(record, dict) else {}


read_sidecar = read_record  # the name of older versions


def read_info(path) -> dict:
    """What a checkpoint says about itself, cheaply (header only): ``arch`` (None when not
    recorded), ``model_kwargs``, ``format`` and the saved metadata's keys on top level."""
    path = check_exists(path)
    if path.is_dir():
        if not is_hf_dir(path):
            raise CheckpointError(f"{path} is a directory, not a checkpoint (a Hugging Face "
                                  "model directory would hold config.json and weights)")
        return {"arch": f"hf:{path.resolve()}", "model_kwargs": {}, "format": "hf-dir"}
    if path.stat().st_size == 0:
        raise CheckpointError(f"{path}: empty file (0 bytes), not a checkpoint")
    if path.suffix != ".safetensors" and not looks_like_safetensors(path):
        return {"arch": None, "model_kwargs": {}, "format": "pickle"}
    record = read_record(path)
    model = record.get("model") or {}
    meta = record.get("metadata") if isinstance(record.get("metadata"), dict) else {}
    fmt = ("safetensors" if not record else
           "neuralign-sidecar" if record.get("format") == LEGACY_FORMAT else "neuralign")
    return {**meta, "arch": model.get("name"), "model_kwargs": dict(model.get("kwargs") or {}),
            "format": fmt}
