"""Selection, derived rows (WiSE-FT, output ensembles, A1, A2), tables, verdicts and figures of
benchmarks/levi_text.py. Everything here reads cached run records; nothing trains."""

from __future__ import annotations

import json
import math
import os
from pathlib import Path

import levi_text_units as U
import torch
from protocol import Paired, compare, verdict

from neuralign.finetune.levi_strategies import fit_temperature

ORDER = ("LP", "FT", "LP-FT", "WiSE-FT", "FT+RobustModel", "FS", "FT+FS", "LEVI (frozen)",
         "LEVI (LoRA)", "LEVI (full)", "A1", "A2", "A3", "A4", "A5", "LEVI (frozen, CLS pooling)",
         "LEVI (frozen, attention pooling)", "LEVI (frozen, last tap only)")
DS_TITLE = {"breeds": "WordNet sub-population shift (wordnet_breeds)",
            "spurious": "spurious-token variant (token random at OOD test)"}


def _acc(logits: dict, data: dict) -> dict:
    return {s: float((logits[s].argmax(1) == data[s]["y"]).float().mean()) for s in U.SPLITS}


def _row(scores, lr, params, seconds, grid_seconds, peak, **extra) -> dict:
    return dict(val=scores["val"], id=scores["test"], ood=scores["ood"], lr=lr, params=params,
                seconds=seconds, grid_seconds=grid_seconds, peak_mb=peak, **extra)


def _pick(cands: dict):
    """Key of the best ID-validation candidate (ties: the first)."""
    keys = list(cands)
    return max(keys, key=lambda k: (cands[k]["val"], -keys.index(k)))


def select_rows(res: dict, seed: int, all_seeds: dict, data: dict) -> dict:
    """One seed's rows after selection on ID validation."""
    out = {}
    for label, recs in res.items():
        cands = {lr: r["scores"] for lr, r in recs.items()}
        lr = _pick(cands)
        r = recs[lr]
        out[label] = _row(r["scores"], lr, r["params"], r["seconds"],
                          sum(x["seconds"] for x in recs.values()), r["peak_mb"])
    if "LP-FT" in res and "LP" in res:  # WiSE-FT: its own (rate, α) on ID validation
        lp = out["LP"]
        cands = {}
        for lr, r in res["LP-FT"].items():
            cands[(lr, 1.0)] = r["scores"]
            for a, w in r["info"].get("wise", {}).items():
                cands[(lr, float(a))] = w["scores"]
        cands[(lp["lr"], 0.0)] = {"val": lp["val"], "test": lp["id"], "ood": lp["ood"]}
        lr, a = _pick(cands)
        ft = out["LP-FT"]
        out["WiSE-FT"] = _row(cands[(lr, a)], lr, ft["params"], ft["seconds"] + lp["seconds"],
                              ft["grid_seconds"] + lp["grid_seconds"],
                              max(ft["peak_mb"], lp["peak_mb"]), alpha=a)
    if "FT" not in res:
        return out
    ft = res["FT"]
    partners = {"FT+RobustModel": ("LP", True), "FT+FS": ("FS", True), "A2": ("A4", False)}
    for name, (other, calibrate) in partners.items():
        if other not in res:
            continue
        o = res[other][out[other]["lr"]]
        cands = {}
        for lr, r in ft.items():
            temps = None
            if calibrate:
                yv = data["val"]["y"]
                temps = [fit_temperature(r["logits"]["val"].float(), yv),
                         fit_temperature(o["logits"]["val"].float(), yv)]
            cands[lr] = _acc(U.ensemble([r["logits"], o["logits"]], temps), data)
            cands[lr] = {"val": cands[lr]["val"], "test": cands[lr]["test"],
                         "ood": cands[lr]["ood"]}
        lr = _pick(cands)
        out[name] = _row(cands[lr], lr, ft[lr]["params"] + o["params"],
                         ft[lr]["seconds"] + o["seconds"],
                         out["FT"]["grid_seconds"] + out[other]["grid_seconds"],
                         max(ft[lr]["peak_mb"], o["peak_mb"]))
    seeds = sorted(all_seeds)
    nxt = [s for s in seeds[seeds.index(seed) + 1:] + seeds[:seeds.index(seed)]
           if "FT" in all_seeds[s]]
    if nxt:  # A1: FT of this seed with FT of the next seed, same rate
        ft2 = all_seeds[nxt[0]]["FT"]
        cands = {lr: _acc(U.ensemble([ft[lr]["logits"], ft2[lr]["logits"]]), data) for lr in ft}
        cands = {lr: {"val": c["val"], "test": c["test"], "ood": c["ood"]}
                 for lr, c in cands.items()}
        lr = _pick(cands)
        out["A1"] = _row(cands[lr], lr, 2 * ft[lr]["params"],
                         ft[lr]["seconds"] + ft2[lr]["seconds"], 2 * out["FT"]["grid_seconds"],
                         max(ft[lr]["peak_mb"], ft2[lr]["peak_mb"]), partner_seed=nxt[0])
    return out


# ------------------------------------------------------------------------------ tables
def _pp(x: float, signed: bool = False) -> str:
    if math.isnan(x):
        return "–"
    return f"{100 * x:+.1f}" if signed else f"{100 * x:.1f}"


def _delta(p: Paired | None) -> str:
    if p is None or p.n == 0:
        return "–"
    return f"{_pp(p.mean, True)} ± {_pp(p.se)} (n={p.n})"


def per_seed(rows: dict, label: str, key: str) -> dict:
    return {s: r[label][key] for s, r in rows.items() if label in r}


def _mean(xs) -> float:
    xs = list(xs)
    return sum(xs) / len(xs) if xs else math.nan


def table(rows: dict) -> list[str]:
    head = ("| row | ID acc | OOD acc | ΔID vs FT ± SE | ΔOOD vs FT ± SE | params trained | "
            "train s (selected run) | train s (all grid runs) | peak MB | rate (α) selected |")
    lines = [head, "|" + "---|" * 10]
    labels = [lb for lb in ORDER if any(lb in r for r in rows.values())]
    for lb in labels:
        acc = {k: per_seed(rows, lb, k) for k in ("id", "ood")}
        d = {k: compare({lb: acc[k], "FT": per_seed(rows, "FT", k)}, lb, "FT")
             if lb != "FT" and per_seed(rows, "FT", k) else None for k in ("id", "ood")}
        rs = [r[lb] for r in rows.values() if lb in r]
        sel = ", ".join(f"{x['lr']:g}" + (f" (α={x['alpha']:g})" if "alpha" in x else "")
                        for x in rs)
        lines.append(
            f"| {lb} | {_pp(_mean(acc['id'].values()))} | {_pp(_mean(acc['ood'].values()))} | "
            f"{'(baseline)' if lb == 'FT' else _delta(d['id'])} | "
            f"{'(baseline)' if lb == 'FT' else _delta(d['ood'])} | "
            f"{_mean(x['params'] for x in rs):,.0f} | {_mean(x['seconds'] for x in rs):.1f} | "
            f"{_mean(x['grid_seconds'] for x in rs):.0f} | "
            f"{_mean(x['peak_mb'] for x in rs):.0f} | {sel} |")
    return lines


def _diff(rows, a, b, key) -> Paired | None:
    pa, pb = per_seed(rows, a, key), per_seed(rows, b, key)
    return compare({a: pa, b: pb}, a, b) if pa and pb else None


def _v(p: Paired | None) -> str:
    return "no data" if p is None else verdict(p)


def verdicts(rows: dict) -> list[str]:
    out = ["| claim | comparison | ΔID ± SE | ΔOOD ± SE | verdict |", "|---|---|---|---|---|"]

    def line(claim, a, b, rule):
        di, do = _diff(rows, a, b, "id"), _diff(rows, a, b, "ood")
        out.append(f"| {claim} | {a} − {b} | {_delta(di)} | {_delta(do)} | {rule(di, do)} |")

    def levi_vs_ft(di, do):
        if di is None or do is None:
            return "no data"
        vi, vo = _v(di), _v(do)
        if vo == "appears" and vi != "reversed":
            return f"supported (OOD above FT beyond 2 SE; ID {vi})"
        if vo == "reversed" or vi == "reversed":
            return f"contradicted (OOD {vo}, ID {vi})"
        return f"not resolved (OOD {vo}, ID {vi})"

    def worse(di, do):
        if di is None or do is None:
            return "no data"
        vi, vo = _v(di), _v(do)
        if "appears" in (vi, vo) and "reversed" not in (vi, vo):
            return "supported (the ablation is worse)"
        if "reversed" in (vi, vo):
            return f"contradicted (ID {vi}, OOD {vo})"
        return "not resolved (no difference beyond 2 SE)"

    for lv in ("LEVI (frozen)", "LEVI (LoRA)", "LEVI (full)"):
        line("LEVI ≥ FT on OOD with ID kept", lv, "FT", levi_vs_ft)
    for ab, ref in (("A1", "LEVI (full)"), ("A2", "LEVI (full)"), ("A3", "LEVI (frozen)"),
                    ("A4", "LEVI (frozen)"), ("A5", "LEVI (frozen)")):
        line(f"ablation {ab} worse than LEVI", ref, ab, worse)

    def early(di, do):
        if do is None:
            return "no data"
        vo = _v(do)
        return {"appears": "supported (OOD gain from the earlier taps)",
                "reversed": "contradicted (the earlier taps lower OOD)"}.get(
            vo, "not resolved (no OOD difference beyond 2 SE)")

    line("early taps help OOD", "LEVI (frozen)", "LEVI (frozen, last tap only)", early)
    return out


def _majority(data: dict) -> str:
    c = int(torch.bincount(data["train"]["y"]).argmax())
    acc = {s: float((data[s]["y"] == c).float().mean()) for s in ("test", "ood")}
    return (f"Always predicting the training set's most frequent class scores {_pp(acc['test'])} "
            f"ID / {_pp(acc['ood'])} OOD.")


def tap_table(rows: dict) -> list[str]:
    """The tap study: an MLP probe on one tap's mean-pooled states (frozen MiniLM)."""
    taps = [lb for lb in next(iter(rows.values()), {}) if lb.startswith("tap:")]
    out = ["| tap | ID acc | OOD acc | OOD − ID |", "|---|---|---|---|"]
    for t in taps:
        i, o = (_mean(per_seed(rows, t, k).values()) for k in ("id", "ood"))
        out.append(f"| {t[4:]} | {_pp(i)} | {_pp(o)} | {_pp(o - i, True)} |")
    return out


# ------------------------------------------------------------------------------ figures
def figures(all_rows: dict, results: dict, cfg: dict, out_dir: Path, prefix: str) -> list[str]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = []
    dss = list(all_rows)
    fig, axes = plt.subplots(1, len(dss), figsize=(6 * len(dss), 4.6), squeeze=False)
    for ax, ds in zip(axes[0], dss):
        rows = all_rows[ds]
        for lb in ORDER:
            ids, oods = per_seed(rows, lb, "id"), per_seed(rows, lb, "ood")
            if ids:
                x, y = 100 * _mean(ids.values()), 100 * _mean(oods.values())
                ax.scatter(x, y, color="C3" if lb.startswith("LEVI") else "C0")
                ax.annotate(lb.replace("LEVI ", "L"), (x, y), fontsize=6)
        ax.set(xlabel="ID test accuracy (%)", ylabel="OOD accuracy (%)", title=ds)
    fig.tight_layout()
    names.append(f"{prefix}_id_ood.png")
    _save(fig, out_dir / names[-1])
    fig, axes = plt.subplots(1, len(dss), figsize=(6 * len(dss), 4.2), squeeze=False)
    for ax, ds in zip(axes[0], dss):  # WiSE-FT α curves, one per rate (mean over seeds)
        res = results[ds]
        for lr in cfg["lr_grid"]:
            pts = []
            for a in [0.0, *cfg["alphas"], 1.0]:
                xs, ys = [], []
                for s in res.values():
                    if "LP-FT" not in s:
                        continue
                    if a == 0.0:
                        sc = s["LP"][max(s["LP"], key=lambda k: s["LP"][k]["scores"]["val"])][
                            "scores"]
                    elif a == 1.0:
                        sc = s["LP-FT"][lr]["scores"]
                    else:
                        sc = s["LP-FT"][lr]["info"]["wise"][str(a)]["scores"]
                    xs.append(sc["test"])
                    ys.append(sc["ood"])
                if xs:
                    pts.append((100 * _mean(xs), 100 * _mean(ys), a))
            if pts:
                ax.plot([p[0] for p in pts], [p[1] for p in pts], "o-", label=f"lr {lr:g}")
                for x, y, a in pts:
                    ax.annotate(f"{a:g}", (x, y), fontsize=6)
        ax.set(xlabel="ID test accuracy (%)", ylabel="OOD accuracy (%)",
               title=f"{ds}: WiSE-FT, α from LP (0) to LP-FT (1)")
        if ax.get_lines():
            ax.legend(fontsize=7)
    fig.tight_layout()
    names.append(f"{prefix}_wise_alpha.png")
    _save(fig, out_dir / names[-1])
    fig, axes = plt.subplots(1, len(dss), figsize=(6 * len(dss), 3.8), squeeze=False)
    for ax, ds in zip(axes[0], dss):
        rows = all_rows[ds]
        taps = [lb for lb in next(iter(rows.values()), {}) if lb.startswith("tap:")]
        for key, c in (("id", "C0"), ("ood", "C3")):
            ax.plot(range(len(taps)), [100 * _mean(per_seed(rows, t, key).values()) for t in taps],
                    "o-", color=c, label=key.upper())
        ax.set_xticks(range(len(taps)), [t[4:].replace("encoder.layer.", "L") for t in taps],
                      fontsize=7)
        ax.set(ylabel="accuracy (%)", title=f"{ds}: MLP probe on one tap (mean pooling)")
        ax.legend(fontsize=7)
    fig.tight_layout()
    names.append(f"{prefix}_taps.png")
    _save(fig, out_dir / names[-1])
    plt.close("all")
    return names


def _save(fig, path: Path):
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}.png")
    fig.savefig(tmp, dpi=110)
    os.replace(tmp, path)


def _write(path: Path, text: str):
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    tmp.write_text(text)
    os.replace(tmp, path)


def render(results: dict, cfg: dict, datas: dict, out_dir: Path, minutes: float, smoke: bool):
    from levi_text_doc import header

    out_dir.mkdir(parents=True, exist_ok=True)
    all_rows = {ds: {s: select_rows(r, s, res, datas[ds]) for s, r in res.items()}
                for ds, res in results.items()}
    prefix = "levi_text"
    figs = figures(all_rows, results, cfg, out_dir, prefix)
    lines = header(cfg, datas, minutes, smoke)
    total = sum(r["seconds"] for res in results.values() for seed in res.values()
                for recs in seed.values() for r in recs.values())
    n_runs = sum(len(recs) for res in results.values() for seed in res.values()
                 for recs in seed.values())
    lines += ["", (f"Compute: {n_runs} training runs, {total / 60:.1f} min of training in all "
              "(one thread; evaluation and the one-off MiniLM pass over the texts not counted).")]
    for ds, rows in all_rows.items():
        lines += ["", f"## {DS_TITLE.get(ds, ds)}", "",
                  f"Seeds with rows: {', '.join(map(str, sorted(rows)))}. {_majority(datas[ds])}",
                  "", *table(rows), "",
                  "### Verdicts for the paper's claims", "", *verdicts(rows), "",
                  "### Tap study (MLP probe on one frozen tap, mean pooling; same grid)", "",
                  *tap_table(rows)]
    lines += ["", "## Figures", ""] + [f"![{f}]({f})" for f in figs]
    _write(out_dir / f"{prefix}.md", "\n".join(lines) + "\n")
    js = {ds: {str(s): r for s, r in rows.items()} for ds, rows in all_rows.items()}
    _write(out_dir / f"{prefix}.json", json.dumps(js, indent=1, default=str))
    return all_rows


def tensor_free(x):
    return {k: v for k, v in x.items() if not torch.is_tensor(v)}
