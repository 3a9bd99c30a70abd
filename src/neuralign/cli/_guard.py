"""The one output guard every command goes through, before it does any work.

Rules: an output is never an input (nor an input's sidecar, nor inside an input directory); two
outputs of one command never share a path; an output's name says its kind (``.safetensors`` for
models, ``.png``/``.pdf``/``.svg`` for plots, ``.json`` for results); an existing file is
replaced only with ``--force`` and only when it holds the same kind of content (a plot never
replaces a checkpoint); the folder must exist and accept a new file, checked by creating one.
"""

from __future__ import annotations

import json
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path

from neuralign.cli._common import fail

SUFFIXES = {
    "model": (".safetensors",),
    "plot": (".png", ".pdf", ".svg"),
    "json": (".json",),
    "dir": (),
}
KIND_NAMES = {"model": "checkpoint", "plot": "plot", "json": "JSON file", "dir": "folder"}


@dataclass
class Output:
    flag: str  # e.g. "--out"
    path: str | None
    kind: str  # model | plot | json | dir
    command: str | None = None  # models: --force replaces only what this command wrote


def recorded_command(path: Path) -> str | None:
    """The ``command`` a neuralign checkpoint records in its safetensors header, if any."""
    try:
        with open(path, "rb") as f:
            n = int.from_bytes(f.read(8), "little")
            if not 0 < n < 100_000_000:
                return None
            meta = json.loads(f.read(n)).get("__metadata__") or {}
    except (OSError, ValueError):
        return None
    for v in meta.values():
        try:
            rec = json.loads(v)
        except (TypeError, ValueError):
            continue
        if isinstance(rec, dict) and isinstance(rec.get("metadata"), dict):
            cmd = rec["metadata"].get("command")
            if cmd:
                return str(cmd)
    return None


def sniff(path: Path) -> str:
    """What an existing file holds: model, plot, json, dir or other."""
    if path.is_dir():
        return "dir"
    try:
        with open(path, "rb") as f:
            head = f.read(16)
    except OSError:
        return "other"
    if head.startswith(b"\x89PNG") or head.startswith(b"%PDF"):
        return "plot"
    if len(head) >= 9 and head[8:9] == b"{":
        return "model"
    if head.lstrip().startswith((b"{", b"[")):
        try:
            json.loads(path.read_text())
            return "json"
        except (ValueError, UnicodeDecodeError, OSError):
            return "other"
    if head.lstrip().startswith(b"<") and path.suffix == ".svg":
        return "plot"
    return "other"


def _same(a: Path, b: Path) -> bool:
    try:
        if a.exists() and b.exists():
            return os.path.samefile(a, b)
    except OSError:
        pass
    return a.resolve() == b.resolve()


def _protected(inputs) -> list[Path]:
    """Input paths and the files that come with them (sidecars)."""
    out = []
    for p in inputs:
        if not p:
            continue
        p = Path(p)
        out += [p, Path(str(p) + ".json")]
    return out


def _writable_folder(folder: Path, flag: str) -> None:
    if not folder.exists():
        fail(f"{flag}: folder {folder} does not exist; create it first")
    if not folder.is_dir():
        fail(f"{flag}: {folder} is not a folder")
    try:
        fd, tmp = tempfile.mkstemp(prefix=".neuralign-probe-", dir=folder)
    except OSError as exc:
        fail(f"{flag}: cannot write into {folder} ({exc.strerror})")
    os.close(fd)
    os.unlink(tmp)


def check_outputs(outputs: list[Output], inputs=(), *, force: bool = False) -> None:
    """Refuse (one line, before any work) every output that could lose or mix up a file."""
    protected = _protected(inputs)
    seen: dict[Path, str] = {}
    for o in outputs:
        if not o.path:
            continue
        path = Path(o.path)
        if o.kind != "dir" and (str(o.path).endswith(os.sep) or path.is_dir()):
            fail(f"{o.flag} {o.path} is a folder; give a file name")
        for p in protected:
            if _same(path, p) or (p.is_dir() and p.resolve() in path.resolve().parents):
                fail(f"{o.flag} {o.path} is an input of this command; choose another path "
                     "(inputs are never overwritten)")
        key = path.resolve()
        if key in seen:
            fail(f"{o.flag} and {seen[key]} are the same path {o.path}")
        seen[key] = o.flag
        if o.kind != "dir" and path.suffix.lower() not in SUFFIXES[o.kind]:
            fail(f"{o.flag} {o.path}: a {KIND_NAMES[o.kind]} must end with "
                 f"{' or '.join(SUFFIXES[o.kind])}")
        if path.exists() or path.is_symlink():
            have = sniff(path)
            if o.kind == "dir":
                if have != "dir" or any(path.iterdir()):
                    if not force or have != "dir":
                        fail(f"{o.flag} {o.path} exists and is not an empty folder"
                             + ("" if have != "dir" else "; pass --force to write into it"))
            elif have != o.kind:
                fail(f"{o.flag} {o.path} exists and holds a "
                     f"{KIND_NAMES.get(have, 'file of another kind')}, not a "
                     f"{KIND_NAMES[o.kind]}; it is never replaced, choose another path")
            elif not force:
                fail(f"{o.flag} {o.path} exists; pass --force to replace it")
            elif o.kind == "model" and o.command and recorded_command(path) != o.command:
                fail(f"{o.flag} {o.path} exists and is not an output of 'neuralign "
                     f"{o.command}'; --force replaces only those: choose another path")
        _writable_folder(path.parent if o.kind != "dir" or not path.exists() else path,
                         o.flag)


def write_text_atomic(path, text: str) -> None:
    """Write ``text`` through a temp file in the same folder and one rename (mode 0666 & ~umask,
    i.e. 0644 as usual): an interrupt leaves the old file or the new one, never half of it."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "w") as f:
            f.write(text)
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
