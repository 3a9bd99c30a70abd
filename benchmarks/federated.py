"""Federated benchmark: FedAvg, FedProx, FedPFN, FedPNU, FedMA on Dirichlet-partitioned
Fashion-MNIST, 10 clients, alpha in {0.1, 0.5}, 3 seeds.

Runs the package's Flower ServerApp / ClientApp on the in-process grid (Flower's Ray simulation
engine is too heavy for the shared 2-core machine; `--engine simulation` uses it instead).
Writes docs/results/federated.md, federated.json and federated_accuracy.png.
One command:  .venv/bin/python benchmarks/federated.py   (--quick for a smoke run)
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

from neuralign.federated import FedTask, run_federated

OUT = ROOT / "docs" / "results"
STRATEGIES = ["fedavg", "fedprox", "fedpfn", "fedpnu", "fedma"]
LABEL = {"fedavg": "FedAvg", "fedprox": "FedProx (μ=0.01)", "fedpfn": "FedPFN (ρ=0.4)",
         "fedpnu": "FedPNU (ρ=0.4, neurons)", "fedma": "FedMA"}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--engine", default="inprocess", choices=["inprocess", "simulation"])
    ap.add_argument("--rounds", type=int, default=None)
    ap.add_argument("--ablation", action="store_true",
                    help="FedPFN / FedPNU with smaller mask ratios at alpha=0.1 (after the main "
                    "run; writes federated_ablation.md)")
    ap.add_argument("--rerun", default="", help="re-run one strategy (e.g. fedma) for the alphas "
                    "and seeds in federated.json and replace its runs there")
    args = ap.parse_args()
    torch.set_num_threads(1)
    if args.ablation:
        return ablation(args)
    if args.rerun:
        return rerun(args.rerun)
    q = args.quick
    rounds = args.rounds or (4 if q else 12)
    seeds = [0] if q else [0, 1, 2]
    alphas = [0.1] if q else [0.1, 0.5]
    base = FedTask(dataset="fashion_mnist", subset=1000 if q else 2500,
                   test_subset=500 if q else 2000, num_partitions=10, model="lenet",
                   model_kwargs="{}", batch_size=32, local_epochs=1,
                   lr=0.03, momentum=0.9, weight_decay=5e-4)
    res: dict = {"config": {"rounds": rounds, "seeds": seeds, "alphas": alphas,
                            "task": base.to_run_config(), "engine": args.engine}, "runs": {}}
    t0 = time.time()
    for seed in seeds:  # seed-major: the results written after each seed are complete tables
        for alpha in alphas:
            for strat in STRATEGIES:
                task = FedTask(**{**base.__dict__, "alpha": alpha, "seed": seed})
                h = run_federated(task, strat, rounds, engine=args.engine, proximal_mu=0.01,
                                  anchor_ratio=0.4)
                res["runs"][f"{alpha}/{strat}/{seed}"] = h
                print(f"alpha={alpha} {strat} seed={seed}: final {h['final_accuracy']:.4f} best "
                      f"{h['best_accuracy']:.4f} ({h['seconds']:.0f}s, total {time.time() - t0:.0f}s)",
                      flush=True)
        res["config"]["seeds_done"] = res["config"].get("seeds_done", []) + [seed]
        res["seconds"] = time.time() - t0
        write(res, q)


def rerun(strat):
    res = json.loads((OUT / "federated.json").read_text())
    c = res["config"]
    base = FedTask.from_run_config(c["task"])
    t0 = time.time()
    for seed in c["seeds_done"]:
        for alpha in c["alphas"]:
            task = FedTask(**{**base.__dict__, "alpha": alpha, "seed": seed})
            h = run_federated(task, strat, c["rounds"], engine=c["engine"], proximal_mu=0.01,
                              anchor_ratio=0.4)
            res["runs"][f"{alpha}/{strat}/{seed}"] = h
            print(f"rerun alpha={alpha} {strat} seed={seed}: {h['final_accuracy']:.4f}", flush=True)
    res["seconds"] += time.time() - t0
    res["config"]["reruns"] = res["config"].get("reruns", []) + [strat]
    write(res, False)


def ablation(args, rhos=(0.1, 0.2), alpha=0.1):
    """Smaller anchor ratios for FedPFN / FedPNU, same task, rounds and seeds as the main run."""
    main_res = json.loads((OUT / "federated.json").read_text())
    c = main_res["config"]
    base = FedTask.from_run_config(c["task"])
    seeds = c["seeds_done"]
    rows, t0 = {}, time.time()
    for rho in rhos:
        for strat in ["fedpfn", "fedpnu"]:
            for seed in seeds:
                task = FedTask(**{**base.__dict__, "alpha": alpha, "seed": seed})
                h = run_federated(task, strat, c["rounds"], engine=c["engine"], anchor_ratio=rho)
                rows.setdefault(f"{strat}/{rho}", []).append(h)
                print(f"ablation {strat} rho={rho} seed={seed}: {h['final_accuracy']:.4f}",
                      flush=True)
    (OUT / "federated_ablation.json").write_text(json.dumps(
        {"alpha": alpha, "seeds": seeds, "runs": rows}, indent=1))
    ref = {s: [main_res["runs"][f"{alpha}/{s}/{seed}"] for seed in seeds]
           for s in ["fedavg", "fedpfn", "fedpnu"]}
    L = ["# Federated ablation: smaller mask ratios for FedPFN and FedPNU", "",
         f"Generated by `.venv/bin/python benchmarks/federated.py --ablation` in "
         f"{(time.time() - t0) / 60:.1f} min; the same task, {c['rounds']} rounds and seeds "
         f"{seeds} as [federated.md](federated.md), Dirichlet α = {alpha}. Global test accuracy "
         "(%), mean ± std over seeds; the FedAvg and ρ = 0.4 rows are the main run's.", "",
         "| strategy | ρ | final acc | best acc |", "|---|---|---|---|",
         f"| FedAvg | – | {ms([r['final_accuracy'] for r in ref['fedavg']])} | "
         f"{ms([r['best_accuracy'] for r in ref['fedavg']])} |"]
    for strat in ["fedpfn", "fedpnu"]:
        for rho in (*rhos, 0.4):
            runs = ref[strat] if rho == 0.4 else rows[f"{strat}/{rho}"]
            L.append(f"| {LABEL[strat].split(' ')[0]} | {rho} | "
                     f"{ms([r['final_accuracy'] for r in runs])} | "
                     f"{ms([r['best_accuracy'] for r in runs])} |")
    (OUT / "federated_ablation.md").write_text("\n".join(L) + "\n")


def ms(v):
    v = 100 * np.asarray(v, dtype=float)
    return f"{v.mean():.2f} ± {v.std():.2f}"


def write(res, q):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    OUT.mkdir(parents=True, exist_ok=True)
    (OUT / "federated.json").write_text(json.dumps(res, indent=1))
    c = res["config"]
    t = c["task"]
    L = ["# Federated learning on Flower: FedAvg, FedProx, FedPFN, FedPNU, FedMA", "",
         "Generated by `.venv/bin/python benchmarks/federated.py`" + (" --quick (SMOKE RUN)" if q else "")
         + f" in {res['seconds'] / 60:.1f} min (CPU, 1 thread, engine `{c['engine']}`)"
         + ("" if not c.get("reruns") else " (then `--rerun "
            + "`, `--rerun ".join(c["reruns"]) + "`, which re-ran that strategy's runs)")
         + f". Global test accuracy (%) of the server model, mean ± std over seeds {c['seeds_done']}"
         + ("" if c["seeds_done"] == c["seeds"] else f" (of the planned {c['seeds']}: the run was "
            "stopped early)") + ".", "",
         f"**Scale (reduced):** {t['task.num-partitions']} clients, all sampled every round; "
         f"Fashion-MNIST, class-balanced subset of {t['task.subset']} training images split by "
         "flwr-datasets' `DirichletPartitioner` (label Dirichlet(α), min 10 images per client, "
         f"seed = run seed); test on a balanced {t['task.test-subset']}-image test subset. "
         "Model: the classic federated CNN (LeNet-5 style: conv5x5(6)-pool-conv5x5(16)-pool-"
         "fc(64)-fc(10), no normalisation so FedMA can match every layer; "
         "`neuralign.federated.models.LeNet`). "
         f"{c['rounds']} communication rounds; each client trains {t['task.local-epochs']} local "
         f"epoch per round (SGD lr {t['task.lr']}, momentum {t['task.momentum']}, wd "
         f"{t['task.weight-decay']}, batch {t['task.batch-size']}). FedMA spends one round per "
         "layer (4 layers: one matched pass every 4 rounds, its global model exists only after "
         "a full pass), so it has had rounds/4 full passes; its matching is "
         "`neuralign.merge.matched_averaging` (width capped at 1.5× per layer).", "",
         "| α | strategy | final acc | best acc |", "|---|---|---|---|"]
    summary = {}
    for alpha in c["alphas"]:
        for s in STRATEGIES:
            runs = [res["runs"][f"{alpha}/{s}/{seed}"] for seed in c["seeds_done"]]
            fin = [r["final_accuracy"] for r in runs]
            best = [r["best_accuracy"] for r in runs]
            summary[(alpha, s)] = np.mean(fin)
            L.append(f"| {alpha} | {LABEL[s]} | {ms(fin)} | {ms(best)} |")
    L += ["", "Claim tested (FedPFN and FedPNU ≥ FedAvg under strong heterogeneity, α = 0.1):", ""]
    for alpha in c["alphas"]:
        for s in ["fedpfn", "fedpnu"]:
            d = 100 * (summary[(alpha, s)] - summary[(alpha, "fedavg")])
            L.append(f"- α = {alpha}: {LABEL[s]} − FedAvg = {d:+.2f} points (final accuracy, "
                     "mean over seeds)")
    fails = {k: r["failures"] for k, r in res["runs"].items() if r.get("failures")}
    L += ["", f"Client failures during the benchmark: {len(fails)} runs with failures.", "",
          "Plot: `federated_accuracy.png` (global test accuracy per round, mean over seeds; "
          "FedMA is plotted at the rounds that complete a pass). Raw histories: `federated.json`.", ""]
    (OUT / "federated.md").write_text("\n".join(L))
    fig, axes = plt.subplots(1, len(c["alphas"]), figsize=(5.5 * len(c["alphas"]), 4), squeeze=False)
    for ax, alpha in zip(axes[0], c["alphas"]):
        for s in STRATEGIES:
            runs = [res["runs"][f"{alpha}/{s}/{seed}"] for seed in c["seeds_done"]]
            acc = np.array([r["accuracy"] for r in runs], dtype=float) * 100
            rr = np.array(runs[0]["round"])
            m = acc.mean(0)
            ok = ~np.isnan(m)
            ax.plot(rr[ok], m[ok], marker="o" if s == "fedma" else None, label=LABEL[s])
        ax.set(title=f"Dirichlet α = {alpha}", xlabel="round", ylabel="global test accuracy (%)")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(OUT / "federated_accuracy.png", dpi=110)


if __name__ == "__main__":
    main()
