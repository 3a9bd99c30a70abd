"""Exact top-k selection by magnitude (TIES' trim), without sorting or ``torch.topk``.

``torch.topk`` on a CPU tensor of tens of millions of entries with ``k`` a fifth of them costs
about 20 ns per entry on one thread, and it leaves the choice among entries that tie at the
threshold unspecified. :func:`topk_mask` finds the same ``k`` entries in a few linear passes:

1. a strided sample of ``n / 32`` entries (4k to 65k), sorted, brackets the k-th largest value between two
   sample values ``lo <= hi`` (a generous margin of sample ranks either side);
2. one pass counts the entries above ``hi``; another lists (in index order) the entries in
   ``[lo, hi]``, a small fraction of the tensor;
3. if the counts prove the k-th largest value lies in ``[lo, hi]``, ``torch.kthvalue`` on that
   short list finds it; otherwise (an unlucky sample) ``torch.kthvalue`` on the whole tensor.

Both ways the result is exact: every entry larger than the k-th largest value, then as many of
the entries equal to it as ``k`` needs, those of lowest flat index first.
"""

from __future__ import annotations

import math

import torch

__all__ = ["topk_mask"]

SAMPLE = 1 << 16  # at most about this many sampled entries bracket the threshold
SMALL = 1 << 15  # below this many entries a stable sort of the whole tensor is cheapest
CHUNK = 1 << 20  # the passes over the tensor go a chunk of this many entries at a time


def sample_step(n: int) -> int:
    """Stride of the sample: about ``n / 32`` entries, between 4096 and :data:`SAMPLE`."""
    return max(1, n // max(4096, min(SAMPLE, n // 32)))


def _sorted_mask(mag: torch.Tensor, k: int) -> torch.Tensor:
    keep = torch.zeros(mag.numel(), dtype=torch.bool, device=mag.device)
    keep[torch.sort(mag, descending=True, stable=True).indices[:k]] = True
    return keep


def _threshold_mask(mag: torch.Tensor, k: int) -> torch.Tensor:
    n = mag.numel()
    t = torch.kthvalue(mag, n - k + 1).values
    keep = mag > t
    short = k - int(torch.count_nonzero(keep))
    if short > 0:
        keep[(mag == t).nonzero().reshape(-1)[:short]] = True
    return keep


def topk_mask(mag: torch.Tensor, k: int) -> torch.Tensor:
    """Boolean mask (flat, like ``mag``) of the ``k`` largest entries of the flat tensor ``mag``;
    among entries equal to the k-th largest value the lowest indices are kept. ``mag`` must hold
    no NaN (callers pass magnitudes of checked-finite tensors)."""
    n = mag.numel()
    if mag.dim() != 1:
        raise ValueError("topk_mask needs a flat tensor")
    if k >= n:
        return torch.ones(n, dtype=torch.bool, device=mag.device)
    if k <= 0:
        return torch.zeros(n, dtype=torch.bool, device=mag.device)
    if n <= SMALL:
        return _sorted_mask(mag, k)
    sample = torch.sort(mag[:: sample_step(n)], descending=True).values
    m = sample.numel()
    q = k / n
    margin = 6.0 * math.sqrt(m * q * (1.0 - q)) + 32.0
    hi = sample[max(0, int(q * m - margin))]
    lo = sample[min(m - 1, math.ceil(q * m + margin))]
    hi, lo = float(hi), float(lo)  # exact: values of mag
    keep = torch.empty(n, dtype=torch.bool, device=mag.device)
    parts = []
    for s in range(0, n, CHUNK):  # chunks: the temporaries stay in cache
        part = mag[s:s + CHUNK]
        torch.gt(part, hi, out=keep[s:s + CHUNK])
        idx = ((part >= lo) & (part <= hi)).nonzero().reshape(-1)
        if idx.numel():
            parts.append(idx + s)
    above = int(torch.count_nonzero(keep))
    inside = torch.cat(parts) if parts else torch.zeros(0, dtype=torch.long, device=mag.device)
    if not above < k <= above + inside.numel():
        return _threshold_mask(mag, k)
    keep[inside[_threshold_mask(mag[inside], k - above)]] = True
    return keep
