"""How each ATen operation moves permutations between its operands and its result.

A rule receives the tracer ``t`` and the node and returns the result's layout. Every tensor axis
an operation touches is accounted for: unified with another axis (same permutation), passed on,
reduced (sums and means are blind to order), or fixed. An operation without a rule fixes every
group its operands carry (:func:`unknown`), which is always exact.
"""

from __future__ import annotations

from neuralign.spec.layout import const, dim_len, is_const
from neuralign.spec.shapes import broadcast, const_layout, reshape, take

RULES: dict[str, object] = {}

# ops whose result is elementwise in their first (tensor) operand
UNARY = """abs abs_ alias clone contiguous detach dropout dropout_ alpha_dropout feature_dropout
elu elu_ erf exp exp_ expm1 gelu gelu_ hardsigmoid hardsigmoid_ hardswish hardswish_ hardtanh
hardtanh_ leaky_relu leaky_relu_ lift_fresh_copy log log1p log_sigmoid logit mish mish_ neg neg_
relu relu_ relu6 rsqrt rsqrt_ selu selu_ sigmoid sigmoid_ silu silu_ sin cos sqrt sqrt_ square
softplus tanh tanh_ celu celu_ reciprocal sign _to_copy to type_as clamp clamp_ clamp_min
clamp_min_ clamp_max clamp_max_ pow pow_ fill fill_ zero_ zeros_like ones_like full_like
empty_like bitwise_not logical_not isnan isinf nan_to_num floor ceil round trunc frac threshold
threshold_ softsign tanhshrink""".split()
# elementwise ops over all tensor operands (broadcasting)
POINTWISE = """add add_ sub sub_ rsub mul mul_ div div_ true_divide floor_divide remainder fmod
maximum minimum where eq ne lt le gt ge logical_and logical_or logical_xor bitwise_and
bitwise_or bitwise_xor masked_fill masked_fill_ lerp lerp_ addcmul addcmul_ addcdiv addcdiv_
copy_ copy atan2 hypot xlogy""".split()
REDUCE = """sum mean amax amin var std var_mean std_mean logsumexp norm linalg_vector_norm
nansum prod""".split()
POOL = """max_pool1d max_pool2d max_pool3d avg_pool1d avg_pool2d avg_pool3d adaptive_avg_pool1d
adaptive_avg_pool2d adaptive_avg_pool3d adaptive_max_pool1d adaptive_max_pool2d
adaptive_max_pool3d max_pool2d_with_indices upsample_nearest2d upsample_bilinear2d
_adaptive_avg_pool2d""".split()


def rule(*names):
    def deco(fn):
        for n in names:
            RULES[n] = fn
        return fn
    return deco


def unknown(t, node, why=None):
    """Fix every group in every operand; the result carries no permutation."""
    reason = why or f"operation {t.opname(node)} is not understood"
    for a in node.all_input_nodes:
        t.fix_value(t.lay(a), reason)
    return t.const_value(node)


@rule(*UNARY)
def _unary(t, node):
    if t.opname(node) in ("type_as", "to") and len(node.args) > 1:  # the second gives a dtype
        lay = t.lay(node.args[0])
        return lay if lay is not None else t.const_value(node)
    return _pointwise(t, node)


@rule(*POINTWISE)
def _pointwise(t, node):
    items = t.tensor_args(node)
    out = t.shape(node)
    if not items:
        return t.const_value(node)
    return broadcast(t.g, items, out, f"{t.opname(node)} meets a tensor that cannot be permuted")


@rule("softmax", "_softmax", "log_softmax", "_log_softmax", "_safe_softmax")
def _softmax(t, node):  # equivariant along every axis, the softmax axis included
    return t.lay(node.args[0])


@rule(*REDUCE)
def _reduce(t, node):
    lay = t.lay(node.args[0])
    shape = t.shape(node.args[0])
    out_shape = t.shape(node)
    if isinstance(out_shape, list):  # var_mean: (var, mean)
        out_shape = out_shape[0]
    dims = node.args[1] if len(node.args) > 1 else node.kwargs.get("dim")
    if t.opname(node) in ("var", "std", "var_mean", "std_mean") and not isinstance(dims, (
            list, tuple, int)):
        dims = node.kwargs.get("dim")
    if t.opname(node) == "norm":
        dims = node.args[2] if len(node.args) > 2 else node.kwargs.get("dim")
    if t.opname(node) == "linalg_vector_norm":
        dims = node.args[2] if len(node.args) > 2 else node.kwargs.get("dim")
    if dims is None or dims == [] or not isinstance(dims, (list, tuple, int)):
        dims = list(range(len(shape)))
    dims = [d % len(shape) for d in ([dims] if isinstance(dims, int) else dims)]
    keep = len(out_shape) == len(shape)
    res = tuple(const(1) if k in dims else lay[k] for k in range(len(shape)) if keep or k not in
                dims)
    if t.opname(node) in ("var_mean", "std_mean"):
        return [res, res]
    return res


@rule("max", "min", "argmax", "argmin", "topk", "sort", "cumsum", "cumprod", "median", "mode",
      "kthvalue", "cummax", "flip", "roll")
def _positional(t, node):
    """Ops where positions along an axis matter: the axis must carry no permutation."""
    lay = t.lay(node.args[0])
    shape = t.shape(node.args[0])
    name = t.opname(node)
    dims = node.args[1] if len(node.args) > 1 else node.kwargs.get("dim")
    if name == "roll":
        dims = node.args[2] if len(node.args) > 2 else node.kwargs.get("dims")
    if name in ("topk", "kthvalue"):
        dims = node.args[2] if len(node.args) > 2 else node.kwargs.get("dim", -1)
    if name in ("sort",) and dims is None:
        dims = -1
    if not isinstance(dims, (int, list, tuple)) or isinstance(dims, bool):
        return unknown(t, node, f"{name} over every axis")
    dims = [d % len(shape) for d in ([dims] if isinstance(dims, int) else dims)]
    for d in dims:
        t.g.fix_dim(lay[d], f"{name} depends on positions along an axis of units")
    outs = t.shape(node)
    if isinstance(outs, list):
        return [_keep_dims(lay, shape, o, dims) for o in outs]
    return _keep_dims(lay, shape, outs, dims)


def _keep_dims(lay, shape, out_shape, dims):
    if len(out_shape) == len(shape):
        return tuple(const(int(out_shape[k])) if k in dims else lay[k] for k in range(len(shape)))
    return tuple(lay[k] for k in range(len(shape)) if k not in dims)


@rule(*POOL)
def _pool(t, node):
    lay, shape = t.lay(node.args[0]), t.shape(node.args[0])
    spatial = {"1d": 1, "2d": 2, "3d": 3}[next(s for s in ("1d", "2d", "3d") if s in
                                               t.opname(node))]
    nd = len(shape)
    for d in range(nd - spatial, nd):
        t.g.fix_dim(lay[d], f"{t.opname(node)} mixes positions of an axis of units")
    out = t.shape(node)
    outs = out if isinstance(out, list) else [out]
    res = [tuple(lay[:nd - spatial]) + tuple(const(int(n)) for n in o[nd - spatial:])
           for o in outs]
    return res if isinstance(out, list) else res[0]


@rule("linear")
def _linear(t, node):
    x, w = node.args[0], node.args[1]
    b = node.args[2] if len(node.args) > 2 else None
    lx, lw = t.lay(x), t.lay(w)
    t.g.unify(lx[-1], lw[1], "linear input")
    t.unit_axis(lw[0])
    out = tuple(lx[:-1]) + (lw[0],)
    if b is not None:
        out = out[:-1] + (t.g.unify(out[-1], t.lay(b)[0], "linear bias"),)
    return out


def _matmul_layout(t, la, sa, lb, sb, out_shape, reason):
    if len(sa) == 1 and len(sb) == 1:
        t.g.unify(la[0], lb[0], reason)
        return ()
    if len(sb) == 1:
        t.g.unify(la[-1], lb[0], reason)
        return tuple(la[:-1])
    if len(sa) == 1:
        t.g.unify(la[0], lb[-2], reason)
        return tuple(lb[:-2]) + (lb[-1],)
    t.g.unify(la[-1], lb[-2], reason)
    nb = len(out_shape) - 2
    batch = broadcast(t.g, [(la[:-2], sa[:-2]), (lb[:-2], sb[:-2])], out_shape[:nb], reason)
    return tuple(batch) + (la[-2], lb[-1])


@rule("matmul", "mm", "bmm", "dot", "mv")
def _matmul(t, node):
    a, b = node.args[0], node.args[1]
    return _matmul_layout(t, t.lay(a), t.shape(a), t.lay(b), t.shape(b), t.shape(node),
                          "matrix product")


@rule("addmm", "baddbmm", "addmv")
def _addmm(t, node):
    bias, a, b = node.args[:3]
    if t.is_param(b):
        t.unit_axis(t.lay(b)[-1])
    out = _matmul_layout(t, t.lay(a), t.shape(a), t.lay(b), t.shape(b), t.shape(node),
                         "matrix product")
    return broadcast(t.g, [(out, t.shape(node)), (t.lay(bias), t.shape(bias))], t.shape(node),
                     "bias of a matrix product")


@rule("einsum")
def _einsum(t, node):
    eq, ops = node.args[0].replace(" ", ""), node.args[1]
    lhs, rhs = eq.split("->") if "->" in eq else (eq, None)
    terms = lhs.split(",")
    if "." in eq or rhs is None or len(terms) != len(ops):
        return unknown(t, node, "einsum with ellipsis or implicit output")
    seen: dict[str, object] = {}
    for term, op in zip(terms, ops):
        lay, shape = t.lay(op), t.shape(op)
        for ch, d, n in zip(term, lay, shape):
            if int(n) == 1:
                continue
            seen[ch] = d if ch not in seen else t.g.unify(seen[ch], d, "einsum")
    return tuple(seen.get(ch, const(int(n))) for ch, n in zip(rhs, t.shape(node)))


@rule("conv1d", "conv2d", "conv3d", "convolution", "conv_transpose1d", "conv_transpose2d",
      "conv_transpose3d", "_convolution")
def _conv(t, node):
    name = t.opname(node)
    x, w = node.args[0], node.args[1]
    b = node.args[2] if len(node.args) > 2 else None
    if name in ("convolution", "_convolution"):
        transposed, groups = bool(node.args[6]), int(node.args[8])
    elif name.startswith("conv_transpose"):
        transposed = True
        groups = int(node.args[6]) if len(node.args) > 6 else int(node.kwargs.get("groups", 1))
    else:
        transposed = False
        groups = int(node.args[6]) if len(node.args) > 6 else int(node.kwargs.get("groups", 1))
    lx, sx, lw, sw = t.lay(x), t.shape(x), t.lay(w), t.shape(w)
    g = t.g
    for d in range(2, len(sw)):
        g.fix_dim(lw[d], "convolution kernel window", hidden=False)
    for d in range(2, len(sx)):
        g.fix_dim(lx[d], "convolution mixes positions of an axis of units")
    cin, cout = int(sx[1]), int(t.shape(node)[1])
    w_in, w_out = (0, 1) if transposed else (1, 0)
    # channels as (groups, per group): whole groups move alike on both sides
    xin = reshape(g, (lx[1],), (cin,), (groups, cin // groups), "grouped convolution")
    wo = reshape(g, (lw[w_in],) if transposed else (lw[w_out],),
                 (int(sw[w_in if transposed else w_out]),),
                 (groups, int(sw[w_in if transposed else w_out]) // groups), "grouped convolution")
    if transposed:  # weight (Cin, Cout/G, k...): axis 0 is the input, grouped
        g.unify(xin[0], wo[0], "grouped convolution")
        g.unify(xin[1], wo[1], "convolution input")
        out_c = reshape(g, (xin[0], lw[w_out]), (groups, int(sw[w_out])), (cout,), "convolution")
    else:
        g.unify(xin[0], wo[0], "grouped convolution")
        g.unify(xin[1], lw[w_in], "convolution input")
        out_c = reshape(g, wo, (groups, cout // groups), (cout,), "convolution")
    t.unit_axis(out_c[0])
    out = (lx[0], out_c[0]) + tuple(const(int(n)) for n in t.shape(node)[2:])
    if b is not None:
        out = (out[0], g.unify(out[1], t.lay(b)[0], "convolution bias")) + out[2:]
    return out


@rule("batch_norm", "_native_batch_norm_legit_no_training", "_native_batch_norm_legit",
      "native_batch_norm", "instance_norm", "_batch_norm_impl_index")
def _batch_norm(t, node):
    x = node.args[0]
    lx = t.lay(x)
    c = lx[1] if len(lx) > 1 else lx[0]
    for p in node.args[1:5]:
        if hasattr(p, "op") and t.lay(p) is not None and t.shape(p) is not None and len(
                t.shape(p)) == 1:
            c = t.g.unify(c, t.lay(p)[0], "batch norm parameters")
    out = (lx[0], c) + tuple(lx[2:]) if len(lx) > 1 else (c,)
    res = t.shape(node)
    if isinstance(res, list):
        return [out] + [const_layout(s) for s in res[1:]]
    return out


@rule("layer_norm", "rms_norm", "native_layer_norm")
def _layer_norm(t, node):
    x, shape = node.args[0], [int(s) for s in node.args[1]]
    lx = list(t.lay(x))
    k = len(shape)
    for pi in (2, 3) if t.opname(node) != "rms_norm" else (2,):
        p = node.args[pi] if len(node.args) > pi else None
        if hasattr(p, "op"):
            lp = t.lay(p)
            for j in range(k):
                lx[len(lx) - k + j] = t.g.unify(lx[len(lx) - k + j], lp[j], "norm parameters")
    res = t.shape(node)
    if isinstance(res, list):
        return [tuple(lx)] + [const_layout(s) for s in res[1:]]
    return tuple(lx)


@rule("group_norm", "native_group_norm")
def _group_norm(t, node):
    x = node.args[0]
    lx, sx = t.lay(x), t.shape(x)
    name = t.opname(node)
    groups = int(node.args[1] if name == "group_norm" else node.args[6])
    c = int(sx[1])
    cg = reshape(t.g, (lx[1],), (c,), (groups, c // groups), "group norm")
    ch = reshape(t.g, cg, (groups, c // groups), (c,), "group norm")[0]
    for p in node.args[2:4] if name == "group_norm" else node.args[1:3]:
        if hasattr(p, "op"):
            ch = t.g.unify(ch, t.lay(p)[0], "group norm parameters")
    out = (lx[0], ch) + tuple(lx[2:])
    res = t.shape(node)
    return [out] + [const_layout(s) for s in res[1:]] if isinstance(res, list) else out


@rule("embedding")
def _embedding(t, node):
    w, ids = node.args[0], node.args[1]
    lw = t.lay(w)
    t.g.fix_dim(lw[0], "embedding rows are indexed by the input", hidden=False)
    t.fix_value(t.lay(ids), "embedding indices")
    t.unit_axis(lw[1])
    return const_layout(t.shape(ids)) + (lw[1],)


@rule("scaled_dot_product_attention", "_scaled_dot_product_flash_attention_for_cpu",
      "_scaled_dot_product_efficient_attention", "_scaled_dot_product_flash_attention")
def _sdpa(t, node):
    q, k, v = node.args[:3]
    mask = node.args[3] if len(node.args) > 3 else node.kwargs.get("attn_mask")
    g = t.g
    lq, lk, lv = t.lay(q), t.lay(k), t.lay(v)
    sq, sk = t.shape(q), t.shape(k)
    g.unify(lq[-1], lk[-1], "attention q.k")
    g.unify(lk[-2], lv[-2], "attention keys and values")
    nb = len(sq) - 2
    lk_b, lv_b = list(lk[:nb]), list(lv[:nb])
    skb, svb = [int(n) for n in sk[:nb]], [int(n) for n in t.shape(v)[:nb]]
    if nb >= 1 and skb[-1] != int(sq[nb - 1]) and skb[-1] > 1:
        # grouped-query attention: query head h uses key/value head h // rep
        rep = int(sq[nb - 1]) // skb[-1]
        lk_b[-1] = _merge_rep(t, lk_b[-1], rep)
        lv_b[-1] = _merge_rep(t, lv_b[-1], rep)
        skb[-1] = svb[-1] = int(sq[nb - 1])
    batch = broadcast(g, [(lq[:nb], sq[:nb]), (tuple(lk_b), skb), (tuple(lv_b), svb)],
                      sq[:nb], "attention heads")
    causal = node.args[5] if len(node.args) > 5 else node.kwargs.get("is_causal", False)
    if causal:
        g.fix_dim(lq[-2], "causal attention depends on positions")
        g.fix_dim(lk[-2], "causal attention depends on positions")
    scores = tuple(batch) + (lq[-2], lk[-2])
    if hasattr(mask, "op"):
        broadcast(g, [(scores, tuple(sq[:-1]) + (sk[-2],)), (t.lay(mask), t.shape(mask))],
                  tuple(sq[:-1]) + (sk[-2],), "attention mask")
    out = tuple(batch) + (lq[-2], lv[-1])
    res = t.shape(node)
    return [out] + [const_layout(s) for s in res[1:]] if isinstance(res, list) else out


def _merge_rep(t, d, rep):
    """A key/value head axis repeated ``rep`` times (repeat_interleave) as a query head axis."""
    return reshape(t.g, (d, const(rep)), (dim_len(d), rep), (dim_len(d) * rep,), "gqa")[0]


@rule("getitem")
def _getitem(t, node):
    src, i = node.args
    lay = t.lay(src)
    return lay[i] if isinstance(lay, list) else unknown(t, node, "indexing a tensor value")


__all__ = ["RULES", "unknown", "take", "is_const"]
