"""Simulated annealing (Entezari et al., 2022) beside weight matching on the Entezari MLP.

One hidden layer of width w (ReLU) on Fashion-MNIST; for each width, three models (seeds 0, 1, 2)
give three seed pairs. For each pair, B is aligned to A by (i) nothing, (ii) simulated annealing
over permutations of the hidden units minimising the barrier directly
(:func:`neuralign.align.annealing_matching`, Entezari's objective: the loss of the midpoint
minus the end points' mean, on a fixed batch of training images), (iii) weight matching. The
barrier of each is then measured on the official 10,000 test images along 11 points of the path.

    .venv/bin/python benchmarks/annealing.py            # -> docs/results/annealing.md + .png
    .venv/bin/python benchmarks/annealing.py --quick    # smoke run, nothing written to docs

Trained MLPs are cached under ~/.cache/neuralign/annealing (``NEURALIGN_CACHE`` overrides).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

import numpy as np
import torch
import torch.nn.functional as F

from neuralign.align import weight_matching
from neuralign.align.annealing import annealing_matching
from neuralign.data import load_data
from neuralign.data.core import make_loader
from neuralign.landscape import barrier
from neuralign.merge import interpolate
from neuralign.models import get_model
from neuralign.permute import apply_permutation
from neuralign.spec import Permutation, spec_from_model
from neuralign.train import train

OUT = ROOT / "docs" / "results"
CACHE = Path(os.environ.get("NEURALIGN_CACHE", Path.home() / ".cache" / "neuralign")) / "annealing"
FULL = dict(widths=(32, 64, 128, 256, 512), epochs=5, lr=0.05, sa_steps=2000, sa_batch=2000,
            points=11, seeds=(0, 1, 2))
QUICK = dict(FULL, widths=(32,), epochs=1, sa_steps=50, sa_batch=256, points=3, seeds=(0, 1))


def trained(width, seed, splits, cfg, log):
    path = CACHE / f"mlp1x{width}_e{cfg['epochs']}_lr{cfg['lr']}_seed{seed}.pt"
    m = get_model("mlp", num_classes=10, in_features=784, width=width, depth=1, seed=seed)
    if path.exists():
        m.load_state_dict(torch.load(path, weights_only=True))
        return m.eval()
    t0 = time.time()
    train(m, make_loader(splits.train, 128, shuffle=True, seed=seed), epochs=cfg["epochs"],
          lr=cfg["lr"], progress=False, seed=seed)
    CACHE.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    torch.save(m.state_dict(), tmp)
    tmp.replace(path)
    log(f"width {width} seed {seed}: trained in {time.time() - t0:.0f} s")
    return m.eval()


@torch.no_grad()
def _eval(model, x, y):
    out = model(x)
    return float(F.cross_entropy(out, y)), float((out.argmax(1) == y).float().mean())


def curve(a, b, x, y, points):
    ts = np.linspace(0, 1, points).round(4).tolist()
    loss, acc = zip(*(_eval(interpolate(a, b.state_dict(), t), x, y) for t in ts))
    return {"t": ts, "loss": list(loss), "accuracy": list(acc)}


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--render", action="store_true",
                    help="rewrite annealing.md/.png from the committed annealing.json (no training)")
    args = ap.parse_args()
    if args.render:
        rows = json.loads((OUT / "annealing.json").read_text())
        old = re.search(r"; ([0-9.]+) min in all\)", (OUT / "annealing.md").read_text())
        write(rows, FULL, float(old.group(1)) * 60 if old else None)
        return
    cfg = QUICK if args.quick else FULL
    torch.set_num_threads(1)
    t_start = time.time()

    def log(msg):
        print(f"[{time.time() - t_start:6.0f}s] {msg}", flush=True)

    splits = load_data("fashion_mnist", data_seed=0)
    xt, yt = splits.test.tensors
    xs, ys = splits.train.tensors
    g = torch.Generator().manual_seed(7)
    idx = torch.randperm(len(xs), generator=g)[: cfg["sa_batch"]]
    xsa, ysa = xs[idx], ys[idx]

    def sa_loss(model):
        return _eval(model, xsa, ysa)[0]

    rows = []
    for w in cfg["widths"]:
        models = [trained(w, s, splits, cfg, log) for s in cfg["seeds"]]
        spec = spec_from_model(models[0], xt[:2])
        pairs = [(i, j) for i in range(len(models)) for j in range(i + 1, len(models))]
        for i, j in pairs:
            a, b = models[i], models[j]
            for method in ("naive", "annealing", "weight"):
                t0 = time.time()
                if method == "naive":
                    perm = Permutation.identity(spec)
                elif method == "weight":
                    perm = weight_matching(spec, a, b, seed=i)
                else:
                    perm = annealing_matching(spec, a, b, sa_loss, steps=cfg["sa_steps"],
                                              ts=(0.5,), seed=i)
                secs = time.time() - t0
                c = curve(a, apply_permutation(b, perm, spec), xt, yt, cfg["points"])
                row = {"width": w, "pair": [i, j], "method": method, "time_s": secs,
                       "loss_barrier": barrier(c, "loss", "entezari"),
                       "acc_barrier": barrier(c, "accuracy", "entezari"),
                       "acc_ends": [c["accuracy"][0], c["accuracy"][-1]], "curve": c}
                if method == "annealing":
                    row["sa"] = {k: perm.info[k] for k in ("barrier_init", "barrier", "accepted",
                                                          "steps", "evaluations")}
                rows.append(row)
                log(f"w={w:4d} pair {i}-{j} {method:9s}: test loss barrier "
                    f"{row['loss_barrier']:.4f}, acc barrier {row['acc_barrier']:.4f} "
                    f"({secs:.1f} s)")
        if not args.quick:
            write(rows, cfg, time.time() - t_start)
    log("done")


def _ms(v):
    v = np.asarray(v, dtype=np.float64)
    return f"{v.mean():.4f} ± {v.std():.4f}"


def _paired(rows, w, m, ref="weight", key="loss_barrier"):
    """Mean and standard error of ``m - ref`` over the pairs (same models, same test set)."""
    by = {(tuple(r["pair"]), r["method"]): r[key] for r in rows if r["width"] == w}
    d = np.array([by[(p, m)] - by[(p, ref)] for p, mm in by if mm == m], dtype=np.float64)
    se = d.std(ddof=1) / np.sqrt(len(d)) if len(d) > 1 else float("nan")
    return d.mean(), se, len(d)


def write(rows, cfg, wall):
    OUT.mkdir(parents=True, exist_ok=True)
    widths = sorted({r["width"] for r in rows})
    methods = ("naive", "annealing", "weight")
    lines = ["# Simulated annealing vs weight matching (Entezari MLP)", "",
             f"Generated by `benchmarks/annealing.py` ({time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}, "
             f"{platform.machine()}, 1 torch thread on a shared 2-core CPU, niced; "
             + (f"{wall / 60:.1f} min in all)." if wall is not None else
                "re-rendered from annealing.json).") + "",
             "",
             "MLP with one hidden ReLU layer of width w on Fashion-MNIST (55,000 training "
             f"images, 5,000 held out), {cfg['epochs']} epochs SGD lr {cfg['lr']} (cosine), batch "
             f"128; models from seeds {list(cfg['seeds'])}, all pairs. Alignment of B onto A: "
             "none (naive), simulated annealing over the hidden units' permutation "
             f"(`annealing_matching`: {cfg['sa_steps']} swap proposals, geometric cooling, "
             "energy = Entezari's objective, the loss of the midpoint minus the end points' "
             f"mean on a fixed batch of {cfg['sa_batch']} training images), weight matching. "
             "Barriers: Entezari definition (height above the straight line between the end "
             f"points) on the official 10,000 test images, {cfg['points']} points on the path; "
             "accuracy barrier in accuracy (fraction) units. Mean ± std over the pairs.", "",
             "| width | method | test loss barrier | test acc barrier | time (s) |",
             "|---|---|---|---|---|"]
    for w in widths:
        for m in methods:
            rs = [r for r in rows if r["width"] == w and r["method"] == m]
            lines.append(f"| {w} | {m} | {_ms([r['loss_barrier'] for r in rs])} | "
                         f"{_ms([r['acc_barrier'] for r in rs])} | "
                         f"{_ms([r['time_s'] for r in rs])} |")
    lines += ["", "Paired differences to weight matching (same pair of models, same test set), mean "
              "± standard error over the pairs. The pairs share models (all pairs of the seeds), "
              "so they are not independent and the SE is indicative; a difference is called "
              "resolved when it exceeds 2 SE.", "",
              "| width | SA - WM (test loss barrier) | naive - WM | SA vs WM |", "|---|---|---|---|"]
    for w in widths:
        d, se, n = _paired(rows, w, "annealing")
        dn, sen, _ = _paired(rows, w, "naive")
        verdict = ("WM lower" if d > 2 * se else "SA lower" if d < -2 * se else "not resolved")
        lines.append(f"| {w} | {d:+.4f} ± {se:.4f} (n={n}) | {dn:+.4f} ± {sen:.4f} | {verdict} |")
    ends = [a for r in rows if r["method"] == "naive" for a in r["acc_ends"]]
    lines += ["", f"End-point test accuracy over all widths: {min(ends):.4f} to {max(ends):.4f}.",
              "", "SA's own objective on its training batch (start -> best found, mean over "
              "pairs), and accepted moves:", "",
              "| width | SA barrier start | SA barrier best | accepted / proposals |",
              "|---|---|---|---|"]
    for w in widths:
        rs = [r["sa"] for r in rows if r["width"] == w and r["method"] == "annealing"]
        lines.append(f"| {w} | {np.mean([s['barrier_init'] for s in rs]):.4f} | "
                     f"{np.mean([s['barrier'] for s in rs]):.4f} | "
                     f"{np.mean([s['accepted'] for s in rs]):.0f} / "
                     f"{np.mean([s['steps'] for s in rs]):.0f} |")
    lines += ["", "![barrier vs width](annealing.png)", ""]
    (OUT / "annealing.md").write_text("\n".join(lines))
    (OUT / "annealing.json").write_text(json.dumps(
        [{k: v for k, v in r.items() if k != "curve"} for r in rows], indent=1))
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5.5, 3.5))
    for m in methods:
        v = [[r["loss_barrier"] for r in rows if r["width"] == w and r["method"] == m]
             for w in widths]
        ax.errorbar(widths, [np.mean(x) for x in v], yerr=[np.std(x) for x in v], marker="o",
                    label=m, capsize=3)
    ax.set_xscale("log", base=2)
    ax.set_xlabel("hidden width")
    ax.set_ylabel("test loss barrier (Entezari)")
    ax.set_title("1-hidden-layer MLP, Fashion-MNIST")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(OUT / "annealing.png", dpi=110)


if __name__ == "__main__":
    main()
