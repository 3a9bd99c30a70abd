"""Gradient-based per-layer scores: Auto-RGN, Auto-SNR and the +Hessian / +Change extensions.

Every score is computed in the mode the model trains in (Lee et al.'s code scores and trains in
one mode): ``model.train()`` with the fine-tuning batch-norm policy ``bn`` applied to the layers
(``neuralign.finetune.bn``; ``trained`` = ids of the parameters the run trains, which decides
the ``"train"`` policy). With batch statistics, a bias just before a batch-norm layer has a zero
gradient; scored in eval mode it would get the largest relative gradient and set the
divide-by-max for every layer. Scores never touch ``param.grad``, the weights or the buffers.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Iterable

import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call, grad, vmap

from neuralign.errors import DataError, NeuralignError
from neuralign.finetune.auto_lr.layers import Layer, normalise_scores
from neuralign.finetune.bn import DEFAULT_BN, training_mode

LossFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


def _mode(model: nn.Module, bn: str, trained: set[int] | None) -> training_mode:
    return training_mode(model, bn, trained)


def take_batches(loader: Iterable, num_batches: int, device: torch.device) -> list:
    """The first ``num_batches`` ``(x, y)`` minibatches of ``loader`` on ``device``."""
    if num_batches < 1:
        raise NeuralignError(f"num_batches must be >= 1, got {num_batches}")
    out = []
    for batch in itertools.islice(iter(loader), num_batches):
        if not isinstance(batch, (list, tuple)) or len(batch) < 2:
            raise DataError("the loader must yield (inputs, targets) minibatches")
        out.append((batch[0].to(device), batch[1].to(device)))
    if not out:
        raise DataError("the fine-tuning loader is empty: no minibatch to score layers on")
    return out


def _param_names(layers: list[Layer]) -> list[str]:
    return [n for layer in layers for n in layer.param_names]


def batch_gradients(model: nn.Module, batches: list, layers: list[Layer],
                    loss_fn: LossFn | None = None, *, bn: str = DEFAULT_BN,
                    trained: set[int] | None = None) -> list[dict[str, torch.Tensor]]:
    """Per-minibatch mean-loss gradients of the layer parameters (in the training mode)."""
    loss_fn = loss_fn or F.cross_entropy
    params = dict(model.named_parameters())
    names = _param_names(layers)
    out = []
    with _mode(model, bn, trained), torch.enable_grad():
        for x, y in batches:
            loss = loss_fn(model(x), y)
            gs = torch.autograd.grad(loss, [params[n] for n in names], allow_unused=True)
            out.append({n: (torch.zeros_like(params[n]) if g is None else g.detach())
                        for n, g in zip(names, gs)})
    return out


def mean_gradient(model: nn.Module, batches: list, layers: list[Layer],
                  loss_fn: LossFn | None = None, *, bn: str = DEFAULT_BN,
                  trained: set[int] | None = None) -> dict[str, torch.Tensor]:
    """Gradient of the example-weighted mean loss over ``batches``."""
    grads = batch_gradients(model, batches, layers, loss_fn, bn=bn, trained=trained)
    sizes = torch.tensor([float(len(b[1])) for b in batches])
    w = (sizes / sizes.sum()).tolist()
    return {n: sum(wi * g[n] for wi, g in zip(w, grads)) for n in grads[0]}


def _layer_norm(tensors: dict[str, torch.Tensor], layer: Layer) -> torch.Tensor:
    return torch.sqrt(sum(tensors[n].double().pow(2).sum() for n in layer.param_names))


def relative_norms(vectors: dict[str, torch.Tensor], model: nn.Module,
                   layers: list[Layer]) -> dict[str, float]:
    """``‖v_ℓ‖ / ‖θ_ℓ‖`` per layer (the Auto-RGN normalisation)."""
    params = {n: p.detach() for n, p in model.named_parameters()}
    out = {}
    for layer in layers:
        denom = float(_layer_norm(params, layer))
        out[layer.name] = float(_layer_norm(vectors, layer)) / max(denom, 1e-12)
    return out


def rgn_scores(model: nn.Module, batches: list, layers: list[Layer], *,
               average: str = "score", loss_fn: LossFn | None = None, bn: str = DEFAULT_BN,
               trained: set[int] | None = None) -> dict[str, float]:
    """Raw Auto-RGN scores ``‖∇θ_ℓ L‖ / ‖θ_ℓ‖``.

    ``average="score"`` (Lee et al.'s code): the ratio per minibatch, averaged over minibatches.
    ``average="gradient"``: the ratio of the gradient averaged over the minibatches.
    """
    if average == "gradient":
        return relative_norms(mean_gradient(model, batches, layers, loss_fn, bn=bn,
                                            trained=trained), model, layers)
    if average != "score":
        raise NeuralignError(f"average must be 'score' or 'gradient', got {average!r}")
    per_batch = [relative_norms(g, model, layers)
                 for g in batch_gradients(model, batches, layers, loss_fn, bn=bn, trained=trained)]
    return {k: sum(d[k] for d in per_batch) / len(per_batch) for k in per_batch[0]}


def per_example_gradients(model: nn.Module, x: torch.Tensor, y: torch.Tensor,
                          names: list[str], loss_fn: LossFn | None = None,
                          chunk: int = 64, *, bn: str = DEFAULT_BN,
                          trained: set[int] | None = None) -> dict[str, torch.Tensor]:
    """``{name: (N, *shape)}`` per-example gradients via ``torch.func`` (vmap over grad), in the
    training mode. A batch-norm layer that normalises with batch statistics makes one example's
    gradient depend on the others: that is refused (use ``bn="frozen"`` or a batch statistic)."""
    loss_fn = loss_fn or F.cross_entropy
    wanted = set(names)
    params = {n: p.detach() for n, p in model.named_parameters() if n in wanted}
    fixed = {n: p.detach() for n, p in model.named_parameters() if n not in wanted}

    def one(p, xi, yi):
        out = functional_call(model, (p, fixed), (xi.unsqueeze(0),))
        return loss_fn(out, yi.unsqueeze(0))

    g = vmap(grad(one), in_dims=(None, 0, 0), chunk_size=chunk, randomness="different")
    with _mode(model, bn, trained) as _m:
        live = [n for n, m in model.named_modules()
                if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.training]
        if live:
            raise NeuralignError(
                f"per-example gradients are not defined while batch-norm layers use batch "
                f"statistics ({', '.join(live[:3])} train under bn={bn!r}); use bn='frozen', or "
                "the minibatch statistic (auto_snr, statistic='units')")
        fixed.update({n: b.detach().clone() for n, b in model.named_buffers()})
        return g(params, x, y)


SNR_STATISTICS = ("units", "per_example")


def _unit_snr(g: torch.Tensor, eps: float) -> torch.Tensor:
    """Elementwise ``g² / (var over the first axis of g + eps)`` of one minibatch gradient."""
    if g.dim() == 0 or g.shape[0] < 2:
        return torch.zeros_like(g).reshape(-1)  # no spread to measure: no signal either
    return (g.pow(2) / (g.var(dim=0, keepdim=True) + eps)).reshape(-1)


def snr_scores(model: nn.Module, batches: list, layers: list[Layer], *,
               statistic: str = "units", loss_fn: LossFn | None = None, eps: float = 1e-8,
               bn: str = DEFAULT_BN, trained: set[int] | None = None) -> dict[str, float]:
    """Raw Auto-SNR scores per layer, averaged over the minibatches.

    ``statistic="units"`` (Lee et al.'s released code, the "eb-criterion"): the minibatch
    mean-loss gradient ``g`` of each tensor, the mean over its entries of
    ``g² / (var(g) + eps)`` with the variance taken along the tensor's first axis (across the
    output units, not across examples). Defined in any batch-norm mode.

    ``statistic="per_example"``: the mean over the layer's parameters of
    ``mean_i(g_i)² / (var_i(g_i) + eps)`` over the examples ``i`` of a minibatch (per-example
    gradients from ``torch.func``; needs batch-norm layers in eval mode, e.g. ``bn="frozen"``).
    """
    if statistic not in SNR_STATISTICS:
        raise NeuralignError(f"statistic must be one of {SNR_STATISTICS}, got {statistic!r}")
    totals = {layer.name: 0.0 for layer in layers}
    if statistic == "units":
        for g in batch_gradients(model, batches, layers, loss_fn, bn=bn, trained=trained):
            for layer in layers:
                vals = torch.cat([_unit_snr(g[n].double(), eps) for n in layer.param_names])
                vals = torch.nan_to_num(vals, nan=0.0, posinf=0.0)
                totals[layer.name] += float(vals.mean())
        return {k: v / len(batches) for k, v in totals.items()}
    names = _param_names(layers)
    for x, y in batches:
        if len(y) < 2:
            raise DataError("Auto-SNR needs minibatches of at least 2 examples")
        g = per_example_gradients(model, x, y, names, loss_fn, bn=bn, trained=trained)
        for layer in layers:
            flat = torch.cat([g[n].reshape(len(y), -1) for n in layer.param_names], dim=1)
            snr = flat.mean(0).pow(2) / (flat.var(0, unbiased=True) + eps)
            totals[layer.name] += float(snr.mean())
    return {k: v / len(batches) for k, v in totals.items()}


def change_scores(target_vec: dict[str, torch.Tensor], source_vec: dict[str, torch.Tensor],
                  model: nn.Module, layers: list[Layer]) -> dict[str, float]:
    """``‖v_tgt,ℓ − v_src,ℓ‖ / ‖θ_ℓ‖`` (the +Change extension, Algorithm 1)."""
    diff = {n: target_vec[n] - source_vec[n] for n in target_vec}
    return relative_norms(diff, model, layers)


def gradient_weights(kind: str, model: nn.Module, batches: list, layers: list[Layer], *,
                     source_batches: list | None = None, hessian: bool = False,
                     average: str = "score", memory: int = 10, lbfgs_steps: int = 10,
                     statistic: str = "units", threshold: float | None = None,
                     loss_fn: LossFn | None = None, bn: str = DEFAULT_BN,
                     trained: set[int] | None = None
                     ) -> tuple[dict[str, float], dict[str, float]]:
    """Weights and raw scores for ``kind`` in {"rgn", "snr"} with the optional Hessian
    preconditioning and source/target change, all in the training mode (``bn``, ``trained``).

    Weights are the raw scores divided by the largest, or, with ``threshold``, the 0/1 mask
    ``raw >= threshold`` (Lee et al.'s Auto-SNR). Returns ``(weights, raw_scores)``."""
    from neuralign.finetune.auto_lr.lbfgs import preconditioned_gradient

    mode = dict(bn=bn, trained=trained)
    change = source_batches is not None
    if kind == "snr":
        raw = snr_scores(model, batches, layers, statistic=statistic, loss_fn=loss_fn, **mode)
    elif kind != "rgn":
        raise NeuralignError(f"unknown gradient score {kind!r}; use 'rgn' or 'snr'")
    elif not hessian and not change:
        raw = rgn_scores(model, batches, layers, average=average, loss_fn=loss_fn, **mode)
    else:
        def vec(bs):
            if hessian:
                return preconditioned_gradient(model, bs, layers, memory=memory,
                                               steps=lbfgs_steps, loss_fn=loss_fn, **mode)
            return mean_gradient(model, bs, layers, loss_fn, **mode)

        tgt = vec(batches)
        raw = (change_scores(tgt, vec(source_batches), model, layers) if change
               else relative_norms(tgt, model, layers))
    if threshold is not None:
        return {k: float(v >= threshold) for k, v in raw.items()}, raw
    return normalise_scores(raw), raw
