"""Atomic file replacement: a file is either the old one or the complete new one, never half.

The new content goes to a temp file in the target's folder (same file system, so ``os.replace``
is one atomic rename), is flushed to disk, then renamed over the target. An exception or a
``KeyboardInterrupt`` before the rename deletes the temp file; Ctrl-C is held back only for the
instants of the rename and of that clean-up, so it cannot strand a temp file or split the two.
Files are created with mode ``0o666 & ~umask`` (0644 under the usual umask 022), as ``open``.
"""

from __future__ import annotations

import contextlib
import os
import secrets
import signal
import threading
from collections.abc import Callable
from pathlib import Path


@contextlib.contextmanager
def sigint_deferred():
    """Hold back SIGINT inside the block and deliver it (KeyboardInterrupt) right after.
    Only the main thread can install handlers; elsewhere (and under a custom handler) this is a
    no-op."""
    if (threading.current_thread() is not threading.main_thread()
            or signal.getsignal(signal.SIGINT) is not signal.default_int_handler):
        yield
        return
    received: list = []
    previous = signal.signal(signal.SIGINT, lambda signum, frame: received.append(signum))
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)
        if received:
            raise KeyboardInterrupt


def temp_path_for(path: Path) -> Path:
    """A new, empty temp file beside ``path`` (hidden, ``.NAME.<random>.tmp``)."""
    for _ in range(100):
        tmp = path.with_name(f".{path.name}.{secrets.token_hex(4)}.tmp")
        try:
            fd = os.open(tmp, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o666)
        except FileExistsError:
            continue
        os.close(fd)
        return tmp
    raise FileExistsError(f"cannot create a temp file beside {path}")


def _fsync_file(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _fsync_dir(folder: Path) -> None:
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def atomic_write(path, write: Callable[[Path], None]) -> Path:
    """Call ``write(tmp)`` to fill a temp file beside ``path``, then rename it over ``path``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp: Path | None = None
    done = False
    try:
        with sigint_deferred():
            tmp = temp_path_for(path)
        mode = tmp.stat().st_mode & 0o777  # 0o666 & ~umask, as the kernel created it
        write(tmp)
        os.chmod(tmp, mode)  # writers that replace the file (safetensors does) may narrow it
        _fsync_file(tmp)
        with sigint_deferred():
            os.replace(tmp, path)
            done = True
        _fsync_dir(path.parent)
    finally:
        if not done and tmp is not None:
            with sigint_deferred():
                tmp.unlink(missing_ok=True)
    return path
