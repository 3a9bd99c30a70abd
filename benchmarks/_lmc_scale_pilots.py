"""The measurements behind lmc_scale's choices (``--throughput``, ``--pilot``,
``--pilot-epochs``): the statistics passes against plain forwards, seconds per training step by
image size, and test accuracy by number of epochs."""

from __future__ import annotations

import json
import time

import numpy as np
import torch
import torch.nn.functional as F
from lmc_scale import (
    SEEDS,
    _setting,
    build,
    cache_dir,
    data,
    fit_batches,
    git_revision,
    load,
    model_path,
    settings,
    train_one,
)

from neuralign.align import activation_statistics
from neuralign.evaluation import predict
from neuralign.io import atomic_write
from neuralign.merge import interpolate, repair
from neuralign.spec import spec_from_model


def _timed(fn) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def throughput(args, log, repeats: int = 5) -> dict:
    """Wall time of the matching statistics pass (two models) and of REPAIR (two end points +
    the merged model) against plain forward passes of the same models over the same batches;
    one ratio per repeat, the order alternated between repeats."""
    cfg = settings(args.smoke)["resnet20x1-bn"]
    paths = [model_path(args, "resnet20x1-bn", cfg, s) for s in SEEDS[:2]]
    recs = [torch.load(p, weights_only=False) for p in paths] if all(
        p.exists() for p in paths) else None
    a, b = ((load(recs[0], cfg), load(recs[1], cfg)) if recs else
            (build(cfg, 0).eval(), build(cfg, 1).eval()))
    train_ds, _ = data(cfg["image"], args.smoke)
    fit = fit_batches(train_ds, args.smoke)
    spec = spec_from_model(a, fit[0][0][:2])
    merged = interpolate(a, b, 0.5)
    plain2 = lambda: [predict(m, fit) for m in (a, b)]
    plain3 = lambda: [predict(m, fit) for m in (a, b, merged)]
    stats = lambda: activation_statistics(a, b, fit, spec)
    rep = lambda: repair(a, b, merged, fit, 0.5)
    stats(), rep(), plain3()  # warm-up
    out = {"stats": [], "plain2": [], "repair": [], "plain3": []}
    for r in range(repeats):
        pairs = [("stats", stats), ("plain2", plain2), ("repair", rep), ("plain3", plain3)]
        for key, fn in (pairs if r % 2 == 0 else pairs[::-1]):
            out[key].append(_timed(fn))
    out.update(images=sum(len(x) for x, _ in fit), batches=len(fit), model="resnet20x1-bn",
               trained=bool(recs), repeats=repeats, threads=torch.get_num_threads(),
               revision=git_revision())
    log(f"throughput: {json.dumps({k: np.round(v, 3).tolist() for k, v in out.items() if isinstance(v, list)})}")
    atomic_write(cache_dir(args) / "throughput.json",
                 lambda tmp: tmp.write_text(json.dumps(out, indent=1)))
    return out


def pilot(args, log) -> dict:
    """Seconds per 128-image training step of ResNet-20x1 (BN) at several image sizes: the
    measurement behind the choice of 14 px."""
    out = {}
    for size in (28, 20, 14):
        cfg = _setting("resnet20", {"width": 1, "norm": "bn"}, size, 1, 0.05, "pilot", 1)
        m = build(cfg, 0).train()
        opt = torch.optim.SGD(m.parameters(), lr=0.01, momentum=0.9)
        x = torch.randn(128, 1, size, size).contiguous(memory_format=torch.channels_last)
        y = torch.randint(0, 10, (128,))
        times = []
        for i in range(2 if args.smoke else 8):
            t0 = time.perf_counter()
            loss = F.cross_entropy(m(x), y)
            opt.zero_grad()
            loss.backward()
            opt.step()
            times.append(time.perf_counter() - t0)
        out[size] = float(np.median(times[1:]))
        log(f"pilot: {size} px, {out[size] * 1000:.0f} ms per step")
    atomic_write(cache_dir(args) / "pilot.json", lambda tmp: tmp.write_text(json.dumps(out)))
    return out


def pilot_epochs(args, spec: str, log) -> None:
    """``SETTING:E1,E2,..``: train seed 0 of SETTING for each number of epochs (each a full
    cosine schedule) and record the final training loss and test accuracy, to see where
    longer training stops paying. Cached per run in ``pilot_epochs.json``."""
    name, _, eps = spec.partition(":")
    cfg0 = settings(args.smoke)[name]
    path = cache_dir(args) / "pilot_epochs.json"
    done = json.loads(path.read_text()) if path.exists() else {}
    for e in [int(x) for x in eps.split(",")]:
        key = f"{name}:{e}"
        if key in done:
            continue
        cfg = dict(cfg0, epochs=e)
        rec = train_one(args, f"pilot-{name}-e{e}", cfg, 0, log)
        done[key] = {"setting": name, "epochs": e, "train_loss": rec["history"][-1]["train_loss"],
                     "train_accuracy": rec["history"][-1]["train_accuracy"],
                     "test": rec["test"], "seconds": rec["seconds"]}
        atomic_write(path, lambda tmp: tmp.write_text(json.dumps(done, indent=1)))
