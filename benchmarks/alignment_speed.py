"""Wall time of weight matching to convergence: neuralign vs the ``rebasin`` package (PyPI
0.0.47, ``PermutationCoordinateDescent``) in the same process, next to the GEMM floor.

torchvision resnet18, resnet50 and vit_b_16 with random weights (model A seeded s, model B
seeded s + 100), two seeds each. For each run: time to convergence, sweeps, time per sweep,
the part of it spent on similarity matrices and on LAPs, and the final matching objective
``sum_k <A_k, P(B)_k>`` over the tensors of neuralign's spec (the same formula evaluated on the
model rebasin returns). The GEMM floor is the time of the matrix products one sweep needs
(one ``(n, rest) @ (rest, n)`` per group and tensor axis), on pre-laid-out matrices.

    .venv/bin/python benchmarks/alignment_speed.py [--models resnet18,resnet50] [--no-rebasin]

Writes docs/results/alignment_speed.md and .json.
"""

from __future__ import annotations

import argparse
import copy
import json
import platform
import time
from pathlib import Path

import numpy as np
import torch

from neuralign.align import weight_matching, weight_objective
from neuralign.permute import unit_matrix
from neuralign.spec import spec_from_model

OUT = Path(__file__).resolve().parents[1] / "docs" / "results"


def gemm_floor(spec, a, b, repeats=3) -> float:
    sa, sb = a.state_dict(), b.state_dict()
    mats = []
    for g in spec.groups.values():
        for pl in g.places:
            if sa[pl.key].is_floating_point():
                mats.append((unit_matrix(sa[pl.key].float(), pl, g.size).contiguous(),
                             unit_matrix(sb[pl.key].float(), pl, g.size).contiguous()))
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        for am, bm in mats:
            am @ bm.T
        best = min(best, time.perf_counter() - t0)
    return best


def run_rebasin(a, b, x, seed):
    from rebasin import PermutationCoordinateDescent

    a2, b2 = copy.deepcopy(a), copy.deepcopy(b)
    torch.manual_seed(seed)
    t0 = time.perf_counter()
    pcd = PermutationCoordinateDescent(a2, b2, x)
    t1 = time.perf_counter()
    sweeps = [0]
    step = pcd._calculate_permutations_step

    def counted(loop):
        sweeps[0] += 1
        return step(loop)

    pcd._calculate_permutations_step = counted
    pcd.calculate_permutations(100)
    t2 = time.perf_counter()
    pcd.apply_permutations()
    t3 = time.perf_counter()
    return {"setup_s": t1 - t0, "match_s": t2 - t1, "apply_s": t3 - t2, "sweeps": sweeps[0],
            "time_per_sweep_s": (t2 - t1) / max(sweeps[0], 1), "model_b": b2,
            "groups": len(pcd.pinit.model_graph.permutation_to_info)}


def build(arch, seed):
    import torchvision as tv

    torch.manual_seed(seed)
    a = getattr(tv.models, arch)().eval()
    torch.manual_seed(seed + 100)
    b = getattr(tv.models, arch)().eval()
    return a, b


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--models", default="resnet18,resnet50,vit_b_16")
    ap.add_argument("--seeds", default="0,1")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--no-rebasin", action="store_true")
    ap.add_argument("--append", action="store_true",
                    help="keep the runs already in docs/results/alignment_speed.json")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    rows = []
    if args.append and (OUT / "alignment_speed.json").exists():
        rows = json.loads((OUT / "alignment_speed.json").read_text())
    t_all = time.time()
    for arch in args.models.split(","):
        for seed in map(int, args.seeds.split(",")):
            a, b = build(arch, seed)
            x = torch.randn(1, 3, 224, 224)
            t0 = time.perf_counter()
            spec = spec_from_model(a, x)
            spec_s = time.perf_counter() - t0
            perm = weight_matching(spec, a, b, seed=seed)
            info = perm.info
            row = {"model": arch, "seed": seed, "groups": len(spec), "spec_s": spec_s,
                   "ours_s": info["time_s"], "ours_sweeps": info["sweeps"],
                   "ours_per_sweep_s": info["time_per_sweep_s"],
                   "ours_score_per_sweep_s": info["score_time_s"] / info["sweeps"],
                   "ours_lap_per_sweep_s": info["lap_time_s"] / info["sweeps"],
                   "ours_objective": info["objective"], "objective_init": info["objective_init"],
                   "gemm_floor_s": gemm_floor(spec, a, b)}
            print(f"{arch} seed {seed}: ours {row['ours_s']:.1f} s, {row['ours_sweeps']} sweeps, "
                  f"floor {row['gemm_floor_s']:.2f} s/sweep", flush=True)
            if not args.no_rebasin:
                try:
                    r = run_rebasin(a, b, x, seed)
                    row.update({f"rebasin_{k}": v for k, v in r.items() if k != "model_b"})
                    row["rebasin_objective"] = weight_objective(spec, a, r["model_b"])
                    with torch.no_grad():
                        xs = torch.randn(2, 3, 224, 224)
                        row["rebasin_fn_diff"] = float((b(xs) - r["model_b"](xs)).abs().max())
                    print(f"  rebasin {r['match_s']:.1f} s, {r['sweeps']} sweeps, "
                          f"{r['groups']} groups", flush=True)
                except Exception as exc:  # noqa: BLE001 - report what the package does
                    row["rebasin_error"] = f"{type(exc).__name__}: {str(exc)[:120]}"
                    print("  rebasin failed:", row["rebasin_error"], flush=True)
            rows.append(row)
            write(rows, args, time.time() - t_all)


def _ms(v, fmt="{:.2f}"):
    v = np.asarray([x for x in v if x is not None], dtype=np.float64)
    if len(v) == 0:
        return "—"
    return (fmt + " ± " + fmt).format(v.mean(), v.std())


def write(rows, args, wall):
    OUT.mkdir(parents=True, exist_ok=True)
    lines = ["# Weight matching speed", "",
             f"Generated by `benchmarks/alignment_speed.py` "
             f"({time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}, {platform.machine()} CPU, "
             f"{args.threads} torch threads, {wall / 60:.1f} min). Random torchvision weights, "
             "two seeds per model, mean ± std. The machine is shared with other jobs, so "
             "absolute times are noisy; both libraries run in the same process, one after the "
             "other, on the same pair of models.", "",
             "Objective: `sum_k <A_k, P(B)_k>` over every tensor of neuralign's spec (higher is "
             "better; the same formula on the model rebasin returns). GEMM floor: one sweep's "
             "similarity matrix products alone.", "",
             "| model | groups (ours / rebasin) | ours: time to converge (s) | sweeps | s / sweep "
             "| of which similarity | of which LAP | GEMM floor (s / sweep) | rebasin: time (s) "
             "| sweeps | s / sweep | speed-up | objective ours | objective rebasin |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for arch in dict.fromkeys(r["model"] for r in rows):
        rs = [r for r in rows if r["model"] == arch]
        rb = [r for r in rs if "rebasin_match_s" in r]
        speed = [r["rebasin_match_s"] / r["ours_s"] for r in rb]
        err = next((r["rebasin_error"] for r in rs if "rebasin_error" in r), None)
        lines.append(
            f"| {arch} | {rs[0]['groups']} / {rb[0]['rebasin_groups'] if rb else '—'} | "
            f"{_ms([r['ours_s'] for r in rs])} | {_ms([r['ours_sweeps'] for r in rs], '{:.1f}')}"
            f" | {_ms([r['ours_per_sweep_s'] for r in rs])} | "
            f"{_ms([r['ours_score_per_sweep_s'] for r in rs])} | "
            f"{_ms([r['ours_lap_per_sweep_s'] for r in rs])} | "
            f"{_ms([r['gemm_floor_s'] for r in rs])} | "
            f"{_ms([r['rebasin_match_s'] for r in rb]) if rb else err or '—'} | "
            f"{_ms([r['rebasin_sweeps'] for r in rb], '{:.1f}') if rb else '—'} | "
            f"{_ms([r['rebasin_time_per_sweep_s'] for r in rb]) if rb else '—'} | "
            f"{_ms(speed, '{:.1f}') + '×' if rb else '—'} | "
            f"{_ms([r['ours_objective'] for r in rs], '{:.1f}')} | "
            f"{_ms([r['rebasin_objective'] for r in rb], '{:.1f}') if rb else '—'} |")
    lines += ["", "Per run:", "", "```", json.dumps(rows, indent=1), "```", ""]
    (OUT / "alignment_speed.md").write_text("\n".join(lines))
    (OUT / "alignment_speed.json").write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
