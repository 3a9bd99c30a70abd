"""Matching modulo permutations times positive diagonal scalings (survey §6.1, Godfrey et al.
2022): for ReLU-family activations ``relu(s x) = s relu(x)`` for ``s > 0``, so scaling a unit's
incoming weights (its rows and bias) by ``s`` and its outgoing weights (the next layer's columns)
by ``1/s`` computes the same function; the symmetry group of a hidden layer is ``P D``.

:func:`canonicalize` removes the scaling: every unit's incoming weights get unit norm (groups in
spec order, input to output, so each layer sees the already normalised inputs). Two models that
differ by ``D P`` then differ by ``P`` only, which weight matching finds;
:func:`scaling_matching` returns that permutation and the positive diagonal ``D`` with
``D P b`` as close to ``a`` as the group allows (exactly ``a`` when ``b`` is a rescaled
permutation of it), and the transformed ``b``, which computes the same function as ``b``.

Which groups may be scaled is checked, not assumed: a group qualifies when its places are
output axes (rows, biases) of the layers that produce its units and input axes of the layers that
consume them, and a random positive scaling of it leaves the model's outputs on
``example_input`` unchanged (so a group behind a normalisation, a sigmoid or a residual stream
with a LayerNorm stays unscaled, with the reason in ``info``).
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field

import torch
from torch import nn

from neuralign.errors import NeuralignError
from neuralign.permute import _segment, apply_permutation
from neuralign.spec.core import Group, Permutation, PermutationSpec, Place
from neuralign.utils import as_state_dict, check_same_architecture, eval_mode

__all__ = ["ScaledAlignment", "apply_scaling", "canonicalize", "scalable_groups",
           "scaling_matching"]


def _is_incoming(t: torch.Tensor, pl: Place, key: str) -> bool | None:
    """True: the place is an output axis of the producing layer; False: an input axis of a
    consumer; None: something else (a norm's scale, running statistics)."""
    if t.dim() >= 2:
        return pl.axis == 0 if pl.axis in (0, 1) else None
    return True if key.endswith("bias") else None


def _unit_factor(t: torch.Tensor, pl: Place, size: int, s: torch.Tensor) -> torch.Tensor:
    seg, shape = _segment(t, pl, size)
    view = [1] * len(shape)
    view[pl.axis + 1] = size
    out = (seg.reshape(shape) * s.to(t.dtype).reshape(view)).reshape(seg.shape)
    if seg.shape == t.shape:
        return out
    res = t.clone()
    res.narrow(pl.axis, pl.start, seg.shape[pl.axis]).copy_(out)
    return res


def _scale_group(sd: dict, g: Group, s: torch.Tensor) -> None:
    """Multiply the group's incoming weights by ``s`` and its outgoing weights by ``1/s``."""
    for pl in g.places:
        t = sd[pl.key]
        inc = _is_incoming(t, pl, pl.key)
        sd[pl.key] = _unit_factor(t, pl, g.size, s if inc else 1.0 / s)


def apply_scaling(model_or_state_dict, scales: Mapping[str, torch.Tensor],
                  spec: PermutationSpec):
    """A new model (or state dict) with each group's units scaled by ``scales[group]`` (> 0):
    incoming weights times ``s``, outgoing weights divided by ``s``."""
    for name, s in scales.items():
        if name not in spec.groups:
            raise NeuralignError(f"scaling names group {name!r}, which the spec does not have")
        s = torch.as_tensor(s)
        if s.shape != (spec.groups[name].size,) or not bool((s > 0).all()):
            raise NeuralignError(f"scaling of group {name!r} must be {spec.groups[name].size} "
                                 "positive numbers")
    sd = dict(as_state_dict(model_or_state_dict))
    for name, s in scales.items():
        _scale_group(sd, spec.groups[name], torch.as_tensor(s).double())
    if isinstance(model_or_state_dict, nn.Module):
        m = copy.deepcopy(model_or_state_dict)
        m.load_state_dict(sd)
        return m
    return sd


def scalable_groups(model: nn.Module, spec: PermutationSpec, example_input, *, seed: int = 0,
                    tol: float = 1e-4) -> tuple[list[str], dict[str, str]]:
    """Groups whose units may be rescaled (see the module docstring), and why the others not."""
    sd = as_state_dict(model)
    ok, why = [], {}
    restore = eval_mode(model)
    try:
        with torch.no_grad():
            ref = model(example_input)
    finally:
        restore()
    gen = torch.Generator().manual_seed(seed)
    for name, g in spec.groups.items():
        kinds = [_is_incoming(sd[pl.key], pl, pl.key) for pl in g.places]
        if None in kinds:
            why[name] = "acts on a tensor that is neither a layer's output rows nor its input"
            continue
        if not any(kinds) or all(kinds):
            why[name] = "has no producing or no consuming layer"
            continue
        s = torch.exp(torch.empty(g.size, dtype=torch.float64).uniform_(-1, 1, generator=gen))
        m = apply_scaling(model, {name: s}, spec)
        with torch.no_grad():
            out = m.eval()(example_input)
        if not torch.allclose(out, ref, rtol=tol, atol=tol * (1 + float(ref.abs().max()))):
            why[name] = "a positive scaling changes the model's outputs (not a ReLU-family unit)"
            continue
        ok.append(name)
    return ok, why


def _incoming_norms(sd: Mapping, g: Group) -> torch.Tensor:
    from neuralign.permute import unit_matrix

    tot = torch.zeros(g.size, dtype=torch.float64)
    for pl in g.places:
        t = sd[pl.key]
        if _is_incoming(t, pl, pl.key):
            tot += unit_matrix(t.double(), pl, g.size).pow(2).sum(1)
    return tot.sqrt()


def canonicalize(model_or_state_dict, spec: PermutationSpec, groups, eps: float = 1e-12):
    """``(canonical, norms)``: every unit of ``groups`` rescaled to unit incoming norm (in spec
    order); ``norms[group]`` are the factors divided out (units with zero weights keep 1)."""
    sd = dict(as_state_dict(model_or_state_dict))
    norms = {}
    for name in spec.groups:
        if name not in groups:
            continue
        g = spec.groups[name]
        n = _incoming_norms(sd, g)
        n = torch.where(n > eps, n, torch.ones_like(n))
        _scale_group(sd, g, 1.0 / n)
        norms[name] = n
    if isinstance(model_or_state_dict, nn.Module):
        m = copy.deepcopy(model_or_state_dict)
        m.load_state_dict(sd)
        return m, norms
    return sd, norms


@dataclass
class ScaledAlignment:
    """``aligned = D P b``: ``permutation`` P, ``scales`` D (per group, in a's unit order), the
    transformed ``b`` (same function as ``b``), and what was scaled and why not."""

    permutation: Permutation
    scales: dict[str, torch.Tensor]
    aligned: nn.Module
    info: dict = field(default_factory=dict)


def scaling_matching(spec: PermutationSpec, a: nn.Module, b: nn.Module, example_input, *,
                     matcher: Callable | None = None, seed: int = 0,
                     groups: list[str] | None = None) -> ScaledAlignment:
    """Align ``b`` to ``a`` modulo permutations × positive diagonal scalings.

    ``matcher(spec, canonical_a, canonical_b)`` returns a permutation (default: weight matching,
    seeded). ``groups`` overrides which groups are scaled (default: :func:`scalable_groups`).
    """
    from neuralign.align.weight import weight_matching

    if not isinstance(a, nn.Module) or not isinstance(b, nn.Module):
        raise NeuralignError("scaling_matching needs two nn.Module models (the scalable groups "
                             "are checked by running them)")
    sd_a, sd_b = as_state_dict(a), as_state_dict(b)
    check_same_architecture([sd_a, sd_b], hint="alignment needs two models of the same "
                            "architecture")
    spec.validate(sd_a)
    if groups is None:
        groups, why = scalable_groups(a, spec, example_input, seed=seed)
    else:
        why = {}
        for n in groups:
            if n not in spec.groups:
                raise NeuralignError(f"group {n!r} is not in the spec")
    can_a, na = canonicalize(sd_a, spec, groups)
    can_b, nb = canonicalize(sd_b, spec, groups)
    match = matcher or (lambda s, x, y: weight_matching(s, x, y, seed=seed))
    perm = match(spec, can_a, can_b)
    scales = {n: na[n] / nb[n][perm[n]] for n in groups}
    aligned = apply_scaling(apply_permutation(b, perm, spec), scales, spec)
    return ScaledAlignment(permutation=perm, scales=scales, aligned=aligned,
                           info={"scaled_groups": list(groups), "unscaled": why,
                                 "matcher_info": dict(getattr(perm, "info", {}))})
