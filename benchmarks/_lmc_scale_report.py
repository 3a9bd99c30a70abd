"""Rendering of benchmarks/lmc_scale.py: the markdown results file, its JSON summary, the plots
and the verdicts, all computed from the cached per-pair rows (never typed in by hand)."""

from __future__ import annotations

import itertools
import json
import platform
import sys
import time
from pathlib import Path

import numpy as np
import torch

from neuralign.io import atomic_write

STEM = "lmc_scale"
GROUP_TITLES = {"resnet20-bn": "ResNet-20, BatchNorm", "resnet20-ln": "ResNet-20, LayerNorm",
                "mlp_curve": "MLP, 1 hidden layer (Entezari et al.), 10 epochs",
                "mlp_curve_e40": "MLP, 1 hidden layer (Entezari et al.), 40 epochs"}
CURVE_GROUPS = ("mlp_curve", "mlp_curve_e40")
FIX_STYLE = {"plain": "-", "bn_reset": "--", "repair": ":"}
ALIGN_COLOR = {"naive": "tab:gray", "wm": "tab:blue", "am": "tab:orange"}
ALIGN_NAME = {"naive": "naive", "wm": "weight matching", "am": "activation matching"}
PAIRED = [("wm/plain", "naive/plain"), ("am/plain", "naive/plain"),
          ("wm/bn_reset", "wm/plain"), ("wm/repair", "wm/plain"), ("wm/repair", "wm/bn_reset"),
          ("am/bn_reset", "am/plain"), ("am/repair", "am/plain"), ("am/repair", "am/bn_reset"),
          ("am/repair", "wm/repair")]


def mse(v) -> tuple[float, float]:
    """Mean and standard error (sample std / sqrt(n); NaN for one value)."""
    v = np.asarray(v, dtype=np.float64)
    se = v.std(ddof=1) / np.sqrt(len(v)) if len(v) > 1 else float("nan")
    return float(v.mean()), float(se)


def fmt(v, scale=1.0, nd=3, signed=False) -> str:
    m, s = mse(np.asarray(v, dtype=np.float64) * scale)
    sign = "+" if signed else ""
    return f"{m:{sign}.{nd}f} ± {s:.{nd}f}" if np.isfinite(s) else f"{m:{sign}.{nd}f}"


def methods(rows) -> list[str]:
    return list(rows[0]["curves"])


def values(rows, method, key) -> list[float]:
    return [r["curves"][method][key] for r in rows]


def mid(rows, method, kind) -> list[float]:
    return [r["curves"][method][kind][r["t"].index(0.5)] for r in rows]


# --- sections -------------------------------------------------------------------------------
def pilot_epochs_lines(cache: Path) -> list[str]:
    p = cache / "pilot_epochs.json"
    if not p.exists():
        return []
    runs = sorted(json.loads(p.read_text()).values(), key=lambda r: (r["setting"], r["epochs"]))
    lines = [("Convergence pilot (seed 0, one full cosine schedule per length; training loss at "
             "the end, test accuracy):"), "", ("| setting | epochs | final train loss | train acc "
             "| test acc | minutes |"), "|---|---|---|---|---|---|"]
    lines += [f"| {r['setting']} | {r['epochs']} | {r['train_loss']:.4f} | "
              f"{r['train_accuracy'] * 100:.1f} % | {r['test']['accuracy'] * 100:.2f} % | "
              f"{r['seconds'] / 60:.1f} |" for r in runs]
    return [*lines, ""]


def training_section(results) -> list[str]:
    lines = ["## Trained end points", "",
             ("| setting | parameters | image | epochs | lr | train loss, last 3 epochs "
             "(mean of 3 seeds) | final train acc | test acc (3 models) | minutes per model |"),
             "|---|---|---|---|---|---|---|---|---|"]
    total = 0.0
    for name, r in results.items():
        c, ms = r["cfg"], r["models"]
        hist = np.array([[e["train_loss"] for e in m["history"]] for m in ms]).mean(0)
        tracc = [m["history"][-1]["train_accuracy"] for m in ms]
        secs = [m["seconds"] for m in ms]
        total += sum(secs)
        lines.append(f"| {name} | {ms[0]['params']:,} | {c['image']}² | {c['epochs']} | {c['lr']} "
                     f"| {' → '.join(f'{h:.4f}' for h in hist[-3:])} | {fmt(tracc, 100, 1)} % "
                     f"| {fmt([m['test']['accuracy'] for m in ms], 100, 2)} % "
                     f"| {np.mean(secs) / 60:.1f} |")
    lines += ["", (f"One-off training compute for the settings above: {total / 3600:.2f} h of one "
              "CPU thread (sum of the per-model wall times on a shared 2-core machine, so an "
              "upper bound of the work)."), ""]
    return lines


def measured_at(rows) -> str:
    return ", ".join(sorted({x["revision"]["commit"] for x in rows}))


def barrier_section(name, r) -> list[str]:
    rows = r["rows"]
    lines = [f"### {name}", "",
             (f"{len(rows)} seed pair(s): {', '.join(str(tuple(x['pair'])) for x in rows)}. "
              f"End-point test accuracy "
              f"{fmt([e['accuracy'] for x in rows for e in x['ends']], 100, 2)} %. "
              f"Measured at {measured_at(rows)}."),
             "", ("| method | loss barrier | accuracy barrier (points) | test acc at t = 0.5 (%) | "
             "align time (s) |"), "|---|---|---|---|---|"]
    for m in methods(rows):
        al = m.split("/")[0]
        lines.append(f"| {m} | {fmt(values(rows, m, 'loss_entezari'))} | "
                     f"{fmt(values(rows, m, 'accuracy_entezari'), 100, 1)} | "
                     f"{fmt(mid(rows, m, 'accuracy'), 100, 1)} | "
                     f"{fmt([x['align_s'][al] for x in rows], 1, 1)} |")
    pairs = [(a, b) for a, b in PAIRED if a in rows[0]["curves"] and b in rows[0]["curves"]]
    if len(rows) > 1 and pairs:
        lines += ["", ("Paired differences over the seed pairs (negative = the first method has "
                  "the lower barrier):"), "", ("| difference | loss barrier | accuracy barrier "
                  "(points) |"), "|---|---|---|"]
        for a, b in pairs:
            dl = np.subtract(values(rows, a, "loss_entezari"), values(rows, b, "loss_entezari"))
            da = np.subtract(values(rows, a, "accuracy_entezari"),
                             values(rows, b, "accuracy_entezari"))
            lines.append(f"| {a} − {b} | {fmt(dl, signed=True)} | {fmt(da, 100, 1, True)} |")
    return lines + ["", f"![interpolation curves]({STEM}_curves_{name}.png)", ""]


def width_table(results, group) -> list[str]:
    items = sorted([(r["cfg"]["width"], n, r) for n, r in results.items()
                    if r["cfg"]["group"] == group], key=lambda x: x[0])
    if not items:
        return []
    ms = [m for m in methods(items[0][2]["rows"])]
    revs = measured_at([x for _, _, r in items for x in r["rows"]])
    lines = [f"### Barrier vs width: {GROUP_TITLES.get(group, group)}", "",
             ("Loss barrier (accuracy barrier in points below it), mean ± SE over seed pairs. "
             f"Measured at {revs}."), "",
             "| width | pairs | " + " | ".join(ms) + " |", "|---|---|" + "---|" * len(ms)]
    for w, n, r in items:
        rows = r["rows"]
        lines.append(f"| {w} | {len(rows)} | " + " | ".join(
            f"{fmt(values(rows, m, 'loss_entezari'))}<br>{fmt(values(rows, m, 'accuracy_entezari'), 100, 1)}"
            for m in ms) + " |")
    return lines + [""]


def throughput_section(cache: Path) -> list[str]:
    p = cache / "throughput.json"
    if not p.exists():
        return []
    t = json.loads(p.read_text())
    r1 = np.divide(t["stats"], t["plain2"])
    r2 = np.divide(t["repair"], t["plain3"])
    ips = lambda key, k: t["images"] * k / np.mean(t[key])
    return ["## Activation-statistics pass vs a plain forward pass", "",
            (f"{t['model']} ({'trained' if t['trained'] else 'untrained'}) pair, the same "
            f"{t['batches']} training batches ({t['images']} images) for every pass, "
            f"{t['threads']} thread(s), {t['repeats']} repeats (order alternated), revision "
            f"{t['revision']['commit']}. Ratios are per repeat, mean ± SE."), "",
            ("| pass | seconds | images × models per second | plain forward of the same models (s) | "
            "ratio |"), "|---|---|---|---|---|",
            (f"| matching statistics (A and B) | {fmt(t['stats'], 1, 3)} | {ips('stats', 2):.0f} "
            f"| {fmt(t['plain2'], 1, 3)} | {fmt(r1, 1, 2)} |"),
            (f"| REPAIR (A, B and the merged model) | {fmt(t['repair'], 1, 3)} | "
            f"{ips('repair', 3):.0f} | {fmt(t['plain3'], 1, 3)} | {fmt(r2, 1, 2)} |"), "",
            (f"Within 3× of a plain forward pass: matching {'yes' if np.mean(r1) <= 3 else 'NO'} "
            f"({np.mean(r1):.2f}×), REPAIR {'yes' if np.mean(r2) <= 3 else 'NO'} "
            f"({np.mean(r2):.2f}×)."), ""]


def pilot_text(cache: Path) -> str:
    p = cache / "pilot.json"
    if not p.exists():
        return ""
    t = {int(k): v for k, v in json.loads(p.read_text()).items()}
    steps = 60000 / 128
    return ("; pilot timing of one 128-image training step of ResNet-20×1 on one thread: "
            + ", ".join(f"{s} px {v * 1000:.0f} ms ({v * steps / 60:.1f} min per epoch)"
                        for s, v in sorted(t.items(), reverse=True))
            + "; 14 px keeps a width's three models well under an hour at ×1 and lets ×2 "
            "finish in a few hours of one thread")


def write(results, cache: Path, out: Path, smoke: bool, rev: dict) -> None:
    out.mkdir(parents=True, exist_ok=True)
    revs = sorted({f"{x['revision']['commit']} (src tree {x['revision']['src_tree']}"
                   f"{', uncommitted changes' if x['revision']['src_dirty'] else ''})"
                   for r in results.values() for x in r["rows"]})
    lines = ["# Linear mode connectivity of fully trained models (issue 15)", "",
             f"Generated by `benchmarks/lmc_scale.py {' '.join(sys.argv[1:])}` on "
             f"{time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())} ({platform.machine()}, "
             f"{torch.get_num_threads()} torch thread, report code at {rev['commit']}). "
             f"Measured with neuralign at: {'; '.join(revs)}."
             + (" **SMOKE RUN: tiny data, numbers meaningless.**" if smoke else ""), "",
             "**Protocol.** Fashion-MNIST: all 60,000 training images, the 10,000 official test "
             "images. Conv nets at 14×14 px (2×2 mean pool of the 28 px images"
             + pilot_text(cache) + "), MLPs at 28×28. Three models per "
             "setting (seeds 0, 1, 2; the seed sets the initialisation and the batch order), "
             "so three seed pairs (0,1), (0,2), (1,2); the pairs share models, so their "
             "standard errors are indicative. One recipe for every model: SGD with Nesterov "
             "momentum 0.9, batch 128, weight decay 5e-4, 200 warm-up steps then a cosine "
             "decay to zero, learning rate 0.05, no augmentation; 8 epochs (conv nets) or 10 "
             "and 40 epochs (MLPs). The length is bounded by the compute, not chosen by a "
             "plateau rule: the convergence pilot below shows how far the training loss "
             "still falls when the schedule is made longer, and the last three epochs of "
             "every setting are listed, so read \"fully trained\" as \"a complete schedule "
             "on all 60,000 images\" (the earlier benchmarks ran 1–2 epochs on 4,000). The "
             "linear path "
             "(1−t)·A + t·B(aligned) at t = 0, 0.1, …, 1. **Loss barrier** = max over t of "
             "[test loss(t) − ((1−t)·loss(0) + t·loss(1))] (Entezari); the **accuracy barrier** "
             "is the same on test accuracy with the sign flipped (a drop is positive). "
             "Alignments: naive (none), weight matching (Git Re-Basin, seed 0), activation "
             "matching (correlation, 5,000 training images). Corrections at every interior t: "
             "plain; BN reset (batch-norm statistics recomputed on the same 5,000 images; BN "
             "nets only); REPAIR (`neuralign.merge.repair`, same images, statistics "
             "interpolated between the end points). End points are the trained models as "
             "they are.", ""]
    lines += training_section(results)
    lines += pilot_epochs_lines(cache)
    lines += ["## Barriers", ""]
    for name, r in results.items():
        if r["cfg"]["group"] not in CURVE_GROUPS:
            lines += barrier_section(name, r)
    for g in GROUP_TITLES:
        lines += width_table(results, g)
        if g in CURVE_GROUPS and any(r["cfg"]["group"] == g for r in results.values()):
            lines += [f"![MLP interpolation curves]({STEM}_curves_{g}.png)", ""]
    lines += [f"![barrier vs width]({STEM}_width.png)", ""]
    lines += verdicts(results)
    lines += throughput_section(cache)
    text = "\n".join(lines) + "\n"
    atomic_write(out / f"{STEM}.md", lambda tmp: tmp.write_text(text))
    summary = {n: {"setting": r["cfg"], "models": [{k: v for k, v in m.items() if k != "history"}
                                                    for m in r["models"]],
                   "rows": r["rows"]} for n, r in results.items()}
    atomic_write(out / f"{STEM}.json",
                 lambda tmp: tmp.write_text(json.dumps(summary, indent=1, default=str)))
    plots(results, out)


# --- verdicts -------------------------------------------------------------------------------
def _diff(rows, a, b, key="loss_entezari"):
    return mse(np.subtract(values(rows, a, key), values(rows, b, key)))


def _word(m, s, pos="lower", neg="higher"):
    """'lower' / 'higher' when the difference m is beyond 2 SE, else 'within noise'."""
    if not np.isfinite(s) or abs(m) <= 2 * s:
        return "within noise of"
    return f"{pos} than" if m < 0 else f"{neg} than"


def _width_verdict(results, group, method) -> str | None:
    items = sorted([(r["cfg"]["width"], r) for r in results.values()
                    if r["cfg"]["group"] == group and method in r["rows"][0]["curves"]],
                   key=lambda x: x[0])
    if not items:
        return None
    title = GROUP_TITLES[group]
    if len(items) < 2:
        return (f"- {title}, {method}: only width {items[0][0]} measured so far: the width "
                "trend is not tested yet.")
    st = [mse(values(r["rows"], method, "loss_entezari")) for _, r in items]
    acc = [mse(np.array(values(r["rows"], method, "accuracy_entezari")) * 100) for _, r in items]
    (m0, s0), (m1, s1) = st[0], st[-1]
    d, sd = m1 - m0, float(np.hypot(s0, s1))
    mono = all(b[0] <= a[0] for a, b in itertools.pairwise(st))
    word = ("shrinks" if d < -2 * sd else "grows" if d > 2 * sd else "does not change beyond "
            "the noise")
    path = " → ".join(f"{m:.3f}" for m, _ in st)
    apath = " → ".join(f"{m:.1f}" for m, _ in acc)
    return (f"- {title}, {method}: the loss barrier {word} from width {items[0][0]} to "
            f"{items[-1][0]} ({path}; difference {d:+.3f} ± {sd:.3f}, "
            f"{'monotone' if mono else 'not monotone'}); accuracy barrier {apath} points.")


def verdicts(results) -> list[str]:
    """Plain-language checks of the papers' claims, computed from the rows."""
    lines = ["## Verdicts (generated from the numbers above)", "",
             ("A difference counts when it exceeds twice its standard error (seed pairs share "
             "models, so this is a loose test)."), "", "**Barrier shrinks with width.**"]
    for g, ms in (("resnet20-bn", ("naive/bn_reset", "wm/bn_reset", "wm/repair", "am/repair")),
                  ("resnet20-ln", ("naive/plain", "wm/plain", "wm/repair", "am/repair")),
                  ("mlp_curve", ("naive/plain", "wm/plain", "am/plain")),
                  ("mlp_curve_e40", ("naive/plain", "wm/plain", "am/plain"))):
        lines += [v for m in ms if (v := _width_verdict(results, g, m))]
    lines += ["", ("**REPAIR ≥ BN reset ≥ plain on BN nets** (paired over seed pairs; loss "
                   "barrier, then accuracy barrier in points).")]
    for name, r in results.items():
        rows = r["rows"]
        if "wm/bn_reset" not in rows[0]["curves"]:
            continue
        for al in ("wm", "am"):
            parts, holds = [], []
            for key, scale, nd in (("loss_entezari", 1, 3), ("accuracy_entezari", 100, 1)):
                d1, s1 = _diff(rows, f"{al}/bn_reset", f"{al}/plain", key)
                d2, s2 = _diff(rows, f"{al}/repair", f"{al}/bn_reset", key)
                d1, s1, d2, s2 = d1 * scale, s1 * scale, d2 * scale, s2 * scale
                ok = d1 <= 2 * np.nan_to_num(s1) and d2 <= 2 * np.nan_to_num(s2)
                holds.append("holds" if ok else "fails")
                parts.append(f"BN reset {_word(d1, s1)} plain ({d1:+.{nd}f} ± {s1:.{nd}f}), "
                             f"REPAIR {_word(d2, s2)} BN reset ({d2:+.{nd}f} ± {s2:.{nd}f})")
            lines.append(f"- {name}, {ALIGN_NAME[al]}: loss: {parts[0]}; accuracy: {parts[1]} "
                         f"→ the ordering {holds[0]} on the loss, {holds[1]} on the accuracy.")
    lines += ["", ("**Matching removes most of the barrier on nets without batch norm** (share "
              "of the naive loss barrier removed).")]
    for g in CURVE_GROUPS:
        items = sorted([(r["cfg"]["width"], r["rows"]) for r in results.values()
                        if r["cfg"]["group"] == g], key=lambda x: x[0])
        if items:
            share = [(w, 1 - mse(values(rows, "wm/plain", "loss_entezari"))[0]
                      / max(mse(values(rows, "naive/plain", "loss_entezari"))[0], 1e-9))
                     for w, rows in items]
            lines.append(f"- {GROUP_TITLES[g]}: weight matching removes "
                         + ", ".join(f"{v * 100:.0f} % (width {w})" for w, v in share) + ".")
    for name, r in results.items():
        rows = r["rows"]
        if "wm/bn_reset" in rows[0]["curves"] or r["cfg"]["group"] in CURVE_GROUPS:
            continue
        naive = mse(values(rows, "naive/plain", "loss_entezari"))[0]
        parts = []
        for m in ("wm/plain", "am/plain", "wm/repair", "am/repair"):
            v = mse(values(rows, m, "loss_entezari"))[0]
            frac = 1 - v / naive if naive > 1e-9 else float("nan")
            parts.append(f"{m} {frac * 100:.0f} %")
        best = max(1 - mse(values(rows, m, "loss_entezari"))[0] / max(naive, 1e-9)
                   for m in ("wm/plain", "am/plain", "wm/repair", "am/repair"))
        lines.append(f"- {name} (naive barrier {naive:.3f}): {', '.join(parts)} → "
                     f"{'most removed' if best > 0.5 else 'NOT most removed'}.")
    return lines + [""]


# --- plots ----------------------------------------------------------------------------------
def _curve_axes(ax, rows, kind, legend):
    t = rows[0]["t"]
    for m in methods(rows):
        al, fix = m.split("/")
        v = np.array([r["curves"][m][kind] for r in rows]) * (100 if kind == "accuracy" else 1)
        mean = v.mean(0)
        ax.plot(t, mean, FIX_STYLE[fix], color=ALIGN_COLOR[al], marker="o", ms=2.5, lw=1.4,
                label=f"{ALIGN_NAME[al]}, {fix.replace('_', ' ')}")
        if len(v) > 1:
            se = v.std(0, ddof=1) / np.sqrt(len(v))
            ax.fill_between(t, mean - se, mean + se, color=ALIGN_COLOR[al], alpha=0.12)
    ax.grid(alpha=0.3)
    ax.set_xlabel("t  (0 = model A, 1 = aligned model B)")
    if legend:
        ax.legend(fontsize=7)


def _curve_grid(plt, results, group, out: Path) -> None:
    curve = sorted([(r["cfg"]["width"], r) for r in results.values()
                    if r["cfg"]["group"] == group], key=lambda x: x[0])
    if not curve:
        return
    cols = 4
    nrow = -(-(len(curve) + 1) // cols)  # one spare panel for the legend
    fig, axes = plt.subplots(nrow, cols, figsize=(3.4 * cols, 2.9 * nrow), squeeze=False,
                             sharey=True)
    flat = axes.ravel()
    for ax, (w, r) in zip(flat, curve):
        _curve_axes(ax, r["rows"], "accuracy", False)
        ax.set_title(f"{w} hidden units", fontsize=10)
        ax.set_xlabel("t")
    for ax in axes[:, 0]:
        ax.set_ylabel("test accuracy (%)")
    handles, labels = flat[0].get_legend_handles_labels()
    for ax in flat[len(curve):]:
        ax.axis("off")
    flat[len(curve)].legend(handles, labels, loc="center", fontsize=9)
    fig.suptitle(f"{GROUP_TITLES[group]}: linear interpolation, mean ± SE over seed pairs")
    fig.tight_layout()
    fig.savefig(out / f"{STEM}_curves_{group}.png", dpi=100)
    plt.close(fig)


def plots(results, out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    for name, r in results.items():
        if r["cfg"]["group"] in CURVE_GROUPS:
            continue
        fig, axes = plt.subplots(1, 2, figsize=(11, 4))
        _curve_axes(axes[0], r["rows"], "loss", True)
        _curve_axes(axes[1], r["rows"], "accuracy", False)
        axes[0].set_ylabel("test loss")
        axes[1].set_ylabel("test accuracy (%)")
        fig.suptitle(f"{name}: linear interpolation, mean ± SE over {len(r['rows'])} seed pairs")
        fig.tight_layout()
        fig.savefig(out / f"{STEM}_curves_{name}.png", dpi=100)
        plt.close(fig)
    for g in CURVE_GROUPS:
        _curve_grid(plt, results, g, out)
    groups = [g for g in GROUP_TITLES if any(r["cfg"]["group"] == g for r in results.values())]
    if not groups:
        return
    fig, axes = plt.subplots(2, len(groups), figsize=(5 * len(groups), 7), squeeze=False)
    for col, g in enumerate(groups):
        items = sorted([(r["cfg"]["width"], r) for r in results.values()
                        if r["cfg"]["group"] == g], key=lambda x: x[0])
        ws = [w for w, _ in items]
        for row, (key, scale) in enumerate((("loss_entezari", 1), ("accuracy_entezari", 100))):
            ax = axes[row, col]
            for m in methods(items[0][1]["rows"]):
                al, fix = m.split("/")
                st = [mse(np.array(values(r["rows"], m, key)) * scale) for _, r in items]
                ax.errorbar(ws, [s[0] for s in st], yerr=[np.nan_to_num(s[1]) for s in st],
                            fmt=FIX_STYLE[fix], color=ALIGN_COLOR[al], marker="o", ms=3,
                            capsize=2, label=f"{ALIGN_NAME[al]}, {fix.replace('_', ' ')}")
            ax.set_xscale("log", base=2)
            ax.set_xlabel("width (multiplier / hidden units)")
            ax.set_ylabel("loss barrier" if row == 0 else "accuracy barrier (points)")
            ax.grid(alpha=0.3)
            ax.set_title(GROUP_TITLES[g])
        axes[0, col].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(out / f"{STEM}_width.png", dpi=100)
    plt.close(fig)
