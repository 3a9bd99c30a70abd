"""LEVI: layer-wise ensemble of a large pre-trained model and a small model trained from scratch.

Roh et al., "LEVI: Generalizable Fine-tuning via Layer-wise Ensemble of Different Views"
(ICML 2024), section 4. Forward hooks tap the large model's intermediate outputs at the modules
named in ``taps``; each tapped output is pooled to a vector, concatenated with the small model's
output and fed to its own adapting MLP (one hidden layer). Every adapting head predicts; the
training loss is the (optionally weighted, Appendix C) mean of the per-head losses, the prediction
the mean of the heads (for classification the mean of the heads' probabilities, returned as log
probabilities so that argmax and cross-entropy work on it unchanged).

The ablations of Appendix D.4 that keep one model are options of the same class: ``small=None``
is A3 (intermediate layers of the large model only), ``large=None`` with ``num_heads=1`` is A4
(small model, single head) and with ``num_heads>1`` A5 (small model, multi-head).
"""

from __future__ import annotations

import copy
import math
from collections.abc import Mapping, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from neuralign.errors import NeuralignError
from neuralign.finetune.levi_large import LARGE_MODES, _direct_trainable, configure_large  # noqa: F401

POOLS = ("auto", "avg", "nhwc", "tokens", "mean", "cls", "attention", "channels", "flatten")


class _AllTapsCaptured(Exception):
    """Raised by the last tap's hook to skip the rest of the large model's forward."""


# --------------------------------------------------------------------------------------- taps
def _spread(names: Sequence[str], k: int) -> list[str]:
    """Up to ``k`` names evenly spread over ``names``, always keeping the last one."""
    n = len(names)
    if n <= k:
        return list(names)
    idx = sorted({round(i * (n - 1) / (k - 1)) for i in range(k)})
    return [names[i] for i in idx]


def default_taps(model: nn.Module, max_taps: int = 4) -> list[str]:
    """Sensible tap points: ResNet stages (torchvision, timm, the reference ResNet-20), timm's
    ``feature_info`` modules, ViT / BERT-style encoder layers (evenly spaced, last included),
    otherwise evenly spaced blocks from ``neuralign.models.block_names`` without the head."""
    mods = dict(model.named_modules())
    stages = [f"layer{i}" for i in range(1, 9) if f"layer{i}" in mods]
    if len(stages) >= 2:
        return _spread(stages, max_taps)
    info = getattr(model, "feature_info", None)  # timm
    if info is not None:
        try:
            names = [f["module"] for f in info if f.get("module") in mods]
        except (TypeError, AttributeError):
            names = []
        if len(names) >= 2:
            return _spread(names, max_taps)
    for stack in ("encoder.layer", "encoder.layers", "blocks", "transformer.layer", "layers"):
        m = mods.get(stack)
        if isinstance(m, (nn.ModuleList, nn.Sequential)) and len(m) >= 2:
            return _spread([f"{stack}.{n}" for n, _ in m.named_children()], max_taps)
    from neuralign.models import block_names, get_head_name

    blocks = block_names(model)
    try:
        head = get_head_name(model)
        blocks = [b for b in blocks if not (head == b or head.startswith(b + "."))]
    except NeuralignError:
        pass
    if not blocks:
        raise NeuralignError(f"cannot choose default taps for {type(model).__name__}; "
                             "pass taps=[module names] (see model.named_modules())")
    return _spread(blocks, max_taps)


def _first_tensor(out) -> torch.Tensor:
    if isinstance(out, torch.Tensor):
        return out
    if isinstance(out, (tuple, list)) and out:
        return _first_tensor(out[0])
    for attr in ("last_hidden_state", "logits"):
        if getattr(out, attr, None) is not None:
            return getattr(out, attr)
    raise NeuralignError(f"tapped module returned {type(out).__name__}, not a tensor; tap a "
                         "module whose output is a tensor or a tuple starting with one")


def pool_features(t: torch.Tensor, pool: str = "auto", mask: torch.Tensor | None = None):
    """Pool a module output to ``(N, D)``. ``auto``: 2-D as is, 4-D ``(N, C, H, W)`` averaged over
    space, 3-D ``(N, L, D)`` averaged over tokens (``mask`` excludes padding), 5-D+ averaged over
    all trailing axes. ``nhwc``: 4-D channels-last; ``tokens``/``mean``: 3-D token states averaged
    over the unmasked tokens; ``cls``: first token; ``channels``: 3-D ``(N, C, L)`` averaged over
    ``L``; ``flatten``: flattened. ``attention`` (learned) lives in :class:`LEVI`; here, before its
    weights exist, it is the masked mean (same size)."""
    if pool not in POOLS:
        raise NeuralignError(f"unknown pool {pool!r}; use one of {', '.join(POOLS)}")
    if pool == "flatten" or t.dim() == 2:
        return t.flatten(1)
    if pool == "nhwc":
        return t.flatten(1, -2).mean(1)
    if pool in ("mean", "tokens", "attention") and t.dim() != 3:
        raise NeuralignError(f"pool={pool!r} needs token states (N, L, D), got shape "
                             f"{tuple(t.shape)}; use 'auto' or 'avg' for this tap")
    if pool == "cls":
        return t[:, 0]
    if pool == "channels" or (pool == "avg" and t.dim() >= 3) or t.dim() >= 4:
        return t.flatten(2).mean(-1)
    # 3-D token layout
    if mask is not None and mask.dim() == 2 and mask.shape[:2] == t.shape[:2]:
        m = mask.to(t.dtype).unsqueeze(-1)
        return (t * m).sum(1) / m.sum(1).clamp_min(1.0)
    return t.mean(1)


def _resolve(model: nn.Module, name: str) -> str:
    mods = dict(model.named_modules())
    for cand in (name, f"base_model.model.{name}", f"model.{name}"):
        if cand in mods:
            return cand
    close = [n for n in mods if n.endswith(name.split(".")[-1])][:5]
    raise NeuralignError(f"{type(model).__name__} has no module {name!r} to tap"
                         + (f"; similar names: {', '.join(close)}" if close else
                            "; see model.named_modules() for valid names"))


# ------------------------------------------------------------------------------------- LEVI
def _mlp(d_in: int, hidden: int, d_out: int) -> nn.Sequential:
    return nn.Sequential(nn.Linear(d_in, hidden), nn.ReLU(), nn.Linear(hidden, d_out))


class LEVI(nn.Module):
    """Layer-wise ensemble of ``large`` (tapped at ``taps``) and ``small`` (trained from scratch).

    Args:
        large: pre-trained model (copied; ``large_mode`` says what of it trains) or None (A4/A5).
        small: model trained from scratch (copied), taking the same input, or None (A3).
        num_outputs: classes (classification) or targets (regression).
        example_input: one input batch, used once to find the feature sizes (or ``feature_dims``).
        taps: module names of ``large`` (default: ``default_taps``); one adapting head per tap.
        hidden: width of each adapting MLP's hidden layer (the paper: 1024 vision, 256 text).
        task: ``classification`` (cross-entropy per head) or ``regression`` (MSE per head).
        loss_weights: per-head loss weights (Appendix C), normalised to sum to 1; default equal.
        num_heads: number of heads when ``large`` is None (A4: 1, A5: more).
        pool: how tapped outputs become vectors (``pool_features``), one name or one per tap;
            ``attention`` is learned (``levi_text.AttentionPool``), sized from ``example_input``
            or ``tap_dims`` (the pooled width of each tap, recorded in checkpoints).
    """

    def __init__(self, large: nn.Module | None, small: nn.Module | None, *, num_outputs: int,
                 example_input=None, taps: Sequence[str] | None = None, hidden: int = 1024,
                 task: str = "classification", loss_weights: Sequence[float] | None = None,
                 num_heads: int | None = None, pool: str | Sequence[str] = "auto",
                 large_mode: str = "frozen", lora_r: int = 8, lora_alpha: float | None = None,
                 lora_targets: Sequence[str] | None = None, early_exit: bool = True,
                 feature_dims: Sequence[int] | None = None, pad_token_id: int | None = None,
                 tap_dims: Sequence[int] | None = None, seed: int = 0):
        super().__init__()
        if large is None and small is None:
            raise NeuralignError("LEVI needs a large model, a small model or both")
        if task not in ("classification", "regression"):
            raise NeuralignError(f"unknown task {task!r}; use classification or regression")
        self.task, self.large_mode, self.early_exit = task, large_mode, early_exit
        self.pad_token_id = pad_token_id
        self.config = {"num_outputs": int(num_outputs), "hidden": int(hidden), "task": task,
                       "large_mode": large_mode, "lora_r": lora_r, "lora_alpha": lora_alpha,
                       "lora_targets": list(lora_targets) if lora_targets else None,
                       "early_exit": early_exit, "pad_token_id": pad_token_id}
        self.large = None
        self.taps: list[str] = []
        if large is not None:
            large = configure_large(copy.deepcopy(large), large_mode, lora_r=lora_r,
                                    lora_alpha=lora_alpha, lora_targets=lora_targets, seed=seed)
            self.large = large
            taps = list(taps) if taps else default_taps(large)
            self.taps = [_resolve(large, t) for t in taps]
            if len(set(self.taps)) != len(self.taps):
                raise NeuralignError(f"taps must be distinct modules, got {list(taps)}")
        self.small = copy.deepcopy(small) if small is not None else None
        n_heads = len(self.taps) if self.large is not None else int(num_heads or 1)
        if n_heads < 1:
            raise NeuralignError("LEVI needs at least one tap (or num_heads >= 1)")
        pools = [pool] * n_heads if isinstance(pool, str) else list(pool)
        if len(pools) != n_heads:
            raise NeuralignError(f"pool lists {len(pools)} entries for {n_heads} heads")
        self.pools = pools
        self.config.update(taps=list(taps or []), num_heads=n_heads, pool=pools)
        w = torch.ones(n_heads) if loss_weights is None else torch.as_tensor(
            [float(v) for v in loss_weights])
        if w.numel() != n_heads or (w < 0).any() or w.sum() <= 0:
            raise NeuralignError(f"loss_weights must be {n_heads} non-negative numbers, not all 0")
        self.register_buffer("loss_weights", w / w.sum())
        self._captured: dict[str, torch.Tensor] = {}
        self._mask = None
        self._tap_dims: list[int] = [int(d) for d in tap_dims] if tap_dims else []
        if feature_dims is None:
            if example_input is None:
                raise NeuralignError("LEVI needs example_input (one batch) or feature_dims")
            feature_dims = self._probe(example_input)
        self.config["feature_dims"] = [int(d) for d in feature_dims]
        self.config["tap_dims"] = list(self._tap_dims) or None
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            if "attention" in pools:  # learned pooling of token states (neuralign.finetune.levi_text)
                from neuralign.finetune.levi_text import AttentionPool

                if not self._tap_dims:
                    raise NeuralignError("pool='attention' sizes its scoring vectors from one "
                                         "batch: pass example_input (or tap_dims)")
                small_d = self.config["feature_dims"][0] - self._tap_dims[0]
                self.attn_pools = nn.ModuleDict({
                    str(i): AttentionPool(self.config["feature_dims"][i] - small_d)
                    for i, p in enumerate(pools) if p == "attention"})
            self.heads = nn.ModuleList(_mlp(d, hidden, num_outputs) for d in self.config["feature_dims"])
        self.head_outputs: torch.Tensor | None = None

    # -- hooks and features
    def _hook(self, name: str):
        def hook(module, args, out):
            self._captured[name] = _first_tensor(out)
            if self.early_exit and len(self._captured) == len(self.taps):
                raise _AllTapsCaptured
        return hook

    def _call(self, model: nn.Module, x):
        if isinstance(x, Mapping):
            return model(**x)
        if model is self.large and self._mask is not None:  # token ids with padding
            return model(input_ids=x, attention_mask=self._mask)
        return model(x)

    def _features(self, x) -> list[torch.Tensor]:
        if isinstance(x, Mapping):
            self._mask = x.get("attention_mask")
        elif self.pad_token_id is not None and not x.is_floating_point():
            self._mask = (x != self.pad_token_id).long()
        else:
            self._mask = None
        feats: list[torch.Tensor] = []
        if self.large is not None:
            self._captured = {}
            # hooks live only during this call, so copies of the model never share them
            handles = [self.large.get_submodule(t).register_forward_hook(self._hook(t))
                       for t in self.taps]
            try:
                self._call(self.large, x)
            except _AllTapsCaptured:
                pass
            finally:
                for h in handles:
                    h.remove()
            missing = [t for t in self.taps if t not in self._captured]
            if missing:
                raise NeuralignError(f"taps {missing} never ran in the large model's forward")
            attn = getattr(self, "attn_pools", None)
            feats = [attn[str(i)](self._captured[t], self._mask)
                     if p == "attention" and attn is not None
                     else pool_features(self._captured[t], p, self._mask)
                     for i, (t, p) in enumerate(zip(self.taps, self.pools))]
            self._tap_dims = [f.shape[1] for f in feats]
            self._captured = {}
        if self.small is not None:
            s = pool_features(_first_tensor(self._call(self.small, x)), "auto", self._mask)
            feats = [torch.cat([f, s], 1) for f in feats] if feats else [s] * self.config["num_heads"]
        return feats

    @torch.no_grad()
    def _probe(self, example_input) -> list[int]:
        was = [m.training for m in (self.large, self.small) if m is not None]
        for m in (self.large, self.small):
            if m is not None:
                m.eval()
        try:
            dims = [f.shape[1] for f in self._features(example_input)]
        finally:
            for m, t in zip([m for m in (self.large, self.small) if m is not None], was):
                m.train(t)
        return dims

    # -- nn.Module API
    def __getstate__(self):
        state = self.__dict__.copy()  # copies and pickles never carry a forward's graph
        state.update(head_outputs=None, _last_output=None, _captured={}, _mask=None)
        return state

    def train(self, mode: bool = True):
        super().train(mode)
        if self.large is not None and mode:
            if self.large_mode == "frozen":
                self.large.eval()
            # modules whose own weights are frozen keep their running statistics (BN) fixed
            for m in self.large.modules():
                if any(True for _ in m.parameters(recurse=False)) and not _direct_trainable(m):
                    m.eval()
        return self

    def forward(self, x):
        outs = torch.stack([h(f) for h, f in zip(self.heads, self._features(x))])  # (H, N, C)
        self.head_outputs = outs
        self._last_output = combine_heads(outs, self.task)
        return self._last_output

    def loss(self, target: torch.Tensor, head_outputs: torch.Tensor | None = None) -> torch.Tensor:
        """Weighted mean over heads of each head's loss on the last forward's outputs."""
        outs = self.head_outputs if head_outputs is None else head_outputs
        if outs is None:
            raise NeuralignError("LEVI.loss needs a forward pass first")
        return (per_head_losses(outs, target, self.task) * self.loss_weights).sum()

    def trainable_state_dict(self) -> dict[str, torch.Tensor]:
        """Everything that trained: heads, small model, trainable large-model weights (with the
        buffers of their modules) — not the frozen pre-trained weights."""
        sd = {}
        for k, v in self.state_dict().items():
            if not k.startswith("large."):
                sd[k] = v
        if self.large is not None:
            for mname, m in self.large.named_modules():
                if _direct_trainable(m):
                    prefix = f"large.{mname}." if mname else "large."
                    for k, v in m.state_dict(keep_vars=False).items():
                        if "." not in k:
                            sd[prefix + k] = v
        return {k: v.detach().clone() for k, v in sd.items()}


def combine_heads(outs: torch.Tensor, task: str = "classification") -> torch.Tensor:
    """Mean prediction of ``(H, N, C)`` head outputs: log of the mean probability, or the mean."""
    if task == "regression":
        return outs.mean(0)
    return torch.logsumexp(F.log_softmax(outs, -1), 0) - math.log(outs.shape[0])


def per_head_losses(outs: torch.Tensor, target: torch.Tensor, task: str) -> torch.Tensor:
    """Loss of each head, shape ``(H,)``: cross-entropy or mean squared error."""
    h, n = outs.shape[:2]
    if task == "regression":
        t = target.to(outs.dtype).reshape(n, -1).expand(n, outs.shape[-1])
        return ((outs - t.unsqueeze(0)) ** 2).flatten(1).mean(1)
    ce = F.cross_entropy(outs.reshape(h * n, -1), target.repeat(h), reduction="none")
    return ce.view(h, n).mean(1)


def levi_loss(model: LEVI):
    """A ``loss_fn(output, target)`` for ``neuralign.train.train``: LEVI's mean head loss on the
    output of the model's last forward; on any other output (e.g. predictions concatenated over
    a validation set) the loss of the combined prediction (NLL of the mean probability, or MSE)."""
    def loss_fn(output, target):
        if output is getattr(model, "_last_output", None):
            return model.loss(target)
        if model.task == "regression":
            return F.mse_loss(output, target.to(output.dtype).reshape(output.shape))
        return F.nll_loss(output, target)
    return loss_fn
