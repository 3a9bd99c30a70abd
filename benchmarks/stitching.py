"""Stitching penalty against depth for two Fashion-MNIST ResNet-20s (survey §6.2).

Two ResNet-20s (width 1, batch norm) trained from different seeds on the full 60,000 Fashion-MNIST
training images, average-pooled to 14x14 (so that both train in minutes on a shared 2-core CPU);
then model A's prefix is stitched to model B's suffix at every block boundary through a trained
φ -- full affine, rank-k affine and permutation x positive scaling -- and the stitching penalty
(mean accuracy of A and B minus the stitched model's) is measured on the official 10,000 test
images.

    .venv/bin/python benchmarks/stitching.py            # -> docs/results/stitching.md + .png
    .venv/bin/python benchmarks/stitching.py --quick    # smoke run, results not written to docs

Trained models and finished (layer, kind) cells are cached under ~/.cache/neuralign/stitching
(``NEURALIGN_CACHE`` overrides), so a rerun resumes.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

import torch
import torch.nn.functional as F
from torch.utils.data import TensorDataset

from neuralign.data import load_data
from neuralign.data.core import make_loader
from neuralign.evaluation import evaluate
from neuralign.landscape.stitching import plot_stitching, stitch
from neuralign.models import block_names, get_model
from neuralign.train import train

OUT = ROOT / "docs" / "results"
CACHE = Path(os.environ.get("NEURALIGN_CACHE", Path.home() / ".cache" / "neuralign")) / "stitching"
FULL = dict(size=14, epochs=2, lr=0.1, phi_train=2000, phi_epochs=1, phi_lr=1e-3,
            kinds=("affine", "rank-4", "perm-scale"), test=None)
QUICK = dict(FULL, epochs=1, phi_train=256, kinds=("affine", "rank-4", "perm-scale"), test=500,
             train_subset=1000)


def pooled(ds: TensorDataset, size: int) -> TensorDataset:
    x, y = ds.tensors
    return TensorDataset(F.adaptive_avg_pool2d(x, size), y)


def trained(seed, splits, cfg, log):
    tag = f"resnet20x1-bn_s{cfg['size']}_e{cfg['epochs']}_lr{cfg['lr']}_n{len(splits.train)}_seed{seed}"
    path = CACHE / f"{tag}.pt"
    torch.manual_seed(seed)
    m = get_model("resnet20", num_classes=10, in_channels=1, image_size=cfg["size"], width=1,
                  norm="bn")
    if path.exists():
        m.load_state_dict(torch.load(path, weights_only=True))
        info = json.loads(path.with_suffix(".json").read_text())
        log(f"seed {seed}: cached ({info['train_s']:.0f} s to train)")
    else:
        t0 = time.time()
        train(m, make_loader(splits.train, 128, shuffle=True, seed=seed), epochs=cfg["epochs"],
              lr=cfg["lr"], weight_decay=5e-4, progress=False, seed=seed)
        info = {"train_s": time.time() - t0}
        CACHE.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".tmp")
        torch.save(m.state_dict(), tmp)
        tmp.replace(path)
        path.with_suffix(".json").write_text(json.dumps(info))
        log(f"seed {seed}: trained in {info['train_s']:.0f} s")
    return m.eval(), info


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true")
    args = ap.parse_args()
    cfg = QUICK if args.quick else FULL
    torch.set_num_threads(1)
    t_start = time.time()

    def log(msg):
        print(f"[{time.time() - t_start:6.0f}s] {msg}", flush=True)

    splits = load_data("fashion_mnist", data_seed=0, val_size=0,
                       subset=cfg.get("train_subset"), test_subset=cfg["test"])
    splits.train = pooled(splits.train, cfg["size"])
    splits.test = pooled(splits.test, cfg["size"])
    test_loader = make_loader(splits.test, 500)
    models, infos = zip(*(trained(s, splits, cfg, log) for s in (0, 1)))
    a, b = models
    accs = [evaluate(m, test_loader)["accuracy"] for m in models]
    log(f"test accuracy A {accs[0]:.4f}, B {accs[1]:.4f}")
    gen = torch.Generator().manual_seed(123)
    idx = torch.randperm(len(splits.train), generator=gen)[: cfg["phi_train"]]
    x, y = splits.train.tensors
    phi_loader = make_loader(TensorDataset(x[idx], y[idx]), 128, shuffle=True, seed=0)
    layers = block_names(a)[:-1]
    cells_path = CACHE / ("cells_quick.json" if args.quick else "cells.json")
    key = json.dumps({k: v for k, v in cfg.items()}, sort_keys=True, default=str)
    cells = json.loads(cells_path.read_text()) if cells_path.exists() else {}
    cells = cells.get(key, {}) if isinstance(cells.get(key), dict) else {}
    for layer in layers:
        for kind in cfg["kinds"]:
            cid = f"{layer}|{kind}"
            if cid in cells:
                continue
            t0 = time.time()
            r = stitch(a, b, layer, phi_loader, kind=kind, eval_loader=test_loader,
                       epochs=cfg["phi_epochs"], lr=cfg["phi_lr"], seed=0,
                       _accs=(accs[0], accs[1]))
            cells[cid] = {"penalty": r.penalty, "accuracy": r.accuracy,
                          "time_s": time.time() - t0}
            log(f"{layer:9s} {kind:10s} stitched acc {r.accuracy:.4f} penalty "
                f"{100 * r.penalty:+.2f} pts ({cells[cid]['time_s']:.0f} s)")
            cells_path.write_text(json.dumps({key: cells}))
    result = {"layers": layers, "kinds": list(cfg["kinds"]),
              "penalty": {k: [cells[f"{ly}|{k}"]["penalty"] for ly in layers] for k in cfg["kinds"]},
              "accuracy": {k: [cells[f"{ly}|{k}"]["accuracy"] for ly in layers]
                           for k in cfg["kinds"]},
              "accuracy_a": accs[0], "accuracy_b": accs[1]}
    if args.quick:
        log(json.dumps(result["penalty"]))
        return
    write(result, cfg, infos, cells, time.time() - t_start)
    log("done")


def write(result, cfg, infos, cells, wall):
    OUT.mkdir(parents=True, exist_ok=True)
    plot_stitching(result, OUT / "stitching.png",
                   title="ResNet-20 (Fashion-MNIST 14x14): A prefix -> φ -> B suffix")
    stitch_s = sum(c["time_s"] for c in cells.values())
    lines = ["# Model stitching: penalty against depth", "",
             f"Generated by `benchmarks/stitching.py` ({time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}, "
             f"{platform.machine()}, 1 torch thread on a shared 2-core CPU, niced).", "",
             "Two ResNet-20s (width 1, batch norm), seeds 0 and 1, each trained on all 60,000 "
             f"Fashion-MNIST training images average-pooled to {cfg['size']}x{cfg['size']} "
             f"(a CPU budget), {cfg['epochs']} epoch(s) of SGD (lr {cfg['lr']}, cosine, momentum "
             "0.9, weight decay 5e-4, batch 128). "
             f"Training took {infos[0]['train_s'] / 60:.1f} and {infos[1]['train_s'] / 60:.1f} min.",
             "",
             f"Test accuracy on the official 10,000 test images: **A {result['accuracy_a']:.4f}, "
             f"B {result['accuracy_b']:.4f}**.", "",
             "At each block boundary, A's prefix (through that block) feeds B's suffix through a "
             "stitching layer φ acting on the channel axis, initialised by least squares from A's "
             "to B's activations (1024 images) and then trained on the task loss "
             f"({cfg['phi_epochs']} epoch over {cfg['phi_train']} training images, Adam lr "
             f"{cfg['phi_lr']}); both networks frozen. Penalty = (acc(A) + acc(B)) / 2 - "
             "acc(stitched), on the full test set, in accuracy points (positive = worse than the "
             f"ends). Stitching took {stitch_s / 60:.1f} min in all; the whole run "
             f"{wall / 60:.1f} min (cached models count zero on a rerun).", "",
             "**Budget caveat.** φ gets "
             f"{-(-cfg['phi_train'] // 128) * cfg['phi_epochs']} Adam steps after its "
             "least-squares start (the CPU budget: each cell also evaluates on 10,000 test "
             "images). The penalties are therefore upper bounds on those of a fully trained φ, "
             "compared across kinds and depths at one equal budget; stitching papers train φ for "
             "epochs and report much smaller affine penalties in the middle of ResNets.", "",
             "| layer | " + " | ".join(f"{k} penalty (pts)" for k in result["kinds"]) + " |",
             "|---|" + "---|" * len(result["kinds"])]
    for i, layer in enumerate(result["layers"]):
        lines.append(f"| {layer} | " + " | ".join(
            f"{100 * result['penalty'][k][i]:+.2f}" for k in result["kinds"]) + " |")
    lines += ["", "![stitching penalty](stitching.png)", ""]
    (OUT / "stitching.md").write_text("\n".join(lines))
    (OUT / "stitching.json").write_text(json.dumps({"result": result, "cells": cells,
                                                     "train": infos}, indent=1))


if __name__ == "__main__":
    main()
