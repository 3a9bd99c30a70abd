"""Derive a PermutationSpec by tracing a model with torch.fx.

Every tensor in the graph carries at most one permutable dimension, described by a layout
``(gid, dim, outer, inner)``; ``gid`` is a union-find node. Layers that mix channels (Linear,
Conv) end one group and start a new one; channel-wise layers (norms, activations, pooling,
dropout) pass it through; residual additions merge the groups of their operands; the model's
input and output channels are fixed (never permuted).
"""

from __future__ import annotations

import copy
import math
import operator

import torch
import torch.nn.functional as F
from torch import fx, nn
from torch.fx.passes.shape_prop import ShapeProp

from neuralign.errors import SpecError
from neuralign.spec.core import Group, PermutationSpec, Place, Probe

HOWTO = ("pass a hand-written PermutationSpec (spec=...) instead; see docs/alignment.md, "
         "'Writing a spec by hand'")

_ELEMENTWISE_MODULES = (
    nn.ReLU, nn.ReLU6, nn.LeakyReLU, nn.GELU, nn.SiLU, nn.Sigmoid, nn.Tanh, nn.Hardswish,
    nn.Hardsigmoid, nn.ELU, nn.SELU, nn.CELU, nn.Softplus, nn.Mish, nn.Identity, nn.Dropout,
    nn.Dropout1d, nn.Dropout2d, nn.Dropout3d, nn.AlphaDropout, nn.Hardtanh, nn.Tanhshrink,
    nn.LogSigmoid,
)
_POOL_MODULES = (
    nn.MaxPool1d, nn.MaxPool2d, nn.MaxPool3d, nn.AvgPool1d, nn.AvgPool2d, nn.AvgPool3d,
    nn.AdaptiveAvgPool1d, nn.AdaptiveAvgPool2d, nn.AdaptiveAvgPool3d, nn.AdaptiveMaxPool1d,
    nn.AdaptiveMaxPool2d, nn.AdaptiveMaxPool3d,
)
_BN = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)
_ELEMENTWISE_FUNCS = {
    F.relu, F.relu6, F.leaky_relu, F.gelu, F.silu, F.sigmoid, F.tanh, F.hardswish,
    F.hardsigmoid, F.elu, F.selu, F.softplus, F.mish, F.dropout, F.dropout1d, F.dropout2d,
    F.hardtanh, torch.relu, torch.sigmoid, torch.tanh, torch.nn.functional.relu_,
    torch.clamp, torch.clip, torch.exp, torch.neg, torch.abs, operator.neg, torch.square,
}
_ELEMENTWISE_METHODS = {
    "relu", "relu_", "sigmoid", "tanh", "contiguous", "clone", "float", "double", "half", "to",
    "detach", "clamp", "clamp_", "exp", "neg", "abs", "square", "type_as", "sigmoid_",
}
_POOL_FUNCS = {F.max_pool1d, F.max_pool2d, F.max_pool3d, F.avg_pool1d, F.avg_pool2d,
               F.avg_pool3d, F.adaptive_avg_pool1d, F.adaptive_avg_pool2d, F.adaptive_avg_pool3d,
               F.adaptive_max_pool1d, F.adaptive_max_pool2d, torch.max_pool2d, torch.avg_pool1d}
_BINARY = {operator.add, operator.iadd, operator.sub, operator.isub, operator.mul,
           operator.imul, operator.truediv, torch.add, torch.sub, torch.mul, torch.div}
_BINARY_METHODS = {"add", "add_", "sub", "mul", "mul_", "div", "sub_"}
_RESHAPE_METHODS = {"view", "reshape", "flatten", "squeeze"}
_CAT = {torch.cat, torch.concat, torch.stack}


class _UF:
    def __init__(self) -> None:
        self.parent: list[int] = []
        self.fixed: list[bool] = []
        self.name: list[str] = []
        self.size: list[int] = []

    def new(self, name: str, size: int, fixed: bool = False) -> int:
        self.parent.append(len(self.parent))
        self.fixed.append(fixed)
        self.name.append(name)
        self.size.append(size)
        return len(self.parent) - 1

    def find(self, i: int) -> int:
        while self.parent[i] != i:
            self.parent[i] = self.parent[self.parent[i]]
            i = self.parent[i]
        return i

    def union(self, a: int, b: int) -> int:
        ra, rb = self.find(a), self.find(b)
        if ra == rb:
            return ra
        lo, hi = min(ra, rb), max(ra, rb)
        self.parent[hi] = lo
        self.fixed[lo] = self.fixed[lo] or self.fixed[hi]
        return lo

    def fix(self, i: int) -> None:
        self.fixed[self.find(i)] = True


def _fn_name(target) -> str:
    return getattr(target, "__name__", str(target))


class _Builder:
    def __init__(self, gm: fx.GraphModule) -> None:
        self.gm = gm
        self.modules = dict(gm.named_modules())
        self.uf = _UF()
        self.layout: dict[str, tuple[int, int, int, int] | None] = {}
        self.places: list[tuple[int, Place]] = []
        self.probes: list[tuple[int, Probe]] = []

    # helpers -----------------------------------------------------------------------------
    def fail(self, node: fx.Node, why: str) -> None:
        raise SpecError(f"cannot derive a permutation spec at node {node.name!r} ({why}); {HOWTO}")

    def shape(self, node) -> tuple[int, ...] | None:
        meta = node.meta.get("tensor_meta") if isinstance(node, fx.Node) else None
        return tuple(meta.shape) if meta is not None and hasattr(meta, "shape") else None

    def lay(self, arg):
        return self.layout.get(arg.name) if isinstance(arg, fx.Node) else None

    def place(self, gid: int, key: str, axis: int, outer: int = 1, inner: int = 1) -> None:
        self.places.append((gid, Place(key, axis, outer, inner)))

    def probe(self, node: fx.Node, lay) -> None:
        gid, dim, outer, inner = lay
        self.probes.append((gid, Probe(node.name, dim, outer, inner)))

    def tensor_args(self, node: fx.Node) -> list[fx.Node]:
        return [a for a in node.all_input_nodes if self.lay(a) is not None]

    def run(self) -> PermutationSpec:
        for node in self.gm.graph.nodes:
            if node.op == "placeholder":
                shp = self.shape(node)
                if shp is not None and len(shp) >= 2:
                    gid = self.uf.new("input", shp[1], fixed=True)
                    self.layout[node.name] = (gid, 1, 1, 1)
            elif node.op == "output":
                for a in node.all_input_nodes:
                    lay = self.lay(a)
                    if lay is not None:
                        self.uf.fix(lay[0])
            elif node.op == "get_attr":
                self.layout[node.name] = None
            elif node.op == "call_module":
                self.module(node, self.modules[node.target])
            else:
                self.function(node)
        return self.finish()

    def module(self, node: fx.Node, m: nn.Module) -> None:
        args = self.tensor_args(node)
        lay = self.lay(args[0]) if args else None
        name = node.target
        out_shape = self.shape(node)
        if isinstance(m, nn.Linear):
            if lay is None:
                self.fail(node, "Linear input has unknown layout")
            gid, dim, outer, inner = lay
            in_shape = self.shape(args[0])
            if in_shape is not None and dim != len(in_shape) - 1 and not self.uf.fixed[
                    self.uf.find(gid)]:
                self.fail(node, "Linear applied across a non-channel dimension")
            self.place(gid, f"{name}.weight", 1, outer, inner)
            self.probe(args[0], lay)
            new = self.uf.new(name, m.out_features)
            self.place(new, f"{name}.weight", 0)
            if m.bias is not None:
                self.place(new, f"{name}.bias", 0)
            self.layout[node.name] = (new, len(out_shape) - 1 if out_shape else 1, 1, 1)
        elif isinstance(m, nn.modules.conv._ConvNd):
            if isinstance(m, nn.modules.conv._ConvTransposeNd):
                self.fail(node, "transposed convolutions are not supported")
            if lay is None:
                self.fail(node, "convolution input has unknown layout")
            gid, dim, outer, inner = lay
            if (dim, outer, inner) != (1, 1, 1):
                self.fail(node, "convolution input channels are not on dimension 1")
            if m.groups == 1:
                self.place(gid, f"{name}.weight", 1)
                self.probe(args[0], lay)
                new = self.uf.new(name, m.out_channels)
                self.place(new, f"{name}.weight", 0)
                if m.bias is not None:
                    self.place(new, f"{name}.bias", 0)
            elif m.groups == m.in_channels == m.out_channels:  # depthwise: channel-wise
                new = gid
                self.place(new, f"{name}.weight", 0)
                if m.bias is not None:
                    self.place(new, f"{name}.bias", 0)
            else:  # grouped conv: units may only move within groups; keep both sides fixed
                self.uf.fix(gid)
                new = self.uf.new(name, m.out_channels, fixed=True)
            self.layout[node.name] = (new, 1, 1, 1)
        elif isinstance(m, _BN):
            if lay is None:
                self.fail(node, "batch norm input has unknown layout")
            gid = lay[0]
            for k in ("weight", "bias", "running_mean", "running_var"):
                if getattr(m, k, None) is not None:
                    self.place(gid, f"{name}.{k}", 0, lay[2], lay[3])
            self.layout[node.name] = lay
        elif isinstance(m, nn.LayerNorm):
            self.layer_norm(node, name, m, lay)
        elif isinstance(m, nn.GroupNorm):
            if lay is None:
                self.fail(node, "group norm input has unknown layout")
            if m.num_groups not in (1, m.num_channels):
                self.uf.fix(lay[0])
            if m.affine:
                self.place(lay[0], f"{name}.weight", 0)
                self.place(lay[0], f"{name}.bias", 0)
            self.layout[node.name] = lay
        elif isinstance(m, _ELEMENTWISE_MODULES):
            self.layout[node.name] = lay
        elif isinstance(m, nn.PReLU):
            if lay is not None and m.num_parameters > 1:
                self.place(lay[0], f"{name}.weight", 0)
            self.layout[node.name] = lay
        elif isinstance(m, _POOL_MODULES):
            if lay is not None and lay[1] != 1:
                self.fail(node, "pooling over the channel dimension")
            self.layout[node.name] = lay
        elif isinstance(m, nn.Flatten):
            self.reshape(node, args, out_shape)
        elif isinstance(m, (nn.Softmax, nn.LogSoftmax)):
            if lay is not None:
                self.uf.fix(lay[0])
            self.layout[node.name] = lay
        else:
            if lay is None and not args:
                self.layout[node.name] = None
                return
            self.fail(node, f"module {name!r} of type {type(m).__name__} is not supported")

    def layer_norm(self, node, name, m, lay) -> None:
        if lay is None:
            self.fail(node, "layer norm input has unknown layout")
        gid, dim, outer, inner = lay
        ndim = len(self.shape(node) or ())
        first = ndim - len(m.normalized_shape)
        if dim >= first and m.elementwise_affine:
            self.place(gid, f"{name}.weight", dim - first, outer, inner)
            if m.bias is not None:
                self.place(gid, f"{name}.bias", dim - first, outer, inner)
        self.layout[node.name] = lay

    def reshape(self, node: fx.Node, args, out_shape) -> None:
        lay = self.lay(args[0]) if args else None
        if lay is None:
            self.layout[node.name] = None
            return
        in_shape = self.shape(args[0])
        gid, dim, outer, inner = lay
        if in_shape is None or out_shape is None:
            self.fail(node, "reshape of a tensor of unknown shape")
        if tuple(in_shape) == tuple(out_shape):
            self.layout[node.name] = lay
        elif (len(out_shape) == dim + 1 and tuple(out_shape[:dim]) == tuple(in_shape[:dim])
              and out_shape[dim] == math.prod(in_shape[dim:])):
            self.layout[node.name] = (gid, dim, outer, inner * math.prod(in_shape[dim + 1:]))
        elif self.uf.fixed[self.uf.find(gid)]:
            self.layout[node.name] = (gid, min(dim, len(out_shape) - 1), 1, 1)
        else:
            self.fail(node, f"reshape {tuple(in_shape)} -> {tuple(out_shape)} mixes the channel "
                      "dimension with others")

    def function(self, node: fx.Node) -> None:
        target = node.target
        args = self.tensor_args(node)
        lay = self.lay(args[0]) if args else None
        out_shape = self.shape(node)
        is_tensor_out = out_shape is not None
        if node.op == "call_method":
            label = target
            if target in _ELEMENTWISE_METHODS:
                self.layout[node.name] = lay
                return
            if target in _BINARY_METHODS:
                return self.binary(node)
            if target in _RESHAPE_METHODS:
                return self.reshape(node, args, out_shape)
            if target in ("size", "dim") or not is_tensor_out:
                self.layout[node.name] = None
                return
            if target == "mean":
                return self.reduce(node, lay)
        else:
            label = _fn_name(target)
            if target in _CAT:
                self.fail(node, "torch.cat/stack of channels is not supported")
            if target in _ELEMENTWISE_FUNCS:
                self.layout[node.name] = lay
                return
            if target in _BINARY:
                return self.binary(node)
            if target in _POOL_FUNCS:
                if lay is not None and lay[1] != 1:
                    self.fail(node, "pooling over the channel dimension")
                self.layout[node.name] = lay
                return
            if target in (torch.flatten, torch.reshape):
                return self.reshape(node, args, out_shape)
            if target is torch.mean:
                return self.reduce(node, lay)
            if target in (getattr, operator.getitem) and not is_tensor_out:
                self.layout[node.name] = None
                return
        if lay is None and all(self.lay(a) is None for a in node.all_input_nodes):
            self.layout[node.name] = None  # no permutable tensor involved
            return
        self.fail(node, f"operation {label!r} is not supported")

    def reduce(self, node: fx.Node, lay) -> None:
        if lay is None:
            self.layout[node.name] = None
            return
        dims = node.args[1] if len(node.args) > 1 else node.kwargs.get("dim")
        keep = node.kwargs.get("keepdim", node.args[2] if len(node.args) > 2 else False)
        if dims is None:
            self.fail(node, "mean over all dimensions including channels")
        dims = [dims] if isinstance(dims, int) else list(dims)
        ndim = len(self.shape(node.all_input_nodes[0]))
        dims = [d % ndim for d in dims]
        gid, dim, outer, inner = lay
        if dim in dims:
            self.fail(node, "mean over the channel dimension")
        new_dim = dim if keep else dim - sum(d < dim for d in dims)
        self.layout[node.name] = (gid, new_dim, outer, inner)

    def binary(self, node: fx.Node) -> None:
        out_shape = self.shape(node)
        lays = []
        for a in node.args:
            if isinstance(a, fx.Node):
                if a.op == "get_attr":
                    lays.append(("attr", a))
                elif self.lay(a) is not None:
                    lays.append(("t", a))
        tens = [a for k, a in lays if k == "t"]
        if not tens:
            self.layout[node.name] = None
            return
        base = self.lay(tens[0])
        gid, dim, outer, inner = base
        nd = len(out_shape)
        for a in tens[1:]:
            g2, d2, o2, i2 = self.lay(a)
            s2 = self.shape(a)
            if s2 is not None and len(s2) == nd and s2[d2] == 1:
                continue  # broadcast over channels
            if (nd - len(s2) + d2, o2, i2) != (nd - len(self.shape(tens[0])) + dim, outer, inner):
                self.fail(node, "elementwise operation between tensors of different layouts")
            gid = self.uf.union(gid, g2)
        for k, a in lays:
            if k == "attr":
                s2 = tuple(self.gm.get_parameter(a.target).shape) if a.target in dict(
                    self.gm.named_parameters()) else tuple(self.gm.get_buffer(a.target).shape)
                ax = dim - (nd - len(s2))
                if ax >= 0 and s2[ax] != 1:
                    self.place(gid, a.target, ax, outer, inner)
        self.layout[node.name] = (gid, nd - len(self.shape(tens[0])) + dim, outer, inner)

    # assemble ----------------------------------------------------------------------------
    def finish(self) -> PermutationSpec:
        uf = self.uf
        groups: dict[int, Group] = {}
        used: set[str] = set()
        for gid, place in self.places:
            r = uf.find(gid)
            if uf.fixed[r]:
                continue
            if r not in groups:
                name = uf.name[r]
                while name in used:
                    name += "_"
                used.add(name)
                groups[r] = Group(name, uf.size[r])
            if place not in groups[r].places:
                groups[r].places.append(place)
        for gid, probe in self.probes:
            r = uf.find(gid)
            if r in groups and probe not in groups[r].probes:
                groups[r].probes.append(probe)
        ordered = sorted(groups.items())
        return PermutationSpec({g.name: g for _, g in ordered}, source="fx")


def trace_model(model: nn.Module) -> fx.GraphModule:
    """symbolic_trace a (copy of) the model; errors become one-line SpecErrors."""
    try:
        return fx.symbolic_trace(model)
    except Exception as exc:  # noqa: BLE001 - fx raises many kinds
        msg = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise SpecError(f"torch.fx cannot trace {type(model).__name__} ({type(exc).__name__}: "
                        f"{msg[:160]}); {HOWTO}") from None


def trace_spec(model: nn.Module, example_input) -> PermutationSpec:
    m = copy.deepcopy(model).eval()
    gm = trace_model(m)
    inputs = example_input if isinstance(example_input, (tuple, list)) else (example_input,)
    try:
        with torch.no_grad():
            ShapeProp(gm).propagate(*inputs)
    except Exception as exc:  # noqa: BLE001
        raise SpecError(f"the example input does not run through {type(model).__name__} "
                        f"({type(exc).__name__}: {str(exc).splitlines()[0][:160]})") from None
    return _Builder(gm).run()
