"""FedMA (Wang et al., 2020; survey §5.2): layer-wise matched averaging with width growth.

One FedMA *pass* over a chain of L layers takes L communication rounds. In round l the clients
train with the already-matched layers ``< l`` frozen and send their weights; the server matches
the neurons of layer ``l`` across clients (Hungarian matching, with the option to open a new
global neuron when a client neuron matches nothing well), averages matched neurons into the
global layer ``l`` (width ``g_l >= d_l``), and sends every client back its own model with layer
``l`` replaced by the global one and the input columns of layer ``l+1`` moved to the global
neuron order. The last layer is averaged per input column over the clients that have it, each
output neuron (class) weighted by the clients' example counts of that class (FedMA's
per-class weighting, which matters under label skew). The Flower strategy that drives the
rounds is :class:`neuralign.federated.fedma_strategy.FedMA`.

Matching (our reading of Eq. 15, where the survey leaves c, epsilon and f open): neuron
features are the incoming weights and bias (inputs already in global order); the cost of
matching client neuron ``z`` to global neuron ``G_k`` is ``||z - G_k||^2``; the cost of a new
global neuron is ``threshold * ||z||^2`` (open one when ``z`` is closer to zero than to every
global neuron, scaled), and the global width is capped at ``max_growth`` times the client width.
Each client's assignment is re-solved against the average of the others a few times
(coordinate descent, as in the survey's description). Supports chains of Conv2d / Linear
layers without normalisation layers (e.g. ``get_model("cnn", norm="none")``, ``mlp``).
"""

from __future__ import annotations

import copy

import numpy as np
import torch
from scipy.optimize import linear_sum_assignment
from torch import nn

from neuralign.errors import ArchitectureMismatchError
from neuralign.models.resize import resize_layers


def chain_layers(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """The model's Conv2d / Linear layers in order; raises if it has normalisation layers."""
    for name, m in model.named_modules():
        if isinstance(m, (nn.modules.batchnorm._NormBase, nn.GroupNorm, nn.LayerNorm)):
            raise ArchitectureMismatchError(
                f"FedMA matching supports chains without normalisation layers; {name} is "
                f"{type(m).__name__} (build the model with norm='none')")
    layers = [(n, m) for n, m in model.named_modules() if isinstance(m, (nn.Conv2d, nn.Linear))]
    if len(layers) < 2:
        raise ArchitectureMismatchError("FedMA needs at least two Conv2d/Linear layers")
    return layers


def resize_like(model: nn.Module, sd: dict) -> nn.Module:
    """Return ``model`` with every Conv2d / Linear resized to the shapes in ``sd`` (in place;
    the values are to be loaded afterwards). The model's config records the new widths, so a
    checkpoint of it reloads with ``neuralign.io.load_model``."""
    shapes = {name: tuple(sd[f"{name}.weight"].shape) for name, m in model.named_modules()
              if isinstance(m, (nn.Conv2d, nn.Linear)) and f"{name}.weight" in sd}
    return resize_layers(model, shapes)


def match_layer(features: list[torch.Tensor], weights: list[float], *, threshold: float = 1.0,
                max_width: int | None = None, iters: int = 3
                ) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """Match the neurons (rows) of several clients' layers and average them.

    Returns ``(G, assign)``: the global neurons ``G`` (g x f) and, per client, the global
    index of each of its rows. ``g`` lies between the client width and ``max_width``.
    """
    J = len(features)
    d = [int(z.shape[0]) for z in features]
    f = {int(z.shape[1]) for z in features}
    if len(f) != 1:
        raise ArchitectureMismatchError(f"clients' layers have different fan-in sizes {sorted(f)}")
    cap = max_width if max_width is not None else sum(d)
    cap = max(cap, max(d))
    w = torch.tensor(weights, dtype=torch.float64)
    Z = [z.detach().double() for z in features]
    order = sorted(range(J), key=lambda j: -weights[j])
    assign: list[torch.Tensor | None] = [None] * J
    assign[order[0]] = torch.arange(d[order[0]])

    def global_mean(skip: int | None):
        g = 1 + max(int(a.max()) for j, a in enumerate(assign) if a is not None and j != skip)
        num = torch.zeros(g, Z[0].shape[1], dtype=torch.float64)
        den = torch.zeros(g, dtype=torch.float64)
        for j, a in enumerate(assign):
            if a is None or j == skip:
                continue
            num.index_add_(0, a, w[j] * Z[j])
            den.index_add_(0, a, w[j].expand(len(a)))
        used = den > 0
        remap = torch.cumsum(used.long(), 0) - 1
        return num[used] / den[used, None], used, remap

    for it in range(iters):
        for j in order:
            if it == 0 and j == order[0]:
                continue
            if all(a is None for k, a in enumerate(assign) if k != j):
                continue
            G, _used, remap = global_mean(skip=j)
            for k, a in enumerate(assign):  # compact indices of the others
                if a is not None and k != j:
                    assign[k] = remap[a]
            g = G.shape[0]
            cost = torch.cdist(Z[j], G) ** 2
            n_new = min(d[j], max(cap - g, 0))
            if g + n_new < d[j]:
                n_new = d[j] - g
            new_cost = threshold * (Z[j] ** 2).sum(1, keepdim=True).expand(d[j], n_new)
            full = torch.cat([cost, new_cost], 1).numpy()
            rows, cols = linear_sum_assignment(full)
            a = torch.empty(d[j], dtype=torch.long)
            a[torch.as_tensor(rows)] = torch.as_tensor(cols, dtype=torch.long)
            is_new = a >= g
            a[is_new] = g + torch.arange(int(is_new.sum()))  # new neurons get the next indices
            assign[j] = a
    G, _used, remap = global_mean(skip=None)
    assign = [remap[a] for a in assign]
    return G.float(), assign


def _layer_features(sd: dict, name: str) -> torch.Tensor:
    W = sd[f"{name}.weight"]
    parts = [W.reshape(W.shape[0], -1)]
    if f"{name}.bias" in sd:
        parts.append(sd[f"{name}.bias"][:, None])
    return torch.cat(parts, 1)


def _scatter_inputs(W: torch.Tensor, a: torch.Tensor, g: int) -> torch.Tensor:
    """Move the input columns of the next layer's weight to global neuron order (width g)."""
    d = len(a)
    if W.shape[1] % d != 0:
        raise ArchitectureMismatchError(f"next layer's fan-in {W.shape[1]} is not a multiple of "
                                        f"the width {d}")
    s = W.shape[1] // d  # > 1 when a conv map is flattened into a linear layer
    Wv = W.reshape(W.shape[0], d, s, *W.shape[2:])
    out = torch.zeros(W.shape[0], g, s, *W.shape[2:], dtype=W.dtype)
    out[:, a] = Wv
    return out.reshape(W.shape[0], g * s, *W.shape[2:])


def _merge_matcher(sds, weights, layers, l, template, max_width, iters):
    """Layer ``l`` via :func:`neuralign.merge.matched_averaging` (the shared FedMA matcher).

    It matches the whole chain; layers ``< l`` are identical on every client, so they come back
    as one (possibly re-ordered, functionally equal) copy, which every client adopts with the
    newly matched layer ``l``. Returns the global tensors of layers ``<= l`` and the clients'
    assignments of layer ``l``."""
    from neuralign.merge import matched_averaging

    models = []
    for sd in sds:
        m = resize_like(copy.deepcopy(template), sd)
        m.load_state_dict(sd)
        models.append(m)
    caps = [None] * (len(layers) - 1)
    caps[l] = max_width
    res = matched_averaging(models, weights=weights, max_width=caps, n_iter=iters)
    if res.layer_names != list(layers):
        raise ArchitectureMismatchError(f"matched_averaging sees layers {res.layer_names}, "
                                        f"FedMA {layers}")
    gsd = res.model.state_dict()
    glob = {f"{layers[k]}.{p}": gsd[f"{layers[k]}.{p}"].detach().clone()
            for k in range(l + 1) for p in ("weight", "bias") if f"{layers[k]}.{p}" in gsd}
    return glob, [a[l] for a in res.assignments], res.widths[l]


def matched_average_step(sds: list[dict], weights: list[float], layers: list[str], l: int, *,
                         threshold: float = 1.0, max_width: int | None = None, iters: int = 3,
                         template: nn.Module | None = None,
                         class_weights: list | None = None) -> tuple[list[dict], dict]:
    """Match layer ``l`` across the clients' state dicts; return the clients' new state dicts
    (layer ``l`` global, layer ``l+1`` inputs in global order) and the global layer's tensors.

    With ``template`` (a model of the clients' architecture) the matching is done by the shared
    :func:`neuralign.merge.matched_averaging`; without it by :func:`match_layer` here.
    ``class_weights`` (one row of per-class example counts per client) weights each output
    neuron of the last layer by the clients' counts of its class, as FedMA does; a class no
    client has falls back to ``weights``."""
    name = layers[l]
    has_bias = f"{name}.bias" in sds[0]
    if l == len(layers) - 1:  # last layer: average each input column over clients having it
        W = torch.stack([sd[f"{name}.weight"].double() for sd in sds])  # (J, C, F)
        J, C = W.shape[:2]
        ww = torch.tensor(weights, dtype=torch.float64).view(-1, 1).expand(J, C)
        if class_weights is not None:
            cw = torch.as_tensor(np.asarray(class_weights, dtype=np.float64))
            if cw.shape != (J, C):
                raise ArchitectureMismatchError(f"class_weights has shape {tuple(cw.shape)}, "
                                                f"expected (clients, classes) = {(J, C)}")
            ww = torch.where(cw.sum(0, keepdim=True) > 0, cw, ww)  # (J, C)
        present = (W.abs().sum(1, keepdim=True) > 0).double()  # (J, 1, F): column exists
        wt = ww[:, :, None] * present
        Wg = (W * wt).sum(0) / wt.sum(0).clamp_min(1e-12)
        out = {f"{name}.weight": Wg.float()}
        if has_bias:
            b = torch.stack([sd[f"{name}.bias"].double() for sd in sds])
            out[f"{name}.bias"] = ((b * ww).sum(0) / ww.sum(0).clamp_min(1e-12)).float()
        return [dict(sd, **out) for sd in sds], out
    if template is not None:
        glob, assign, g = _merge_matcher(sds, weights, layers, l, template, max_width, iters)
    else:
        feats = [_layer_features(sd, name) for sd in sds]
        G, assign = match_layer(feats, weights, threshold=threshold, max_width=max_width,
                                iters=iters)
        g = G.shape[0]
        shape = sds[0][f"{name}.weight"].shape
        glob = {f"{name}.weight": G[:, : int(np.prod(shape[1:]))].reshape(g, *shape[1:])
                .contiguous()}
        if has_bias:
            glob[f"{name}.bias"] = G[:, -1].contiguous()
    nxt = layers[l + 1]
    new = []
    for sd, a in zip(sds, assign):
        sd = dict(sd, **glob)
        sd[f"{nxt}.weight"] = _scatter_inputs(sd[f"{nxt}.weight"], a, g)
        new.append(sd)
    return new, glob
