"""Spec coverage over the model zoo: per model the verdict (exact / refused / WRONG), the number
of groups, the fraction of hidden units free to move and the trace time.

    python benchmarks/spec_coverage.py                 # everything; resumes from the cache
    python benchmarks/spec_coverage.py --source hf     # one source
    python benchmarks/spec_coverage.py --fresh         # ignore cached rows

Rows are cached per model under ~/.cache/neuralign/spec_coverage (keyed by the source of
neuralign/spec, so a code change reruns them); the tables go to docs/results/spec_coverage.md
and .json.
"""

from __future__ import annotations

import argparse
import gc
import hashlib
import json
import os
import statistics
import sys
import traceback
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

from neuralign.spec import zoo

CACHE = Path(os.environ.get("NEURALIGN_CACHE", Path.home() / ".cache" / "neuralign")) / \
    "spec_coverage"
# the largest models last: the run can be interrupted and resumed
BIG = ("vit_h_14", "regnet_y_128gf", "vit_l_16", "vit_l_32", "regnet_y_32gf", "regnet_y_16gf",
       "efficientnet_v2_l", "convnext_large")


def code_hash() -> str:
    h = hashlib.sha1()
    for p in sorted((ROOT / "src" / "neuralign" / "spec").glob("*.py")):
        h.update(p.read_bytes())
    h.update((ROOT / "src" / "neuralign" / "permute.py").read_bytes())
    return h.hexdigest()[:10]


def entries(sources):
    out = []
    if "torchvision" in sources:
        tv = zoo.torchvision_entries()
        out += [e for e in tv if e.name not in BIG] + [e for e in tv if e.name in BIG]
    if "timm" in sources:
        out += zoo.timm_entries()
    if "hf" in sources:
        out += zoo.hf_entries()
    return out


def run_one(entry, fresh: bool, tag: str) -> dict:
    path = CACHE / f"{entry.source}__{entry.name}.json"
    if path.exists() and not fresh:
        row = json.loads(path.read_text())
        if row.get("code") == tag:
            return row
    try:
        row = zoo.evaluate(entry)
    except Exception as exc:  # noqa: BLE001 - a model that cannot be built here
        row = {"model": entry.name, "source": entry.source, "verdict": "error",
               "reason": f"{type(exc).__name__}: {str(exc).splitlines()[0][:200]}"
               if str(exc) else type(exc).__name__}
        traceback.print_exc()
    row["code"] = tag
    CACHE.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(row, indent=1))
    tmp.replace(path)
    gc.collect()
    return row


def summarise(rows) -> dict:
    out = {}
    for src in ("torchvision", "timm", "hf", "all"):
        rs = [r for r in rows if src == "all" or r["source"] == src]
        if not rs:
            continue
        exact = [r for r in rs if r["verdict"] == "exact"]
        fr = [r["free_fraction"] for r in exact]
        out[src] = {
            "models": len(rs),
            "exact_all_free": sum(r["free_fraction"] >= 0.999 for r in exact),
            "exact_partly_fixed": sum(r["free_fraction"] < 0.999 for r in exact),
            "refused": sum(r["verdict"] == "refused" for r in rs),
            "wrong": sum(r["verdict"] == "WRONG" for r in rs),
            "errors": sum(r["verdict"] == "error" for r in rs),
            "median_free_fraction": statistics.median(fr) if fr else None,
            "mean_free_fraction": statistics.mean(fr) if fr else None,
        }
    return out


def write(rows, out_dir: Path) -> None:
    summary = summarise(rows)
    tv = summary.get("torchvision", {})
    goal = (tv.get("models") and tv["exact_all_free"] + tv["exact_partly_fixed"] == tv["models"]
            and (summary["all"]["median_free_fraction"] or 0) >= 0.9
            and summary["all"]["wrong"] == 0)
    (out_dir / "spec_coverage.json").write_text(json.dumps(
        {"summary": summary, "goal_met": bool(goal), "rows": rows}, indent=1))
    lines = ["# Spec coverage over the model zoo", "",
             ("Written by `python benchmarks/spec_coverage.py` (random weights, small inputs, "
             "batch 2, eval mode, batch-norm statistics and norm parameters randomised; "
             "seed 0 for the weights, the input and the permutation of each model). "
             "This is a per-model pass/fail check of an exact identity, not a comparison "
             "between methods: there is nothing to pair or average, and one WRONG verdict at "
             "any seed would be a bug (the default test suite also runs a slice of the zoo). "
             "Per model: the spec is derived with `spec_from_model`, a random permutation of "
             "every group is applied, and every output is compared. **exact**: the largest "
             "difference is below 1e-4 of the output scale; **refused**: a one-line "
             "`SpecError`; **WRONG**: a silent wrong answer. *free* is the fraction of hidden "
             "units (outputs of every linear, convolution and embedding layer) free to move "
             "(`spec.coverage().free_fraction`). *trace s*: `spec_from_model` without its "
             "check, wall time on the machine that ran it (a shared 2-core machine with other "
             "jobs running: compare within the table only)."), "",
             ("| source | models | exact, all free | exact, partly fixed | refused | WRONG | "
             "errors | median free | mean free |"), "|---|---|---|---|---|---|---|---|---|"]
    for src, s in summary.items():
        med = "-" if s["median_free_fraction"] is None else f"{s['median_free_fraction']:.1%}"
        mean = "-" if s["mean_free_fraction"] is None else f"{s['mean_free_fraction']:.1%}"
        lines.append(f"| {src} | {s['models']} | {s['exact_all_free']} | "
                     f"{s['exact_partly_fixed']} | {s['refused']} | {s['wrong']} | "
                     f"{s['errors']} | {med} | {mean} |")
    lines += ["", ("Goal (every torchvision classification model exact, median free fraction "
              f"at least 90%, nothing wrong): **{'met' if goal else 'not met'}**."), "",
              ("| model | source | verdict | groups | free | hidden units | trace s | rel. diff "
              "| fixed (units) / reason |"), "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        if r["verdict"] in ("exact", "WRONG"):
            why = "; ".join(f"{k} ({v})" for k, v in r.get("fixed_reasons", {}).items())
            lines.append(f"| {r['model']} | {r['source']} | {r['verdict']} | {r['groups']} | "
                         f"{r['free_fraction']:.1%} | {r['hidden_units']} | "
                         f"{r['trace_time_s']:.1f} | {r['rel_diff']:.1e} | {why} |")
        else:
            reason = r.get("reason", "").replace("|", "/")[:160]
            lines.append(f"| {r['model']} | {r['source']} | {r['verdict']} | - | - | - | "
                         f"{r.get('trace_time_s', 0):.1f} | - | {reason} |")
    (out_dir / "spec_coverage.md").write_text("\n".join(lines) + "\n")


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--source", nargs="*", default=["torchvision", "timm", "hf"])
    ap.add_argument("--only", nargs="*", help="model names")
    ap.add_argument("--fresh", action="store_true")
    ap.add_argument("--out", default=str(ROOT / "docs" / "results"))
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    tag = code_hash()
    rows = []
    for e in entries(args.source):
        if args.only and e.name not in args.only:
            continue
        row = run_one(e, args.fresh, tag)
        print(f"{row['source']:12s} {row['model']:40s} {row['verdict']:8s} "
              f"{row.get('free_fraction', float('nan')):.3f} {row.get('trace_time_s', 0):.1f}s "
              f"{row.get('reason', '')[:100]}", flush=True)
        rows.append(row)
    if not args.only:
        write(rows, Path(args.out))


if __name__ == "__main__":
    main()
