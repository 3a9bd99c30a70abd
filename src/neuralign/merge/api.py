"""``merge(models, weights=None, method=...)``: one entry point for every merging method."""

from __future__ import annotations

from collections.abc import Iterable, Sequence

from torch import nn

from neuralign.errors import DataError, NeuralignError
from neuralign.merge.basic import average, reset_bn
from neuralign.merge.fisher import fisher_merge
from neuralign.merge.matched import matched_averaging
from neuralign.merge.ot import ot_fusion
from neuralign.merge.soups import greedy_soup, learned_soup

METHODS = ("average", "uniform-soup", "greedy-soup", "learned-soup", "learned-soup-layer",
           "fisher", "ot", "matched", "zipit")


def merge(models: Sequence[nn.Module], weights: Sequence[float] | None = None, method: str = "average",
          *, data: Iterable | None = None, bn_loader: Iterable | None = None, seed: int = 0,
          **options) -> nn.Module:
    """Merge ``models`` (aligned beforehand, except for ``ot``/``matched``/``zipit``) into one.

    ``data`` is the held-out loader that greedy/learned soups, Fisher, activation-based OT and
    ZipIt need; ``bn_loader`` (if given) resets batch-norm statistics of the result. ``options``
    go to the method's function (e.g. ``ground="activation"`` for OT, ``stop_at=2`` for ZipIt).
    """
    method = method.replace("_", "-")
    if method not in METHODS:
        raise NeuralignError(f"unknown merge method '{method}'; choose one of {', '.join(METHODS)}")
    if len(models) == 0:
        raise NeuralignError("merge needs at least one model")
    needs_data = {"greedy-soup", "learned-soup", "learned-soup-layer", "zipit"}
    if method in needs_data and data is None:
        raise DataError(f"merge method '{method}' needs held-out data (pass data=loader / --data)")
    if method in ("average", "uniform-soup"):
        out = average(models, weights)
    elif method == "greedy-soup":
        out = greedy_soup(models, data, bn_loader=bn_loader, **options).model
    elif method in ("learned-soup", "learned-soup-layer"):
        out = learned_soup(models, data, per_layer=method.endswith("layer"), seed=seed, **options).model
    elif method == "fisher":
        out = fisher_merge(models, options.pop("fishers", None), loader=data, weights=weights, **options)
    elif method == "ot":
        out = ot_fusion(models, weights=weights, loader=data, **options).model
    elif method == "matched":
        out = matched_averaging(models, weights=weights, seed=seed, **options).model
    else:
        from neuralign.merge.zipit import zipit

        out = zipit(models, data, **options).model
    if bn_loader is not None:
        out = reset_bn(out, bn_loader)
    return out
