"""Benchmark: out-of-core merging of sharded Llama-style checkpoints, neuralign vs mergekit.

One command: ``.venv/bin/python benchmarks/merge_scale.py`` -> docs/results/merge_scale.md.
``--size smoke`` (about 50M parameters, 2 shards) writes docs/results/merge_scale_smoke.md.

Three random checkpoints of one Llama architecture (a base and two "fine-tunes" = base + small
noise) are written once, tensor by tensor, as sharded bf16 safetensors with a ``config.json`` into
a temporary directory. Each merge (linear of the two fine-tunes; TIES of both onto the base,
density 0.2) runs in a fresh process, neuralign then mergekit (``mergekit-yaml``, default
options) on the same files, one after the other; wall time and the child's peak RSS (``wait4``)
are recorded, and the two outputs are compared tensor by tensor (max abs difference).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
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


def run_measured(cmd: list[str], env=None) -> tuple[float, int, int]:
    """Wall seconds, peak RSS bytes of the command and its exit status.

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
    p = subprocess.run([str(TIME), "-f", "%M", "-o", rss_file, *cmd], env=env,
                       stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    wall = time.perf_counter() - t0
    text = Path(rss_file).read_text().strip().splitlines()
    os.unlink(rss_file)
    if p.returncode != 0:
        log("FAILED:", " ".join(cmd[:3]), p.stderr.decode()[-2000:])
    return wall, int(text[-1]) * 1024, p.returncode


def neuralign_cmd(method, base, models, out):
    opts = {"linear": "weights=[0.5, 0.5]", "ties": "density=0.2"}[method]
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


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--size", choices=sorted(SIZES), default="1b")
    ap.add_argument("--methods", default="linear,ties")
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
            wall, rss, rc = run_measured([sys.executable, "-c", code])
            log(f"imports {tool:9s} {wall:7.1f} s  peak RSS {rss / 2**20:8.0f} MB")
            rows.append({"method": "(imports only)", "tool": tool, "wall_s": wall,
                         "peak_rss": rss, "rc": rc})
        for method in args.methods.split(","):
            outs = {}
            tools = [("neuralign", neuralign_cmd)] + ([("mergekit", None)] if has_mk else [])
            for tool, _ in tools:
                out = work / f"out_{tool}_{method}"
                cmd = (neuralign_cmd(method, base, models, out) if tool == "neuralign"
                       else mergekit_cmd(method, base, models, out, work))
                wall, rss, rc = run_measured(cmd)
                log(f"{method:7s} {tool:9s} {wall:7.1f} s  peak RSS {rss / 2**20:8.0f} MB  rc {rc}")
                rows.append({"method": method, "tool": tool, "wall_s": wall, "peak_rss": rss,
                             "rc": rc})
                outs[tool] = out
            if len(outs) == 2 and all(r["rc"] == 0 for r in rows[-2:]):
                rows[-1]["max_abs_diff"], rows[-1]["differ"] = compare(outs["neuralign"],
                                                                       outs["mergekit"])
            for o in outs.values():
                shutil.rmtree(o, ignore_errors=True)
    finally:
        if args.workdir is None:
            shutil.rmtree(work, ignore_errors=True)
    name = "merge_scale_smoke.md" if args.size == "smoke" else "merge_scale.md"
    out = Path(args.out) if args.out else OUT / name
    lines = [f"# Out-of-core merge: neuralign vs mergekit ({args.size} size)", "",
             (f"Command: `python benchmarks/merge_scale.py --size {args.size}`. "
              f"Llama-style random checkpoints, {n_params / 1e6:.0f}M parameters each "
              f"({model_bytes / 2**20:.0f} MB in bf16, {n_shards} shards); a base and two "
              "fine-tunes. Each merge runs in a fresh process, one after the other, on "
              f"{os.cpu_count()} CPU cores; peak RSS is the command's own "
              "maximum resident set size (GNU time), including the interpreter and its "
              "imports. mergekit 0.1.5 with default options. linear = "
              "0.5/0.5 of the fine-tunes; TIES = density 0.2, weights 1, onto the base. The "
              "last columns compare mergekit's output with neuralign's over every tensor "
              "(neuralign computes in float32, mergekit in the checkpoint's bf16, so TIES "
              "keeps different entries where bf16 magnitudes tie at the trim threshold)."), ""]
    if args.size == "smoke":
        lines += [("**Smoke size only**: the issue's target run (≥1B parameters) is "
                   "`--size 1b`."), ""]
    lines += [("| method | tool | wall (s) | peak RSS (MB) | peak RSS / model size | "
               "max abs diff to neuralign | entries that differ |"),
              "|---|---|---|---|---|---|---|"]
    for r in rows:
        diff = (f"{r['max_abs_diff']:.2e} | {100 * r['differ']:.3f} %" if "max_abs_diff" in r
                else " | ")
        lines.append(f"| {r['method']} | {r['tool']} | {r['wall_s']:.1f} | "
                     f"{r['peak_rss'] / 2**20:.0f} | {r['peak_rss'] / model_bytes:.2f} | {diff} |")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text("\n".join(lines) + "\n")
    log("wrote", out)


if __name__ == "__main__":
    main()
