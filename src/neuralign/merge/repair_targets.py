"""Where REPAIR corrects: pre-activations (folded into the weights) and residual-block outputs.

Found by running the model once on an example batch (eval mode, no autograd):

- :func:`default_targets`: the output of every norm layer with a per-channel affine (BatchNorm,
  GroupNorm, LayerNorm, channel LayerNorm) and of every Conv/Linear layer that does not feed a
  norm layer directly and is not the model's output layer (a Conv feeding a norm is corrected
  through the norm's output, so bias-free convolutions stay bias-free).
- :func:`residual_blocks`: every module whose own ``forward`` adds two activations of the same
  shape (``out + identity``, ``out += shortcut(x)``; an addition of a parameter or buffer, such
  as a position embedding, does not count) and whose output has its channels on axis 1
  (``(N, C)``, ``(N, C, H, W)``, ``(N, C, D, H, W)``). Its output, after the addition and
  whatever follows it in the block (the final ReLU), is the block output that REPAIR wraps.
"""

from __future__ import annotations

import warnings

import torch
from torch import nn
from torch.overrides import TorchFunctionMode

from neuralign.models.reference import LayerNorm2d
from neuralign.utils import eval_mode

LINEAR = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d)
AFFINE_NORMS = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d, nn.GroupNorm, nn.LayerNorm)


def foldable(m: nn.Module) -> bool:
    """Whether a per-channel affine of ``m``'s output can be folded into ``m``'s parameters."""
    if isinstance(m, LINEAR):
        return True
    if isinstance(m, (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d, nn.GroupNorm)):
        return m.affine
    if isinstance(m, nn.LayerNorm):
        if not isinstance(m, LayerNorm2d) and len(m.normalized_shape) != 1:
            return False
        return m.elementwise_affine and getattr(m, "bias", None) is not None
    return False


def _eval_forward(model: nn.Module, example: torch.Tensor):
    restore = eval_mode(model)
    try:
        with torch.no_grad():
            return model(example)
    finally:
        restore()


@torch.no_grad()
def default_targets(model: nn.Module, example: torch.Tensor) -> list[str]:
    """Names of the modules whose outputs REPAIR corrects and folds (see the module docstring)."""
    outs: dict[int, str] = {}
    fed_bn: set[str] = set()
    order: list[str] = []
    handles = []

    alive = []  # every output kept until the end, so no id is reused by another tensor

    def post(name):
        def hook(mod, inp, out):
            if isinstance(out, torch.Tensor):
                alive.append(out)
                outs[id(out)] = name
                order.append(name)
        return hook

    def pre_bn(mod, inp):
        src = outs.get(id(inp[0]))
        if src is not None:
            fed_bn.add(src)

    for name, m in model.named_modules():
        if isinstance(m, LINEAR + AFFINE_NORMS) and foldable(m):
            handles.append(m.register_forward_hook(post(name)))
        if isinstance(m, AFFINE_NORMS):
            handles.append(m.register_forward_pre_hook(pre_bn))
    try:
        y = _eval_forward(model, example)
    finally:
        for h in handles:
            h.remove()
    final = outs.get(id(y))
    seen, result = set(), []
    for name in order:
        if name in seen or name == final or name in fed_bn:
            continue
        seen.add(name)
        result.append(name)
    return result


_ADDS = {torch.add, torch.Tensor.add, torch.Tensor.add_, torch.Tensor.__add__,
         torch.Tensor.__iadd__, torch.Tensor.__radd__}


class _AddSpy(TorchFunctionMode):
    """Notes which module's own forward (the innermost module being called) adds two
    activations of the same shape."""

    def __init__(self, stack: list[str], found: set[str], state: set[int]):
        super().__init__()
        self.stack, self.found, self.state = stack, found, state

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func in _ADDS and self.stack and len(args) >= 1:
            a = args[0]
            b = args[1] if len(args) > 1 else kwargs.get("other")
            if (isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor)
                    and id(a) not in self.state and id(b) not in self.state
                    and a.shape == b.shape and a.dim() >= 2 and "alpha" not in kwargs):
                self.found.add(self.stack[-1])
        return func(*args, **kwargs)


@torch.no_grad()
def residual_blocks(model: nn.Module, example: torch.Tensor) -> list[str]:
    """Names of the residual blocks whose outputs REPAIR corrects (see the module docstring),
    in the order they run. Residual additions made in the model's own ``forward`` (not inside a
    sub-module) and blocks with sequence-shaped ``(N, L, D)`` outputs are not corrected; a
    warning names them (wrap such additions in a module, or pass ``blocks=`` explicitly)."""
    stack: list[str] = []
    found: set[str] = set()
    order: list[str] = []
    outs: dict[str, tuple] = {}
    state = {id(t) for t in list(model.parameters()) + list(model.buffers())}
    handles = []

    def pre(name):
        def f(mod, inp):
            stack.append(name)
        return f

    def post(name):
        def f(mod, inp, out):
            stack.pop()
            if name not in outs:  # the output itself is kept: its id is not reused
                order.append(name)
                outs[name] = out
        return f

    for name, m in model.named_modules():
        handles.append(m.register_forward_pre_hook(pre(name)))
        handles.append(m.register_forward_hook(post(name)))
    try:
        with _AddSpy(stack, found, state):
            y = _eval_forward(model, example)
    finally:
        for h in handles:
            h.remove()
    skipped = []
    result = []
    for name in order:
        if name not in found:
            continue
        out = outs[name]
        shape = tuple(out.shape) if isinstance(out, torch.Tensor) else None
        if name == "" or shape is None or out is y:
            if name == "":
                skipped.append("the model's own forward")
            continue
        if len(shape) not in (2, 4, 5):
            skipped.append(f"{name!r} (output {list(shape)})")
            continue
        result.append(name)
    if skipped:
        warnings.warn("REPAIR does not correct the residual additions in "
                      f"{', '.join(skipped[:3])}: only modules with (N, C, ...) outputs are "
                      "wrapped; pass blocks=[...] to choose", UserWarning, stacklevel=3)
    return result
