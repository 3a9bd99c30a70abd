"""The training units of benchmarks/levi_text.py: one function per (method, seed, learning rate),
each returning a record (scores, logits, parameters trained, seconds, peak memory) that the driver
caches as soon as it finishes.

Cheap units train on the frozen MiniLM's cached token states (``neuralign.finetune.levi_text``);
expensive units run MiniLM itself. Every unit follows one rule for rates: pre-trained weights
train at the grid rate ``lr``, weights initialised from scratch (heads, small models, attention
pooling, LoRA adapters) at ``new_mult * lr``, the same for every method.
"""

from __future__ import annotations

import copy
import threading
import time

import torch
from torch import nn

from neuralign.finetune.levi import LEVI, combine_heads
from neuralign.finetune.levi_small import TextMLP, TextTransformer
from neuralign.finetune.levi_text import FeatureLEVI, count_trainable, pool_tokens

SPLITS = ("val", "test", "ood")


class PeakRSS:
    """Peak resident memory above the level at entry (MB), sampled every 10 ms from
    /proc/self/statm (approximate: the allocator may keep freed pages)."""

    def __enter__(self):
        self.page = 4096
        self.start = self.peak = self._rss()
        self._stop = threading.Event()
        self._t = threading.Thread(target=self._watch, daemon=True)
        self._t.start()
        return self

    def _rss(self) -> int:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * self.page

    def _watch(self):
        while not self._stop.wait(0.01):
            self.peak = max(self.peak, self._rss())

    def __exit__(self, *exc):
        self._stop.set()
        self._t.join()
        self.peak = max(self.peak, self._rss())
        self.mb = (self.peak - self.start) / 2**20


class Remap(nn.Module):
    """A small model reading MiniLM token ids through a compact vocabulary (the token types that
    occur in the data set; the pad id maps to 0): the same model as one over the full
    vocabulary (an embedding row that no training text uses never moves), 10x cheaper."""

    def __init__(self, small: nn.Module, table: torch.Tensor):
        super().__init__()
        self.small = small
        self.register_buffer("table", table)

    def forward(self, input_ids=None, attention_mask=None):
        return self.small(input_ids=self.table[input_ids], attention_mask=attention_mask)


def small_model(kind: str, cfg: dict, seed: int) -> tuple[nn.Module, int]:
    """LEVI's small model (``text_mlp``) or FS's (``text_transformer``), seeded, with its width."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed + 101)
        if kind == "text_transformer":
            m = TextTransformer(cfg["small_vocab"], dim=cfg["fs_dim"],
                                max_length=cfg["max_length"], pad_token_id=0)
            return Remap(m, cfg["vocab_table"]), cfg["fs_dim"]
        m = TextMLP(cfg["small_vocab"], embed_dim=cfg["small_embed"],
                    hidden=tuple(cfg["small_hidden"]), pad_token_id=0)
        return Remap(m, cfg["vocab_table"]), cfg["small_hidden"][-1]


def _batches(n: int, batch: int, g: torch.Generator, lengths=None) -> list[torch.Tensor]:
    """Shuffled minibatches of ``range(n)``; with ``lengths``, each run of 8 batches is sorted
    by length before it is cut (less padding) and the batches are then shuffled."""
    perm = torch.randperm(n, generator=g)
    if lengths is None:
        return [perm[i:i + batch] for i in range(0, n, batch)]
    out = []
    for i in range(0, n, 8 * batch):
        chunk = perm[i:i + 8 * batch]
        chunk = chunk[torch.argsort(lengths[chunk], stable=True)]
        out += [chunk[j:j + batch] for j in range(0, len(chunk), batch)]
    return [out[k] for k in torch.randperm(len(out), generator=g).tolist()]


def _loop(groups, step, n: int, epochs: int, batch: int, seed: int, lengths=None):
    """AdamW over ``epochs`` passes of shuffled minibatches of ``range(n)``."""
    opt = torch.optim.AdamW(groups, weight_decay=0.0)
    g = torch.Generator().manual_seed(seed)
    for _ in range(epochs):
        for idx in _batches(n, batch, g, lengths):
            loss = step(idx)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()


def _scores(logits: dict, data: dict) -> dict:
    return {s: float((logits[s].argmax(1) == data[s]["y"]).float().mean()) for s in SPLITS}


def _record(model_or_params: int, logits: dict, data: dict, seconds: float, mem: PeakRSS,
            **info) -> dict:
    return {"scores": _scores(logits, data), "params": int(model_or_params),
            "seconds": seconds, "peak_mb": mem.mb,
            "logits": {s: v.to(torch.float16) for s, v in logits.items()}, "info": info}


def _new(params, lr, cfg):
    return {"params": [p for p in params if p.requires_grad], "lr": lr * cfg["new_mult"]}


# ------------------------------------------------------------------------ cheap (cached states)
def _batch(data: dict, split: str, idx, taps, pooled=None):
    """Tap inputs (token states, or pre-pooled vectors), ids and mask of examples ``idx``."""
    d = data[split]
    t = int(d["mask"][idx].sum(1).max())
    states = ([pooled[split][k][idx] for k in taps] if pooled is not None
              else [d["states"][k][idx, :t] for k in taps])
    return states, d["ids"][idx, :t], d["mask"][idx, :t]


def prepool(data: dict, taps, pool: str) -> dict | None:
    """Mean/CLS pooling of every tap computed once per split (attention pooling: None)."""
    if pool == "attention" or not taps:
        return None
    return {sp: {k: pool_tokens(data[sp]["states"][k], data[sp]["mask"], pool) for k in taps}
            for sp in ("train", *SPLITS)}


def feature_model(kind: str, cfg: dict, dims: dict, seed: int, *, taps=None, pool="mean",
                  num_heads=None) -> FeatureLEVI:
    """A FeatureLEVI: ``levi`` (taps + small), ``a3`` (taps only), ``a4``/``a5`` (small model,
    1 / ``num_heads`` heads), ``fs`` (1-layer transformer from scratch, one head), ``probe``
    (taps only, linear head when ``hidden=0``)."""
    if kind == "fs":
        small, sd = small_model("text_transformer", cfg, seed)
    elif kind in ("levi", "a4", "a5"):
        small, sd = small_model("text_mlp", cfg, seed)
    else:
        small, sd = None, 0
    tap_dims = [dims[t] for t in taps] if kind in ("levi", "a3", "probe") else []
    return FeatureLEVI(tap_dims, small, sd, num_outputs=cfg["num_classes"], hidden=cfg["hidden"],
                       pool=pool, num_heads=num_heads, seed=seed)


def run_feature(lr: float, seed: int, data: dict, cfg: dict, kind: str, taps=(), pool="mean",
                num_heads=None) -> dict:
    """One cheap run: a FeatureLEVI variant trained on cached token states."""
    torch.manual_seed(seed)
    model = feature_model(kind, cfg, data["dims"], seed, taps=list(taps), pool=pool,
                          num_heads=num_heads)
    tr = data["train"]
    pre = prepool(data, taps, pool)

    def fwd(split, idx):
        st, ids, m = _batch(data, split, idx, taps, pre)
        return model(st if taps else None, ids, m, pooled=pre is not None)

    def step(idx):
        fwd("train", idx)
        return model.loss(tr["y"][idx])

    with PeakRSS() as mem:
        t0 = time.perf_counter()
        model.train()
        _loop([_new(model.parameters(), lr, cfg)], step, len(tr["y"]), cfg["epochs_head"],
              cfg["head_batch"], seed)
        seconds = time.perf_counter() - t0
    model.eval()
    with torch.no_grad():
        logits = {sp: torch.cat([fwd(sp, torch.arange(i, min(i + 256, len(data[sp]["y"]))))
                                 for i in range(0, len(data[sp]["y"]), 256)]) for sp in SPLITS}
    return _record(count_trainable(model), logits, data, seconds, mem)


def run_probe(lr: float, seed: int, data: dict, cfg: dict, tap: str, linear: bool = True
              ) -> dict:
    """A probe on one tap's mean-pooled states: linear (LP) or one-hidden-layer MLP (tap study)."""
    torch.manual_seed(seed)
    feats = {sp: pool_tokens(data[sp]["states"][tap], data[sp]["mask"], "mean")
             for sp in ("train", *SPLITS)}
    d, c = feats["train"].shape[1], cfg["num_classes"]
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        head = nn.Linear(d, c) if linear else nn.Sequential(
            nn.Linear(d, cfg["hidden"]), nn.ReLU(), nn.Linear(cfg["hidden"], c))
    y = data["train"]["y"]
    loss = nn.CrossEntropyLoss()
    with PeakRSS() as mem:
        t0 = time.perf_counter()
        _loop([_new(head.parameters(), lr, cfg)], lambda i: loss(head(feats["train"][i]), y[i]),
              len(y), cfg["epochs_head"], cfg["head_batch"], seed)
        seconds = time.perf_counter() - t0
    with torch.no_grad():
        logits = {sp: head(feats[sp]) for sp in SPLITS}
    rec = _record(count_trainable(head), logits, data, seconds, mem)
    rec["head"] = {k: v.clone() for k, v in head.state_dict().items()}
    return rec


# -------------------------------------------------------------------------- expensive (MiniLM)
class Classifier(nn.Module):
    """MiniLM, masked mean of the last layer's token states, a linear head."""

    def __init__(self, encoder: nn.Module, num_classes: int, head: dict | None = None):
        super().__init__()
        self.encoder = encoder
        self.head = nn.Linear(encoder.config.hidden_size, num_classes)
        if head is not None:
            self.head.load_state_dict(head)

    def forward(self, x: dict):
        h = self.encoder(**x).last_hidden_state
        return self.head(pool_tokens(h, x["attention_mask"], "mean"))


def _ids(data, split, idx):
    d = data[split]
    t = int(d["mask"][idx].sum(1).max())
    return {"input_ids": d["ids"][idx, :t], "attention_mask": d["mask"][idx, :t].long()}


@torch.no_grad()
def evaluate(model: nn.Module, data: dict, splits=SPLITS) -> dict:
    """Logits per split, batches of similar length (sorted), returned in the data's order."""
    was = model.training
    model.eval()
    out = {}
    for sp in splits:
        lengths = data[sp]["mask"].sum(1)
        order = torch.argsort(lengths, stable=True)
        parts = [model(_ids(data, sp, order[i:i + 128])) for i in range(0, len(order), 128)]
        logits = torch.empty(len(order), parts[0].shape[1])
        logits[order] = torch.cat(parts).float()
        out[sp] = logits
    model.train(was)
    return out


def _train_large(model: nn.Module, groups, data, cfg, seed, loss_fn):
    y = data["train"]["y"]

    def step(idx):
        return loss_fn(model(_ids(data, "train", idx)), y[idx])

    model.train()
    _loop(groups, step, len(y), cfg["epochs_ft"], cfg["batch"], seed,
          lengths=data["train"]["mask"].sum(1))


def run_ft(lr: float, seed: int, data: dict, cfg: dict, encoder: nn.Module,
           lp_head: dict | None = None, alphas=()) -> dict:
    """FT (random head at ``new_mult * lr``) or, with ``lp_head``, LP-FT (the converged probe's
    head, everything at ``lr``); for LP-FT also WiSE-FT: the weights ``(1-α)·LP + α·LP-FT`` for
    each ``α`` in ``alphas``, evaluated (scores and logits in ``info["wise"]``)."""
    torch.manual_seed(seed)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = Classifier(copy.deepcopy(encoder), cfg["num_classes"], lp_head)
    for p in model.parameters():
        p.requires_grad_(True)
    head_lr = lr if lp_head is not None else lr * cfg["new_mult"]
    groups = [{"params": list(model.encoder.parameters()), "lr": lr},
              {"params": list(model.head.parameters()), "lr": head_lr}]
    with PeakRSS() as mem:
        t0 = time.perf_counter()
        _train_large(model, groups, data, cfg, seed, nn.CrossEntropyLoss())
        seconds = time.perf_counter() - t0
    logits = evaluate(model, data)
    info = {}
    if lp_head is not None and alphas:
        zero = Classifier(encoder, cfg["num_classes"], lp_head).state_dict()
        fine = {k: v.detach().clone() for k, v in model.state_dict().items()}
        wise = {}
        for a in alphas:
            model.load_state_dict({k: (1 - a) * zero[k] + a * fine[k] if fine[k].is_floating_point()
                                   else fine[k] for k in fine})
            lg = evaluate(model, data)
            wise[str(a)] = {"scores": _scores(lg, data),
                            "logits": {s: v.to(torch.float16) for s, v in lg.items()}}
        info["wise"] = wise
    return _record(count_trainable(model), logits, data, seconds, mem, **info)


def run_levi_large(lr: float, seed: int, data: dict, cfg: dict, encoder: nn.Module,
                   mode: str) -> dict:
    """LEVI around the live MiniLM: ``mode`` ``lora`` (PEFT adapters on the attention linears,
    at ``new_mult * lr``) or ``full`` (every MiniLM weight at ``lr``)."""
    torch.manual_seed(seed)
    small, _ = small_model("text_mlp", cfg, seed)
    x0 = _ids(data, "train", torch.arange(2))
    levi = LEVI(encoder, small, num_outputs=cfg["num_classes"], example_input=x0,
                taps=cfg["taps"], hidden=cfg["hidden"], pool="mean", large_mode=mode,
                lora_r=cfg["lora_r"], lora_targets=cfg["lora_targets"] if mode == "lora" else None,
                seed=seed)
    large = [p for n, p in levi.named_parameters() if p.requires_grad and n.startswith("large.")]
    new = [p for n, p in levi.named_parameters() if p.requires_grad and not n.startswith("large.")]
    groups = [{"params": new, "lr": lr * cfg["new_mult"]},
              {"params": large, "lr": lr * (cfg["new_mult"] if mode == "lora" else 1)}]

    def loss_fn(out, y):
        return levi.loss(y)

    with PeakRSS() as mem:
        t0 = time.perf_counter()
        _train_large(levi, groups, data, cfg, seed, loss_fn)
        seconds = time.perf_counter() - t0
    logits = evaluate(levi, data)
    return _record(count_trainable(levi), logits, data, seconds, mem,
                   large_params=sum(p.numel() for p in large))


# ---------------------------------------------------------------------------- ensembles
def ensemble(logits: list[dict], temps: list[float] | None = None) -> dict:
    """Mean of the members' probabilities (as log-probabilities), members temperature-scaled
    when ``temps`` is given."""
    temps = temps or [1.0] * len(logits)
    return {s: combine_heads(torch.stack([lg[s].float() / t for lg, t in zip(logits, temps)]))
            for s in SPLITS}
