"""Plain data describing which tensor axes share one permutation of hidden units.

A :class:`PermutationSpec` is a set of :class:`Group` s. A group has a ``size`` (the number of
units it permutes) and a list of :class:`Place` s: the tensor axes it acts on. A place is
``(key, axis, outer, inner, start)``: the slice ``[start, start + outer*size*inner)`` of axis
``axis`` of tensor ``key`` is viewed as ``(outer, size, inner)`` and the permutation acts on the
middle axis. This covers

* plain axes (``outer = inner = 1``),
* a Linear input after a flatten of a conv (``inner = H*W``: each channel repeated over space),
* attention heads permuted as wholes (``outer = 3`` for packed q/k/v, ``inner = head_dim``),
* within-head dims permuted identically in every head (``outer = num_heads``, ``inner = 1``),
* a segment of a packed tensor (``start``: the q, k or v part of ``in_proj_weight``).

A group also lists :class:`Probe` s: where its units appear in the activations, for activation
matching (fx node names from tracing, or module names whose forward output carries them).
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field

import torch

from neuralign.errors import SpecError


@dataclass(frozen=True)
class Place:
    """One tensor axis a group acts on: ``key``'s axis ``axis`` viewed as (outer, size, inner)."""

    key: str
    axis: int
    outer: int = 1
    inner: int = 1
    start: int = 0

    def __iter__(self) -> Iterator:  # ``key, axis = place`` works, as docs/internals.md says
        return iter((self.key, self.axis))


@dataclass(frozen=True)
class Probe:
    """Where a group's units appear in the activations.

    ``kind="node"``: the output of the torch.fx node ``name`` of the traced model;
    ``kind="module"``: the forward output of submodule ``name`` (first element of a tuple).
    Units live on dimension ``dim`` viewed as (outer, size, inner); every other index is a sample.
    """

    name: str
    dim: int
    outer: int = 1
    inner: int = 1
    kind: str = "node"


@dataclass
class Group:
    name: str
    size: int
    places: list[Place] = field(default_factory=list)
    probes: list[Probe] = field(default_factory=list)
    kind: str = "units"  # "heads": whole attention heads (other groups permute inside them)

    @property
    def keys(self) -> list[str]:
        return list(dict.fromkeys(p.key for p in self.places))


@dataclass
class Coverage:
    """What a spec lets move: ``groups`` lists, per group of hidden units, its ``name``,
    ``size``, whether it is ``free`` and the ``reason`` it is fixed; ``free_fraction`` is the
    share of the hidden units (the outputs of every linear, convolution and embedding layer,
    weighted by the log-size of their groups when only some factors of an axis are free) that
    can move."""

    groups: list[dict]
    free_fraction: float
    free_units: int
    hidden_units: int

    @property
    def fixed(self) -> list[dict]:
        return [g for g in self.groups if not g["free"]]

    def reasons(self) -> dict[str, int]:
        """``reason -> units`` fixed for it."""
        out: dict[str, int] = {}
        for g in self.fixed:
            out[g["reason"]] = out.get(g["reason"], 0) + g["size"]
        return dict(sorted(out.items(), key=lambda kv: -kv[1]))

    def reasons_line(self) -> str:
        r = self.reasons()
        return "; ".join(f"{k} ({v} units)" for k, v in list(r.items())[:3]) or "no hidden units"

    def summary(self) -> str:
        n_free = sum(g["free"] for g in self.groups)
        line = (f"coverage: {self.free_fraction:.1%} of {self.hidden_units} hidden units free "
                f"({n_free} groups free, {len(self.groups) - n_free} fixed)")
        return line + (f"; fixed: {self.reasons_line()}" if self.fixed else "")


@dataclass
class PermutationSpec:
    """Permutation groups of a model, keyed by group name (insertion order = input to output)."""

    groups: dict[str, Group] = field(default_factory=dict)
    source: str = "manual"
    trace_info: dict = field(default_factory=dict, repr=False, compare=False)
    _coverage: Coverage | None = field(default=None, repr=False, compare=False)

    def coverage(self) -> Coverage:
        """Per group free or fixed (and why), and the fraction of hidden units free to move.
        A hand-written spec reports its own groups, all free."""
        if self._coverage is not None:
            return self._coverage
        rows = [{"name": g.name, "size": g.size, "free": True, "reason": None}
                for g in self.groups.values()]
        n = sum(g.size for g in self.groups.values())
        return Coverage(rows, 1.0 if n else 0.0, n, n)

    def __len__(self) -> int:
        return len(self.groups)

    def __iter__(self) -> Iterator[str]:
        return iter(self.groups)

    def __getitem__(self, name: str) -> Group:
        return self.groups[name]

    @property
    def keys(self) -> list[str]:
        """Every tensor name some group acts on."""
        return list(dict.fromkeys(p.key for g in self.groups.values() for p in g.places))

    def key_places(self) -> dict[str, list[tuple[str, Place]]]:
        """``key -> [(group name, place), ...]``."""
        out: dict[str, list[tuple[str, Place]]] = {}
        for g in self.groups.values():
            for p in g.places:
                out.setdefault(p.key, []).append((g.name, p))
        return out

    def validate(self, state_dict: Mapping[str, torch.Tensor]) -> None:
        """Raise SpecError if a place does not exist or does not fit its tensor."""
        for g in self.groups.values():
            for p in g.places:
                if p.key not in state_dict:
                    raise SpecError(
                        f"spec group {g.name!r} names tensor {p.key!r}, which the model does not "
                        "have; derive the spec from this model with spec_from_model"
                    )
                t = state_dict[p.key]
                n = p.outer * g.size * p.inner
                if p.axis >= t.dim() or p.start + n > t.shape[p.axis]:
                    raise SpecError(
                        f"spec group {g.name!r} (size {g.size}) does not fit {p.key!r} of shape "
                        f"{tuple(t.shape)} on axis {p.axis}; derive the spec from this model"
                    )

    def summary(self) -> str:
        lines = [f"PermutationSpec: {len(self.groups)} groups ({self.source})"]
        for g in self.groups.values():
            lines.append(f"  {g.name}: size {g.size}, {len(g.places)} places, {len(g.probes)} probes")
        return "\n".join(lines)


class Permutation(dict):
    """``group name -> LongTensor``: entry ``p[i] = j`` means unit ``i`` of the permuted model is
    unit ``j`` of the original one. ``info`` holds what the method that found it reports."""

    def __init__(self, *args, info: dict | None = None, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.info: dict = dict(info or {})

    @classmethod
    def identity(cls, spec: PermutationSpec) -> Permutation:
        return cls({n: torch.arange(g.size) for n, g in spec.groups.items()})

    def inverse(self) -> Permutation:
        return Permutation({k: torch.argsort(v) for k, v in self.items()})

    def compose(self, other: Permutation) -> Permutation:
        """The permutation applying ``other`` first, then ``self``."""
        return Permutation({k: other[k][v] if k in other else v for k, v in self.items()})

    def moved(self) -> dict[str, int]:
        """How many units each group moves."""
        return {k: int((v != torch.arange(len(v))).sum()) for k, v in self.items()}

    def __repr__(self) -> str:
        moved = self.moved()
        return "Permutation(" + ", ".join(f"{k}: {moved[k]}/{len(v)} moved" for k, v in
                                          self.items()) + ")"
