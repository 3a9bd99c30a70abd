"""Rules for the ATen operations that move axes around: views, permutes, cat, split, slicing,
indexing and expansion."""

from __future__ import annotations

from neuralign.spec.layout import const, dim_len
from neuralign.spec.rules import RULES, rule, unknown
from neuralign.spec.shapes import broadcast, const_layout, reshape, take


@rule("view", "reshape", "_unsafe_view", "flatten", "unflatten", "squeeze", "squeeze_",
      "unsqueeze", "unsqueeze_", "view_as", "reshape_as", "_reshape_alias", "view_copy",
      "pixel_shuffle_never")
def _view(t, node):
    x = node.args[0]
    return reshape(t.g, t.lay(x), t.shape(x), t.shape(node), f"{t.opname(node)} mixes an axis of "
                   "units with others")


@rule("permute", "permute_copy")
def _permute(t, node):
    lay = t.lay(node.args[0])
    dims = [d % len(lay) for d in node.args[1]]
    return tuple(lay[d] for d in dims)


@rule("transpose", "transpose_", "swapaxes", "swapdims")
def _transpose(t, node):
    lay = list(t.lay(node.args[0]))
    a, b = (d % len(lay) for d in node.args[1:3])
    lay[a], lay[b] = lay[b], lay[a]
    return tuple(lay)


@rule("t", "numpy_T")
def _t(t, node):
    return tuple(reversed(t.lay(node.args[0])))


@rule("movedim")
def _movedim(t, node):
    lay = list(t.lay(node.args[0]))
    src, dst = node.args[1], node.args[2]
    src = [src] if isinstance(src, int) else list(src)
    dst = [dst] if isinstance(dst, int) else list(dst)
    n = len(lay)
    order = [None] * n
    for s, d in zip(src, dst):
        order[d % n] = s % n
    rest = iter([i for i in range(n) if i not in {s % n for s in src}])
    return tuple(lay[o if o is not None else next(rest)] for o in order)


def wild(t, n: int):
    """An axis along which the tensor is constant (broadcast, tiled, filled): any permutation
    leaves it unchanged, so it may carry any group (a fresh free group without places)."""
    return const(n) if n < 2 else (((t.g.new(n, "broadcast"), n),),)


@rule("expand", "expand_as", "broadcast_to", "expand_copy")
def _expand(t, node):
    lay, shape = t.lay(node.args[0]), t.shape(node.args[0])
    out = t.shape(node)
    extra = len(out) - len(shape)
    res = [wild(t, int(n)) for n in out[:extra]]
    for k, n in enumerate(shape):
        res.append(lay[k] if int(n) == int(out[extra + k]) else wild(t, int(out[extra + k])))
    return tuple(res)


@rule("repeat", "tile")
def _repeat(t, node):
    lay, shape = t.lay(node.args[0]), t.shape(node.args[0])
    out = t.shape(node)
    extra = len(out) - len(shape)
    res = [wild(t, int(n)) for n in out[:extra]]
    for k, n in enumerate(shape):
        m = int(out[extra + k])
        res.append(lay[k] if m == int(n) else reshape(
            t.g, (wild(t, m // int(n)), lay[k]), (m // int(n), int(n)), (m,), "repeat")[0])
    return tuple(res)


@rule("cat", "concat", "concatenate")
def _cat(t, node):
    xs = [x for x in node.args[0] if hasattr(x, "op")]
    dim = node.args[1] if len(node.args) > 1 else node.kwargs.get("dim", 0)
    xs = [x for x in xs if not (len(t.shape(x)) == 1 and int(t.shape(x)[0]) == 0)]
    out = t.shape(node)
    dim %= len(out)
    res = list(t.lay(xs[0]))
    for x in xs[1:]:
        lay = t.lay(x)
        for k in range(len(out)):
            if k != dim:
                res[k] = t.g.unify(res[k], lay[k], "concatenated tensors")
    res[dim] = tuple(s for x in xs for s in t.g.norm(t.lay(x)[dim]))
    return tuple(res)


@rule("stack")
def _stack(t, node):
    xs = node.args[0]
    dim = node.args[1] if len(node.args) > 1 else node.kwargs.get("dim", 0)
    out = t.shape(node)
    dim %= len(out)
    res = broadcast(t.g, [(t.lay(x), t.shape(x)) for x in xs], t.shape(xs[0]), "stacked tensors")
    return tuple(res[:dim]) + (const(int(out[dim])),) + tuple(res[dim:])


def _pieces(t, node, sizes, dim):
    lay = t.lay(node.args[0])
    d, pos, outs = lay[dim], 0, []
    for s in sizes:
        piece = take(t.g, d, pos, pos + s, f"{t.opname(node)} cuts inside a group of units")
        outs.append(tuple(lay[:dim]) + (piece,) + tuple(lay[dim + 1:]))
        pos += s
    return outs


@rule("split", "split_with_sizes", "chunk", "unsafe_split", "unsafe_chunk", "tensor_split",
      "split_copy")
def _split(t, node):
    outs = t.shape(node)
    if not isinstance(outs, list):
        return unknown(t, node)
    name = t.opname(node)
    if name in ("chunk", "unsafe_chunk", "split", "unsafe_split", "split_with_sizes",
                "split_copy"):
        dim = node.args[2] if len(node.args) > 2 else node.kwargs.get("dim", 0)
    else:
        return unknown(t, node)
    dim %= len(t.shape(node.args[0]))
    lay = t.lay(node.args[0])
    if lay is None:
        return unknown(t, node)
    return _pieces(t, node, [int(o[dim]) for o in outs], dim)


@rule("unbind")
def _unbind(t, node):
    lay = t.lay(node.args[0])
    dim = node.args[1] if len(node.args) > 1 else node.kwargs.get("dim", 0)
    dim %= len(lay)
    rest = tuple(lay[:dim]) + tuple(lay[dim + 1:])
    subs = _piece_subs(t, lay[dim])
    if subs is not None:
        return [tuple(t.g.substitute(d, sub) for d in rest) for sub in subs]
    t.g.fix_dim(lay[dim], "unbind selects units one by one")
    return [rest for _ in t.shape(node)]


def _piece_subs(t, d):
    """Per-index group maps when the axis is the outer factor of a packed projection."""
    segs = t.g.norm(d)
    if len(segs) == 1 and len(segs[0]) == 1 and segs[0][0][0] is not None:
        return t.g.pieces(segs[0][0][0])
    return None


@rule("slice", "narrow", "slice_copy")
def _slice(t, node):
    x = node.args[0]
    lay, shape = t.lay(x), t.shape(x)
    dim = (node.args[1] if len(node.args) > 1 else node.kwargs.get("dim", 0)) % len(shape)
    n = int(shape[dim])
    if t.opname(node) == "narrow":
        start, stop, step = int(node.args[2]), int(node.args[2]) + int(node.args[3]), 1
    else:
        start = node.args[2] if len(node.args) > 2 else node.kwargs.get("start")
        stop = node.args[3] if len(node.args) > 3 else node.kwargs.get("end")
        step = node.args[4] if len(node.args) > 4 else node.kwargs.get("step", 1)
        start = 0 if start is None else int(start)
        stop = n if stop is None else int(stop)
        start, stop = (s + n if s < 0 else s for s in (start, stop))
        start, stop = max(0, min(start, n)), max(0, min(stop, n))
    res = list(lay)
    if int(step) == 1:
        res[dim] = take(t.g, lay[dim], start, stop, f"{t.opname(node)} cuts inside a group")
    else:
        t.g.fix_dim(lay[dim], "strided slice of an axis of units")
        res[dim] = const(int(t.shape(node)[dim]))
    return tuple(res)


@rule("select", "select_copy")
def _select(t, node):
    lay = t.lay(node.args[0])
    dim = node.args[1] % len(lay)
    rest = tuple(lay[:dim]) + tuple(lay[dim + 1:])
    subs = _piece_subs(t, lay[dim])
    if subs is not None:
        return tuple(t.g.substitute(d, subs[node.args[2] % len(subs)]) for d in rest)
    t.g.fix_dim(lay[dim], "select picks one unit of an axis")
    return rest


@rule("index", "_unsafe_index")
def _index(t, node):
    x, idx = node.args[0], node.args[1]
    lay = t.lay(x)
    used = [k for k, i in enumerate(idx) if i is not None]
    for k in used:
        t.g.fix_dim(lay[k], "advanced indexing of an axis", hidden=not t.is_param(x))
        t.fix_value(t.lay(idx[k]), "index tensor")
    out = t.shape(node)
    if used != list(range(used[0], used[-1] + 1)) if used else True:
        return unknown(t, node, "advanced indexing with separated indices")
    tail = tuple(lay[used[-1] + 1:])
    head = tuple(lay[:used[0]])
    mid = len(out) - len(head) - len(tail)
    return head + tuple(const(int(n)) for n in out[len(head):len(head) + mid]) + tail


@rule("index_select")
def _index_select(t, node):
    lay = t.lay(node.args[0])
    dim = node.args[1] % len(lay)
    t.g.fix_dim(lay[dim], "index_select of an axis", hidden=not t.is_param(node.args[0]))
    res = list(lay)
    res[dim] = const(int(t.shape(node)[dim]))
    return tuple(res)


@rule("pad", "constant_pad_nd")
def _pad(t, node):
    lay = list(t.lay(node.args[0]))
    pads = list(node.args[1])
    mode = node.args[2] if len(node.args) > 2 and isinstance(node.args[2], str) else \
        node.kwargs.get("mode", "constant")
    out = t.shape(node)
    for i in range(len(pads) // 2):
        d = len(lay) - 1 - i
        lo, hi = int(pads[2 * i]), int(pads[2 * i + 1])
        if not (lo or hi):
            continue
        if mode == "constant" and lo >= 0 and hi >= 0:  # constants appended: own segments
            lay[d] = ((const(lo)[0],) if lo else ()) + t.g.norm(lay[d]) + (
                (const(hi)[0],) if hi else ())
        else:
            t.g.fix_dim(lay[d], "padding an axis of units")
            lay[d] = const(int(out[d]))
    return tuple(lay)


@rule("repeat_interleave")
def _repeat_interleave(t, node):
    x = node.args[0]
    reps = node.args[1] if len(node.args) > 1 else node.kwargs.get("repeats")
    dim = node.args[2] if len(node.args) > 2 else node.kwargs.get("dim")
    if not isinstance(reps, int) or dim is None or not isinstance(t.lay(x), tuple):
        return unknown(t, node, "repeat_interleave with tensor repeats or no dim")
    lay, shape = list(t.lay(x)), t.shape(x)
    dim %= len(shape)
    n = int(shape[dim])
    lay[dim] = reshape(t.g, (lay[dim], wild(t, reps)), (n, reps), (n * reps,),
                       "repeat_interleave")[0]
    return tuple(lay)


@rule("zeros", "ones", "full", "new_zeros", "new_ones", "new_full")
def _filled(t, node):
    shape = t.shape(node)
    return tuple(wild(t, int(n)) for n in shape) if shape is not None else None


@rule("_assert_tensor_metadata", "_assert_scalar", "sym_size", "sym_numel", "scalar_tensor",
      "arange", "empty", "tensor", "rand", "randn", "linspace", "_local_scalar_dense", "item",
      "sym_constrain_range_for_size", "_assert_async", "new_empty", "tril", "triu", "eye")
def _creation(t, node):
    if t.opname(node) in ("tril", "triu") and t.lay(node.args[0]) is not None:
        lay = t.lay(node.args[0])
        for d in lay[-2:]:
            t.g.fix_dim(d, "tril/triu depend on positions")
    if t.opname(node) == "_local_scalar_dense" or t.opname(node) == "item":
        t.fix_value(t.lay(node.args[0]), "a tensor read as a Python number")
    return t.const_value(node)


__all__ = ["RULES", "const_layout", "dim_len"]
