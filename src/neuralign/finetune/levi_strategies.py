"""LEVI and the baselines only it needs, as fine-tuning strategies, plus its efficiency report.

Strategies (``neuralign.finetune.finetune(model, data, strategy=...)``):

- ``levi``: LEVI (``neuralign.finetune.levi.LEVI``) around ``model`` (the large model) with a
  small model trained from scratch; ``ablation`` = ``a1`` ... ``a5`` runs the paper's ablations
  (Appendix D.4) with the same code.
- ``from_scratch`` (FS): the same architecture, re-initialised (seeded), trained on the data.
- ``ft_robust`` (FT+RobustModel, Kumar et al. 2022): output ensemble of a fine-tuned and a
  linear-probed model, each temperature-calibrated on the validation data.
- ``ft_fs`` (FT+FS): output ensemble of a fine-tuned model and a model trained from scratch
  (``scratch="large"``: the same architecture; a small-model name gives LEVI's A2).

FT, HT, LP, LP-FT and FT+ZeroShot (WiSE-FT) are ``full``, ``half``, ``linear_probe``, ``lp_ft``
and ``wise_ft`` from ``neuralign.finetune.basic``.
"""

from __future__ import annotations

import copy
import dataclasses
from typing import Any

import torch
from torch import nn
from torch.utils.data import DataLoader

from neuralign.errors import NeuralignError
from neuralign.finetune.api import FinetuneContext, Strategy, register_strategy
from neuralign.finetune.basic import OutputEnsemble
from neuralign.finetune.levi import LEVI, levi_loss
from neuralign.finetune.levi_small import build_small
from neuralign.utils import eval_mode

ABLATIONS = ("a1", "a2", "a3", "a4", "a5")


# ------------------------------------------------------------------------------- helpers
def reinitialize(model: nn.Module, seed: int = 0) -> nn.Module:
    """A copy of ``model`` with every module's ``reset_parameters`` called (seeded): the same
    architecture, trained from scratch. BN running statistics are reset too."""
    new = copy.deepcopy(model)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        for m in new.modules():
            for fn in ("reset_parameters", "reset_running_stats"):
                if callable(getattr(m, fn, None)):
                    getattr(m, fn)()
    return new


class Scaled(nn.Module):
    """``model(x) / temperature``: temperature-scaled logits."""

    def __init__(self, model: nn.Module, temperature: float):
        super().__init__()
        self.model = model
        self.register_buffer("temperature", torch.tensor(float(temperature)))

    def forward(self, x):
        return self.model(x) / self.temperature


def fit_temperature(logits: torch.Tensor, targets: torch.Tensor,
                    grid: torch.Tensor | None = None) -> float:
    """The temperature minimising the validation NLL of ``logits / T`` (vectorised grid search
    over ``T`` in [0.05, 20], log-spaced)."""
    grid = torch.logspace(-1.3, 1.3, 105) if grid is None else grid
    logp = torch.log_softmax(logits.unsqueeze(0) / grid.view(-1, 1, 1), -1)  # (G, N, C)
    nll = -logp.gather(-1, targets.view(1, -1, 1).expand(grid.numel(), -1, 1)).mean((1, 2))
    return float(grid[nll.argmin()])


def calibrated_ensemble(members: list[nn.Module], val_loader) -> tuple[OutputEnsemble, list[float]]:
    """Temperature-scale each member on ``val_loader`` and average their probabilities."""
    from neuralign.train import predict

    temps = []
    for m in members:
        logits, y = predict(m, val_loader)
        temps.append(fit_temperature(logits, y))
    return OutputEnsemble([Scaled(copy.deepcopy(m), t) for m, t in zip(members, temps)]), temps


def trainable_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


@torch.no_grad()
def efficiency_report(model: nn.Module, example_input, *, trainable: int | None = None) -> dict:
    """The paper's Table 3 for one model: ``trainable_params`` (``requires_grad`` unless given),
    ``inference_params`` (parameters of the modules that run in a forward pass: a LEVI that exits
    the large model early does not count its unused head), ``total_params`` and ``flops`` per
    example (``torch.utils.flop_counter``; one multiply-add counts 2)."""
    from torch.utils.flop_counter import FlopCounterMode

    x = example_input[:1] if torch.is_tensor(example_input) else example_input
    seen: dict[int, int] = {}

    def hook(mod, args, out):
        for p in mod.parameters(recurse=False):
            seen[id(p)] = p.numel()

    handles = [m.register_forward_hook(hook) for m in model.modules()
               if any(True for _ in m.parameters(recurse=False))]
    restore = eval_mode(model)
    try:
        with FlopCounterMode(display=False) as counter:
            model(x)
    finally:
        for h in handles:
            h.remove()
        restore()
    total = sum(p.numel() for p in model.parameters())
    return {"trainable_params": int(trainable_parameters(model) if trainable is None else trainable),
            "inference_params": int(sum(seen.values())), "total_params": int(total),
            "flops": int(counter.get_total_flops())}


def _member(ctx: FinetuneContext, strategy: str, seed_offset: int = 0, model=None, **options):
    from neuralign.finetune.api import finetune

    return finetune(ctx.original_model if model is None else model, ctx.train_data,
                    strategy=strategy, epochs=ctx.epochs, lr=ctx.lr, num_classes=ctx.num_classes,
                    val_data=ctx.val_loader, seed=ctx.seed + seed_offset, device=ctx.device,
                    progress=ctx.progress, batch_size=ctx.batch_size, select=ctx.select,
                    bn=ctx.bn, train_options=ctx.train_kwargs, **options).model


def _first_batch(loader: DataLoader):
    batch = next(iter(loader))
    return batch[0] if isinstance(batch, (tuple, list)) else batch


# ------------------------------------------------------------------------------ baselines
@register_strategy("from_scratch")
class FromScratch(Strategy):
    """FS: re-initialise every weight (seeded) and train the architecture on the data."""

    summary = "train the same architecture from scratch (re-initialised, seeded)"

    def prepare(self, model: nn.Module, loader: DataLoader, ctx: FinetuneContext) -> nn.Module:
        return reinitialize(model, seed=ctx.seed)


@register_strategy("ft_robust")
class FTRobust(Strategy):
    """FT+RobustModel: temperature-calibrated output ensemble of FT and LP (needs val_data)."""

    summary = "calibrated output ensemble of full fine-tuning and a linear probe"
    defaults = {"members": None, "lp_lr": None}

    def fit(self, model, loader, ctx):
        if ctx.val_loader is None:
            raise NeuralignError("ft_robust calibrates temperatures on validation data: pass val_data")
        members = self.options["members"]
        if members is None:
            lp_lr = self.options["lp_lr"]
            members = [_member(ctx, "full"),
                       _member(dataclasses.replace(ctx, lr=10 * ctx.lr if lp_lr is None else lp_lr),
                               "linear_probe")]
        ens, temps = calibrated_ensemble(list(members), ctx.val_loader)
        self.info["temperatures"] = temps
        return ens, None


@register_strategy("ft_fs")
class FTFS(Strategy):
    """FT+FS: output ensemble of a fine-tuned model and a from-scratch model. ``scratch``:
    ``large`` (same architecture re-initialised) or a small-model name (then a LEVI A4 model:
    small model + one adapting head; this is LEVI's ablation A2)."""

    summary = "output ensemble of full fine-tuning and a model trained from scratch"
    defaults = {"members": None, "scratch": "large", "hidden": 1024}

    def fit(self, model, loader, ctx):
        members = self.options["members"]
        if members is None:
            ft = _member(ctx, "full")
            if self.options["scratch"] == "large":
                fs = _member(ctx, "from_scratch")
            else:
                fs = _member(ctx, "levi", ablation="a4", small=self.options["scratch"],
                             hidden=self.options["hidden"])
            members = [ft, fs]
        return OutputEnsemble([copy.deepcopy(m) for m in members]), None


# -------------------------------------------------------------------------------- LEVI
def _taps(value):
    if value is None or isinstance(value, (list, tuple)):
        return value
    return [t.strip() for t in str(value).split(",") if t.strip()]


@register_strategy("levi")
class Levi(Strategy):
    """LEVI: the large model (``large_mode``: frozen, half, lora, full) tapped at ``taps``,
    a small model (``small``: cnn4, text_mlp, a model name or module) trained from scratch, one
    adapting MLP (``hidden`` units) per tap, loss = mean of the head losses. ``ablation``:
    a1 (ensemble of two FT models), a2 (FT + small model), a3 (no small model), a4 (small
    model, one head), a5 (small model, ``num_heads`` heads)."""

    summary = "LEVI: layer-wise ensemble of the (frozen/half/LoRA) model and a small model"
    defaults = {"small": "cnn4", "taps": None, "hidden": 1024, "large_mode": "frozen",
                "lora_r": 8, "lora_alpha": None, "lora_targets": None, "loss_weights": None,
                "pool": "auto", "task": "classification", "ablation": None, "num_heads": None,
                "large_lr_scale": 1.0, "small_options": None, "pad_token_id": None}

    def fit(self, model, loader, ctx):
        o = self.options
        ab = None if o["ablation"] in (None, "", "none") else str(o["ablation"]).lower()
        if ab is not None and ab not in ABLATIONS:
            raise NeuralignError(f"unknown LEVI ablation {ab!r}; use one of {', '.join(ABLATIONS)}")
        self.info["ablation"] = ab
        if ab == "a1":
            return OutputEnsemble([_member(ctx, "full"), _member(ctx, "full", seed_offset=1)]), None
        if ab == "a2":
            return OutputEnsemble([_member(ctx, "full"),
                                   _member(ctx, "levi", ablation="a4", small=o["small"],
                                           hidden=o["hidden"], task=o["task"],
                                           small_options=o["small_options"])]), None
        x0 = _first_batch(loader)
        x0 = x0[:2] if torch.is_tensor(x0) else x0
        small = None if ab == "a3" else build_small(o["small"], x0, seed=ctx.seed + 101,
                                                     **(o["small_options"] or {}))
        large = None if ab in ("a4", "a5") else model
        if large is not None and ctx.device is not None:
            x0 = x0.to(ctx.device) if torch.is_tensor(x0) else x0
        if small is not None and ctx.device is not None:
            small = small.to(ctx.device)
        num_heads = 1 if ab == "a4" else (o["num_heads"] or len(_taps(o["taps"]) or [0] * 4))
        taps = _taps(o["taps"])
        lw = o["loss_weights"]
        if isinstance(lw, str):
            lw = [float(v) for v in lw.split(",")]
        levi = LEVI(large, small, num_outputs=ctx.num_classes, example_input=x0, taps=taps,
                    hidden=int(o["hidden"]), task=o["task"], loss_weights=lw,
                    num_heads=num_heads, pool=o["pool"], large_mode=o["large_mode"],
                    lora_r=int(o["lora_r"]), lora_alpha=o["lora_alpha"],
                    lora_targets=_taps(o["lora_targets"]), pad_token_id=o["pad_token_id"],
                    seed=ctx.seed)
        groups = [{"params": [p for n, p in levi.named_parameters()
                              if p.requires_grad and not n.startswith("large.")]}]
        large_params = [p for n, p in levi.named_parameters()
                        if p.requires_grad and n.startswith("large.")]
        if large_params:
            groups.append({"params": large_params, "lr_scale": float(o["large_lr_scale"])})
        self.info.update(taps=levi.taps, trainable_params=trainable_parameters(levi),
                         config=levi.config)
        kw = dict(ctx.train_kwargs)
        kw["loss_fn"] = levi_loss(levi)
        history = dataclasses.replace(ctx, train_kwargs=kw).train(levi, loader, param_groups=groups)
        return levi, history

    def finalize(self, model: nn.Module, ctx: FinetuneContext) -> nn.Module:
        return model


def strategy_info() -> dict[str, Any]:
    """Names of the strategies this module registers."""
    return {"levi": Levi, "from_scratch": FromScratch, "ft_robust": FTRobust, "ft_fs": FTFS}
