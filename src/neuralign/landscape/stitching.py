"""Model stitching (survey §6.2; Csiszárik et al., Bansal et al., Godfrey et al.): model A's
prefix up to a layer, a trained stitching layer φ, then model B's suffix after the same layer:
``f_C = f_B_{>i} ∘ φ ∘ f_A_{≤i}``. Both models stay frozen; only φ is trained, on the task loss.

φ acts on the channel axis of the layer's output (axis 1 of a conv map, the last axis otherwise):

* ``"affine"``: a full affine map ``W h + c``;
* ``"rank-k"`` (e.g. ``"rank-1"``): ``U V h + c`` with ``U V`` of rank at most ``k``;
* ``"perm-scale"``: ``P D h``, a permutation times a positive diagonal and no bias, the
  intertwiner group of ReLU (G_ReLU). P is the linear assignment of maximal activation
  correlation; D is trained through its logarithm.

Every φ starts from the least-squares map from A's to B's activations (truncated SVD for
rank-k; per-unit least squares, clamped positive, for perm-scale), so stitching a model with
itself starts at the identity. The *stitching penalty* is ``(acc(A) + acc(B)) / 2 - acc(C)``.
"""

from __future__ import annotations

import copy
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from neuralign.errors import DataError, NeuralignError
from neuralign.evaluation import evaluate
from neuralign.utils import eval_mode, split_batch

__all__ = ["KINDS", "StitchResult", "Stitched", "plot_stitching", "stitch",
           "stitching_penalties"]

KINDS = ("affine", "rank-k", "perm-scale")


class _Stop(Exception):
    pass


def _channel_last(h: torch.Tensor) -> torch.Tensor:
    return h.movedim(1, -1) if h.dim() == 4 else h


def _channel_back(h: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    return h.movedim(-1, 1) if like.dim() == 4 else h


class Phi(nn.Module):
    """The stitching layer: ``kind`` in affine / rank-k / perm-scale (see the module docstring)."""

    def __init__(self, kind: str, c_in: int, c_out: int, rank: int | None = None):
        super().__init__()
        self.kind = kind
        if kind == "affine":
            self.weight = nn.Parameter(torch.eye(c_out, c_in))
            self.bias = nn.Parameter(torch.zeros(c_out))
        elif kind == "rank-k":
            self.u = nn.Parameter(torch.zeros(c_out, rank))
            self.v = nn.Parameter(torch.zeros(rank, c_in))
            self.bias = nn.Parameter(torch.zeros(c_out))
        elif kind == "perm-scale":
            self.register_buffer("perm", torch.arange(c_in))
            self.log_scale = nn.Parameter(torch.zeros(c_in))
        else:
            raise NeuralignError(f"unknown stitching kind {kind!r}; use affine, rank-K or "
                                 "perm-scale")

    def matrix(self) -> torch.Tensor:
        if self.kind == "affine":
            return self.weight
        if self.kind == "rank-k":
            return self.u @ self.v
        n = len(self.perm)
        m = torch.zeros(n, n, dtype=self.log_scale.dtype, device=self.log_scale.device)
        m[torch.arange(n), self.perm] = 1.0
        return self.log_scale.exp()[:, None] * m

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        x = _channel_last(h)
        if self.kind == "perm-scale":
            y = x[..., self.perm] * self.log_scale.exp()
        else:
            y = F.linear(x, self.matrix(), self.bias)
        return _channel_back(y, h)


def _module(model: nn.Module, name: str) -> nn.Module:
    mods = dict(model.named_modules())
    if name not in mods:
        from neuralign.landscape.analysis import default_layers

        raise NeuralignError(f"model has no layer {name!r}; layers: {default_layers(model)}")
    return mods[name]


def _prefix(model: nn.Module, layer: str, x: torch.Tensor) -> torch.Tensor:
    """The output of ``layer`` (the forward pass is stopped there)."""
    store = {}

    def hook(m, i, o):
        store["h"] = o[0] if isinstance(o, tuple) else o
        raise _Stop

    h = _module(model, layer).register_forward_hook(hook)
    try:
        model(x)
    except _Stop:
        pass
    finally:
        h.remove()
    if "h" not in store:
        raise NeuralignError(f"layer {layer!r} was not called in the forward pass")
    return store["h"]


class Stitched(nn.Module):
    """``B_{>layer_b} ∘ φ ∘ A_{≤layer_a}`` with A and B frozen (copies)."""

    def __init__(self, a: nn.Module, b: nn.Module, layer_a: str, layer_b: str, phi: Phi):
        super().__init__()
        self.a, self.b, self.phi = copy.deepcopy(a).eval(), copy.deepcopy(b).eval(), phi
        for p in list(self.a.parameters()) + list(self.b.parameters()):
            p.requires_grad_(False)
        self.layer_a, self.layer_b = layer_a, layer_b

    def train(self, mode: bool = True):
        super().train(mode)
        self.a.eval()
        self.b.eval()
        return self

    def forward(self, x):
        h = self.phi(_prefix(self.a, self.layer_a, x))

        def swap(m, i, o):
            return h

        hk = _module(self.b, self.layer_b).register_forward_hook(swap)
        try:
            return self.b(x)
        finally:
            hk.remove()


def _features(model, layer, loader, n_examples):
    hs, seen = [], 0
    restore = eval_mode(model)
    try:
        with torch.no_grad():
            for batch in loader:
                x, _ = split_batch(batch)
                h = _prefix(model, layer, x[: n_examples - seen])
                hs.append(_channel_last(h).reshape(-1, _channel_last(h).shape[-1]))
                seen += min(len(x), n_examples - seen)
                if seen >= n_examples:
                    break
    finally:
        restore()
    if not hs:
        raise DataError("the data loader yielded no batches; pass a non-empty loader")
    return torch.cat(hs).double()


def _first_inputs(loader, n_examples: int) -> list[torch.Tensor]:
    """The inputs of the loader's first ``n_examples`` examples, read once."""
    xs, seen = [], 0
    for batch in loader:
        x, _ = split_batch(batch)
        xs.append(x[: n_examples - seen])
        seen += len(xs[-1])
        if seen >= n_examples:
            break
    return xs


def _init_phi(phi: Phi, ha: torch.Tensor, hb: torch.Tensor) -> None:
    """Least-squares start: ``hb ≈ W ha + c`` (restricted to the kind)."""
    with torch.no_grad():
        if phi.kind == "perm-scale":
            from neuralign.align.weight import solve_lap

            za = (ha - ha.mean(0)) / ha.std(0).clamp_min(1e-8)
            zb = (hb - hb.mean(0)) / hb.std(0).clamp_min(1e-8)
            perm = solve_lap(zb.T @ za)  # output unit j reads input unit perm[j]
            src = ha[:, perm]
            d = (src * hb).sum(0) / (src * src).sum(0).clamp_min(1e-12)
            phi.perm.copy_(perm)
            phi.log_scale.copy_(d.clamp_min(1e-3).log().float())
            return
        ones = torch.ones(len(ha), 1, dtype=ha.dtype)
        sol = torch.linalg.lstsq(torch.cat([ha, ones], 1), hb).solution  # (c_in + 1, c_out)
        w, c = sol[:-1].T, sol[-1]
        phi.bias.copy_(c.float())
        if phi.kind == "affine":
            phi.weight.copy_(w.float())
        else:
            u, s, vh = torch.linalg.svd(w, full_matrices=False)
            k = phi.u.shape[1]
            r = s[:k].sqrt()
            phi.u.copy_((u[:, :k] * r).float())
            phi.v.copy_((r[:, None] * vh[:k]).float())


def _parse_kind(kind: str) -> tuple[str, int | None]:
    if kind in ("affine", "perm-scale"):
        return kind, None
    if kind.startswith("rank-"):
        try:
            k = int(kind.split("-", 1)[1])
        except ValueError:
            k = 0
        if k >= 1:
            return "rank-k", k
    raise NeuralignError(f"unknown stitching kind {kind!r}; use affine, rank-K (e.g. rank-4) or "
                         "perm-scale")


@dataclass
class StitchResult:
    layer: str
    kind: str
    penalty: float
    accuracy: float
    accuracy_a: float
    accuracy_b: float
    model: Stitched
    history: list[float] = field(default_factory=list)


def stitch(a: nn.Module, b: nn.Module, layer: str, train_loader: Iterable, *, kind: str = "affine",
           eval_loader: Iterable | None = None, layer_b: str | None = None, epochs: int = 1,
           lr: float = 1e-3, n_init: int = 1024, seed: int = 0,
           _accs: tuple[float, float] | None = None) -> StitchResult:
    """Stitch ``a``'s prefix (through ``layer``) to ``b``'s suffix (after ``layer_b``, default
    the same name) through a trained φ of ``kind``; report the stitching penalty on
    ``eval_loader`` (default ``train_loader``). ``epochs=0`` keeps the least-squares start."""
    base, rank = _parse_kind(kind)
    layer_b = layer_b or layer
    eval_loader = eval_loader if eval_loader is not None else train_loader
    # both models see the SAME examples: a shuffling loader gives another order on every pass
    init = _first_inputs(train_loader, n_init)
    ha = _features(a, layer, init, n_init)
    hb = _features(b, layer_b, init, n_init)
    if len(ha) != len(hb):
        raise NeuralignError(f"layers {layer!r} and {layer_b!r} give different numbers of "
                             "positions; stitch layers of the same spatial size")
    c_in, c_out = ha.shape[1], hb.shape[1]
    if base == "perm-scale" and c_in != c_out:
        raise NeuralignError(f"perm-scale stitching needs equal widths, got {c_in} and {c_out}")
    if rank is not None and rank > min(c_in, c_out):
        raise NeuralignError(f"rank {rank} exceeds the layer widths ({c_in}, {c_out})")
    torch.manual_seed(seed)
    phi = Phi(base, c_in, c_out, rank)
    _init_phi(phi, ha, hb)
    model = Stitched(a, b, layer, layer_b, phi)
    opt = torch.optim.Adam([p for p in phi.parameters() if p.requires_grad], lr=lr)
    hist = []
    for _ in range(epochs):
        model.train()
        for batch in train_loader:
            x, y = split_batch(batch)
            if y is None:
                raise DataError("stitching trains φ on labelled batches (inputs, targets)")
            loss = F.cross_entropy(model(x), y)
            opt.zero_grad()
            loss.backward()
            opt.step()
            hist.append(float(loss.detach()))
    model.eval()
    acc_a, acc_b = _accs if _accs is not None else (
        evaluate(a, eval_loader)["accuracy"], evaluate(b, eval_loader)["accuracy"])
    acc = evaluate(model, eval_loader)["accuracy"]
    return StitchResult(layer=layer, kind=kind, penalty=0.5 * (acc_a + acc_b) - acc,
                        accuracy=acc, accuracy_a=acc_a, accuracy_b=acc_b, model=model,
                        history=hist)


def stitching_penalties(a: nn.Module, b: nn.Module, train_loader: Iterable, *,
                        layers: Sequence[str] | None = None,
                        kinds: Sequence[str] = ("affine", "rank-1", "rank-4", "perm-scale"),
                        eval_loader: Iterable | None = None, **options) -> dict:
    """Stitching penalty for every layer (default: the models' blocks but the last) and kind:
    ``{"layers": [...], "kinds": [...], "penalty": {kind: [per layer]}, "accuracy_a", ...}``."""
    from neuralign.landscape.analysis import default_layers

    layers = list(layers) if layers is not None else default_layers(a)[:-1]
    if not layers:
        raise NeuralignError("no layers to stitch at; pass layers=[...]")
    ev = eval_loader if eval_loader is not None else train_loader
    accs = (evaluate(a, ev)["accuracy"], evaluate(b, ev)["accuracy"])
    out = {"layers": layers, "kinds": list(kinds), "penalty": {k: [] for k in kinds},
           "accuracy": {k: [] for k in kinds}, "accuracy_a": accs[0], "accuracy_b": accs[1]}
    for layer in layers:
        for k in kinds:
            r = stitch(a, b, layer, train_loader, kind=k, eval_loader=ev, _accs=accs, **options)
            out["penalty"][k].append(r.penalty)
            out["accuracy"][k].append(r.accuracy)
    return out


def plot_stitching(result: dict, path, *, title: str = "stitching penalty") -> Path:
    """Penalty against depth, one line per kind (a :func:`stitching_penalties` result)."""
    from neuralign.landscape.plots import _save, plt

    fig, ax = plt.subplots(figsize=(6, 3.5))
    xs = range(len(result["layers"]))
    for k, vals in result["penalty"].items():
        ax.plot(xs, [100 * v for v in vals], marker="o", label=k)
    ax.set_xticks(list(xs), result["layers"], rotation=45, ha="right")
    ax.set_ylabel("penalty (accuracy points)")
    ax.set_title(title)
    ax.axhline(0, color="grey", lw=0.5)
    ax.legend()
    return _save(fig, path)
