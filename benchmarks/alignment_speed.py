"""Weight matching, objective versus time: neuralign vs the ``rebasin`` package (PyPI 0.0.47,
``PermutationCoordinateDescent``) on the same pair of models, in the same process.

torchvision resnet18, resnet50 and vit_b_16 with random weights (model A seeded s, model B
seeded s + 100). Each (model, seed) is one unit run in a worker process with one torch thread
(``benchmarks/_parallel.py``; finished units are cached, so a rerun resumes). Per unit:

* neuralign end to end with the default stopping rule (``tol=1e-3``): spec tracing, matching,
  applying the permutation, and rebasin end to end (setup, ``calculate_permutations``,
  ``apply_permutations``), after an untimed warm-up of both, alternating ``--repeats`` times
  (ours, theirs, ours, theirs, ...), so that drifts in machine speed fall on both; the per-seed
  speed-up is the ratio of their geometric means;
* neuralign to full convergence (``tol=0``), recording the objective after every sweep (the
  time-to-objective curve);
* rebasin's first run records its objective after every sweep; the time spent measuring that
  objective (on a copy) is taken off its clock.

Across seeds: the geometric mean speed-up with the standard error of the mean log speed-up
(delta method), and paired objective differences with their standard errors.

Objective: ``sum_k <A_k, P(B)_k>`` over the tensors of neuralign's spec (higher is better; the
same formula on the model rebasin returns). From the curves: the time neuralign needs to reach
rebasin's final objective and 99.9% of its own converged objective (spec time included).

    .venv/bin/python benchmarks/alignment_speed.py [--models resnet18,resnet50] [--seeds 0,1,2,3,4]
        [--repeats 2] [--workers 2] [--threads 1] [--no-rebasin] [--rerun]

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
from _ratios import fmt, geometric_mean

OUT = Path(__file__).resolve().parents[1] / "docs" / "results"
VERSION = "6"  # bump when what a unit measures changes


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


def run_rebasin(a, b, x, seed, spec, curve=True):
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
        if curve:
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
    out = {"total_s": total, "setup_s": setup, "sweeps": len(curve_t) - 1,
           "objective": weight_objective(spec, a, pcd.model_b),
           "groups": len(pcd.pinit.model_graph.permutation_to_info)}
    return dict(out, curve_t=curve_t, curve_obj=curve_obj) if curve else out


def unit(u):
    a, b = build(u["model"], u["seed"])
    x = torch.randn(1, 3, 224, 224, generator=torch.Generator().manual_seed(0))
    row = {"model": u["model"], "seed": u["seed"], "threads": torch.get_num_threads(),
           "load_start": os.getloadavg()[0]}
    # untimed warm-up of both (first calls in a fresh process pay one-off costs)
    spec, _ = run_ours(a, b, x, u["seed"], tol=1.0)
    if u["rebasin"]:
        from rebasin import PermutationCoordinateDescent
        PermutationCoordinateDescent(copy.deepcopy(a), copy.deepcopy(b), x)
    ours, theirs = [], []
    for r in range(u["repeats"]):  # alternate: ours, theirs, ours, theirs, ...
        spec, d = run_ours(a, b, x, u["seed"], tol=1e-3)
        ours.append(d)
        if u["rebasin"]:
            try:
                theirs.append(run_rebasin(a, b, x, u["seed"], spec, curve=r == 0))
            except Exception as exc:  # noqa: BLE001 - report what the package does
                row["rebasin_error"] = f"{type(exc).__name__}: {str(exc)[:120]}"
                u = dict(u, rebasin=False)
    row["groups"] = len(spec)
    _, row["full"] = run_ours(a, b, x, u["seed"], tol=0.0)
    row["default"] = dict(ours[0], repeats_s=[d["total_s"] for d in ours])
    if theirs:
        row["rebasin"] = dict(theirs[0], repeats_s=[d["total_s"] for d in theirs])
    row["load_end"] = os.getloadavg()[0]
    return row


def first_time(curve_t, curve_obj, target):
    """Time at which a curve first reaches ``target`` (None if never)."""
    return next((t for t, o in zip(curve_t, curve_obj) if o >= target), None)


def summarise(r):
    full, d = r["full"], r["default"]
    s = {"ours_default_s": geometric_mean(d["repeats_s"])[0], "ours_default_obj": d["objective"],
         "ours_full_s": full["total_s"], "ours_full_obj": full["objective"],
         "t_999": first_time(full["curve_t"], full["curve_obj"], 0.999 * full["objective"])}
    if "rebasin" in r:
        rb = r["rebasin"]
        s.update(rebasin_s=geometric_mean(rb["repeats_s"])[0], rebasin_obj=rb["objective"],
                 obj_diff=d["objective"] - rb["objective"],
                 t_reach_rebasin=first_time(full["curve_t"], full["curve_obj"], rb["objective"]))
        s["speedup"] = s["rebasin_s"] / s["ours_default_s"]
        if s["t_reach_rebasin"]:
            s["speedup_to_obj"] = s["rebasin_s"] / s["t_reach_rebasin"]
    return s


def _ms(v, spec="{:.2f}"):
    """Mean ± standard error over seeds."""
    v = np.asarray([x for x in v if x is not None], dtype=np.float64)
    if len(v) == 0:
        return "—"
    return fmt((v.mean(), v.std(ddof=1) / np.sqrt(len(v)) if len(v) > 1 else None), spec)


def _speedup(v):
    """Geometric mean of per-seed speed-ups ± its standard error (delta method on the logs)."""
    v = [x for x in v if x is not None]
    return fmt(geometric_mean(v), "{:.1f}", "×") if v else "—"


def plot(rows, path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    models = list(dict.fromkeys(r["model"] for r in rows))
    fig, axes = plt.subplots(1, len(models), figsize=(4.5 * len(models), 3.6), squeeze=False)
    for ax, m in zip(axes[0], models):
        for i, r in enumerate(r for r in rows if r["model"] == m):  # one line per seed
            ref = r["full"]["objective"]
            ax.plot(r["full"]["curve_t"], np.array(r["full"]["curve_obj"]) / ref, "o-",
                    color="C0", ms=2, lw=0.8, alpha=0.7, label=None if i else "neuralign, tol=0")
            d = r["default"]
            ax.plot([d["total_s"]], [d["objective"] / ref], "*", color="C0", ms=9)
            if "rebasin" in r:
                rb = r["rebasin"]
                ax.plot(rb["curve_t"], np.array(rb["curve_obj"]) / ref, "s-", color="C3",
                        ms=2, lw=0.8, alpha=0.7, label=None if i else "rebasin")
        ax.set_xscale("log")
        ax.set_title(m)
        ax.set_xlabel("seconds (1 thread)")
        ax.set_ylabel("objective / neuralign converged")
        ax.set_ylim(bottom=max(ax.get_ylim()[0], 0.85))
        ax.axhline(0.999, color="grey", lw=0.5)
        ax.legend(fontsize=7)
    fig.suptitle("weight matching: objective vs time, one line per seed\n(star: neuralign end "
                 "to end, default tol=1e-3)",
                 fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def write(rows, args, wall):
    OUT.mkdir(parents=True, exist_ok=True)
    sums = [dict(summarise(r), model=r["model"]) for r in rows]
    loads = [r[k] for r in rows for k in ("load_start", "load_end")]
    cpu = sum(r["full"]["total_s"] + sum(r["default"]["repeats_s"])
              + sum(r.get("rebasin", {}).get("repeats_s", [])) for r in rows)
    lines = [
        "# Weight matching speed: objective versus time", "",
        f"Generated by `benchmarks/alignment_speed.py` "
        f"({time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}, {platform.machine()}, "
        f"{available_cores()} cores, {args.workers} worker processes with {args.threads} torch "
        f"thread(s) each, {wall / 60:.1f} min wall, {cpu / 60:.1f} min of timed runs). Random "
        f"torchvision weights, seeds {args.seeds}; each seed runs both libraries "
        f"{args.repeats} times, alternating, in one process on the same pair of models. "
        f"1-min load average {min(loads):.1f}-{max(loads):.1f} on {available_cores()} cores "
        f"(the benchmark's own {args.workers} workers count {args.workers}).", "",
        "Objective: `sum_k <A_k, P(B)_k>` over every tensor of neuralign's spec (higher is "
        "better; the same formula on the model rebasin returns). End to end = spec tracing "
        "(with its check that a random permutation preserves the function) or rebasin's setup, "
        "+ matching + applying the permutation.", "",
        "Times and objectives: mean ± standard error over seeds (a seed's time is the geometric "
        "mean of its repeats). Speed-ups: geometric mean over seeds of the per-seed ratio, ± its "
        "standard error (delta method on the logs). Objective difference: ours (default) minus "
        "rebasin's, paired by seed.", "",
        "| model | seeds | groups (ours / rebasin) | ours, default tol=1e-3: s | objective "
        "| ours, tol=0: s | objective (converged) | ours: s to 99.9% of converged | rebasin: s "
        "| objective | objective, ours − rebasin | ours: s to rebasin's objective "
        "| speed-up end to end (default) | speed-up to rebasin's objective |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for m in dict.fromkeys(s["model"] for s in sums):
        ss = [s for s in sums if s["model"] == m]
        rs = [r for r in rows if r["model"] == m]

        def col(k, spec="{:.2f}", ss=ss):
            return _ms([s.get(k) for s in ss], spec)
        rb_groups = next((r["rebasin"]["groups"] for r in rs if "rebasin" in r), "—")
        err = next((r["rebasin_error"] for r in rs if "rebasin_error" in r), None)
        lines.append(
            f"| {m} | {len(ss)} | {rs[0]['groups']} / {rb_groups} | {col('ours_default_s')} | "
            f"{col('ours_default_obj', '{:.1f}')} | {col('ours_full_s')} | "
            f"{col('ours_full_obj', '{:.1f}')} | {col('t_999')} | "
            f"{err or col('rebasin_s')} | {col('rebasin_obj', '{:.1f}')} | "
            f"{col('obj_diff', '{:.1f}')} | {col('t_reach_rebasin')} | "
            f"{_speedup([s.get('speedup') for s in ss])} | "
            f"{_speedup([s.get('speedup_to_obj') for s in ss])} |")
    lines += ["", "![objective vs time](alignment_speed.png)", "",
              "Per run (curves: seconds and objective after the spec / setup and after each "
              "sweep):", "", "```", json.dumps(rows, indent=1), "```", ""]
    (OUT / "alignment_speed.md").write_text("\n".join(lines))
    (OUT / "alignment_speed.json").write_text(json.dumps(rows, indent=1))
    plot(rows, OUT / "alignment_speed.png")


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--models", default="resnet18,resnet50,vit_b_16")
    ap.add_argument("--seeds", default="0,1,2,3,4")
    ap.add_argument("--repeats", type=int, default=2, help="alternating runs of each library")
    ap.add_argument("--workers", type=int, default=available_cores())
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--no-rebasin", action="store_true")
    ap.add_argument("--rerun", action="store_true", help="ignore the cached units")
    args = ap.parse_args()
    units = [{"model": m, "seed": s, "rebasin": not args.no_rebasin, "repeats": args.repeats}
             for m in args.models.split(",") for s in map(int, args.seeds.split(","))]
    t0 = time.time()
    rows = run_units(unit, units, name="alignment_speed", workers=args.workers,
                     threads=args.threads, version=VERSION, rerun=args.rerun)
    write(rows, args, time.time() - t0)


if __name__ == "__main__":
    main()
