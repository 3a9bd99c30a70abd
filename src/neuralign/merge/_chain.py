"""Sequential-chain view of a model (for OT fusion, matched averaging and ZipIt).

A chain is a sequence of Conv/Linear layers where each layer's input comes from the previous
one through per-unit operations only (activation, pooling, dropout, flatten, batch norm). The
view is found by tracing with torch.fx; residual or concatenating models are rejected.
"""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass

import torch
from torch import fx, nn

from neuralign.errors import ArchitectureMismatchError

_W = (nn.Linear, nn.Conv1d, nn.Conv2d)
_BN = (nn.BatchNorm1d, nn.BatchNorm2d)
_PASS_MODULES = (nn.ReLU, nn.GELU, nn.Tanh, nn.Sigmoid, nn.LeakyReLU, nn.SiLU, nn.ELU, nn.Dropout,
                 nn.MaxPool1d, nn.MaxPool2d, nn.AvgPool1d, nn.AvgPool2d, nn.AdaptiveAvgPool1d,
                 nn.AdaptiveAvgPool2d, nn.AdaptiveMaxPool2d, nn.Flatten, nn.Identity) + _BN


@dataclass
class ChainLayer:
    name: str
    module: nn.Module
    norm: str | None = None


def chain_layers(model: nn.Module) -> list[ChainLayer]:
    try:
        gm = fx.symbolic_trace(model)
    except Exception as exc:  # noqa: BLE001 - any tracing failure means "not a simple chain"
        raise ArchitectureMismatchError(
            f"cannot trace {type(model).__name__} with torch.fx ({type(exc).__name__}); OT fusion, "
            "matched averaging and ZipIt need a sequential Conv/Linear chain (MLP, VGG, CNN)"
        ) from None
    mods = dict(gm.named_modules())
    layers: list[ChainLayer] = []
    last_weighted: str | None = None
    for node in gm.graph.nodes:
        if node.op != "call_module" or not isinstance(mods[node.target], _W):
            continue
        src = _weighted_source(node, mods)
        if src != last_weighted:
            raise ArchitectureMismatchError(
                f"{type(model).__name__} is not a sequential chain at layer '{node.target}' "
                "(residual connections, concatenation or reused layers); OT fusion, matched "
                "averaging and ZipIt support MLP/VGG-style models only"
            )
        m = mods[node.target]
        if getattr(m, "groups", 1) != 1:
            raise ArchitectureMismatchError(f"grouped convolution '{node.target}' is not supported")
        norm = None
        for user in node.users:
            if user.op == "call_module" and isinstance(mods[user.target], _BN):
                norm = user.target
        layers.append(ChainLayer(node.target, m, norm))
        last_weighted = node.target
    if len(layers) < 2:
        raise ArchitectureMismatchError("the model needs at least two Conv/Linear layers to be fused")
    for n, m in gm.named_modules():
        if isinstance(m, (nn.LayerNorm, nn.GroupNorm)):
            raise ArchitectureMismatchError(f"norm layer '{n}' ({type(m).__name__}) is not supported here")
    return layers


def _weighted_source(node: fx.Node, mods) -> str | None:
    cur = node.args[0]
    while True:
        if not isinstance(cur, fx.Node):
            raise ArchitectureMismatchError("unexpected non-tensor input in the traced graph")
        if cur.op == "placeholder":
            return None
        if cur.op == "call_module":
            m = mods[cur.target]
            if isinstance(m, _W):
                return cur.target
            if isinstance(m, _PASS_MODULES):
                cur = cur.args[0]
                continue
            raise ArchitectureMismatchError(f"module '{cur.target}' ({type(m).__name__}) breaks the chain")
        if cur.op == "call_method" and cur.target in ("view", "reshape", "flatten", "relu",
                                                      "contiguous", "squeeze", "unsqueeze"):
            cur = cur.args[0]
            continue
        tensor_args = [a for a in cur.args if isinstance(a, fx.Node)]
        if len(tensor_args) != 1:
            return "<merge-point>"
        cur = tensor_args[0]


def layer_tensors(sd: dict, layers: list[ChainLayer]) -> list[dict]:
    """Per layer: ``w`` as (out, n_in_units, rest), ``b`` (out,) or None, ``norm`` (4, out) or None."""
    out = []
    n_prev = None
    for L in layers:
        w = sd[L.name + ".weight"]
        n_in = w.shape[1] if n_prev is None else n_prev
        if w.shape[1] * math.prod(w.shape[2:]) % n_in:
            raise ArchitectureMismatchError(f"layer '{L.name}' input size does not fit the previous layer")
        w3 = w.reshape(w.shape[0], n_in, -1)
        b = sd.get(L.name + ".bias")
        norm = None
        if L.norm is not None:
            norm = torch.stack([sd[f"{L.norm}.{k}"] for k in ("weight", "bias", "running_mean", "running_var")])
        out.append({"w": w3, "b": b, "norm": norm})
        n_prev = w.shape[0]
    return out


def build_chain(template: nn.Module, layers: list[ChainLayer], tensors: list[dict]) -> nn.Module:
    """A copy of ``template`` whose chain layers (and norms) are replaced by ``tensors`` (any widths)."""
    model = copy.deepcopy(template)
    for L, t in zip(layers, tensors):
        old = L.module
        w3 = t["w"]
        out_f, n_in, r = w3.shape
        if isinstance(old, nn.Linear):
            new = nn.Linear(n_in * r, out_f, bias=t["b"] is not None)
            new.weight.data = w3.reshape(out_f, n_in * r).clone().float()
        else:
            cls = type(old)
            new = cls(n_in, out_f, old.kernel_size, stride=old.stride, padding=old.padding,
                      dilation=old.dilation, bias=t["b"] is not None, padding_mode=old.padding_mode)
            new.weight.data = w3.reshape(out_f, n_in, *old.kernel_size).clone().float()
        if t["b"] is not None:
            new.bias.data = t["b"].clone().float()
        _set(model, L.name, new.to(old.weight.device))
        if L.norm is not None:
            oldn = _get(model, L.norm)
            bn = type(oldn)(out_f, eps=oldn.eps, momentum=oldn.momentum)
            nw, nb, rm, rv = t["norm"].float()
            bn.weight.data, bn.bias.data = nw.clone(), nb.clone()
            bn.running_mean.copy_(rm)
            bn.running_var.copy_(rv.clamp_min(0))
            _set(model, L.norm, bn.to(old.weight.device))
    return model


def _get(model, name):
    return model.get_submodule(name)


def _set(model, name, module):
    parent, _, attr = name.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, attr, module)


def transport_rows(M: torch.Tensor, t: dict) -> dict:
    """Apply a unit map ``M`` (n_from, n_to) to a layer's output units: rows_to = M^T rows_from."""
    w = torch.einsum("ij,iar->jar", M, t["w"])
    b = None if t["b"] is None else M.T @ t["b"]
    norm = None if t["norm"] is None else t["norm"] @ M
    return {"w": w, "b": b, "norm": norm}


def transport_cols(M: torch.Tensor, t: dict) -> dict:
    """Re-express a layer's inputs in another unit basis: ``w[:, j] = sum_i w[:, i] M[i, j]``."""
    return {**t, "w": torch.einsum("oir,ij->ojr", t["w"], M)}
