"""LEVI on Hugging Face text encoders: token states tapped by module name, pooled per tap.

Roh et al. (ICML 2024) tap a large model's intermediate layers and feed each to an adapting MLP.
For a text encoder a layer's output is a sequence of token states ``(N, L, D)``, and how it becomes
one vector matters: ``mean`` (over the real tokens only, the attention mask excluding padding),
``cls`` (the first token) or ``attention`` (a learned scoring vector, softmax over the real
tokens). :class:`neuralign.finetune.levi.LEVI` accepts these poolings directly (``pool=``) on a
live model; this module adds what makes a frozen large model cheap to study:

* :func:`token_states` runs the frozen encoder once over a list of texts and keeps every tapped
  module's token states (fp16) and the attention mask;
* :func:`cached_token_states` stores them under a key made of the model's weights, the tokenizer,
  the texts, the taps and the maximum length, so a different tap set or data set never reuses a
  stale file;
* :class:`FeatureLEVI` is LEVI's head stack (and its ablations A3-A5) over such cached states, the
  small model still reading the token ids: the same function as a frozen-large LEVI.
"""

from __future__ import annotations

import hashlib
import os
import tempfile
from collections.abc import Sequence
from pathlib import Path

import torch
from torch import nn

from neuralign.errors import NeuralignError
from neuralign.finetune.levi import _first_tensor, _resolve, combine_heads, per_head_losses
from neuralign.utils import eval_mode

POOLINGS = ("mean", "cls", "attention")


class AttentionPool(nn.Module):
    """Learned attention pooling: ``softmax_t(w . h_t + b)`` over the unmasked tokens."""

    def __init__(self, dim: int):
        super().__init__()
        self.score = nn.Linear(dim, 1)

    def forward(self, h: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        s = self.score(h.to(self.score.weight.dtype)).squeeze(-1)
        if mask is not None:
            keep = mask.bool()
            s = s.masked_fill(~keep, float("-inf"))
            s = torch.where(keep.any(1, keepdim=True), s, torch.zeros_like(s))  # empty rows
        return (s.softmax(-1).unsqueeze(-1) * h.to(s.dtype)).sum(1)


def pool_tokens(h: torch.Tensor, mask: torch.Tensor | None, pool: str = "mean",
                attention: AttentionPool | None = None) -> torch.Tensor:
    """``(N, L, D)`` token states to ``(N, D)``: masked ``mean``, ``cls`` or ``attention``."""
    if pool == "mean":
        if mask is None:
            return h.float().mean(1)
        m = mask.to(torch.float32).unsqueeze(-1)
        return (h.float() * m).sum(1) / m.sum(1).clamp_min(1.0)
    if pool == "cls":
        return h[:, 0].float()
    if pool == "attention":
        if attention is None:
            raise NeuralignError("attention pooling needs its AttentionPool module")
        return attention(h.float(), mask)
    raise NeuralignError(f"unknown pooling {pool!r}; use one of {', '.join(POOLINGS)}")


def tokenize(tokenizer, texts: Sequence[str], max_length: int) -> dict[str, torch.Tensor]:
    """``input_ids`` and ``attention_mask`` padded to the longest text (at most ``max_length``)."""
    if not texts:
        raise NeuralignError("no texts to tokenize")
    enc = tokenizer(list(texts), truncation=True, max_length=int(max_length), padding="longest",
                    return_tensors="pt")
    return {"input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"]}


# ---------------------------------------------------------------------------------- tapping
class _Stop(Exception):
    pass


@torch.no_grad()
def tap_token_states(model: nn.Module, batch: dict, taps: Sequence[str]) -> list[torch.Tensor]:
    """The token states ``(N, L, D)`` of each module in ``taps`` for one tokenized batch (the
    forward stops after the last tap has run)."""
    names = [_resolve(model, t) for t in taps]
    got: dict[str, torch.Tensor] = {}

    def hook(name):
        def fn(module, args, out):
            got[name] = _first_tensor(out)
            if len(got) == len(names):
                raise _Stop
        return fn

    handles = [model.get_submodule(n).register_forward_hook(hook(n)) for n in names]
    restore = eval_mode(model)
    try:
        model(**batch)
    except _Stop:
        pass
    finally:
        for h in handles:
            h.remove()
        restore()
    missing = [t for t, n in zip(taps, names) if n not in got]
    if missing:
        raise NeuralignError(f"taps {missing} never ran in {type(model).__name__}'s forward")
    out = [got[n] for n in names]
    bad = [t for t, o in zip(taps, out) if o.dim() != 3]
    if bad:
        raise NeuralignError(f"taps {bad} do not output token states (N, L, D); tap encoder "
                             "layers or the embeddings module")
    return out


@torch.no_grad()
def token_states(model: nn.Module, tokenizer, texts: Sequence[str], taps: Sequence[str], *,
                 max_length: int = 32, batch_size: int = 64) -> dict:
    """Token states of every tap for every text, padded to ``max_length``: ``{"states": [(N, L,
    D) float16 per tap], "mask": (N, L) bool, "input_ids": (N, L) int64}``. Texts run in
    batches of similar length (sorted), then are put back in their order."""
    texts = list(texts)
    lengths = torch.tensor([len(t) for t in texts])
    order = torch.argsort(lengths, stable=True)
    n, L = len(texts), int(max_length)
    states = mask = ids = None
    for i in range(0, n, batch_size):
        idx = order[i:i + batch_size]
        b = tokenize(tokenizer, [texts[j] for j in idx.tolist()], L)
        outs = tap_token_states(model, b, taps)
        if states is None:
            states = [torch.zeros(n, L, o.shape[-1], dtype=torch.float16) for o in outs]
            mask = torch.zeros(n, L, dtype=torch.bool)
            ids = torch.zeros(n, L, dtype=torch.long)
        t = b["input_ids"].shape[1]
        for s, o in zip(states, outs):
            s[idx, :t] = o.to(torch.float16)
        mask[idx, :t] = b["attention_mask"].bool()
        ids[idx, :t] = b["input_ids"]
    return {"states": states, "mask": mask, "input_ids": ids, "taps": list(taps)}


def model_fingerprint(model: nn.Module) -> str:
    """A hash of the model's parameters and buffers (names, shapes and values)."""
    h = hashlib.sha256()
    for k, v in sorted(model.state_dict().items()):
        h.update(k.encode())
        h.update(str(tuple(v.shape)).encode())
        h.update(v.detach().cpu().contiguous().view(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()[:16]


def feature_key(model_fp: str, tokenizer, texts: Sequence[str], taps: Sequence[str],
                max_length: int) -> str:
    """The cache key: model weights, tokenizer vocabulary, texts (in order), taps, length."""
    h = hashlib.sha256()
    vocab = sorted(tokenizer.get_vocab().items())
    for part in (model_fp, repr(vocab), repr(list(taps)), str(int(max_length)), str(len(texts))):
        h.update(part.encode())
        h.update(b"\0")
    for t in texts:
        h.update(t.encode())
        h.update(b"\0")
    return h.hexdigest()[:20]


def cached_token_states(model: nn.Module, tokenizer, texts: Sequence[str], taps: Sequence[str],
                        *, root, max_length: int = 32, batch_size: int = 64,
                        model_fp: str | None = None) -> dict:
    """:func:`token_states`, computed once and stored as ``<root>/<key>.pt`` (written to a
    temporary file and renamed). The returned dict has ``key`` and ``cached`` (found on disk)."""
    fp = model_fingerprint(model) if model_fp is None else model_fp
    key = feature_key(fp, tokenizer, texts, taps, max_length)
    path = Path(root) / f"{key}.pt"
    if path.exists():
        out = torch.load(path, weights_only=True)
        if out.get("taps") != list(taps) or out["mask"].shape[0] != len(texts):
            raise NeuralignError(f"{path} does not hold these taps/texts; delete it")
        return {**out, "key": key, "cached": True}
    out = token_states(model, tokenizer, texts, taps, max_length=max_length,
                       batch_size=batch_size)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        torch.save(out, tmp)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return {**out, "key": key, "cached": False}


# ------------------------------------------------------------------------- cached-feature LEVI
def _mlp(d_in: int, hidden: int, d_out: int) -> nn.Sequential:
    return nn.Sequential(nn.Linear(d_in, hidden), nn.ReLU(), nn.Linear(hidden, d_out))


class FeatureLEVI(nn.Module):
    """LEVI with a frozen large model whose tapped token states are given (cached): one
    adapting MLP per tap on ``[pool(states_t), small(ids)]``. ``tap_dims=[]`` with ``num_heads``
    is A4 (1 head) / A5 (several heads on the small model); ``small=None`` is A3. The prediction
    is the mean of the heads' probabilities (``combine_heads``), the loss the mean head loss."""

    def __init__(self, tap_dims: Sequence[int], small: nn.Module | None, small_dim: int, *,
                 num_outputs: int, hidden: int = 256, pool: str = "mean",
                 num_heads: int | None = None, seed: int = 0):
        super().__init__()
        if pool not in POOLINGS:
            raise NeuralignError(f"unknown pooling {pool!r}; use one of {', '.join(POOLINGS)}")
        if small is None and not tap_dims:
            raise NeuralignError("FeatureLEVI needs taps, a small model or both")
        self.pool, self.small, self.tap_dims = pool, small, [int(d) for d in tap_dims]
        sd = int(small_dim) if small is not None else 0
        n = len(self.tap_dims) if self.tap_dims else int(num_heads or 1)
        dims = [d + sd for d in self.tap_dims] if self.tap_dims else [sd] * n
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            self.attn = nn.ModuleList(AttentionPool(d) for d in self.tap_dims) \
                if pool == "attention" else None
            self.heads = nn.ModuleList(_mlp(d, hidden, num_outputs) for d in dims)
        self.head_outputs = None

    def forward(self, states: Sequence[torch.Tensor] | None, input_ids, mask,
                pooled: bool = False):
        """``states``: one ``(N, L, D)`` tensor per tap, or with ``pooled=True`` the already
        pooled ``(N, D)`` vectors (mean or CLS pooling computed once for a whole data set)."""
        feats = []
        if self.tap_dims:
            if states is None or len(states) != len(self.tap_dims):
                raise NeuralignError(f"FeatureLEVI expects {len(self.tap_dims)} tap states")
            if pooled and self.pool == "attention":
                raise NeuralignError("attention pooling is learned: pass token states, not "
                                     "pooled vectors")
            feats = [s.float() if pooled else
                     pool_tokens(s, mask, self.pool, self.attn[i] if self.attn else None)
                     for i, s in enumerate(states)]
        if self.small is not None:
            s = self.small(input_ids=input_ids, attention_mask=mask.long())
            feats = [torch.cat([f, s], 1) for f in feats] if feats else [s] * len(self.heads)
        outs = torch.stack([h(f) for h, f in zip(self.heads, feats)])
        self.head_outputs = outs
        return combine_heads(outs)

    def loss(self, target: torch.Tensor) -> torch.Tensor:
        return per_head_losses(self.head_outputs, target, "classification").mean()


def count_trainable(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad)
