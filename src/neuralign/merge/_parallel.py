"""Merging the tensors of a checkpoint on several cores: each worker thread merges whole tensors
with one torch intra-op thread, and the results come back in order for the writer."""

from __future__ import annotations

import os
from collections import deque
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor

import torch

__all__ = ["default_workers", "ordered"]


def default_workers() -> int:
    """Tensors merged at once by default: one per idle CPU core (the cores less the 1-minute
    load average, rounded), at least 1 and at most 4 (memory grows with it). On a busy machine
    extra workers only compete for the same cores (a linear merge measured slower with 2
    workers than with 1 on 2 busy cores)."""
    cores = os.cpu_count() or 1
    try:
        busy = int(os.getloadavg()[0] + 0.5)
    except OSError:  # no load average on this platform
        busy = 0
    return max(1, min(4, cores - busy))


def ordered(fn: Callable[[str], torch.Tensor], keys: list[str], workers: int
            ) -> Iterator[tuple[str, torch.Tensor]]:
    """``(k, fn(k))`` for ``keys`` in order. With ``workers > 1`` the calls run in that many
    threads, each with one torch intra-op thread (the cores work on different tensors instead
    of synchronising on every elementwise op), at most ``workers`` tensors ahead of the one
    handed out. With one worker the calls run here, also on one intra-op thread."""
    # One torch intra-op thread throughout (torch's thread count is process-wide; restored at
    # the end): on a core another process keeps busy, OpenMP's barrier after every chunk waits
    # for the preempted thread (a 1.1B linear merge took 62 s with 2 threads, 8.5 s with 1).
    prev = torch.get_num_threads()
    torch.set_num_threads(1)
    ex = ThreadPoolExecutor(workers) if workers > 1 else None
    try:
        if ex is None:
            for k in keys:
                yield k, fn(k)
            return
        pending: deque = deque()
        it = iter(keys)
        for k in it:
            pending.append((k, ex.submit(fn, k)))
            if len(pending) >= workers:
                break
        while pending:
            k, fut = pending.popleft()
            res = fut.result()
            for nxt in it:
                pending.append((nxt, ex.submit(fn, nxt)))
                break
            yield k, res
    finally:
        if ex is not None:
            ex.shutdown(wait=True, cancel_futures=True)
        torch.set_num_threads(prev)
