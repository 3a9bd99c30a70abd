"""The task-vector family: task arithmetic (Ilharco et al.), TIES-merging (Yadav et al.), DARE
(Yu et al.), SLERP, and *alignment first* for models that do not share a pre-trained origin.

A task vector is ``tau = theta_finetuned - theta_base``. Every method here is a per-tensor
kernel (:func:`merge_tensor`) so the same arithmetic runs in memory (:func:`task_merge`) and
out of core on sharded checkpoints (:mod:`neuralign.merge.sharded`), tensor by tensor:

* ``task-arithmetic``: ``base + scale * sum_i w_i tau_i``.
* ``ties``: trim every ``tau_i`` to its top-``density`` fraction by magnitude, elect a sign per
  entry (sign of ``sum_i w_i tau_i``, or of the count of signs), then the disjoint mean
  ``sum_{i agrees} w_i tau_i / sum_{i agrees} w_i``; the result is ``base + scale * mean``.
* ``dare``: drop every entry of ``tau_i`` with probability ``1 - density`` and rescale the rest
  by ``1 / density`` (the paper; ``rescale="l1"`` matches the L1 norm instead, as mergekit), then
  combine linearly (``combine="linear"``) or with TIES' sign election and disjoint mean.
* ``slerp``: spherical interpolation of each tensor (flattened) from ``base`` (t=0) to the other
  model (t=1); nearly collinear tensors fall back to linear interpolation.

Tensors are combined in float32 (float64 stays float64) and cast back to the base's dtype;
integer tensors are taken from the base. DARE masks come from a generator seeded by ``seed``,
the tensor name and the model's index, so the in-memory and the sharded merge draw the same.
"""

from __future__ import annotations

import math
import zlib
from collections.abc import Callable, Mapping, Sequence

import torch
from torch import nn

from neuralign.errors import NeuralignError
from neuralign.merge._select import topk_mask
from neuralign.merge._util import ModelLike, StateDict, as_state_dict, check_finite, like
from neuralign.utils import check_same_architecture

__all__ = [
    "TASK_METHODS",
    "add_task_vectors",
    "align_then_merge",
    "apply_task_vector",
    "check_task_options",
    "dare_merge",
    "merge_tensor",
    "negate_task_vector",
    "scale_task_vector",
    "slerp",
    "task_arithmetic",
    "task_merge",
    "task_vector",
    "ties_merge",
]

TASK_METHODS = ("linear", "task-arithmetic", "ties", "dare", "slerp")
_HINT = "task vectors need models fine-tuned from one base (or use align_then_merge)"


# ----------------------------------------------------------------------------- task vectors
def _float_keys(sd: Mapping[str, torch.Tensor]) -> list[str]:
    return [k for k, v in sd.items() if isinstance(v, torch.Tensor) and v.is_floating_point()]


def task_vector(finetuned: ModelLike, base: ModelLike) -> StateDict:
    """``finetuned - base`` for every floating-point tensor (a new state dict)."""
    sf, sb = as_state_dict(finetuned), as_state_dict(base)
    check_same_architecture([sb, sf], hint=_HINT)
    return {k: (sf[k] - sb[k]).clone() for k in _float_keys(sb)}


def negate_task_vector(tv: Mapping[str, torch.Tensor]) -> StateDict:
    """``-tau`` (forgetting a task by subtracting its vector)."""
    return {k: -v for k, v in tv.items()}


def scale_task_vector(tv: Mapping[str, torch.Tensor], scale: float) -> StateDict:
    return {k: v * float(scale) for k, v in tv.items()}


def add_task_vectors(tvs: Sequence[Mapping[str, torch.Tensor]],
                     weights: Sequence[float] | None = None) -> StateDict:
    """``sum_i w_i tau_i`` (weights default to 1, not normalised: task arithmetic adds)."""
    if len(tvs) == 0:
        raise NeuralignError("add_task_vectors needs at least one task vector")
    w = _weights(weights, len(tvs))
    keys = set(tvs[0])
    for i, tv in enumerate(tvs[1:], 1):
        if set(tv) != keys:
            raise NeuralignError(f"task vectors 0 and {i} hold different tensors; {_HINT}")
    return {k: sum(wi * tv[k] for wi, tv in zip(w, tvs)) for k in tvs[0]}


def apply_task_vector(base: ModelLike, tv: Mapping[str, torch.Tensor], scale: float = 1.0
                      ) -> ModelLike:
    """``base + scale * tau`` as a new object of the kind of ``base``."""
    sb = as_state_dict(base)
    for k, v in tv.items():
        if k not in sb or tuple(sb[k].shape) != tuple(v.shape):
            raise NeuralignError(f"task vector tensor {k!r} does not fit the base model; {_HINT}")
    out = {k: ((v.to(torch.float64) + float(scale) * tv[k].to(torch.float64)).to(v.dtype)
               if k in tv else v.clone()) for k, v in sb.items()}
    return like(base, out)


# ----------------------------------------------------------------------------- kernels
def _weights(weights, n: int) -> list[float]:
    if weights is None:
        return [1.0] * n
    if len(weights) != n:
        raise NeuralignError(f"got {len(weights)} weights for {n} models; pass one per model")
    return [float(w) for w in weights]


def check_task_options(method: str, n_models: int, *, weights=None, density: float = 1.0,
                       scale: float = 1.0, t: float = 0.5, elect: str = "sum",
                       combine: str = "linear", rescale: str | None = "inverse",
                       seed: int = 0) -> dict:
    """Validate the options of a task-vector merge before any tensor is read; return them
    normalised (the keyword arguments of :func:`merge_tensor`)."""
    method = method.replace("_", "-")
    if method not in TASK_METHODS:
        raise NeuralignError(f"unknown task-vector method {method!r}; choose one of "
                             f"{', '.join(TASK_METHODS)}")
    if n_models < 1:
        raise NeuralignError(f"{method} needs at least one model besides the base")
    if method == "slerp" and n_models != 1:
        raise NeuralignError(f"slerp interpolates the base and exactly one model, got {n_models}")
    if method in ("ties", "dare") and not 0.0 < float(density) <= 1.0:
        raise NeuralignError(f"density must be in (0, 1], got {density}")
    if method == "slerp" and not 0.0 <= float(t) <= 1.0:
        raise NeuralignError(f"slerp needs t in [0, 1], got {t}")
    if elect not in ("sum", "count"):
        raise NeuralignError(f"unknown sign election {elect!r}; use 'sum' or 'count'")
    if combine not in ("linear", "ties"):
        raise NeuralignError(f"unknown DARE combination {combine!r}; use 'linear' or 'ties'")
    if rescale not in ("inverse", "l1", None):
        raise NeuralignError(f"unknown DARE rescale {rescale!r}; use 'inverse', 'l1' or None")
    w = _weights(weights, n_models)
    if method == "linear" and sum(w) <= 0:
        raise NeuralignError("linear merge weights must sum to a positive number")
    return {"method": method, "weights": w, "density": float(density), "scale": float(scale),
            "t": float(t), "elect": elect, "combine": combine, "rescale": rescale,
            "seed": int(seed)}


def trim(delta: torch.Tensor, density: float) -> torch.Tensor:
    """Keep the ``max(1, int(density * numel))`` entries of largest magnitude (TIES' trim; ties at
    the threshold keep the lowest flat indices)."""
    if density >= 1.0:
        return delta
    mask = topk_mask(delta.abs().reshape(-1), max(1, int(density * delta.numel())))
    return delta * mask.reshape(delta.shape)


def _elect_and_mean(deltas: torch.Tensor, w: torch.Tensor, elect: str) -> torch.Tensor:
    """TIES' sign election and disjoint mean over the first axis of (weighted) ``deltas``.

    Float arithmetic only (boolean masks and ``torch.where`` are several times slower on CPU);
    the values are those of the boolean formulation: ``agree`` is exactly 1.0 or 0.0 and a zero
    denominator becomes exactly 1."""
    weighted = deltas * w
    sign = weighted.sign()
    ref = weighted.sum(0) if elect == "sum" else sign.sum(0)
    elected = (ref >= 0).to(deltas.dtype).mul_(2.0).sub_(1.0)  # +1 where ref >= 0, else -1
    agree = sign.mul_(elected).clamp_(min=0.0)  # 1 where the sign is the elected one, else 0
    num = (weighted * agree).sum(0)
    den = (w * agree).sum(0)
    return num / den.add_((den == 0).to(den.dtype))


def dare_mask(shape, density: float, seed: int, key: str, index: int) -> torch.Tensor:
    """The keep-mask DARE draws for model ``index``'s tensor ``key`` (Bernoulli(density))."""
    gen = torch.Generator().manual_seed((int(seed) * 1_000_003 + zlib.crc32(key.encode()) * 31
                                         + index) % (2**63))
    return torch.bernoulli(torch.full(tuple(shape), float(density)), generator=gen)


CHUNK_ELEMENTS = 1 << 20  # elementwise work is done on flat chunks of this many entries


def _chunks(n: int, chunk: int):
    for s in range(0, n, chunk):
        yield s, min(n, s + chunk)


def _topk_mask(b: torch.Tensor, x: torch.Tensor, density: float, work, chunk: int):
    """TIES' trim as a flat keep-mask: the ``max(1, int(density * n))`` largest ``|x - b|``
    (among equal magnitudes at the threshold, the lowest flat indices; see
    :func:`neuralign.merge._select.topk_mask`)."""
    n = b.numel()
    if density >= 1.0:
        return None
    mag = torch.empty(n, dtype=work)
    for s, e in _chunks(n, chunk):
        torch.sub(x[s:e].to(work), b[s:e].to(work), out=mag[s:e])
        mag[s:e].abs_()
    return topk_mask(mag, max(1, int(density * n)))


def _l1_factor(b, x, mask, work, chunk: int) -> float:
    """DARE with ``rescale="l1"``: ``|delta|_1 / |kept delta|_1`` (1 when either is ~0)."""
    before = after = 0.0
    for s, e in _chunks(b.numel(), chunk):
        d = (x[s:e].to(work) - b[s:e].to(work)).abs().double()
        before += float(d.sum())
        after += float((d * mask[s:e]).sum())
    return 1.0 if before < 1e-7 or after < 1e-7 else before / after


def _slerp_coefs(a, b, t: float, chunk: int, dot_threshold: float = 0.9995, eps: float = 1e-8):
    """``(c_a, c_b)`` with SLERP = ``c_a a + c_b b`` over the flattened tensors (linear when the
    normalised vectors are nearly collinear or antipodal)."""
    aa = bb = ab = 0.0
    for s, e in _chunks(a.numel(), chunk):
        x, y = a[s:e].double(), b[s:e].double()
        aa += float((x * x).sum())
        bb += float((y * y).sum())
        ab += float((x * y).sum())
    na, nb = aa ** 0.5, bb ** 0.5
    na, nb = (na if na > eps else 1.0), (nb if nb > eps else 1.0)
    dot = max(-1.0, min(1.0, ab / (na * nb)))
    if abs(dot) > dot_threshold:
        return 1.0 - t, t
    theta = math.acos(dot)
    return math.sin((1 - t) * theta) / math.sin(theta), math.sin(t * theta) / math.sin(theta)


def merge_tensor(key: str, base: torch.Tensor, tensors: Sequence[torch.Tensor], *, method: str,
                 weights: Sequence[float], density: float = 1.0, scale: float = 1.0,
                 t: float = 0.5, elect: str = "sum", combine: str = "linear",
                 rescale: str | None = "inverse", seed: int = 0,
                 masks: Sequence[torch.Tensor] | None = None,
                 chunk: int = CHUNK_ELEMENTS) -> torch.Tensor:
    """Merge one tensor of ``base`` with the same tensor of every model (options as returned by
    :func:`check_task_options`; ``masks`` overrides DARE's random keep-masks).

    The arithmetic runs on flat chunks of ``chunk`` entries in float32 (float64 stays float64),
    so besides the inputs and the output it holds a few chunks, plus for TIES one float32 copy of
    the tensor while its top-k is found and one boolean mask per model (DARE: the masks).
    """
    if not base.is_floating_point():
        return base.clone()
    for x in tensors:
        if tuple(x.shape) != tuple(base.shape):
            raise NeuralignError(f"tensor {key!r} has shape {tuple(x.shape)} in one model and "
                                 f"{tuple(base.shape)} in the base; {_HINT}")
    work = torch.float64 if base.dtype == torch.float64 else torch.float32
    b = base.reshape(-1)
    xs = [x.reshape(-1) for x in tensors]
    n = b.numel()
    keep, factors = [None] * len(xs), [1.0] * len(xs)
    if method == "ties":
        keep = [_topk_mask(b, x, density, work, chunk) for x in xs]
    elif method == "dare":
        if masks is None:
            masks = [dare_mask(base.shape, density, seed, key, i) for i in range(len(xs))]
        if len(masks) != len(xs) or any(torch.as_tensor(m).numel() != n for m in masks):
            raise NeuralignError(f"DARE masks for {key!r}: pass one mask of shape "
                                 f"{tuple(base.shape)} per model")
        keep = [torch.as_tensor(m).reshape(-1) != 0 for m in masks]
        if rescale == "inverse":
            factors = [1.0 / density] * len(xs)
        elif rescale == "l1":
            factors = [_l1_factor(b, x, m, work, chunk) for x, m in zip(xs, keep)]
    if method == "slerp":
        ca, cb = _slerp_coefs(b, xs[0], t, chunk)
    w = torch.tensor(weights, dtype=work).reshape(-1, 1)
    tot = float(sum(weights))
    out = torch.empty(n, dtype=base.dtype)
    for s, e in _chunks(n, chunk):
        bc = b[s:e].to(work)
        xc = [x[s:e].to(work) for x in xs]
        if method == "linear":  # in place: no temporary per model
            oc = xc[0] * (weights[0] / tot)  # a new tensor: xc may be views of the inputs
            for wi, x in zip(weights[1:], xc[1:]):
                oc.add_(x, alpha=wi / tot)
        elif method == "slerp":
            oc = ca * bc + cb * xc[0]
        else:
            stack = torch.empty((len(xs), e - s), dtype=work)
            for d, x, m, f in zip(stack, xc, keep, factors):
                torch.sub(x, bc, out=d)
                if m is not None:
                    d.mul_(m[s:e].to(work))  # as d * mask, without bool arithmetic
                if method == "dare" and rescale == "inverse":
                    d.div_(density)
                elif f != 1.0:
                    d.mul_(f)
            if method == "ties" or (method == "dare" and combine == "ties"):
                mixed = _elect_and_mean(stack, w, elect)
            else:
                mixed = (stack * w).sum(0)
            oc = bc + scale * mixed
        out[s:e].copy_(oc)  # rounds like .to(base.dtype), without the temporary
    return out.reshape(base.shape)


# ----------------------------------------------------------------------------- state dicts
def task_merge(base: ModelLike, models: Sequence[ModelLike], method: str = "task-arithmetic",
               *, masks: Mapping[str, Sequence[torch.Tensor]] | None = None, **options
               ) -> ModelLike:
    """Merge ``models`` (fine-tuned from ``base``) with a task-vector ``method`` (see the module
    docstring); returns a new object of the kind of ``base``. Inputs are not modified."""
    opts = check_task_options(method, len(models), **options)
    sb = as_state_dict(base)
    sds = [as_state_dict(m) for m in models]
    check_same_architecture([sb, *sds], hint=_HINT)
    check_finite(sb, "the base model")
    for i, sd in enumerate(sds):
        check_finite(sd, f"model {i}")
    out = {k: merge_tensor(k, v, [sd[k] for sd in sds], masks=(masks or {}).get(k), **opts)
           if isinstance(v, torch.Tensor) else v for k, v in sb.items()}
    return like(base, out)


def task_arithmetic(base: ModelLike, models: Sequence[ModelLike], weights=None,
                    scale: float = 1.0) -> ModelLike:
    """``base + scale * sum_i w_i (model_i - base)``."""
    return task_merge(base, models, "task-arithmetic", weights=weights, scale=scale)


def ties_merge(base: ModelLike, models: Sequence[ModelLike], density: float = 0.2,
               weights=None, scale: float = 1.0, elect: str = "sum") -> ModelLike:
    """TIES-merging: trim to ``density``, elect signs, disjoint mean, ``base + scale * mean``."""
    return task_merge(base, models, "ties", density=density, weights=weights, scale=scale,
                      elect=elect)


def dare_merge(base: ModelLike, models: Sequence[ModelLike], density: float = 0.5,
               combine: str = "linear", weights=None, scale: float = 1.0,
               rescale: str | None = "inverse", seed: int = 0, elect: str = "sum",
               masks: Mapping[str, Sequence[torch.Tensor]] | None = None) -> ModelLike:
    """DARE: drop each delta entry with probability ``1 - density``, rescale the rest, then
    combine linearly or with TIES (``combine="ties"``). ``masks[key]`` (one keep-mask per model)
    replaces the seeded random draw."""
    return task_merge(base, models, "dare", density=density, combine=combine, weights=weights,
                      scale=scale, rescale=rescale, seed=seed, elect=elect, masks=masks)


def slerp(a: ModelLike, b: ModelLike, t: float = 0.5) -> ModelLike:
    """Spherical interpolation of every float tensor from ``a`` (t=0) to ``b`` (t=1)."""
    return task_merge(a, [b], "slerp", t=t)


# ----------------------------------------------------------------------------- alignment first
def align_then_merge(models: Sequence[nn.Module], example_input=None, *,
                     method: str = "linear", reference: int = 0, base: nn.Module | None = None,
                     spec=None, aligner: Callable | None = None, seed: int = 0, **options):
    """Permute every model (and ``base``, when given) onto ``models[reference]``, then merge.

    For models that do not share a pre-trained origin. ``aligner(spec, reference, model)``
    returns a :class:`~neuralign.spec.Permutation` (default: weight matching, seeded). With
    ``method="linear"`` the aligned models are averaged (``weights`` option); the task-vector
    methods use the aligned ``base``, or the reference model itself when no base is given (the
    other models' vectors are then taken relative to it). Returns ``(merged, permutations)``,
    one permutation per model (the identity for the reference).
    """
    from neuralign.align.weight import weight_matching
    from neuralign.permute import apply_permutation
    from neuralign.spec import Permutation, spec_from_model

    if len(models) < 2:
        raise NeuralignError("align_then_merge needs at least two models")
    if not 0 <= reference < len(models):
        raise NeuralignError(f"reference index {reference} is out of range for {len(models)} "
                             "models")
    if any(not isinstance(m, nn.Module) for m in models):
        raise NeuralignError("align_then_merge needs nn.Module models (to derive the spec)")
    ref = models[reference]
    check_same_architecture([as_state_dict(m) for m in models],
                            hint="alignment needs models of one architecture")
    if spec is None:
        spec = spec_from_model(ref, example_input)
    align = aligner or (lambda s, a, b: weight_matching(s, a, b, seed=seed))
    perms, aligned = [], []
    for i, m in enumerate(models):
        p = Permutation.identity(spec) if i == reference else align(spec, ref, m)
        perms.append(p)
        aligned.append(m if i == reference else apply_permutation(m, p, spec))
    if method.replace("_", "-") == "linear":
        opts = check_task_options("linear", len(aligned), **options)
        return task_merge(aligned[0], aligned, "linear", weights=opts["weights"]), perms
    if base is None:
        origin = ref
        others = [m for i, m in enumerate(aligned) if i != reference]
    else:
        origin = apply_permutation(base, align(spec, ref, base), spec)
        others = aligned
    return task_merge(origin, others, method, **options), perms
