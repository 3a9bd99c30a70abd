"""Aligning several models: to one reference, or Git Re-Basin's "merge many" (each model in
turn weight-matched to the average of the others, until no permutation changes)."""

from __future__ import annotations

import time
from collections.abc import Sequence

import torch

from neuralign.align.weight import check_same_architecture, weight_matching
from neuralign.permute import _permute_sd
from neuralign.spec.core import Permutation, PermutationSpec
from neuralign.utils import as_state_dict

__all__ = ["align_many", "align_to_mean"]


def align_many(spec: PermutationSpec, models: Sequence, *, reference: int | str = 0,
               method: str = "weight", loader=None, seed: int = 0, max_iter: int = 100,
               max_rounds: int = 20) -> list[Permutation]:
    """One permutation per model (identity for the reference) aligning it to ``reference``.

    ``reference`` is a model index, or ``"mean"`` for the iterative merge-many variant
    (:func:`align_to_mean`, weight matching only). ``method``: ``"weight"`` or
    ``"activation"``/``"corr"``/``"cov"`` (needs ``loader``; models must be nn.Modules).
    """
    if len(models) < 2:
        raise ValueError("align_many needs at least two models")
    if reference == "mean":
        if method != "weight":
            raise ValueError("reference='mean' is implemented for weight matching only")
        return align_to_mean(spec, models, seed=seed, max_iter=max_iter, max_rounds=max_rounds)
    if not isinstance(reference, int) or not 0 <= reference < len(models):
        raise ValueError(f"reference must be a model index or 'mean', got {reference!r}")
    out = []
    for i, m in enumerate(models):
        if i == reference:
            out.append(Permutation.identity(spec))
        elif method == "weight":
            out.append(weight_matching(spec, models[reference], m, max_iter=max_iter, seed=seed))
        elif method in ("activation", "corr", "cov"):
            from neuralign.align.activation import activation_matching

            if loader is None:
                raise ValueError("activation matching needs a loader")
            out.append(activation_matching(models[reference], m, loader,
                                           method="cov" if method == "cov" else "corr",
                                           spec=spec, seed=seed))
        else:
            raise ValueError(f"unknown method {method!r}; use 'weight' or 'activation'")
    return out


def align_to_mean(spec: PermutationSpec, models: Sequence, *, seed: int = 0,
                  max_iter: int = 100, max_rounds: int = 20) -> list[Permutation]:
    """Merge-many alignment: repeat, over the models in random order, weight matching of model
    ``i`` to the mean of the other (permuted) models; stop when a round changes nothing."""
    t0 = time.perf_counter()
    sds = [as_state_dict(m) for m in models]
    for sd in sds[1:]:
        check_same_architecture(sds[0], sd, spec.keys)
    perms = [Permutation.identity(spec) for _ in sds]
    permuted = [dict(sd) for sd in sds]
    keys = [k for k in spec.keys if sds[0][k].is_floating_point()]
    gen = torch.Generator().manual_seed(seed)
    rounds = 0
    for rounds in range(1, max_rounds + 1):
        changed = False
        for i in torch.randperm(len(sds), generator=gen).tolist():
            others = [permuted[j] for j in range(len(sds)) if j != i]
            mean = {k: sum(o[k].float() for o in others) / len(others) for k in keys}
            p = weight_matching(spec, mean, {k: sds[i][k] for k in keys}, max_iter=max_iter,
                                seed=seed + rounds, init=perms[i])
            if any(not torch.equal(p[n], perms[i][n]) for n in spec.groups):
                changed = True
            perms[i] = p
            permuted[i] = _permute_sd(sds[i], p, spec)
        if not changed:
            break
    for p in perms:
        p.info.update({"method": "merge-many", "rounds": rounds,
                       "time_s": time.perf_counter() - t0})
    return perms
