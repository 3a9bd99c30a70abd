"""Unit layouts of tensor axes, and the union-find of permutation groups behind them.

Every axis of every tensor in a traced graph has a *layout*: a tuple of segments laid end to end
(``torch.cat`` makes several), each segment a tuple of factors in row-major order, each factor
``(gid, size)``: ``gid`` a group whose permutation acts on that factor, or ``None`` for a factor
no permutation may touch (batch, space, tokens). A plain channel axis is ``(((g, C),),)``; a
flattened conv output ``(((g, C), (None, H*W)),)``; attention heads ``(((h, H), (d, Dh)),)``.

Groups live in :class:`Groups`, a union-find. Two axes that must carry the same permutation are
*unified* (their groups merged); an axis that meets something that cannot be permuted is
*fixed* (identity) with a reason. A group can be *decomposed* when an operation needs its units
in finer pieces: ``prod`` (a row-major product: heads x dims, groups of a grouped convolution)
or ``sum`` (consecutive sub-groups: q | k | v of a packed projection, ``split``/``chunk``).
Both only ever restrict the permutations a group may take, so every step keeps the spec exact.
"""

from __future__ import annotations

import itertools
import math

Factor = tuple  # (gid | None, size)
Segment = tuple  # tuple[Factor, ...]
Dim = tuple  # tuple[Segment, ...]


class Groups:
    def __init__(self) -> None:
        self.parent: list[int] = []
        self.size: list[int] = []
        self.fixed: list[bool] = []
        self.reason: list[str | None] = []
        self.hidden: list[bool] = []  # False: fixed because it is not a hidden unit (I/O, kernel)
        self.decomp: dict[int, tuple[str, list[int]]] = {}
        self.owner: dict[int, int] = {}  # child -> the group it was decomposed from
        self.piece_subs: dict[int, list[dict[int, int]]] = {}
        self.name: list[str] = []

    # basic union-find --------------------------------------------------------------------
    def new(self, size: int, name: str = "", fixed: bool = False, reason: str | None = None,
            hidden: bool = True) -> int:
        self.parent.append(len(self.parent))
        self.size.append(size)
        self.fixed.append(fixed)
        self.reason.append(reason if fixed else None)
        self.hidden.append(hidden)
        self.name.append(name)
        return len(self.parent) - 1

    def find(self, g: int) -> int:
        root = g
        while self.parent[root] != root:
            root = self.parent[root]
        while self.parent[g] != root:
            self.parent[g], g = root, self.parent[g]
        return root

    def is_fixed(self, g: int) -> bool:
        return self.fixed[self.find(g)]

    def fix(self, g: int, reason: str, hidden: bool = True) -> None:
        r = self.find(g)
        if r in self.decomp:
            for c in self.decomp[r][1]:
                self.fix(c, reason, hidden)
        if not self.fixed[r]:
            self.fixed[r], self.reason[r], self.hidden[r] = True, reason, hidden

    def union(self, a: int, b: int) -> int:
        ra, rb = self.find(a), self.find(b)
        if ra == rb:
            return ra
        assert ra not in self.decomp and rb not in self.decomp, "unify leaves only"
        assert self.size[ra] == self.size[rb], "unify groups of one size"
        lo, hi = min(ra, rb), max(ra, rb)
        self.parent[hi] = lo
        if self.fixed[hi] and not self.fixed[lo]:
            self.fixed[lo] = True
            self.reason[lo], self.hidden[lo] = self.reason[hi], self.hidden[hi]
        return lo

    def decompose(self, g: int, kind: str, sizes: list[int]) -> list[int]:
        r = self.find(g)
        assert r not in self.decomp
        assert (math.prod(sizes) if kind == "prod" else sum(sizes)) == self.size[r]
        kids = [self.new(s, self.name[r], self.fixed[r], self.reason[r], self.hidden[r])
                for s in sizes]
        self.decomp[r] = (kind, kids)
        for k in kids:
            self.owner[k] = r
        return kids

    def pieces(self, a: int) -> list[dict[int, int]] | None:
        """Selecting index i of the outer factor ``a`` of a fresh product (the q | k | v axis of
        a packed projection, viewed as (3, heads, dims)): re-decompose the product as a sum of
        per-piece products, so each piece gets its own groups. Returns, per index, the map
        from the old inner factors to the piece's; None when ``a`` is not such a factor."""
        a = self.find(a)
        if a in self.piece_subs:
            return self.piece_subs[a]
        r = self.owner.get(a)
        if r is None or self.find(r) != r or self.fixed[r] or self.decomp[r][0] != "prod":
            return None
        kids = self.decomp[r][1]
        if kids[0] != a or len(kids) < 2:
            return None
        for x in kids:
            if self.find(x) != x or x in self.decomp or self.fixed[x]:
                return None
        if any(self.parent[y] in kids and y not in kids for y in range(len(self.parent))):
            return None  # something was unified with a factor: keep the product
        rest = kids[1:]
        subs, parts = [], []
        for _ in range(self.size[a]):
            p = self.new(self.size[r] // self.size[a], self.name[r])
            new = self.decompose(p, "prod", [self.size[x] for x in rest]) if len(rest) > 1 \
                else [p]
            subs.append(dict(zip(rest, new)))
            parts.append(p)
            self.owner[p] = r
        self.decomp[r] = ("sum", parts)
        for x in kids:  # stale: any later use of them is fixed, never silently free
            self.fix(x, "replaced by per-piece groups", hidden=False)
        self.piece_subs[a] = subs
        return subs

    def substitute(self, dim: Dim, sub: dict[int, int]) -> Dim:
        return tuple(tuple((sub.get(self.find(g), g) if g is not None else None, n)
                           for g, n in seg) for seg in dim)

    def leaves(self, g: int) -> list[int]:
        r = self.find(g)
        if r not in self.decomp:
            return [r]
        return [x for c in self.decomp[r][1] for x in self.leaves(c)]

    def fix_dim(self, dim: Dim, reason: str, hidden: bool = True) -> None:
        for seg in dim:
            for gid, _ in seg:
                if gid is not None:
                    self.fix(gid, reason, hidden)

    # layouts -----------------------------------------------------------------------------
    def norm_seg(self, seg: Segment, strict: bool = False) -> list[Segment]:
        """Expand decomposed groups; a ``sum`` decomposition splits the segment when it is the
        leading factor, otherwise (units not contiguous) its sub-groups are fixed."""
        out: list[Factor] = []
        for i, (gid, size) in enumerate(seg):
            if size == 1:
                continue
            if gid is None:
                if out and out[-1][0] is None:
                    out[-1] = (None, out[-1][1] * size)
                else:
                    out.append((None, size))
                continue
            r = self.find(gid)
            if r in self.decomp:
                kind, kids = self.decomp[r]
                if kind == "prod":
                    return self.norm_seg(tuple(out) + tuple((k, self.size[k]) for k in kids)
                                         + tuple(seg[i + 1:]), strict)
                if not out:
                    segs = []
                    for k in kids:
                        segs += self.norm_seg(((k, self.size[k]),) + tuple(seg[i + 1:]), strict)
                    return segs
                if strict:  # a read-only look (probes) must not restrict anything
                    raise ValueError("split group inside another factor")
                self.fix(r, "a split group appears inside another factor")
                out.append((None, size))
                continue
            out.append((r, size))
        return [tuple(out)] if out else [((None, 1),)]

    def norm(self, dim: Dim, strict: bool = False) -> Dim:
        return tuple(s for seg in dim for s in self.norm_seg(seg, strict))

    def cut(self, dim: Dim, offsets) -> Dim:
        """The same axis with segment boundaries at ``offsets`` (splitting groups as needed)."""
        dim = self.norm(dim)
        for _ in range(64):
            bounds = _bounds(dim)
            todo = [c for c in offsets if 0 < c < bounds[-1] and c not in bounds]
            if not todo:
                return dim
            c = todo[0]
            i = max(j for j, b in enumerate(bounds) if b < c)
            seg, rel = dim[i], c - bounds[i]
            (gid, n), rest = seg[0], seg[1:]
            stride = math.prod(s for _, s in rest)
            if rel % stride == 0:
                a = rel // stride
                if gid is None:
                    new = [((None, a),) + rest, ((None, n - a),) + rest]
                else:
                    ka, kb = self.decompose(gid, "sum", [a, n - a])
                    new = [((ka, a),) + rest, ((kb, n - a),) + rest]
            else:
                self.fix_dim((seg,), "split inside a unit's block")
                new = [((None, rel),), ((None, seg_len(seg) - rel),)]
            dim = self.norm(dim[:i] + tuple(new) + dim[i + 1:])
        raise RuntimeError("layout cut did not converge")

    def refine(self, seg: Segment, sizes: list[int]) -> list[Segment] | None:
        """Split one segment's factors at the boundaries of a row-major ``sizes``; None when
        the boundaries do not nest (the caller fixes)."""
        seg = tuple(f for f in seg if f[1] != 1)
        left = [1]
        for _, s in seg:
            left.append(left[-1] * s)
        want = [1]
        for s in sizes:
            want.append(want[-1] * s)
        bounds = sorted(set(left) | set(want))
        if any(b2 % b1 for b1, b2 in itertools.pairwise(bounds)):
            return None
        out: list[Factor] = []
        for (gid, s), lo, hi in zip(seg, left, left[1:]):
            inner = [b for b in bounds if lo < b < hi]
            if not inner:
                out.append((gid, s))
                continue
            pts = [lo] + inner + [hi]
            parts = [b // a for a, b in itertools.pairwise(pts)]
            if gid is None:
                out += [(None, p) for p in parts]
            else:
                out += list(zip(self.decompose(gid, "prod", parts), parts))
        res, i, acc = [], 0, 1
        for s in sizes:
            cur: list[Factor] = []
            target = acc * s
            while i < len(out) and acc < target:
                cur.append(out[i])
                acc *= out[i][1]
                i += 1
            res.append(tuple(cur) if cur else ((None, 1),))
        return res

    def unify(self, a: Dim, b: Dim, reason: str) -> Dim:
        """Make two axes of one size carry the same permutation; returns the common layout."""
        if dim_len(a) != dim_len(b):
            raise ValueError("unify axes of different sizes")
        for _ in range(8):
            a, b = self.norm(a), self.norm(b)
            cuts = set(_bounds(a)) | set(_bounds(b))
            a, b = self.cut(a, cuts), self.cut(b, cuts)
            if _bounds(a) == _bounds(b):
                break
        else:
            self.fix_dim(a, reason)
            self.fix_dim(b, reason)
            return const(dim_len(a))
        for sa, sb in zip(a, b):
            ra = self.refine(sa, [n for _, n in sb])
            sa2 = tuple(f for r in ra for f in r) if ra is not None else None
            rb = self.refine(sb, [n for _, n in sa2]) if sa2 is not None else None
            sb2 = tuple(f for r in rb for f in r) if rb is not None else None
            if sb2 is not None:
                sa2 = tuple(f for f in sa2 if f[1] != 1)
                sb2 = tuple(f for f in sb2 if f[1] != 1)
            if sb2 is None or [n for _, n in sa2] != [n for _, n in sb2] or any(
                    g is not None and self.find(g) in self.decomp for g, _ in sa2 + sb2):
                for s in (sa, sb):
                    for g, _ in s:
                        if g is not None:
                            self.fix(g, reason)
                continue
            for (ga, _), (gb, _) in zip(sa2, sb2):
                if ga is not None and gb is not None:
                    self.union(ga, gb)
                elif ga is not None:
                    self.fix(ga, reason)
                elif gb is not None:
                    self.fix(gb, reason)
        return self.norm(a)


def const(n: int) -> Dim:
    return (((None, n),),)


def seg_len(seg: Segment) -> int:
    return math.prod(s for _, s in seg)


def dim_len(dim: Dim) -> int:
    return sum(seg_len(s) for s in dim)


def _bounds(dim: Dim) -> list[int]:
    out = [0]
    for s in dim:
        out.append(out[-1] + seg_len(s))
    return out


def is_const(groups: Groups, dim: Dim) -> bool:
    return all(gid is None for seg in groups.norm(dim) for gid, _ in seg)
