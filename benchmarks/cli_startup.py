"""Start-up time of the ``neuralign`` command: ``neuralign --help`` and an ``eval`` that fails on
a missing checkpoint (what a typo costs), median of N runs each, for this checkout and —
optionally — for an older commit (``--baseline REF``, extracted with ``git archive``).

    python benchmarks/cli_startup.py --runs 15 --baseline 0e7e42e

writes ``docs/results/cli_startup.md``.
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import subprocess
import sys
import tarfile
import tempfile
import time
from io import BytesIO
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
CASES = {
    "neuralign --help": ["--help"],
    "neuralign eval missing.safetensors (fails)": ["eval", "missing.safetensors"],
    "neuralign merge a.pt b.pt --out m.safetensors (pickle refused)": [
        "merge", "a.pt", "b.pt", "--out", "m.safetensors"],
}


def _time(src: Path, args: list[str], runs: int, cwd: Path) -> list[float]:
    env = {**os.environ, "PYTHONPATH": str(src)}
    out = []
    for _ in range(runs):
        t0 = time.perf_counter()
        subprocess.run([sys.executable, "-m", "neuralign", *args], cwd=cwd, env=env,
                       capture_output=True, check=False)
        out.append(time.perf_counter() - t0)
    return out


def _extract(ref: str, dest: Path) -> Path:
    blob = subprocess.run(["git", "-C", str(ROOT), "archive", ref, "src"], check=True,
                          capture_output=True).stdout
    with tarfile.open(fileobj=BytesIO(blob)) as tar:
        tar.extractall(dest, filter="data")
    return dest / "src"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--runs", type=int, default=15)
    ap.add_argument("--baseline", default=None, help="a git ref to compare with")
    ap.add_argument("--out", default=str(ROOT / "docs/results/cli_startup.md"))
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        for name in ("a.pt", "b.pt"):  # small files with pickle magic bytes
            (tmp / name).write_bytes(b"\x80\x04" + b"\0" * 64)
        srcs = {"this checkout": ROOT / "src"}
        if args.baseline:
            srcs[f"baseline {args.baseline}"] = _extract(args.baseline, tmp / "baseline")
        rows = []
        for case, cli_args in CASES.items():
            cells = []
            for label, src in srcs.items():
                _time(src, cli_args, 1, tmp)  # warm the file cache
                ts = _time(src, cli_args, args.runs, tmp)
                cells.append((label, statistics.median(ts), min(ts), max(ts)))
            rows.append((case, cells))
    head = "| command | " + " | ".join(f"{lab}: median (min–max) s" for lab in srcs) + " |"
    lines = [
        "# CLI start-up time",
        "",
        f"Median of {args.runs} runs each (after one warm-up run), wall clock of "
        "`python -m neuralign ...` in a fresh process. Produced by "
        f"`python benchmarks/cli_startup.py --runs {args.runs}"
        + (f" --baseline {args.baseline}`" if args.baseline else "`") + ".",
        "",
        f"Machine: {platform.machine()}, {os.cpu_count()} CPUs, Python "
        f"{platform.python_version()}; load average at the end "
        f"{os.getloadavg()[0]:.2f} (other jobs shared the CPUs).",
        "",
        head,
        "|" + "---|" * (1 + len(srcs)),
    ]
    for case, cells in rows:
        lines.append(f"| `{case}` | " + " | ".join(
            f"{med:.2f} ({lo:.2f}–{hi:.2f})" for _, med, lo, hi in cells) + " |")
    lines += [
        "",
        "The commands import torch, scikit-learn, Flower and matplotlib only inside their bodies, "
        "after the options, input files (existence, size, safetensors header, pickle opt-in) "
        "and outputs have been checked; a command that fails on its input never pays for them.",
        "",
    ]
    Path(args.out).write_text("\n".join(lines))
    print("\n".join(lines))


if __name__ == "__main__":
    main()
