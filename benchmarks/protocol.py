"""The one protocol every fine-tuning benchmark shares (issue 17).

Why: with one learning rate for all, a method whose per-layer rates are <= 1 moves less and
"which layers" is confounded with "how far"; with different selection budgets or splits the
ordering measures the budget. So every benchmark here:

* gives every method that has a learning rate the SAME grid (``Protocol.lr_grid``, 4-5 points)
  and so the same number of selection runs; a method without one (no fine-tuning, batch-norm
  adaptation only) runs once. A method that selects internally (cross-validation over blocks,
  criticality's pre-tuning epochs) keeps its candidates, and they are counted in its compute;
* selects, per seed, the grid point with the best accuracy on the split its paper prescribes
  (``SELECTION``: target validation for automatic fine-tuning, training-domain validation for
  SHERPA / DomainBed, in-distribution validation for LEVI), never on test;
* runs >= 5 seeds (``DEFAULT_SEEDS``) and reports each method as the paired difference to a
  baseline, per seed, with the standard error of that difference (``paired_differences``,
  ``paired_table``);
* reports compute as runs x epochs (``Selected.runs``, ``Selected.epochs``);
* caches pre-trained backbones under ``~/.cache/neuralign`` (``NEURALIGN_CACHE`` overrides),
  keyed by a hash of their configuration, written atomically, never in git
  (``cached_backbone``), and stores finished runs so a benchmark resumes (``ResultStore``).

The per-seed unit, :func:`run_seed`, is a plain function of picklable arguments (module-level
method functions or ``functools.partial``), so seeds can be mapped over worker processes.
"""

from __future__ import annotations

import math
import sys
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))  # the helpers beside it
from _cache import (  # noqa: F401 - re-exported: the benchmarks use them as protocol.*
    ResultStore,
    _atomic_write_bytes,
    cache_root,
    cached_backbone,
    config_key,
    file_digest,
)

SELECTION = {
    "target_val": "target validation (automatic fine-tuning: Agarwala et al., Lee et al.)",
    "train_domain_val": "training-domain validation (SHERPA; DomainBed)",
    "id_val": "in-distribution validation (LEVI)",
}
PAPER_SELECTION = {"auto_finetune": "target_val", "sherpa": "train_domain_val",
                   "levi": "id_val"}
DEFAULT_SEEDS = (0, 1, 2, 3, 4)


@dataclass(frozen=True)
class Protocol:
    """What every method of one benchmark shares."""

    name: str
    lr_grid: tuple[float, ...]
    selection: str
    epochs: int
    seeds: tuple[int, ...] = DEFAULT_SEEDS
    bn: str = "train"
    report: str = "test"

    def __post_init__(self) -> None:
        if self.selection not in SELECTION:
            raise ValueError(f"selection must be one of {sorted(SELECTION)}, "
                             f"got {self.selection!r}")
        if not self.lr_grid or any(lr <= 0 for lr in self.lr_grid):
            raise ValueError(f"lr_grid must be positive rates, got {self.lr_grid}")
        if len(set(self.lr_grid)) != len(self.lr_grid):
            raise ValueError(f"lr_grid has repeated rates: {self.lr_grid}")
        if self.epochs < 1 or not self.seeds:
            raise ValueError("a protocol needs epochs >= 1 and at least one seed")

    def describe(self) -> list[str]:
        """Markdown bullet lines stating the protocol (for a results file)."""
        grid = ", ".join(f"{lr:g}" for lr in self.lr_grid)
        return [
            f"- Learning-rate grid, the same for every method that has a rate: {grid} "
            f"({len(self.lr_grid)} selection runs per method and seed).",
            f"- Selection: the grid point with the best {SELECTION[self.selection]} "
            "accuracy, per seed; never on test.",
            f"- Seeds: {', '.join(map(str, self.seeds))} ({len(self.seeds)}); results are paired "
            "differences to the baseline on the same seed, mean ± standard error.",
            f"- Batch-norm policy for every method: `bn={self.bn!r}` "
            "(`neuralign.finetune.bn`).",
            f"- Compute: runs × epochs per seed ({self.epochs} epochs per run unless stated).",
        ]


@dataclass
class Run:
    """One training run at one learning rate: accuracies on named splits and its cost."""

    lr: float | None
    scores: dict[str, float]
    epochs: int
    runs: int = 1
    extra_epochs: int = 0  # e.g. criticality's pre-tuning epochs
    info: dict[str, Any] = field(default_factory=dict)


@dataclass
class Method:
    """A row: ``fn(lr, seed, task) -> Run``; ``tuned=False``: no learning rate, one run."""

    label: str
    fn: Callable[[float | None, int, Any], Run]
    tuned: bool = True


@dataclass
class Selected:
    """One method on one seed after selection."""

    label: str
    seed: int
    chosen: Run
    candidates: list[Run]

    @property
    def runs(self) -> int:
        return sum(r.runs for r in self.candidates)

    @property
    def epochs(self) -> int:
        """Total epochs trained (every candidate, internal candidates included)."""
        return sum(r.epochs * r.runs + r.extra_epochs for r in self.candidates)

    def score(self, split: str) -> float:
        return self.chosen.scores[split]

    def to_json(self) -> dict[str, Any]:
        return {"label": self.label, "seed": self.seed, "chosen": asdict(self.chosen),
                "candidates": [asdict(r) for r in self.candidates]}

    @classmethod
    def from_json(cls, d: Mapping[str, Any]) -> Selected:
        return cls(d["label"], int(d["seed"]), Run(**d["chosen"]),
                   [Run(**r) for r in d["candidates"]])


def select(runs: Sequence[Run], split: str) -> Run:
    """The run with the best accuracy on ``split`` (ties: the earlier grid point)."""
    if not runs:
        raise ValueError("nothing to select from")
    missing = [r.lr for r in runs if split not in r.scores]
    if missing:
        raise KeyError(f"runs at lr {missing} have no {split!r} score to select on")
    best = runs[0]
    for r in runs[1:]:
        if r.scores[split] > best.scores[split]:
            best = r
    return best


def run_method(protocol: Protocol, method: Method, seed: int, task: Any) -> Selected:
    """Every grid point (or the single run of an untuned method), then selection."""
    lrs: Iterable[float | None] = protocol.lr_grid if method.tuned else (None,)
    runs = [_attempt(protocol, method, lr, seed, task) for lr in lrs]
    chosen = select(runs, protocol.selection)
    if "diverged" in chosen.info:
        raise RuntimeError(f"{method.label}, seed {seed}: training diverged at every rate of "
                           f"the grid {list(lrs)}; lower the grid")
    return Selected(method.label, seed, chosen, runs)


def _attempt(protocol: Protocol, method: Method, lr, seed: int, task: Any) -> Run:
    """One grid point; a run that diverges is a failed candidate (validation score -1, never
    selected while any rate trains), as in any grid search, not the end of the benchmark."""
    from neuralign.errors import NeuralignError

    try:
        return method.fn(lr, seed, task)
    except NeuralignError as exc:
        if not str(exc).startswith("training diverged"):
            raise
        return Run(lr=lr, scores={protocol.selection: -1.0}, epochs=protocol.epochs,
                   info={"diverged": str(exc)})


def run_seed(protocol: Protocol, methods: Sequence[Method], seed: int, task: Any,
             store: ResultStore | None = None, key: str = "") -> dict[str, Selected]:
    """The per-seed unit: every method on one seed (resuming from ``store`` when given)."""
    out = {}
    for m in methods:
        k = f"{protocol.name}|{key}|{seed}|{m.label}"
        if store is not None and k in store:
            out[m.label] = Selected.from_json(store[k])
            continue
        out[m.label] = run_method(protocol, m, seed, task)
        if store is not None:
            store[k] = out[m.label].to_json()
    return out


def _seed_unit(protocol: Protocol, methods: Sequence[Method], seed: int, task: Any, key: str,
               shard: str, prior: dict[str, Any]) -> dict[str, Any]:
    """Worker side of :func:`run_seeds`: one (task, seed) unit into its own shard store (so a
    killed worker resumes method by method), returned as plain store entries."""
    store = ResultStore(shard)
    for k, v in prior.items():
        if k not in store:
            store.data[k] = v
    run_seed(protocol, methods, seed, task, store=store, key=key)
    return store.data


def run_seeds(protocol: Protocol, jobs: Sequence[tuple[str, int, Sequence[Method], Any]],
              store: ResultStore, workers: int | None = None,
              log: Callable[[str], None] = print, export: Path | str | None = None) -> None:
    """:func:`run_seed` for every ``(key, seed, methods, task)`` job, in ``workers`` processes
    with one torch thread each (default: the cores this process may use; 1 runs in-process).

    Each job writes its finished methods to a shard file next to ``store`` as it goes; the
    parent folds a finished job into ``store`` and removes its shard, so an interrupted run
    resumes (from ``store`` and from the shards) instead of restarting. ``export``: also rewrite
    this copy of the finished runs (:meth:`ResultStore.export`, the committed file) after every
    job, so a run cut short still leaves its finished units where a later machine finds them.
    Methods and tasks must be picklable (module-level functions, ``functools.partial``)."""
    import multiprocessing as mp
    from concurrent.futures import ProcessPoolExecutor, as_completed

    from _parallel import _init_worker, available_cores

    shard_dir = store.path.with_suffix(".shards")
    t0 = time.perf_counter()
    todo = []
    for key, seed, methods, task in jobs:
        keys = [f"{protocol.name}|{key}|{seed}|{m.label}" for m in methods]
        if all(k in store for k in keys):
            continue
        shard = shard_dir / f"{key.replace('/', '_')}-{seed}.json"
        prior = {k: store[k] for k in keys if k in store}
        todo.append((key, seed, methods, task, str(shard), prior))
    if len(todo) < len(jobs):
        log(f"[{protocol.name}] {len(jobs) - len(todo)} of {len(jobs)} units from {store.path}")

    def fold(key, seed, data, shard):
        store.update(data)
        if export is not None:
            store.export(export)
        Path(shard).unlink(missing_ok=True)
        log(f"[{protocol.name}] {key} seed {seed} done ({time.perf_counter() - t0:.0f} s)")

    workers = available_cores() if workers is None else workers
    workers = max(1, min(workers, len(todo)))
    if not todo:
        return
    shard_dir.mkdir(parents=True, exist_ok=True)
    if workers == 1:
        for key, seed, methods, task, shard, prior in todo:
            fold(key, seed, _seed_unit(protocol, methods, seed, task, key, shard, prior), shard)
        return
    with ProcessPoolExecutor(workers, mp_context=mp.get_context("spawn"),
                             initializer=_init_worker, initargs=(1,)) as pool:
        futs = {pool.submit(_seed_unit, protocol, methods, seed, task, key, shard, prior):
                (key, seed, shard) for key, seed, methods, task, shard, prior in todo}
        for fut in as_completed(futs):
            key, seed, shard = futs[fut]
            fold(key, seed, fut.result(), shard)


# --------------------------------------------------------------------------- statistics


@dataclass(frozen=True)
class Paired:
    """Mean paired difference to the baseline over ``n`` seeds and its standard error."""

    mean: float
    se: float
    n: int
    diffs: tuple[float, ...]


def paired_differences(per_seed: Mapping[str, Mapping[int, float]], baseline: str
                       ) -> dict[str, Paired]:
    """Per method, ``d_s = acc_method(s) − acc_baseline(s)`` over the seeds both have; the mean
    of ``d`` and its standard error ``sd(d, ddof=1) / sqrt(n)`` (nan for one seed)."""
    if baseline not in per_seed:
        raise KeyError(f"baseline {baseline!r} has no results")
    base = per_seed[baseline]
    out = {}
    for name, accs in per_seed.items():
        seeds = sorted(set(accs) & set(base))
        d = [float(accs[s]) - float(base[s]) for s in seeds]
        n = len(d)
        mean = sum(d) / n if n else float("nan")
        se = (math.sqrt(sum((x - mean) ** 2 for x in d) / (n - 1)) / math.sqrt(n)
              if n > 1 else float("nan"))
        out[name] = Paired(mean, se, n, tuple(d))
    return out


def compare(per_seed: Mapping[str, Mapping[int, float]], a: str, b: str) -> Paired:
    """The paired difference ``a − b`` over the seeds both have."""
    return paired_differences({a: per_seed[a], b: per_seed[b]}, b)[a]


def verdict(p: Paired, z: float = 2.0) -> str:
    """``"appears"`` when the difference is > z standard errors above 0, ``"reversed"`` when
    below −z SE, ``"not resolved"`` otherwise (or with fewer than 2 seeds)."""
    if p.n < 2 or p.se != p.se:
        return "not resolved (fewer than 2 seeds)"
    if p.se == 0:
        return "appears" if p.mean > 0 else ("reversed" if p.mean < 0 else "not resolved")
    t = p.mean / p.se
    return "appears" if t > z else ("reversed" if t < -z else "not resolved")


def _pct(x: float, signed: bool = False) -> str:
    if x != x:  # nan
        return "–"
    return f"{100 * x:+.1f}" if signed else f"{100 * x:.1f}"


def paired_table(columns: Mapping[str, Mapping[str, Mapping[int, float]]], baseline: str,
                 methods: Sequence[str] | None = None,
                 compute: Mapping[str, str] | None = None) -> str:
    """A markdown table: per column (task), the method's mean accuracy and its paired
    difference to ``baseline`` ± SE (percentage points); ``compute`` adds a last column."""
    names = list(methods) if methods is not None else list(
        dict.fromkeys(m for col in columns.values() for m in col))
    head = ["Method"]
    for c in columns:
        head += [f"{c}: acc", f"{c}: Δ vs {baseline} ± SE"]
    if compute is not None:
        head.append("compute (runs × epochs per seed)")
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    paired = {c: paired_differences(per, baseline) if baseline in per else {}
              for c, per in columns.items()}
    for m in names:
        cells = [m]
        for c, per in columns.items():
            accs = per.get(m, {})
            mean = sum(accs.values()) / len(accs) if accs else float("nan")
            p = paired[c].get(m)
            if p is None or p.n == 0:
                delta = "–"
            elif m == baseline:
                delta = "(baseline)"
            else:
                delta = f"{_pct(p.mean, True)} ± {_pct(p.se)} (n={p.n})"
            cells += [_pct(mean), delta]
        if compute is not None:
            cells.append(compute.get(m, "–"))
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def compute_cell(selected: Sequence[Selected]) -> str:
    """``runs × epochs`` per seed of one method (mean over its seeds)."""
    if not selected:
        return "–"
    runs = sum(s.runs for s in selected) / len(selected)
    epochs = sum(s.epochs for s in selected) / len(selected)
    return f"{runs:g} runs, {epochs:g} epochs"
