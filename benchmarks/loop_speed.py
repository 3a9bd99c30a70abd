"""neuralign's loops against minimal hand-written ones on the same in-memory tensors.

Per model (MLP, VGG-11 x0.25 BN, ResNet-20 x1 and x4 BN; Fashion-MNIST 28x28, a class-balanced
subset of the training images per model so that a unit takes minutes on one core):

* train: one epoch of ``neuralign.train`` (SGD + Nesterov momentum, cosine schedule, batch 128,
  a shuffling DataLoader over a TensorDataset) vs a hand loop (a seeded permutation, index
  slicing, forward / cross-entropy / backward / step). Also ``train`` made to read the data
  through the DataLoader (a TensorDataset subclass turns the slicing path off), for reference.
* evaluate: ``neuralign.evaluate`` vs a hand loop under ``torch.inference_mode``.
* statistics passes vs plain forward passes (inference mode, same batches) of the models they
  run: activation matching (2 models), REPAIR (3), BN reset (1), diagonal Fisher (1, needs
  per-example gradients), layer-by-layer CKA (2).
* VGG-11 and ResNet-20 x1: ``train`` with channels-last batches (its CPU default) against
  without; ResNet-20 x1: ``torch.compile`` in the hand loop (is it worth offering?). The hand
  loops index the data tensors as they are: Fashion-MNIST's ``(N, 1, 28, 28)`` tensors have
  channels-last strides, so their batches are channels-last too.

Each unit runs in its own worker process with one torch thread (``benchmarks/_parallel.py``);
inside a unit the variants are interleaved (A, B, A, B, ...) and each repeat's times are
paired, so each ratio is measured in one process under the same load. Ratios: neuralign time /
hand time, the geometric mean over repeats of the paired ratios ± its standard error (delta
method on the logs).

    .venv/bin/python benchmarks/loop_speed.py [--models mlp,resnet20x1] [--repeats 3] [--rerun]

Writes docs/results/loop_speed.md and .json.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, TensorDataset

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _parallel import available_cores, run_units
from _ratios import fmt, ratio_of_pairs

OUT = Path(__file__).resolve().parents[1] / "docs" / "results"
VERSION = "5"
MODELS = {  # name: (get_model name, kwargs, training images, images for the passes, repeats)
    "mlp": ("mlp", {"width": 512, "depth": 3}, 16384, 4096, 5),
    "vgg11": ("vgg11", {"width": 0.25, "norm": "bn"}, 2048, 1024, 5),
    "resnet20x1": ("resnet20", {"width": 1, "norm": "bn"}, 1024, 1024, 5),
    "resnet20x4": ("resnet20", {"width": 4, "norm": "bn"}, 256, 128, 5),
}
# The passes' image counts were 512 / 256 / 64 for VGG-11 / ResNet-20 x1 / x4 before the second
# round of issue 13: at 2-8 batches the per-call costs (copies, tracing) weighed more than they do
# on the data a pass is given in practice.
FISHER_EXAMPLES = 128  # per-example gradients: the Fisher pass sees at most this many images
CKA_EXAMPLES = 512  # layer_cka's default: CKA compares Gram matrices over this many images
BATCH = 128
SEEDS = (0, 1)  # initialisation of model a and model b (b: the two-model passes only)


class _ViaDataLoader(TensorDataset):
    """Same tensors; being a subclass, the loops read it through the DataLoader."""


def _model(name, seed):
    from neuralign.models import get_model

    arch, kw = MODELS[name][:2]
    torch.manual_seed(seed)
    return get_model(arch, num_classes=10, in_channels=1, image_size=28, **kw)


def _loader(x, y, shuffle=False, cls=TensorDataset):
    return DataLoader(cls(x, y), batch_size=BATCH, shuffle=shuffle,
                      generator=torch.Generator().manual_seed(0))


def hand_train(model, x, y, step_fn=None):
    model.train()
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9, nesterov=True)
    perm = torch.randperm(len(x), generator=torch.Generator().manual_seed(0))
    t0 = time.perf_counter()
    for i in range(0, len(x), BATCH):
        idx = perm[i:i + BATCH]
        xb, yb = x[idx], y[idx]
        loss = F.cross_entropy((model if step_fn is None else step_fn)(xb), yb)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    return time.perf_counter() - t0


def ours_train(model, x, y, cls=TensorDataset, **kw):
    from neuralign.train import train

    t0 = time.perf_counter()
    train(model, _loader(x, y, True, cls), epochs=1, lr=0.01, progress=False, **kw)
    return time.perf_counter() - t0


def hand_forward(model, x, y=None):
    model.eval()
    t0 = time.perf_counter()
    with torch.inference_mode():
        for i in range(0, len(x), BATCH):
            out = model(x[i:i + BATCH])
            if y is not None:
                F.cross_entropy(out, y[i:i + BATCH]), (out.argmax(1) == y[i:i + BATCH]).sum()
    return time.perf_counter() - t0


def hand_forward_backward(model, x, y):
    """One forward + backward pass (eval mode, cross-entropy, no optimiser step): the fair
    reference for a pass that needs gradients."""
    model.eval()
    t0 = time.perf_counter()
    for i in range(0, len(x), BATCH):
        F.cross_entropy(model(x[i:i + BATCH]), y[i:i + BATCH]).backward()
    model.zero_grad(set_to_none=True)
    return time.perf_counter() - t0


def ours_evaluate(model, x, y):
    from neuralign.train import evaluate

    t0 = time.perf_counter()
    evaluate(model, _loader(x, y))  # silent unless it takes > 10 s off a terminal
    return time.perf_counter() - t0


def timed(fn, *args, **kw):
    t0 = time.perf_counter()
    fn(*args, **kw)
    return time.perf_counter() - t0


def interleave(variants: dict, repeats: int) -> dict:
    """Run each variant ``repeats`` times, interleaved; medians and every run, in seconds."""
    times = {k: [] for k in variants}
    for _ in range(repeats):
        for k, fn in variants.items():
            times[k].append(fn())
    return {k: {"median_s": statistics.median(v), "runs_s": v} for k, v in times.items()}


def _pass_fns(a, b, x, y):
    """``{pass: (function, plain forwards it is compared with, images)}``, the list into which
    the activation-matching pass records its own statistics pass's time per call, and that
    pass's function."""
    from neuralign.align import activation_matching

    try:
        from neuralign.align import activation_statistics
    except ImportError:  # an older tree (--before)
        activation_statistics = None
    from neuralign.landscape import layer_cka
    from neuralign.merge import fisher_diagonal, repair, reset_bn
    from neuralign.spec import spec_from_model

    a.eval(), b.eval()
    loader = _loader(x, y)
    spec = spec_from_model(a, x[:2])
    has_bn = any(isinstance(m, torch.nn.modules.batchnorm._BatchNorm) for m in a.modules())
    nf, nc = min(len(x), FISHER_EXAMPLES), min(len(x), CKA_EXAMPLES)
    am_pass = []

    def matching():
        perm = activation_matching(a, b, loader, spec=spec)
        am_pass.append(perm.info.get("statistics_time_s"))
    todo = {  # pass: (function, how many plain forwards it is compared with, images)
        "activation statistics": (lambda: activation_statistics(a, b, loader, spec), 2, len(x)),
        "activation matching (+ LAPs)": (matching, 2, len(x)),
        "REPAIR": (lambda: repair(a, b, copy.deepcopy(a), loader), 3, len(x)),
        "BN reset": (lambda: reset_bn(a, loader), 1, len(x)) if has_bn else None,
        "Fisher (diagonal)": (lambda: fisher_diagonal(a, loader, n_examples=nf, labels="empirical"),
                              1, nf),
        "CKA (layer x layer)": (lambda: layer_cka(a, b, loader, n_examples=nc), 2, nc),
    }
    if activation_statistics is None:  # an older tree (--before)
        del todo["activation statistics"]
    return {k: v for k, v in todo.items() if v is not None}, am_pass, matching


def _flops(fn) -> int:
    """Floating-point operations of the matrix products and convolutions ``fn`` runs (PyTorch's
    counter, which also counts in-place ``addmm_`` here: the statistics accumulate with it)."""
    from torch.utils.flop_counter import FlopCounterMode

    def addmm_inplace(_self, a_shape, b_shape, *args, out_shape=None, **kw):
        return 2 * a_shape[0] * a_shape[1] * b_shape[1]
    with FlopCounterMode(display=False,
                         custom_mapping={torch.ops.aten.addmm_: addmm_inplace}) as counter:
        fn()
    return counter.get_total_flops()


def flop_ratios(a, b, x, y) -> dict:
    """Per pass, its FLOPs over those of the plain forwards it is compared with: the ratio it
    would have if its products ran as fast as the forward's and nothing else took time (not a
    bound: products of another shape can run faster or slower). Not for the Fisher, whose
    per-example gradients are batched products of another shape."""
    todo, _, _ = _pass_fns(a, b, x, y)
    out = {}
    for pname, (fn, k, n) in todo.items():
        if pname.startswith("Fisher"):
            continue
        out[pname] = _flops(fn) / (k * _flops(lambda n=n: hand_forward(a, x[:n])))
    return out


def passes(a, b, x, y, repeats):
    todo, am_pass, matching = _pass_fns(a, b, x, y)
    out = {}
    for pname, (fn, k, n) in todo.items():
        r = interleave({"forward": lambda n=n: hand_forward(a, x[:n]),
                        "pass": lambda fn=fn: timed(fn)}, repeats)
        out[pname] = {"forwards": k, "images": n, "forward_s": r["forward"]["median_s"],
                      "pass_s": r["pass"]["median_s"], "forward_runs_s": r["forward"]["runs_s"],
                      "pass_runs_s": r["pass"]["runs_s"],
                      "ratio": ratio_of_pairs(r["pass"]["runs_s"], r["forward"]["runs_s"], k)[0]}
        if fn is matching and None not in am_pass:  # (an older tree times no part)
            st = statistics.median(am_pass)
            out[pname].update(statistics_s=st, solve_s=r["pass"]["median_s"] - st,
                              statistics_ratio=st / (k * r["forward"]["median_s"]))
        if pname.startswith("Fisher"):  # needs a backward per example: compare with fwd+bwd
            r = interleave({"fwd+bwd": lambda n=n: hand_forward_backward(a, x[:n], y[:n]),
                            "pass": lambda fn=fn: timed(fn)}, repeats)
            out[pname]["forward_backward_s"] = r["fwd+bwd"]["median_s"]
            out[pname]["ratio_forward_backward"] = ratio_of_pairs(r["pass"]["runs_s"],
                                                          r["fwd+bwd"]["runs_s"])
    return out


def experiments(a, x, y, repeats, compile_too):
    """neuralign's training with and without channels-last batches; torch.compile in the hand
    loop (steady state after a compiling warm-up)."""
    res = {}
    m1, m2 = copy.deepcopy(a), copy.deepcopy(a)
    r = interleave({"canonical": lambda: ours_train(m1, x, y, channels_last=False),
                    "channels_last": lambda: ours_train(m2, x, y, channels_last=True)}, repeats)
    res["channels_last_ratio"] = ratio_of_pairs(r["channels_last"]["runs_s"], r["canonical"]["runs_s"])
    if not compile_too:
        return res
    try:
        m3, m4 = copy.deepcopy(a), copy.deepcopy(a)
        compiled = torch.compile(m3)
        t0 = time.perf_counter()
        hand_train(m3, x[:BATCH], y[:BATCH], step_fn=compiled)  # compiles
        res["compile_s"] = time.perf_counter() - t0
        r = interleave({"plain": lambda: hand_train(m4, x, y),
                        "compiled": lambda: hand_train(m3, x, y, step_fn=compiled)}, repeats)
        res["compiled_ratio"] = ratio_of_pairs(r["compiled"]["runs_s"], r["plain"]["runs_s"])
        gain = r["plain"]["median_s"] - r["compiled"]["median_s"]
        res["compile_breakeven_epochs"] = res["compile_s"] / gain if gain > 0 else None
    except Exception as exc:  # noqa: BLE001 - report what happens on this machine
        res["compile_error"] = f"{type(exc).__name__}: {str(exc).splitlines()[0][:160]}"
    return res


def unit(u):
    from neuralign.data import load_fashion_mnist

    name = u["model"]
    n_train, n_pass = (max(BATCH // 2, int(n * u["scale"])) for n in MODELS[name][2:4])
    repeats = u.get("repeats") or MODELS[name][4]
    sp = load_fashion_mnist(subset=n_train)
    x, y = sp.train.tensors
    if u.get("flops"):  # counts, not times: a unit of its own, cached apart from the timings
        a, b = (_model(name, sd) for sd in SEEDS)
        return {"model": name, "flop_ratios": flop_ratios(a, b, x[:n_pass], y[:n_pass])}
    row = {"model": name, "n_train": len(x), "n_pass": n_pass, "threads": torch.get_num_threads(),
           "load_start": os.getloadavg()[0]}
    a, b = (_model(name, sd) for sd in SEEDS)
    hand_train(copy.deepcopy(a), x[:2 * BATCH], y[:2 * BATCH])  # warm-up
    ma, mb, mc = (copy.deepcopy(a) for _ in range(3))
    row["train"] = interleave({"hand": lambda: hand_train(ma, x, y),
                               "neuralign": lambda: ours_train(mb, x, y),
                               "via DataLoader": lambda: ours_train(mc, x, y, _ViaDataLoader)},
                              repeats)
    row["evaluate"] = interleave({"hand": lambda: hand_forward(a, x, y),
                                  "neuralign": lambda: ours_evaluate(a, x, y)}, repeats)
    row["passes"] = passes(a, b, x[:n_pass], y[:n_pass], repeats)
    if u.get("experiments"):
        row["experiments"] = experiments(a, x, y, repeats, compile_too=name == "resnet20x1")
    row["load_end"] = os.getloadavg()[0]
    return row


def _before():
    """Ratios recorded by ``--before`` (the code before this benchmark's changes), if any."""
    path = OUT / "loop_speed_before.json"
    if not path.exists():
        return {}
    out = {}
    for r in json.loads(path.read_text()):
        t, e = r["train"], r["evaluate"]
        out[(r["model"], "train")] = t["neuralign"]["median_s"] / t["hand"]["median_s"]
        out[(r["model"], "evaluate")] = e["neuralign"]["median_s"] / e["hand"]["median_s"]
        for p, v in r["passes"].items():
            out[(r["model"], p)] = v["ratio"]
    return out


def write(rows, args, wall):
    OUT.mkdir(parents=True, exist_ok=True)
    before = _before()

    def was(model, what):
        v = before.get((model, what))
        return f"{v:.3f}" if v is not None else "—"
    loads = [r[k] for r in rows for k in ("load_start", "load_end")]
    lines = [
        "# Loop speed: neuralign vs hand-written loops", "",
        (f"Generated by `benchmarks/loop_speed.py` ({time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}"
        f", {platform.machine()}, {available_cores()} cores, {args.workers} worker processes with "
        f"1 torch thread each, {args.repeats or 5} interleaved repeats per variant, "
        f"{f'{wall / 60:.1f} min' if wall > 60 else 'rebuilt from the cached units'}). The "
        "machine was shared (1-min load average "
        f"{min(loads):.1f}-{max(loads):.1f} on {available_cores()} cores), so absolute speeds are "
        "noisy; each ratio compares variants measured in the same process, interleaved: the "
        "geometric mean over repeats of the paired ratios ± its standard error. Speeds (img/s) "
        "are from the median run. Seeds: one model pair per architecture, initialised with "
        f"seeds {SEEDS[0]} and {SEEDS[1]} (the second only for the passes that run two models), "
        "shuffling seed 0; what is measured is time, which does not depend on the "
        "weights' values, so the replicates are the interleaved repeats, not seeds. "
        "Fashion-MNIST subsets (the `images` column); batch 128."), "",
        "## Training and evaluation (goal: ratio ≤ 1.1)", "",
        ("Before: the ratio the code had before issue 13 (`loop_speed_before.json`, recorded by "
        "`--before` on that tree in the same way, at another time and load)."), "",
        ("| model | images | hand train (img/s) | neuralign train (img/s) | ratio | before | train "
        "via DataLoader: ratio | hand evaluate (img/s) | neuralign evaluate (img/s) | ratio "
        "| before |"),
        "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        t, e, n = r["train"], r["evaluate"], r["n_train"]
        def rel(d, a, b="hand"):
            return fmt(ratio_of_pairs(d[a]["runs_s"], d[b]["runs_s"]), "{:.3f}")
        lines.append(
            f"| {r['model']} | {n} | {n / t['hand']['median_s']:.0f} | "
            f"{n / t['neuralign']['median_s']:.0f} | {rel(t, 'neuralign')} | "
            f"{was(r['model'], 'train')} | {rel(t, 'via DataLoader')} | "
            f"{n / e['hand']['median_s']:.0f} | {n / e['neuralign']['median_s']:.0f} | "
            f"{rel(e, 'neuralign')} | {was(r['model'], 'evaluate')} |")
    lines += ["", "## Statistics passes vs plain forward passes (goal: ratio ≤ 1.5)", "",
              ("Ratio = pass time / (number of models it runs × one plain forward pass over the "
              "same images). The diagonal Fisher needs one gradient per example, so a plain "
              "forward is no fair reference for it: its last column compares it with one "
              "forward + backward pass (batch 128) over the same images, measured interleaved "
              "in a second round. Images per pass: 1024 (MLP: 4096; ResNet-20 x4: 128), "
              "Fisher 128, CKA its default 512 (fewer where the pass has fewer). "
              "`activation matching (+ LAPs)` is the whole call: the statistics pass, then one "
              "LAP per group and the tie-break sweeps (more LAPs), which are no part of a "
              "statistics pass; its pass alone, timed inside the same calls, and the rest "
              "(solve) are in the last column, and the `activation statistics` row times the "
              "pass on its own."), "",
              ("FLOP ratio: the pass's floating-point operations in matrix products and "
              "convolutions (PyTorch's `FlopCounterMode`) over those of the plain forwards it "
              "is compared with: the ratio the pass would have if its products ran as fast as "
              "the forward's and nothing else took time. Above 1.5 (activation statistics on "
              "the MLP: an n x n cross-product per probe, two probes per layer; CKA: an "
              "n_examples x n_examples Gram matrix per layer) the goal needs the statistics' "
              "products to run faster than the forward's, which happens only where the "
              "forward's are slow (narrow convolutions). Not given for the Fisher, whose "
              "per-example gradients are products of another shape."), "",
              ("| model | images | pass | forwards | pass (s) | plain forward (s) | ratio "
              "| FLOP ratio | before | Fisher: vs forward+backward | matching: its pass's "
              "ratio, solve (s) |"),
              "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        for p, v in r["passes"].items():
            ratio = fmt(ratio_of_pairs(v["pass_runs_s"], v["forward_runs_s"], v["forwards"]))
            lines.append(f"| {r['model']} | {v['images']} | {p} | {v['forwards']} | "
                         f"{v['pass_s']:.2f} | {v['forward_s']:.2f} | {ratio} | "
                         + (f"{v['flop_ratio']:.2f} | " if v.get("flop_ratio") else "— | ")
                         + f"{was(r['model'], p)} | "
                         + (f"{fmt(v['ratio_forward_backward'])} |"
                            if "ratio_forward_backward" in v else "— |")
                         + (f" {v['statistics_ratio']:.2f}, {v['solve_s']:.2f} |"
                            if "statistics_ratio" in v else " — |"))
    ex = [r for r in rows if "experiments" in r]
    if ex:
        lines += ["", "## Channels-last and torch.compile (training)", "",
                  ("Channels-last: one epoch of `neuralign.train` with `channels_last=True` (the "
                  "default on CPU) over `channels_last=False`. torch.compile: the hand loop "
                  "with the model compiled over the plain hand loop, after a compiling warm-up; "
                  "pay-back = compile time / time saved per epoch of this subset."), "",
                  ("| model | channels-last / canonical | compiled / plain (steady state) | "
                  "compile time (s) | epochs to pay back | error |"), "|---|---|---|---|---|---|"]
        for r in ex:
            v = r["experiments"]

            def f(k, spec="{:.3f}", v=v):
                x = v.get(k)
                if x is None:
                    return "—"
                return fmt(x, spec) if isinstance(x, (list, tuple)) else spec.format(x)
            lines.append(f"| {r['model']} | {f('channels_last_ratio')} | {f('compiled_ratio')} |"
                         f" {f('compile_s', '{:.1f}')} | {f('compile_breakeven_epochs', '{:.1f}')}"
                         f" | {v.get('compile_error', '')} |")
    lines += ["", "Per unit:", "", "```", json.dumps(rows, indent=1), "```", ""]
    (OUT / "loop_speed.md").write_text("\n".join(lines))
    (OUT / "loop_speed.json").write_text(json.dumps(rows, indent=1))


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--models", default=",".join(MODELS))
    ap.add_argument("--repeats", type=int, default=0, help="0: the per-model default (5)")
    ap.add_argument("--workers", type=int, default=available_cores())
    ap.add_argument("--scale", type=float, default=1.0, help="fraction of the images to use")
    ap.add_argument("--rerun", action="store_true", help="ignore the cached units")
    ap.add_argument("--before", action="store_true",
                    help="only write docs/results/loop_speed_before.json (run it with PYTHONPATH "
                         "pointing at an older tree to record its figures for the comparison)")
    args = ap.parse_args()
    models = args.models.split(",")
    units = [{"model": m, "repeats": args.repeats, "scale": args.scale,
              "experiments": m in ("vgg11", "resnet20x1") and not args.before}
             for m in models]
    if not args.before:
        units += [{"model": m, "scale": args.scale, "flops": True} for m in models]
    t0 = time.time()
    rows = run_units(unit, units, name="loop_speed_before" if args.before else "loop_speed",
                     workers=args.workers, version=VERSION, rerun=args.rerun)
    counts = {r["model"]: r["flop_ratios"] for r in rows if "flop_ratios" in r}
    rows = [dict(r, passes={p: dict(v, flop_ratio=counts.get(r["model"], {}).get(p))
                            for p, v in r["passes"].items()})
            for r in rows if "flop_ratios" not in r]
    if args.before:
        OUT.mkdir(parents=True, exist_ok=True)
        (OUT / "loop_speed_before.json").write_text(json.dumps(rows, indent=1))
    else:
        write(rows, args, time.time() - t0)


if __name__ == "__main__":
    main()
