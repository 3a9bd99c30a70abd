"""Turn a finished trace into a PermutationSpec: leaf groups, their places (parameter axes,
tied aliases included), activation probes, and the coverage record."""

from __future__ import annotations

import math

from neuralign.spec.core import Coverage, Group, PermutationSpec, Place, Probe


def _expand(g, gid: int, outer: int, inner: int, start: int, out: list) -> None:
    r = g.find(gid)
    if r not in g.decomp:
        out.append((r, outer, inner, start))
        return
    kind, kids = g.decomp[r]
    sizes = [g.size[k] for k in kids]
    if kind == "prod":
        for i, k in enumerate(kids):
            _expand(g, k, outer * math.prod(sizes[:i]), inner * math.prod(sizes[i + 1:]), start,
                    out)
        return
    if outer != 1:  # sub-groups repeated inside an outer factor: one place per repeat
        if outer > 1024:
            for leaf in g.leaves(r):
                g.fix(leaf, "sub-groups repeated inside an outer factor")
            return
        for o in range(outer):
            _expand(g, r, 1, inner, start + o * g.size[r] * inner, out)
        return
    pos = start
    for k, s in zip(kids, sizes):
        _expand(g, k, 1, inner, pos, out)
        pos += s * inner


def _aliases(sd) -> dict[str, list[str]]:
    """State-dict keys that hold the same tensor (tied weights)."""
    by: dict[tuple, list[str]] = {}
    for k, v in sd.items():
        if hasattr(v, "data_ptr") and v.numel() > 0:
            by.setdefault((v.data_ptr(), tuple(v.shape), tuple(v.stride()), v.dtype), []).append(k)
    return {k: ks for ks in by.values() if len(ks) > 1 for k in ks}


def _kinds(g) -> dict[int, str]:
    """Leaves that are the outer factor of a product with free inner units: whole blocks
    (attention heads, groups of a grouped convolution)."""
    kinds = {}
    for (kind, kids) in g.decomp.values():
        if kind != "prod":
            continue
        for i, k in enumerate(kids[:-1]):
            inner_free = any(not g.is_fixed(x) and g.size[x] > 1 for c in kids[i + 1:]
                             for x in g.leaves(c))
            for leaf in g.leaves(k):
                if inner_free and not g.is_fixed(leaf):
                    kinds[leaf] = "heads"
    return kinds


def _probes(tr, ep, free) -> dict[int, list[Probe]]:
    """Module outputs whose axes carry free groups (forward hooks on leaf modules)."""
    last: dict[str, object] = {}
    calls: dict[str, int] = {}
    prev = None
    for node in ep.graph.nodes:
        stack = node.meta.get("nn_module_stack") if node.op == "call_function" else None
        if not stack:
            prev = None
            continue
        path, cls = list(stack.values())[-1]
        if path != prev:
            calls[path] = calls.get(path, 0) + 1
        prev = path
        last[path] = node
    rank = {"act": 0, "norm": 1, "other": 2}
    found: dict[int, list[tuple[int, Probe]]] = {}
    for path, node in last.items():
        if calls[path] != 1 or not path:
            continue
        cls = str(list(node.meta["nn_module_stack"].values())[-1][1])
        lay = tr.lay(node)
        if not isinstance(lay, tuple):
            continue
        kind = "act" if any(a in cls for a in ("ReLU", "GELU", "SiLU", "activation", "Hardswish",
                                                "Tanh", "Sigmoid", "Mish")) else \
            "norm" if "Norm" in cls else "other"
        for d, dim in enumerate(lay):
            try:
                segs = tr.g.norm(dim, strict=True)
            except ValueError:
                continue
            if len(segs) != 1:
                continue
            sizes = [n for _, n in segs[0]]
            if sum(gid is not None and tr.g.find(gid) in free for gid, _ in segs[0]) != 1:
                continue  # heads x dims: the other factor would mix samples across models
            for i, (gid, n) in enumerate(segs[0]):
                if gid is None or tr.g.find(gid) not in free:
                    continue
                p = Probe(path, d - len(lay), math.prod(sizes[:i]), math.prod(sizes[i + 1:]),
                          kind="module")
                found.setdefault(tr.g.find(gid), []).append((rank[kind], p))
    return {k: [p for _, p in sorted(v, key=lambda x: x[0])[:3]] for k, v in found.items()}


def build_spec(tr, sd, ep) -> PermutationSpec:
    g = tr.g
    expanded = []
    for gid, key, axis in tr.param_axes:
        out: list = []
        _expand(g, gid, 1, 1, 0, out)
        expanded += [(leaf, Place(key, axis, o, i, s)) for leaf, o, i, s in out]
    aliases = _aliases(sd)
    order = {k: i for i, k in enumerate(sd)}
    unit_keys = set()
    for dim in tr.units:
        for seg in dim:
            for gid, _ in seg:
                if gid is not None:
                    unit_keys.add(g.find(gid))
    places: dict[int, list[Place]] = {}
    for leaf, pl in expanded:
        r = g.find(leaf)
        if g.fixed[r] or g.size[r] < 2 or r in g.decomp:
            continue
        for key in aliases.get(pl.key, [pl.key]):
            p2 = Place(key, pl.axis, pl.outer, pl.inner, pl.start)
            lst = places.setdefault(r, [])
            if p2 not in lst:
                lst.append(p2)
    kinds = _kinds(g)
    probes = _probes(tr, ep, set(places))
    groups: dict[str, Group] = {}
    for r, pls in sorted(places.items(), key=lambda kv: min(order.get(p.key, 0) for p in kv[1])):
        pls.sort(key=lambda p: (p.axis != 0 or p.key.endswith(("running_mean", "running_var")),
                                order.get(p.key, 0)))
        base = pls[0].key.rsplit(".", 1)[0] if "." in pls[0].key else pls[0].key
        suffix = ".heads" if r in kinds else ".head_dims" if all(p.outer > 1 for p in pls) \
            else ""
        name, k = base + suffix, 2
        while name in groups:
            name, k = f"{base}{suffix}#{k}", k + 1
        groups[name] = Group(name, g.size[r], pls, probes.get(r, []), kinds.get(r, "units"))
    spec = PermutationSpec(groups, source="export")
    spec.trace_info = {"unknown_ops": dict(tr.unknown_ops)}
    spec._coverage = _coverage(tr, groups, places)
    return spec


def _frac(g, gid: int) -> float | None:
    """Share of a group's units free to move (None: not hidden units at all): sub-groups of a
    sum count by size, factors of a product by log-size."""
    r = g.find(gid)
    if r not in g.decomp:
        if g.fixed[r]:
            return None if not g.hidden[r] else 0.0
        return 1.0
    kind, kids = g.decomp[r]
    parts = [(g.size[k], _frac(g, k)) for k in kids]
    parts = [(s, f) for s, f in parts if f is not None and s > 1]
    if not parts:
        return None
    w = [s if kind == "sum" else math.log(s) for s, _ in parts]
    return sum(wi * f for wi, (_, f) in zip(w, parts)) / sum(w)


def _coverage(tr, groups, places) -> Coverage:
    """Per layer output axis (the hidden units), how much of it is free to move."""
    g = tr.g
    name_of = {r: n for n, r in zip(groups, places)}
    rows: dict[int, tuple] = {}
    seen = set()
    total = free = 0.0
    for dim in tr.units:
        factors = [(gid, n) for seg in dim for gid, n in seg if n > 1]
        key = tuple((g.find(gid) if gid is not None else None, n) for gid, n in factors)
        if not factors or key in seen:
            continue
        seen.add(key)
        n = sum(math.prod(s for _, s in seg) for seg in dim)
        fr = [(_frac(g, gid) if gid is not None else 0.0, m) for gid, m in factors]
        fr = [(f, m) for f, m in fr if f is not None]
        if not fr:
            continue
        w = [math.log(m) for _, m in fr]
        total += n
        free += n * sum(wi * f for wi, (f, _) in zip(w, fr)) / sum(w)
        for gid, _ in factors:
            if gid is None:
                continue
            for x in g.leaves(gid):
                if g.size[x] > 1 and not (g.fixed[x] and not g.hidden[x]):
                    rows[x] = (g.size[x], g.reason[x] if g.fixed[x] else None)
    out = [{"name": name_of.get(x, g.name[x]), "size": s, "free": why is None,
            "reason": why} for x, (s, why) in rows.items()]
    return Coverage(out, free / total if total else 0.0, round(free), int(total))
