"""Weight matching on checkpoints that do not fit in memory, and permuting such a checkpoint.

Weight matching (Git Re-Basin) solves one linear assignment per group; the similarity of a
group's units needs only the tensors the group acts on, with every *other* group's current
permutation applied to them. :func:`sharded_weight_matching` therefore reads, for each group
step, only that group's tensors of both checkpoints (one pair at a time, through
:class:`~neuralign.merge.sharded.ShardedCheckpoint`), so memory is a pair of tensors plus the
``size × size`` similarity. (Attention-head groups are matched like unit groups here; the
in-memory version first orders whole heads by a score blind to the order inside a head.) Sweeps visit the groups in a seeded random order, as
:func:`neuralign.align.weight_matching` does, and stop after a sweep without improvement.
:func:`permute_checkpoint` writes the permuted checkpoint the same way (tensor by tensor,
atomically, same shard layout).
"""

from __future__ import annotations

import time
from collections.abc import Mapping

import torch

from neuralign.align.weight import solve_lap
from neuralign.errors import ArchitectureMismatchError, SpecError
from neuralign.merge.sharded import ShardedCheckpoint, write_sharded
from neuralign.permute import check_permutation, take_units, unit_matrix
from neuralign.spec.core import Permutation, PermutationSpec

__all__ = ["permute_checkpoint", "sharded_weight_matching"]

_STATS = ("running_mean", "running_var")


def _permuted(ck: ShardedCheckpoint, key: str, spec: PermutationSpec, places, perm):
    """Tensor ``key`` of ``ck`` with every group's permutation applied."""
    t = ck.get(key)
    for gname, pl in places.get(key, []):
        if gname in perm:
            t = take_units(t, pl, spec.groups[gname].size, perm[gname])
    return t


def _check(spec: PermutationSpec, ca: ShardedCheckpoint, cb: ShardedCheckpoint) -> None:
    for g in spec.groups.values():
        for pl in g.places:
            for ck, name in ((ca, "A"), (cb, "B")):
                if pl.key not in ck.shapes:
                    raise SpecError(f"spec group {g.name!r} names tensor {pl.key!r}, which "
                                    f"checkpoint {name} ({ck.path}) does not have")
            shape = ca.shapes[pl.key]
            if cb.shapes[pl.key] != shape:
                raise ArchitectureMismatchError(
                    f"checkpoints differ in shape at {pl.key!r} ({shape} vs "
                    f"{cb.shapes[pl.key]}); alignment needs one architecture")
            n = pl.outer * g.size * pl.inner
            if pl.axis >= len(shape) or pl.start + n > shape[pl.axis]:
                raise SpecError(f"spec group {g.name!r} (size {g.size}) does not fit "
                                f"{pl.key!r} of shape {shape}; derive the spec from this model")


def sharded_weight_matching(spec: PermutationSpec, a, b, *, max_iter: int = 100, seed: int = 0,
                            rtol: float = 1e-7,
                            init: Mapping[str, torch.Tensor] | None = None) -> Permutation:
    """Weight matching of checkpoint ``b`` onto checkpoint ``a`` (paths, sharded or not), reading
    one group's tensors at a time. Returns the permutation to apply to ``b``; its ``info`` has the
    objective gain per sweep, sweeps, and tensor reads."""
    ca, cb = ShardedCheckpoint.open(a), ShardedCheckpoint.open(b)
    _check(spec, ca, cb)
    perm = Permutation.identity(spec)
    if init is not None:
        check_permutation(init, spec)
        perm.update({k: torch.as_tensor(v).long().clone() for k, v in init.items()})
    places = spec.key_places()
    float_keys = {k for k in spec.keys if ca.dtypes[k].startswith(("F", "BF"))
                  and not k.endswith(_STATS)}
    names = list(spec.groups)
    gen = torch.Generator().manual_seed(seed)
    t0, reads, gains, sweeps, converged = time.perf_counter(), 0, [], 0, False
    for _ in range(max_iter):
        sweeps += 1
        changed, gain = False, 0.0
        for i in torch.randperm(len(names), generator=gen).tolist():
            name = names[i]
            g = spec.groups[name]
            s = torch.zeros(g.size, g.size, dtype=torch.float64)
            for pl in g.places:
                if pl.key not in float_keys:
                    continue
                ta = ca.get(pl.key).double()
                tb = _permuted(cb, pl.key, spec, places, perm).double()
                reads += 2
                s += unit_matrix(ta, pl, g.size) @ unit_matrix(tb, pl, g.size).T
            # s compares a's units with b's units as currently permuted (as the in-memory
            # algorithm does, so a group acting on two axes of one tensor is handled alike)
            rel = solve_lap(s)
            idx = torch.arange(g.size)
            old_v, new_v = float(s[idx, idx].sum()), float(s[idx, rel].sum())
            if new_v - old_v > rtol * max(abs(old_v), 1e-30):
                perm[name] = perm[name][rel]
                changed = True
                gain += new_v - old_v
        gains.append(gain)
        if not changed:
            converged = True
            break
    perm.info = {"method": "weight-sharded", "sweeps": sweeps, "converged": converged,
                 "gain_per_sweep": gains, "tensor_reads": reads, "seed": seed,
                 "time_s": time.perf_counter() - t0}
    return perm


def permute_checkpoint(checkpoint, perm: Mapping[str, torch.Tensor], spec: PermutationSpec, out,
                       *, overwrite: bool = False, progress=None):
    """Write ``checkpoint`` with ``perm`` applied (same function) into ``out``, tensor by tensor,
    atomically, in the same shard layout with the other files copied."""
    ck = ShardedCheckpoint.open(checkpoint)
    _check(spec, ck, ck)
    check_permutation(perm, spec)
    p = {k: torch.as_tensor(v).long() for k, v in perm.items()}
    places = spec.key_places()
    return write_sharded(lambda k: _permuted(ck, k, spec, places, p), ck, out,
                         overwrite=overwrite, progress=progress,
                         metadata={"merged_by": "neuralign", "permuted": True})

