"""FedMA (Wang et al., 2020; survey §5.2): layer-wise matched averaging with width growth.

One FedMA *pass* over a chain of L layers takes L communication rounds. In round l the clients
train with the already-matched layers ``< l`` frozen and send their weights; the server matches
the neurons of layer ``l`` across clients (Hungarian matching, with the option to open a new
global neuron when a client neuron matches nothing well), averages matched neurons into the
global layer ``l`` (width ``g_l >= d_l``), and sends every client back its own model with layer
``l`` replaced by the global one and the input columns of layer ``l+1`` moved to the global
neuron order. The last layer is averaged (per input column, over the clients that have it).

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
import dataclasses
import math

import numpy as np
import torch
from scipy.optimize import linear_sum_assignment
from torch import nn

from neuralign.errors import ArchitectureMismatchError, NeuralignError


@dataclasses.dataclass
class FedMAConfig:
    min_clients: int = 2
    min_replies: int = 1
    fraction: float = 1.0
    threshold: float = 1.0
    max_growth: float = 1.5
    iters: int = 3
    matcher: str = "merge"  # "merge": neuralign.merge.matched_averaging; "own": match_layer
    failures: dict = dataclasses.field(default_factory=dict)
    participants: dict = dataclasses.field(default_factory=dict)


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


def _replace(model: nn.Module, name: str, new: nn.Module) -> None:
    parent = model.get_submodule(name.rsplit(".", 1)[0]) if "." in name else model
    setattr(parent, name.rsplit(".", 1)[-1], new)


def resize_like(model: nn.Module, sd: dict) -> nn.Module:
    """Return ``model`` with every Conv2d / Linear resized to the shapes in ``sd`` (in place;
    the values are to be loaded afterwards)."""
    for name, m in list(model.named_modules()):
        key = f"{name}.weight"
        if key not in sd or not isinstance(m, (nn.Conv2d, nn.Linear)):
            continue
        shape = tuple(sd[key].shape)
        if shape == tuple(m.weight.shape):
            continue
        if isinstance(m, nn.Linear):
            new = nn.Linear(shape[1], shape[0], bias=m.bias is not None)
        else:
            if m.groups != 1:
                raise ArchitectureMismatchError(f"cannot resize grouped convolution {name}")
            new = nn.Conv2d(shape[1], shape[0], m.kernel_size, m.stride, m.padding, m.dilation,
                            bias=m.bias is not None, padding_mode=m.padding_mode)
        _replace(model, name, new)
    return model


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
            G, used, remap = global_mean(skip=j)
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
    G, used, remap = global_mean(skip=None)
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
                         template: nn.Module | None = None) -> tuple[list[dict], dict]:
    """Match layer ``l`` across the clients' state dicts; return the clients' new state dicts
    (layer ``l`` global, layer ``l+1`` inputs in global order) and the global layer's tensors.

    With ``template`` (a model of the clients' architecture) the matching is done by the shared
    :func:`neuralign.merge.matched_averaging`; without it by :func:`match_layer` here."""
    name = layers[l]
    has_bias = f"{name}.bias" in sds[0]
    if l == len(layers) - 1:  # last layer: average each input column over clients having it
        W = torch.stack([sd[f"{name}.weight"].double() for sd in sds])
        ww = torch.tensor(weights, dtype=torch.float64).view(-1, 1, 1)
        present = (W.abs().sum(1, keepdim=True) > 0).double() * ww
        Wg = (W * ww).sum(0) / present.sum(0).clamp_min(1e-12)
        out = {f"{name}.weight": Wg.float()}
        if has_bias:
            b = torch.stack([sd[f"{name}.bias"].double() for sd in sds])
            out[f"{name}.bias"] = ((b * ww[:, :, 0]).sum(0) / ww.sum()).float()
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


def run_fedma(grid, task, model, cfg: FedMAConfig, rounds: int, train_config, evaluate_fn,
              timeout: float) -> dict:
    """FedMA's server loop on a Flower ``Grid`` (one communication round per layer)."""
    from flwr.app import ArrayRecord, ConfigRecord, Message, MessageType, RecordDict

    from neuralign.federated.strategies import _Reporting

    layers = [n for n, _ in chain_layers(model)]
    L = len(layers)
    base_width = {n: m.weight.shape[0] for n, m in chain_layers(model)}
    global_sd = {k: v.clone() for k, v in model.state_dict().items()}
    rep = _Reporting()
    rep._init_reporting()
    ev0 = evaluate_fn(0, ArrayRecord(global_sd))
    hist = {"round": [0], "accuracy": [float(ev0["accuracy"])], "loss": [float(ev0["loss"])],
            "widths": {}}
    client_sds: dict[int, dict] = {}
    for r in range(1, rounds + 1):
        l = (r - 1) % L
        if l == 0:  # a new pass: every available node starts from the global model
            nodes = list(grid.get_node_ids())
            if len(nodes) < cfg.min_clients:
                raise NeuralignError(f"FedMA needs {cfg.min_clients} clients, {len(nodes)} online")
            client_sds = {n: global_sd for n in nodes}
        freeze = ",".join(f"{layers[k]}.{p}" for k in range(l) for p in ("weight", "bias")
                          if f"{layers[k]}.{p}" in global_sd)
        msgs = []
        for nid, sd in client_sds.items():
            conf = ConfigRecord(dict(train_config, **{"method": "fedma", "server-round": r,
                                                      "freeze": freeze}))
            msgs.append(Message(RecordDict({"arrays": ArrayRecord(sd), "config": conf}),
                                dst_node_id=nid, message_type=MessageType.TRAIN, group_id=str(r)))
        msgs = rep._record_sent(r, msgs)
        replies = [m for m in rep._record_replies(r, grid.send_and_receive(msgs, timeout=timeout))
                   if not m.has_error()]
        if len(replies) < max(cfg.min_replies, 1):
            raise NeuralignError(f"FedMA round {r}: {len(replies)} client(s) answered, fewer "
                                 f"than min_replies={cfg.min_replies}")
        ids = [m.metadata.src_node_id for m in replies]
        sds = [m.content["arrays"].to_torch_state_dict() for m in replies]
        weights = [float(m.content["metrics"]["num-examples"]) for m in replies]
        cap = int(math.ceil(cfg.max_growth * base_width[layers[l]]))
        new, glob = matched_average_step(sds, weights, layers, l, threshold=cfg.threshold,
                                         max_width=cap, iters=cfg.iters,
                                         template=model if cfg.matcher == "merge" else None)
        client_sds = dict(zip(ids, new))  # failed clients sit out the rest of this pass
        hist["widths"][str(r)] = int(glob[f"{layers[l]}.weight"].shape[0])
        acc, loss = float("nan"), float("nan")
        if l != L - 1:  # mid-pass: no global model to evaluate yet; report the matched layer
            from neuralign.federated.server import ROUND_HOOKS

            for hook in list(ROUND_HOOKS):
                hook(r, {"layer": layers[l], "width": hist["widths"][str(r)]})
        if l == L - 1:  # pass complete: every layer is global
            global_sd = copy.copy(new[0])
            ev = evaluate_fn(r, ArrayRecord(global_sd))
            acc, loss = float(ev["accuracy"]), float(ev["loss"])
        hist["round"].append(r)
        hist["accuracy"].append(acc)
        hist["loss"].append(loss)
    cfg.failures, cfg.participants = rep.failures, rep.participants
    hist["failures"] = {str(k): v for k, v in rep.failures.items()}
    hist["participants"] = {str(k): v for k, v in rep.participants.items()}
    hist["global_widths"] = {n: int(global_sd[f"{n}.weight"].shape[0]) for n in layers}
    hist["_final_arrays"] = ArrayRecord(global_sd)
    if math.isnan(hist["accuracy"][-1]):  # the last pass is incomplete: report the last global
        done = [a for a in hist["accuracy"] if not math.isnan(a)]
        hist["accuracy"][-1] = done[-1]
        hist["loss"][-1] = [x for x in hist["loss"] if not math.isnan(x)][-1]
    return hist
