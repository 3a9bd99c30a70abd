"""Activation matching: one pass over data collecting, per group, streaming sums of the
activations of both models (means, variances, cross-products), then one LAP per group on the
correlation (Li et al.; REPAIR; SHERPA) or the cross-covariance (Git Re-Basin §3.1)."""

from __future__ import annotations

import copy
import itertools
import time

import torch
from torch import fx, nn

from neuralign.align._affine_probes import batchnorm_children, bn_scale_shift
from neuralign.align.moments import ActivationStats, _Scratch
from neuralign.align.weight import _State, check_same_architecture, solve_lap, weight_matching
from neuralign.errors import DataError, SpecError
from neuralign.evaluation import iter_batches, to_device, use_channels_last
from neuralign.spec import spec_from_model
from neuralign.spec.core import Permutation, PermutationSpec, Probe
from neuralign.spec.trace import trace_model
from neuralign.utils import eval_mode

__all__ = ["ActivationStats", "activation_matching", "activation_statistics", "first_input"]


def first_input(batch):
    """The input tensor of a loader batch: ``x`` or ``(x, y, ...)``."""
    if isinstance(batch, (tuple, list)):
        batch = batch[0]
    if isinstance(batch, dict):
        return batch
    if not isinstance(batch, torch.Tensor):
        raise DataError(f"the loader yields {type(batch).__name__}; expected tensors or "
                        "(inputs, targets) tuples")
    return batch


def _units(t: torch.Tensor, probe: Probe, size: int) -> torch.Tensor:
    """``(samples, size)`` view of an activation: every index but the unit's is a sample."""
    if isinstance(t, (tuple, list)):
        t = t[0]
    dim = probe.dim % t.dim()
    shape = tuple(t.shape[:dim]) + (probe.outer, size, probe.inner) + tuple(t.shape[dim + 1:])
    if t.shape[dim] != probe.outer * size * probe.inner:
        raise SpecError(f"probe {probe.name!r} has {t.shape[dim]} units on dim {dim}, the spec "
                        f"expects {probe.outer * size * probe.inner}")
    return t.reshape(shape).movedim(dim + 1, -1).reshape(-1, size)


class _Tap(nn.Module):
    """Inserted after each probed node of the traced model: hands the value to ``sink``."""

    def __init__(self, sink):
        super().__init__()
        self.sink = sink

    def forward(self, value, name: str):
        self.sink(name, value)
        return value


def _tapped(gm: fx.GraphModule, names: set[str], sink) -> fx.GraphModule:
    """``gm`` with a call to a ``_Tap`` after every node in ``names`` (compiled Python code,
    no per-node interpretation)."""
    gm.add_submodule("_neuralign_tap", _Tap(sink))
    for node in list(gm.graph.nodes):
        if node.name in names:
            with gm.graph.inserting_after(node):
                gm.graph.call_module("_neuralign_tap", (node, node.name))
    gm.recompile()
    return gm


class _Capture:
    """Runs a model on a batch and hands each probe's activation to ``sink(name, activation)``
    as soon as it is computed (nothing is kept here).

    The model is used in place (no copy: copying cost a tenth of a small model's pass), in
    eval mode, with hooks that :meth:`close` removes, restoring every module's mode; it is
    copied only to move it to ``device`` or when ``copy_model`` is set (a model that shares modules
    with the other one of the pair: each needs its own hooks)."""

    def __init__(self, model: nn.Module, probes: list[Probe], device=None, sink=None,
                 groups: dict | None = None, copy_model: bool = False):
        """``groups`` (``{name: (size, probes)}``): find the probes whose statistics are
        derivable (``derivable``); :meth:`start` then taps the others."""
        dev = torch.device(device) if device is not None else None
        if copy_model or any(dev is not None and t.device != dev
                             for t in itertools.chain(model.parameters(), model.buffers())):
            model = copy.deepcopy(model)
            if device is not None:
                model.to(device)
        self.model = model
        self._restore = eval_mode(model)
        self._handles: list = []
        self.sink = sink
        node_names = {p.name for p in probes if p.kind == "node"}
        self.derivable: dict[str, tuple[str, str]] = {}
        self.derived: dict[str, tuple[str, str]] = {}  # set by _stream
        self.users: dict[str, list] = {}  # set by _stream
        mods = dict(self.model.named_modules())
        self._hooked = {p.name for p in probes if p.kind == "module"}
        missing = self._hooked - set(mods)
        if missing:
            self.close()
            raise SpecError(f"probe module {min(missing)!r} is not in the model")
        self.runner = self._gm = None
        gm = None
        if node_names:
            gm = trace_model(self.model)
            have = {n.name for n in gm.graph.nodes}
            missing = node_names - have
            if missing:
                self.close()
                raise SpecError(f"probe node {min(missing)!r} is not in the traced model; "
                                "derive the spec from this model")
            self._gm, self._names = gm, node_names
        elif groups is not None and any(isinstance(mods[n], nn.modules.batchnorm._BatchNorm)
                                        for n in self._hooked):
            try:  # only to find which hooked batch norms follow which probes
                gm = trace_model(self.model)
            except Exception:  # noqa: BLE001 - untraceable: every probe is measured
                gm = None
        if gm is not None and groups is not None:
            self.derivable = batchnorm_children(gm, groups)

    def start(self, skip=()) -> _Capture:
        """Tap and hook every probe but ``skip`` (whose statistics are derived instead)."""
        mods = dict(self.model.named_modules())
        for name in sorted(self._hooked - set(skip)):
            self._handles.append(mods[name].register_forward_hook(self._hook(name)))
        if self._gm is not None:
            self.runner = _tapped(self._gm, self._names - set(skip), self.sink)
        return self

    def close(self) -> None:
        """Remove the hooks and restore the modules' modes."""
        for h in self._handles:
            h.remove()
        self._handles.clear()
        self._restore()

    def _hook(self, name):
        def fn(_m, _i, out):
            self.sink(name, out)
        return fn

    def __call__(self, x) -> None:
        with torch.inference_mode():
            if self.runner is not None:
                self.runner(x)
            else:
                self.model(**x) if isinstance(x, dict) else self.model(x)


def _stream(cap_a: _Capture, cap_b: _Capture, stats: dict, spec: PermutationSpec, batches,
            max_batches: int | None, dev: torch.device, held: dict) -> int:
    """Start both captures (the derivable probes skipped) and run every batch through A, then
    B; returns the number of batches. Sets ``cap_a.derived`` (probe: (source probe, batch
    norm)) and ``cap_b.users`` (probe: [(statistics, probe)] it updates)."""
    derived = {k: v for k, v in cap_a.derivable.items() if cap_b.derivable.get(k) == v}
    derived = {k: v for k, v in derived.items() if v[0] not in derived}  # measured inputs only
    cap_a.derived = derived
    cap_a.start(derived), cap_b.start(derived)
    users: dict[str, list] = {}
    for (n, i), st in stats.items():
        p = spec.groups[n].probes[i]
        if p.name not in derived:
            users.setdefault(p.name, []).append((st, p))
    cap_b.users = users
    cl = use_channels_last(None, dev)
    seen = 0
    for b in iter_batches(batches):
        if max_batches is not None and seen >= max_batches:
            break
        x = first_input(b)
        x = (to_device(x, dev, cl) if isinstance(x, torch.Tensor)
             else {k: v.to(dev) for k, v in x.items()})
        _run_batch(cap_a, x, "A")
        _run_batch(cap_b, x, "B")
        held.clear()
        seen += 1
    return seen


def _run_batch(capture, x, which):
    try:
        return capture(x)
    except (SpecError, DataError):
        raise
    except Exception as exc:  # noqa: BLE001
        shape = tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__
        raise DataError(f"model {which} cannot run on a loader batch of shape {shape} "
                        f"({type(exc).__name__}: {str(exc).splitlines()[0][:120]})") from None


def activation_statistics(model_a: nn.Module, model_b: nn.Module, batches, spec: PermutationSpec,
                          *, max_batches: int | None = None, device=None, derive: bool = True):
    """One pass over ``batches`` (a loader): per group and probe, the streaming
    ``ActivationStats`` of the two models' activations. Returns ``(stats, batches seen)``.

    ``derive``: a probe that is an eval-mode batch norm of another probe of its group is not
    measured; its statistics follow exactly from its input's (``ActivationStats.affine``; equal
    up to float rounding). ``False`` measures every probe.

    For each batch model A runs first and keeps its probes' outputs; model B's probes then add
    each pair to the statistics as soon as they are computed, and A's copy is dropped. Nothing
    outlives the batch."""
    probes = list(dict.fromkeys(p for g in spec.groups.values() for p in g.probes))
    dev = torch.device(device) if device is not None else next(model_a.parameters()).device
    stats = {(n, i): ActivationStats(g.size) for n, g in spec.groups.items()
             for i, _ in enumerate(g.probes)}
    groups = {n: (g.size, list(g.probes)) for n, g in spec.groups.items()} if derive else None
    scratch = _Scratch()
    held: dict[str, list] = {}  # copies of A's outputs of this batch not yet paired (a module
    # called twice in a forward pairs call k of A with call k of B)
    copies: dict[tuple, torch.Tensor] = {}  # their memory, reused batch after batch: holding
    # A's own outputs through B's forward keeps a whole forward's activations alive, and the
    # fresh memory the next forward then gets from the system costs page faults that doubled
    # the time of a ResNet-20's forward; A's outputs are freed as in a plain forward instead

    def pair(name, out_b):
        out_a = held[name].pop(0)
        for st, p in cap_b.users[name]:
            st.update(_units(out_a, p, st.size), _units(out_b, p, st.size), scratch)

    def hold(name, out_a):
        if isinstance(out_a, (tuple, list)):
            out_a = out_a[0]
        calls = held.setdefault(name, [])
        key = (name, len(calls))
        buf = copies.get(key)
        if (buf is None or buf.shape != out_a.shape or buf.stride() != out_a.stride()
                or buf.dtype != out_a.dtype or buf.device != out_a.device):
            buf = copies[key] = torch.empty_like(out_a)
        calls.append(buf.copy_(out_a))

    shared = not {id(m) for m in model_a.modules()}.isdisjoint(map(id, model_b.modules()))
    cap_a = _Capture(model_a, probes, dev, sink=hold, groups=groups)
    try:
        cap_b = _Capture(model_b, probes, dev, sink=pair, groups=groups, copy_model=shared)
    except BaseException:
        cap_a.close()
        raise
    try:
        seen = _stream(cap_a, cap_b, stats, spec, batches, max_batches, dev, held)
    finally:
        cap_a.close(), cap_b.close()
    derived = cap_a.derived
    for (n, i) in stats:
        p = spec.groups[n].probes[i]
        if p.name in derived:
            src, bn = derived[p.name]
            j = next(j for j, q in enumerate(spec.groups[n].probes)
                     if q.name == src and q.dim == p.dim)
            stats[(n, i)] = stats[(n, j)].affine(*bn_scale_shift(cap_a.model.get_submodule(bn)),
                                                 *bn_scale_shift(cap_b.model.get_submodule(bn)))
    return stats, seen


def activation_matching(model_a: nn.Module, model_b: nn.Module, loader, method: str = "corr",
                        spec: PermutationSpec | None = None, *, max_batches: int | None = None,
                        seed: int = 0, device=None, tie_break: float = 1e-4) -> Permutation:
    """Permutation aligning ``model_b`` to ``model_a`` from their activations on ``loader``.

    One pass; per group, sums over the probes of the group of the correlation (``"corr"``) or
    cross-covariance (``"cov"``) matrices; one LAP per group. Groups without probes (attention
    heads) are solved by weight matching with the others fixed. Models are not modified.

    ``tie_break``: units whose activations do not tell them apart (dead ReLUs: zero variance)
    are matched by weight similarity, added with this relative weight to the normalised
    activation scores (two refinement sweeps; 0 disables).
    """
    if method not in ("corr", "cov"):
        raise ValueError(f"method must be 'corr' or 'cov', got {method!r}")
    t0 = time.perf_counter()
    check_same_architecture(model_a.state_dict(), model_b.state_dict())
    it = iter_batches(loader)
    try:
        batch = next(it)
    except StopIteration:
        raise DataError("the loader is empty; activation matching needs data") from None
    x0 = first_input(batch)
    if spec is None:
        spec = spec_from_model(model_a, x0 if not isinstance(x0, dict) else None)
    dev = torch.device(device) if device is not None else next(model_a.parameters()).device
    t_pass = time.perf_counter()
    stats, batches = activation_statistics(model_a, model_b, itertools.chain([batch], it), spec,
                                           max_batches=max_batches, device=dev)
    t_pass = time.perf_counter() - t_pass
    perm = Permutation.identity(spec)
    scores: dict[str, torch.Tensor] = {}
    before, after = {}, {}
    for n, g in spec.groups.items():
        if not g.probes:
            continue
        mats = [stats[(n, i)].corr() if method == "corr" else stats[(n, i)].cov()
                for i in range(len(g.probes))]
        s = torch.stack(mats).sum(0) / len(mats)
        scores[n] = s
        perm[n] = solve_lap(s)
    if tie_break > 0 and scores:
        perm = _tie_break(spec, model_a, model_b, perm, scores, tie_break)
    for n, s in scores.items():
        idx = torch.arange(spec.groups[n].size)
        before[n] = float(s[idx, idx].mean())
        after[n] = float(s[idx, perm[n]].mean())
    rest = [n for n, g in spec.groups.items() if not g.probes]
    if rest:
        wm = weight_matching(spec, model_a, model_b, init=perm, groups=rest, seed=seed)
        perm.update({n: wm[n] for n in rest})
    perm.info = {"method": f"activation-{method}", "batches": batches,
                 "samples": next(iter(stats.values())).n if stats else 0,
                 "score_before": before, "score_after": after,
                 "objective_init": sum(before.values()) / max(len(before), 1),
                 "objective": sum(after.values()) / max(len(after), 1),
                 "weight_matched_groups": rest, "time_s": time.perf_counter() - t0,
                 "statistics_time_s": t_pass}
    return perm


def _tie_break(spec, model_a, model_b, perm, scores, tau, sweeps=2):
    st = _State(spec, model_a.state_dict(), model_b.state_dict(), perm)
    for _ in range(sweeps):
        for n, s in scores.items():
            sw = st.score(n)
            if sw is None:
                continue
            sa = s[:, st.perm[n]].to(sw.device, torch.float64)
            comb = sa / sa.abs().max().clamp_min(1e-30) + tau * sw.double() / sw.abs().max(
            ).clamp_min(1e-30)
            rel = solve_lap(comb)
            st._take(n, rel)
            st.perm[n] = st.perm[n][rel]
    return Permutation(st.perm)
