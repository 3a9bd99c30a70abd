"""Benchmark: model soups (Wortsman et al., 2022; survey Table 5 protocol at CPU scale).

One command: ``.venv/bin/python benchmarks/soups.py`` -> docs/results/soups.md (+ soups.png).
A small CNN is pre-trained on part of Fashion-MNIST, then fine-tuned 8 times from it with
different hyper-parameters on another part; the fine-tuned models are combined by every
method and evaluated in distribution (test images) and under a shift (Fashion-MNIST-C style
corruptions of the test images). Repeated for 3 pre-training seeds (mean ± std).
"""

from __future__ import annotations

import argparse
import itertools
import os
import sys
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

from neuralign.data import load_data, make_loader
from neuralign.data.core import FASHION_MEAN, FASHION_STD
from neuralign.data.corruptions import corrupt
from neuralign.merge import average, fisher_merge, greedy_soup, learned_soup
from neuralign.merge._util import evaluate
from neuralign.models import get_model
from neuralign.train import train

CACHE = Path(os.environ.get("NEURALIGN_CACHE", "/tmp/neuralign_soups_cache"))
OUT = ROOT / "docs" / "results"
SHIFTS = ("gaussian_noise", "contrast", "motion_blur")


def log(*a):
    print(time.strftime("%H:%M:%S"), *a, flush=True)


def down(x):
    return torch.nn.functional.avg_pool2d(x, 2)


class Ensemble(torch.nn.Module):
    def __init__(self, models):
        super().__init__()
        self.models = torch.nn.ModuleList(models)

    def forward(self, x):
        return torch.stack([torch.log_softmax(m(x), -1) for m in self.models]).exp().mean(0).log()


def cached_train(path, build, loader, **kw):
    model = build()
    if path.exists():
        model.load_state_dict(torch.load(path))
        return model.eval()
    train(model, loader, progress=False, **kw)
    CACHE.mkdir(parents=True, exist_ok=True)
    torch.save(model.state_dict(), path)
    return model.eval()


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--lrs", default="0.01,0.05", help="the two fine-tuning learning rates")
    ap.add_argument("--out", default="soups.md", help="results file under docs/results")
    args = ap.parse_args()
    torch.set_num_threads(1)
    n_pre, n_ft = (500, 500) if args.quick else (3000, 3000)
    lrs = tuple(float(x) for x in args.lrs.split(","))
    grid = list(itertools.product(lrs, (0.0, 5e-4), (0.0, 0.1)))
    lr_tag = "" if lrs == (0.01, 0.05) else "_lr" + "-".join(str(x) for x in lrs)
    splits = load_data("fashion_mnist", data_seed=0, subset=n_pre + n_ft, test_subset=1000)
    xtr, ytr = splits.train.tensors
    perm = torch.randperm(len(ytr), generator=torch.Generator().manual_seed(0))
    pre_idx, ft_idx = perm[:n_pre], perm[n_pre:]
    ds = lambda x, y: torch.utils.data.TensorDataset(down(x), y)
    pre = ds(xtr[pre_idx], ytr[pre_idx])
    ft = ds(xtr[ft_idx], ytr[ft_idx])
    xv, yv = splits.val.tensors
    held = make_loader(ds(xv[:1000], yv[:1000]), batch_size=250)
    xt, yt = splits.test.tensors
    test = make_loader(ds(xt, yt), batch_size=500)
    raw = (xt * FASHION_STD + FASHION_MEAN).clamp(0, 1)
    shifted = [make_loader(ds((corrupt(raw, c, 3, seed=0) - FASHION_MEAN) / FASHION_STD, yt), batch_size=500)
               for c in SHIFTS]
    build = lambda: get_model("cnn", width=16, num_classes=10, in_channels=1)
    methods = ["best single (held-out)", "uniform soup", "greedy soup", "learned soup",
               "learned soup (per layer)", "Fisher merge", "output ensemble"]
    res = {m: {"id": [], "shift": []} for m in methods}
    for seed in range(args.seeds):
        torch.manual_seed(seed)
        base = cached_train(CACHE / f"pre_s{seed}_{n_pre}.pt", build, make_loader(pre, 128, shuffle=True, seed=seed),
                            epochs=3, lr=0.05, seed=seed)
        models = []
        for i, (lr, wd, ls) in enumerate(grid):
            def b(base=base):
                m = build()
                m.load_state_dict(base.state_dict())
                return m
            models.append(cached_train(CACHE / f"ft_s{seed}_{i}_{n_ft}{lr_tag}.pt", b,
                                       make_loader(ft, 128, shuffle=True, seed=100 * seed + i),
                                       epochs=2, lr=lr, weight_decay=wd, label_smoothing=ls, seed=100 * seed + i))
        log(f"seed {seed}: trained")
        held_acc = [evaluate(m, held)["accuracy"] for m in models]
        combos = {
            "best single (held-out)": models[int(np.argmax(held_acc))],
            "uniform soup": average(models),
            "greedy soup": greedy_soup(models, held).model,
            "learned soup": learned_soup(models, held, epochs=5, lr=0.05, seed=seed).model,
            "learned soup (per layer)": learned_soup(models, held, per_layer=True, epochs=5, lr=0.05,
                                                     seed=seed).model,
            "Fisher merge": fisher_merge(models, loader=held, n_examples=256),
            "output ensemble": Ensemble(models).eval(),
        }
        for name, m in combos.items():
            res[name]["id"].append(evaluate(m, test)["accuracy"])
            res[name]["shift"].append(np.mean([evaluate(m, s)["accuracy"] for s in shifted]))
        log(f"seed {seed}: " + ", ".join(f"{k} {v['id'][-1]:.3f}/{v['shift'][-1]:.3f}" for k, v in res.items()))
    f = lambda v: f"{100 * np.mean(v):.1f} ± {100 * np.std(v):.1f}"
    lines = ["# Model soups (Fashion-MNIST, CPU scale)", "",
             f"Command: `.venv/bin/python benchmarks/soups.py {' '.join(sys.argv[1:])}`", "",
             f"Protocol (survey Table 5, scaled down): a small CNN (`cnn`, width 16, BN) pre-trained on "
             f"{n_pre} Fashion-MNIST training images (14×14, 3 epochs), then fine-tuned 8 times from it "
             f"on {n_ft} other training images (2 epochs; lr ∈ {{{lrs[0]}, {lrs[1]}}} × weight decay ∈ {{0, 5e-4}} × "
             "label smoothing ∈ {0, 0.1}). Held-out set (greedy/learned soups, Fisher, model selection): "
             "1,000 validation images. In-distribution: 1,000 test images; shift: the same test images "
             f"with {', '.join(SHIFTS)} corruptions at severity 3 (mean accuracy). Batch-norm statistics "
             "are averaged like the weights (no reset). Learned soups: Adam on softmax mixing "
             f"coefficients, 5 epochs over the held-out set. {args.seeds} pre-training seeds, mean ± std.", "",
             "| method | in-distribution acc % | shifted acc % |", "|---|---|---|"]
    for name in methods:
        lines.append(f"| {name} | {f(res[name]['id'])} | {f(res[name]['shift'])} |")
    OUT.mkdir(parents=True, exist_ok=True)
    (OUT / args.out).write_text("\n".join(lines) + "\n")
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    for name in methods:
        ax.errorbar(100 * np.mean(res[name]["id"]), 100 * np.mean(res[name]["shift"]),
                    xerr=100 * np.std(res[name]["id"]), yerr=100 * np.std(res[name]["shift"]), fmt="o", label=name)
    ax.set_xlabel("in-distribution accuracy (%)")
    ax.set_ylabel("shifted accuracy (%)")
    ax.legend(fontsize=7)
    ax.grid(alpha=0.3)
    fig.savefig(OUT / args.out.replace(".md", ".png"), dpi=120, bbox_inches="tight")
    log("done")


if __name__ == "__main__":
    main()
