"""Linear mode connectivity before and after alignment (Git Re-Basin, Fig. 2 protocol, scaled
down to a shared 2-core CPU).

Two MLPs (3x512) and two ResNet-20s (BN) trained from different seeds on Fashion-MNIST; loss and
accuracy barriers (Frankle and Entezari definitions) along the linear path from A to B, for
naive interpolation and for B aligned by weight matching, activation matching (correlation and
cross-covariance) and the straight-through estimator. Three seed pairs, mean +- std. Also the
rate at which weight matching recovers a planted permutation of a *trained* ResNet-20 over 20
seeds, without and with the remedies (random restarts; initialisation from activation matching).

    .venv/bin/python benchmarks/lmc_alignment.py            # full (CPU-scale) run
    .venv/bin/python benchmarks/lmc_alignment.py --quick    # smoke test, a minute

Writes docs/results/lmc_alignment.md, .json and .png.
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from pathlib import Path

import numpy as np
import torch

from neuralign.align import activation_matching, ste_matching, weight_matching
from neuralign.data import load_data
from neuralign.landscape import barrier
from neuralign.merge import interpolate, reset_bn
from neuralign.models import get_model
from neuralign.permute import apply_permutation, random_permutation
from neuralign.spec import Permutation, spec_from_model
from neuralign.train import evaluate, train

OUT = Path(__file__).resolve().parents[1] / "docs" / "results"
STEM = "lmc_alignment"
METHODS = ["naive", "weight", "act-corr", "act-cov", "ste"]
FULL = {
    "mlp": dict(model="mlp", kw=dict(width=512, depth=3), subset=20000, epochs=10, lr=0.05,
                test=2000, points=11, act_batches=20, ste=dict(epochs=1), bn_batches=0),
    "resnet20": dict(model="resnet20", kw=dict(width=1, norm="bn"), subset=3000, epochs=4,
                     lr=0.1, test=500, points=5, act_batches=8, ste=dict(max_steps=25),
                     bn_batches=4),
}
QUICK = {
    "mlp": dict(FULL["mlp"], subset=1000, epochs=1, test=300, points=3, act_batches=2,
                ste=dict(max_steps=3)),
    "resnet20": dict(FULL["resnet20"], subset=300, epochs=1, test=100, points=3, act_batches=1,
                     ste=dict(max_steps=2), bn_batches=1),
}
SEEDS = (0, 1, 2)  # three models per architecture; pairs (0,1), (0,2), (1,2)
PAIRS = ((0, 1), (0, 2), (1, 2))


def _curve(a, b, test_loader, bn_loader, ts, bn_batches, ends):
    loss, acc = [], []
    for t in ts:
        if t == 0.0 or t == 1.0:
            r = ends[int(t)]
        else:
            m = interpolate(a, b.state_dict(), t)
            if bn_batches:
                m = reset_bn(m, bn_loader, max_batches=bn_batches)
            r = evaluate(m, test_loader)
        loss.append(float(r["loss"]))
        acc.append(float(r["accuracy"]))
    return {"t": list(ts), "loss": loss, "accuracy": acc}


def run_arch(name, cfg, log):
    splits = load_data("fashion_mnist", data_seed=0, subset=cfg["subset"], test_subset=cfg["test"])
    train_loader = lambda s: splits.loader("train", batch_size=128, shuffle=True, seed=s)
    test_loader = splits.loader("test", batch_size=500)
    act_loader = [b for _, b in zip(range(cfg["act_batches"]), train_loader(99))]
    bn_loader = splits.loader("train", batch_size=128, shuffle=True, seed=7)
    models = []
    for s in SEEDS:
        torch.manual_seed(s)
        m = get_model(cfg["model"], num_classes=10, in_channels=1, image_size=28, **cfg["kw"])
        t0 = time.time()
        train(m, train_loader(s), epochs=cfg["epochs"], lr=cfg["lr"], weight_decay=5e-4,
              progress=False, seed=s)
        m.eval()
        log(f"{name} seed {s}: trained in {time.time() - t0:.0f} s, "
            f"test acc {evaluate(m, test_loader)['accuracy']:.4f}")
        models.append(m)
    x = next(iter(test_loader))[0][:2]
    spec = spec_from_model(models[0], x)
    ts = np.linspace(0, 1, cfg["points"]).round(4).tolist()
    res = {m: [] for m in METHODS}
    for i, j in PAIRS:
        a, b = models[i], models[j]
        ends = {0: evaluate(a, test_loader), 1: evaluate(b, test_loader)}
        for method in METHODS:
            t0 = time.time()
            if method == "naive":
                perm = Permutation.identity(spec)
            elif method == "weight":
                perm = weight_matching(spec, a, b, seed=i)
            elif method.startswith("act"):
                perm = activation_matching(a, b, act_loader, method=method[4:], spec=spec)
            else:
                perm = ste_matching(spec, a, b, train_loader(5), lr=1e-3, optimizer="adam",
                                    seed=i, **cfg["ste"])
            secs = time.time() - t0
            bb = apply_permutation(b, perm, spec)
            curve = _curve(a, bb, test_loader, bn_loader, ts, cfg["bn_batches"], ends)
            row = {"pair": [SEEDS[i], SEEDS[j]], "time_s": secs, "curve": curve}
            for kind in ("loss", "accuracy"):
                for d in ("frankle", "entezari"):
                    row[f"{kind}_{d}"] = barrier(curve, kind, d)
            res[method].append(row)
            log(f"{name} pair {i}-{j} {method}: loss barrier {row['loss_frankle']:.4f}, acc "
                f"barrier {row['accuracy_frankle']:.4f} ({secs:.1f} s)")
    return models, spec, res, act_loader


def recovery(models, spec, act_loader, n_seeds, log):
    """Planted permutations of trained models: how often weight matching finds them exactly."""
    out = {"plain": 0, "restarts3": 0, "act_init": 0, "n": n_seeds}
    for s in range(n_seeds):
        a = models[s % len(models)]
        b = apply_permutation(a, random_permutation(spec, 1000 + s), spec)
        sa = a.state_dict()

        def exact(p):
            sb = apply_permutation(b, p, spec).state_dict()
            return max((sa[k].float() - sb[k].float()).abs().max().item() for k in sa) < 1e-6

        out["plain"] += exact(weight_matching(spec, a, b, seed=s))
        out["restarts3"] += exact(weight_matching(spec, a, b, seed=s, restarts=3))
        init = activation_matching(a, b, act_loader[:2], spec=spec)
        out["act_init"] += exact(weight_matching(spec, a, b, seed=s, init=init))
    log(f"recovery over {n_seeds} seeds: {out}")
    return out


def _ms(v):
    v = np.asarray(v, dtype=np.float64)
    return f"{v.mean():.4f} ± {v.std():.4f}"


def write(results, cfgs, quick, wall):
    OUT.mkdir(parents=True, exist_ok=True)
    lines = ["# Linear mode connectivity after alignment", "",
             f"Generated by `benchmarks/lmc_alignment.py {' '.join(sys.argv[1:])}` "
             f"({time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}, {platform.machine()}, "
             f"{torch.get_num_threads()} torch thread(s), {wall / 60:.1f} min in all).", "",
             "**Scaled-down protocol (shared 2-core CPU, no GPU).** Fashion-MNIST, class-balanced "
             "training subsets; three models per architecture (seeds 0, 1, 2) give the three seed "
             "pairs (0,1), (0,2), (1,2). Barriers on a class-balanced test subset; interior points "
             "of the path of the BN ResNet get their batch-norm statistics reset on training "
             "batches (Git Re-Basin / REPAIR practice). Loss barrier: Frankle = max_t L(t) - "
             "mean(L(0), L(1)); Entezari = max_t [L(t) - ((1-t)L(0) + tL(1))]. Accuracy barriers "
             "are the same on accuracy, sign flipped (a drop is positive). Mean ± std over the "
             "three pairs.", ""]
    for name, (res, rec) in results.items():
        c = cfgs[name]
        lines += [f"## {name} ({c['kw']})", "",
                  f"Training: {c['subset']} images, {c['epochs']} epochs, SGD lr {c['lr']} "
                  f"(cosine), batch 128. Test subset {c['test']} images, {c['points']} points on "
                  f"the path. Activation matching: {c['act_batches']} batches of 128 training "
                  f"images. STE: Adam 1e-3, {c['ste']}.", "",
                  "| method | loss barrier (Frankle) | loss barrier (Entezari) | acc barrier "
                  "(Frankle) | acc barrier (Entezari) | acc at t=0.5 | align time (s) |",
                  "|---|---|---|---|---|---|---|"]
        for m, rows in res.items():
            mid = [r["curve"]["accuracy"][len(r["curve"]["t"]) // 2] for r in rows]
            lines.append(f"| {m} | {_ms([r['loss_frankle'] for r in rows])} | "
                         f"{_ms([r['loss_entezari'] for r in rows])} | "
                         f"{_ms([r['accuracy_frankle'] for r in rows])} | "
                         f"{_ms([r['accuracy_entezari'] for r in rows])} | {_ms(mid)} | "
                         f"{_ms([r['time_s'] for r in rows])} |")
        ends = [r["curve"]["accuracy"][0] for r in res["naive"]] + [
            r["curve"]["accuracy"][-1] for r in res["naive"]]
        naive = np.mean([r["loss_frankle"] for r in res["naive"]])
        wm = np.mean([r["loss_frankle"] for r in res["weight"]])
        lines += ["", f"End-point test accuracy: {_ms(ends)}. Loss barrier naive / weight "
                  f"matching: {naive / max(wm, 1e-12):.1f}x.", ""]
        if rec:
            lines += [f"Planted-permutation recovery on the trained {name} models "
                      f"({rec['n']} seeds, exact = all weights within 1e-6): plain weight "
                      f"matching {rec['plain']}/{rec['n']}, with 3 random restarts "
                      f"{rec['restarts3']}/{rec['n']}, initialised from activation matching "
                      f"{rec['act_init']}/{rec['n']}.", ""]
    lines += [f"![interpolation curves]({STEM}.png)", ""]
    (OUT / f"{STEM}.md").write_text("\n".join(lines))
    (OUT / f"{STEM}.json").write_text(json.dumps(
        {k: {"results": v[0], "recovery": v[1], "config": {kk: str(vv) for kk, vv in
                                                            cfgs[k].items()}}
         for k, v in results.items()}, indent=1))
    plot(results)


def plot(results):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(2, len(results), figsize=(5 * len(results), 7), squeeze=False)
    for col, (name, (res, _)) in enumerate(results.items()):
        for row, kind in enumerate(("loss", "accuracy")):
            ax = axes[row, col]
            for m, rows in res.items():
                t = rows[0]["curve"]["t"]
                v = np.array([r["curve"][kind] for r in rows])
                ax.plot(t, v.mean(0), marker="o", ms=3, label=m)
                ax.fill_between(t, v.mean(0) - v.std(0), v.mean(0) + v.std(0), alpha=0.15)
            ax.set_title(f"{name}: test {kind}")
            ax.set_xlabel("t (0 = model A, 1 = aligned model B)")
            ax.grid(alpha=0.3)
        axes[0, col].legend()
    fig.tight_layout()
    fig.savefig(OUT / f"{STEM}.png", dpi=110)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--only", choices=list(FULL), default=None)
    ap.add_argument("--recovery-seeds", type=int, default=20)
    ap.add_argument("--tag", default="", help="suffix of the output files (lmc_alignment_TAG.*)")
    ap.add_argument("--set", action="append", default=[], metavar="KEY=INT",
                    help="override a setting of the selected architectures, e.g. subset=2000, "
                    "epochs=3, test=300, bn_batches=2, ste_steps=15")
    args = ap.parse_args()
    torch.set_num_threads(1)
    cfgs = {k: dict(v) for k, v in (QUICK if args.quick else FULL).items()}
    for item in args.set:
        key, val = item.split("=", 1)
        for name in cfgs:
            if args.only in (None, name):
                if key == "ste_steps":
                    cfgs[name]["ste"] = {"max_steps": int(val)}
                else:
                    cfgs[name][key] = int(val)
    global STEM
    STEM = "lmc_alignment" + (f"_{args.tag}" if args.tag else "")
    t0 = time.time()

    def log(msg):
        print(f"[{time.time() - t0:6.0f}s] {msg}", flush=True)

    results = {}
    for name, cfg in cfgs.items():
        if args.only and name != args.only:
            continue
        models, spec, res, act_loader = run_arch(name, cfg, log)
        rec = recovery(models, spec, act_loader, 3 if args.quick else args.recovery_seeds, log)
        results[name] = (res, rec)
        write(results, cfgs, args.quick, time.time() - t0)
    log("done")


if __name__ == "__main__":
    main()
