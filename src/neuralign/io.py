"""Checkpoints: safetensors + a JSON sidecar, atomic writes, one-line errors.

``save_model(model, "a.safetensors")`` writes ``a.safetensors`` and ``a.safetensors.json``; the
sidecar records how to rebuild the model (``model_config``) and any metadata, so
``load_model("a.safetensors")`` needs no architecture from the caller. Pickle files (``.pt``,
``.pth``, ``.bin``) are refused unless ``allow_pickle=True``: unpickling runs arbitrary code.
"""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Mapping
from pathlib import Path

import torch
from torch import nn

from neuralign.errors import ArchitectureMismatchError, CheckpointError

PICKLE_SUFFIXES = (".pt", ".pth", ".bin", ".ckpt", ".pkl")


def _atomic_write(path: Path, write) -> None:
    """Write through a temp file in the same folder, then rename: never a half-written file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        write(tmp)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def sidecar_path(path) -> Path:
    return Path(str(path) + ".json")


def save_state_dict(state_dict: Mapping[str, torch.Tensor], path, metadata: dict | None = None
                    ) -> Path:
    """Save tensors as safetensors (shared storage is copied apart) plus the JSON sidecar."""
    from safetensors.torch import save_file

    path = Path(path)
    if path.suffix in PICKLE_SUFFIXES:
        raise CheckpointError(f"{path}: neuralign writes safetensors; use a .safetensors name")
    tensors = {k: v.detach().cpu().contiguous().clone() for k, v in state_dict.items()}
    _atomic_write(path, lambda tmp: save_file(tensors, tmp))
    side = {"format": "neuralign/1", **(metadata or {})}
    _atomic_write(sidecar_path(path),
                  lambda tmp: Path(tmp).write_text(json.dumps(side, indent=2, default=str)))
    return path


def save_model(model: nn.Module, path, metadata: dict | None = None) -> Path:
    """Save ``model``'s state dict and how to rebuild it."""
    from neuralign.models import model_config

    meta = {"model": model_config(model), "metadata": metadata or {}}
    return save_state_dict(model.state_dict(), path, meta)


def read_sidecar(path) -> dict:
    side = sidecar_path(path)
    if not side.exists():
        return {}
    try:
        return json.loads(side.read_text())
    except json.JSONDecodeError as exc:
        raise CheckpointError(f"{side}: corrupt JSON sidecar ({exc.msg} at line {exc.lineno})"
                              ) from exc


def load_state_dict(path, *, allow_pickle: bool = False, map_location="cpu"
                    ) -> dict[str, torch.Tensor]:
    """Read a checkpoint's tensors. Safetensors are memory-mapped, so large files load lazily."""
    path = Path(path)
    if not path.exists():
        raise CheckpointError(f"{path}: no such checkpoint")
    if path.suffix in PICKLE_SUFFIXES or not _looks_like_safetensors(path):
        if not allow_pickle:
            raise CheckpointError(
                f"{path} is not a safetensors file (a pickle?); pickles can run code when "
                "loaded: pass allow_pickle=True (CLI: --allow-pickle) if you trust it")
        try:
            obj = torch.load(path, map_location=map_location, weights_only=True)
        except Exception as exc:  # noqa: BLE001 - torch raises many types here
            raise CheckpointError(f"{path}: cannot unpickle ({type(exc).__name__}: "
                                  f"{str(exc).splitlines()[0][:120]})") from exc
        if isinstance(obj, Mapping) and "state_dict" in obj:
            obj = obj["state_dict"]
        if not isinstance(obj, Mapping):
            raise CheckpointError(f"{path}: holds a {type(obj).__name__}, not a state dict")
        return dict(obj)
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    try:
        return load_file(str(path), device=str(map_location))
    except (SafetensorError, OSError, RuntimeError, ValueError) as exc:
        raise CheckpointError(f"{path}: corrupt or truncated safetensors file "
                              f"({str(exc).splitlines()[0][:120]})") from exc


def _looks_like_safetensors(path: Path) -> bool:
    """A safetensors file starts with an 8-byte little-endian header length, then '{'."""
    with open(path, "rb") as f:
        head = f.read(9)
    if len(head) < 9:
        return path.suffix == ".safetensors"  # truncated: let the reader name the problem
    n = int.from_bytes(head[:8], "little")
    return head[8:9] == b"{" and 0 < n < 100_000_000


def load_into(model: nn.Module, state_dict: Mapping[str, torch.Tensor], source: str = "state dict"
              ) -> nn.Module:
    """Load ``state_dict`` into ``model`` strictly, with a one-line error on any mismatch."""
    own = model.state_dict()
    missing = [k for k in own if k not in state_dict]
    unexpected = [k for k in state_dict if k not in own]
    shapes = [f"{k} {tuple(state_dict[k].shape)} vs {tuple(v.shape)}" for k, v in own.items()
              if k in state_dict and tuple(state_dict[k].shape) != tuple(v.shape)]
    if missing or unexpected or shapes:
        parts = []
        if missing:
            parts.append(f"{len(missing)} missing (e.g. {missing[0]})")
        if unexpected:
            parts.append(f"{len(unexpected)} unexpected (e.g. {unexpected[0]})")
        if shapes:
            parts.append(f"{len(shapes)} of another shape (e.g. {shapes[0]})")
        raise ArchitectureMismatchError(f"{source} does not fit {type(model).__name__}: "
                                        + "; ".join(parts))
    model.load_state_dict(state_dict, strict=True)
    return model


def load_model(path, *, allow_pickle: bool = False, model: nn.Module | None = None) -> nn.Module:
    """Rebuild the model recorded in the sidecar (or fill the given ``model``) and load weights."""
    from neuralign.models import get_model

    sd = load_state_dict(path, allow_pickle=allow_pickle)
    if model is None:
        cfg = read_sidecar(path).get("model")
        if not cfg:
            raise CheckpointError(
                f"{path}: no architecture recorded (missing {sidecar_path(path).name}); pass "
                "model= with the architecture to fill")
        model = get_model(cfg["name"], **cfg.get("kwargs", {}))
    load_into(model, sd, source=str(path))
    model.eval()
    return model


class LazyStateDict(Mapping):
    """A read-only mapping over a safetensors file that reads each tensor only when asked for,
    so a merge of large checkpoints holds one layer of each in memory at a time."""

    def __init__(self, path):
        from safetensors import safe_open

        self.path = Path(path)
        if not self.path.exists():
            raise CheckpointError(f"{self.path}: no such checkpoint")
        try:
            self._file = safe_open(str(self.path), framework="pt", device="cpu")
        except Exception as exc:  # noqa: BLE001 - safetensors raises its own types
            raise CheckpointError(f"{self.path}: corrupt or truncated safetensors file "
                                  f"({str(exc).splitlines()[0][:120]})") from exc
        self._keys = list(self._file.keys())

    def __getitem__(self, key: str) -> torch.Tensor:
        if key not in self._keys:
            raise KeyError(key)
        return self._file.get_tensor(key)

    def __iter__(self):
        return iter(self._keys)

    def __len__(self) -> int:
        return len(self._keys)
