"""Reading tensors from whatever a user has: safetensors (memory-mapped, lazily), PyTorch pickles
(only on request), Hugging Face model directories and sharded ``*.index.json`` checkpoints.

Every reader checks what it can before reading tensors: a missing path, a directory that is no
model, a zero-byte or truncated file, a pickle without opt-in are one-line ``CheckpointError``s.
Non-finite weights are refused on every read unless ``check_finite=False``.
"""

from __future__ import annotations

import json
import struct
from collections.abc import Iterator, Mapping
from pathlib import Path

from neuralign.errors import CheckpointError

PICKLE_SUFFIXES = (".pt", ".pth", ".bin", ".ckpt", ".pkl")
HF_WEIGHT_FILES = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin",
                   "pytorch_model.bin.index.json")
_MAX_HEADER = 100_000_000
_DTYPE_BYTES = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2, "I64": 8, "I32": 4, "I16": 2, "I8": 1,
                "U8": 1, "U16": 2, "U32": 4, "U64": 8, "BOOL": 1, "F8_E4M3": 1, "F8_E5M2": 1}


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0][:160]}" if text else type(exc).__name__


def check_exists(path) -> Path:
    path = Path(path)
    if not path.exists():
        raise CheckpointError(f"{path}: no such checkpoint")
    return path


def is_hf_dir(path: Path) -> bool:
    return path.is_dir() and (path / "config.json").is_file()


def hf_weight_file(folder: Path) -> Path:
    """The weights of a Hugging Face model directory (safetensors preferred, then the index)."""
    for name in HF_WEIGHT_FILES:
        if (folder / name).is_file():
            return folder / name
    raise CheckpointError(f"{folder}: a Hugging Face model directory without weights (none of "
                          f"{', '.join(HF_WEIGHT_FILES)})")


def looks_like_safetensors(path: Path) -> bool:
    """A safetensors file starts with an 8-byte little-endian header length, then ``{``."""
    with open(path, "rb") as f:
        head = f.read(9)
    if len(head) < 9:
        return path.suffix == ".safetensors"  # too short: let the header reader name it
    n = struct.unpack("<Q", head[:8])[0]
    return head[8:9] == b"{" and 0 < n < _MAX_HEADER


def read_header(path) -> dict:
    """The JSON header of a safetensors file, checked against the file's size (so a truncated
    file is caught without reading any tensor). Raises a one-line ``CheckpointError``."""
    path = check_exists(path)
    if path.is_dir():
        raise CheckpointError(f"{path} is a directory, not a checkpoint file")
    size = path.stat().st_size
    if size == 0:
        raise CheckpointError(f"{path}: empty file (0 bytes), not a checkpoint")
    with open(path, "rb") as f:
        head = f.read(8)
        if len(head) < 8:
            raise CheckpointError(f"{path}: corrupt or truncated safetensors file "
                                  f"({size} bytes)")
        n = struct.unpack("<Q", head)[0]
        if not 0 < n < _MAX_HEADER or 8 + n > size:
            raise CheckpointError(f"{path}: corrupt or truncated safetensors file (header of "
                                  f"{n} bytes in a file of {size})")
        raw = f.read(n)
    try:
        header = json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise CheckpointError(f"{path}: corrupt or truncated safetensors file (bad header: "
                              f"{_first_line(exc)})") from exc
    if not isinstance(header, dict):
        raise CheckpointError(f"{path}: corrupt safetensors file (header is not an object)")
    end = 0
    for key, info in header.items():
        if key == "__metadata__":
            continue
        try:
            end = max(end, int(info["data_offsets"][1]))
        except (TypeError, KeyError, IndexError, ValueError) as exc:
            raise CheckpointError(f"{path}: corrupt safetensors header at tensor {key!r}"
                                  ) from exc
    if 8 + n + end > size:
        raise CheckpointError(f"{path}: corrupt or truncated safetensors file (expected "
                              f"{8 + n + end} bytes, found {size})")
    return header


def header_metadata(path) -> dict[str, str]:
    return dict(read_header(path).get("__metadata__") or {})


def assert_finite(name: str, tensor, source) -> None:
    import torch

    if (isinstance(tensor, torch.Tensor) and tensor.is_floating_point()
            and not bool(torch.isfinite(tensor).all())):
        what = "NaN" if bool(torch.isnan(tensor).any()) else "infinite"
        raise CheckpointError(f"{source}: tensor {name!r} {tuple(tensor.shape)} has {what} "
                              "values; the weights are unusable (a diverged run?)")


def looks_like_torch(path: Path) -> bool:
    """``torch.save`` output: a zip archive (PyTorch >= 1.6) or a bare pickle (protocol >= 2)."""
    with open(path, "rb") as f:
        head = f.read(4)
    return head.startswith(b"PK\x03\x04") or head[:1] == b"\x80"


def _load_pickle(path: Path, allow_pickle: bool, map_location="cpu") -> dict:
    if not looks_like_torch(path):
        raise CheckpointError(f"{path} is not a checkpoint (neither safetensors nor a PyTorch "
                              "file)")
    if not allow_pickle:
        raise CheckpointError(
            f"{path} is not a safetensors file but a pickle, which can run code when loaded: "
            "pass --allow-pickle (Python: allow_pickle=True) if you trust it")
    import torch

    try:  # the restricted unpickler first: plain state dicts need nothing more
        obj = torch.load(path, map_location=map_location, weights_only=True)
    except Exception:  # noqa: BLE001 - torch raises many types here
        try:
            obj = torch.load(path, map_location=map_location, weights_only=False)
        except Exception as exc:
            raise CheckpointError(f"{path}: cannot unpickle ({_first_line(exc)})") from exc
    if isinstance(obj, Mapping) and "state_dict" in obj and isinstance(obj["state_dict"],
                                                                       Mapping):
        obj = obj["state_dict"]
    if hasattr(obj, "state_dict") and callable(obj.state_dict) and not isinstance(obj, Mapping):
        obj = obj.state_dict()  # a pickled nn.Module (only reachable with allow_pickle)
    if not isinstance(obj, Mapping) or not all(isinstance(v, torch.Tensor)
                                               for v in obj.values()):
        raise CheckpointError(f"{path}: holds a {type(obj).__name__}, not a state dict of "
                              "tensors")
    return dict(obj)


def _load_index(path: Path, allow_pickle: bool) -> dict:
    try:
        weight_map = json.loads(path.read_text())["weight_map"]
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise CheckpointError(f"{path}: not a sharded-checkpoint index ({_first_line(exc)})"
                              ) from exc
    out: dict = {}
    for shard in sorted(set(weight_map.values())):
        sd = read_tensors(path.parent / shard, allow_pickle=allow_pickle)
        out.update({k: v for k, v in sd.items() if weight_map.get(k) == shard})
    missing = [k for k, shard in weight_map.items() if k not in out]
    if missing:
        raise CheckpointError(f"{path}: tensor {missing[0]!r} is not in its shard "
                              f"{weight_map[missing[0]]}")
    return out


def _weights_path(path: Path) -> Path:
    """The weight file of ``path``: itself, or the weights of a Hugging Face model folder."""
    if not path.is_dir():
        return path
    if not is_hf_dir(path):
        raise CheckpointError(f"{path} is a directory, not a checkpoint (a Hugging Face "
                              "model directory would hold config.json and weights)")
    return hf_weight_file(path)


def read_tensors(path, *, allow_pickle: bool = False) -> dict:
    """All tensors of a checkpoint (no finiteness check; see ``load_state_dict``)."""
    path = check_exists(path)
    path = _weights_path(path)
    if path.name.endswith(".index.json"):
        return _load_index(path, allow_pickle)
    if path.stat().st_size == 0:
        raise CheckpointError(f"{path}: empty file (0 bytes), not a checkpoint")
    if path.suffix == ".safetensors" or looks_like_safetensors(path):
        read_header(path)  # size and header checks: one line instead of a Rust panic
        from safetensors import SafetensorError
        from safetensors.torch import load_file

        try:
            return load_file(str(path), device="cpu")
        except (SafetensorError, OSError, RuntimeError, ValueError) as exc:
            raise CheckpointError(f"{path}: corrupt or truncated safetensors file "
                                  f"({_first_line(exc)})") from exc
    return _load_pickle(path, allow_pickle)


def _shard_map(path: Path) -> dict[str, Path]:
    """``tensor name -> shard file`` of a safetensors file, an index or an HF directory."""
    path = _weights_path(path)
    if path.name.endswith(".index.json"):
        try:
            weight_map = json.loads(path.read_text())["weight_map"]
        except (OSError, ValueError, KeyError, TypeError) as exc:
            raise CheckpointError(f"{path}: not a sharded-checkpoint index "
                                  f"({_first_line(exc)})") from exc
        return {k: path.parent / v for k, v in weight_map.items()}
    if path.suffix != ".safetensors" and not looks_like_safetensors(path):
        raise CheckpointError(f"{path}: lazy reads need safetensors, not a pickle")
    header = read_header(path)
    keys = sorted((k for k in header if k != "__metadata__"),
                  key=lambda k: header[k]["data_offsets"][0])
    return {k: path for k in keys}


class LazyStateDict(Mapping):
    """A read-only mapping over a safetensors file, a sharded ``*.index.json`` or a Hugging Face
    directory that reads each tensor only when asked for (and checks it is finite), so a merge
    of large checkpoints holds one layer of each at a time."""

    def __init__(self, path, *, check_finite: bool = True):
        self.path = check_exists(path)
        self.check_finite = check_finite
        self._where = _shard_map(self.path)
        self._open: dict[Path, object] = {}
        for shard in dict.fromkeys(self._where.values()):
            read_header(shard)  # missing or truncated shards fail now, in one line

    def _file(self, shard: Path):
        if shard not in self._open:
            from safetensors import safe_open

            try:
                self._open[shard] = safe_open(str(shard), framework="pt", device="cpu")
            except Exception as exc:  # safetensors raises its own types
                raise CheckpointError(f"{shard}: corrupt or truncated safetensors file "
                                      f"({_first_line(exc)})") from exc
        return self._open[shard]

    def __getitem__(self, key: str):
        if key not in self._where:
            raise KeyError(key)
        tensor = self._file(self._where[key]).get_tensor(key)
        if self.check_finite:
            assert_finite(key, tensor, self.path)
        return tensor

    def __iter__(self) -> Iterator[str]:
        return iter(self._where)

    def __len__(self) -> int:
        return len(self._where)
