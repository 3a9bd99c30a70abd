"""Out-of-core merging of sharded Hugging Face safetensors checkpoints, tensor by tensor.

A checkpoint is a directory holding ``model.safetensors.index.json`` (``weight_map``: tensor name
-> shard file) and its shards, a directory holding one ``model.safetensors``, or a single
``.safetensors`` file. :func:`merge_checkpoints` validates every input from the file headers
before any tensor is read, then for each tensor of the template (the base, else the first model)
reads that tensor of every input (``safetensors.safe_open``, one file handle per read so no
mapping outlives its tensor), merges it with the same per-tensor kernel as the in-memory merge
(:func:`neuralign.merge.task_vectors.merge_tensor`) and appends its bytes to the output shard,
whose header is computed up front from the shapes. Peak memory is therefore a few tensors, never
a shard or a model. The output uses the template's shard layout and file names, gets its own
index, and a copy of every other file of the template directory (config, tokenizer, generation
config). Everything is written into a temporary sibling directory that is renamed into place at
the end: an interrupted merge leaves no partial output.
"""

from __future__ import annotations

import json
import os
import shutil
import struct
import tempfile
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import torch

from neuralign.errors import ArchitectureMismatchError, CheckpointError, NeuralignError
from neuralign.merge._parallel import default_workers, ordered
from neuralign.merge.task_vectors import check_task_options, merge_tensor

__all__ = ["INDEX_NAME", "ShardedCheckpoint", "merge_checkpoints", "save_sharded", "write_sharded"]

INDEX_NAME = "model.safetensors.index.json"
SINGLE_NAME = "model.safetensors"
_DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16,
           "BF16": torch.bfloat16, "I64": torch.int64, "I32": torch.int32, "I16": torch.int16,
           "I8": torch.int8, "U8": torch.uint8, "BOOL": torch.bool}
_NAMES = {v: k for k, v in _DTYPES.items()}
for _n in ("float8_e4m3fn", "float8_e5m2"):
    if hasattr(torch, _n):
        _DTYPES["F8_E4M3" if "e4m3" in _n else "F8_E5M2"] = getattr(torch, _n)
        _NAMES[getattr(torch, _n)] = "F8_E4M3" if "e4m3" in _n else "F8_E5M2"


def _read_header(path: Path) -> dict:
    try:
        with open(path, "rb") as f:
            (n,) = struct.unpack("<Q", f.read(8))
            if n <= 0 or n > 100_000_000:
                raise ValueError("bad header length")
            header = json.loads(f.read(n))
    except FileNotFoundError:
        raise CheckpointError(f"{path}: shard listed in the index is missing") from None
    except Exception as exc:
        raise CheckpointError(f"{path}: corrupt or truncated safetensors header ({exc})") from exc
    header.pop("__metadata__", None)
    return header


@dataclass
class ShardedCheckpoint:
    """A read-only view of a (possibly sharded) safetensors checkpoint: names, shapes and dtypes
    from the headers; :meth:`get` reads one tensor."""

    path: Path
    weight_map: dict[str, str]
    shapes: dict[str, tuple[int, ...]] = field(default_factory=dict)
    dtypes: dict[str, str] = field(default_factory=dict)
    metadata: dict = field(default_factory=dict)
    directory: Path | None = None
    indexed: bool = False

    @classmethod
    def open(cls, path) -> ShardedCheckpoint:
        path = Path(path)
        if path.is_dir():
            index = path / INDEX_NAME
            if index.exists():
                try:
                    data = json.loads(index.read_text())
                    wm = dict(data["weight_map"])
                except Exception as exc:
                    raise CheckpointError(f"{index}: not a valid safetensors index ({exc})") from exc
                ck = cls(path=path, weight_map=wm, metadata=dict(data.get("metadata", {})),
                         directory=path, indexed=True)
            elif (path / SINGLE_NAME).exists():
                ck = cls(path=path, weight_map={}, directory=path)
                ck._single(path / SINGLE_NAME)
            else:
                raise CheckpointError(f"{path}: no {INDEX_NAME} or {SINGLE_NAME} in this directory")
        elif path.suffix == ".safetensors" and path.exists():
            ck = cls(path=path, weight_map={}, directory=None)
            ck._single(path)
        else:
            raise CheckpointError(f"{path}: not a safetensors checkpoint (a directory with "
                                  f"{INDEX_NAME}, or a .safetensors file)")
        ck._load_headers()
        return ck

    def _single(self, file: Path) -> None:
        self.weight_map = {k: file.name for k in _read_header(file)}

    def file(self, shard: str) -> Path:
        return (self.directory / shard) if self.directory is not None else self.path

    @property
    def shards(self) -> list[str]:
        return list(dict.fromkeys(self.weight_map.values()))

    def keys_in(self, shard: str) -> list[str]:
        return [k for k, s in self.weight_map.items() if s == shard]

    def _load_headers(self) -> None:
        for shard in self.shards:
            header = _read_header(self.file(shard))
            for k in self.keys_in(shard):
                if k not in header:
                    raise CheckpointError(f"{self.file(shard)}: the index puts {k!r} here but the "
                                          "shard does not hold it")
                info = header[k]
                if info["dtype"] not in _DTYPES:
                    raise CheckpointError(f"{self.file(shard)}: tensor {k!r} has unsupported "
                                          f"dtype {info['dtype']}")
                self.shapes[k] = tuple(int(s) for s in info["shape"])
                self.dtypes[k] = info["dtype"]

    def get(self, key: str) -> torch.Tensor:
        from safetensors import safe_open

        with safe_open(str(self.file(self.weight_map[key])), framework="pt", device="cpu") as f:
            return f.get_tensor(key)

    def numel(self) -> int:
        n = 0
        for s in self.shapes.values():
            k = 1
            for d in s:
                k *= d
            n += k
        return n


def _nbytes(shape, dtype: torch.dtype) -> int:
    n = 1
    for d in shape:
        n *= d
    return n * torch.empty((), dtype=dtype).element_size()


class _ShardWriter:
    """Writes one safetensors file whose header (names, dtypes, shapes) is known before the data:
    tensors are then appended one at a time, in header order."""

    def __init__(self, path: Path, entries: list[tuple[str, tuple, torch.dtype]],
                 metadata: dict[str, str] | None = None):
        header: dict = {"__metadata__": dict(metadata or {"format": "pt"})}
        off = 0
        self.order, self.sizes = [], {}
        for key, shape, dtype in entries:
            nb = _nbytes(shape, dtype)
            header[key] = {"dtype": _NAMES[dtype], "shape": list(shape),
                           "data_offsets": [off, off + nb]}
            self.order.append(key)
            self.sizes[key] = (tuple(shape), dtype, nb)
            off += nb
        blob = json.dumps(header, separators=(",", ":")).encode()
        blob += b" " * ((8 - len(blob) % 8) % 8)
        self.total = off
        self.f = open(path, "wb")  # noqa: SIM115 - closed in close()
        self.f.write(struct.pack("<Q", len(blob)) + blob)
        self.next = 0

    def write(self, key: str, t: torch.Tensor) -> None:
        shape, dtype, _ = self.sizes[key]
        if key != self.order[self.next] or tuple(t.shape) != shape or t.dtype != dtype:
            raise NeuralignError(f"internal: tensor {key!r} written out of order or reshaped")
        raw = t.detach().contiguous().reshape(-1).view(torch.uint8).numpy()
        self.f.write(memoryview(raw))
        self.next += 1

    def close(self) -> None:
        self.f.flush()
        os.fsync(self.f.fileno())
        self.f.close()


def _progress(progress, total: int):
    if callable(progress):
        return progress, (lambda: None)
    if not progress:
        return (lambda done, n, key: None), (lambda: None)
    from rich.progress import Progress

    bar = Progress(transient=True)
    task = bar.add_task("merging tensors", total=total)
    bar.start()
    return (lambda done, n, key: bar.update(task, completed=done)), bar.stop


def _check_inputs(template: ShardedCheckpoint, others: list[ShardedCheckpoint], names) -> None:
    keys = set(template.weight_map)
    for ck, name in zip(others, names):
        if set(ck.weight_map) != keys:
            diff = sorted(keys ^ set(ck.weight_map))
            raise ArchitectureMismatchError(
                f"{name} ({ck.path}) holds different tensors than the template ({len(diff)} "
                f"differ, e.g. {diff[0]!r}); merge checkpoints of one architecture")
        for k in template.weight_map:
            if ck.shapes[k] != template.shapes[k]:
                raise ArchitectureMismatchError(
                    f"{name} differs in shape at {k!r} ({ck.shapes[k]} vs {template.shapes[k]}); "
                    "merge checkpoints of one architecture")


def write_sharded(tensors: Callable[[str], torch.Tensor], layout: ShardedCheckpoint, out,
                  *, dtypes: dict[str, torch.dtype] | None = None, overwrite: bool = False,
                  progress=None, metadata: dict | None = None, workers: int = 1) -> Path:
    """Write a checkpoint with ``layout``'s shards and names whose tensor ``k`` is
    ``tensors(k)`` (called once per tensor; with ``workers > 1`` from that many threads, a few
    tensors ahead of the writer), atomically into ``out``; copies the other files of
    ``layout``'s directory. Returns ``out``."""
    out = Path(out)
    inputs = {layout.path.resolve()}
    if out.resolve() in inputs or (layout.directory and out.resolve() == layout.directory.resolve()):
        raise NeuralignError(f"{out}: the output would overwrite an input checkpoint")
    if out.exists() and not overwrite:
        raise NeuralignError(f"{out} exists; choose a new output directory or pass overwrite")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", suffix=".tmp", dir=out.parent))
    dtypes = dtypes or {}
    total = len(layout.weight_map)
    update, stop = _progress(progress, total)
    done, size = 0, 0
    order = [k for shard in layout.shards for k in layout.keys_in(shard)]
    results = ordered(tensors, order, workers)
    closer = ThreadPoolExecutor(1)  # a finished shard is fsynced while the next one is merged
    closing = []
    try:
        single = layout.directory is None
        for shard in layout.shards:
            keys = layout.keys_in(shard)
            entries = [(k, layout.shapes[k], dtypes.get(k, _DTYPES[layout.dtypes[k]]))
                       for k in keys]
            name = SINGLE_NAME if single else shard
            w = _ShardWriter(tmp / name, entries)
            try:
                for _ in keys:
                    k, t = next(results)
                    w.write(k, t)
                    del t
                    done += 1
                    update(done, total, k)
            except BaseException:
                w.f.close()
                raise
            closing.append(closer.submit(w.close))
            size += w.total
        for c in closing:
            c.result()
        if not single:
            for p in layout.directory.iterdir():
                if p.is_file() and p.name != INDEX_NAME and p.name not in layout.shards \
                        and not p.name.endswith(".safetensors"):
                    shutil.copy2(p, tmp / p.name)
        if layout.indexed:
            index = {"metadata": {"total_size": size, **(metadata or {})},
                     "weight_map": dict(layout.weight_map)}
            (tmp / INDEX_NAME).write_text(json.dumps(index, indent=2))
        if out.exists():
            old = out.with_name(f".{out.name}.old")
            os.replace(out, old)
            os.replace(tmp, out)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, out)
    except BaseException:
        results.close()
        closer.shutdown(wait=True)
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    finally:
        results.close()
        closer.shutdown(wait=True)
        stop()
    return out


_EXPONENT = {torch.bfloat16: 0x7F80, torch.float16: 0x7C00}


def all_finite(t: torch.Tensor, chunk: int = 1 << 20) -> bool:
    """No NaN or infinity in ``t``. For 16-bit floats this tests the exponent bits on an int16
    view, a chunk at a time (``torch.isfinite`` on bfloat16 is many times slower on CPU than the
    merge itself, and a whole-tensor temporary costs more in page faults than the test)."""
    mask = _EXPONENT.get(t.dtype)
    if mask is None:
        return bool(torch.isfinite(t).all())
    bits = t.reshape(-1).view(torch.int16)
    # sign cleared, the bits order like the magnitudes: all-ones exponent (inf, NaN) is >= mask
    for s in range(0, bits.numel(), chunk):
        if int((bits[s:s + chunk] & 0x7FFF).max()) >= mask:
            return False
    return True


def merge_checkpoints(models: Sequence, out, method: str = "linear", *, base=None,
                      overwrite: bool = False, progress=None, dtype: torch.dtype | None = None,
                      workers: int | None = None, **options) -> Path:
    """Merge safetensors checkpoints (paths) out of core into the directory ``out``.

    ``method`` is one of ``linear`` (weighted average of ``models``; ``weights``),
    ``task-arithmetic``, ``ties``, ``dare`` or ``slerp`` (these need ``base``: the pre-trained
    checkpoint the models were fine-tuned from; slerp goes from ``base`` at t=0 to the one
    model at t=1); ``options`` as :func:`neuralign.merge.task_vectors.task_merge`. The result
    equals the in-memory merge tensor by tensor. ``progress``: ``True`` for a progress bar, or
    a callable ``(done, total, key)``. ``dtype`` casts float outputs (default: the template's).
    A NaN or infinite input tensor stops the merge with a ``CheckpointError`` naming it (and, as
    for any failure, nothing is left at ``out``). ``workers``: tensors merged at once, each
    on one thread (default :func:`default_workers`; the result does not depend on it). Returns
    the output directory.
    """
    method = method.replace("_", "-")
    if method != "linear" and base is None:
        raise NeuralignError(f"method {method!r} needs the base checkpoint (--base) the models "
                             "were fine-tuned from")
    opts = check_task_options(method, len(models), **options)
    cks = [ShardedCheckpoint.open(m) for m in models]
    template = ShardedCheckpoint.open(base) if base is not None else cks[0]
    _check_inputs(template, cks, [f"model {i}" for i in range(len(cks))])
    for ck in cks + [template]:
        if Path(out).resolve() in (ck.path.resolve(),):
            raise NeuralignError(f"{out}: the output would overwrite an input checkpoint")
    dtypes = {k: dtype for k, d in template.dtypes.items()
              if dtype is not None and _DTYPES[d].is_floating_point}

    def finite(t: torch.Tensor, ck: ShardedCheckpoint, key: str) -> torch.Tensor:
        if t.is_floating_point() and not all_finite(t):
            raise CheckpointError(f"{ck.path} has NaN or infinite values in {key!r}; it cannot "
                                  "be merged")
        return t

    def merged(key: str) -> torch.Tensor:
        xs = [finite(ck.get(key), ck, key) for ck in cks]
        if method == "linear":
            res = merge_tensor(key, xs[0], xs, **opts)
        else:
            res = merge_tensor(key, finite(template.get(key), template, key), xs, **opts)
        return res.to(dtypes[key]) if key in dtypes else res

    meta = {"merged_by": "neuralign", "merge_method": method}
    workers = default_workers() if workers is None else int(workers)
    if workers < 1:
        raise NeuralignError(f"workers must be at least 1, got {workers}")
    return write_sharded(merged, template, out, dtypes=dtypes, overwrite=overwrite,
                         progress=progress, metadata=meta, workers=workers)


def save_sharded(state_dict, out, max_shard_bytes: int = 5 * 2**30, *,
                 extra_files: dict[str, str] | None = None) -> Path:
    """Save a state dict as a Hugging Face sharded checkpoint in the new directory ``out``
    (``model-0000i-of-0000n.safetensors`` + index; ``extra_files`` name -> text, e.g. a
    ``config.json``), atomically."""
    from safetensors.torch import save_file

    out = Path(out)
    if out.exists():
        raise NeuralignError(f"{out} exists; choose a new directory")
    groups: list[list[str]] = [[]]
    size = 0
    for k, v in state_dict.items():
        nb = v.numel() * v.element_size()
        if groups[-1] and size + nb > max_shard_bytes:
            groups.append([])
            size = 0
        groups[-1].append(k)
        size += nb
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", suffix=".tmp", dir=out.parent))
    try:
        wm, total = {}, 0
        for i, keys in enumerate(groups, 1):
            name = f"model-{i:05d}-of-{len(groups):05d}.safetensors"
            save_file({k: state_dict[k].detach().contiguous() for k in keys}, str(tmp / name),
                      metadata={"format": "pt"})
            for k in keys:
                wm[k] = name
                total += state_dict[k].numel() * state_dict[k].element_size()
        (tmp / INDEX_NAME).write_text(json.dumps({"metadata": {"total_size": total},
                                                  "weight_map": wm}, indent=2))
        for name, text in (extra_files or {}).items():
            (tmp / name).write_text(text)
        os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out
