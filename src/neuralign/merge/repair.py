"""REPAIR (Jordan et al., 2023), forward-pass-exact variant, folded back into the weights.

For every corrected unit the merged model's pre-activation mean and standard deviation are set
to the interpolation of the end points' (survey Eq. 12-13). The correction is a per-channel
affine map; it is computed with batch statistics during one pass over ``loader`` (as the
authors' inserted batch-norm layers do, together with the reset of the existing batch norms)
and then folded into the weights and biases of the corrected module, so the returned model has
the original architecture.

Corrected places (default): the output of every norm layer with a per-channel affine
(BatchNorm, GroupNorm, LayerNorm) and of every Conv/Linear layer that does not feed a norm
layer directly and is not the model's output layer (a Conv feeding a norm is corrected through
the norm's output, so bias-free convolutions stay bias-free). Residual-block *sums* are corrected through
their summands (the last norm or conv of the branch and of the shortcut): a correction after
the addition cannot be folded into an identity shortcut.
"""

from __future__ import annotations

import copy
from collections.abc import Iterable, Sequence

import torch
from torch import nn

from neuralign.errors import DataError, NeuralignError
from neuralign.evaluation import iter_batches, to_device, use_channels_last
from neuralign.merge._util import as_state_dict, check_same_architecture, device_of, split_batch
from neuralign.merge.basic import _NORMS

_LINEAR = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d)
_AFFINE_NORMS = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d, nn.GroupNorm, nn.LayerNorm)


def _channel_dim(m: nn.Module) -> int:
    if isinstance(m, nn.Linear):
        return -1
    if isinstance(m, nn.LayerNorm):
        return -len(m.normalized_shape)
    return 1


def _foldable(m: nn.Module) -> bool:
    if isinstance(m, _LINEAR):
        return True
    if isinstance(m, (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)):
        return m.affine
    if isinstance(m, nn.GroupNorm):
        return m.affine
    if isinstance(m, nn.LayerNorm):
        return m.elementwise_affine and getattr(m, "bias", None) is not None
    return False


@torch.no_grad()
def default_targets(model: nn.Module, example: torch.Tensor) -> list[str]:
    """Names of the modules REPAIR corrects by default (see the module docstring)."""
    outs: dict[int, str] = {}
    fed_bn: set[str] = set()
    order: list[str] = []
    handles = []
    named = dict(model.named_modules())

    def post(name):
        def hook(mod, inp, out):
            if isinstance(out, torch.Tensor):
                outs[id(out)] = name
                order.append(name)
        return hook

    def pre_bn(mod, inp):
        src = outs.get(id(inp[0]))
        if src is not None:
            fed_bn.add(src)

    for name, m in named.items():
        if isinstance(m, _LINEAR + _AFFINE_NORMS) and _foldable(m):
            handles.append(m.register_forward_hook(post(name)))
        if isinstance(m, _AFFINE_NORMS):
            handles.append(m.register_forward_pre_hook(pre_bn))
    was = model.training
    model.eval()
    try:
        y = model(example)
    finally:
        for h in handles:
            h.remove()
        model.train(was)
    final = outs.get(id(y))
    seen, result = set(), []
    for name in order:
        if name in seen or name == final or name in fed_bn:
            continue
        seen.add(name)
        result.append(name)
    return result


def batch_moments(y: torch.Tensor, dim: int, scratch: dict | None = None
                  ) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-channel mean and (biased) variance of ``y`` over every dim but ``dim``, two passes in
    ``y``'s precision on a ``(samples, channels)`` view (a view for channels-last convolution
    outputs and linear layers; ``torch.var_mean`` over several dims is many times slower).
    ``scratch``: a dict that lends the centred copy's memory across calls (a fresh
    multi-megabyte temporary per call costs page faults)."""
    z = y.movedim(dim, -1).reshape(-1, y.shape[dim])
    mean = z.mean(0)
    buf = None
    if scratch is not None:
        key = (z.shape[1], z.dtype, z.device)
        buf = scratch.get(key)
        if buf is None or buf.shape[0] < z.shape[0]:
            buf = scratch[key] = torch.empty_like(z, memory_format=torch.contiguous_format)
        buf = buf[:z.shape[0]]
    zc = torch.sub(z, mean, out=buf) if buf is not None else z - mean
    return mean, zc.mul_(zc).mean(0)


class ChannelMoments:
    """Streaming per-channel mean and variance: each batch's moments (in the activations'
    precision) merged into float64 totals with Chan et al.'s pairwise update, so large
    means cost no precision."""

    def __init__(self, scratch: dict | None = None):
        self.n, self.mean, self.m2 = 0, None, None
        self.scratch = scratch

    def update(self, y: torch.Tensor, dim: int) -> None:
        nb = y.numel() // y.shape[dim]
        mean, var = batch_moments(y, dim, self.scratch)
        mean, var = mean.double(), var.double()
        if self.mean is None:
            self.n, self.mean, self.m2 = nb, mean, var * nb
            return
        tot = self.n + nb
        delta = mean - self.mean
        self.mean = self.mean + delta * (nb / tot)
        self.m2 = self.m2 + var * nb + delta * delta * (self.n * nb / tot)
        self.n = tot

    def mean_std(self) -> tuple[torch.Tensor, torch.Tensor]:
        return self.mean.float(), (self.m2 / self.n).clamp_min(0).sqrt().float()


def _batches(loader: Iterable, max_batches: int | None, device=None):
    """The inputs of (at most ``max_batches`` of) ``loader``; on ``device`` when given, image
    batches there in channels-last layout on CPU (as the training loop)."""
    cl = device is not None and use_channels_last(None, device)
    for i, batch in enumerate(iter_batches(loader)):
        if max_batches is not None and i >= max_batches:
            break
        x = split_batch(batch)[0]
        yield x if device is None else to_device(x, device, cl)


def _forward_all(model: nn.Module, loader: Iterable, max_batches: int | None) -> None:
    """Feed the inputs of (at most ``max_batches`` of) ``loader`` through ``model``, so that its
    hooks (or batch-norm layers) see them (no autograd graph)."""
    with torch.no_grad():
        for x in _batches(loader, max_batches, device_of(model)):
            model(x)


def channel_stats_many(models: Sequence[nn.Module], loader: Iterable, names: Sequence[str],
                       max_batches: int | None = None
                       ) -> list[dict[str, tuple[torch.Tensor, torch.Tensor]]]:
    """Per-channel mean and standard deviation of the outputs of ``names`` in each model (eval
    mode), in one pass over ``loader``: every batch goes through all the models in turn, and
    hooks fold each output into running moments as it is computed."""
    accs: list[dict[str, ChannelMoments]] = [{} for _ in models]
    handles, modes = [], [m.training for m in models]
    scratch: dict = {}

    def hook(acc, name, dim):
        def f(mod, inp, out):
            acc.setdefault(name, ChannelMoments(scratch)).update(out, dim)
        return f

    for model, acc in zip(models, accs):
        mods = dict(model.named_modules())
        for n in names:
            handles.append(mods[n].register_forward_hook(hook(acc, n, _channel_dim(mods[n]))))
        model.eval()
    try:
        with torch.inference_mode():
            for x in _batches(loader, max_batches, device_of(models[0])):
                for model in models:
                    model(x.to(device_of(model)))
    finally:
        for h in handles:
            h.remove()
        for m, was in zip(models, modes):
            m.train(was)
    if not accs[0]:
        raise DataError("the data loader yielded no batches; pass a non-empty loader to repair")
    return [{n: acc[n].mean_std() for n in names} for acc in accs]


def channel_stats(model: nn.Module, loader: Iterable, names: Sequence[str],
                  max_batches: int | None = None) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """Per-channel mean and standard deviation of the outputs of ``names`` (eval mode)."""
    return channel_stats_many([model], loader, names, max_batches)[0]


def _fold(m: nn.Module, scale: torch.Tensor, shift: torch.Tensor) -> None:
    """Make ``m``'s output ``scale * out + shift`` per channel."""
    scale = scale.to(m.weight.dtype)
    shift = shift.to(m.weight.dtype)
    w = m.weight
    shape = [-1] + [1] * (w.dim() - 1)
    w.mul_(scale.view(shape))
    if getattr(m, "bias", None) is None:
        m.bias = nn.Parameter(torch.zeros(w.shape[0] if isinstance(m, _LINEAR) else w.shape,
                                          dtype=w.dtype, device=w.device))
    b = m.bias
    bshape = [-1] + [1] * (b.dim() - 1)
    b.mul_(scale.view(bshape)).add_(shift.view(bshape))


@torch.no_grad()
def repair(a: nn.Module, b: nn.Module, merged: nn.Module, loader: Iterable, t: float = 0.5, *,
           targets: Sequence[str] | None = None, max_batches: int | None = None,
           eps: float = 1e-5) -> nn.Module:
    """REPAIR ``merged`` (= ``(1-t)·a + t·b`` of aligned models) and fold the correction in.

    Returns a new model with ``merged``'s architecture and state-dict keys (a Conv/Linear
    without bias that must be shifted gains a ``bias``). Batch-norm running statistics are
    reset in the same pass. ``targets`` overrides the corrected module names.
    """
    for m in (a, b, merged):
        if not isinstance(m, nn.Module):
            raise TypeError("repair() takes nn.Module models (load state dicts into a model first)")
    check_same_architecture([as_state_dict(a), as_state_dict(b), as_state_dict(merged)])
    c = copy.deepcopy(merged)
    mods = dict(c.named_modules())
    if targets is None:
        x0 = next(_batches(loader, 1), None)
        if x0 is None:
            raise DataError("the data loader yielded no batches; pass a non-empty loader to repair")
        targets = default_targets(c, x0.to(device_of(c)))
    bad = [n for n in targets if n not in mods or not _foldable(mods[n])]
    if bad:
        raise NeuralignError(f"cannot REPAIR modules {bad[:3]}: not a Conv/Linear/affine norm layer")
    sa, sb = channel_stats_many([a, b], loader, targets, max_batches)
    goal = {n: ((1 - t) * sa[n][0] + t * sb[n][0], (1 - t) * sa[n][1] + t * sb[n][1]) for n in targets}

    run: dict[str, list] = {}
    handles = []
    scratch: dict = {}

    def hook(name, dim):
        def f(mod, inp, out):
            mu, var = batch_moments(out, dim, scratch)
            nb = out.numel() // out.shape[dim]
            r = run.setdefault(name, [0.0, 0.0, 0])
            r[0] = r[0] + mu.double()
            r[1] = r[1] + var.double() * nb / max(nb - 1, 1)
            r[2] += 1
            gm, gs = goal[name]
            scale = gs.to(out.dtype) / (var + eps).sqrt()
            shift = gm.to(out.dtype) - mu * scale
            shape = [1] * out.dim()
            shape[dim] = -1
            return out.mul_(scale.view(shape)).add_(shift.view(shape))  # a fresh output: in place
        return f

    for n in targets:
        handles.append(mods[n].register_forward_hook(hook(n, _channel_dim(mods[n]))))
    bns = [m for m in c.modules() if isinstance(m, _NORMS)]
    saved = [m.momentum for m in bns]
    for m in bns:
        m.reset_running_stats()
        m.momentum = None
    c.train()
    try:
        _forward_all(c, loader, max_batches)
    finally:
        for h in handles:
            h.remove()
        for m, mom in zip(bns, saved):
            m.momentum = mom
    c.eval()
    for n in targets:
        s1, s2, k = run[n]
        rm, rv = (s1 / k).float(), (s2 / k).float()
        gm, gs = goal[n]
        scale = gs / (rv + eps).sqrt()
        _fold(mods[n], scale, gm - rm * scale)
    return c
