"""Run a benchmark's independent units (one seed, one model, ...) in worker processes, one torch
thread each, and cache every finished unit so that a rerun resumes where the last one stopped.

    from _parallel import run_units          # benchmarks/ is the script's folder, so this imports

    def unit(u):                             # module level (workers import it); returns JSON
        torch.manual_seed(u["seed"])
        ...
        return {"accuracy": acc}

    if __name__ == "__main__":
        units = [{"model": m, "seed": s} for m in ("mlp", "vgg11") for s in range(3)]
        rows = run_units(unit, units, name="my_benchmark")   # rows[i] is unit(units[i])

* ``workers`` defaults to the CPU cores this process may use (``os.sched_getaffinity``);
  ``workers=1`` runs in this process (handy with a debugger). Workers start with ``spawn``, so
  the script needs the ``if __name__ == "__main__"`` guard and ``fn`` must be a module-level
  function.
* Each worker sets ``torch.set_num_threads(threads)`` (default 1): N single-thread processes use
  N cores better than one process with N threads for small models, and timings measured inside
  one unit stay comparable with each other.
* Cache: ``$NEURALIGN_CACHE/benchmarks/<name>/<unit key>.json`` (default
  ``~/.cache/neuralign``), written atomically when the unit finishes. A unit whose file exists
  is not run again; change ``version`` (or pass ``rerun=True``, CLI ``--rerun``) when the code
  that computes a unit changes.
"""

from __future__ import annotations

import hashlib
import json
import multiprocessing as mp
import os
import re
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ProcessPoolExecutor, as_completed
from pathlib import Path


def cache_root() -> Path:
    return Path(os.environ.get("NEURALIGN_CACHE", Path.home() / ".cache" / "neuralign"))


def available_cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # pragma: no cover - macOS
        return os.cpu_count() or 1


def unit_key(unit: dict, version: str = "") -> str:
    """A readable, stable file name for a unit: its values, then a short hash of everything."""
    blob = json.dumps([unit, version], sort_keys=True, default=str)
    readable = re.sub(r"[^A-Za-z0-9_.=-]+", "_", "-".join(f"{k}={v}" for k, v in unit.items()))
    return f"{readable[:80]}-{hashlib.sha1(blob.encode()).hexdigest()[:10]}"


def _init_worker(threads: int) -> None:
    os.environ["OMP_NUM_THREADS"] = str(threads)
    import torch

    torch.set_num_threads(threads)


def _write(path: Path, result) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(f".tmp{os.getpid()}")
    tmp.write_text(json.dumps(result, indent=1))
    tmp.replace(path)


def run_units(fn: Callable[[dict], object], units: Sequence[dict], *, name: str,
              workers: int | None = None, threads: int = 1, version: str = "",
              rerun: bool = False, log: Callable[[str], None] = print) -> list:
    """``[fn(u) for u in units]``, computed in parallel worker processes and cached per unit."""
    folder = cache_root() / "benchmarks" / name
    paths = [folder / f"{unit_key(u, version)}.json" for u in units]
    results: list = [None] * len(units)
    todo = []
    for i, p in enumerate(paths):
        if p.exists() and not rerun:
            results[i] = json.loads(p.read_text())
        else:
            todo.append(i)
    if len(todo) < len(units):
        log(f"[{name}] {len(units) - len(todo)} of {len(units)} units from the cache {folder}")
    workers = available_cores() if workers is None else workers
    workers = max(1, min(workers, len(todo)))
    t0 = time.perf_counter()

    def done(i, res):
        results[i] = res
        _write(paths[i], res)
        log(f"[{name}] done {units[i]} ({time.perf_counter() - t0:.0f} s)")

    if workers == 1:
        _init_worker(threads)
        for i in todo:
            done(i, fn(units[i]))
        return results
    ctx = mp.get_context("spawn")
    with ProcessPoolExecutor(workers, mp_context=ctx, initializer=_init_worker,
                             initargs=(threads,)) as pool:
        futures = {pool.submit(fn, units[i]): i for i in todo}
        for fut in as_completed(futures):
            done(futures[fut], fut.result())
    return results


def pool_map(fn: Callable, items: Sequence, *, workers: int | None = None,
             threads: int = 1) -> list:
    """``[fn(x) for x in items]`` in worker processes (one torch thread each, results in order),
    uncached: for steps whose products are objects (models) rather than JSON rows. In this
    process when there is at most one item or one worker."""
    workers = max(1, min(available_cores() if workers is None else workers, len(items)))
    if workers == 1:
        return [fn(x) for x in items]
    with ProcessPoolExecutor(workers, mp_context=mp.get_context("spawn"),
                             initializer=_init_worker, initargs=(threads,)) as pool:
        return list(pool.map(fn, items))
