"""SHERPA vs robust fine-tuning baselines, leave-one-domain-out (DomainBed style).

Default (CPU scale, data installed here): rotated Fashion-MNIST domains rot0..rot75 of classes
0-4; M and the anchor backbone B are a small CNN pre-trained (seeds 0 and 1) on a different
distribution, classes 5-9 at random angles in [0, 90). Every method fine-tunes on the source
domains with training-domain validation (best epoch on the held-out 20% of the sources) and is
tested on the left-out domain; 3 seeds.

    .venv/bin/python benchmarks/sherpa_dg.py                       # writes docs/results/sherpa_dg*

The same script on DomainBed-layout data (PACS / VLCS / TerraIncognita) with local weights:

    .venv/bin/python benchmarks/sherpa_dg.py --data /data/PACS --arch torchvision:resnet50 \
        --weights resnet50_imagenet.pth --anchor-weights resnet50_other_seed.pth \
        --epochs 30 --lr 1e-3 --batch-size 32 --image-size 224 --out docs/results/sherpa_dg_pacs
"""

from __future__ import annotations

import argparse
import json
import sys
import time
import traceback
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import TensorDataset

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

from neuralign.data import list_domains, load_domains, make_loader  # noqa: E402
from neuralign.data.rotated import leave_one_domain_out, rotate, rotated_fashion_mnist  # noqa: E402
from neuralign.finetune import finetune  # noqa: E402
from neuralign.finetune.basic import OutputEnsemble  # noqa: E402
from neuralign.finetune.sherpa import soup  # noqa: E402
from neuralign.models import block_names, get_model, replace_head  # noqa: E402
from neuralign.train import evaluate, train  # noqa: E402

DG_CLASSES, PT_CLASSES = [0, 1, 2, 3, 4], [5, 6, 7, 8, 9]
LABELS = {
    "erm": "ERM",
    "lp": "LP",
    "lpft": "LP-FT",
    "wise": "WiSE-FT (alpha=0.5)",
    "erm2x": "ERM, 2x epochs (compute of anchor + ERM)",
    "ens": "Ensemble (m=6)",
    "rp": "Random perm.",
    "sh_new_a1": "SHERPA head=new, A=1",
    "sh_new_a6": "SHERPA head=new, A=6",
    "sh_anc_a1": "SHERPA head=anchor, A=1",
    "sh_anc_a6": "SHERPA head=anchor, A=6",
    "sh_lam_a1": "SHERPA head=anchor, lam=0.5, A=1",
    "sh_sel_a1": "SHERPA-select (Kendall-tau), A=1",
    "anchor_a1": "(anchor A=1 itself)",
    "anchor_a6": "(anchor soup A=6 itself)",
}
DEFAULT_METHODS = "erm,erm2x,lp,lpft,ens,rp,sh_new_a1,sh_new_a6,sh_anc_a1,sh_anc_a6,sh_lam_a1,sh_sel_a1"


def materialize(ds) -> TensorDataset:
    """A TensorDataset copy (fast batches) of any (x, y) dataset."""
    xs, ys = zip(*[ds[i] for i in range(len(ds))])
    return TensorDataset(torch.stack([torch.as_tensor(x) for x in xs]), torch.as_tensor(ys))


def pretrain(args, seed: int) -> torch.nn.Module:
    """A backbone pre-trained on P_pt: Fashion-MNIST classes 5-9, random angles in [0, 90)."""
    cache = Path(args.cache) / f"pt_{args.arch}_w{args.width}_n{args.pretrain_size}_e{args.pretrain_epochs}_s{seed}.pt"
    torch.manual_seed(seed)
    model = get_model(args.arch, num_classes=len(PT_CLASSES), in_channels=1, image_size=28, width=args.width)
    if cache.exists():
        model.load_state_dict(torch.load(cache))
        return model
    doms = rotated_fashion_mnist(angles=(0, 1), classes=PT_CLASSES, seed=100 + seed, root=args.data_root,
                                 per_domain=args.pretrain_size // 2)
    x = torch.cat([d.tensors[0] for d in doms.values()])
    y = torch.cat([d.tensors[1] for d in doms.values()])
    g = torch.Generator().manual_seed(seed)
    x = rotate(x, torch.rand(len(x), generator=g) * 90.0, fill=float(x.amin()))
    t0 = time.perf_counter()
    train(model, TensorDataset(x, y), epochs=args.pretrain_epochs, lr=0.05, weight_decay=5e-4,
          batch_size=128, seed=seed, progress=False)
    print(f"pre-trained backbone seed {seed} in {time.perf_counter() - t0:.0f} s", flush=True)
    cache.parent.mkdir(parents=True, exist_ok=True)
    torch.save(model.state_dict(), cache)
    return model


def backbones(args):
    if args.data == "rotated_fashion_mnist":
        return pretrain(args, 0), pretrain(args, 1)
    m = get_model(args.arch, weights=args.weights, allow_pickle=True) if args.weights else get_model(args.arch)
    if args.anchor_weights:
        b = get_model(args.arch, weights=args.anchor_weights, allow_pickle=True)
    else:
        print("warning: no --anchor-weights; the anchor backbone is a second initialisation"
              + (" with the same weights" if args.weights else ""), flush=True)
        torch.manual_seed(1)
        b = get_model(args.arch, weights=args.weights, allow_pickle=True) if args.weights else get_model(args.arch)
    return m, b


def domains_and_splits(args):
    if args.data == "rotated_fashion_mnist":
        doms = rotated_fashion_mnist(classes=DG_CLASSES, per_domain=args.per_domain, seed=0, root=args.data_root)
        names = list(doms)
        return names, lambda t: leave_one_domain_out(doms, t, val_fraction=0.2, seed=0)
    names = list_domains(args.data)
    return names, lambda t: load_domains(args.data, t, image_size=args.image_size, val_fraction=0.2, seed=0)


def run(args) -> dict:
    torch.set_num_threads(args.threads)
    methods = args.methods.split(",")
    names, split_fn = domains_and_splits(args)
    targets = args.targets.split(",") if args.targets else names
    M, B = backbones(args)
    ft = dict(epochs=args.epochs, lr=args.lr, batch_size=args.batch_size, select="best_val",
              progress=False, weight_decay=args.weight_decay, reset_head=True)  # new label set
    out = {"config": vars(args), "domains": names, "results": {}, "analysis": {}}
    json_path = Path(args.out + (f".part{args.part}" if args.part is not None else "") + ".json")
    need_anchor = any(m.startswith("sh_") for m in methods)
    n_anchor = args.n_anchors if any(m.endswith("a6") for m in methods) else 1
    for target in targets:
        sp = split_fn(target)
        tr, va, te = materialize(sp.train), materialize(sp.val), materialize(sp.test)
        k = sp.num_classes
        run_kw = dict(num_classes=k, val_data=va, **ft)

        def score(model):
            return {"id": evaluate(model, va)["accuracy"], "ood": evaluate(model, te)["accuracy"]}

        def record(key, seed, model, t0):
            s = score(model)
            out["results"].setdefault(key, {}).setdefault(target, []).append(s)
            print(f"[{target}] {key:10s} seed {seed}: ID {s['id']:.4f} OOD {s['ood']:.4f} "
                  f"({time.perf_counter() - t0:.0f} s)", flush=True)

        anchors = []
        if need_anchor:  # the anchors share B and one head initialisation (soups need a shared start)
            b_start = replace_head(B, k, seed=100)
            for i in range(n_anchor):
                t0 = time.perf_counter()
                kw = {**run_kw, "reset_head": False}
                anchors.append(finetune(b_start, tr, strategy="full", seed=100 + i, **kw).model)
                if i == 0:
                    record("anchor_a1", 0, anchors[0], t0)
            a6 = soup(anchors)
            if n_anchor > 1:
                record("anchor_a6", 0, a6, time.perf_counter())
        erm_models = []
        for seed in range(args.seeds):
            for key in methods:
                if key == "ens":
                    continue
                t0 = time.perf_counter()
                strat, opts, lr = _method(key, anchors, seed, args)
                epochs = opts.pop("_epochs", args.epochs)
                res = finetune(M, tr, strategy=strat, seed=seed, **{**run_kw, "lr": lr, "epochs": epochs}, **opts)
                record(key, seed, res.model, t0)
                if key == "erm":
                    erm_models.append(res.model)
                if target == args.analysis_target and seed == 0 and key in ("erm", "sh_new_a1", "sh_anc_a1"):
                    _analysis(out, key, M, res, tr, va, te, run_kw, args)
        if "ens" in methods:
            t0 = time.perf_counter()
            for seed in range(len(erm_models), args.ensemble):
                erm_models.append(finetune(M, tr, strategy="full", seed=seed, **run_kw).model)
            record("ens", 0, OutputEnsemble(erm_models[: args.ensemble]), t0)
        json_path.parent.mkdir(parents=True, exist_ok=True)
        json_path.write_text(json.dumps(out, indent=1, default=str))
    return out


def _method(key, anchors, seed, args):
    lr = args.lr
    if key == "erm":
        return "full", {}, lr
    if key == "erm2x":
        return "full", {"_epochs": 2 * args.epochs}, lr
    if key == "lp":
        return "linear_probe", {}, 10 * lr
    if key == "lpft":
        return "lp_ft", {"lp_epochs": max(1, args.epochs // 3)}, lr
    if key == "wise":
        return "wise_ft", {"alpha": 0.5, "lp_epochs": max(1, args.epochs // 3)}, lr
    if key == "rp":
        return "random_perm", {"perm_seed": 1000 + seed}, lr
    if key.startswith("sh_"):
        _, kind, na = key.split("_")
        anchor = anchors[0] if na == "a1" else anchors
        opts = {"anchor": anchor, "head": "new" if kind == "new" else "anchor",
                "align_batches": args.align_batches}
        if kind == "lam":
            opts["lam"] = 0.5
        if kind == "sel":
            return "sherpa_select", {**opts, "head": "new"}, lr
        return "sherpa", opts, lr
    raise SystemExit(f"unknown method {key!r}; known: {', '.join(LABELS)}")


def _analysis(out, key, M, res, tr, va, te, run_kw, args):
    """Per-block L2 and CKA of the fine-tuned model to its start; loss contour; Kendall tau."""
    try:
        from neuralign.landscape import layer_cka, loss_surface, per_block_l2
        from neuralign.landscape.plots import plot_surface

        if key == "erm":
            start = finetune(M, tr, strategy="full", seed=0, **{**run_kw, "epochs": 0}).model
        else:
            start = res.info["aligned_start"]
        blocks = block_names(start)
        l2 = per_block_l2(start, res.model, blocks)
        mat, la, _ = layer_cka(start, res.model, make_loader(te, 128), n_examples=256)
        cka = {b: float(mat[i, i]) for i, b in enumerate(la)}
        entry = {"l2": l2, "cka": cka}
        if "block_kendall_tau" in res.info:
            entry["kendall_tau"] = res.info["block_kendall_tau"]
        if not args.no_contours:
            surf = loss_surface(res.model, make_loader(va, 256), steps=args.contour_steps, span=1.0, seed=0)
            png = Path(f"{args.out}_contour_{key}.png")
            plot_surface(surf, png, title=f"{LABELS[key]}: source-val loss around the solution")
            entry["contour"] = png.name
            entry["contour_loss_center"] = float(np.asarray(surf.loss)[args.contour_steps // 2, args.contour_steps // 2])
            entry["contour_loss_mean"] = float(np.mean(surf.loss))
        out["analysis"][key] = entry
    except Exception as exc:  # the main table must not be lost to an analysis error
        traceback.print_exc()
        out["analysis"][key] = {"error": f"{type(exc).__name__}: {exc}"}


def _avg_over_targets(per_target: dict, targets: list[str]) -> tuple[float, float, float]:
    """DomainBed: per seed, average over targets; then mean and std over seeds (ood), and ID mean."""
    n = min(len(per_target[t]) for t in targets)
    ood = np.array([[per_target[t][s]["ood"] for t in targets] for s in range(n)]).mean(1)
    idm = np.array([[per_target[t][s]["id"] for t in targets] for s in range(n)]).mean()
    return float(ood.mean()), float(ood.std()) if n > 1 else float("nan"), float(idm)


def report(out: dict, path: str) -> None:
    cfg, res = out["config"], out["results"]
    targets = [t for t in out["domains"] if all(t in v for v in res.values())]
    lines = ["# SHERPA and robust fine-tuning baselines: leave-one-domain-out", "",
             f"Command: `{('.venv/bin/python benchmarks/sherpa_dg.py ' + cfg.get('argv', '')).strip()}`", ""]
    merged = [f"`{m['file']}`: `{m['argv']}`" for m in out.get("merged", [])]
    if merged:
        lines += ["Merged from runs with the same configuration: " + "; ".join(merged) + ".", ""]
    lines += _setup_text(cfg) + [""]
    head = "| method | " + " | ".join(f"{t} OOD" for t in targets) + " | avg OOD (mean ± std over seeds) | avg ID (source val) |"
    lines += ["## Accuracy (%), target = the left-out domain", "", head, "|" + "---|" * (len(targets) + 3)]
    summary = {}
    for key in [k for k in LABELS if k in res]:
        pt = res[key]
        if not all(t in pt for t in targets):
            continue
        m, s, idm = _avg_over_targets(pt, targets)
        summary[key] = (m, s)
        cells = [f"{100 * np.mean([r['ood'] for r in pt[t]]):.1f}" for t in targets]
        sd = "–" if np.isnan(s) else f"{100 * s:.1f}"
        lines.append(f"| {LABELS[key]} | " + " | ".join(cells) + f" | {100 * m:.1f} ± {sd} | {100 * idm:.1f} |")
    lines += ["", "Ensemble and anchor rows are single runs per target (no seed spread).", ""]
    lines += _claim_text(summary) + [""]
    lines += _analysis_text(out)
    Path(path + ".md").write_text("\n".join(lines) + "\n")
    _plot(summary, path + "_ood.png")


def _setup_text(cfg):
    if cfg["data"] == "rotated_fashion_mnist":
        data = (f"Rotated Fashion-MNIST, domains rot0/15/30/45/60/75 (disjoint images, {cfg['per_domain']} per domain, "
                f"classes 0-4: T-shirt, Trouser, Pullover, Dress, Coat); 20% of each source domain held out "
                "for training-domain validation (best epoch). Pre-training distribution P_pt: Fashion-MNIST "
                f"classes 5-9 (Sandal, Shirt, Sneaker, Bag, Ankle boot) rotated by random angles in [0, 90) degrees, "
                f"{cfg['pretrain_size']} images, {cfg['pretrain_epochs']} epochs; M = seed 0, anchor backbone B = seed 1.")
    else:
        data = f"DomainBed-layout folder `{cfg['data']}`, image size {cfg['image_size']}."
    return [
        "## Setup", "", data, "",
        f"Model `{cfg['arch']}` (width {cfg['width']}); every method: SGD momentum 0.9, lr {cfg['lr']} "
        f"(LP: 10x), cosine schedule, batch {cfg['batch_size']}, {cfg['epochs']} epochs (LP-FT: "
        f"{max(1, cfg['epochs'] // 3)} LP epochs + {cfg['epochs']} FT epochs), weight decay {cfg['weight_decay']}, "
        f"{cfg['seeds']} seeds (head init + data order); every method starts from a fresh head (new label set). Anchors: B fine-tuned on the sources like ERM "
        f"(one shared head initialisation, data-order seeds 100..{99 + cfg['n_anchors']}); A=6 is their uniform weight soup. SHERPA aligns by activation "
        f"correlation (Eq. 1) on {cfg['align_batches']} source batches. Random perm.: a different random "
        "permutation per seed. CPU-scaled (2 shared cores): tiny model, small domains, few epochs; the "
        "paper uses ResNet-50 from ImageNet on PACS/VLCS/TerraIncognita for 30 epochs.",
    ]


def _claim_text(summary):
    out = ["## The paper's claim: SHERPA's average OOD > ERM's, with a smaller spread than random perm.", ""]
    if "erm" not in summary:
        return out + ["(ERM not run)"]
    em, es = summary["erm"]
    rs = summary.get("rp", (np.nan, np.nan))[1]
    for key in [k for k in summary if k.startswith("sh_")]:
        m, s = summary[key]
        verdict = "reproduces" if (m > em and (np.isnan(rs) or s < rs)) else "does not reproduce"
        out.append(f"- {LABELS[key]}: {100 * m:.1f} ± {100 * s:.1f} vs ERM {100 * em:.1f} ± {100 * es:.1f} "
                   f"({100 * (m - em):+.1f}); spread vs random perm. {100 * rs:.1f}: **{verdict}** the claim.")
    return out


def _analysis_text(out):
    an = out.get("analysis", {})
    if not an:
        return []
    lines = [f"## Analysis (target {out['config']['analysis_target']}, seed 0): start vs fine-tuned", ""]
    for what, title in (("l2", "Per-block L2 distance (paper Table 4)"), ("cka", "Per-block CKA on target data (paper Table 5)"),
                        ("kendall_tau", "Kendall-tau distance between M and pi(M), per block")):
        rows = {k: v[what] for k, v in an.items() if what in v}
        if not rows:
            continue
        blocks = list(next(iter(rows.values())))
        lines += [f"### {title}", "", "| method | " + " | ".join(blocks) + " |", "|" + "---|" * (len(blocks) + 1)]
        lines += [f"| {LABELS[k]} | " + " | ".join(f"{v.get(b, float('nan')):.4f}" for b in blocks) + " |" for k, v in rows.items()]
        lines.append("")
    pics = [(k, v) for k, v in an.items() if "contour" in v]
    if pics:
        lines += ["### Loss contours (filter-normalised random directions, source-val loss)", ""]
        lines += [f"- {LABELS[k]}: ![]({v['contour']}) centre loss {v['contour_loss_center']:.3f}, mean over the "
                  f"grid {v['contour_loss_mean']:.3f}" for k, v in pics]
    errs = [f"- {k}: {v['error']}" for k, v in an.items() if "error" in v]
    return lines + (["", "Analysis errors:", *errs] if errs else [])


def _plot(summary, png):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    keys = list(summary)
    fig, ax = plt.subplots(figsize=(8, 0.4 * len(keys) + 1.2))
    m = [100 * summary[k][0] for k in keys]
    s = [0 if np.isnan(summary[k][1]) else 100 * summary[k][1] for k in keys]
    ax.barh([LABELS[k] for k in keys], m, xerr=s, color=["C3" if k.startswith("sh_") else "C0" for k in keys])
    ax.set_xlim(min(m) - 5, max(m) + 3)
    ax.invert_yaxis()
    ax.set_xlabel("average OOD accuracy over left-out domains (%)")
    fig.tight_layout()
    fig.savefig(png, dpi=120)
    plt.close(fig)


def parse(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--data", default="rotated_fashion_mnist", help="rotated_fashion_mnist or a DomainBed folder")
    p.add_argument("--data-root", default=None, help="Fashion-MNIST folder")
    p.add_argument("--arch", default="cnn")
    p.add_argument("--width", type=int, default=8, help="width of the reference CNN")
    p.add_argument("--weights", default=None, help="local pre-trained weights of M (model names)")
    p.add_argument("--anchor-weights", default=None, help="local pre-trained weights of the anchor backbone")
    p.add_argument("--targets", default=None, help="comma-separated left-out domains (default: all)")
    p.add_argument("--methods", default=DEFAULT_METHODS)
    p.add_argument("--seeds", type=int, default=3)
    p.add_argument("--epochs", type=int, default=6)
    p.add_argument("--lr", type=float, default=0.02)
    p.add_argument("--weight-decay", type=float, default=0.0)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--per-domain", type=int, default=200)
    p.add_argument("--pretrain-size", type=int, default=6000)
    p.add_argument("--pretrain-epochs", type=int, default=4)
    p.add_argument("--n-anchors", type=int, default=6)
    p.add_argument("--ensemble", type=int, default=6)
    p.add_argument("--align-batches", type=int, default=10)
    p.add_argument("--image-size", type=int, default=224)
    p.add_argument("--analysis-target", default="rot45")
    p.add_argument("--no-contours", action="store_true")
    p.add_argument("--contour-steps", type=int, default=9)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--jobs", type=int, default=2, help="worker processes (targets split among them)")
    p.add_argument("--part", type=int, default=None, help=argparse.SUPPRESS)
    p.add_argument("--cache", default="/tmp/neuralign_sherpa_dg_cache")
    p.add_argument("--out", default=str(ROOT / "docs" / "results" / "sherpa_dg"))
    p.add_argument("--report-only", action="store_true", help="rewrite the markdown from the JSON")
    p.add_argument("--merge", action="append", default=[],
                   help="with --report-only: add the methods of another run's JSON (same setup)")
    args = p.parse_args(argv)
    args.argv = " ".join(argv if argv is not None else sys.argv[1:])
    return args


def _merge(out: dict, other: dict) -> None:
    for key, per_target in other["results"].items():
        mine = out["results"].setdefault(key, {})
        mine.update({t: v for t, v in per_target.items() if t not in mine})
    for key, entry in other.get("analysis", {}).items():
        out["analysis"].setdefault(key, entry)


def _run_jobs(args, argv) -> dict:
    """Run the targets in ``args.jobs`` processes (one thread each) and merge their JSON."""
    import subprocess

    targets = args.targets.split(",") if args.targets else domains_and_splits(args)[0]
    chunks = [targets[i :: args.jobs] for i in range(args.jobs)]
    base = [a for a in argv if a != "--jobs" and not a.startswith("--jobs=")]
    base = [a for i, a in enumerate(base) if i == 0 or base[i - 1] != "--jobs"]
    procs = [subprocess.Popen([sys.executable, __file__, *base, "--jobs", "1", "--part", str(i),
                               "--targets", ",".join(c)]) for i, c in enumerate(chunks) if c]
    if any(p.wait() != 0 for p in procs):
        raise SystemExit("a worker process failed")
    out = None
    for i in range(len(procs)):
        part = Path(f"{args.out}.part{i}.json")
        other = json.loads(part.read_text())
        if out is None:
            out = other
            out["domains"] = [t for t in other["domains"] if t in targets]
        else:
            _merge(out, other)
        part.unlink()
    out["config"]["argv"] = " ".join(argv)
    return out


def main(argv=None) -> dict:
    args = parse(argv)
    if args.report_only:
        out = json.loads(Path(args.out + ".json").read_text())
        for extra in args.merge:
            other = json.loads(Path(extra).read_text())
            _merge(out, other)
            out.setdefault("merged", []).append({"file": Path(extra).name, "argv": other["config"].get("argv", "")})
    else:
        t0 = time.perf_counter()
        argv = list(argv if argv is not None else sys.argv[1:])
        out = _run_jobs(args, argv) if args.jobs > 1 else run(args)
        out["seconds"] = time.perf_counter() - t0
        if args.part is not None:
            return out
        Path(args.out + ".json").write_text(json.dumps(out, indent=1, default=str))
    report(out, args.out)
    print(f"wrote {args.out}.md", flush=True)
    return out


if __name__ == "__main__":
    main()
