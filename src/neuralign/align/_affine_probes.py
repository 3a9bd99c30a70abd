"""Probes whose statistics follow exactly from another probe's: the output of a batch norm in
evaluation mode is a per-unit affine map ``k * x + t`` of its input, so when both are probed
the statistics pass measures the input only and derives the output's moments from it (a third
less work on conv -> BN -> ReLU nets, where every group probes all three)."""

from __future__ import annotations

import torch
from torch import fx, nn

from neuralign.spec.core import Probe

# the unit dimension a probe must name to be the norm's channels whatever the input's rank (a
# BatchNorm1d's dim -1 is its channels only on 2-d inputs, unknown here: measured)
_CHANNEL_DIMS = {nn.BatchNorm1d: (1,), nn.BatchNorm2d: (1, -3), nn.BatchNorm3d: (1, -4)}


def batchnorm_children(gm: fx.GraphModule, groups: dict[str, tuple[int, list[Probe]]]
                       ) -> dict[str, tuple[str, str]]:
    """``{probe: (probed input, module path)}`` for every probe (graph node or module hook)
    that is an eval-mode batch norm with running statistics, called once, on the output of
    another probe, where every group (``{name: (size, probes)}``) probing the norm's output
    along its channels probes the input the same way. Their statistics are derivable; anything
    else is measured."""
    kinds = {(p.kind, p.name) for _, ps in groups.values() for p in ps}
    calls: dict = {}
    for node in gm.graph.nodes:
        if node.op == "call_module":
            calls[node.target] = calls.get(node.target, 0) + 1

    def probe(node):  # the probe name this node's value is seen under, if any
        if not isinstance(node, fx.Node):
            return None
        if ("node", node.name) in kinds:
            return node.name
        if (node.op == "call_module" and ("module", node.target) in kinds
                and calls[node.target] == 1):
            return node.target
        return None

    out = {}
    for node in gm.graph.nodes:
        name = probe(node)
        if name is None or node.op != "call_module" or not node.args:
            continue
        bn, src = gm.get_submodule(node.target), probe(node.args[0])
        dims = _CHANNEL_DIMS.get(type(bn))
        if dims is None or bn.training or bn.running_mean is None or src is None:
            continue
        ok = True
        for size, ps in groups.values():
            for p in (p for p in ps if p.name == name):
                ok &= (p.dim in dims and p.outer == p.inner == 1 and size == bn.num_features
                       and any(q.name == src and q.dim == p.dim and q.outer == q.inner == 1
                               for q in ps))
        if ok:
            out[name] = (src, node.target)
    return out


def bn_scale_shift(bn: nn.modules.batchnorm._BatchNorm) -> tuple[torch.Tensor, torch.Tensor]:
    """``(k, t)`` in float64 with ``bn(x) = k * x + t`` per channel (evaluation mode)."""
    k = (bn.running_var.double() + bn.eps).rsqrt()
    if bn.weight is not None:
        k = k * bn.weight.detach().double()
    t = -bn.running_mean.double() * k
    if bn.bias is not None:
        t = t + bn.bias.detach().double()
    return k, t
