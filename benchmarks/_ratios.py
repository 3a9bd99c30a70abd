"""Speed ratios measured in pairs (the same process, interleaved runs, or one seed's two
libraries): the geometric mean of the per-pair ratios and its standard error by the delta method
on the logs, as the speed benchmarks report them."""

from __future__ import annotations

import math
import statistics
from collections.abc import Sequence


def ratio_of_pairs(num: Sequence[float], den: Sequence[float], k: float = 1.0
                   ) -> tuple[float, float | None]:
    """``(g, se)``: ``g`` the geometric mean over pairs of ``num[i] / (k den[i])``, ``se`` its
    standard error (``g`` times that of the mean log; None for a single pair)."""
    if len(num) != len(den) or not num:
        raise ValueError(f"need equally many times on both sides (got {len(num)} and {len(den)})")
    return geometric_mean([a / (k * b) for a, b in zip(num, den)])


def geometric_mean(ratios: Sequence[float]) -> tuple[float, float | None]:
    """``(g, se)`` of positive ratios: their geometric mean and its delta-method standard error."""
    logs = [math.log(r) for r in ratios]
    g = math.exp(statistics.fmean(logs))
    return g, (g * statistics.stdev(logs) / math.sqrt(len(logs)) if len(logs) > 1 else None)


def fmt(ratio: Sequence, spec: str = "{:.2f}", unit: str = "") -> str:
    """``"1.05 ± 0.02"`` (or ``"1.05"`` without a standard error)."""
    g, se = ratio
    return spec.format(g) + unit + (" ± " + spec.format(se) if se is not None else "")
