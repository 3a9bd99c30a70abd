"""LP-FT (Kumar et al., 2022): train the linear probe to convergence, then fine-tune everything.

Kumar et al. fit the probe as an L2-regularised logistic regression on the frozen features and
pick the regularisation strength on validation data; only then does full fine-tuning start
(usually at a smaller rate than plain fine-tuning would use: in a benchmark the rate comes from
the protocol's grid). Here the features (the head's inputs, the model in eval mode) are computed
once and cached, each strength of ``l2_grid`` is solved by full-batch L-BFGS in float64 from
zero (a strictly convex problem: one solution), and the strength with the best validation
accuracy wins: on ``val_data`` when given, otherwise on a seeded 20% of the training set that
the sweep holds out (the chosen strength is then refit on all of it).

``probe="sgd"`` keeps the older recipe: ``lp_epochs`` SGD epochs on the head at ``lp_lr``.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader

from neuralign.errors import NeuralignError
from neuralign.finetune.api import (
    FinetuneContext,
    Strategy,
    as_loader,
    head_module,
    register_strategy,
)
from neuralign.utils import eval_mode

__all__ = ["LPFT", "head_features", "fit_logistic", "probe_head"]

DEFAULT_L2_GRID = (1e-5, 1e-4, 1e-3, 1e-2, 1e-1)


@torch.no_grad()
def head_features(model: nn.Module, data: Any, batch_size: int = 256) -> tuple[torch.Tensor,
                                                                            torch.Tensor]:
    """``(features, labels)``: the inputs of the classifier head over ``data``, in eval mode."""
    _, head = head_module(model)
    loader = as_loader(getattr(data, "dataset", data), batch_size=batch_size)
    feats: list[torch.Tensor] = []
    grab = head.register_forward_pre_hook(lambda _m, inp: feats.append(inp[0].detach()))
    restore = eval_mode(model)
    dev = next(model.parameters()).device
    ys = []
    try:
        for batch in loader:
            model(batch[0].to(dev))
            ys.append(torch.as_tensor(batch[1]))
    finally:
        grab.remove()
        restore()
    x = torch.cat([f.reshape(f.shape[0], -1) for f in feats]).double().cpu()
    return x, torch.cat(ys).long().cpu()


def fit_logistic(x: torch.Tensor, y: torch.Tensor, num_classes: int, l2: float, *,
                 max_iter: int = 500, tol: float = 1e-9) -> tuple[torch.Tensor, torch.Tensor,
                                                                  float]:
    """Multinomial logistic regression ``min mean CE(xWᵀ + b, y) + l2 · ‖W‖²`` (bias free of
    the penalty) by full-batch L-BFGS from zero. Returns ``(W, b, final gradient norm)``."""
    w = torch.zeros(num_classes, x.shape[1], dtype=torch.float64, requires_grad=True)
    b = torch.zeros(num_classes, dtype=torch.float64, requires_grad=True)
    opt = torch.optim.LBFGS([w, b], lr=1.0, max_iter=max_iter, tolerance_grad=tol,
                            tolerance_change=1e-12, history_size=20,
                            line_search_fn="strong_wolfe")

    def objective() -> torch.Tensor:
        return F.cross_entropy(x @ w.T + b, y) + l2 * w.pow(2).sum()

    def closure() -> torch.Tensor:
        opt.zero_grad()
        loss = objective()
        loss.backward()
        return loss

    opt.step(closure)
    gw, gb = torch.autograd.grad(objective(), [w, b])
    gnorm = float(torch.sqrt(gw.pow(2).sum() + gb.pow(2).sum()))
    return w.detach(), b.detach(), gnorm


def _accuracy(x: torch.Tensor, y: torch.Tensor, w: torch.Tensor, b: torch.Tensor) -> float:
    return float(((x @ w.T + b).argmax(1) == y).double().mean())


def probe_head(model: nn.Module, train_data: Any, val_data: Any, num_classes: int, *,
               l2_grid: tuple[float, ...] = DEFAULT_L2_GRID, seed: int = 0
               ) -> dict[str, Any]:
    """Fit the converged probe on ``model``'s frozen features and write it into the head (in
    place). Returns what was chosen: ``l2``, ``val_accuracy`` per strength, ``grad_norm``."""
    _, head = head_module(model)
    if not isinstance(head, nn.Linear):
        raise NeuralignError(
            f"the converged probe needs an nn.Linear head, this model's is {type(head).__name__}; "
            "use lp_ft with probe='sgd'"
        )
    if not l2_grid:
        raise NeuralignError("l2_grid must name at least one regularisation strength")
    x, y = head_features(model, train_data)
    if val_data is not None:
        xv, yv = head_features(model, val_data)
        xt, yt = x, y
        split = "val_data"
    else:
        order = torch.randperm(len(y), generator=torch.Generator().manual_seed(seed))
        n_val = max(1, len(y) // 5)
        xv, yv, xt, yt = x[order[:n_val]], y[order[:n_val]], x[order[n_val:]], y[order[n_val:]]
        split = "held-out 20% of the training data"
    scores = {}
    for l2 in l2_grid:
        w, b, _ = fit_logistic(xt, yt, num_classes, float(l2))
        scores[float(l2)] = _accuracy(xv, yv, w, b)
    best = max(scores, key=lambda k: (scores[k], k))  # ties: the stronger regularisation
    w, b, gnorm = fit_logistic(x, y, num_classes, best)
    with torch.no_grad():
        head.weight.copy_(w.to(head.weight.dtype))
        if head.bias is not None:
            head.bias.copy_(b.to(head.bias.dtype))
    return {"l2": best, "val_accuracy": scores, "grad_norm": gnorm, "selected_on": split,
            "train_accuracy": _accuracy(x, y, w, b)}


@register_strategy("lp_ft")
class LPFT(Strategy):
    """LP-FT: a converged linear probe (``probe="lbfgs"``, L2 strength from ``l2_grid`` picked on
    validation), then full fine-tuning for ``epochs`` at ``lr``. ``probe="sgd"``: the older
    ``lp_epochs`` (default ``max(1, epochs // 3)``) SGD epochs at ``lp_lr`` (default ``10 lr``)."""

    summary = "converged linear probe (L-BFGS, L2 picked on validation), then full fine-tuning"
    defaults = {"probe": "lbfgs", "l2_grid": DEFAULT_L2_GRID, "lp_epochs": None, "lp_lr": None}

    def fit(
        self, model: nn.Module, loader: DataLoader, ctx: FinetuneContext
    ) -> tuple[nn.Module, Any]:
        from neuralign.finetune.basic import head_params

        probe = self.options["probe"]
        if probe == "lbfgs" and (self.options["lp_epochs"] is not None
                                 or self.options["lp_lr"] is not None):
            raise NeuralignError("lp_ft: lp_epochs and lp_lr set the SGD probe; pass "
                                 "probe='sgd' with them (the default probe is converged L-BFGS)")
        if probe == "lbfgs":
            val = None if ctx.val_loader is None else ctx.val_loader.dataset
            chosen = probe_head(model, loader.dataset, val, int(ctx.num_classes),
                                l2_grid=tuple(self.options["l2_grid"]), seed=ctx.seed)
            self.info.update(probe="lbfgs", probe_l2=chosen["l2"],
                             probe_val_accuracy=chosen["val_accuracy"],
                             probe_grad_norm=chosen["grad_norm"],
                             probe_selected_on=chosen["selected_on"],
                             probe_train_accuracy=chosen["train_accuracy"])
            h_lp = None
        elif probe == "sgd":
            lp_epochs = self.options["lp_epochs"]
            lp_epochs = max(1, ctx.epochs // 3) if lp_epochs is None else int(lp_epochs)
            lp_lr = self.options["lp_lr"]
            lp_lr = 10 * ctx.lr if lp_lr is None else float(lp_lr)
            h_lp = ctx.train(model, loader, epochs=lp_epochs, lr=lp_lr,
                             param_groups=[{"params": head_params(model)}])
            self.info.update(probe="sgd", lp_epochs=lp_epochs, lp_lr=lp_lr)
        else:
            raise NeuralignError(f"lp_ft: probe must be 'lbfgs' or 'sgd', got {probe!r}")
        h_ft = ctx.train(model, loader)
        return model, {"lp": h_lp, "ft": h_ft}
