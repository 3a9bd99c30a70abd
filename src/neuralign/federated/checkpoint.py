"""Per-round checkpoints of a federated run, ``--resume`` and ``--init``.

After every completed round the server writes ``<checkpoint-dir>/last.safetensors``: the global
model (a neuralign checkpoint, loadable with ``neuralign.io.load_model``) whose metadata holds
the round, the whole history so far and the run config; one atomic rename, so a crash leaves the
previous round's checkpoint or this one, never half of either. ``history.json`` beside it is the
same history for people. ``resume`` continues after the checkpoint's round, refusing a checkpoint
of another run (a different strategy, task or seed).
"""

from __future__ import annotations

import json
import math
from pathlib import Path

from neuralign.errors import NeuralignError

CHECKPOINT = "last.safetensors"
HISTORY = "history.json"
KEY = "federated_checkpoint"
# settings a resumed run may change: where things go, how long to wait, how many rounds
FREE_KEYS = frozenset({"num-rounds", "resume", "init", "checkpoint-dir", "save-model",
                       "round-timeout", "node-timeout", "min-replies", "task.output",
                       "task.fail-partitions"})


def _norm(cfg: dict) -> dict:
    return json.loads(json.dumps({k: v for k, v in dict(cfg).items() if k not in FREE_KEYS},
                                 default=str, sort_keys=True))


def json_safe(obj):
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {k: json_safe(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [json_safe(v) for v in obj]
    return obj


def write_checkpoint(directory, model, hist: dict, run_config: dict) -> Path:
    """Write the global ``model`` and ``hist`` after round ``hist['round'][-1]``."""
    from neuralign.io import atomic_write, save_model

    d = Path(directory)
    d.mkdir(parents=True, exist_ok=True)
    clean = json_safe({k: v for k, v in hist.items() if not k.startswith("_")})
    meta = {"command": "federate", KEY: {"round": int(hist["round"][-1]), "history": clean,
                                         "run_config": _norm(run_config)}}
    path = save_model(model, d / CHECKPOINT, metadata=meta)
    text = json.dumps(clean, indent=1, allow_nan=False)
    atomic_write(d / HISTORY, lambda tmp: Path(tmp).write_text(text))
    return path


def read_checkpoint(directory, run_config: dict) -> tuple[dict, dict] | None:
    """``(state_dict, history)`` of the last completed round, or None when there is none;
    a one-line error when the checkpoint belongs to another run."""
    from neuralign.io import load_state_dict, read_record

    p = Path(directory) / CHECKPOINT
    if not p.is_file():
        return None
    rec = read_record(p).get("metadata", {}).get(KEY)
    if not isinstance(rec, dict):
        raise NeuralignError(f"{p} is not a checkpoint of a federated run")
    saved, now = rec.get("run_config", {}), _norm(run_config)
    diff = sorted(k for k in set(saved) | set(now) if saved.get(k) != now.get(k))
    if diff:
        k = diff[0]
        raise NeuralignError(f"{p} belongs to another run: {k} was {saved.get(k)!r}, now "
                             f"{now.get(k)!r}; resume with the same settings or use another "
                             "--checkpoint-dir")
    hist = rec["history"]
    for key in ("accuracy", "loss"):
        hist[key] = [float("nan") if v is None else float(v) for v in hist[key]]
    return load_state_dict(p), hist


def check_fresh(directory) -> None:
    """A new (not resumed) run must not overwrite another run's checkpoint."""
    p = Path(directory) / CHECKPOINT
    if p.is_file():
        raise NeuralignError(f"{directory} already holds a checkpoint ({p.name}); continue that "
                             "run with resume (--resume), or use another --checkpoint-dir")


def load_init(path, model) -> dict:
    """The state dict at ``path`` if it fits ``model`` exactly (names and shapes), else a
    one-line error naming the first mismatch."""
    from neuralign.io import load_state_dict

    try:
        sd = dict(load_state_dict(path))
    except NeuralignError as exc:
        raise NeuralignError(f"--init {path}: {exc}") from None
    want = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    have = {k: tuple(v.shape) for k, v in sd.items()}
    missing, extra = sorted(set(want) - set(have)), sorted(set(have) - set(want))
    hint = ("; give the --model / -m options (width, depth, ...) the checkpoint was trained "
            "with, or another --init")
    if missing or extra:
        what = (f"lacks {missing[0]!r}" if missing else f"has {extra[0]!r}, which the model "
                "lacks")
        raise NeuralignError(f"--init {path} does not fit the task's model: it {what} "
                             f"({len(missing)} missing, {len(extra)} unexpected){hint}")
    bad = [k for k in want if want[k] != have[k]]
    if bad:
        k = bad[0]
        raise NeuralignError(f"--init {path} does not fit the task's model: {k} is "
                             f"{list(have[k])} there and {list(want[k])} in the model{hint}")
    return sd
