"""LEVI vs. its baselines and ablations on Fashion-MNIST with spurious cues (CPU scale).

One command: ``.venv/bin/python benchmarks/levi.py`` writes ``docs/results/levi.md`` (tables,
mean +- std over seeds), ``docs/results/levi.json`` and two PNG plots.

Setting (LEVI's Corollary 3, built from real images; see ``neuralign.data.spurious``):
a ResNet-20 (x0.5) is pre-trained on Fashion-MNIST images carrying a top *barcode* cue that
agrees with the label 90% of the time; it is fine-tuned on other images carrying a bottom
*patch* cue (80%, blended at 0.6) and no barcode; ID test = the fine-tuning distribution, OOD test = images
carrying both cues drawn independently of the label. ``domain_gap``: pre-training sees classes
0-4 only, the task is classes 5-9, so the pre-trained features are insufficient.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

from neuralign.data import load_fashion_mnist_arrays
from neuralign.data.core import make_loader
from neuralign.data.spurious import levi_spurious_benchmark
from neuralign.finetune import finetune
from neuralign.finetune.basic import OutputEnsemble, interpolate_state, top_half_blocks
from neuralign.finetune.levi_strategies import calibrated_ensemble, efficiency_report
from neuralign.models import get_head_name, get_model
from neuralign.train import evaluate, train

MAIN_ROWS = ["FT", "HT", "LP", "FS", "LP-FT", "FT+RobustModel", "FT+ZeroShot", "FT+FS",
             "LEVI (frozen)", "LEVI (half)", "LEVI (LoRA)", "A1", "A2", "A3", "A4", "A5"]
GAP_ROWS = ["FT", "HT", "LP", "FS", "LP-FT", "FT+RobustModel", "FT+ZeroShot", "FT+FS",
            "LEVI (frozen)", "LEVI (half)"]


def nparams(model, prefixes=None):
    return sum(p.numel() for n, p in model.named_parameters()
               if prefixes is None or n.startswith(tuple(prefixes)))


def run_seed(variant, data, pre, args, seed, rows, tap_study):
    tr, val = data["finetune"], data["val"]
    k = int(tr.tensors[1].max()) + 1
    val_loader = make_loader(val, batch_size=256)
    common = dict(epochs=args.epochs, lr=args.lr, num_classes=k, val_data=val, seed=seed,
                  progress=False, batch_size=args.batch_size, reset_head=True)
    levi_kw = dict(small="cnn4", small_options={"widths": args.small_widths}, hidden=args.hidden)
    models, trainable, times = {}, {}, {}
    n_large = nparams(pre)
    head = get_head_name(pre)

    def fit(name, strategy, **kw):
        t = time.perf_counter()
        res = finetune(pre, tr, strategy=strategy, **{**common, **kw})
        times[name] = time.perf_counter() - t
        return res

    need = set(rows)
    if need & {"FT", "FT+RobustModel", "FT+FS", "A1", "A2"}:
        models["FT"] = fit("FT", "full").model
        trainable["FT"] = n_large
    if need & {"LP", "FT+RobustModel"}:
        models["LP"] = fit("LP", "linear_probe", lr=args.lr * 10).model
        trainable["LP"] = nparams(pre, [head])
    if "HT" in need:
        models["HT"] = fit("HT", "half").model
        trainable["HT"] = nparams(pre, [*top_half_blocks(pre), head])
    if need & {"FS", "FT+FS"}:
        models["FS"] = fit("FS", "from_scratch").model
        trainable["FS"] = n_large
    if need & {"LP-FT", "FT+ZeroShot"}:
        res = fit("LP-FT", "wise_ft", alpha=1.0, lp_epochs=max(1, args.epochs // 3),
                  lp_lr=args.lr * 10)
        models["LP-FT"] = res.model
        trainable["LP-FT"] = n_large
        # FT+ZeroShot (WiSE-FT): interpolate the probed start and the fine-tuned weights,
        # alpha chosen on the ID validation set (Appendix D.3)
        best = None
        for a in (0.25, 0.5, 0.75):
            m = get_model_like(res.model)
            m.load_state_dict(interpolate_state(res.info["start_state"], res.info["finetuned_state"], a))
            acc = evaluate(m, val_loader)["accuracy"]
            if best is None or acc > best[0]:
                best = (acc, a, m)
        models["FT+ZeroShot"] = best[2]
        trainable["FT+ZeroShot"] = n_large
    if "FT+RobustModel" in need:
        models["FT+RobustModel"], _ = calibrated_ensemble([models["FT"], models["LP"]], val_loader)
        trainable["FT+RobustModel"] = trainable["FT"] + trainable["LP"]
    if "FT+FS" in need:
        models["FT+FS"] = OutputEnsemble([models["FT"], models["FS"]])
        trainable["FT+FS"] = 2 * n_large
    for name, mode in (("LEVI (frozen)", "frozen"), ("LEVI (half)", "half"), ("LEVI (LoRA)", "lora")):
        if name in need:
            res = fit(name, "levi", large_mode=mode, lora_r=args.lora_r, **levi_kw)
            models[name], trainable[name] = res.model, res.info["trainable_params"]
    if need & {"A4", "A2"}:
        res = fit("A4", "levi", ablation="a4", **levi_kw)
        models["A4"], trainable["A4"] = res.model, res.info["trainable_params"]
    if "A1" in need:
        ft2 = fit("A1", "full", seed=seed + 1000).model
        models["A1"] = OutputEnsemble([models["FT"], ft2])
        trainable["A1"] = 2 * n_large
    if "A2" in need:
        models["A2"] = OutputEnsemble([models["FT"], models["A4"]])
        trainable["A2"] = n_large + trainable["A4"]
    if "A3" in need:
        res = fit("A3", "levi", ablation="a3", **levi_kw)
        models["A3"], trainable["A3"] = res.model, res.info["trainable_params"]
    if "A5" in need:
        res = fit("A5", "levi", ablation="a5", num_heads=3, **levi_kw)
        models["A5"], trainable["A5"] = res.model, res.info["trainable_params"]
    for tap in tap_study:
        res = fit(f"tap {tap}", "levi", ablation="a3", taps=tap, **levi_kw)
        models[f"tap {tap}"] = res.model
        trainable[f"tap {tap}"] = res.info["trainable_params"]
    out = {}
    x0 = tr.tensors[0][:1]
    for name in [*rows, *[f"tap {t}" for t in tap_study]]:
        m = models[name]
        eff = efficiency_report(m, x0, trainable=trainable[name])
        out[name] = {"id": evaluate(m, make_loader(data["id_test"], batch_size=500))["accuracy"],
                     "ood": evaluate(m, make_loader(data["ood_test"], batch_size=500))["accuracy"],
                     **eff, "seconds": times.get(name, 0.0)}
        print(f"  [{variant} seed {seed}] {name:16s} ID {out[name]['id']:.3f} "
              f"OOD {out[name]['ood']:.3f}", flush=True)
    return out


def get_model_like(model):
    import copy

    return copy.deepcopy(model)


def pretrain(data, args, k):
    torch.manual_seed(0)
    model = get_model("resnet20", num_classes=k, width=args.large_width)
    train(model, make_loader(data["pretrain"], batch_size=args.batch_size, shuffle=True, seed=0),
          epochs=args.pre_epochs, lr=args.lr, progress=False, seed=0)
    return model


def load_images():
    arr = load_fashion_mnist_arrays()
    mean, std = 0.2860, 0.3530
    to = lambda a: torch.from_numpy((a.astype(np.float32) / 255.0 - mean) / std).unsqueeze(1)
    return (to(arr["train_images"]), torch.from_numpy(arr["train_labels"].astype(np.int64)),
            to(arr["test_images"]), torch.from_numpy(arr["test_labels"].astype(np.int64)))


def cue(spec):
    kind, size, strength = spec.split(":")
    return {"kind": kind, "size": int(size), "strength": float(strength)}


def fmt(vals):
    v = np.asarray(vals, dtype=float) * 100
    return f"{v.mean():.1f} ± {v.std():.1f}"


def summarize(results, args):
    lines = ["# LEVI on Fashion-MNIST with spurious cues", "",
             f"Generated by `.venv/bin/python benchmarks/levi.py` ({args.seeds} seeds; "
             f"{time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}). Accuracy in %, mean ± std "
             "over fine-tuning seeds (the data and the pre-trained model are fixed).", "",
             *([f"This file merges (`--from-json {args.from_json}`) two processes run in parallel "
                "with the same settings to save wall time: the default command, stopped after its "
                "`spurious` variant, and `--variants domain_gap`.", ""]
               if getattr(args, "from_json", None) else []),
             "## Protocol (scaled down for 2 shared CPU cores)", "",
             f"- Large model: ResNet-20 (width x{args.large_width}), pre-trained for "
             f"{args.pre_epochs} epochs on {args.n_pretrain} Fashion-MNIST training images that "
             f"carry a top **barcode** cue (`{args.pre_cue}`: class-specific bits in the top rows) agreeing with the "
             f"label {args.rho_pre:.0%} of the time.",
             f"- Fine-tuning: {args.n_finetune} other training images (+{args.n_val} for validation, "
             f"used for temperature calibration and WiSE-FT's alpha) carrying a bottom **patch** cue "
             f"(`{args.ft_cue}`: a square blended towards white whose position along the bottom "
             f"border encodes the class) agreeing {args.rho_ft:.0%} "
             f"of the time, and no barcode. {args.epochs} epochs, SGD (momentum 0.9), lr "
             f"{args.lr} (linear probes {10 * args.lr}), cosine schedule, batch {args.batch_size}, "
             "new head for every large-model method. No learning-rate grid (the paper tunes lr on "
             "ID validation data; we could not afford it).",
             f"- ID test: {args.n_test} test images with the fine-tuning cue at the same correlation."
             f" OOD test: the same {args.n_test} images with both cues drawn independently of the "
             "label (neither predicts it).",
             "- `domain_gap`: pre-training on classes 0-4 only (same cue), the task is classes 5-9 "
             "(relabelled): the pre-trained features are insufficient.",
             f"- LEVI: small model CNN4 (widths {args.small_widths}, BN, ReLU, max-pool; the paper's "
             f"32/64/64/64 scaled down), adapting MLPs with {args.hidden} hidden units on taps "
             "layer1, layer2, layer3 (pooled), loss = mean of the head losses. `half`: top half of "
             f"the ResNet trains jointly; `LoRA`: rank-{args.lora_r} PEFT adapters on every conv/linear"
             " layer of the ResNet (not its head).",
             "- Baselines: FT full fine-tuning; HT top half of the blocks + head; LP linear probe; "
             "FS the ResNet trained from scratch; LP-FT; FT+RobustModel = temperature-calibrated "
             "output ensemble of FT and LP; FT+ZeroShot = WiSE-FT interpolation between the probed "
             "start and the LP-FT weights (alpha in {0.25, 0.5, 0.75} by ID validation accuracy); "
             "FT+FS = output ensemble of FT and FS.",
             "- Ablations (Appendix D.4): A1 output ensemble of two FT models; A2 of FT and the "
             "small model (A4); A3 LEVI without the small model; A4 small model + one adapting "
             "head; A5 small model + 3 heads.",
             "- Efficiency: trainable parameters, inference parameters (modules that run) and FLOPs "
             "per image (torch.utils.flop_counter, multiply-add = 2).", ""]
    for variant, per_seed in results.items():
        names = list(per_seed[0].keys())
        lines += [f"## {variant}", "",
                  "| method | ID acc | OOD acc | trainable params | inference params | FLOPs/img |",
                  "|---|---|---|---|---|---|"]
        for n in names:
            r0 = per_seed[0][n]
            lines.append(f"| {n} | {fmt([s[n]['id'] for s in per_seed])} | "
                         f"{fmt([s[n]['ood'] for s in per_seed])} | {r0['trainable_params']:,} | "
                         f"{r0['inference_params']:,} | {r0['flops'] / 1e6:.2f} M |")
        lines.append("")
        lines += claim_check(per_seed)
    return "\n".join(lines)


BASELINES = ["FT", "HT", "LP", "FS", "LP-FT", "FT+RobustModel", "FT+ZeroShot", "FT+FS"]


def claim_check(per_seed):
    """The paper's claim, checked on this variant: LEVI's OOD vs FT and every baseline."""
    names = per_seed[0].keys()
    mean = lambda n, k: float(np.mean([s[n][k] for s in per_seed]))
    base = [b for b in BASELINES if b in names]
    best_b = max(base, key=lambda n: mean(n, "ood"))
    out = ["Claim check (computed from the table above):", ""]
    for lv in [n for n in names if n.startswith("LEVI")]:
        d = np.array([s[lv]["ood"] - s["FT"]["ood"] for s in per_seed]) * 100
        di = np.array([s[lv]["id"] - s["FT"]["id"] for s in per_seed]) * 100
        beats = [b for b in base if mean(lv, "ood") > mean(b, "ood")]
        heavy = [h for h in ("FT+RobustModel", "FT+FS") if h in names]
        cost = ", ".join(
            f"{per_seed[0][lv]['trainable_params'] / per_seed[0][h]['trainable_params']:.2f}x the "
            f"trainable params and {per_seed[0][lv]['flops'] / per_seed[0][h]['flops']:.2f}x the "
            f"FLOPs of {h}" for h in heavy)
        out.append(f"- {lv}: OOD {d.mean():+.1f} ± {d.std():.1f} points vs FT (ID "
                   f"{di.mean():+.1f} ± {di.std():.1f}); higher mean OOD than "
                   f"{len(beats)}/{len(base)} baselines"
                   + ("" if len(beats) == len(base) else
                      f" (best baseline OOD: {best_b}, {mean(best_b, 'ood') * 100:.1f})")
                   + (f"; {cost}" if cost else "") + ".")
    out.append("")
    return out


def plot(results, out_dir):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    for variant, per_seed in results.items():
        names = [n for n in per_seed[0] if not n.startswith("tap ")]
        idm = [np.mean([s[n]["id"] for s in per_seed]) * 100 for n in names]
        oodm = [np.mean([s[n]["ood"] for s in per_seed]) * 100 for n in names]
        fig, ax = plt.subplots(figsize=(7, 5))
        for n, a, b in zip(names, idm, oodm):
            ax.scatter(a, b, c="C3" if n.startswith("LEVI") else ("C1" if n.startswith("A") else "C0"))
            ax.annotate(n, (a, b), fontsize=7, xytext=(3, 3), textcoords="offset points")
        ax.set_xlabel("ID accuracy (%)")
        ax.set_ylabel("OOD accuracy (%)")
        ax.set_title(f"LEVI vs baselines ({variant}), mean over seeds")
        fig.tight_layout()
        fig.savefig(out_dir / f"levi_{variant}_id_ood.png", dpi=120)
        plt.close(fig)
        taps = [n for n in per_seed[0] if n.startswith("tap ")]
        if taps:
            fig, ax = plt.subplots(figsize=(5, 3.5))
            x = np.arange(len(taps))
            for j, (key, c) in enumerate((("id", "C0"), ("ood", "C3"))):
                m = [np.mean([s[t][key] for s in per_seed]) * 100 for t in taps]
                e = [np.std([s[t][key] for s in per_seed]) * 100 for t in taps]
                ax.bar(x + (j - 0.5) * 0.38, m, 0.38, yerr=e, color=c, label=key.upper())
            ax.set_xticks(x, [t[4:] for t in taps])
            ax.set_ylabel("accuracy (%)")
            ax.set_title("one tap at a time (frozen large model)")
            ax.legend()
            fig.tight_layout()
            fig.savefig(out_dir / f"levi_{variant}_taps.png", dpi=120)
            plt.close(fig)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--seeds", type=int, default=3)
    p.add_argument("--variants", default="spurious,domain_gap")
    p.add_argument("--rows", default=None, help="comma-separated subset of the main rows")
    p.add_argument("--n-pretrain", type=int, default=10000)
    p.add_argument("--pre-epochs", type=int, default=3)
    p.add_argument("--n-finetune", type=int, default=500)
    p.add_argument("--n-val", type=int, default=400)
    p.add_argument("--n-test", type=int, default=1000)
    p.add_argument("--epochs", type=int, default=5)
    p.add_argument("--lr", type=float, default=0.05)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--large-width", type=float, default=0.5)
    p.add_argument("--small-widths", type=lambda s: [int(v) for v in s.split(",")],
                   default=[16, 32, 32, 32])
    p.add_argument("--hidden", type=int, default=128)
    p.add_argument("--lora-r", type=int, default=4)
    p.add_argument("--rho-pre", type=float, default=0.9)
    p.add_argument("--rho-ft", type=float, default=0.8)
    p.add_argument("--taps", default="layer1,layer2,layer3")
    p.add_argument("--ft-cue", default="patch:3:0.6", help="kind:size:strength of the data cue")
    p.add_argument("--pre-cue", default="barcode:3:1.0", help="kind:size:strength of the pre-training cue")
    p.add_argument("--out", default=str(ROOT / "docs" / "results"))
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--from-json", default=None,
                   help="comma-separated levi.json files of earlier runs (e.g. the two variants "
                        "run in parallel): merge them and only write the tables and plots")
    args = p.parse_args(argv)
    if args.from_json:
        results = {}
        for f in args.from_json.split(","):
            blob = json.loads(Path(f).read_text())
            results.update(blob["results"])
            saved = blob["args"]
        for k, v in saved.items():
            if k not in ("variants", "out", "from_json"):
                setattr(args, k, v)
        out_dir = Path(args.out)
        out_dir.mkdir(parents=True, exist_ok=True)
        (out_dir / "levi.json").write_text(json.dumps({"args": vars(args), "results": results},
                                                      indent=1))
        (out_dir / "levi.md").write_text(summarize(results, args) + "\n")
        plot(results, out_dir)
        print((out_dir / "levi.md").read_text())
        return
    torch.set_num_threads(args.threads)
    out_dir = Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    xtr, ytr, xte, yte = load_images()
    g = torch.Generator().manual_seed(0)
    results = {}
    for variant in args.variants.split(","):
        te = torch.randperm(xte.shape[0], generator=g)
        n_te = args.n_test if variant == "spurious" else 2 * args.n_test  # half the classes remain
        data = levi_spurious_benchmark(
            xtr, ytr, xte[te[:n_te]], yte[te[:n_te]], variant=variant, n_pretrain=args.n_pretrain,
            n_finetune=args.n_finetune, n_val=args.n_val, rho_pre=args.rho_pre, rho_ft=args.rho_ft,
            pre_cue=cue(args.pre_cue), ft_cue=cue(args.ft_cue), seed=0)
        t = time.perf_counter()
        pre = pretrain(data, args, int(data["pretrain"].tensors[1].max()) + 1)
        print(f"[{variant}] pre-trained in {time.perf_counter() - t:.0f}s", flush=True)
        rows = MAIN_ROWS if variant == "spurious" else GAP_ROWS
        if args.rows:
            rows = [r for r in args.rows.split(",") if r in rows]
        taps = args.taps.split(",") if variant == "spurious" and args.taps else []
        results[variant] = [run_seed(variant, data, pre, args, s, rows, taps)
                            for s in range(args.seeds)]
        (out_dir / "levi.json").write_text(json.dumps({"args": vars(args), "results": results},
                                                      indent=1))
    (out_dir / "levi.md").write_text(summarize(results, args) + "\n")
    plot(results, out_dir)
    print((out_dir / "levi.md").read_text())


if __name__ == "__main__":
    main()
