"""Model soups (Wortsman et al., 2022): uniform, greedy, learned (globally or per layer)."""

from __future__ import annotations

import copy
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call

from neuralign.errors import DataError
from neuralign.merge._util import (
    as_state_dict,
    check_finite,
    check_same_architecture,
    device_of,
    split_batch,
)
from neuralign.merge._util import (
    evaluate as _evaluate,
)
from neuralign.merge.basic import average, reset_bn
from neuralign.utils import seed_everything


@dataclass
class SoupResult:
    model: nn.Module
    weights: list[float] | torch.Tensor
    info: dict = field(default_factory=dict)


def _score(model, loader, evaluate, bn_loader):
    if bn_loader is not None:
        model = reset_bn(model, bn_loader)
    r = evaluate(model) if evaluate is not None else _evaluate(model, loader)
    return float(r["accuracy"]), float(r["loss"]), model


def greedy_soup(models: Sequence[nn.Module], loader: Iterable, *,
                evaluate: Callable[[nn.Module], dict] | None = None,
                bn_loader: Iterable | None = None) -> SoupResult:
    """Greedy soup: sort by held-out accuracy; add a model only if the soup's accuracy does not drop.

    The soup is never worse on ``loader`` than the best single model (ties keep the model, as
    Wortsman et al.'s ``>=``). ``weights`` in the result are the uniform weights of the kept models.
    Every model scored (the single models that set the order, the first ingredient and every
    candidate soup) is scored the same way: with its batch-norm statistics re-estimated on
    ``bn_loader`` when one is given, as it is, otherwise.
    """
    if not models:
        raise ValueError("greedy_soup needs at least one model")
    check_same_architecture([as_state_dict(m) for m in models])
    singles = [_score(m, loader, evaluate, bn_loader) for m in models]
    scores = [s[0] for s in singles]
    order = sorted(range(len(models)), key=lambda i: -scores[i])
    kept = [order[0]]
    best_acc, best_loss, best_model = singles[order[0]]
    singles = None  # the other scored copies are not needed any more
    if best_model is models[order[0]]:
        best_model = copy.deepcopy(best_model)  # the result never aliases an input
    for i in order[1:]:
        cand = average([models[j] for j in kept + [i]])
        acc, loss, cand = _score(cand, loader, evaluate, bn_loader)
        if acc >= best_acc:
            kept.append(i)
            best_acc, best_loss, best_model = acc, loss, cand
    w = [1.0 / len(kept) if i in kept else 0.0 for i in range(len(models))]
    return SoupResult(best_model, w, {"ingredients": kept, "order": order, "individual_accuracy": scores,
                                      "accuracy": best_acc, "loss": best_loss})


def learned_soup(models: Sequence[nn.Module], loader: Iterable, *, per_layer: bool = False,
                 epochs: int = 5, lr: float = 0.05, seed: int = 0,
                 max_batches: int | None = None) -> SoupResult:
    """Learned soup: mixing coefficients ``softmax(alpha)`` trained on held-out data by Adam.

    The models stay frozen; only ``alpha`` (one per model, or with ``per_layer=True`` one per
    model and parameter tensor) is learned, starting from the uniform soup. Buffers (batch-norm
    statistics) are mixed with the same (detached) coefficients.
    """
    if not models:
        raise ValueError("learned_soup needs at least one model")
    sds = [as_state_dict(m) for m in models]
    for i, sd in enumerate(sds):
        check_finite(sd, f"model {i}")
    check_same_architecture(sds)
    seed_everything(seed)
    base = models[0]
    dev = device_of(base)
    pnames = [n for n, _ in base.named_parameters()]
    keys = [k for k, v in sds[0].items() if v.is_floating_point()]
    stacks = {k: torch.stack([sd[k].to(dev) for sd in sds]) for k in keys}
    J = len(models)
    alpha = torch.zeros(J, len(pnames) if per_layer else 1, device=dev, requires_grad=True)
    opt = torch.optim.Adam([alpha], lr=lr)
    layer_index = {n: i for i, n in enumerate(pnames)}

    def mixed(detach_all=False):
        w = torch.softmax(alpha, 0)
        wmean = w.mean(1).detach()
        out = {}
        for k in keys:
            if k in layer_index:
                wk = w[:, layer_index[k] if per_layer else 0]
                if detach_all:
                    wk = wk.detach()
            else:
                wk = wmean
            s = stacks[k]
            out[k] = torch.tensordot(wk.to(s.dtype), s, dims=1)
        return out

    model = _frozen_copy(base)
    model.eval()
    steps = 0
    for _ in range(epochs):
        for i, batch in enumerate(loader):
            if max_batches is not None and i >= max_batches:
                break
            x, y = split_batch(batch)
            out = functional_call(model, mixed(), (x.to(dev),))
            loss = F.cross_entropy(out, y.to(dev))
            opt.zero_grad()
            loss.backward()
            opt.step()
            steps += 1
    if steps == 0:
        raise DataError("the data loader yielded no batches; pass a non-empty held-out loader")
    with torch.no_grad():
        final = {k: v.detach().clone() for k, v in mixed(True).items()}
        for k, v in sds[0].items():
            if k not in final:
                final[k] = v.clone()
    result = _frozen_copy(base)
    result.load_state_dict(final)
    for p in result.parameters():
        p.requires_grad_(True)
    w = torch.softmax(alpha.detach(), 0).cpu()
    return SoupResult(result.eval(), w[:, 0].tolist() if not per_layer else w,
                      {"per_layer": per_layer, "steps": steps, "param_names": pnames})


def _frozen_copy(m: nn.Module) -> nn.Module:
    c = copy.deepcopy(m)
    for p in c.parameters():
        p.requires_grad_(False)
    return c
