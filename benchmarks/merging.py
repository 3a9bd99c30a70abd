"""Benchmark: merging two independently trained models (issue 5), at CPU scale.

One command: ``.venv/bin/python benchmarks/merging.py`` -> docs/results/merging.md + PNG plots.
Trained end points are cached under /tmp/neuralign_merging_cache (not in git), so re-runs are
cheap. Scale (see the results file): Fashion-MNIST subsets, few epochs, narrow VGG-11.
Options: --quick (one seed pair, tiny subsets), --resnet-widths 1,2 --train-only.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

from neuralign.align import activation_matching, weight_matching
from neuralign.data import load_data, make_loader
from neuralign.landscape import barrier, interpolation_curve
from neuralign.merge import average, ot_fusion, repair, reset_bn
from neuralign.merge._util import evaluate
from neuralign.models import get_model
from neuralign.permute import apply_permutation
from neuralign.spec import spec_from_model
from neuralign.train import train

CACHE = Path(os.environ.get("NEURALIGN_CACHE", "/tmp/neuralign_merging_cache"))
OUT = ROOT / "docs" / "results"
TS = [0.0, 0.5, 1.0]
RESULTS = OUT / "merging.md"


def log(*a):
    print(time.strftime("%H:%M:%S"), *a, flush=True)


def configs(resnet_widths, ln_lr=0.02):
    cfg = {"mlp": ("mlp", dict(in_features=196, width=512, depth=3), 0.05)}
    cfg["vgg11-bn"] = ("vgg11", dict(norm="bn", width=0.25, in_channels=1, image_size=14), 0.05)
    for w in resnet_widths:
        cfg[f"resnet20x{w}-bn"] = ("resnet20", dict(width=w, norm="bn", in_channels=1), 0.05)
        cfg[f"resnet20x{w}-ln"] = ("resnet20", dict(width=w, norm="ln", in_channels=1), ln_lr)
    return cfg


def trained(key, cfg, seed, splits, epochs):
    name, kw, lr = cfg
    suffix = f"_lr{lr}" if key.endswith("-ln") and lr != 0.02 else ""
    path = CACHE / f"{key}_s{seed}_e{epochs}_n{len(splits.train)}{suffix}.pt"
    torch.manual_seed(seed)
    model = get_model(name, num_classes=10, **kw)
    if path.exists():
        model.load_state_dict(torch.load(path))
        return model.eval()
    t = time.time()
    train(model, splits.loader("train", batch_size=128, shuffle=True, seed=seed), epochs=epochs,
          lr=lr, weight_decay=5e-4, progress=False, seed=seed)
    CACHE.mkdir(parents=True, exist_ok=True)
    torch.save(model.state_dict(), path)
    log(f"trained {key} seed {seed} in {time.time() - t:.0f}s")
    return model.eval()


def align(method, a, b, loader):
    if method == "naive":
        return b
    spec = spec_from_model(a, next(iter(loader))[0][:2])
    if method == "weight":
        perm = weight_matching(spec, a, b, seed=0)
    else:
        perm = activation_matching(a, b, loader, method="corr", spec=spec)
    return apply_permutation(b, perm, spec)


def downsample(ds):
    x, y = ds.tensors
    return torch.utils.data.TensorDataset(torch.nn.functional.avg_pool2d(x, 2), y)


def plot_curves(*a, **k):
    from neuralign.landscape.plots import plot_curves as f
    return f(*a, **k)


def pair_results(a, b, fit_loader, test_loader, is_bn):
    """Curves of plain interpolation (+BN reset for BN nets) and with REPAIR, per alignment."""
    rows, curves = {}, {}
    for method in ("naive", "weight", "activation"):
        bb = align(method, a, b, fit_loader)
        plain = interpolation_curve(a, bb, test_loader, TS)
        curves[(method, "plain")] = plain
        if is_bn:
            curves[(method, "bn-reset")] = interpolation_curve(a, bb, test_loader, TS, bn_loader=fit_loader)
        curves[(method, "repair")] = interpolation_curve(
            a, bb, test_loader, TS, transform=lambda m, t, bb=bb: repair(a, bb, m, fit_loader, t)
            if 0 < t < 1 else m)
    for k, c in curves.items():
        rows[k] = {"mid_acc": c.accuracy[TS.index(0.5)], "acc_barrier": barrier(c, "accuracy"),
                   "loss_barrier": barrier(c, "loss"),
                   "loss_barrier_entezari": barrier(c, "loss", "entezari"),
                   "end_acc": 0.5 * (c.accuracy[0] + c.accuracy[-1])}
    return rows, curves


def cached_results(name):
    path = CACHE / f"results_{name}.json"
    if not path.exists():
        return []
    return [{tuple(k.split("|")): v for k, v in r.items()} for r in json.loads(path.read_text())]


def save_results(name, per):
    CACHE.mkdir(parents=True, exist_ok=True)
    (CACHE / f"results_{name}.json").write_text(json.dumps([{"|".join(k): v for k, v in r.items()} for r in per]))


def fmt(vals, scale=1.0, nd=1):
    v = np.asarray(vals, dtype=float) * scale
    return f"{v.mean():.{nd}f} ± {v.std():.{nd}f}" if len(v) > 1 else f"{v.mean():.{nd}f}"


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--train-only", action="store_true")
    ap.add_argument("--resnet-widths", default="1")
    ap.add_argument("--pairs", type=int, default=3)
    ap.add_argument("--epochs", type=int, default=2)
    ap.add_argument("--subset", type=int, default=4000)
    ap.add_argument("--only", default="")
    ap.add_argument("--no-paths", action="store_true")
    ap.add_argument("--analysis", action="store_true", help="CKA / L2 / Kendall-tau / surface plots (MLP pair 0)")
    ap.add_argument("--ln-lr", type=float, default=0.02)
    ap.add_argument("--out", default="merging.md", help="results file name under docs/results")
    args = ap.parse_args()
    torch.set_num_threads(1)
    if args.quick:
        args.pairs, args.subset, args.epochs = 1, 1000, 1
    splits = load_data("fashion_mnist", data_seed=0, subset=args.subset, test_subset=1000)
    splits.train, splits.test = downsample(splits.train), downsample(splits.test)
    splits.val = downsample(splits.val)
    fit = torch.utils.data.TensorDataset(*[t[:1000] for t in splits.train.tensors])
    fit_loader = make_loader(fit, batch_size=250)
    test_loader = make_loader(splits.test, batch_size=500)
    cfgs = configs([int(w) for w in args.resnet_widths.split(",") if w], args.ln_lr)
    if args.only:
        cfgs = {k: v for k, v in cfgs.items() if k in args.only.split(",")}
    n_models = {k: 2 * args.pairs for k in cfgs}
    if "vgg11-bn" in n_models:
        n_models["vgg11-bn"] = max(6, 2 * args.pairs)
    models = {k: [trained(k, cfgs[k], s, splits, args.epochs) for s in range(n_models[k])] for k in cfgs}
    if args.train_only:
        return
    OUT.mkdir(parents=True, exist_ok=True)
    lines = ["# Merging benchmark (Fashion-MNIST, CPU scale)", "",
             f"Command: `.venv/bin/python benchmarks/merging.py {' '.join(sys.argv[1:])}`", "",
             f"Scale: images average-pooled to 14×14; {len(splits.train)} training images (class-balanced subset), {args.epochs} epochs "
             "of SGD (momentum 0.9, cosine, wd 5e-4), test on 1,000 test images, BN reset / REPAIR / "
             "activation matching on 1,000 training images. VGG-11 at 1/4 width (16-128 channels) "
             f"and ResNet-20 widths {args.resnet_widths} (LN nets trained with lr {args.ln_lr}) because of the 2-core CPU. "
             f"{args.pairs} seed pairs (mean ± std). Barriers are computed on 3-point curves "
             "(t = 0, .5, 1: the midpoint): accuracy barrier = mean end-point accuracy - min accuracy "
             "(Frankle, survey Eq. 2, sign flipped), loss barrier both Eq. 2 and Eq. 7 (Entezari).", ""]
    lines += ["## Two-model merging: alignment × correction", "",
              "| model | alignment | correction | end-point acc % | midpoint acc % | acc barrier (pts) "
              "| loss barrier (Eq. 2) | loss barrier (Eq. 7) |", "|---|---|---|---|---|---|---|---|"]
    tag = f"e{args.epochs}_n{args.subset}_lnlr{args.ln_lr}"
    global RESULTS
    RESULTS = OUT / args.out
    for key in cfgs:
        is_bn = key.endswith("-bn")
        per = cached_results(f"{key}_{tag}")[: args.pairs]
        for p in range(len(per), args.pairs):
            a, b = models[key][2 * p], models[key][2 * p + 1]
            rows, curves = pair_results(a, b, fit_loader, test_loader, is_bn)
            per.append(rows)
            if p == 0:
                plot_curves({f"{m} / {c}": cu for (m, c), cu in curves.items()}, OUT / f"merging_{key}{'' if args.ln_lr == 0.02 or not key.endswith('-ln') else '_lr' + str(args.ln_lr)}.png",
                            kind="accuracy", title=f"{key}: test accuracy along the path")
            log(f"{key} pair {p} done: " + ", ".join(f"{m}/{c} {r['mid_acc']:.3f}" for (m, c), r in rows.items()))
            save_results(f"{key}_{tag}", per)
        for k in per[0]:
            vals = {f: [r[k][f] for r in per] for f in per[0][k]}
            lines.append(f"| {key} | {k[0]} | {k[1]} | {fmt(vals['end_acc'], 100)} | {fmt(vals['mid_acc'], 100)} | "
                         f"{fmt(vals['acc_barrier'], 100)} | {fmt(vals['loss_barrier'], 1, 3)} | "
                         f"{fmt(vals['loss_barrier_entezari'], 1, 3)} |")
        _write(lines)
    if "vgg11-bn" in cfgs:
        lines += _cached_lines(f"ot_{tag}_p{args.pairs}", lambda: _ot_section(models["vgg11-bn"], fit_loader, test_loader, args))
        _write(lines)
    if "mlp" in cfgs and args.analysis:
        lines += _analysis_section(models["mlp"], fit_loader, test_loader)
        _write(lines)
    if "mlp" in cfgs and not args.no_paths:
        lines += _cached_lines(f"paths_{tag}_p{args.pairs}", lambda: _paths_section(models["mlp"], splits, test_loader, args))
        _write(lines)
    log("done")


def _ot_section(vggs, fit_loader, test_loader, args):
    lines = ["", "## OT fusion vs vanilla averaging of VGG-11 (BN, 1/4 width)", "",
             "Models 0-5 (seeds 0-5). For J models, three groups are fused (each with a different "
             "reference model: the J models starting at 0, 2, 4 cyclically); weight-based ground "
             "cost (Singh & Jaggi); BN statistics reset on 1,000 training images after fusion for "
             "both methods.", "",
             "| J | individual acc % | vanilla avg % | OT fusion % | OT fusion (activation cost) % |",
             "|---|---|---|---|---|"]
    for J in (2, 4, 6):
        ind, van, otw, ota = [], [], [], []
        for g in range(3):
            group = [vggs[(2 * g + i) % len(vggs)] for i in range(J)]
            ind.append(np.mean([evaluate(m, test_loader)["accuracy"] for m in group]))
            van.append(evaluate(reset_bn(average(group), fit_loader), test_loader)["accuracy"])
            otw.append(evaluate(reset_bn(ot_fusion(group).model, fit_loader), test_loader)["accuracy"])
            ota.append(evaluate(reset_bn(ot_fusion(group, ground="activation", loader=fit_loader).model,
                                         fit_loader), test_loader)["accuracy"])
        lines.append(f"| {J} | {fmt(ind, 100)} | {fmt(van, 100)} | {fmt(otw, 100)} | {fmt(ota, 100)} |")
        log(f"OT J={J} done")
    return lines


def _paths_section(mlps, splits, test_loader, args):
    lines = ["", "## Non-linear mode connectivity (MLP 3×512, no alignment)", "",
             "Max test loss on the path vs the straight line (Garipov et al. Bezier / one-bend "
             "polygonal chain trained on the training subset; AutoNEB after Draxler et al.).", "",
             "| path | max loss on path | straight line max loss | loss barrier (Eq. 2) |", "|---|---|---|---|"]
    from neuralign.landscape.paths import autoneb, fit_curve

    train_loader = splits.loader("train", batch_size=128, shuffle=True, seed=0)
    res = {k: [] for k in ("line", "bezier", "polychain", "autoneb")}
    for p in range(args.pairs):
        a, b = mlps[2 * p], mlps[2 * p + 1]
        line = interpolation_curve(a, b, test_loader, 11)
        res["line"].append((max(line.loss), barrier(line)))
        for kind in ("bezier", "polychain"):
            r = fit_curve(a, b, train_loader, kind=kind, epochs=2 if not args.quick else 1, seed=p)
            c = r.evaluate(test_loader, 11)
            res[kind].append((max(c.loss), barrier(c)))
        r = autoneb(a, b, train_loader, n_pivots=3, rounds=2, steps=100 if not args.quick else 20, seed=p)
        c = r.evaluate(test_loader, 11)
        res["autoneb"].append((max(c.loss), barrier(c)))
    base = [v[0] for v in res["line"]]
    for k, v in res.items():
        lines.append(f"| {k} | {fmt([x[0] for x in v], 1, 3)} | {fmt(base, 1, 3)} | {fmt([x[1] for x in v], 1, 3)} |")
    log("paths done")
    return lines


def _analysis_section(mlps, fit_loader, test_loader):
    from neuralign.align import weight_matching as wm
    from neuralign.landscape import kendall_tau_distance, layer_cka, per_block_l2, plane_surface
    from neuralign.landscape.plots import plot_cka, plot_surface

    a, b = mlps[0], mlps[1]
    spec = spec_from_model(a, next(iter(fit_loader))[0][:2])
    perm = wm(spec, a, b, seed=0)
    bb = apply_permutation(b, perm, spec)
    layers = ["layer1", "layer2", "layer3", "classifier"]
    lines = ["", "## Analysis of MLP pair 0 (seeds 0 and 1): before / after weight matching", "",
             "| block | L2 distance (naive) | L2 distance (aligned) | CKA (naive) | CKA (aligned) |",
             "|---|---|---|---|---|"]
    d0, d1 = per_block_l2(a, b, layers), per_block_l2(a, bb, layers)
    c0, _, _ = layer_cka(a, b, test_loader, layers_a=layers, layers_b=layers, n_examples=500)
    c1, _, _ = layer_cka(a, bb, test_loader, layers_a=layers, layers_b=layers, n_examples=500)
    for i, n in enumerate(layers):
        lines.append(f"| {n} | {d0[n]:.2f} | {d1[n]:.2f} | {float(c0[i, i]):.3f} | {float(c1[i, i]):.3f} |")
    kt = kendall_tau_distance(perm)
    lines += ["", "Kendall-tau distance of the weight-matching permutation to the identity: "
              + ", ".join(f"{k} {v:.3f}" for k, v in kt.items()) + " (0.5 = unrelated order).", "",
              "CKA is invariant to unit permutations, so its diagonal is the same before and after "
              "alignment; the L2 distance is not. Plots: `merging_mlp_cka.png` (layer × layer CKA), "
              "`merging_mlp_plane.png` (test loss on the plane through A, B and aligned B)."]
    plot_cka(c0, layers, layers, OUT / "merging_mlp_cka.png", title="linear CKA, MLP seed 0 vs seed 1")
    surf = plane_surface(a, b, bb, test_loader, steps=9)
    surf.points = {"A": surf.points["A"], "B": surf.points["B"], "B aligned": surf.points["C"]}
    plot_surface(surf, OUT / "merging_mlp_plane.png", title="test loss: A, B, B aligned to A")
    log("analysis done")
    return lines


def _cached_lines(name, compute):
    path = CACHE / f"lines_{name}.json"
    if path.exists():
        return json.loads(path.read_text())
    lines = compute()
    CACHE.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(lines))
    return lines


def _write(lines):
    RESULTS.write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
