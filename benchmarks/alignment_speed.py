"""Weight matching, objective versus time: neuralign vs the ``rebasin`` package (PyPI 0.0.47,
``PermutationCoordinateDescent``) on the same pair of models, in the same process.

torchvision resnet18, resnet50 and vit_b_16 with random weights (model A seeded s, model B
seeded s + 100). Each (model, seed) is one unit run in a worker process with one torch thread
(``benchmarks/_parallel.py``; finished units are cached, so a rerun resumes). Per unit:

* neuralign end to end with the default stopping rule (``tol=1e-3``): spec tracing, matching,
  applying the permutation (run twice, before and after the full run; the faster counts);
* neuralign to full convergence (``tol=0``), recording the objective after every sweep (the
  time-to-objective curve);
* rebasin end to end (setup, ``calculate_permutations``, ``apply_permutations``), recording its
  objective after every sweep; the time spent measuring that objective (on a copy) is taken off
  its clock.

Objective: ``sum_k <A_k, P(B)_k>`` over the tensors of neuralign's spec (higher is better; the
same formula on the model rebasin returns). From the curves: the time neuralign needs to reach
rebasin's final objective and 99.9% of its own converged objective (spec time included).

    .venv/bin/python benchmarks/alignment_speed.py [--models resnet18,resnet50] [--workers 2]
        [--threads 1] [--no-rebasin] [--rerun]

Writes docs/results/alignment_speed.md, .json and .png.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import platform
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _parallel import available_cores, run_units

OUT = Path(__file__).resolve().parents[1] / "docs" / "results"
VERSION = "3"  # bump when what a unit measures changes


def build(arch, seed):
    import torchvision as tv

    torch.manual_seed(seed)
    a = getattr(tv.models, arch)().eval()
    torch.manual_seed(seed + 100)
    b = getattr(tv.models, arch)().eval()
    return a, b


def run_ours(a, b, x, seed, tol):
    from neuralign.align import weight_matching
    from neuralign.permute import apply_permutation
    from neuralign.spec import spec_from_model

    t0 = time.perf_counter()
    spec = spec_from_model(a, x)
    t_spec = time.perf_counter() - t0
    t1 = time.perf_counter()
    perm = weight_matching(spec, a, b, seed=seed, tol=tol)
    t_wm = time.perf_counter() - t1
    apply_permutation(b.state_dict(), perm, spec)
    total = time.perf_counter() - t0
    i = perm.info
    # the curve is the last coordinate-ascent run; what ran before it inside weight_matching
    # (a transformer's staged start) is on the clock too
    before = t_spec + t_wm - i["time_s"]
    return spec, {"total_s": total, "spec_s": t_spec, "sweeps": i["sweeps"],
                  "objective": i["objective"], "stopped": i["stopped"],
                  "start_s": t_wm - i["time_s"],
                  "curve_t": [before + t for t in i["time_history_s"]],
                  "curve_obj": i["objective_history"], "score_s": i["score_time_s"],
                  "lap_s": i["lap_time_s"], "skipped": i["groups_skipped"]}


def run_rebasin(a, b, x, seed, spec):
    from rebasin import PermutationCoordinateDescent

    from neuralign.align import weight_objective

    a2, b2 = copy.deepcopy(a), copy.deepcopy(b)
    torch.manual_seed(seed)
    t0 = time.perf_counter()
    pcd = PermutationCoordinateDescent(a2, b2, x)
    setup = time.perf_counter() - t0
    off = 0.0  # time spent measuring the objective, off the clock
    curve_t, curve_obj = [setup], [weight_objective(spec, a, b)]
    step = pcd._calculate_permutations_step

    def measured(loop):
        nonlocal off
        progress = step(loop)
        t = time.perf_counter()
        snap = copy.deepcopy(pcd)
        snap.apply_permutations()
        curve_obj.append(weight_objective(spec, a, snap.model_b))
        del snap
        off += time.perf_counter() - t
        curve_t.append(time.perf_counter() - t0 - off)
        return progress

    pcd._calculate_permutations_step = measured
    pcd.calculate_permutations(100)
    pcd.apply_permutations()
    total = time.perf_counter() - t0 - off
    return {"total_s": total, "setup_s": setup, "sweeps": len(curve_t) - 1,
            "objective": weight_objective(spec, a, pcd.model_b), "curve_t": curve_t,
            "curve_obj": curve_obj, "groups": len(pcd.pinit.model_graph.permutation_to_info)}


def unit(u):
    a, b = build(u["model"], u["seed"])
    x = torch.randn(1, 3, 224, 224, generator=torch.Generator().manual_seed(0))
    row = {"model": u["model"], "seed": u["seed"], "threads": torch.get_num_threads(),
           "load_start": os.getloadavg()[0]}
    # the default run twice (before and after the full one), keeping the faster: the first
    # call in a fresh process also pays one-off warm-up costs
    spec, first = run_ours(a, b, x, u["seed"], tol=1e-3)
    row["groups"] = len(spec)
    _, row["full"] = run_ours(a, b, x, u["seed"], tol=0.0)
    _, second = run_ours(a, b, x, u["seed"], tol=1e-3)
    row["default"] = min(first, second, key=lambda d: d["total_s"])
    row["default"]["repeats_s"] = [first["total_s"], second["total_s"]]
    if u["rebasin"]:
        try:
            row["rebasin"] = run_rebasin(a, b, x, u["seed"], spec)
        except Exception as exc:  # noqa: BLE001 - report what the package does
            row["rebasin_error"] = f"{type(exc).__name__}: {str(exc)[:120]}"
    row["load_end"] = os.getloadavg()[0]
    return row


def first_time(curve_t, curve_obj, target):
    """Time at which a curve first reaches ``target`` (None if never)."""
    return next((t for t, o in zip(curve_t, curve_obj) if o >= target), None)


def summarise(r):
    full, d = r["full"], r["default"]
    s = {"ours_default_s": d["total_s"], "ours_default_obj": d["objective"],
         "ours_full_s": full["total_s"], "ours_full_obj": full["objective"],
         "t_999": first_time(full["curve_t"], full["curve_obj"], 0.999 * full["objective"])}
    if "rebasin" in r:
        rb = r["rebasin"]
        s.update(rebasin_s=rb["total_s"], rebasin_obj=rb["objective"],
                 t_reach_rebasin=first_time(full["curve_t"], full["curve_obj"], rb["objective"]))
        s["speedup_default"] = rb["total_s"] / d["total_s"]
        if s["t_reach_rebasin"]:
            s["speedup_to_rebasin_obj"] = rb["total_s"] / s["t_reach_rebasin"]
    return s


def _ms(v, fmt="{:.2f}"):
    v = np.asarray([x for x in v if x is not None], dtype=np.float64)
    if len(v) == 0:
        return "—"
    return fmt.format(v.mean()) if len(v) == 1 else (fmt + " ± " + fmt).format(v.mean(), v.std())


def plot(rows, path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    models = list(dict.fromkeys(r["model"] for r in rows))
    fig, axes = plt.subplots(1, len(models), figsize=(4.5 * len(models), 3.6), squeeze=False)
    for ax, m in zip(axes[0], models):
        for r in (r for r in rows if r["model"] == m):
            ref = r["full"]["objective"]
            ls = "-" if r["seed"] == rows[0]["seed"] else "--"
            ax.plot(r["full"]["curve_t"], np.array(r["full"]["curve_obj"]) / ref, "o" + ls,
                    color="C0", ms=3, label=f"neuralign (seed {r['seed']})")
            d = r["default"]
            ax.plot([d["total_s"]], [d["objective"] / ref], "*", color="C0", ms=11)
            if "rebasin" in r:
                rb = r["rebasin"]
                ax.plot(rb["curve_t"], np.array(rb["curve_obj"]) / ref, "s" + ls, color="C3",
                        ms=3, label=f"rebasin (seed {r['seed']})")
        ax.set_xscale("log")
        ax.set_title(m)
        ax.set_xlabel("seconds (1 thread)")
        ax.set_ylabel("objective / neuralign converged")
        ax.set_ylim(bottom=max(ax.get_ylim()[0], 0.85))
        ax.axhline(0.999, color="grey", lw=0.5)
        ax.legend(fontsize=7)
    fig.suptitle("weight matching: objective vs time\n(star: neuralign end to end, default tol=1e-3)",
                 fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def write(rows, args, wall):
    OUT.mkdir(parents=True, exist_ok=True)
    sums = [dict(summarise(r), model=r["model"]) for r in rows]
    loads = [r[k] for r in rows for k in ("load_start", "load_end")]
    lines = [
        "# Weight matching speed: objective versus time", "",
        f"Generated by `benchmarks/alignment_speed.py` "
        f"({time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}, {platform.machine()}, "
        f"{available_cores()} cores, {args.workers} worker processes with {args.threads} torch "
        f"thread(s) each, {wall / 60:.1f} min). Random torchvision weights, seeds "
        f"{args.seeds}, mean ± std over seeds. 1-min load average {min(loads):.1f}-"
        f"{max(loads):.1f} on {available_cores()} cores during the runs (the benchmark's own "
        f"{args.workers} workers count {args.workers}); both libraries run in the same process "
        "on the same pair of models, one after the other.", "",
        "Objective: `sum_k <A_k, P(B)_k>` over every tensor of neuralign's spec (higher is "
        "better; the same formula on the model rebasin returns). End to end = spec tracing (or "
        "rebasin's setup) + matching + applying the permutation.", "",
        "| model | groups (ours / rebasin) | ours, default tol=1e-3: s | objective | ours, tol=0: s "
        "| objective (converged) | ours: s to 99.9% of converged | rebasin: s | objective "
        "| ours: s to rebasin's objective | speed-up end to end (default) | speed-up to "
        "rebasin's objective |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for m in dict.fromkeys(s["model"] for s in sums):
        ss = [s for s in sums if s["model"] == m]
        rs = [r for r in rows if r["model"] == m]

        def col(k, fmt="{:.2f}", ss=ss):
            return _ms([s.get(k) for s in ss], fmt)
        rb_groups = next((r["rebasin"]["groups"] for r in rs if "rebasin" in r), "—")
        err = next((r["rebasin_error"] for r in rs if "rebasin_error" in r), None)
        lines.append(
            f"| {m} | {rs[0]['groups']} / {rb_groups} | {col('ours_default_s')} | "
            f"{col('ours_default_obj', '{:.1f}')} | {col('ours_full_s')} | "
            f"{col('ours_full_obj', '{:.1f}')} | {col('t_999')} | "
            f"{err or col('rebasin_s')} | {col('rebasin_obj', '{:.1f}')} | "
            f"{col('t_reach_rebasin')} | {col('speedup_default', '{:.1f}')}× | "
            f"{col('speedup_to_rebasin_obj', '{:.1f}')}× |")
    lines += ["", "![objective vs time](alignment_speed.png)", "",
              "Per run (curves: seconds and objective after the spec / setup and after each "
              "sweep):", "", "```", json.dumps(rows, indent=1), "```", ""]
    (OUT / "alignment_speed.md").write_text("\n".join(lines))
    (OUT / "alignment_speed.json").write_text(json.dumps(rows, indent=1))
    plot(rows, OUT / "alignment_speed.png")


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--models", default="resnet18,resnet50,vit_b_16")
    ap.add_argument("--seeds", default="0,1")
    ap.add_argument("--workers", type=int, default=available_cores())
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--no-rebasin", action="store_true")
    ap.add_argument("--rerun", action="store_true", help="ignore the cached units")
    args = ap.parse_args()
    units = [{"model": m, "seed": s, "rebasin": not args.no_rebasin}
             for m in args.models.split(",") for s in map(int, args.seeds.split(","))]
    t0 = time.time()
    rows = run_units(unit, units, name="alignment_speed", workers=args.workers,
                     threads=args.threads, version=VERSION, rerun=args.rerun)
    write(rows, args, time.time() - t0)


if __name__ == "__main__":
    main()
