"""Automatic per-layer fine-tuning (Agarwala et al., Table 1; Figures 5, 7-9) under the shared
protocol (benchmarks/protocol.py).

Backbones: the small CNN pre-trained once on the full clean Fashion-MNIST training set (10
classes), and once on the BREEDS-style source sub-classes of that training set (4
super-classes); cached under ~/.cache/neuralign/backbones (the one-off cost is reported).
Target data come from the Fashion-MNIST test split (as Lee et al. fine-tune on CIFAR-10-C test
images), one fixed split per task (the data set fixes it, not the seed): K labelled examples per
class, a target validation set (selection: learning rate and epoch) and a target test set.

* input-level: Fashion-MNIST-C, severity 5, several corruption families (mean per seed);
* feature-level: the target sub-classes of the 4 super-classes;
* output-level: labels y -> 9 - y.

Rows: no fine-tuning, batch-norm adaptation only, full fine-tuning and every strategy of the
paper. Every row with a learning rate gets the same grid; selection on target validation;
>= 5 seeds; paired differences to full fine-tuning with standard errors; compute as runs x
epochs. Writes docs/results/auto_finetune.md (+ figures, JSON). One command:

    .venv/bin/python benchmarks/auto_finetune.py           # full scale (hours on 2 CPUs)
    .venv/bin/python benchmarks/auto_finetune.py --smoke   # < 1 minute, writes under the cache
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from functools import partial
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import TensorDataset

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))
sys.path.insert(0, str(ROOT / "benchmarks"))

import protocol as P  # noqa: E402

from neuralign.data import load_fashion_mnist_arrays  # noqa: E402
from neuralign.data.core import FASHION_MEAN, FASHION_STD  # noqa: E402
from neuralign.data.corruptions import corrupt  # noqa: E402
from neuralign.data.label_shift import flip_labels  # noqa: E402
from neuralign.data.subpopulation import FASHION_SUPERCLASSES, relabel, split_subclasses  # noqa: E402
from neuralign.finetune import finetune  # noqa: E402
from neuralign.models import get_model  # noqa: E402
from neuralign.train import evaluate, train  # noqa: E402

FULL = dict(width=16, pretrain_n=None, pretrain_epochs=10, pretrain_lr=2e-3, per_class=100,
            val_n=500, test_n=2000, epochs=5, batch=50, wd=1e-4,
            corruptions=("impulse_noise", "motion_blur", "frost"),
            lr_grid=(3e-4, 1e-3, 3e-3, 1e-2, 3e-2), seeds=(0, 1, 2, 3, 4), shots=(1, 10, 100),
            overrides={})
SMOKE = dict(width=4, pretrain_n=1000, pretrain_epochs=2, pretrain_lr=1e-2, per_class=4,
             val_n=40, test_n=60, epochs=1, batch=20, wd=1e-4, corruptions=("impulse_noise",),
             lr_grid=(1e-3, 1e-2), seeds=(0, 1), shots=(),
             overrides={"lbfgs_steps": 3, "num_batches": 2})  # per-strategy options that exist
ROWS = [  # (label, strategy or None for no fine-tuning, options, tuned)
    ("No fine-tuning", None, {}, False),
    ("BN adaptation only", "bn_adapt", {}, False),
    ("Full fine-tuning", "full", {}, True),
    ("Cross validation", "cross_validation", {"max_len": 1}, True),
    ("Auto-RGN", "auto_rgn", {}, True),
    ("Auto-SNR", "auto_snr", {}, True),
    ("Auto-RGN+Hessian", "auto_rgn_hessian", {}, True),
    ("Auto-RGN+Change", "auto_rgn_change", {"src": True}, True),
    ("Auto-RGN+Hessian+Change", "auto_rgn_hessian_change", {"src": True}, True),
    ("Layerwise Surprise", "layerwise_surprise", {"src": True}, True),
    ("Layerwise Surprise Diff", "layerwise_surprise_diff", {"src": True}, True),
    ("Mod. Criticality-Identity", "module_criticality",
     {"src": True, "removal": "identity", "pretune_epochs": [0, 2]}, True),
    ("Mod. Criticality-Random", "module_criticality",
     {"src": True, "removal": "random", "pretune_epochs": [0, 2]}, True),
]
SHOT_ROWS = ("Full fine-tuning", "Auto-RGN", "Auto-RGN+Hessian", "Mod. Criticality-Random")
BASELINE = "Full fine-tuning"


def norm(x01: torch.Tensor) -> torch.Tensor:
    return ((x01 - FASHION_MEAN) / FASHION_STD)[:, None].float()


def raw_arrays():
    a = load_fashion_mnist_arrays()
    f = lambda k: torch.from_numpy(np.array(a[k]))  # noqa: E731
    return (f("train_images").float() / 255, f("train_labels").long(),
            f("test_images").float() / 255, f("test_labels").long())


def backbone(name: str, x: torch.Tensor, y: torch.Tensor, classes: int, cfg: dict):
    """The pre-trained source model, from the cache or trained once (Adam, seed 0)."""
    conf = {"benchmark": "auto_finetune", "task": name, "arch": "cnn", "width": cfg["width"],
            "n": len(y), "epochs": cfg["pretrain_epochs"], "lr": cfg["pretrain_lr"],
            "classes": classes, "optimizer": "adam", "batch": 128, "seed": 0}

    def make():
        torch.manual_seed(0)
        return get_model("cnn", width=cfg["width"], num_classes=classes)

    def fit(model):
        train(model, TensorDataset(x, y), epochs=cfg["pretrain_epochs"], lr=cfg["pretrain_lr"],
              optimizer="adam", batch_size=128, progress=False, seed=0)

    return P.cached_backbone(f"auto_finetune_{name}", conf, make, fit)


def _balanced(y: torch.Tensor, pool: torch.Tensor, per_class: int, gen) -> torch.Tensor:
    out = []
    for c in torch.unique(y[pool]).tolist():
        idx = pool[y[pool] == c]
        out.append(idx[torch.randperm(len(idx), generator=gen)[:per_class]])
    return torch.cat(out)


def fixed_split(y: torch.Tensor, pool: torch.Tensor, per_class: int, cfg: dict):
    """Target train / val / test indices into the test split, fixed by the data (seed 1234)."""
    g = torch.Generator().manual_seed(1234)
    pool = pool[torch.randperm(len(pool), generator=g)]
    held = pool[: cfg["val_n"] + cfg["test_n"]]
    rest = pool[cfg["val_n"] + cfg["test_n"]:]
    return _balanced(y, rest, per_class, g), held[: cfg["val_n"]], held[cfg["val_n"]:]


def make_tasks(cfg: dict) -> dict:
    xtr, ytr, xte, yte = raw_arrays()
    if cfg["pretrain_n"]:
        keep = torch.randperm(len(ytr), generator=torch.Generator().manual_seed(0))
        xtr, ytr = xtr[keep[: cfg["pretrain_n"]]], ytr[keep[: cfg["pretrain_n"]]]
    src10, info10 = backbone("source10", norm(xtr), ytr, 10, cfg)
    smap, tmap = split_subclasses(FASHION_SUPERCLASSES, seed=0)
    xs4, ys4 = relabel(xtr, ytr, smap)
    src4, info4 = backbone("source4", norm(xs4), ys4, 4, cfg)
    probe10 = TensorDataset(norm(xtr[:1000]), ytr[:1000])  # source data for +Change etc.
    probe4 = TensorDataset(norm(xs4[:1000]), ys4[:1000])
    meta = {"source10": info10, "source4": info4, "breeds_source": smap, "breeds_target": tmap,
            "source10_clean_test_acc": evaluate(src10, TensorDataset(norm(xte), yte))["accuracy"]}
    all_test = torch.arange(len(yte))
    tasks = {}

    def build(name, model, probe, x, y, pool, per_class, transform):
        tr, va, te = fixed_split(y, pool, per_class, cfg)
        tasks[name] = {"model": model, "source": probe, "train": transform(x[tr], y[tr], 0),
                       "val": transform(x[va], y[va], 1), "test": transform(x[te], y[te], 2)}

    for c in cfg["corruptions"]:
        build(f"input/{c}", src10, probe10, xte, yte, all_test, cfg["per_class"],
              lambda x, y, k, c=c: TensorDataset(norm(corrupt(x, c, 5, seed=10 + k)), y))
    ymap = torch.full((10,), -1, dtype=torch.long)
    for c, s in tmap.items():
        ymap[c] = s
    yf = ymap[yte]
    plain = lambda x, y, k: TensorDataset(norm(x), y)  # noqa: E731
    build("feature", src4, probe4, xte, yf, torch.nonzero(yf >= 0).flatten(),
          cfg["per_class"] * 10 // 4, plain)
    build("output", src10, probe10, xte, flip_labels(yte, 10), all_test, cfg["per_class"], plain)
    for k in cfg["shots"]:
        c = cfg["corruptions"][min(1, len(cfg["corruptions"]) - 1)]
        base = tasks[f"input/{c}"]
        per = base["train"].tensors
        idx = _balanced(per[1], torch.arange(len(per[1])), k, torch.Generator().manual_seed(7))
        tasks[f"shots/{c}/K={k}"] = dict(base, train=TensorDataset(per[0][idx], per[1][idx]))
    return tasks, meta


# --------------------------------------------------------------------------- one run


def no_finetune(lr, seed, task, *, cfg):
    ev = lambda d: evaluate(task["model"], d)["accuracy"]  # noqa: E731
    return P.Run(lr=None, scores={"target_val": ev(task["val"]), "test": ev(task["test"])},
                 epochs=0, runs=0)


def ft_run(lr, seed, task, *, strategy, opts, cfg, bn):
    from neuralign.finetune import get_strategy

    o = {k: v for k, v in opts.items() if k != "src"}
    known = get_strategy(strategy).defaults
    o.update({k: v for k, v in cfg["overrides"].items() if k in known})
    if opts.get("src"):
        o["source_data"] = task["source"]
    t0 = time.perf_counter()
    res = finetune(task["model"], task["train"], strategy=strategy, epochs=cfg["epochs"],
                   lr=1e-3 if lr is None else lr, optimizer="adam", weight_decay=cfg["wd"],
                   batch_size=cfg["batch"], val_data=task["val"],
                   select="last" if strategy == "bn_adapt" else "best_val", seed=seed,
                   progress=False, bn=bn, **o)
    ev = lambda d: evaluate(res.model, d)["accuracy"]  # noqa: E731
    runs, extra = 1, 0
    if "cv_val_accuracy" in res.info:
        runs = len(res.info["cv_val_accuracy"])
    if isinstance(o.get("pretune_epochs"), list):
        runs, extra = len(o["pretune_epochs"]), sum(o["pretune_epochs"])
    info = {"seconds": time.perf_counter() - t0, "bn": res.info.get("bn"),
            "weights": res.info.get("layer_weights"),
            "choice": res.info.get("chosen_blocks") or res.info.get("pretune_epochs")}
    return P.Run(lr=lr, scores={"target_val": ev(task["val"]), "test": ev(task["test"])},
                 epochs=0 if strategy == "bn_adapt" else cfg["epochs"],
                 runs=runs, extra_epochs=extra, info=info)


def methods(cfg: dict, bn: str, task_name: str) -> list[P.Method]:
    out = []
    for label, strategy, opts, tuned in ROWS:
        if task_name.startswith("output") and "Surprise" in label:
            continue  # as the paper: the inputs do not shift
        if task_name.startswith("shots/") and label not in SHOT_ROWS:
            continue
        fn = (partial(no_finetune, cfg=cfg) if strategy is None else
              partial(ft_run, strategy=strategy, opts=opts, cfg=cfg, bn=bn))
        out.append(P.Method(label, fn, tuned))
    return out


# --------------------------------------------------------------------------- report


def collect(store: P.ResultStore, proto: P.Protocol, tasks: list[str]):
    """``{task: {label: {seed: test acc}}}`` and ``{label: [Selected]}``."""
    acc: dict = {}
    sel: dict = {}
    for key, val in store.runs().items():
        name, task, seed, label = key.split("|")
        if name != proto.name or task not in tasks:
            continue
        s = P.Selected.from_json(val)
        acc.setdefault(task, {}).setdefault(label, {})[int(seed)] = s.score(proto.report)
        sel.setdefault(label, []).append(s)
    return acc, sel


def report(store, proto, cfg, meta, out: Path, smoke: bool):
    names = [f"input/{c}" for c in cfg["corruptions"]]
    acc, sel = collect(store, proto, names + ["feature", "output"])
    labels = [r[0] for r in ROWS]
    inp = {}
    for lab in labels:  # per seed, the mean over corruptions (all must be there)
        seeds = set.intersection(*[set(acc.get(n, {}).get(lab, {})) for n in names])
        if seeds:
            inp[lab] = {s: float(np.mean([acc[n][lab][s] for n in names])) for s in seeds}
    cols = {"input (FMNIST-C)": inp, "feature": acc.get("feature", {}),
            "output (flip)": acc.get("output", {})}
    compute = {lab: P.compute_cell(v) for lab, v in sel.items()}
    cmd = "benchmarks/auto_finetune.py" + (" --smoke" if smoke else "") + (
        f" --bn {proto.bn}" if proto.bn != "frozen" else "")
    lines = ["# Automatic per-layer fine-tuning under the shared protocol (Agarwala et al., "
             "Table 1)", "", f"Generated by `.venv/bin/python {cmd}`."
             + (" SMOKE RUN: tiny data, numbers mean nothing." if smoke else ""), "",
             "## Protocol", "", *proto.describe(),
             f"- Backbones: `get_model('cnn', width={cfg['width']})` pre-trained with Adam on "
             f"{'the full' if not cfg['pretrain_n'] else cfg['pretrain_n']} clean Fashion-MNIST "
             f"training images for {cfg['pretrain_epochs']} epochs (clean test accuracy "
             f"{100 * meta['source10_clean_test_acc']:.1f}%); one-off cost "
             f"{meta['source10']['seconds']:.0f} s and {meta['source4']['seconds']:.0f} s "
             "(cached under ~/.cache/neuralign/backbones).",
             f"- Target data (Fashion-MNIST test split, fixed by the data): {cfg['per_class']} "
             f"labelled examples per class, {cfg['val_n']} validation, {cfg['test_n']} test; "
             f"Adam, weight decay {cfg['wd']}, batch {cfg['batch']}, {cfg['epochs']} epochs, "
             "epoch and rate picked on target validation.",
             f"- Input-level: severity 5, {', '.join(cfg['corruptions'])}; feature-level: target "
             f"sub-classes {meta['breeds_target']} vs source {meta['breeds_source']}; output: "
             "y -> 9 - y (no surprise rows: the inputs do not shift).",
             "", "## Table 1: target test accuracy (%) and paired difference to full fine-tuning",
             "", P.paired_table(cols, BASELINE, labels, compute), ""]
    per = {n[6:]: acc.get(n, {}) for n in names}
    lines += ["### Input-level shift per corruption", "", P.paired_table(per, BASELINE, labels), ""]
    lines += orderings(cols) + [""] + chosen_rates(sel, proto) + [""]
    shots = sorted({k for k in store.runs() if "|shots/" in k})
    if shots:
        sh_names = sorted({k.split("|")[1] for k in shots}, key=lambda t: int(t.split("K=")[1]))
        sacc, _ = collect(store, proto, sh_names)
        lines += ["## Shots (Figure 7)", "", P.paired_table(
            {t.split("/")[-1]: sacc.get(t, {}) for t in sh_names}, BASELINE, list(SHOT_ROWS)),
            ""]
    lines += weights_figures(sel, out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".md").write_text("\n".join(lines) + "\n")
    print(f"wrote {out.with_suffix('.md')}", flush=True)


def orderings(cols) -> list[str]:
    autos = [r[0] for r in ROWS[4:]]
    lines = ["## The paper's orderings (Δ = paired difference ± SE; 'appears' = Δ > 2 SE)", ""]

    def check(col, a, b, claim):
        per = cols[col]
        if a not in per or b not in per:
            return
        p = P.compare(per, a, b)
        lines.append(f"- {claim} ({col}): {a} − {b} = {100 * p.mean:+.1f} ± {100 * p.se:.1f} "
                     f"(n={p.n}): **{P.verdict(p)}**.")

    for col, best in (("input (FMNIST-C)", "Mod. Criticality-Random"),
                      ("feature", "Mod. Criticality-Random"),
                      ("output (flip)", "Auto-RGN+Hessian")):
        per = cols[col]
        pool = [a for a in autos if a in per]
        if not pool:
            continue
        means = {a: np.mean(list(per[a].values())) for a in pool}
        top = max(means, key=means.get)
        lines.append(f"- Best automatic strategy, {col}: {top} by mean (paper: {best}).")
        if top != best:
            check(col, top, best, f"{top} vs the paper's best")
    for col in cols:
        check(col, "Auto-RGN", BASELINE, "Auto-RGN > full FT on input and output, < on feature")
        check(col, "Auto-RGN+Hessian", "Auto-RGN", "Auto-RGN+Hessian ≥ Auto-RGN")
        check(col, "Cross validation", "Mod. Criticality-Random",
              "Cross validation is the high-water mark")
        check(col, BASELINE, "BN adaptation only", "full FT beyond re-estimating BN statistics")
    return lines


def chosen_rates(sel, proto) -> list[str]:
    lines = ["## Rates chosen on target validation (all tasks and seeds: rate × count)", "",
             "| Method | chosen rates |", "|---|---|"]
    for lab, ss in sel.items():
        counts: dict = {}
        for s in ss:
            counts[s.chosen.lr] = counts.get(s.chosen.lr, 0) + 1
        cells = ", ".join(f"{'–' if k is None else f'{k:g}'} × {v}" for k, v in counts.items())
        lines.append(f"| {lab} | {cells} |")
    return lines


def weights_figures(sel, out: Path) -> list[str]:
    from neuralign.finetune.auto_lr import plot_layer_weights

    per = {}
    for lab, ss in sel.items():
        ws = [s.chosen.info.get("weights") for s in ss if s.seed == min(x.seed for x in ss)]
        ws = [w for w in ws if w]
        if ws and all(set(w) == set(ws[0]) for w in ws):
            per[lab] = {k: float(np.mean([w[k] for w in ws])) for k in ws[0]}
    if not per:
        return []
    png = out.parent / f"{out.name}_weights.png"
    plot_layer_weights(per, png, title="Layer weights of the selected runs (first seed)")
    (out.parent / f"{out.name}_weights.json").write_text(json.dumps(per, indent=1))
    return [f"![layer weights]({png.name})"]


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--smoke", action="store_true", help="tiny end-to-end run (< 1 minute)")
    ap.add_argument("--bn", default="frozen", choices=("frozen", "adapt", "train"),
                    help="batch-norm policy for every method (frozen = Lee et al.)")
    ap.add_argument("--seeds", type=int, default=None, help="number of seeds (default 5)")
    ap.add_argument("--no-shots", action="store_true")
    ap.add_argument("--report-only", action="store_true")
    ap.add_argument("--out", default=None)
    ap.add_argument("--workers", type=int, default=None,
                    help="worker processes, one torch thread each (default: every core)")
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    cfg = dict(SMOKE if args.smoke else FULL)
    if args.no_shots:
        cfg["shots"] = ()
    seeds = cfg["seeds"] if args.seeds is None else tuple(range(args.seeds))
    proto = P.Protocol("auto_finetune", cfg["lr_grid"], P.PAPER_SELECTION["auto_finetune"],
                       cfg["epochs"], seeds, bn=args.bn)
    suffix = "" if args.bn == "frozen" else f"_bn-{args.bn}"
    default = (P.cache_root() / "smoke" / f"auto_finetune{suffix}" if args.smoke
               else ROOT / "docs" / "results" / f"auto_finetune{suffix}")
    out = Path(args.out) if args.out else default
    runs = out.parent / f"{out.name}_runs.json"  # committed: a fresh cache resumes from it
    store = P.ResultStore(P.cache_root() / "results" /
                          f"auto_finetune{'_smoke' if args.smoke else ''}{suffix}.json",
                          seed_from=runs)
    tasks, meta = make_tasks(cfg)
    store.bind({"backbones": [P.file_digest(meta[k]["path"]) for k in ("source10", "source4")]})
    t0 = time.perf_counter()
    if not args.report_only:
        jobs = [(name, seed, methods(cfg, args.bn, name), task)
                for seed in seeds for name, task in tasks.items()]
        P.run_seeds(proto, jobs, store, workers=args.workers)
        print(f"all units done ({time.perf_counter() - t0:.0f} s)", flush=True)
    report(store, proto, cfg, meta, out, args.smoke)
    store.export(runs)


if __name__ == "__main__":
    main()
