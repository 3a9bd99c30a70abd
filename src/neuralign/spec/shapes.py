"""Layout propagation through shape operations: reshape/view, broadcasting, cat, split, slice."""

from __future__ import annotations

import math

from neuralign.spec.layout import Dim, Groups, const, dim_len, seg_len

Layout = tuple  # tuple[Dim, ...], one per tensor axis


def const_layout(shape) -> Layout:
    return tuple(const(int(n)) for n in shape)


def _merge(g: Groups, a: Dim, b: Dim, reason: str) -> Dim:
    """Axis ``a`` (outer) and ``b`` (inner) flattened into one."""
    b = g.norm(b)
    if len(b) != 1:
        g.fix_dim(b, reason)
        b = const(dim_len(b))
    return tuple(s + b[0] for s in g.norm(a))


def _split(g: Groups, d: Dim, sizes: list[int], reason: str) -> list[Dim]:
    """One axis viewed as several (row-major ``sizes``)."""
    sizes = [int(s) for s in sizes]
    if len(sizes) == 1:
        return [d]
    d = g.norm(d)
    n = dim_len(d)
    if len(d) > 1:
        inner = math.prod(sizes[1:])
        k = n // inner
        if k > 4096:
            g.fix_dim(d, reason)
            return [const(s) for s in sizes]
        d = g.cut(d, [i * inner for i in range(1, k)])
        if len(d) != k or any(seg_len(s) != inner for s in d):
            g.fix_dim(d, reason)
            return [const(s) for s in sizes]
        first = (d[0],)
        for s in d[1:]:  # the outer axis indexes the segments: they must move alike
            first = g.unify(first, (s,), reason)
        first = g.norm(first)
        if len(first) != 1:
            g.fix_dim(first, reason)
            return [const(s) for s in sizes]
        d = (((None, k),) + first[0],)
    parts = g.refine(d[0], sizes)
    if parts is None:
        g.fix_dim(d, reason)
        return [const(s) for s in sizes]
    return [(p,) for p in parts]


def reshape(g: Groups, lay: Layout, in_shape, out_shape, reason: str) -> Layout:
    in_shape, out_shape = [int(s) for s in in_shape], [int(s) for s in out_shape]
    if in_shape == out_shape:
        return lay
    if math.prod(in_shape) == 0:
        return const_layout(out_shape)
    out: list[Dim] = []
    i = j = 0
    while i < len(in_shape) or j < len(out_shape):
        if j < len(out_shape) and out_shape[j] == 1 and (i >= len(in_shape) or
                                                         in_shape[i] != 1):
            out.append(const(1))
            j += 1
            continue
        if i < len(in_shape) and in_shape[i] == 1 and (j >= len(out_shape) or
                                                       out_shape[j] != 1):
            i += 1
            continue
        i0, j0 = i, j
        pi, pj = in_shape[i], out_shape[j]
        i, j = i + 1, j + 1
        while pi != pj:
            if pi < pj:
                pi *= in_shape[i]
                i += 1
            else:
                pj *= out_shape[j]
                j += 1
        merged = lay[i0]
        for k in range(i0 + 1, i):
            merged = _merge(g, merged, lay[k], reason)
        out += _split(g, merged, out_shape[j0:j], reason)
    return tuple(out)


def broadcast(g: Groups, items, out_shape, reason: str) -> Layout:
    """Elementwise operands ``[(layout, shape), ...]`` broadcast to ``out_shape``: every axis
    they share carries one permutation."""
    nd = len(out_shape)
    out = []
    for k in range(nd):
        n = int(out_shape[k])
        cur = None
        for lay, shape in items:
            kk = k - (nd - len(shape))
            if kk < 0 or int(shape[kk]) != n or n == 1:
                continue
            cur = lay[kk] if cur is None else g.unify(cur, lay[kk], reason)
        out.append(cur if cur is not None else const(n))
    return tuple(out)


def take(g: Groups, d: Dim, start: int, stop: int, reason: str) -> Dim:
    """The layout of ``[start, stop)`` of an axis."""
    n = dim_len(d)
    if start <= 0 and stop >= n:
        return d
    d = g.cut(d, [start, stop])
    out, pos = [], 0
    for s in d:
        if start <= pos and pos + seg_len(s) <= stop:
            out.append(s)
        pos += seg_len(s)
    if sum(seg_len(s) for s in out) != stop - start:
        g.fix_dim(d, reason)
        return const(stop - start)
    return tuple(out)
