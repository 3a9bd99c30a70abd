"""One entry point for "align model b to model a", used by the CLI and the demo."""

from __future__ import annotations

import time

from torch import nn

from neuralign.align.activation import activation_matching, first_input
from neuralign.align.weight import check_same_architecture, weight_matching, weight_objective
from neuralign.errors import DataError
from neuralign.permute import apply_permutation
from neuralign.spec import spec_from_model
from neuralign.spec.core import PermutationSpec

__all__ = ["METHODS", "align_models", "example_input_for"]

METHODS = ("weight", "activation", "corr", "cov", "ste", "sinkhorn")


def example_input_for(model: nn.Module):
    """A dummy batch ``(2, C, H, W)`` for tracing, from the model's ``model_config`` (set by
    ``neuralign.models.get_model`` and checkpoints); None when the config does not say."""
    import torch

    try:
        from neuralign.models import model_config

        kw = model_config(model).get("kwargs", {})
    except Exception:  # noqa: BLE001 - models without a config
        return None
    c, size = kw.get("in_channels"), kw.get("image_size")
    if c is None or size is None:
        return None
    return torch.zeros(2, c, size, size)


def align_models(a: nn.Module, b: nn.Module, method: str = "weight", loader=None, seed: int = 0,
                 *, spec: PermutationSpec | None = None, example_input=None,
                 max_iter: int = 100, restarts: int = 0, **options):
    """Align ``b`` to ``a``; return ``(b_aligned, perm, summary)``.

    ``method``: ``weight`` (no data), ``activation``/``corr`` (correlation), ``cov``
    (cross-covariance), ``ste`` (needs labelled ``loader``), ``sinkhorn``. The spec is derived
    from ``a`` on ``example_input`` or the first batch of ``loader`` unless given. ``summary``
    holds per-group sizes and moved units, the objective before/after and the time.
    """
    if method not in METHODS:
        raise ValueError(f"unknown alignment method {method!r}; choose from {', '.join(METHODS)}")
    t0 = time.perf_counter()
    check_same_architecture(a.state_dict(), b.state_dict())
    if spec is None:
        if example_input is None and loader is not None:
            example_input = first_input(next(iter(loader)))
        if example_input is None:
            example_input = example_input_for(a)
        spec = spec_from_model(a, example_input)
    elif example_input is not None or loader is not None:  # a spec given by hand: checked too
        from neuralign.spec import check_spec

        check_spec(a, spec, example_input if example_input is not None
                   else first_input(next(iter(loader))))
    if method in ("activation", "corr", "cov", "ste") and loader is None:
        raise DataError(f"method {method!r} needs data: pass a loader (CLI: --data)")
    if method == "weight":
        perm = weight_matching(spec, a, b, max_iter=max_iter, seed=seed, restarts=restarts,
                               **options)  # e.g. tol=0 for full convergence
    elif method in ("activation", "corr", "cov"):
        perm = activation_matching(a, b, loader, method="cov" if method == "cov" else "corr",
                                   spec=spec, seed=seed, **options)
    elif method == "ste":
        from neuralign.align.ste import ste_matching

        perm = ste_matching(spec, a, b, loader, seed=seed, **options)
    else:
        from neuralign.align.sinkhorn import sinkhorn_matching

        perm = sinkhorn_matching(spec, a, b, seed=seed, **options)
    b_aligned = apply_permutation(b, perm, spec)
    moved = perm.moved()
    summary = {
        "method": method,
        "groups": [{"name": n, "size": g.size, "moved": moved.get(n, 0)}
                   for n, g in spec.groups.items()],
        "weight_objective_before": weight_objective(spec, a, b),
        "weight_objective_after": weight_objective(spec, a, b_aligned),
        "objective_before": perm.info.get("objective_init"),
        "objective_after": perm.info.get("objective"),
        "sweeps": perm.info.get("sweeps"),
        "time_s": time.perf_counter() - t0,
        "coverage": spec.coverage().summary(),
        "free_fraction": spec.coverage().free_fraction,
    }
    return b_aligned, perm, summary


def l2_distance(a, b) -> float:
    """Euclidean distance between the float tensors of two models (a quick alignment check)."""
    sa, sb = a.state_dict(), b.state_dict()
    return float(sum(((sa[k].float() - sb[k].float()) ** 2).sum() for k in sa
                     if sa[k].is_floating_point()) ** 0.5)



