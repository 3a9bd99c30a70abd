"""Caches of the fine-tuning benchmarks (``protocol`` re-exports them): pre-trained backbones
trained once under ``~/.cache/neuralign`` and a resumable store of finished runs, both written
atomically, never in git (the store's export is committed next to a report)."""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any


def cache_root() -> Path:
    """``$NEURALIGN_CACHE`` or ``~/.cache/neuralign`` (outside the repository)."""
    return Path(os.environ.get("NEURALIGN_CACHE", Path.home() / ".cache" / "neuralign"))


def config_key(config: Mapping[str, Any]) -> str:
    """A stable 16-hex-digit hash of a JSON-able configuration (key order does not matter)."""
    blob = json.dumps(config, sort_keys=True, default=str, separators=(",", ":"))
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def _atomic_write_bytes(path: Path, write: Callable[[Path], None]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        write(Path(tmp))
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def cached_backbone(name: str, config: Mapping[str, Any], make: Callable[[], Any],
                    train: Callable[[Any], None], root: Path | None = None
                    ) -> tuple[Any, dict[str, Any]]:
    """A pre-trained backbone, trained once and reused.

    ``make()`` builds the untrained model (the same architecture every time), ``train(model)``
    pre-trains it in place. The weights go to ``<root>/backbones/<name>-<hash>.safetensors``
    with a JSON sidecar recording the config and the one-off training seconds; both are written
    to a temporary file and renamed, so an interrupted run leaves no partial file. Returns
    ``(model, {"path", "cached", "seconds", "config"})``."""
    from safetensors.torch import load_file, save_file

    root = cache_root() if root is None else Path(root)
    path = root / "backbones" / f"{name}-{config_key(config)}.safetensors"
    meta_path = path.with_suffix(".json")
    model = make()
    if path.exists() and meta_path.exists():
        model.load_state_dict(load_file(str(path)), strict=True)
        meta = json.loads(meta_path.read_text())
        return model, {"path": str(path), "cached": True, "seconds": meta["seconds"],
                       "config": meta["config"]}
    t0 = time.perf_counter()
    train(model)
    seconds = time.perf_counter() - t0
    state = {k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()}
    _atomic_write_bytes(path, lambda p: save_file(state, str(p)))
    meta = {"name": name, "config": dict(config), "seconds": seconds}
    _atomic_write_bytes(meta_path, lambda p: p.write_text(json.dumps(meta, indent=1,
                                                                     default=str)))
    return model, {"path": str(path), "cached": False, "seconds": seconds,
                   "config": dict(config)}


def file_digest(path: Path | str) -> str:
    """The first 16 hex digits of the SHA-256 of a file (a backbone's weights)."""
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()[:16]


class ResultStore:
    """A JSON dict of finished results, rewritten atomically after every put (resume)."""

    def __init__(self, path: Path | str, seed_from: Path | str | None = None) -> None:
        """``seed_from``: a committed copy of the finished runs (``export``), read when ``path``
        does not exist yet, so a fresh machine (an empty cache) resumes where another stopped."""
        self.path = Path(path)
        src = self.path if self.path.exists() else (Path(seed_from) if seed_from else None)
        self.data: dict[str, Any] = (json.loads(src.read_text())
                                     if src is not None and src.exists() else {})

    CONTEXT = "__context__"

    def bind(self, context: Mapping[str, Any]) -> None:
        """Tie the runs to what they were made with (e.g. digests of the backbones): a store or
        export holding runs of another context is refused, never mixed in."""
        context = json.loads(json.dumps(context, sort_keys=True, default=str))
        old = self.data.get(self.CONTEXT)
        if old is not None and old != context:
            raise SystemExit(f"{self.path} (or the export it started from) holds runs made with "
                             f"{old}, not {context}; remove it to start over")
        if old is None:
            self.update({self.CONTEXT: context})

    def runs(self) -> dict[str, Any]:
        """The finished runs (without the context)."""
        return {k: v for k, v in self.data.items() if k != self.CONTEXT}

    def export(self, path: Path | str) -> None:
        """Write every finished run to ``path`` (atomically, sorted keys): the raw results
        behind a report, committed next to it, and a ``seed_from`` for a later run."""
        blob = json.dumps(self.data, sort_keys=True, separators=(",", ":"), default=str)
        _atomic_write_bytes(Path(path), lambda p: p.write_text(blob + "\n"))

    def __contains__(self, key: str) -> bool:
        return key in self.data

    def __getitem__(self, key: str) -> Any:
        return self.data[key]

    def __setitem__(self, key: str, value: Any) -> None:
        self.update({key: value})

    def update(self, entries: Mapping[str, Any]) -> None:
        """Add ``entries`` and rewrite the file once, atomically."""
        self.data.update(entries)
        blob = json.dumps(self.data, default=str)
        _atomic_write_bytes(self.path, lambda p: p.write_text(blob))
