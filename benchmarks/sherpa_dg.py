"""SHERPA vs ERM and robust fine-tuning baselines, leave-one-domain-out, under the shared
protocol (benchmarks/protocol.py): one learning-rate grid for every row, selection on
training-domain validation (DomainBed, as the SHERPA paper), >= 10 paired seeds, paired
differences to ERM with standard errors, compute as runs x epochs.

Default data (installed here): rotated Fashion-MNIST domains rot0..rot75 of classes 0-4
(disjoint images, ``--per-domain`` each; the left-out domain is the test set, >= 500 images at
full scale). The backbone M and the anchor backbone B are the same small CNN pre-trained with
seeds 0 and 1 on another distribution (classes 5-9 of the full training split, random angles in
[0, 90)); both cached under ~/.cache/neuralign/backbones; their linear probes on the source
domains are reported (they must be within 2 points: an anchor weaker than M proves nothing).
Anchors: B fine-tuned on the sources like ERM (rate picked on training-domain validation from
the same grid), seeds 100.., one shared head initialisation; A=k is the uniform soup of k.

Rows (``--methods``): erm, erm2x (ERM for twice the epochs: the compute of anchor + ERM), lpft
(converged probe, then fine-tuning), rp_anc (random permutation with the anchor's head: the
control of the head transplant), sh_new (SHERPA head=new: provably ERM, run to show it),
sh_anc_a1, sh_anc_a6 (head=anchor with 1 / n anchors), sh_lam_a1 (lambda start, lam=0.5,
head=anchor); optional: rp_new (= ERM too), lp, wise, sel (Kendall-tau block selection).

    .venv/bin/python benchmarks/sherpa_dg.py            # full scale: docs/results/sherpa_dg.md
    .venv/bin/python benchmarks/sherpa_dg.py --smoke    # < 1 minute, writes under the cache

DomainBed-layout data with local weights (no downloads):

    .venv/bin/python benchmarks/sherpa_dg.py --data /data/PACS --arch torchvision:resnet50 \\
        --weights m.pth --anchor-weights b.pth --epochs 30 --image-size 224 --out ...
"""

from __future__ import annotations

import argparse
import copy
import sys
import time
from functools import partial
from pathlib import Path

import torch
from torch.utils.data import TensorDataset

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))
sys.path.insert(0, str(ROOT / "benchmarks"))

import protocol as P  # noqa: E402
from _parallel import available_cores, pool_map  # noqa: E402
from _sherpa_dg_report import ANCHOR_KEY, report  # noqa: E402

from neuralign.data import list_domains, load_domains  # noqa: E402
from neuralign.data.rotated import leave_one_domain_out, rotate, rotated_fashion_mnist  # noqa: E402
from neuralign.finetune import finetune  # noqa: E402
from neuralign.finetune.lpft import probe_head  # noqa: E402
from neuralign.finetune.sherpa import soup  # noqa: E402
from neuralign.models import get_model, replace_head  # noqa: E402
from neuralign.train import evaluate, train  # noqa: E402

DG_CLASSES, PT_CLASSES = [0, 1, 2, 3, 4], [5, 6, 7, 8, 9]
LABELS = {
    "erm": "ERM",
    "erm2x": "ERM, 2x epochs",
    "lpft": "LP-FT (converged probe)",
    "lp": "Linear probe",
    "wise": "WiSE-FT (alpha=0.5)",
    "rp_new": "Random perm., head=new (= ERM)",
    "rp_anc": "Random perm., head=anchor, A=1",
    "sh_new": "SHERPA head=new (= ERM)",
    "sh_anc_a1": "SHERPA head=anchor, A=1",
    "sh_anc_a6": "SHERPA head=anchor, A=n",
    "sh_lam_a1": "SHERPA lambda start (0.5), head=anchor, A=1",
    "sh_sel_a1": "SHERPA-select (Kendall-tau), A=1",
}
DEFAULT_METHODS = "erm,erm2x,lpft,rp_anc,sh_new,sh_anc_a1,sh_anc_a6,sh_lam_a1"
FULL = dict(per_domain=600, pretrain_size=None, pretrain_epochs=8, width=16, epochs=6, px=14,
            lr_grid=(1e-2, 3e-2, 1e-1, 3e-1), seeds=10, n_anchors=6, align_batches=10)
SMOKE = dict(per_domain=40, pretrain_size=400, pretrain_epochs=1, width=4, epochs=1, px=14,
             lr_grid=(1e-2, 3e-2), seeds=2, n_anchors=2, align_batches=2, targets="rot0,rot45")


def shrink(x: torch.Tensor, px: int) -> torch.Tensor:
    """28 px images at ``px`` (a mean pool; 14 px costs a quarter of the compute)."""
    if px == x.shape[-1]:
        return x
    if x.shape[-1] % px:
        raise SystemExit(f"--px must divide {x.shape[-1]}, got {px}")
    return torch.nn.functional.avg_pool2d(x, x.shape[-1] // px)


def materialize(ds) -> TensorDataset:
    xs, ys = zip(*[ds[i] for i in range(len(ds))])
    return TensorDataset(torch.stack([torch.as_tensor(x) for x in xs]), torch.as_tensor(ys))


def pretrain(args, seed: int):
    """A backbone pre-trained on P_pt (classes 5-9 at random angles), cached by config."""
    conf = {"benchmark": "sherpa_dg", "arch": args.arch, "width": args.width, "seed": seed,
            "n": args.pretrain_size, "epochs": args.pretrain_epochs, "lr": 0.05, "wd": 5e-4}
    if args.px != 28:
        conf["px"] = args.px

    def make():
        torch.manual_seed(seed)
        return get_model(args.arch, num_classes=len(PT_CLASSES), in_channels=1, image_size=args.px,
                         width=args.width)

    def fit(model):
        doms = rotated_fashion_mnist(angles=(0, 1), classes=PT_CLASSES, seed=100 + seed,
                                     root=args.data_root, per_domain=None if
                                     args.pretrain_size is None else args.pretrain_size // 2)
        x = torch.cat([d.tensors[0] for d in doms.values()])
        y = torch.cat([d.tensors[1] for d in doms.values()])
        g = torch.Generator().manual_seed(seed)
        x = shrink(rotate(x, torch.rand(len(x), generator=g) * 90.0, fill=float(x.amin())),
                   args.px)
        train(model, TensorDataset(x, y), epochs=args.pretrain_epochs, lr=0.05,
              weight_decay=5e-4, batch_size=128, seed=seed, progress=False)

    return P.cached_backbone("sherpa_dg_pt", conf, make, fit)


def _pretrain_unit(args, seed: int) -> int:
    pretrain(args, seed)
    return seed


def backbones(args):
    if args.data == "rotated_fashion_mnist":
        if (args.workers or available_cores()) > 1:  # M and B side by side, then from cache
            list(pool_map(partial(_pretrain_unit, args), (0, 1)))
        (m, im), (b, ib) = pretrain(args, 0), pretrain(args, 1)
        return m, b, {"M": im, "B": ib}
    m = (get_model(args.arch, weights=args.weights, allow_pickle=True) if args.weights
         else get_model(args.arch))
    if args.anchor_weights:
        b = get_model(args.arch, weights=args.anchor_weights, allow_pickle=True)
    else:
        print("warning: no --anchor-weights; the anchor backbone is a second initialisation",
              flush=True)
        torch.manual_seed(1)
        b = (get_model(args.arch, weights=args.weights, allow_pickle=True) if args.weights
             else get_model(args.arch))
    return m, b, {}


def domains_and_splits(args):
    if args.data == "rotated_fashion_mnist":
        doms = rotated_fashion_mnist(classes=DG_CLASSES, per_domain=args.per_domain, seed=0,
                                     root=args.data_root)
        doms = {k: TensorDataset(shrink(d.tensors[0], args.px), d.tensors[1])
                for k, d in doms.items()}
        return list(doms), lambda t: leave_one_domain_out(doms, t, val_fraction=0.2, seed=0)
    return list_domains(args.data), lambda t: load_domains(
        args.data, t, image_size=args.image_size, val_fraction=0.2, seed=0)


# --------------------------------------------------------------------------- one run


def _ft(model, task, *, lr, seed, epochs, strategy="full", **opts):
    return finetune(model, task["train"], strategy=strategy, epochs=epochs, lr=lr,
                    num_classes=task["k"], val_data=task["val"], select="best_val",
                    seed=seed, batch_size=task["batch"], weight_decay=task["wd"],
                    progress=False, reset_head=True, bn=task["bn"], **opts)


def _method(key: str, task: dict, seed: int, epochs: int):
    if key in ("erm", "erm2x"):
        return "full", {}, epochs * (2 if key == "erm2x" else 1)
    if key == "lpft":
        return "lp_ft", {}, epochs
    if key == "lp":
        return "linear_probe", {}, epochs
    if key == "wise":
        return "wise_ft", {"alpha": 0.5, "lp_epochs": max(1, epochs // 3)}, epochs
    if key.startswith("rp_"):
        opts = {"perm_seed": 1000 + seed, "head": "new" if key == "rp_new" else "anchor"}
        if key == "rp_anc":
            opts["anchor"] = task["anchors"][0]
        return "random_perm", opts, epochs
    if key.startswith("sh_"):
        kind, na = (key.split("_") + ["a1"])[1:3]
        opts = {"anchor": task["anchors"][0] if na == "a1" else task["anchors"],
                "head": "new" if kind in ("new", "sel") else "anchor",
                "align_batches": task["align_batches"]}
        if kind == "lam":
            opts["lam"] = 0.5
        return ("sherpa_select" if kind == "sel" else "sherpa"), opts, epochs
    raise SystemExit(f"unknown method {key!r}; known: {', '.join(LABELS)}")


def dg_run(lr, seed, task, *, key):
    strategy, opts, epochs = _method(key, task, seed, task["epochs"])
    t0 = time.perf_counter()
    res = _ft(task["M"], task, lr=lr, seed=seed, epochs=epochs, strategy=strategy, **opts)
    ev = lambda d: evaluate(res.model, d)["accuracy"]  # noqa: E731
    return P.Run(lr=lr, scores={"train_domain_val": ev(task["val"]), "test": ev(task["test"])},
                 epochs=epochs, info={"seconds": time.perf_counter() - t0,
                                      "equivalent_to_erm": res.info.get("equivalent_to_erm")})


def _anchor_unit(job) -> tuple[str, list, dict]:
    target, B, task, proto, n = job
    return (target, *make_anchors(B, task, proto, n))


def make_anchors(B, task, proto, n: int) -> tuple[list, dict]:
    """n anchors: B fine-tuned on the sources (ERM; rate picked on training-domain validation
    from the protocol's grid with anchor 0), one shared head initialisation (soups need it)."""
    start = replace_head(B, task["k"], seed=100)
    kw = dict(epochs=task["epochs"], strategy="full")
    tries = []
    for lr in proto.lr_grid:
        m = _ft(start, task, lr=lr, seed=100, **kw).model
        tries.append((evaluate(m, task["val"])["accuracy"], -lr, lr, m))
    _, _, lr, first = max(tries, key=lambda t: (t[0], t[1]))
    anchors = [first] + [_ft(start, task, lr=lr, seed=100 + i, **kw).model for i in range(1, n)]
    info = {"lr": lr, "a1_ood": evaluate(first, task["test"])["accuracy"],
            "soup_ood": evaluate(soup(anchors), task["test"])["accuracy"] if n > 1 else None,
            "runs": len(proto.lr_grid) + n - 1, "epochs": task["epochs"]}
    return anchors, info


def probe_quality(model, split) -> float:
    """Linear-probe accuracy (converged, L2 picked on validation) of a backbone's features on
    the source domains, measured on the training-domain validation split."""
    m = replace_head(copy.deepcopy(model), split.num_classes, seed=0)
    probe_head(m, materialize(split.train), materialize(split.val), split.num_classes)
    return evaluate(m, materialize(split.val))["accuracy"]


def parse(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--smoke", action="store_true", help="tiny end-to-end run (< 1 minute)")
    p.add_argument("--data", default="rotated_fashion_mnist")
    p.add_argument("--data-root", default=None)
    p.add_argument("--arch", default="cnn")
    p.add_argument("--width", type=int, default=None)
    p.add_argument("--weights", default=None)
    p.add_argument("--anchor-weights", default=None)
    p.add_argument("--targets", default=None, help="comma-separated left-out domains")
    p.add_argument("--methods", default=DEFAULT_METHODS)
    p.add_argument("--seeds", type=int, default=None)
    p.add_argument("--epochs", type=int, default=None)
    p.add_argument("--lr-grid", default=None, help="comma-separated rates (default 4 points)")
    p.add_argument("--weight-decay", type=float, default=0.0)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--bn", default="train", choices=("frozen", "adapt", "train"))
    p.add_argument("--per-domain", type=int, default=None)
    p.add_argument("--pretrain-size", type=int, default=None)
    p.add_argument("--pretrain-epochs", type=int, default=None)
    p.add_argument("--n-anchors", type=int, default=None)
    p.add_argument("--align-batches", type=int, default=None)
    p.add_argument("--image-size", type=int, default=224, help="DomainBed-layout data")
    p.add_argument("--px", type=int, default=None,
                   help="side of the rotated Fashion-MNIST images (default 14: a 2x2 mean pool "
                        "of the 28 px images, a quarter of the compute)")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--workers", type=int, default=None,
                   help="worker processes over (domain, seed) units, one torch thread each "
                        "(default: every core)")
    p.add_argument("--out", default=None)
    p.add_argument("--report-only", action="store_true")
    args = p.parse_args(argv)
    base = SMOKE if args.smoke else FULL
    for k, v in base.items():
        if k == "lr_grid":
            continue
        if getattr(args, k, None) is None:
            setattr(args, k, v)
    args.lr_grid = (tuple(float(x) for x in args.lr_grid.split(",")) if args.lr_grid
                    else base["lr_grid"])
    args.argv = list(argv if argv is not None else sys.argv[1:])
    return args


def main(argv=None) -> dict:
    args = parse(argv)
    torch.set_num_threads(args.threads)
    methods = args.methods.split(",")
    for m in methods:
        if m not in LABELS:
            raise SystemExit(f"unknown method {m!r}; known: {', '.join(LABELS)}")
    if "sh_anc_a6" in methods:
        LABELS["sh_anc_a6"] = f"SHERPA head=anchor, A={args.n_anchors}"
    proto = P.Protocol("sherpa_dg", args.lr_grid, P.PAPER_SELECTION["sherpa"], args.epochs,
                       tuple(range(args.seeds)), bn=args.bn)
    names, split_fn = domains_and_splits(args)
    targets = args.targets.split(",") if args.targets else names
    tag = "smoke" if args.smoke else ("rotated" if args.data == "rotated_fashion_mnist"
                                      else Path(args.data).name)
    out = Path(args.out) if args.out else (P.cache_root() / "smoke" / "sherpa_dg" if args.smoke
                                           else ROOT / "docs" / "results" / "sherpa_dg")
    runs = out.parent / f"{out.name}_runs.json"  # committed: a fresh cache resumes from it
    store = P.ResultStore(P.cache_root() / "results" / f"sherpa_dg_{tag}.json", seed_from=runs)
    M, B, pt = backbones(args)
    store.bind({"backbones": {k: P.file_digest(v["path"]) for k, v in sorted(pt.items())}
                or {"M": args.weights, "B": args.anchor_weights},  # and what defines a run:
                "lr_grid": list(proto.lr_grid), "epochs": args.epochs, "bn": args.bn,
                "per_domain": args.per_domain, "px": args.px, "batch": args.batch_size,
                "weight_decay": args.weight_decay})
    meta: dict = {"pretrain": pt, "probe": {}}
    needs_anchor = any(m.startswith("sh_") or m == "rp_anc" for m in methods)
    n_anchor = args.n_anchors if "sh_anc_a6" in methods else 1
    tasks, anchor_jobs = {}, []
    for i, target in enumerate(targets):
        sp = split_fn(target)
        tasks[target] = {"M": M, "train": materialize(sp.train), "val": materialize(sp.val),
                         "test": materialize(sp.test), "k": sp.num_classes,
                         "batch": args.batch_size, "wd": args.weight_decay, "bn": args.bn,
                         "epochs": args.epochs, "align_batches": args.align_batches,
                         "anchors": []}
        if i == 0 and args.data == "rotated_fashion_mnist":
            meta["probe"] = {"M": probe_quality(M, sp), "B": probe_quality(B, sp)}
        done = all(f"{proto.name}|{target}|{s}|{m}" in store
                   for s in proto.seeds for m in methods)
        if needs_anchor and not done and not args.report_only:
            anchor_jobs.append((target, B, tasks[target], proto, n_anchor))
    # anchors of every unfinished domain in parallel; their descriptions go to the store
    for target, anchors, info in pool_map(_anchor_unit, anchor_jobs, workers=args.workers):
        tasks[target]["anchors"] = anchors
        store[f"{ANCHOR_KEY}{target}"] = info
    rows = [P.Method(m, partial(dg_run, key=m)) for m in methods]
    # seed-major: a run cut short leaves whole seeds (every domain), which the report can pair
    jobs = [] if args.report_only else [(t, seed, rows, tasks[t]) for seed in proto.seeds
                                        for t in targets]
    P.run_seeds(proto, jobs, store, workers=args.workers, export=runs)
    report(store, proto, args, meta, targets, methods, out, LABELS)
    store.export(runs)
    runs_only = {k: v for k, v in store.runs().items() if not k.startswith(ANCHOR_KEY)}
    return {"store": runs_only, "meta": meta, "out": str(out)}


if __name__ == "__main__":
    main()
