"""TNA-PFN benchmark: LMC barriers with fixed neuron anchors vs random pruning at init.

Reproduces, at CPU scale, the experiments of Li et al. (TNA-PFN):
  A. barrier vs mask ratio rho in {0, 0.1, ..., 0.9}, TNA-PFN and random pruning at
     initialisation of the same ratio (paper Fig. 2); two models from one initialisation trained
     on different data orders ("order") and on disjoint data halves ("halves");
  B. barrier vs MLP width and depth, rho in {0, 0.4} (Fig. 4);
  C. barrier across architectures: MLP, VGG-11, ResNet-20 (Fig. 5);
  D. uniform soup of several fine-tunes of one pre-trained model with and without anchors.
Writes docs/results/tna_pfn.md and PNG plots. One command:  .venv/bin/python benchmarks/tna_pfn.py
(--quick for a smoke run).
"""

from __future__ import annotations

import argparse
import copy
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import Subset, TensorDataset

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

from neuralign.data import load_data, make_loader  # noqa: E402
from neuralign.models import get_model  # noqa: E402
from neuralign.train import evaluate, train  # noqa: E402
from neuralign.train.anchors import FixedNeuronAnchors  # noqa: E402

try:
    from neuralign.landscape import barrier, interpolation_curve  # noqa: E402
except ImportError:  # the package __init__ may not export them yet
    from neuralign.landscape.curves import barrier, interpolation_curve  # noqa: E402

OUT = ROOT / "docs" / "results"
SEEDS = [0, 1, 2]


def downsample(ds: TensorDataset, factor: int) -> TensorDataset:
    x, y = ds.tensors
    if factor > 1:
        x = F.avg_pool2d(x, factor)
    return TensorDataset(x.contiguous(), y)


def two_runs(cfg, data, rho, mode, seed, method="tna"):
    """Train two models from one initialisation; return the barriers between them."""
    torch.manual_seed(1000 + seed)
    init = get_model(cfg["model"], num_classes=10, in_channels=1, image_size=cfg["size"],
                     **cfg["kwargs"])
    train_ds, test_loader = data
    n = len(train_ds)
    if mode == "halves":
        perm = np.random.default_rng(seed).permutation(n)
        parts = [Subset(train_ds, perm[: n // 2].tolist()), Subset(train_ds, perm[n // 2:].tolist())]
    elif mode == "skew":  # label-skewed halves: 80% of classes 0-4 to model A, 80% of 5-9 to B
        y = train_ds.tensors[1].numpy()
        rng = np.random.default_rng(seed)
        to_a = np.where(y < 5, rng.random(n) < 0.8, rng.random(n) < 0.2)
        parts = [Subset(train_ds, np.nonzero(to_a)[0].tolist()),
                 Subset(train_ds, np.nonzero(~to_a)[0].tolist())]
    else:
        parts = [train_ds, train_ds]
    models, accs = [], []
    for k in range(2):
        m = copy.deepcopy(init)
        cbs = []
        if rho > 0:
            cbs = [FixedNeuronAnchors(init, rho, seed=seed, fill=0.0 if method == "prune" else None)]
        loader = make_loader(parts[k], batch_size=cfg["bs"], shuffle=True, seed=10 * seed + k)
        train(m, loader, epochs=cfg["epochs"], lr=cfg["lr"], momentum=0.9, weight_decay=5e-4,
              callbacks=cbs, progress=False, seed=10 * seed + k)
        models.append(m)
        accs.append(evaluate(m, test_loader)["accuracy"])
    bn = make_loader(train_ds, batch_size=256, shuffle=True, seed=seed) if cfg.get("bn") else None
    curve = interpolation_curve(models[0], models[1], test_loader, ts=cfg.get("ts", 9),
                                bn_loader=bn)
    mid = curve.accuracy[len(curve.t) // 2]
    return {"acc_barrier": 100 * barrier(curve, "accuracy"), "loss_barrier": barrier(curve, "loss"),
            "avg_acc": 100 * float(np.mean(accs)), "interp_acc": 100 * mid}


def ms(vals):
    a = np.asarray(vals, dtype=float)
    return f"{a.mean():.2f} ± {a.std():.2f}"


def agg(rows, key):
    return float(np.mean([r[key] for r in rows])), float(np.std([r[key] for r in rows]))


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true", help="tiny smoke run (not for the docs)")
    ap.add_argument("--only", default="", help="comma-separated parts to (re)run, e.g. "
                    "A:skew,B,C,D; the others are read from docs/results/tna_pfn.json "
                    "(--only none re-renders the tables and plots)")
    args = ap.parse_args()
    only = [p for p in args.only.split(",") if p]

    def want(part):
        return not only or part in only
    torch.set_num_threads(1)
    q = args.quick
    t0 = time.time()
    splits = load_data("fashion_mnist", data_seed=0, subset=600 if q else 3000,
                       test_subset=300 if q else 2000)
    full = (splits.train, make_loader(splits.test, batch_size=500))
    small = (downsample(splits.train, 2), make_loader(downsample(splits.test, 2), batch_size=500))
    seeds = SEEDS[:1] if q else SEEDS
    mlp = {"model": "mlp", "size": 28, "kwargs": {"width": 128, "depth": 2}, "bs": 64,
           "epochs": 2 if q else 5, "lr": 0.05}
    res: dict = {"A": {}, "B": {}, "C": {}, "D": {}}
    if only:
        res = json.loads((OUT / "tna_pfn.json").read_text())
        t0 -= res.get("seconds", 0.0)

    # A: rho sweep vs pruning, two settings
    rhos = [0.0, 0.4, 0.8] if q else [round(0.1 * i, 1) for i in range(10)]
    for mode in ["order", "halves", "skew"]:
        if not want(f"A:{mode}"):
            continue
        for method in ["tna", "prune"]:
            for rho in rhos:
                if method == "prune" and rho == 0.0:
                    res["A"][f"{mode}/prune/0.0"] = res["A"][f"{mode}/tna/0.0"]
                    continue
                rows = [two_runs(mlp, full, rho, mode, s, method) for s in seeds]
                res["A"][f"{mode}/{method}/{rho}"] = rows
                print(f"A {mode} {method} rho={rho}: acc barrier {ms([r['acc_barrier'] for r in rows])}"
                      f" ({time.time() - t0:.0f}s)", flush=True)

    # B: width and depth (halves, where barriers are largest)
    for tag, kw in [] if not want("B") else ([("w", {"width": w, "depth": 2}) for w in ([32, 128] if q else [32, 128, 512])]
                    + [("d", {"width": 128, "depth": d}) for d in ([1, 2] if q else [1, 2, 4])]):
        for rho in [0.0, 0.4]:
            cfg = dict(mlp, kwargs=kw)
            rows = [two_runs(cfg, full, rho, "halves", s) for s in seeds]
            key = f"{tag}/{kw['width'] if tag == 'w' else kw['depth']}/{rho}"
            res["B"][key] = rows
            print(f"B {key}: {ms([r['acc_barrier'] for r in rows])} ({time.time() - t0:.0f}s)",
                  flush=True)

    # C: architectures (14x14 inputs for the conv nets to fit the CPU budget)
    archs = {
        "MLP": dict(mlp),
        "VGG-11 (x0.25, BN)": {"model": "vgg11", "size": 14, "kwargs": {"width": 0.25, "norm": "bn"},
                               "bs": 64, "epochs": 2 if q else 4, "lr": 0.05, "bn": True, "ts": 5},
        "ResNet-20 (x1, BN)": {"model": "resnet20", "size": 14, "kwargs": {"width": 1, "norm": "bn"},
                               "bs": 64, "epochs": 1 if q else 3, "lr": 0.05, "bn": True, "ts": 5},
    }
    for name, cfg in archs.items() if want("C") else []:
        data = full if cfg["model"] == "mlp" else small
        if cfg["model"] != "mlp":
            n = 300 if q else 1000
            data = (Subset(data[0], list(range(n))), data[1])
        for rho in [0.0, 0.4]:
            rows = [two_runs(cfg, data, rho, "halves", s) for s in seeds]
            res["C"][f"{name}/{rho}"] = rows
            print(f"C {name} rho={rho}: {ms([r['acc_barrier'] for r in rows])} "
                  f"({time.time() - t0:.0f}s)", flush=True)

    # D: soup of K fine-tunes of one pre-trained MLP (pre-train on classes 0-4, fine-tune on all)
    if want("D"):
        res["D"] = soup_experiment(full, seeds, q)
    print(f"D done ({time.time() - t0:.0f}s)", flush=True)
    res["seconds"] = time.time() - t0
    res["invocations"] = res.get("invocations", []) + [" ".join(["benchmarks/tna_pfn.py", *sys.argv[1:]])]
    write(res, rhos, q)


def soup_experiment(data, seeds, q, k_models=4):
    from neuralign.merge.basic import average

    train_ds, test_loader = data
    y = train_ds.tensors[1]
    pre_idx = torch.nonzero(y < 5).flatten().tolist()
    out = {}
    for rho in [0.0, 0.4]:
        rows = []
        for s in seeds:
            torch.manual_seed(2000 + s)
            base = get_model("mlp", num_classes=10, in_channels=1, image_size=28, width=128, depth=2)
            train(base, make_loader(Subset(train_ds, pre_idx), 64, shuffle=True, seed=s),
                  epochs=1 if q else 3, lr=0.05, progress=False, seed=s)
            fts = []
            for k in range(k_models):
                m = copy.deepcopy(base)
                cbs = [FixedNeuronAnchors(base, rho, seed=s)] if rho > 0 else []
                lr = [0.02, 0.05, 0.1, 0.03][k]
                train(m, make_loader(train_ds, 64, shuffle=True, seed=100 * s + k),
                      epochs=1 if q else 4, lr=lr, callbacks=cbs, progress=False, seed=100 * s + k)
                fts.append(m)
            ind = [100 * evaluate(m, test_loader)["accuracy"] for m in fts]
            soup = 100 * evaluate(average(fts), test_loader)["accuracy"]
            rows.append({"ind_mean": float(np.mean(ind)), "ind_best": float(np.max(ind)),
                         "soup": soup})
        out[str(rho)] = rows
    return out


def write(res, rhos, q):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    OUT.mkdir(parents=True, exist_ok=True)
    (OUT / "tna_pfn.json").write_text(json.dumps(res, indent=1))
    L = ["# TNA-PFN: fixed neuron anchors and linear mode connectivity", "",
         "Generated by `.venv/bin/python benchmarks/tna_pfn.py`" + (" --quick (SMOKE RUN)" if q else "")
         + f" in {res['seconds'] / 60:.1f} min on CPU (1 thread; invocations: "
         + ", ".join(f"`{i}`" for i in res.get("invocations", [])) + "). Mean ± std over "
         f"{len(next(iter(res['A'].values())))} seeds. Barriers are measured on a class-balanced "
         "2,000-image Fashion-MNIST test subset along the straight line between the two models "
         "(accuracy barrier = mean end-point accuracy − lowest accuracy on the path, in points; "
         "loss barrier = highest loss − mean end-point loss; `neuralign.landscape.barrier`, "
         "Frankle definition).", "",
         "**Scale (reduced from the paper):** 3,000 class-balanced training images; MLP 784-128-128-10, "
         "SGD (lr 0.05, momentum 0.9, wd 5e-4, cosine), batch 64, 5 epochs. Both models start from "
         "one initialisation and share the anchor mask (same seed); they differ in data order "
         "(`order`), see disjoint random halves of the data (`halves`), or see label-skewed halves "
         "(`skew`: model A gets 80 % of the images of classes 0-4 and 20 % of classes 5-9, model B "
         "the rest). Pruning baseline: the same random "
         "mask, the masked weights set to zero and kept there (random pruning at initialisation). "
         "Architectures: VGG-11 (width ×0.25, BN) and ResNet-20 (×1, BN) on 1,000 images downsampled "
         "to 14×14, 4 and 3 epochs, BN statistics reset on training data at every interpolation "
         "point, 5 interpolation points.", ""]
    for mode in [m for m in ["order", "halves", "skew"] if f"{m}/tna/0.0" in res["A"]]:
        L += [f"## A. Barrier vs mask ratio ρ ({mode})", "",
              "| ρ | TNA-PFN acc. barrier | pruning acc. barrier | TNA-PFN loss barrier | "
              "pruning loss barrier | TNA-PFN avg acc | pruning avg acc | TNA-PFN interp acc | "
              "pruning interp acc |", "|" + "---|" * 9]
        for rho in rhos:
            t, p = res["A"][f"{mode}/tna/{rho}"], res["A"][f"{mode}/prune/{rho}"]
            L.append(f"| {rho} | " + " | ".join(ms([r[k] for r in rows]) for k in
                     ["acc_barrier", "loss_barrier", "avg_acc", "interp_acc"] for rows in (t, p)) + " |")
        L.append("")
    L += ["## B. Barrier vs MLP width and depth (halves)", "",
          "| MLP | ρ=0 acc. barrier | ρ=0.4 acc. barrier | ρ=0 avg acc | ρ=0.4 avg acc |", "|---|---|---|---|---|"]
    keys = sorted({k.rsplit("/", 1)[0] for k in res["B"]}, key=lambda s: (s[0], int(s.split("/")[1])))
    for k in keys:
        a, b = res["B"][f"{k}/0.0"], res["B"][f"{k}/0.4"]
        label = f"width {k.split('/')[1]}, depth 2" if k[0] == "w" else f"width 128, depth {k.split('/')[1]}"
        L.append(f"| {label} | {ms([r['acc_barrier'] for r in a])} | {ms([r['acc_barrier'] for r in b])} | "
                 f"{ms([r['avg_acc'] for r in a])} | {ms([r['avg_acc'] for r in b])} |")
    L += ["", "## C. Barrier across architectures (halves)", "",
          "| model | ρ=0 acc. barrier | ρ=0.4 acc. barrier | ρ=0 loss barrier | ρ=0.4 loss barrier | "
          "ρ=0 avg acc | ρ=0.4 avg acc |", "|---|---|---|---|---|---|---|"]
    names = list(dict.fromkeys(k.rsplit("/", 1)[0] for k in res["C"]))
    for n in names:
        a, b = res["C"][f"{n}/0.0"], res["C"][f"{n}/0.4"]
        L.append(f"| {n} | " + " | ".join(ms([r[k] for r in rows]) for k in
                 ["acc_barrier", "loss_barrier", "avg_acc"] for rows in (a, b)) + " |")
    L += ["", "## D. Uniform soup of 4 fine-tunes (MLP pre-trained on classes 0-4, fine-tuned on all "
          "classes with lr 0.02/0.05/0.1/0.03 and different data orders)", "",
          "| anchors | mean individual acc | best individual acc | soup acc |", "|---|---|---|---|"]
    for rho, rows in res["D"].items():
        L.append(f"| ρ={rho} | {ms([r['ind_mean'] for r in rows])} | {ms([r['ind_best'] for r in rows])}"
                 f" | {ms([r['soup'] for r in rows])} |")
    L += ["", "Plots: `tna_pfn_rho.png` (A), `tna_pfn_width_depth.png` (B), `tna_pfn_arch.png` (C). "
          "Raw numbers: `tna_pfn.json`.", ""]
    (OUT / "tna_pfn.md").write_text("\n".join(L))

    modes = [m for m in ["order", "halves", "skew"] if f"{m}/tna/0.0" in res["A"]]
    fig, axes = plt.subplots(1, len(modes), figsize=(5 * len(modes), 3.8), squeeze=False)
    for ax, mode in zip(axes[0], modes):
        for method, c in [("tna", "C0"), ("prune", "C3")]:
            m = np.array([agg(res["A"][f"{mode}/{method}/{r}"], "acc_barrier") for r in rhos])
            ax.errorbar(rhos, m[:, 0], yerr=m[:, 1], color=c, marker="o", capsize=3,
                        label="TNA-PFN" if method == "tna" else "random pruning at init")
        ax.set(title=f"accuracy barrier ({mode})", xlabel="mask ratio ρ", ylabel="barrier (points)")
        ax.legend()
    fig.tight_layout()
    fig.savefig(OUT / "tna_pfn_rho.png", dpi=110)
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.8))
    for ax, tag, lab in [(axes[0], "w", "width"), (axes[1], "d", "depth")]:
        ks = [k for k in keys if k[0] == tag]
        xs = [int(k.split("/")[1]) for k in ks]
        for rho, c in [(0.0, "C3"), (0.4, "C0")]:
            m = np.array([agg(res["B"][f"{k}/{rho}"], "acc_barrier") for k in ks])
            ax.errorbar(xs, m[:, 0], yerr=m[:, 1], marker="o", color=c, capsize=3, label=f"ρ={rho}")
        ax.set(xlabel=f"MLP {lab}", ylabel="accuracy barrier (points)", xscale="log" if tag == "w" else "linear")
        ax.minorticks_off()
        ax.set_xticks(xs, [str(v) for v in xs])
        ax.legend()
    fig.tight_layout()
    fig.savefig(OUT / "tna_pfn_width_depth.png", dpi=110)
    fig, ax = plt.subplots(figsize=(6, 3.8))
    x = np.arange(len(names))
    for j, (rho, c) in enumerate([(0.0, "C3"), (0.4, "C0")]):
        m = np.array([agg(res["C"][f"{n}/{rho}"], "acc_barrier") for n in names])
        ax.bar(x + (j - 0.5) * 0.35, m[:, 0], 0.35, yerr=m[:, 1], color=c, capsize=3, label=f"ρ={rho}")
    ax.set_xticks(x, names, fontsize=8)
    ax.set(ylabel="accuracy barrier (points)")
    ax.legend()
    fig.tight_layout()
    fig.savefig(OUT / "tna_pfn_arch.png", dpi=110)


if __name__ == "__main__":
    main()
