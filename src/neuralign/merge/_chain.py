"""Sequential-chain view of a model (for OT fusion, matched averaging and ZipIt).

A chain is a sequence of Conv/Linear layers where each layer's input comes from the previous
one through per-unit operations only (activation, pooling, dropout, flatten, batch norm). The
view is found by tracing with torch.fx; residual or concatenating models are rejected.

Every batch norm between two Conv/Linear layers belongs to the first one's units, wherever it
sits (``conv -> BN -> ReLU`` or ``conv -> ReLU -> BN``, or after pooling): its affine and running
statistics travel with the units and are merged with them. A batch norm anywhere else (on the
input, after the output layer) is refused. ``post`` names the graph node whose output is the
layer's post-activation feature: the last activation or batch norm before the next Conv/Linear
(pooling, dropout and flattening come after it), as ZipIt's graphs and otfusion take it.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Iterable
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import fx, nn

from neuralign.errors import ArchitectureMismatchError, DataError
from neuralign.utils import model_device, split_batch

_W = (nn.Linear, nn.Conv1d, nn.Conv2d)
_BN = (nn.BatchNorm1d, nn.BatchNorm2d)
_ACT_MODULES = (nn.ReLU, nn.GELU, nn.Tanh, nn.Sigmoid, nn.LeakyReLU, nn.SiLU, nn.ELU)
_PASS_MODULES = (nn.Dropout, nn.MaxPool1d, nn.MaxPool2d, nn.AvgPool1d, nn.AvgPool2d,
                 nn.AdaptiveAvgPool1d, nn.AdaptiveAvgPool2d, nn.AdaptiveMaxPool2d, nn.Flatten,
                 nn.Identity) + _ACT_MODULES + _BN
_ACT_FUNCTIONS = (F.relu, torch.relu, F.gelu, torch.tanh, torch.sigmoid, F.silu, F.leaky_relu, F.elu)
_ACT_METHODS = ("relu", "tanh", "sigmoid")
# functions and tensor methods that act per unit (or only reshape / pool within a unit's map)
_PASS_FUNCTIONS = _ACT_FUNCTIONS + (
    torch.flatten, F.dropout, F.max_pool1d, F.max_pool2d, F.avg_pool1d, F.avg_pool2d,
    F.adaptive_avg_pool1d, F.adaptive_avg_pool2d, F.adaptive_max_pool1d, F.adaptive_max_pool2d)
_PASS_METHODS = _ACT_METHODS + ("view", "reshape", "flatten", "contiguous", "squeeze", "unsqueeze")
_CHAIN_HINT = "OT fusion, matched averaging and ZipIt support MLP/VGG-style chains only"


@dataclass
class ChainLayer:
    """One Conv/Linear layer of the chain. ``norms``: the batch norms between it and the next
    layer (in order); ``node``: its graph node; ``post``: the graph node of its post-activation
    feature (``node`` itself when nothing per-unit follows)."""

    name: str
    module: nn.Module
    norms: list[str] = field(default_factory=list)
    node: str = ""
    post: str = ""

    @property
    def norm(self) -> str | None:
        return self.norms[0] if self.norms else None


def chain_layers(model: nn.Module) -> list[ChainLayer]:
    gm = _trace(model)
    mods = dict(gm.named_modules())
    layers: list[ChainLayer] = []
    last_node: fx.Node | None = None
    for node in gm.graph.nodes:
        if node.op != "call_module" or not isinstance(mods[node.target], _W):
            continue
        src, path = _weighted_source(node, mods)
        if src is not last_node:
            raise ArchitectureMismatchError(
                f"{type(model).__name__} is not a sequential chain at layer '{node.target}' "
                f"(residual connections, concatenation or reused layers); {_CHAIN_HINT}")
        m = mods[node.target]
        if getattr(m, "groups", 1) != 1:
            raise ArchitectureMismatchError(f"grouped convolution '{node.target}' is not supported")
        if layers:
            _attach(layers[-1], path, mods)
        else:
            _no_norm(path, mods, "before the first Conv/Linear layer")
        layers.append(ChainLayer(node.target, m, node=node.name, post=node.name))
        last_node = node
    if len(layers) < 2:
        raise ArchitectureMismatchError("the model needs at least two Conv/Linear layers to be fused")
    for node in gm.graph.nodes:
        if node.op == "output" and isinstance(node.args[0], fx.Node):
            _, path = _weighted_source(node, mods, strict=False)
            _no_norm(path, mods, "after the output layer")
    for n, m in gm.named_modules():
        if isinstance(m, (nn.LayerNorm, nn.GroupNorm)):
            raise ArchitectureMismatchError(f"norm layer '{n}' ({type(m).__name__}) is not supported here")
    return layers


def _trace(model: nn.Module) -> fx.GraphModule:
    try:
        return fx.symbolic_trace(model)
    except Exception as exc:  # noqa: BLE001 - any tracing failure means "not a simple chain"
        raise ArchitectureMismatchError(
            f"cannot trace {type(model).__name__} with torch.fx ({type(exc).__name__}); "
            f"{_CHAIN_HINT} (MLP, VGG, CNN)") from None


def _is_act(node: fx.Node, mods) -> bool:
    if node.op == "call_module":
        return isinstance(mods[node.target], _ACT_MODULES)
    if node.op == "call_function":
        return node.target in _ACT_FUNCTIONS
    return node.op == "call_method" and node.target in _ACT_METHODS


def _is_bn(node: fx.Node, mods) -> bool:
    return node.op == "call_module" and isinstance(mods[node.target], _BN)


def _attach(layer: ChainLayer, path: list[fx.Node], mods) -> None:
    """Give ``layer`` the batch norms and the post-activation node on ``path`` (forward order)."""
    layer.norms = [n.target for n in path if _is_bn(n, mods)]
    unitwise = [n for n in path if _is_bn(n, mods) or _is_act(n, mods)]
    if unitwise:
        layer.post = unitwise[-1].name


def _no_norm(path: list[fx.Node], mods, where: str) -> None:
    for n in path:
        if _is_bn(n, mods):
            raise ArchitectureMismatchError(
                f"batch norm '{n.target}' sits {where}, not between two Conv/Linear layers; "
                f"{_CHAIN_HINT} with batch norms on hidden units")


def _weighted_source(node: fx.Node, mods, strict: bool = True) -> tuple[fx.Node | None, list[fx.Node]]:
    """The Conv/Linear node feeding ``node`` (None: the input) and the nodes in between, in
    forward order."""
    cur = node.args[0]
    path: list[fx.Node] = []
    while True:
        if not isinstance(cur, fx.Node):
            raise ArchitectureMismatchError("unexpected non-tensor input in the traced graph")
        if cur.op == "placeholder":
            return None, path[::-1]
        if cur.op == "call_module":
            m = mods[cur.target]
            if isinstance(m, _W):
                return cur, path[::-1]
            if isinstance(m, _PASS_MODULES):
                path.append(cur)
                cur = cur.args[0]
                continue
            raise ArchitectureMismatchError(f"module '{cur.target}' ({type(m).__name__}) breaks the chain")
        if (cur.op == "call_method" and cur.target in _PASS_METHODS) or (
                cur.op == "call_function" and cur.target in _PASS_FUNCTIONS):
            path.append(cur)
            cur = cur.args[0]
            continue
        if not strict:
            return None, path[::-1]
        tensor_args = [a for a in cur.args if isinstance(a, fx.Node)]
        if len(tensor_args) != 1:
            raise ArchitectureMismatchError(
                f"the model is not a sequential chain: the graph merges several tensors at "
                f"'{cur.name}' (residual connections or concatenation); {_CHAIN_HINT}")
        what = cur.target if isinstance(cur.target, str) else getattr(cur.target, "__name__", cur.target)
        raise ArchitectureMismatchError(
            f"operation '{what}' at '{cur.name}' between two Conv/Linear layers is not one the "
            f"chain view knows to act per unit (activations, norms, pooling, dropout, flatten); "
            f"{_CHAIN_HINT}")


class _Recorder(fx.Interpreter):
    def __init__(self, gm: fx.GraphModule, wanted: set[str]):
        super().__init__(gm)
        self.wanted, self.seen = wanted, {}

    def run_node(self, n):
        out = super().run_node(n)
        if n.name in self.wanted:  # a copy: a later in-place op (ReLU(inplace=True)) would change it
            self.seen[n.name] = out.detach().clone()
        return out


@torch.no_grad()
def chain_features(model: nn.Module, nodes: list[str], loader: Iterable, n_samples: int,
                   what: str = "features") -> list[torch.Tensor]:
    """Outputs of the graph ``nodes`` (names from :func:`chain_layers` on ``model``) on up to
    ``n_samples`` inputs of ``loader``, in eval mode: one (rows, units) float64 matrix per node
    (conv outputs contribute one row per position; at most ``4 * n_samples`` rows, a seeded
    random subset)."""
    gm = _trace(model)  # shares the model's submodules: their train/eval flags are restored
    modes = [(m, m.training) for m in model.modules()]
    gm.eval()
    rec = _Recorder(gm, set(nodes))
    acts: dict[str, list] = {n: [] for n in nodes}
    seen = 0
    try:
        for batch in loader:
            x, _ = split_batch(batch)
            rec.seen = {}
            rec.run(x.to(model_device(model)))
            for n in nodes:
                o = rec.seen[n]
                acts[n].append(o.movedim(1, -1).reshape(-1, o.shape[1]) if o.dim() > 2 else o)
            seen += len(x)
            if seen >= n_samples:
                break
    finally:
        for m, mode in modes:
            m.train(mode)
    if seen == 0:
        raise DataError(f"the data loader yielded no batches; pass a non-empty loader for the {what}")
    g = torch.Generator().manual_seed(0)
    out = []
    for n in nodes:
        a = torch.cat(acts[n]).double().cpu()
        if a.shape[0] > 4 * n_samples:
            a = a[torch.randperm(a.shape[0], generator=g)[: 4 * n_samples]]
        out.append(a)
    return out


_BN_KEYS = ("weight", "bias", "running_mean", "running_var")


def cpu_state(sd: dict) -> dict:
    """The state dict's tensors on the CPU (the chain methods compute there; :func:`build_chain`
    puts the result on the template's device)."""
    return {k: v.detach().cpu() if isinstance(v, torch.Tensor) else v for k, v in sd.items()}


def layer_tensors(sd: dict, layers: list[ChainLayer]) -> list[dict]:
    """Per layer: ``w`` as (out, n_in_units, rest), ``b`` (out,) or None, ``norm`` (4 k, out) or
    None (the k batch norms' weight, bias, running mean and running variance, stacked)."""
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
        if L.norms:  # 4 rows (weight, bias, running mean, running var) per batch norm
            norm = torch.cat([torch.stack([sd[f"{n}.{k}"] for k in _BN_KEYS]) for n in L.norms])
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
        new.train(old.training)
        _set(model, L.name, new.to(old.weight.device))
        for j, name in enumerate(L.norms):
            oldn = _get(model, name)
            bn = type(oldn)(out_f, eps=oldn.eps, momentum=oldn.momentum)
            nw, nb, rm, rv = t["norm"][4 * j: 4 * j + 4].float()
            bn.weight.data, bn.bias.data = nw.clone(), nb.clone()
            bn.running_mean.copy_(rm)
            bn.running_var.copy_(rv.clamp_min(0))
            bn.train(oldn.training)
            _set(model, name, bn.to(old.weight.device))
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
