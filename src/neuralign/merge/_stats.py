"""Per-channel statistics passes for REPAIR: streaming moments folded in by forward hooks as each
output is computed (nothing kept per batch, no autograd graph), one pass over the data each."""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from contextlib import contextmanager

import torch
from torch import nn

from neuralign.errors import DataError
from neuralign.evaluation import iter_batches, to_device, use_channels_last
from neuralign.merge._util import device_of, split_batch
from neuralign.utils import eval_mode

_BATCH_NORMS = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)


RAW_MEANS = 4.0  # batch_moments takes the variance as mean square minus squared mean when every
# channel's mean is within this many standard deviations of zero: float32 rounding then costs
# the variance at most (1 + RAW_MEANS**2) float32 epsilons, relatively


def batch_moments(y: torch.Tensor, dim: int, scratch: dict | None = None
                  ) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-channel mean and (biased) variance of ``y`` over every dim but ``dim``, in ``y``'s
    precision on a ``(samples, channels)`` view (a view for channels-last convolution outputs
    and linear layers; ``torch.var_mean`` over several dims is many times slower).

    Three passes (sum, squares, sum) when every channel's mean is within ``RAW_MEANS`` standard
    deviations of zero (activations after a norm layer or ReLU, most pre-activations); else two
    more, centring first, so that a large mean costs no precision. ``scratch``: a dict that
    lends the temporary's memory across calls (a fresh multi-megabyte temporary per call costs
    page faults)."""
    z = y.movedim(dim, -1).reshape(-1, y.shape[dim])
    buf = None
    if scratch is not None:
        key = (z.shape[1], z.dtype, z.device)
        buf = scratch.get(key)
        if buf is None or buf.shape[0] < z.shape[0]:
            buf = scratch[key] = torch.empty_like(z, memory_format=torch.contiguous_format)
        buf = buf[:z.shape[0]]
    mean = z.mean(0)
    var = torch.mul(z, z, out=buf).mean(0).sub_(mean * mean).clamp_min_(0)
    if bool((mean * mean <= RAW_MEANS ** 2 * var).all()):
        return mean, var
    zc = torch.sub(z, mean, out=buf)
    return mean, zc.mul_(zc).mean(0)


class ChannelMoments:
    """Streaming per-channel mean and variance: each batch's moments (in the activations'
    precision) merged into float64 totals with Chan et al.'s pairwise update, so large
    means cost no precision."""

    def __init__(self, scratch: dict | None = None):
        self.n, self.mean, self.m2 = 0, None, None
        self.scratch = scratch

    def update(self, y: torch.Tensor, dim: int) -> None:
        mean, var = batch_moments(y, dim, self.scratch)
        self.merge(mean, var, y.numel() // y.shape[dim])

    def merge(self, mean: torch.Tensor, var: torch.Tensor, nb: int) -> None:
        """Fold in a batch of ``nb`` samples per channel with this mean and biased variance."""
        mean, var = mean.double(), var.double()
        if self.mean is None:
            self.n, self.mean, self.m2 = nb, mean, var * nb
            return
        tot = self.n + nb
        delta = mean - self.mean
        self.mean = self.mean + delta * (nb / tot)
        self.m2 = self.m2 + var * nb + delta * delta * (self.n * nb / tot)
        self.n = tot

    def mean_var(self) -> tuple[torch.Tensor, torch.Tensor]:
        """float64 mean and biased variance over everything seen."""
        return self.mean, (self.m2 / self.n).clamp_min(0)

    def mean_std(self) -> tuple[torch.Tensor, torch.Tensor]:
        mean, var = self.mean_var()
        return mean.float(), var.sqrt().float()


def batches(loader: Iterable, max_batches: int | None, device=None):
    """The inputs of (at most ``max_batches`` of) ``loader``; on ``device`` when given, image
    batches there in channels-last layout on CPU (as the training loop)."""
    cl = device is not None and use_channels_last(None, device)
    for i, batch in enumerate(iter_batches(loader)):
        if max_batches is not None and i >= max_batches:
            break
        x = split_batch(batch)[0]
        yield x if device is None else to_device(x, device, cl)


@contextmanager
def batch_norm_train_mode(model: nn.Module):
    """``model`` in eval mode but its batch norms in train mode (normalising with batch
    statistics, accumulating cumulative running statistics from reset): dropout and every other
    train-mode behaviour stay off. Restores modes and momenta afterwards."""
    bns = [m for m in model.modules() if isinstance(m, _BATCH_NORMS)]
    saved = [(m.momentum, m.track_running_stats) for m in bns]
    modes = {m: m.training for m in model.modules()}
    model.eval()
    for m in bns:
        m.reset_running_stats()
        m.momentum = None
        m.track_running_stats = True
        m.train()
    try:
        yield bns
    finally:
        for m, (mom, trs) in zip(bns, saved):
            m.momentum = mom
            m.track_running_stats = trs
        for m, was in modes.items():
            m.train(was)


def channel_dim_of(m: nn.Module, out: torch.Tensor | None = None) -> int:
    """The channel axis of ``m``'s output: -1 for Linear and (last-axis) LayerNorm, 1 for
    convolutions, batch/group norms, channel LayerNorms and residual blocks."""
    from neuralign.models.reference import LayerNorm2d

    if isinstance(m, LayerNorm2d):
        return 1
    if isinstance(m, nn.Linear):
        return -1
    if isinstance(m, nn.LayerNorm):
        return -len(m.normalized_shape)
    return 1


def channel_stats_many(models: Sequence[nn.Module], loader: Iterable, names: Sequence[str],
                       max_batches: int | None = None
                       ) -> list[dict[str, tuple[torch.Tensor, torch.Tensor]]]:
    """Per-channel mean and standard deviation of the outputs of ``names`` in each model (eval
    mode), in one pass over ``loader``: every batch goes through all the models in turn, and
    hooks fold each output into running moments as it is computed."""
    accs: list[dict[str, ChannelMoments]] = [{} for _ in models]
    handles = []
    scratch: dict = {}

    def hook(acc, name, dim):
        def f(mod, inp, out):
            acc.setdefault(name, ChannelMoments(scratch)).update(out, dim)
        return f

    for model, acc in zip(models, accs):
        mods = dict(model.named_modules())
        for n in names:
            handles.append(mods[n].register_forward_hook(hook(acc, n, channel_dim_of(mods[n]))))
    restore = eval_mode(*models)
    try:
        with torch.inference_mode():
            for x in batches(loader, max_batches, device_of(models[0])):
                for model in models:
                    model(x.to(device_of(model)))
    finally:
        for h in handles:
            h.remove()
        restore()
    if not accs[0] and names:
        raise DataError("the data loader yielded no batches; pass a non-empty loader to repair")
    return [{n: acc[n].mean_std() for n in names} for acc in accs]


def channel_stats(model: nn.Module, loader: Iterable, names: Sequence[str],
                  max_batches: int | None = None) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """Per-channel mean and standard deviation of the outputs of ``names`` (eval mode)."""
    return channel_stats_many([model], loader, names, max_batches)[0]
