"""REPAIR (Jordan et al., 2023), forward-pass-exact variant, on plain and residual networks.

For every corrected unit the merged model's mean and standard deviation over the data are set to
the interpolation of the end points' (survey Eq. 12-13). Corrected, as in §4.4.1: every
conv/linear pre-activation (:func:`~neuralign.merge.repair_targets.default_targets`) AND the
output of every residual block (:func:`~neuralign.merge.repair_targets.residual_blocks`).

The correction is a per-channel affine map, applied with batch statistics during one pass over
``loader`` (as the authors' inserted batch-norm layers, with the reset of the existing batch
norms in the same pass, dropout off). Then:

- pre-activation corrections are **folded** into the weights and biases of the corrected
  Conv/Linear or affine norm (exact);
- block-output corrections cannot be folded: they sit after the residual addition, and the
  identity shortcut of the next block carries the stream on uncorrected; the positive-scaling
  symmetry of the residual stream could absorb a scale but not the shift that sets the mean (a
  shift does not pass the block's ReLU, nor a zero-padded convolution). They are kept as an
  explicit per-channel affine (:class:`neuralign.models.affine.ChannelAffine`, a child named
  ``repair_affine`` of each block, applied by a forward hook), so the returned model computes
  exactly the corrected function; it saves and loads through ``neuralign.io`` like any model.

Each folded map is fitted to the exact statistics of the corrected unit's input over the whole
pass (Chan et al.'s streaming moments), so with the data in one batch the returned model's
statistics equal their targets to float precision; with several batches REPAIR's (and batch
norm's) per-batch normalisation makes them approximate.
"""

from __future__ import annotations

import copy
from collections.abc import Iterable, Sequence

import torch
from torch import nn

from neuralign.errors import DataError, NeuralignError
from neuralign.merge._stats import (  # noqa: F401 - re-exported: the names of earlier versions
    ChannelMoments,
    batch_moments,
    batch_norm_train_mode,
    batches,
    channel_dim_of,
    channel_stats,
    channel_stats_many,
)
from neuralign.merge._util import as_state_dict, check_same_architecture, device_of
from neuralign.merge.repair_targets import LINEAR, default_targets, foldable, residual_blocks
from neuralign.models.affine import AFFINE_NAME, ChannelAffine, attach_output_affine, output_affine

__all__ = ["default_targets", "repair", "residual_blocks"]


def _fold(m: nn.Module, scale: torch.Tensor, shift: torch.Tensor) -> None:
    """Make ``m``'s output ``scale * out + shift`` per channel."""
    scale = scale.to(m.weight.dtype)
    shift = shift.to(m.weight.dtype)
    w = m.weight
    shape = [-1] + [1] * (w.dim() - 1)
    w.mul_(scale.view(shape))
    if getattr(m, "bias", None) is None:
        m.bias = nn.Parameter(torch.zeros(w.shape[0] if isinstance(m, LINEAR) else w.shape,
                                          dtype=w.dtype, device=w.device))
    b = m.bias
    bshape = [-1] + [1] * (b.dim() - 1)
    b.mul_(scale.view(bshape)).add_(shift.view(bshape))


def _affine(gm: torch.Tensor, gs: torch.Tensor, mu: torch.Tensor, var: torch.Tensor,
            eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    """The per-channel ``(scale, shift)`` taking (mean ``mu``, variance ``var``) to (``gm``,
    ``gs``²). ``eps`` is relative to the target variance (``scale = gs / sqrt(var + eps·gs²)``),
    so a unit already at its target is left alone up to ``eps/2`` whatever its magnitude; a
    constant unit (``var = gs = 0``) is only shifted."""
    den = (var + eps * gs * gs).sqrt()
    scale = torch.where(den > 0, gs / den.clamp_min(torch.finfo(den.dtype).tiny),
                        torch.ones_like(den))
    return scale, gm - mu * scale


def _check_inputs(a, b, merged):
    for m in (a, b, merged):
        if not isinstance(m, nn.Module):
            raise TypeError("repair() takes nn.Module models (load state dicts into a model first)")
    # block-output affines of an earlier REPAIR are part of a model's function, not of its
    # architecture: a REPAIRed model can be REPAIRed again (the corrections compose)
    check_same_architecture([{k: v for k, v in as_state_dict(m).items()
                              if f".{AFFINE_NAME}." not in k} for m in (a, b, merged)])


@torch.no_grad()
def repair(a: nn.Module, b: nn.Module, merged: nn.Module, loader: Iterable, t: float = 0.5, *,
           targets: Sequence[str] | None = None, blocks: Sequence[str] | None = None,
           max_batches: int | None = None, eps: float = 1e-5) -> nn.Module:
    """REPAIR ``merged`` (= ``(1-t)·a + t·b`` of aligned models); returns a new model.

    ``targets``: modules whose outputs are corrected and folded into their weights (default:
    :func:`default_targets`). ``blocks``: residual blocks whose outputs are corrected through an
    explicit per-channel affine (default: :func:`residual_blocks`, all of them; ``[]`` for none,
    which leaves the architecture and state-dict keys exactly ``merged``'s). A Conv/Linear
    without bias that must be shifted gains a ``bias``. Batch-norm running statistics are
    reset in the same pass. Passes over ``loader``: one for the statistics of ``a`` and ``b``
    (together), one for the correction of the merged model.
    """
    _check_inputs(a, b, merged)
    c = copy.deepcopy(merged)
    mods = dict(c.named_modules())
    if targets is None or blocks is None:
        x0 = next(batches(loader, 1), None)
        if x0 is None:
            raise DataError("the data loader yielded no batches; pass a non-empty loader to repair")
        x0 = x0[:2].to(device_of(c))  # finding the places needs shapes, not statistics
        if targets is None:
            targets = default_targets(c, x0)
        if blocks is None:
            blocks = residual_blocks(c, x0)
    targets, blocks = list(targets), list(blocks)
    bad = [n for n in targets if n not in mods or not foldable(mods[n])]
    if bad:
        raise NeuralignError(f"cannot REPAIR modules {bad[:3]}: not a Conv/Linear/affine norm layer")
    bad = [n for n in blocks if n not in mods or n == "" or n in targets]
    if bad:
        raise NeuralignError(f"cannot wrap {bad[:3]} as residual blocks: not a sub-module of the "
                             "model, or already a folded target")
    names = targets + blocks
    sa, sb = channel_stats_many([a, b], loader, names, max_batches)
    goal = {n: ((1 - t) * sa[n][0].double() + t * sb[n][0].double(),
                (1 - t) * sa[n][1].double() + t * sb[n][1].double()) for n in names}
    for n in blocks:  # identity affines first: their hooks run before the correcting ones
        attach_output_affine(mods[n], int(goal[n][0].shape[0]))
    seen, n_batches = _correction_pass(c, mods, names, goal, loader, max_batches, eps,
                                       set(blocks))
    if not n_batches:
        raise DataError("the data loader yielded no batches; pass a non-empty loader to repair")
    for n in names:
        mu, var = seen[n].mean_var()
        scale, shift = _affine(*goal[n], mu, var, eps)
        _fold(output_affine(mods[n]) if n in blocks else mods[n], scale.float(), shift.float())
    return c.eval()


def _correction_pass(c, mods, names, goal, loader, max_batches, eps, blocks=frozenset()
                     ) -> tuple[dict, int]:
    """One pass over ``loader`` through ``c`` (eval mode, batch norms resetting in train
    mode): each named output is corrected in place with its batch's statistics, and the exact
    moments of the uncorrected outputs are accumulated for the fold.

    A batch-norm target is fused (``_fused_batch_norm``): its input's batch moments, which the
    running statistics need anyway, give the normalised output's moments in closed form, and
    normalisation and correction are one affine map, so its output is neither reduced again nor
    rewritten."""
    seen: dict = {}
    scratch: dict = {}
    handles = []

    def hook(name, dim):
        gm, gs = goal[name]

        def f(mod, inp, out):
            if name in blocks and out.dim() not in (2, 4, 5):
                raise NeuralignError(f"block {name!r} outputs shape {list(out.shape)}; REPAIR "
                                     "wraps blocks with (N, C), (N, C, H, W) or (N, C, D, H, W) "
                                     "outputs only: leave it out of blocks=")
            mu, var = batch_moments(out, dim, scratch)
            acc = seen.setdefault(name, ChannelMoments())
            acc.merge(mu, var, out.numel() // out.shape[dim])
            scale, shift = _affine(gm.to(out.dtype), gs.to(out.dtype), mu, var, eps)
            shape = [1] * out.dim()
            shape[dim] = -1
            return out.mul_(scale.view(shape)).add_(shift.view(shape))  # a fresh output
        return f

    def bn_input(acc):
        def f(mod, inp):
            acc.update(inp[0], 1)
        return f

    fused = {}
    try:
        with batch_norm_train_mode(c) as bns, torch.no_grad():
            inputs = [ChannelMoments(scratch) for _ in bns]
            for m, acc in zip(bns, inputs):
                name = next((n for n in names if mods[n] is m and n not in blocks), None)
                if name is None:
                    handles.append(m.register_forward_pre_hook(bn_input(acc)))
                else:
                    fused[m] = name
                    m.forward = _fused_batch_norm(m, acc, seen.setdefault(name, ChannelMoments()),
                                                  goal[name], eps, scratch)
            for n in names:
                m = mods[n]
                if m not in fused:
                    dim = 1 if isinstance(output_affine(m), ChannelAffine) else channel_dim_of(m)
                    handles.append(m.register_forward_hook(hook(n, dim)))
            n_batches = 0
            for x in batches(loader, max_batches, device_of(c)):
                c(x)
                n_batches += 1
    finally:
        for h in handles:
            h.remove()
        for m in fused:
            del m.forward  # the class's forward again
    for m, acc in zip(bns, inputs):  # eval mode then sees exactly what train mode saw
        if acc.mean is not None:
            mean, var = acc.mean_var()
            m.running_mean.copy_(mean)
            m.running_var.copy_(var)
    return seen, n_batches


def _fused_batch_norm(m: nn.Module, inputs: ChannelMoments, seen: ChannelMoments, goal, eps: float,
                      scratch: dict):
    """A forward for batch norm ``m`` (a REPAIR target, train mode) that normalises with the
    batch's statistics and applies the correction in one affine map. Its output's batch moments
    follow from its input's (``mu``, ``var``, biased) in closed form: mean ``bias``, variance
    ``weight² var / (var + m.eps)``; they equal the measured ones up to float rounding."""
    gm, gs = goal

    def forward(x: torch.Tensor) -> torch.Tensor:
        mu, var = batch_moments(x, 1, scratch)
        n = x.numel() // x.shape[1]
        inputs.merge(mu, var, n)
        if m.num_batches_tracked is not None:  # as train mode counts them
            m.num_batches_tracked.add_(1)
        w = m.weight if m.affine else torch.ones_like(mu)
        b = m.bias if m.affine else torch.zeros_like(mu)
        out_mu, out_var = b.to(mu.dtype), w.to(var.dtype).square() * var / (var + m.eps)
        seen.merge(out_mu, out_var, n)
        scale, shift = _affine(gm.to(x.dtype), gs.to(x.dtype), out_mu, out_var, eps)
        return torch.nn.functional.batch_norm(x, mu, var, w * scale, b * scale + shift, False,
                                              0.0, m.eps)
    return forward
