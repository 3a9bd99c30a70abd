"""Benchmark: out-of-core merging of sharded Llama-style checkpoints, neuralign vs mergekit.

One command: ``.venv/bin/python benchmarks/merge_scale.py`` -> docs/results/merge_scale.md.
``--size smoke`` (about 50M parameters, 2 shards) writes docs/results/merge_scale_smoke.md,
``--size mid`` (about 290M, 3 shards) docs/results/merge_scale_mid.md.

Three random checkpoints of one Llama architecture (a base and two "fine-tunes" = base + small
noise) are written once, tensor by tensor, as sharded bf16 safetensors with a ``config.json`` into
a temporary directory. Each merge (linear of the two fine-tunes; TIES of both onto the base,
density 0.2) runs in a fresh process, neuralign and mergekit (``mergekit-yaml``, default
options) on the same files, one after the other, ``--repeats`` times each in alternating order
(neuralign first, then mergekit first, ...). Before every timed run the previous output is
deleted, dirty pages are flushed (``sync``) and every input file is read once, so both tools
start from the same warm page cache. Recorded per run: wall time, CPU time (user + system) and
peak RSS (GNU time), and the time to durable output: the wall time plus an fsync of every output
file afterwards (neuralign fsyncs its shards before it returns; mergekit does not). Medians are
reported, with the 1-minute load average around the runs; the two outputs are compared tensor
by tensor (max abs difference, fraction of entries that differ).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

import torch

OUT = ROOT / "docs" / "results"
SIZES = {  # hidden, layers, intermediate, vocab, heads, kv heads, shards
    "smoke": (512, 8, 1408, 32000, 8, 8, 2),
    "mid": (1024, 20, 2816, 32000, 16, 4, 3),
    "1b": (2048, 22, 5632, 32000, 32, 4, 5),
}


def log(*a):
    print(time.strftime("%H:%M:%S"), *a, flush=True)


def llama_shapes(hidden, layers, inter, vocab, heads, kv):
    hd = hidden // heads
    shapes = {"model.embed_tokens.weight": (vocab, hidden)}
    for i in range(layers):
        p = f"model.layers.{i}."
        shapes.update({p + "self_attn.q_proj.weight": (hidden, hidden),
                       p + "self_attn.k_proj.weight": (kv * hd, hidden),
                       p + "self_attn.v_proj.weight": (kv * hd, hidden),
                       p + "self_attn.o_proj.weight": (hidden, hidden),
                       p + "mlp.gate_proj.weight": (inter, hidden),
                       p + "mlp.up_proj.weight": (inter, hidden),
                       p + "mlp.down_proj.weight": (hidden, inter),
                       p + "input_layernorm.weight": (hidden,),
                       p + "post_attention_layernorm.weight": (hidden,)})
    shapes["model.norm.weight"] = (hidden,)
    shapes["lm_head.weight"] = (vocab, hidden)
    return shapes


def llama_config(hidden, layers, inter, vocab, heads, kv):
    return {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": hidden,
            "intermediate_size": inter, "num_hidden_layers": layers,
            "num_attention_heads": heads, "num_key_value_heads": kv, "vocab_size": vocab,
            "max_position_embeddings": 2048, "rms_norm_eps": 1e-5, "hidden_act": "silu",
            "tie_word_embeddings": False, "torch_dtype": "bfloat16"}


def write_checkpoint(path: Path, shapes: dict, n_shards: int, seed: int, config: dict,
                     base_seed: int | None = None) -> None:
    """Tensor k = N(0, 0.02) from (base_seed, k) plus, for a fine-tune, 0.002 N(0,1) from (seed, k);
    one shard in memory at a time."""
    from safetensors.torch import save_file

    keys = list(shapes)
    per = -(-len(keys) // n_shards)
    if (path / "model.safetensors.index.json").exists() and (path / "config.json").exists() \
            and json.loads((path / "config.json").read_text()) == config:
        log(f"reusing {path} (--workdir)")
        return
    path.mkdir(parents=True)
    wm = {}
    total = 0
    for s in range(n_shards):
        name = f"model-{s + 1:05d}-of-{n_shards:05d}.safetensors"
        part = {}
        for j, k in enumerate(keys[s * per:(s + 1) * per]):
            idx = s * per + j
            g = torch.Generator().manual_seed((base_seed if base_seed is not None else seed)
                                              * 100_003 + idx)
            t = torch.randn(shapes[k], generator=g) * 0.02
            if base_seed is not None:
                g2 = torch.Generator().manual_seed(seed * 100_003 + idx)
                t += 0.002 * torch.randn(shapes[k], generator=g2)
            part[k] = t.to(torch.bfloat16)
            wm[k] = name
            total += part[k].numel() * 2
        save_file(part, str(path / name), metadata={"format": "pt"})
        del part
    (path / "model.safetensors.index.json").write_text(json.dumps(
        {"metadata": {"total_size": total}, "weight_map": wm}, indent=2))
    (path / "config.json").write_text(json.dumps(config, indent=2))


TIME = Path("/usr/bin/time")


def run_measured(cmd: list[str], env=None) -> tuple[float, int, int, float]:
    """Wall seconds, peak RSS bytes, exit status and CPU seconds (user + system) of a command.

    The peak is measured by GNU time (``%M``), which forks the command from its own small
    process. ``wait4`` on a child of *this* process would be wrong: Linux folds the peak RSS of
    the memory the child shares before ``exec`` (this process, with its generated tensors)
    into the child's ``ru_maxrss``, so every measurement would include the benchmark's own RSS.
    """
    if not TIME.exists():
        raise SystemExit("needs GNU time (/usr/bin/time, Debian package 'time') to measure the "
                         "peak RSS of a command")
    fd, rss_file = tempfile.mkstemp(prefix="merge_scale_rss_")
    os.close(fd)
    t0 = time.perf_counter()
    p = subprocess.run([str(TIME), "-f", "%M %U %S", "-o", rss_file, *cmd], env=env,
                       check=False, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    wall = time.perf_counter() - t0
    text = Path(rss_file).read_text().strip().splitlines()
    os.unlink(rss_file)
    if p.returncode != 0:
        log("FAILED:", " ".join(cmd[:3]), p.stderr.decode()[-2000:])
    rss, user, sys_ = text[-1].split()
    return wall, int(rss) * 1024, p.returncode, float(user) + float(sys_)


def warm(dirs) -> None:
    """Flush dirty pages, then read every file of ``dirs`` once (the page cache both tools
    start from)."""
    os.sync()
    for d in dirs:
        for f in sorted(Path(d).iterdir()):
            if f.is_file():
                with open(f, "rb", buffering=0) as fh:
                    while fh.read(1 << 24):
                        pass


def fsync_tree(path: Path) -> float:
    """Seconds to fsync every file of ``path`` and the directory itself."""
    t0 = time.perf_counter()
    for f in sorted(path.iterdir()):
        if f.is_file():
            fd = os.open(f, os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
    return time.perf_counter() - t0


def neuralign_cmd(method, base, models, out, workers=None):
    opts = {"linear": "weights=[0.5, 0.5]", "ties": "density=0.2"}[method]
    if workers is not None:
        opts += f", workers={int(workers)}"
    models_s = [str(m) for m in models]
    base_s = None if method == "linear" else str(base)
    code = (f"import sys; sys.path.insert(0, {str(ROOT / 'src')!r}); "
            "from neuralign.merge.sharded import merge_checkpoints; "
            f"merge_checkpoints({models_s!r}, {str(out)!r}, {method!r}, base={base_s!r}, {opts})")
    return [sys.executable, "-c", code]


def mergekit_cmd(method, base, models, out, workdir: Path):
    mk = Path(sys.executable).with_name("mergekit-yaml")
    if method == "linear":
        cfg = ("merge_method: linear\nmodels:\n" + "".join(
            f"  - model: {m}\n    parameters:\n      weight: 0.5\n" for m in models)
            + "dtype: bfloat16\n")
    else:
        cfg = (f"merge_method: ties\nbase_model: {base}\nmodels:\n" + "".join(
            f"  - model: {m}\n    parameters:\n      density: 0.2\n      weight: 1.0\n"
            for m in models) + "parameters:\n  normalize: true\ndtype: bfloat16\n")
    path = workdir / f"mergekit_{method}.yml"
    path.write_text(cfg)
    return [str(mk), str(path), str(out), "--quiet"]


def compare(a: Path, b: Path) -> tuple[float, float]:
    """Max abs difference and the fraction of entries that differ, over every tensor."""
    from neuralign.merge.sharded import ShardedCheckpoint

    ca, cb = ShardedCheckpoint.open(a), ShardedCheckpoint.open(b)
    worst, differ, total = 0.0, 0, 0
    for k in ca.weight_map:
        x, y = ca.get(k).float(), cb.get(k).float()
        d = (x - y).abs()
        worst = max(worst, float(d.max()))
        differ += int((d > 0).sum())
        total += d.numel()
    return worst, differ / total


def load() -> float:
    return os.getloadavg()[0]


def measure(tool: str, method: str, base, models, work: Path, workers=None) -> dict:
    out = work / f"out_{tool}_{method}"
    shutil.rmtree(out, ignore_errors=True)
    warm([base, *models])
    cmd = (neuralign_cmd(method, base, models, out, workers) if tool == "neuralign"
           else mergekit_cmd(method, base, models, out, work))
    before = load()
    wall, rss, rc, cpu = run_measured(cmd)
    sync = fsync_tree(out) if rc == 0 else float("nan")
    r = {"wall": wall, "rss": rss, "rc": rc, "cpu": cpu, "sync": sync, "durable": wall + sync,
         "load": (before, load()), "out": out}
    log(f"{method:7s} {tool:9s} {wall:7.1f} s (+{sync:5.1f} s fsync)  CPU {cpu:7.1f} s  "
        f"peak RSS {rss / 2**20:8.0f} MB  rc {rc}  load {before:.2f}")
    return r


def summarise(method: str, tool: str, runs: list[dict]) -> dict:
    ok = [r for r in runs if r["rc"] == 0]
    med = (lambda key: statistics.median(r[key] for r in ok)) if ok else (lambda key: float("nan"))
    return {"method": method, "tool": tool, "wall_s": med("wall"), "durable_s": med("durable"),
            "sync_s": med("sync"), "cpu_s": med("cpu"),
            "walls": [r["wall"] for r in runs], "peak_rss": max(r["rss"] for r in runs),
            "rc": max(r["rc"] for r in runs), "loads": [x for r in runs for x in r["load"]]}


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--size", choices=sorted(SIZES), default="1b")
    ap.add_argument("--methods", default="linear,ties")
    ap.add_argument("--repeats", type=int, default=2,
                    help="timed runs per tool and method, in alternating order (default 2)")
    ap.add_argument("--workers", type=int, default=None,
                    help="neuralign's worker threads (default: its own default, one per core "
                         "up to 4)")
    ap.add_argument("--workdir", default=None, help="where the checkpoints go (default: a temp dir)")
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    hidden, layers, inter, vocab, heads, kv, n_shards = SIZES[args.size]
    shapes = llama_shapes(hidden, layers, inter, vocab, heads, kv)
    n_params = sum(torch.Size(s).numel() for s in shapes.values())
    config = llama_config(hidden, layers, inter, vocab, heads, kv)
    work = Path(args.workdir or tempfile.mkdtemp(prefix="merge_scale_"))
    has_mk = Path(sys.executable).with_name("mergekit-yaml").exists()
    rows = []
    started = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
    load0 = os.getloadavg()
    try:
        log(f"writing 3 checkpoints of {n_params / 1e6:.0f}M parameters to {work}")
        base = work / "base"
        models = [work / "ft1", work / "ft2"]
        write_checkpoint(base, shapes, n_shards, 0, config)
        for i, m in enumerate(models, 1):
            write_checkpoint(m, shapes, n_shards, i, config, base_seed=0)
        model_bytes = n_params * 2
        imports = {"neuralign": f"import sys; sys.path.insert(0, {str(ROOT / 'src')!r}); "
                                "import neuralign.merge.sharded",
                   "mergekit": "import mergekit.merge, mergekit.config"}
        for tool, code in imports.items():
            if tool == "mergekit" and not has_mk:
                continue
            wall, rss, rc, cpu = run_measured([sys.executable, "-c", code])
            log(f"imports {tool:9s} {wall:7.1f} s  peak RSS {rss / 2**20:8.0f} MB")
            rows.append({"method": "(imports only)", "tool": tool, "wall_s": wall,
                         "cpu_s": cpu, "walls": [wall], "peak_rss": rss, "rc": rc})
        tools = ["neuralign"] + (["mergekit"] if has_mk else [])
        for method in args.methods.split(","):
            runs: dict[str, list[dict]] = {t: [] for t in tools}
            for rep in range(args.repeats):
                for tool in (tools if rep % 2 == 0 else tools[::-1]):
                    runs[tool].append(measure(tool, method, base, models, work, args.workers))
            summary = [summarise(method, t, runs[t]) for t in tools]
            last = {t: runs[t][-1] for t in tools}
            if len(last) == 2 and all(r["rc"] == 0 for r in last.values()):
                summary[-1]["max_abs_diff"], summary[-1]["differ"] = compare(
                    last["neuralign"]["out"], last["mergekit"]["out"])
            rows += summary
            for t in tools:
                shutil.rmtree(work / f"out_{t}_{method}", ignore_errors=True)
    finally:
        if args.workdir is None:
            shutil.rmtree(work, ignore_errors=True)
    load1 = os.getloadavg()
    name = {"smoke": "merge_scale_smoke.md", "mid": "merge_scale_mid.md"}.get(args.size,
                                                                           "merge_scale.md")
    out = Path(args.out) if args.out else OUT / name
    loads = [x for r in rows for x in r.get("loads", [])]
    threads = os.environ.get("OMP_NUM_THREADS", "unset")
    wflag = f" --workers {args.workers}" if args.workers is not None else ""
    lines = [f"# Out-of-core merge: neuralign vs mergekit ({args.size} size)", "",
             (f"Command: `python benchmarks/merge_scale.py --size {args.size} --repeats "
              f"{args.repeats}{wflag}`, started {started}. Llama-style random checkpoints, "
              f"{n_params / 1e6:.0f}M parameters each "
              f"({model_bytes / 2**20:.0f} MB in bf16, {n_shards} shards); a base and two "
              "fine-tunes. Each merge runs in a fresh process on "
              f"{os.cpu_count()} CPU cores (OMP_NUM_THREADS {threads}), {args.repeats} times per "
              "tool in alternating order; before every run the previous output is deleted, "
              "dirty pages are flushed and every input file is read once, so both tools start "
              "from the same warm page cache. Wall, durable and CPU columns are medians; "
              "'durable' adds an fsync of every output file after the command returns "
              "(neuralign fsyncs its shards itself, mergekit does not). Peak RSS is the "
              "largest over the runs, the command's own maximum resident set size (GNU time), "
              "including the interpreter and its imports. mergekit 0.1.5 with default "
              "options. linear = 0.5/0.5 of the fine-tunes; TIES = density 0.2, weights 1, "
              "onto the base. The last columns compare mergekit's output with neuralign's "
              "over every tensor (neuralign computes in float32, mergekit in the checkpoint's "
              "bf16, so TIES keeps different entries where bf16 magnitudes tie at the trim "
              "threshold)."), "",
             (f"Machine load (1-minute load average): {load0[0]:.2f} at the start, "
              f"{min(loads, default=load0[0]):.2f} to {max(loads, default=load0[0]):.2f} "
              f"around the timed runs, {load1[0]:.2f} at the end."), ""]
    if args.size != "1b":
        lines += [(f"**{args.size.capitalize()} size only**: the issue's target run (≥1B "
                   "parameters) is `--size 1b`."), ""]
    lines += [("| method | tool | wall (s) | time to durable output (s) | CPU (s) | runs (wall s) "
               "| peak RSS (MB) | peak RSS / model size | max abs diff to neuralign | "
               "entries that differ |"),
              "|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        diff = (f"{r['max_abs_diff']:.2e} | {100 * r['differ']:.3f} %" if "max_abs_diff" in r
                else " | ")
        durable = f"{r['durable_s']:.1f}" if "durable_s" in r else ""
        walls = ", ".join(f"{w:.1f}" for w in r["walls"])
        lines.append(f"| {r['method']} | {r['tool']} | {r['wall_s']:.1f} | {durable} | "
                     f"{r['cpu_s']:.1f} | {walls} | {r['peak_rss'] / 2**20:.0f} | "
                     f"{r['peak_rss'] / model_bytes:.2f} | {diff} |")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text("\n".join(lines) + "\n")
    log("wrote", out)


if __name__ == "__main__":
    main()
