"""The automatic per-layer learning-rate strategies of Agarwala et al. in the fine-tuning registry.

Each produces weights ``w_ℓ`` (rate ``lr · w_ℓ``; ``w_ℓ = 0`` freezes) applied through optimizer
parameter groups with ``lr_scale``. ``FinetuneResult.info`` carries ``layer_weights`` (the last
weights used), ``weights_history`` (each recomputation), ``raw_scores`` and ``granularity``.
"""

from __future__ import annotations

import copy
from typing import Any, ClassVar

from torch import nn
from torch.utils.data import DataLoader

from neuralign.errors import NeuralignError
from neuralign.finetune.api import FinetuneContext, Strategy, as_loader, register_strategy
from neuralign.finetune.auto_lr.criticality import criticality_scores, top_k_weights
from neuralign.finetune.auto_lr.grad_scores import gradient_weights, take_batches
from neuralign.finetune.auto_lr.layers import (
    model_layers,
    param_groups_from_weights,
    set_group_scales,
)
from neuralign.finetune.auto_lr.surprise import surprise_weights
from neuralign.utils import model_device

_COMMON = {"granularity": "tensor", "include_norm": False, "num_batches": 5}


def _reshuffled(loader: DataLoader, ctx: FinetuneContext, salt: int) -> DataLoader:
    """A fresh shuffle of the training set, so scoring never advances the training loader."""
    ds = getattr(loader, "dataset", None)
    if ds is None:
        return loader
    return as_loader(ds, batch_size=loader.batch_size or ctx.batch_size, shuffle=True,
                     seed=ctx.seed * 7919 + salt)


def _source_batches(ctx: FinetuneContext, n: int, device) -> list:
    src = ctx.get("source_data")
    if src is None:
        raise NeuralignError("this strategy compares source and target data: pass "
                             "source_data=<dataset, loader or data name of the pre-training "
                             "data> (CLI: -o source_data=fashion_mnist)")
    if isinstance(src, str):  # from the CLI: -o source_data=fashion_mnist (its training split)
        from neuralign.data import load_data

        src = load_data(src).train  # its fixed split (data_seed 0), not the model's seed
    loader = as_loader(src, batch_size=ctx.batch_size, shuffle=True, seed=ctx.seed + 17)
    return take_batches(loader, n, device)


class _PerLayer(Strategy):
    """Shared plumbing: layers, parameter groups from ``self.weights``, info."""

    defaults: ClassVar[dict[str, Any]] = dict(_COMMON)

    def _layers(self, model: nn.Module):
        self.layers = model_layers(model, self.options["granularity"],
                                   self.options["include_norm"])
        self.info["granularity"] = self.options["granularity"]
        self.info["layers"] = [layer.name for layer in self.layers]

    def _record(self, weights: dict[str, float], raw: dict[str, float] | None = None) -> None:
        self.weights = dict(weights)
        self.info["layer_weights"] = dict(weights)
        self.info.setdefault("weights_history", []).append(dict(weights))
        if raw is not None:
            self.info["raw_scores"] = dict(raw)

    rescored: ClassVar[bool] = False

    def param_groups(self, model: nn.Module) -> list[dict]:
        return param_groups_from_weights(model, self.layers, self.weights,
                                         rescored=self.rescored)


class _Rescore:
    """Train-loop callback: recompute the weights every epoch or every k steps, in place."""

    def __init__(self, strategy: _GradientStrategy, loader: DataLoader, ctx: FinetuneContext):
        self.s, self.loader, self.ctx, self.steps = strategy, loader, ctx, 0

    def _update(self, model: nn.Module, optimizer, salt: int) -> None:
        weights = self.s.compute(model, _reshuffled(self.loader, self.ctx, salt), self.ctx)
        set_group_scales(optimizer, weights)
        if self.s.options["rebuild_optimizer"]:  # Lee et al.'s code rebuilds Adam: state lost
            optimizer.state.clear()

    def on_epoch_start(self, model, optimizer, epoch):
        if epoch > 0 and self.s.options["every"] == "epoch":
            self._update(model, optimizer, 1000 + epoch)

    def after_step(self, model, optimizer):
        every = self.s.options["every"]
        self.steps += 1
        if isinstance(every, int) and not isinstance(every, bool) and self.steps % every == 0:
            self._update(model, optimizer, 100000 + self.steps)


class _GradientStrategy(_PerLayer):
    """Scores gradients in the mode the model trains in: ``model.train()`` with the run's
    batch-norm policy ``ctx.bn``, the scored layers counting as trained (``rescored``)."""

    kind, hessian, change = "rgn", False, False
    rescored = True
    defaults: ClassVar[dict[str, Any]] = {
        **_COMMON, "every": "epoch", "rebuild_optimizer": False, "average": "score",
        "memory": 10, "lbfgs_steps": 10, "threshold": None, "statistic": "units",
        "source_data": None}

    def compute(self, model: nn.Module, loader: DataLoader, ctx: FinetuneContext):
        device = model_device(model)
        n = self.options["num_batches"]
        batches = take_batches(loader, n, device)
        src = _source_batches(ctx, n, device) if self.change else None
        trained = {id(p) for layer in self.layers for p in
                   (dict(model.named_parameters())[k] for k in layer.param_names)}
        weights, raw = gradient_weights(
            self.kind, model, batches, self.layers, source_batches=src, hessian=self.hessian,
            average=self.options["average"], memory=self.options["memory"],
            lbfgs_steps=self.options["lbfgs_steps"], statistic=self.options["statistic"],
            threshold=self.options["threshold"], bn=ctx.bn, trained=trained)
        self.info["score_mode"] = {"bn": ctx.bn, "model": "train"}
        self._record(weights, raw)
        return weights

    def prepare(self, model: nn.Module, loader: DataLoader, ctx: FinetuneContext) -> nn.Module:
        every = self.options["every"]
        if every not in ("epoch", "once") and not (isinstance(every, int) and every > 0):
            raise NeuralignError(f"every must be 'epoch', 'once' or a positive step count, "
                                 f"got {every!r}")
        self._layers(model)
        self.compute(model, _reshuffled(loader, ctx, 0), ctx)
        return model

    def callbacks(self, model, loader, ctx):
        return [] if self.options["every"] == "once" else [_Rescore(self, loader, ctx)]


@register_strategy("auto_rgn")
class AutoRGN(_GradientStrategy):
    summary = "Auto-RGN (Lee et al.): rate ∝ ‖∇θ_ℓ L‖/‖θ_ℓ‖, recomputed every epoch"


@register_strategy("auto_snr")
class AutoSNR(_GradientStrategy):
    """Lee et al.'s Auto-SNR (their code's "eb-criterion"): the minibatch gradient's
    ``g² / var`` across output units, averaged per tensor; layers at or above ``threshold``
    (0.95) train at the full rate, the others are frozen (a 0/1 mask, no divide-by-max)."""

    summary = "Auto-SNR (Lee et al.): 0/1 mask, SNR >= threshold (0.95) trains"
    kind = "snr"
    defaults: ClassVar[dict[str, Any]] = {**_GradientStrategy.defaults, "threshold": 0.95}


@register_strategy("auto_snr_scaled")
class AutoSNRScaled(_GradientStrategy):
    """Not Lee et al.'s rule: rate ∝ per-example gradient SNR divided by the largest (what
    ``auto_snr`` did before it followed the paper's code). Per-example gradients need the
    batch-norm layers in eval mode: use ``bn="frozen"`` on a BN network."""

    summary = "per-example gradient SNR, divided by the max (not Lee's mask)"
    kind = "snr"
    defaults: ClassVar[dict[str, Any]] = {**_GradientStrategy.defaults,
                                          "statistic": "per_example"}


@register_strategy("auto_rgn_hessian")
class AutoRGNHessian(_GradientStrategy):
    summary = "Auto-RGN on the L-BFGS-preconditioned gradient (Newton direction)"
    hessian = True
    defaults: ClassVar[dict[str, Any]] = {**_GradientStrategy.defaults, "every": "once"}


@register_strategy("auto_rgn_change")
class AutoRGNChange(_GradientStrategy):
    summary = "Auto-RGN of the target-minus-source gradient (needs source_data)"
    change = True


@register_strategy("auto_rgn_hessian_change")
class AutoRGNHessianChange(_GradientStrategy):
    summary = "Algorithm 1: ‖H_t g_t − H_s g_s‖_ℓ / ‖θ_ℓ‖ (needs source_data)"
    hessian = change = True
    defaults: ClassVar[dict[str, Any]] = {**_GradientStrategy.defaults, "every": "once"}


@register_strategy("layerwise_surprise")
class LayerwiseSurprise(_PerLayer):
    summary = "layerwise surprise: mean over post-activation units of KL(target ‖ source)"
    diff = False
    defaults: ClassVar[dict[str, Any]] = {
        **_COMMON, "num_batches": 10, "bins": 8, "smoothing": 1e-3, "reduce": "mean",
        "at": "post_activation", "source_data": None}

    def prepare(self, model, loader, ctx):
        self._layers(model)
        device = model_device(model)
        n = self.options["num_batches"]
        tgt = take_batches(_reshuffled(loader, ctx, 0), n, device)
        weights, raw = surprise_weights(
            model, _source_batches(ctx, n, device), tgt, self.layers, diff=self.diff,
            bins=self.options["bins"], smoothing=self.options["smoothing"],
            reduce=self.options["reduce"], at=self.options["at"])
        self.info.update(surprise_reduce=self.options["reduce"], surprise_at=self.options["at"])
        self._record(weights, raw)
        return model


@register_strategy("layerwise_surprise_diff")
class LayerwiseSurpriseDiff(LayerwiseSurprise):
    summary = "layerwise surprise increment max(0, s_ℓ − s_ℓ₋₁) over the previous layer"
    diff = True


@register_strategy("module_criticality")
class ModuleCriticality(_PerLayer):
    """Algorithms 3/4. ``pretune_epochs=e > 0``: full fine-tune a copy for ``e`` epochs, measure
    criticality on it, roll back to the pre-trained model and fine-tune with those weights. A
    list of ``pretune_epochs`` picks the best by validation accuracy (needs ``val_data``)."""

    summary = "module criticality: rate ∝ loss increase when the layer is removed (top-K)"
    defaults: ClassVar[dict[str, Any]] = {
        **_COMMON, "num_batches": 10, "removal": "random", "on": "source",
        "top_k": None, "pretune_epochs": 0, "source_data": None}

    def _weights(self, model, loader, ctx, pretune: int):
        if self.options["removal"] not in ("identity", "random"):
            raise NeuralignError(f"removal must be 'identity' or 'random', "
                                 f"got {self.options['removal']!r}")
        device, n = model_device(model), self.options["num_batches"]
        probe = model
        if pretune > 0:
            probe = copy.deepcopy(model)
            ctx.train(probe, loader, epochs=pretune)
        if self.options["on"] == "source":
            batches = _source_batches(ctx, n, device)
        elif self.options["on"] == "target":
            batches = take_batches(_reshuffled(loader, ctx, 0), n, device)
        else:
            raise NeuralignError(f"on must be 'source' or 'target', got {self.options['on']!r}")
        raw = criticality_scores(probe, batches, self.layers, removal=self.options["removal"],
                                 granularity=self.options["granularity"], seed=ctx.seed)
        return top_k_weights(raw, self.options["top_k"]), raw

    def prepare(self, model, loader, ctx):
        self._layers(model)
        pre = self.options["pretune_epochs"]
        self._candidates = list(pre) if isinstance(pre, (list, tuple)) else [int(pre)]
        if len(self._candidates) > 1 and ctx.val_loader is None:
            raise NeuralignError("choosing pretune_epochs among several needs val_data")
        self._scored = [self._weights(model, loader, ctx, e) for e in self._candidates]
        self._record(*self._scored[0])
        return model

    def fit(self, model, loader, ctx):
        if len(self._candidates) == 1:
            return super().fit(model, loader, ctx)
        from neuralign.train import evaluate

        best = None
        for e, (weights, raw) in zip(self._candidates, self._scored):
            cand = copy.deepcopy(model)
            hist = ctx.train(cand, loader, param_groups=param_groups_from_weights(
                cand, self.layers, weights))
            acc = evaluate(cand, ctx.val_loader, device=ctx.device)["accuracy"]
            self.info.setdefault("val_accuracy_by_pretune", {})[e] = acc
            if best is None or acc > best[0]:
                best = (acc, e, cand, hist, weights, raw)
        _, e, cand, hist, weights, raw = best
        self.info["pretune_epochs"] = e
        self.info["weights_history"] = []
        self._record(weights, raw)
        return cand, hist


@register_strategy("cross_validation")
class CrossValidation(_PerLayer):
    """Fine-tune every contiguous subset of blocks (length ≤ ``max_len``), freeze the rest, keep
    the subset with the best validation accuracy (needs ``val_data``)."""

    summary = "cross-validation over contiguous block subsets (needs val_data)"
    defaults: ClassVar[dict[str, Any]] = {**_COMMON, "max_len": None}

    def prepare(self, model, loader, ctx):
        if ctx.val_loader is None:
            raise NeuralignError("cross_validation picks layers by validation accuracy: "
                                 "pass val_data")
        self._layers(model)
        self.blocks = model_layers(model, "block", include_norm=True)
        return model

    def fit(self, model, loader, ctx):
        from neuralign.train import evaluate

        nb, max_len = len(self.blocks), self.options["max_len"] or len(self.blocks)
        best, scores = None, {}
        for i in range(nb):
            for j in range(i, min(nb, i + max_len)):
                chosen = self.blocks[i:j + 1]
                cand = copy.deepcopy(model)
                cp = dict(cand.named_parameters())
                group = [cp[n] for b in chosen for n in b.param_names]
                hist = ctx.train(cand, loader, param_groups=[{"params": group}])
                acc = evaluate(cand, ctx.val_loader, device=ctx.device)["accuracy"]
                key = f"{chosen[0].name}..{chosen[-1].name}"
                scores[key] = acc
                if best is None or acc > best[0]:
                    best = (acc, chosen, cand, hist)
        acc, chosen, cand, hist = best
        names = {n for b in chosen for n in b.param_names}
        self.info.update(cv_val_accuracy=scores, chosen_blocks=[b.name for b in chosen])
        self._record({layer.name: float(all(n in names for n in layer.param_names))
                      for layer in self.layers})
        return cand, hist
