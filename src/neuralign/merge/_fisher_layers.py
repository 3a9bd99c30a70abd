"""Per-example squared gradients of Linear, Conv2d and (eval-mode) batch-norm parameters from
batch backward passes, for the diagonal Fisher (:mod:`neuralign.merge.fisher`).

In eval mode no example affects another's output, so one backward pass of
``sum_i log p(idx[i, k] | x_i)`` gives each example's gradient at a layer's output, ``g_i``;
example ``i``'s parameter gradient is then a product with the layer's input:

- ``nn.Linear`` fed ``(batch, features)``: ``g_i x_i^T``; the weighted squares sum to
  ``(w g^2)^T (x^2)``;
- ``nn.Conv2d``: the weight gradient of a convolution with one group per example (the
  examples' channels side by side), whose group ``i`` is example ``i``'s gradient, or for few
  output positions ``g_i`` times the unfolded input patches (a batched GEMM); squared and
  summed over the examples, a few at a time;
- a batch norm in eval mode (running statistics): ``sum_pos g_i * xhat_i`` (weight) and
  ``sum_pos g_i`` (bias).

A model with any other parameter, a layer run twice in a forward, an output or input that
a later in-place operation changes, or a forward that mixes the examples of a batch (the
first example run alone, ``run_alone``, sees other layer inputs or output gradients than in
the batch), is left to ``torch.func`` (``supported`` / ``squares`` return False).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

_BN = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)


def _ok(mod: nn.Module) -> bool:
    if type(mod) is nn.Linear:
        return True
    if type(mod) is nn.Conv2d:
        return (mod.groups == 1 and mod.padding_mode == "zeros"
                and not isinstance(mod.padding, str))
    if type(mod) in _BN:
        return (not mod.training and mod.track_running_stats and mod.running_mean is not None
                and mod.affine)
    return False


def supported(m: nn.Module) -> bool:
    """Every parameter (all trainable) belongs to a layer ``squares`` handles."""
    owners = {id(p) for mod in m.modules() if _ok(mod) for p in mod.parameters(recurse=False)}
    ps = list(m.parameters())
    return bool(ps) and all(id(p) in owners and p.requires_grad for p in ps)


def _weight_squares(mod: nn.Module, x: torch.Tensor, g: torch.Tensor, w: torch.Tensor,
                    max_floats: int) -> tuple[torch.Tensor, torch.Tensor | None]:
    """``sum_i w_i (dW_i)^2`` and ``sum_i w_i (db_i)^2`` for one class's output gradients."""
    if type(mod) is nn.Linear:
        g2 = w[:, None] * g.square()
        return g2.T @ x.square(), g2.sum(0)
    if type(mod) is nn.Conv2d:
        bias = (w[:, None] * g.sum((2, 3)).square()).sum(0)
        if g.shape[2] * g.shape[3] == 1:  # one output position: as a linear layer's
            u = F.unfold(x, mod.kernel_size, mod.dilation, mod.padding, mod.stride)[:, :, 0]
            g2 = w[:, None] * g.flatten(1).square()
            return (g2.T @ u.square()).view_as(mod.weight), bias
        # examples in chunks whose per-example gradients stay in cache (about 4 MB)
        step = max(1, min(max_floats, 2 ** 20) // mod.weight.numel())
        grouped = g.shape[2] * g.shape[3] >= 36
        sq = torch.zeros(mod.weight.numel(), dtype=g.dtype, device=g.device)
        for s in range(0, len(x), step):
            xs, gs = x[s:s + step], g[s:s + step]
            b = len(xs)
            if grouped:  # example i's gradient: group i's of a convolution with a group per
                # example (their channels side by side); fast where there are many positions
                gw = torch.ops.aten.convolution_backward(
                    gs.reshape(1, -1, *gs.shape[2:]), xs.reshape(1, -1, *xs.shape[2:]),
                    mod.weight.detach().repeat(b, 1, 1, 1), None, mod.stride, mod.padding,
                    mod.dilation, False, (0, 0), b, (False, True, False))[1]
            else:  # few positions: output gradients times the unfolded input patches
                u = F.unfold(xs, mod.kernel_size, mod.dilation, mod.padding, mod.stride)
                gw = torch.bmm(gs.flatten(2), u.transpose(1, 2))
            sq.addmv_(gw.reshape(b, -1).square_().T, w[s:s + step])
        return sq.view_as(mod.weight), bias
    # batch norm, eval mode: y = xhat * weight + bias
    shape = [1, -1] + [1] * (x.dim() - 2)
    xhat = (x - mod.running_mean.view(shape)) * torch.rsqrt(mod.running_var.view(shape)
                                                            + mod.eps)
    dims = tuple(range(2, x.dim()))
    gw = (g * xhat).sum(dims) if dims else g * xhat
    gb = g.sum(dims) if dims else g
    return (w[:, None] * gw.square()).sum(0), (w[:, None] * gb.square()).sum(0)


def _layers(m: nn.Module) -> dict:
    return {mod: name for name, mod in m.named_modules() if _ok(mod)
            and any(True for _ in mod.parameters(recurse=False))}


def _backward(m: nn.Module, x: torch.Tensor, idx: torch.Tensor, each) -> bool:
    """One forward of ``x`` recording each layer's input; for each column ``k`` of ``idx`` the
    gradients of ``sum_i log p(idx[i, k] | x_i)`` at the layers' outputs, handed to
    ``each(k, {layer: (input, output gradient)})``. False when the model does not fit."""
    names = _layers(m)
    inputs, outputs, versions, ok = {}, {}, {}, [True]

    def fwd(mod, inp, out):
        xin = inp[0]
        if (mod in inputs or not isinstance(out, torch.Tensor) or not out.requires_grad
                or (type(mod) is nn.Linear and xin.dim() != 2)):
            ok[0] = False
            return
        inputs[mod], outputs[mod] = xin.detach(), out
        versions[mod] = (xin._version, out._version)

    hs = [mod.register_forward_hook(fwd) for mod in names]
    try:
        with torch.enable_grad():
            out = m(x)
            if (out.dim() != 2 or not ok[0] or len(outputs) != len(names)
                    or any((inputs[mod]._version, outputs[mod]._version) != v
                           for mod, v in versions.items())):
                return False
            logp = torch.log_softmax(out, -1)
            mods = list(names)
            for k in range(idx.shape[1]):
                obj = logp.gather(1, idx[:, k:k + 1]).sum()
                gs = torch.autograd.grad(obj, [outputs[mod] for mod in mods], retain_graph=True)
                each(k, {mod: (inputs[mod], g.detach()) for mod, g in zip(mods, gs)})
    finally:
        for h in hs:
            h.remove()
    return True


def run_alone(m: nn.Module, x: torch.Tensor, idx: torch.Tensor) -> dict | None:
    """The layers' inputs and output gradients of one example (``x`` of length 1) run alone,
    for ``squares(alone=...)``; None when the model does not fit."""
    alone: dict = {}
    if not _backward(m, x, idx, lambda k, d: alone.update({(mod, k): v for mod, v in d.items()})):
        return None
    return alone


def _same(a: torch.Tensor, ref: torch.Tensor) -> bool:
    return float((a - ref).abs().max()) <= 1e-4 * float(ref.abs().max()) + 1e-12


def squares(m: nn.Module, x: torch.Tensor, idx: torch.Tensor, w: torch.Tensor, acc: dict,
            max_floats: int = 2 ** 25, alone: dict | None = None) -> bool:
    """Add ``sum_k w[i, k] (d log p(idx[i, k] | x_i) / d theta)^2`` over the batch to ``acc``
    (one backward pass per column of ``idx``). False, with nothing added, when the model does
    not fit (see the module docstring), or, given ``alone`` (``run_alone`` of the batch's first
    example), when that example saw other layer inputs or output gradients in the batch: a
    forward that mixes a batch's examples."""
    sums: dict = {}
    mixed = [False]

    def each(k, layers):
        for mod, (xin, g) in layers.items():
            if alone is not None and not (_same(xin[:1], alone[(mod, k)][0])
                                          and _same(g[:1], alone[(mod, k)][1])):
                mixed[0] = True
                return
            sw, sb = _weight_squares(mod, xin, g, w[:, k], max_floats)
            pw, pb = sums.get(mod, (0.0, 0.0))
            sums[mod] = (pw + sw, pb + sb if sb is not None else pb)

    if not _backward(m, x, idx, each) or mixed[0]:
        return False
    for mod, name in _layers(m).items():
        pre = f"{name}." if name else ""
        sw, sb = sums[mod]
        acc[f"{pre}weight"] += sw
        if getattr(mod, "bias", None) is not None:
            acc[f"{pre}bias"] += sb
    return True
