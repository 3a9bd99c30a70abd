"""Activation matching: one pass over data collecting, per group, streaming sums of the
activations of both models (means, variances, cross-products), then one LAP per group on the
correlation (Li et al.; REPAIR; SHERPA) or the cross-covariance (Git Re-Basin §3.1)."""

from __future__ import annotations

import copy
import itertools
import time

import torch
from torch import fx, nn

from neuralign.align.weight import _State, check_same_architecture, solve_lap, weight_matching
from neuralign.errors import DataError, SpecError
from neuralign.evaluation import iter_batches, to_device, use_channels_last
from neuralign.spec import spec_from_model
from neuralign.spec.core import Permutation, PermutationSpec, Probe
from neuralign.spec.trace import trace_model

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
    """Runs a (copied) model on a batch and hands each probe's activation to ``sink(name,
    activation)`` as soon as it is computed (nothing is kept here)."""

    def __init__(self, model: nn.Module, probes: list[Probe], device=None, sink=None):
        self.model = copy.deepcopy(model).eval()
        if device is not None:
            self.model.to(device)
        self.sink = sink
        node_names = {p.name for p in probes if p.kind == "node"}
        mods = dict(self.model.named_modules())
        for p in probes:
            if p.kind == "module":
                if p.name not in mods:
                    raise SpecError(f"probe module {p.name!r} is not in the model")
                mods[p.name].register_forward_hook(self._hook(p.name))
        self.runner = None
        if node_names:
            gm = trace_model(self.model)
            have = {n.name for n in gm.graph.nodes}
            missing = node_names - have
            if missing:
                raise SpecError(f"probe node {min(missing)!r} is not in the traced model; "
                                "derive the spec from this model")
            self.runner = _tapped(gm, node_names, self.sink)

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


class _Scratch:
    """Reusable float buffers for the per-batch temporaries of a statistics pass: a fresh
    multi-megabyte tensor per probe and batch costs page faults (the allocator returns large
    blocks to the system) that are a sizeable part of the pass; one buffer per shape does not."""

    def __init__(self):
        self.bufs: dict = {}

    def get(self, slot: int, rows: int, size: int, like: torch.Tensor) -> torch.Tensor:
        key = (slot, size, like.dtype, like.device)
        buf = self.bufs.get(key)
        if buf is None or buf.shape[0] < rows:
            buf = self.bufs[key] = torch.empty(rows, size, dtype=like.dtype, device=like.device)
        return buf[:rows]


class ActivationStats:
    """Streaming first and second moments of paired unit activations.

    Totals are kept in float64 about a fixed per-unit shift, each batch's sums taken in the
    activations' precision, the cross-products by GEMMs accumulating in float32 over up to
    ``FLUSH_ROWS`` rows (a batch, or several small ones) before joining the float64 total.
    When the first batch's means lie within ``RAW_MEANS`` standard deviations of zero in every
    unit (activations after ReLU or a norm layer) the shift is zero and the sums are taken on
    the raw activations (no centred copies): the
    float64 totals then lose nothing to the means. Otherwise the shift is the first batch's
    means and each batch is centred first (into ``scratch``'s reused buffers), so that large
    means cost no precision either.
    """

    RAW_MEANS = 4.0
    FLUSH_ROWS = 4096  # cross-products of up to this many rows are summed in float32 (by the
    # GEMM, as one batch of that many rows would be) before joining the float64 total: a
    # conversion and addition of the whole square per batch of a wide linear layer cost more
    # than a tenth of its pass

    def __init__(self, size: int):
        self.size, self.n = size, 0
        self.sa = self.sb = self.saa = self.sbb = self._sab = None
        self._part, self._part_rows = None, 0  # cross-products not yet in ``_sab``
        self.shift_a = self.shift_b = None
        self.raw = False

    def _flush(self) -> None:
        if self._part_rows:
            self._sab = self._sab + self._part  # not in place: may run outside inference mode
            self._part_rows = 0

    @property
    def sab(self) -> torch.Tensor | None:
        """The float64 sum of the (shifted) cross-products ``a_i b_j`` over every row seen."""
        self._flush()
        return self._sab

    def update(self, za: torch.Tensor, zb: torch.Tensor, scratch: _Scratch | None = None) -> None:
        za, zb = za.float(), zb.float()
        if self.shift_a is None:
            ma, mb = za.mean(0), zb.mean(0)
            va, vb = ((z - m).square_().mean(0) for z, m in ((za, ma), (zb, mb)))
            self.raw = bool((ma.square() <= self.RAW_MEANS ** 2 * va).all()
                            and (mb.square() <= self.RAW_MEANS ** 2 * vb).all())
            self.shift_a, self.shift_b = (torch.zeros_like(ma), torch.zeros_like(mb)) \
                if self.raw else (ma, mb)
            dev = za.device
            self.sa, self.sb, self.saa, self.sbb = (
                torch.zeros(self.size, dtype=torch.float64, device=dev) for _ in range(4))
            self._sab = torch.zeros(self.size, self.size, dtype=torch.float64, device=dev)
        scratch = scratch if scratch is not None else _Scratch()
        rows = za.shape[0]
        if self.raw:
            ca, cb = za, zb
        else:
            ca = torch.sub(za, self.shift_a, out=scratch.get(0, rows, self.size, za))
            cb = torch.sub(zb, self.shift_b, out=scratch.get(1, rows, self.size, zb))
        self.n += rows
        self.sa += ca.sum(0)
        self.sb += cb.sum(0)
        # squares into a reused buffer, then a column sum: several times cheaper than the
        # diagonal of a Gram GEMM for every width (a narrow GEMM is no faster than a wide one)
        sq = scratch.get(2, rows, self.size, za)
        self.saa += torch.mul(ca, ca, out=sq).sum(0)
        self.sbb += torch.mul(cb, cb, out=sq).sum(0)
        if self._part_rows == 0:
            self._part = torch.mm(ca.T, cb, out=self._part)
        else:
            self._part.addmm_(ca.T, cb)
        self._part_rows += rows
        if self._part_rows >= self.FLUSH_ROWS:
            self._flush()

    def _moments(self):
        if self.n == 0:
            raise DataError("no activations were recorded; is the loader empty?")
        return self.sa / self.n, self.sb / self.n

    def cov(self) -> torch.Tensor:
        ma, mb = self._moments()
        return (self.sab / self.n - torch.outer(ma, mb)).cpu()

    def corr(self) -> torch.Tensor:
        ma, mb = self._moments()
        va = (self.saa / self.n - ma * ma).clamp_min(0).cpu()
        vb = (self.sbb / self.n - mb * mb).clamp_min(0).cpu()
        denom = torch.outer(va.sqrt(), vb.sqrt())
        c = self.cov() / denom.clamp_min(1e-12)
        return torch.where(denom > 1e-12, c, torch.zeros_like(c))


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
                          *, max_batches: int | None = None, device=None):
    """One pass over ``batches`` (a loader): per group and probe, the streaming
    ``ActivationStats`` of the two models' activations. Returns ``(stats, batches seen)``.

    For each batch model A runs first and keeps its probes' outputs; model B's probes then add
    each pair to the statistics as soon as they are computed, and A's copy is dropped. Nothing
    outlives the batch."""
    probes = list(dict.fromkeys(p for g in spec.groups.values() for p in g.probes))
    dev = torch.device(device) if device is not None else next(model_a.parameters()).device
    stats = {(n, i): ActivationStats(g.size) for n, g in spec.groups.items()
             for i, _ in enumerate(g.probes)}
    users: dict[str, list] = {}
    for (n, i), st in stats.items():
        p = spec.groups[n].probes[i]
        users.setdefault(p.name, []).append((st, p))
    scratch = _Scratch()
    held: dict[str, list] = {}  # copies of A's outputs of this batch not yet paired (a module
    # called twice in a forward pairs call k of A with call k of B)
    copies: dict[tuple, torch.Tensor] = {}  # their memory, reused batch after batch: holding
    # A's own outputs through B's forward keeps a whole forward's activations alive, and the
    # fresh memory the next forward then gets from the system costs page faults that doubled
    # the time of a ResNet-20's forward; A's outputs are freed as in a plain forward instead

    def pair(name, out_b):
        out_a = held[name].pop(0)
        for st, p in users[name]:
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

    cap_a = _Capture(model_a, probes, dev, sink=hold)
    cap_b = _Capture(model_b, probes, dev, sink=pair)
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
