"""Representation and weight analysis: CKA (linear, RBF), per-block L2, Kendall-tau of a permutation."""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence

import torch
from torch import nn

from neuralign.errors import DataError, NeuralignError
from neuralign.evaluation import iter_batches, to_device, use_channels_last
from neuralign.utils import as_state_dict, eval_mode, split_batch
from neuralign.utils import model_device as device_of


def _center_gram(k: torch.Tensor) -> torch.Tensor:
    n = k.shape[0]
    h = torch.eye(n, dtype=k.dtype) - 1.0 / n
    return h @ k @ h


def _centered_gram(x: torch.Tensor, kernel: str, sigma: float | None,
                   own: bool = False, keep_float: bool = False) -> torch.Tensor:
    """``H K H`` in float64. Linear kernel: the Gram of the centred features in float32
    GEMMs (centring first leaves no cancellation for them to amplify), in float32 if
    ``keep_float``; ``own``: ``x`` may be centred in place."""
    if kernel == "linear":
        xf = x.float()
        xc = xf.sub_(xf.mean(0)) if own and xf is x else xf - xf.mean(0)
        g = _sym_gram(xc)
        return g if keep_float else g.double()
    return _center_gram(_gram(x.double(), kernel, sigma))


def _sym_gram(x: torch.Tensor, blocks: int = 4) -> torch.Tensor:
    """``x @ x.T`` computing only the blocks on and above the diagonal (about 5/8 of the
    products for 4 blocks of rows), the others their transposes: exactly symmetric."""
    n = x.shape[0]
    if n < 256:
        return x @ x.T
    b = -(-n // blocks)
    g = torch.empty(n, n, dtype=x.dtype, device=x.device)
    for i in range(0, n, b):
        row = x[i:i + b] @ x[i:].T
        g[i:i + b, i:] = row
        g[i + b:, i:i + b] = row[:, b:].T
    return g


def _gram(x: torch.Tensor, kernel: str, sigma: float | None) -> torch.Tensor:
    if kernel == "linear":
        return x @ x.T
    if kernel == "rbf":
        d2 = torch.cdist(x, x) ** 2
        d2.fill_diagonal_(0)
        if sigma is None:
            sig2 = _median_sq_distance(d2)
        else:
            sig2 = torch.tensor(sigma, dtype=x.dtype) ** 2
        return torch.exp(-d2 / (2 * sig2))
    raise NeuralignError(f"unknown CKA kernel '{kernel}'; use 'linear' or 'rbf'")


def _median(v: torch.Tensor) -> torch.Tensor:
    """numpy's median: the mean of the two middle values when there are an even number."""
    n = v.numel()
    lo = v.kthvalue((n + 1) // 2).values
    return lo if n % 2 else (lo + v.kthvalue(n // 2 + 1).values) / 2


def _median_sq_distance(d2: torch.Tensor) -> torch.Tensor:
    """Kornblith et al.'s RBF bandwidth ``sigma**2``: the median of all ``N x N`` squared
    distances, the zero diagonal included. Where that median is 0 (most pairs of examples
    identical), the median of the non-zero distances instead (1 if there are none), rather
    than a kernel of 0/0."""
    med = _median(d2.flatten())
    if med > 0:
        return med
    pos = d2[d2 > 0]
    return _median(pos) if pos.numel() else torch.tensor(1.0, dtype=d2.dtype)


def cka(x: torch.Tensor, y: torch.Tensor, kernel: str = "linear", sigma: float | None = None) -> float:
    """Centered kernel alignment (Kornblith et al., 2019) of two representations of the same
    examples, ``x`` (N, ...) and ``y`` (N, ...). ``rbf`` uses ``sigma**2`` = the median of all squared
    pairwise distances, zeros on the diagonal included (Kornblith et al.'s ``gram_rbf`` with
    threshold 1), when not given. 1 for identical representations, invariant to unit permutations."""
    if x.shape[0] != y.shape[0]:
        raise NeuralignError(f"CKA needs the same examples: {x.shape[0]} vs {y.shape[0]} rows")
    x = x.reshape(x.shape[0], -1).double()
    y = y.reshape(y.shape[0], -1).double()
    kx = _center_gram(_gram(x, kernel, sigma))
    ky = _center_gram(_gram(y, kernel, sigma))
    hsic = (kx * ky).sum()
    den = (kx * kx).sum().sqrt() * (ky * ky).sum().sqrt()
    return float(hsic / den.clamp_min(1e-30))


def default_layers(model: nn.Module) -> list[str]:
    try:
        from neuralign.models import block_names

        names = block_names(model)
        if names:
            return list(names)
    except Exception:  # noqa: BLE001, S110 - models without the helper fall back to top-level children
        pass
    return [n for n, _ in model.named_children()]


@torch.no_grad()
def features(model: nn.Module, loader: Iterable, layers: Sequence[str], n_examples: int = 512
             ) -> dict[str, torch.Tensor]:
    """Outputs of the named modules on up to ``n_examples`` examples, flattened per example."""
    mods = dict(model.named_modules())
    missing = [n for n in layers if n not in mods]
    if missing:
        raise NeuralignError(f"model has no module {missing[0]!r}; layers: {default_layers(model)}")
    store: dict[str, list] = {n: [] for n in layers}
    hs = [mods[n].register_forward_hook(lambda m, i, o, n=n: store[n].append(o.reshape(o.shape[0], -1).cpu()))
          for n in layers]
    restore = eval_mode(model)
    seen = 0
    try:
        for batch in iter_batches(loader):
            x, _ = split_batch(batch)
            x = x[: n_examples - seen]
            dev = device_of(model)
            model(to_device(x, dev, use_channels_last(None, dev)))
            seen += len(x)
            if seen >= n_examples:
                break
    finally:
        for h in hs:
            h.remove()
        restore()
    if seen == 0:
        raise DataError("the data loader yielded no batches; pass a non-empty loader for CKA")
    return {n: torch.cat(v) for n, v in store.items()}


@torch.no_grad()
def _flat_features(model: nn.Module, loader: Iterable, layers: Sequence[str],
                   n_examples: int) -> dict[str, torch.Tensor]:
    """As :func:`features`, for Gram matrices: each example's values in the order they lie in
    memory (channels-last outputs are not reordered; a Gram or distance matrix does not depend
    on the order of the features, the same for every example), written into one buffer per
    layer (no per-batch copies to concatenate)."""
    mods = dict(model.named_modules())
    missing = [n for n in layers if n not in mods]
    if missing:
        raise NeuralignError(f"model has no module {missing[0]!r}; layers: {default_layers(model)}")
    bufs: dict[str, torch.Tensor] = {}
    last: dict[str, bool] = {}  # per layer: channels-last order, fixed by its first batch
    at, done = [0], {}  # rows written; per layer, the row its last batch went to

    def hook(name):
        def f(_m, _i, o):
            if done.get(name) == at[0]:
                raise NeuralignError(f"module {name!r} runs more than once in a forward pass; "
                                     "CKA needs one output per example: pick other layers")
            done[name] = at[0]
            if name not in last:
                last[name] = o.dim() == 4 and not o.is_contiguous() and o.is_contiguous(
                    memory_format=torch.channels_last)
            flat = (o.permute(0, 2, 3, 1) if last[name] else o).reshape(o.shape[0], -1)
            if name not in bufs:
                bufs[name] = torch.empty(n_examples, flat.shape[1], dtype=o.dtype)
            bufs[name][at[0]:at[0] + len(flat)].copy_(flat)
        return f

    hs = [mods[n].register_forward_hook(hook(n)) for n in layers]
    restore = eval_mode(model)
    try:
        for batch in iter_batches(loader):
            x, _ = split_batch(batch)
            x = x[: n_examples - at[0]]
            dev = device_of(model)
            model(to_device(x, dev, use_channels_last(None, dev)))
            at[0] += len(x)
            if at[0] >= n_examples:
                break
    finally:
        for h in hs:
            h.remove()
        restore()
    if at[0] == 0:
        raise DataError("the data loader yielded no batches; pass a non-empty loader for CKA")
    return {n: bufs[n][:at[0]] for n in layers}


def _gram_rows(feats: dict[str, torch.Tensor], layers: Sequence[str], kernel: str,
               sigma: float | None) -> torch.Tensor:
    """``(layers, N * N)`` float64: each layer's centred Gram matrix, flattened (the features
    are centred in place and dropped as soon as their Gram exists)."""
    out = None
    for i, name in enumerate(layers):
        k = _centered_gram(feats.pop(name), kernel, sigma, own=True, keep_float=True)
        if out is None:
            out = torch.empty(len(layers), k.numel(), dtype=torch.float64)
        out[i].copy_(k.reshape(-1))
    return out


def layer_cka(model_a: nn.Module, model_b: nn.Module, loader: Iterable, *,
              layers_a: Sequence[str] | None = None, layers_b: Sequence[str] | None = None,
              kernel: str = "linear", n_examples: int = 512, sigma: float | None = None):
    """Layer × layer CKA matrix between two models on the same examples.

    Returns ``(matrix, layers_a, layers_b)``; ``matrix[i, j]`` = CKA(layer i of A, layer j of B).
    Default layers: the models' blocks (``neuralign.models.block_names``) or top-level children.
    """
    la = list(layers_a) if layers_a is not None else default_layers(model_a)
    lb = list(layers_b) if layers_b is not None else default_layers(model_b)
    A = _gram_rows(_flat_features(model_a, loader, la, n_examples), la, kernel, sigma)
    B = _gram_rows(_flat_features(model_b, loader, lb, n_examples), lb, kernel, sigma)
    num = A @ B.T
    den = A.norm(dim=1)[:, None] * B.norm(dim=1)[None, :]
    return (num / den.clamp_min(1e-30)).float(), la, lb


def per_block_l2(a, b, blocks: Sequence[str] | None = None, *, relative: bool = False) -> dict[str, float]:
    """L2 distance between the parameters of ``a`` and ``b`` per block (key prefix).

    ``blocks`` defaults to the models' blocks; ``relative=True`` divides by the norm of ``a``'s block.
    """
    sa, sb = as_state_dict(a), as_state_dict(b)
    if blocks is None:
        if not isinstance(a, nn.Module):
            raise NeuralignError("pass `blocks` when comparing state dicts")
        blocks = default_layers(a)
    pnames = set(dict(a.named_parameters())) if isinstance(a, nn.Module) else set(sa)
    out = {}
    for blk in blocks:
        keys = [k for k in sa if (k == blk or k.startswith(blk + ".")) and k in pnames]
        if not keys:
            continue
        for k in keys:
            if k not in sb or sb[k].shape != sa[k].shape:
                raise NeuralignError(f"models differ at '{k}'; per-block L2 needs the same architecture")
        d = torch.sqrt(sum(((sa[k].double() - sb[k].double()) ** 2).sum() for k in keys))
        if relative:
            d = d / torch.sqrt(sum((sa[k].double() ** 2).sum() for k in keys)).clamp_min(1e-30)
        out[blk] = float(d)
    return out


def kendall_tau_distance(perm) -> float | dict[str, float]:
    """Normalised Kendall-tau distance of a permutation to the identity, in [0, 1].

    The fraction of unit pairs whose order the permutation swaps (0 = identity, 1 = reversal).
    A mapping (a ``Permutation``: group -> index tensor) gives one value per group.
    """
    if isinstance(perm, Mapping):
        return {k: kendall_tau_distance(v) for k, v in perm.items()}
    p = torch.as_tensor(perm).long().reshape(-1)
    n = p.numel()
    if n < 2:
        return 0.0
    if not torch.equal(torch.sort(p).values, torch.arange(n)):
        raise NeuralignError("kendall_tau_distance needs a permutation of range(n)")
    i, j = torch.triu_indices(n, n, 1)
    return float((p[i] > p[j]).double().mean())
