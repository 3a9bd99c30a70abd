"""Linear mode connectivity of fully trained models (issue 15, "What to reproduce").

Barrier vs width (Git Re-Basin Fig. 2 / REPAIR Fig. 1 shape) for ResNet-20 (BN and LN) at widths
1, 2, 4, 8; an MLP (3x512) and a VGG-11 pair; and Entezari et al.'s one-hidden-layer MLP curve
(widths 2^4 .. 2^10). Every model is trained once on the full 60,000 Fashion-MNIST training
images and cached; then, on the full 10,000-image test set, naive / weight matching / activation
matching, each plain / BN reset / REPAIR, along 11 points of the linear path.

    python benchmarks/lmc_scale.py                  # train what is missing, measure, report
    python benchmarks/lmc_scale.py --remeasure      # the same, and re-measure rows that an
                                                    # older src/ measured (resumes everything)
    python benchmarks/lmc_scale.py --settings resnet20x1-bn,vgg11x0.25-bn
    python benchmarks/lmc_scale.py --reuse          # = --measure-only: cached models only
    python benchmarks/lmc_scale.py --reuse --remeasure   # re-measure rows made by older src/
    python benchmarks/lmc_scale.py --report-only    # re-render docs/results from cached rows
    python benchmarks/lmc_scale.py --throughput     # activation-statistics pass vs forward
    python benchmarks/lmc_scale.py --smoke --cache /tmp/x --out /tmp/y   # seconds

Cache (never in git): ``$NEURALIGN_CACHE/lmc_scale`` (default ``~/.cache/neuralign``):
``models/<setting>-s<seed>-<hash>.pt`` (one file per trained model, written atomically as it
finishes; the hash covers the training recipe and the module structure, so a changed
architecture, e.g. another "ln" norm layer, is retrained rather than reused) and
``rows/<setting>-<pair>-<model hashes>.json`` (one measured seed pair). Each row records the git
revision of the code that measured it. Run single-threaded (``OMP_NUM_THREADS=1``).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch.utils.data import TensorDataset

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from neuralign.align import activation_matching, weight_matching
from neuralign.data import load_fashion_mnist, make_loader
from neuralign.io import atomic_write
from neuralign.landscape import barrier
from neuralign.merge import interpolate, repair, reset_bn
from neuralign.models import get_model
from neuralign.permute import apply_permutation
from neuralign.spec import spec_from_model
from neuralign.train import evaluate, train

SEEDS = (0, 1, 2)
PAIRS = ((0, 1), (0, 2), (1, 2))
TS = [round(i / 10, 1) for i in range(11)]
ALIGNS = ("naive", "wm", "am")
FIT_BATCHES, FIT_BATCH = 10, 500  # 5,000 training images for matching / BN reset / REPAIR
# One recipe for every model (what "trained to convergence" means here; see the results file):
RECIPE = {"batch_size": 128, "optimizer": "sgd", "momentum": 0.9, "weight_decay": 5e-4,
              "schedule": "cosine", "warmup_steps": 200}


def _setting(model, kw, image, epochs, lr, group, width):
    return {"model": model, "kw": kw, "image": image, "epochs": epochs, "lr": lr, "group": group, "width": width}


def settings(smoke: bool = False) -> dict[str, dict]:
    """Name -> setting, in the order they are trained (cheapest first)."""
    if smoke:
        return {"mlp1-w16": _setting("mlp", {"width": 16, "depth": 1}, 14, 1, 0.05, "mlp_curve", 16),
                # one block per stage (a ResNet-8) keeps the smoke run to seconds
                "resnet20x1-bn": _setting("resnet20", {"width": 1, "norm": "bn",
                                                       "blocks_per_stage": 1}, 14, 1, 0.05,
                                          "resnet20-bn", 1)}
    out = {f"mlp1-w{w}": _setting("mlp", {"width": w, "depth": 1}, 28, 10, 0.05, "mlp_curve", w)
           for w in (16, 32, 64, 128, 256, 512, 1024)}
    out["mlp3x512"] = _setting("mlp", {"width": 512, "depth": 3}, 28, 10, 0.05, "mlp", 512)
    out["resnet20x1-bn"] = _setting("resnet20", {"width": 1, "norm": "bn"}, 14, 8, 0.05,
                                    "resnet20-bn", 1)
    out["vgg11x0.25-bn"] = _setting("vgg11", {"width": 0.25, "norm": "bn"}, 14, 8, 0.05, "vgg11",
                                    0.25)
    out["resnet20x1-ln"] = _setting("resnet20", {"width": 1, "norm": "ln"}, 14, 8, 0.05,
                                    "resnet20-ln", 1)
    # the same MLPs trained 4x longer (the convergence pilot: their training loss keeps
    # falling after 10 epochs); the barrier's dependence on training length, side by side
    for w in (16, 32, 64, 128, 256, 512, 1024):
        out[f"mlp1-w{w}-e40"] = _setting("mlp", {"width": w, "depth": 1}, 28, 40, 0.05,
                                         "mlp_curve_e40", w)
    out["mlp3x512-e40"] = _setting("mlp", {"width": 512, "depth": 3}, 28, 40, 0.05, "mlp", 512)
    for w in (2, 4, 8):  # each width costs about 3x the one before
        for norm in ("bn", "ln"):
            out[f"resnet20x{w}-{norm}"] = _setting("resnet20", {"width": w, "norm": norm}, 14, 8,
                                                   0.05, f"resnet20-{norm}", w)
    return out


# --- data -----------------------------------------------------------------------------------
_DATA: dict = {}


def data(image: int, smoke: bool = False):
    """(train, test) TensorDatasets at ``image`` px: all 60,000 training images (no validation
    split: nothing is selected on held-out data) and the 10,000 official test images. 14 px is
    a 2x2 mean pool of the 28 px images (exact, no resampling choices)."""
    key = (image, smoke)
    if key not in _DATA:
        s = load_fashion_mnist(val_size=0, subset=300 if smoke else None,
                               test_subset=100 if smoke else None)
        tr, te = s.train.tensors, s.test.tensors
        if image != 28:
            if 28 % image:
                raise ValueError(f"image size {image} must divide 28")
            k = 28 // image
            tr, te = (F.avg_pool2d(tr[0], k), tr[1]), (F.avg_pool2d(te[0], k), te[1])
        _DATA[key] = TensorDataset(*tr), TensorDataset(*te)
    return _DATA[key]


def fit_batches(train_ds, smoke: bool = False) -> list:
    """The fixed training batches used by activation matching, BN reset and REPAIR."""
    n, bs = (1, 50) if smoke else (FIT_BATCHES, FIT_BATCH)
    loader = make_loader(train_ds, bs, shuffle=True, seed=12345)
    return [b for _, b in zip(range(n), loader)]


# --- phase 1: training ----------------------------------------------------------------------
def cache_dir(args) -> Path:
    root = Path(args.cache) if args.cache else Path(
        os.environ.get("NEURALIGN_CACHE", Path.home() / ".cache" / "neuralign")) / "lmc_scale"
    return root


def build(cfg: dict, seed: int):
    return get_model(cfg["model"], seed=seed, num_classes=10, in_channels=1,
                     image_size=cfg["image"], **cfg["kw"])


def model_hash(cfg: dict, seed: int, smoke: bool) -> str:
    """Covers the recipe, the seed and the module structure (``repr``: layer types and sizes)."""
    blob = json.dumps([cfg, seed, RECIPE, repr(build(cfg, seed)), smoke], sort_keys=True)
    return hashlib.sha1(blob.encode()).hexdigest()[:10]


def model_path(args, name: str, cfg: dict, seed: int) -> Path:
    return cache_dir(args) / "models" / f"{name}-s{seed}-{model_hash(cfg, seed, args.smoke)}.pt"


def train_one(args, name: str, cfg: dict, seed: int, log) -> dict:
    """Train one model (or load it from the cache). Returns the cache record."""
    path = model_path(args, name, cfg, seed)
    if path.exists():
        return torch.load(path, weights_only=False)
    train_ds, test_ds = data(cfg["image"], args.smoke)
    model = build(cfg, seed)
    loader = make_loader(train_ds, RECIPE["batch_size"], shuffle=True, seed=seed)
    recipe = {k: v for k, v in RECIPE.items() if k != "batch_size"}
    t0 = time.perf_counter()
    hist = train(model, loader, epochs=cfg["epochs"], lr=cfg["lr"], seed=seed, progress=False,
                 **recipe)
    secs = time.perf_counter() - t0
    test = evaluate(model, make_loader(test_ds, 1000))
    rec = {"state_dict": model.state_dict(), "history": hist.epochs, "seconds": secs,
           "test": test, "setting": cfg, "seed": seed, "recipe": RECIPE,
           "params": sum(p.numel() for p in model.parameters()), "load": os.getloadavg()[0],
           "revision": git_revision(),
           "threads": torch.get_num_threads()}
    atomic_write(path, lambda tmp: torch.save(rec, tmp))
    log(f"trained {name} seed {seed}: {secs:.0f} s, train loss {hist.final['train_loss']:.4f}, "
        f"test acc {test['accuracy']:.4f}")
    return rec


def cached_models(args, name: str, cfg: dict) -> list | None:
    paths = [model_path(args, name, cfg, s) for s in SEEDS]
    if not all(p.exists() for p in paths):
        return None
    return [torch.load(p, weights_only=False) for p in paths]


def load(rec: dict, cfg: dict):
    m = build(cfg, rec["seed"])
    m.load_state_dict(rec["state_dict"])
    return m.eval()


# --- phase 2: measuring ---------------------------------------------------------------------
def git_revision() -> dict:
    def git(*a):
        try:
            return subprocess.run(["git", "-C", str(ROOT), *a], capture_output=True, text=True,
                                  check=True).stdout.strip()
        except (OSError, subprocess.CalledProcessError):  # an exported tree: say which
            return os.environ.get("LMC_SCALE_REV", "unknown")
    return {"commit": git("rev-parse", "--short", "HEAD"), "src_tree": git("rev-parse",
            "--short", "HEAD:src"), "src_dirty": bool(git("status", "--porcelain", "src"))}


def has_bn(model) -> bool:
    return any(isinstance(m, torch.nn.modules.batchnorm._BatchNorm) for m in model.modules())


def fixes_for(model) -> list[str]:
    return ["plain"] + (["bn_reset"] if has_bn(model) else []) + ["repair"]


def measure_pair(a, b, train_ds, test_ds, smoke: bool, log) -> dict:
    """Curves and barriers of one seed pair for every alignment x correction."""
    test = make_loader(test_ds, 1000)
    fit = fit_batches(train_ds, smoke)
    ts = [0.0, 0.5, 1.0] if smoke else TS
    spec = spec_from_model(a, fit[0][0][:2])
    ends = [evaluate(a, test), evaluate(b, test)]
    row = {"ends": ends, "t": ts, "curves": {}, "align_s": {}, "revision": git_revision()}
    for align in ALIGNS:
        t0 = time.perf_counter()
        if align == "naive":
            bb = b
        else:
            perm = (weight_matching(spec, a, b, seed=0) if align == "wm"
                    else activation_matching(a, b, fit, method="corr", spec=spec))
            bb = apply_permutation(b, perm, spec)
        row["align_s"][align] = time.perf_counter() - t0
        for fix in fixes_for(a):
            loss, acc = [], []
            for t in ts:
                if t in (0.0, 1.0):
                    r = ends[int(t)]
                else:
                    m = interpolate(a, bb, t)
                    if fix == "bn_reset":
                        m = reset_bn(m, fit)
                    elif fix == "repair":
                        m = repair(a, bb, m, fit, t)
                    r = evaluate(m, test)
                loss.append(float(r["loss"]))
                acc.append(float(r["accuracy"]))
            c = {"loss": loss, "accuracy": acc, "t": ts}
            c.update({f"{k}_{d}": barrier(c, k, d) for k in ("loss", "accuracy")
                      for d in ("entezari", "frankle")})
            row["curves"][f"{align}/{fix}"] = c
            log(f"  {align}/{fix}: loss barrier {c['loss_entezari']:.4f}, acc barrier "
                f"{c['accuracy_entezari']:.4f}")
    return row


def row_path(args, name: str, cfg: dict, i: int, j: int) -> Path:
    ha, hb = (model_hash(cfg, SEEDS[k], args.smoke) for k in (i, j))
    return cache_dir(args) / "rows" / f"{name}-p{i}{j}-{ha}-{hb}.json"


def cached_rows(args, name: str, cfg: dict) -> list[dict]:
    paths = [row_path(args, name, cfg, i, j) for i, j in PAIRS]
    return [json.loads(p.read_text()) for p in paths if p.exists()]


def measure(args, name: str, cfg: dict, recs: list, log) -> list[dict]:
    rows = []
    rev = git_revision()
    for i, j in PAIRS:
        path = row_path(args, name, cfg, i, j)
        if path.exists():
            row = json.loads(path.read_text())
            stale = row["revision"]["src_tree"] != rev["src_tree"]
            if not (args.remeasure and stale):
                rows.append(row)
                continue
        log(f"measuring {name} pair {i}-{j}")
        t0 = time.perf_counter()
        train_ds, test_ds = data(cfg["image"], args.smoke)
        row = measure_pair(load(recs[i], cfg), load(recs[j], cfg), train_ds, test_ds,
                           args.smoke, log)
        row.update(setting=name, pair=[SEEDS[i], SEEDS[j]], seconds=time.perf_counter() - t0)
        atomic_write(path, lambda tmp, row=row: tmp.write_text(json.dumps(row, indent=1)))
        rows.append(row)
    return rows


# --- driver ---------------------------------------------------------------------------------
def main(argv=None):
    import _lmc_scale_pilots as pilots
    import _lmc_scale_report as report

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--settings", default="", help="comma-separated setting names (default all)")
    ap.add_argument("--smoke", action="store_true", help="tiny run (seconds) for the test suite")
    ap.add_argument("--reuse", "--measure-only", dest="reuse", action="store_true",
                    help="train nothing: measure/report only settings whose models are cached")
    ap.add_argument("--train-only", action="store_true")
    ap.add_argument("--report-only", action="store_true")
    ap.add_argument("--remeasure", action="store_true",
                    help="re-measure cached rows made by another revision of src/")
    ap.add_argument("--throughput", action="store_true")
    ap.add_argument("--pilot", action="store_true", help="time training steps at 28/20/14 px")
    ap.add_argument("--pilot-epochs", default="", metavar="SETTING:E1,E2,..",
                    help="train seed 0 of SETTING for each number of epochs (convergence pilot)")
    ap.add_argument("--cache", default="", help="cache folder (default ~/.cache/neuralign/"
                    "lmc_scale)")
    ap.add_argument("--out", default=str(ROOT / "docs" / "results"))
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    allset = settings(args.smoke)
    names = [n.strip() for n in args.settings.split(",") if n.strip()] or list(allset)
    bad = [n for n in names if n not in allset]
    if bad:
        ap.error(f"unknown setting(s) {bad}; choose from {', '.join(allset)}")
    t_start = time.time()

    def log(msg):
        print(f"[{time.strftime('%H:%M:%S')} +{time.time() - t_start:5.0f}s] {msg}", flush=True)

    if args.pilot:
        pilots.pilot(args, log)
    if args.pilot_epochs:
        pilots.pilot_epochs(args, args.pilot_epochs, log)
        return {}
    if args.throughput:
        pilots.throughput(args, log, repeats=2 if args.smoke else 5)
    results = {}
    for name in allset:
        cfg = allset[name]
        recs = cached_models(args, name, cfg)
        if name in names and recs is None and not (args.reuse or args.report_only):
            recs = [train_one(args, name, cfg, s, log) for s in SEEDS]
        if recs is None:
            continue
        if name in names and not (args.train_only or args.report_only):
            measure(args, name, cfg, recs, log)
        rows = cached_rows(args, name, cfg)
        if rows:
            results[name] = {"cfg": cfg, "models": [{k: v for k, v in r.items() if k != "state_dict"}
                                                  for r in recs], "rows": rows}
            if not args.smoke:  # partial results while a long run goes on
                report.write(results, cache_dir(args), Path(args.out), args.smoke, git_revision())
    if results:
        report.write(results, cache_dir(args), Path(args.out), args.smoke, git_revision())
    log("done")
    return results


if __name__ == "__main__":
    main()
