"""Derive a PermutationSpec by tracing a model at the ATen level (``torch.export``).

``torch.export`` (non-strict) runs the model on the example input and records every ATen
operation, so anything that runs is traced, Python control flow included. Every parameter axis
starts as its own group; each operation unifies the axes that must carry one permutation
(:mod:`neuralign.spec.rules`), passes layouts on, or fixes groups it cannot account for. The
model's inputs and outputs are fixed. What is left free is exact by construction; the reasons
for everything fixed are kept for :meth:`PermutationSpec.coverage`.
"""

from __future__ import annotations

import time

import torch
from torch import fx, nn

import neuralign.spec.rules_shape  # noqa: F401 - registers the shape rules
from neuralign.errors import SpecError
from neuralign.spec.build import build_spec
from neuralign.spec.core import PermutationSpec
from neuralign.spec.layout import Groups, const
from neuralign.spec.rules import RULES, unknown
from neuralign.spec.shapes import const_layout
from neuralign.utils import eval_mode

HOWTO = ("pass a hand-written PermutationSpec (spec=...) instead; see docs/alignment.md, "
         "'Writing a spec by hand'")


def _first_line(exc: Exception) -> str:
    msg = str(exc).strip()
    return (msg.splitlines()[0] if msg else type(exc).__name__)[:160]


class Tracer:
    def __init__(self, ep, state_dict, extra=None) -> None:
        self.extra = extra or {}  # tensors outside the state dict (non-persistent buffers)
        self.ep = ep
        self.g = Groups()
        self.layouts: dict[str, object] = {}
        self.param_axes: list[tuple[int, str, int]] = []  # (gid, state-dict key, axis)
        self.params: dict[str, str] = {}  # placeholder name -> state-dict key
        self.units: list[tuple] = []  # layer output axes (hidden units)
        self.unknown_ops: dict[str, int] = {}
        self.sd_keys = set(state_dict)

    # helpers used by the rules -------------------------------------------------------------
    def opname(self, node) -> str:
        tgt = node.target
        if hasattr(tgt, "_schema"):
            return tgt._schema.name.split("::")[-1]
        return getattr(tgt, "__name__", str(tgt))

    def lay(self, arg):
        return self.layouts.get(arg.name) if isinstance(arg, fx.Node) else None

    def shape(self, arg):
        val = arg.meta.get("val") if isinstance(arg, fx.Node) else None
        if isinstance(val, (list, tuple)):
            return [tuple(v.shape) if hasattr(v, "shape") else None for v in val]
        return tuple(val.shape) if hasattr(val, "shape") else None

    def is_param(self, arg) -> bool:
        return isinstance(arg, fx.Node) and arg.name in self.params

    def tensor_args(self, node):
        out = []
        for a in _flat(list(node.args) + list(node.kwargs.values())):
            if isinstance(a, fx.Node) and isinstance(self.lay(a), tuple):
                out.append((self.lay(a), self.shape(a)))
        return out

    def const_value(self, node):
        shp = self.shape(node)
        if isinstance(shp, list):
            return [const_layout(s) if s is not None else None for s in shp]
        return const_layout(shp) if shp is not None else None

    def fix_value(self, lay, reason: str, hidden: bool = True) -> None:
        if isinstance(lay, list):
            for x in lay:
                self.fix_value(x, reason, hidden)
        elif isinstance(lay, tuple):
            for d in lay:
                self.g.fix_dim(d, reason, hidden)

    def unit_axis(self, dim) -> None:
        self.units.append(dim)

    # the walk ------------------------------------------------------------------------------
    def placeholders(self) -> None:
        from torch.export.graph_signature import InputKind

        for spec in self.ep.graph_signature.input_specs:
            name = spec.arg.name
            node = next(n for n in self.ep.graph.nodes if n.name == name)
            shape = self.shape(node)
            if shape is None:
                self.layouts[name] = None
                continue
            if spec.kind in (InputKind.PARAMETER, InputKind.BUFFER):
                key = spec.target
                dims = []
                for ax, n in enumerate(shape):
                    if n == 1:
                        dims.append(const(1))
                        continue
                    gid = self.g.new(int(n), key)
                    if key in self.sd_keys:
                        if node.users:  # unused (e.g. a tied alias): no places
                            self.param_axes.append((gid, key, ax))
                    elif not _uniform(self.extra.get(key)):  # a constant tensor moves freely
                        self.g.fix(gid, f"{key} is not in the state dict")
                    dims.append((((gid, int(n)),),))
                self.params[name] = key
                self.layouts[name] = tuple(dims)
            elif spec.kind == InputKind.USER_INPUT:
                self.layouts[name] = tuple(
                    (((self.g.new(int(n), "input", True, "model input", False), int(n)),),)
                    for n in shape)
            else:
                self.layouts[name] = const_layout(shape)

    def run(self) -> None:
        self.placeholders()
        for node in self.ep.graph.nodes:
            if node.op == "call_function":
                self.call(node)
            elif node.op == "output":
                self.outputs(node)
            elif node.op == "get_attr":
                self.layouts[node.name] = None

    def call(self, node) -> None:
        name = self.opname(node)
        fn = RULES.get(name)
        if fn is None:
            if all(not isinstance(self.lay(a), (tuple, list)) for a in node.all_input_nodes):
                self.layouts[node.name] = self.const_value(node)
                return
            self.unknown_ops[name] = self.unknown_ops.get(name, 0) + 1
            fn = unknown
        try:
            self.layouts[node.name] = fn(self, node)
        except Exception:  # noqa: BLE001 - a rule that cannot follow this form: fix, go on
            self.unknown_ops[name] = self.unknown_ops.get(name, 0) + 1
            self.layouts[node.name] = unknown(self, node, f"operation {name} in an unexpected "
                                              "form")

    def outputs(self, node) -> None:
        from torch.export.graph_signature import OutputKind

        specs = self.ep.graph_signature.output_specs
        user = {s.arg.name for s in specs
                if s.kind == OutputKind.USER_OUTPUT and hasattr(s.arg, "name")}
        inputs = {s.target: s.arg.name for s in self.ep.graph_signature.input_specs
                  if s.target is not None}
        for s in specs:  # a buffer updated in forward: its new value keeps its layout
            if s.kind != OutputKind.USER_OUTPUT and hasattr(s.arg, "name"):
                new, old = self.layouts.get(s.arg.name), self.layouts.get(inputs.get(s.target))
                if isinstance(new, tuple) and isinstance(old, tuple) and len(new) == len(old):
                    for a, b in zip(new, old):
                        self.g.unify(a, b, "buffer updated in forward")
                else:
                    self.fix_value(new, "buffer updated in forward")
                    self.fix_value(old, "buffer updated in forward")
        for a in _flat(node.args):
            if isinstance(a, fx.Node) and a.name in user:
                lay = self.lay(a)
                if isinstance(lay, tuple):
                    for d in lay:
                        n = sum(_seglen(s) for s in d)
                        out = (((self.g.new(n, "output", True, "model output", False), n),),)
                        self.g.unify(d, out, "model output")
                else:
                    self.fix_value(lay, "model output", False)


def _uniform(t) -> bool:
    return t is not None and t.numel() > 0 and bool((t == t.reshape(-1)[0]).all())


def _seglen(seg) -> int:
    n = 1
    for _, s in seg:
        n *= s
    return n


def _flat(xs):
    for x in xs:
        if isinstance(x, (list, tuple)):
            yield from _flat(x)
        elif isinstance(x, dict):
            yield from _flat(list(x.values()))
        else:
            yield x


def export_model(model: nn.Module, example_input):
    """``torch.export`` (non-strict) of ``model`` on ``example_input`` (a tensor, a tuple of
    positional inputs, or a dict of keyword inputs); errors become one-line SpecErrors."""
    if isinstance(example_input, dict):
        args, kwargs = (), dict(example_input)
    elif isinstance(example_input, (tuple, list)):
        args, kwargs = tuple(example_input), {}
    else:
        args, kwargs = (example_input,), {}
    if kwargs and getattr(getattr(model, "config", None), "use_cache", None) is not None:
        kwargs.setdefault("use_cache", False)  # a key/value cache is not part of the function
    try:
        with torch.no_grad():
            model(*args, **kwargs)
    except Exception as exc:  # noqa: BLE001
        raise SpecError(f"the example input does not run through {type(model).__name__} "
                        f"({type(exc).__name__}: {_first_line(exc)})") from None
    try:
        return torch.export.export(model, args, kwargs, strict=False)
    except Exception as exc:  # noqa: BLE001 - export raises many kinds
        raise SpecError(f"torch.export cannot trace {type(model).__name__} "
                        f"({type(exc).__name__}: {_first_line(exc)}); {HOWTO}") from None


def trace_spec(model: nn.Module, example_input) -> PermutationSpec:
    t0 = time.perf_counter()
    restore = eval_mode(model)  # export reads the model, never writes it
    try:
        ep = export_model(model, example_input)
    finally:
        restore()
    m = model
    sd = m.state_dict(keep_vars=True)
    extra = {k: v for k, v in m.named_buffers() if k not in sd}
    tr = Tracer(ep, sd, extra)
    try:
        tr.run()
        spec = build_spec(tr, sd, ep)
    except Exception as exc:
        raise SpecError(f"internal error deriving the spec of {type(model).__name__} "
                        f"({type(exc).__name__}: {_first_line(exc)}); please report it; "
                        f"{HOWTO}") from exc
    spec.trace_info["trace_time_s"] = time.perf_counter() - t0
    if not spec.groups:
        raise SpecError(f"nothing in {type(model).__name__} can be permuted exactly "
                        f"({spec.coverage().reasons_line()}); {HOWTO}")
    return spec


def trace_model(model: nn.Module) -> fx.GraphModule:
    """symbolic_trace a model (used for activation probes of hand-written specs that name
    torch.fx nodes); errors become one-line SpecErrors."""
    try:
        return fx.symbolic_trace(model)
    except Exception as exc:  # noqa: BLE001 - fx raises many kinds
        raise SpecError(f"torch.fx cannot trace {type(model).__name__} ({type(exc).__name__}: "
                        f"{_first_line(exc)}); {HOWTO}") from None
