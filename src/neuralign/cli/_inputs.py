"""Checks on input paths, data names and option values that need no torch.

A command runs these first, so a typo costs a fraction of a second, not the torch import.
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path

from neuralign.cli._common import fail

PICKLE_SUFFIXES = (".pt", ".pth", ".bin", ".ckpt", ".pkl")
BUILTIN_DATA = ("digits", "fashion_mnist", "mnist1d")
DATA_SCHEMES = ("imagefolder", "npz", "hf-disk")


def check_checkpoint(path: str, *, allow_pickle: bool = False, flag: str = "checkpoint") -> str:
    """The kind of a model input (``safetensors``, ``pickle`` or ``hf-dir``), or a one-line
    error for a missing, empty, truncated, foreign or (without --allow-pickle) pickled file."""
    p = Path(path)
    if not p.exists():
        fail(f"{path}: no such checkpoint")
    if p.is_dir():
        if (p / "config.json").is_file():
            return "hf-dir"
        fail(f"{path} is a folder, not a checkpoint (a Hugging Face model folder holds "
             "config.json)")
    try:
        size = p.stat().st_size
        with open(p, "rb") as f:
            head = f.read(8)
            if size == 0:
                fail(f"{path} is empty (0 bytes): not a checkpoint")
            if len(head) == 8:
                n = int.from_bytes(head, "little")
                first = f.read(1)
                if first == b"{" and 0 < n < 100_000_000:
                    if 8 + n > size:
                        fail(f"{path}: truncated safetensors file (header of {n} bytes, "
                             f"file of {size})")
                    _check_safetensors_header(path, first + f.read(n - 1), 8 + n, size)
                    return "safetensors"
    except PermissionError:
        fail(f"{path}: permission denied")
    if p.suffix in PICKLE_SUFFIXES or head[:2] == b"PK" or head[:1] == b"\x80":
        if not allow_pickle:
            fail(f"{path} is a pickle file; unpickling can run code: pass --allow-pickle if you "
                 "trust it, or convert it to .safetensors")
        return "pickle"
    if p.name.endswith(".safetensors.index.json"):
        return "index"  # a sharded Hugging Face checkpoint
    if p.suffix == ".safetensors":
        fail(f"{path}: corrupt or truncated safetensors file")
    fail(f"{path} is not a checkpoint (neither safetensors nor a PyTorch pickle)")
    return ""  # unreachable


def _check_safetensors_header(path: str, raw: bytes, data_start: int, size: int) -> None:
    try:
        header = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError):
        fail(f"{path}: corrupt safetensors header")
    if not isinstance(header, dict):
        fail(f"{path}: corrupt safetensors header")
    end = 0
    for k, v in header.items():
        if k == "__metadata__":
            continue
        try:
            end = max(end, int(v["data_offsets"][1]))
        except (KeyError, TypeError, ValueError, IndexError):
            fail(f"{path}: corrupt safetensors header (tensor {k!r})")
    if data_start + end > size:
        fail(f"{path}: truncated safetensors file ({size} bytes, its header promises "
             f"{data_start + end})")


def check_data_name(data: str | None, *, flag: str = "--data", extra=()) -> None:
    """A one-line error for a data name neither built in nor of a known scheme."""
    if data is None:
        return
    key = data.replace("-", "_").lower()
    if key in BUILTIN_DATA or key in extra:
        return
    scheme, sep, rest = data.partition(":")
    if sep and scheme in DATA_SCHEMES:
        if not rest:
            fail(f"{flag} {data}: give a path after '{scheme}:'")
        if not Path(rest).exists():
            fail(f"{flag} {data}: {rest} does not exist")
        want_dir = scheme != "npz"
        if want_dir and not Path(rest).is_dir():
            fail(f"{flag} {data}: {rest} is not a folder")
        if not want_dir and not Path(rest).is_file():
            fail(f"{flag} {data}: {rest} is not a file")
        return
    if sep and module_function_ok(data):
        return  # module:function, checked when imported
    fail(f"unknown data {data!r}; use {', '.join(BUILTIN_DATA)}, imagefolder:DIR, npz:FILE, "
         "hf-disk:DIR or module:function")


def check_choice(value: str | None, choices, flag: str) -> str | None:
    if value is None:
        return None
    norm = value.lower().replace("_", "-")
    table = {c.lower().replace("_", "-"): c for c in choices}
    if norm not in table:
        fail(f"{flag} {value!r} is not one of {', '.join(choices)}")
    return table[norm]


def check_range(value, flag: str, *, lo=None, hi=None, lo_open: bool = False,
                hi_open: bool = False):
    """``value`` within [lo, hi] (open ends when asked), else a one-line error."""
    if value is None:
        return value
    if isinstance(value, float) and not math.isfinite(value):
        fail(f"{flag} must be a finite number, got {value}")
    if lo is not None and (value < lo or (lo_open and value == lo)):
        fail(f"{flag} must be {'>' if lo_open else '>='} {lo}, got {value}")
    if hi is not None and (value > hi or (hi_open and value == hi)):
        fail(f"{flag} must be {'<' if hi_open else '<='} {hi}, got {value}")
    return value


def parse_floats(text: str, n: int, flag: str, count_note: str = "") -> list[float]:
    """``n`` comma-separated finite numbers (``--coeffs``), or a one-line error."""
    try:
        w = [float(x) for x in text.split(",") if x.strip()]
    except ValueError:
        fail(f"{flag} {text!r} must be comma-separated numbers, e.g. 0.3,0.7")
    if len(w) != n:
        fail(f"{flag} gives {len(w)} coefficients for {n} models{count_note}")
    return w


def parse_shape(text: str | None, flag: str = "--input-shape") -> tuple[int, ...] | None:
    if text is None:
        return None
    try:
        shape = tuple(int(x) for x in text.replace("x", ",").split(",") if x.strip())
    except ValueError:
        fail(f"{flag} {text!r} must be integers like 3,32,32")
    if not shape or any(s <= 0 for s in shape):
        fail(f"{flag} {text!r} must be positive integers like 3,32,32")
    return shape


def check_device(device: str | None) -> str | None:
    if device is None:
        return None
    kind = device.split(":", 1)[0]
    if kind not in ("cpu", "cuda", "mps", "xpu"):
        fail(f"--device {device!r}: use cpu, cuda, cuda:N, mps")
    return device


def device_available(device: str | None) -> None:
    """After torch is imported: a one-line error for a device this machine does not have."""
    if device is None or device == "cpu":
        return
    import torch

    kind, _, index = device.partition(":")
    if kind == "cuda":
        n = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if n == 0:
            fail(f"--device {device}: no CUDA device here (torch.cuda.is_available() is False)")
        if index and (not index.isdigit() or int(index) >= n):
            fail(f"--device {device}: this machine has {n} CUDA device(s), cuda:0..cuda:{n - 1}")
    elif kind == "mps" and not (hasattr(torch.backends, "mps")
                                and torch.backends.mps.is_available()):
        fail(f"--device {device}: MPS is not available here")
    elif kind == "xpu" and not (hasattr(torch, "xpu") and torch.xpu.is_available()):
        fail(f"--device {device}: no XPU device here")


def module_function_ok(spec: str) -> bool:
    mod, _, fn = spec.partition(":")
    return bool(mod) and bool(fn) and all(p.isidentifier() for p in mod.split(".")) and \
        fn.isidentifier() and not os.path.exists(spec)
