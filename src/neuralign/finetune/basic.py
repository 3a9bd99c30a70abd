"""The standard fine-tuning strategies: ``full`` (ERM), ``linear_probe``, ``lp_ft`` (in
``lpft.py``), ``half``, ``wise_ft``, the output ``ensemble`` and ``bn_adapt`` (batch-norm
statistics only)."""

from __future__ import annotations

import copy
from typing import Any

import torch
from torch import nn
from torch.utils.data import DataLoader

from neuralign.errors import NeuralignError
from neuralign.finetune.api import (
    FinetuneContext,
    Strategy,
    head_module,
    register_strategy,
)

__all__ = [
    "Full",
    "BNAdapt",
    "LinearProbe",
    "LPFT",
    "Half",
    "WiseFT",
    "Ensemble",
    "OutputEnsemble",
    "head_params",
    "top_half_blocks",
    "interpolate_state",
]


def head_params(model: nn.Module) -> list[nn.Parameter]:
    _, head = head_module(model)
    return list(head.parameters())


def top_half_blocks(model: nn.Module) -> list[str]:
    """The top ceil(n/2) blocks of ``block_names(model)`` (the head is always tuned as well)."""
    from neuralign.models import block_names

    names = block_names(model)
    if not names:
        raise NeuralignError(f"{type(model).__name__} has no blocks to split in half")
    return names[len(names) // 2 :]


def interpolate_state(
    a: dict[str, torch.Tensor], b: dict[str, torch.Tensor], alpha: float
) -> dict[str, torch.Tensor]:
    """``(1 - alpha) * a + alpha * b`` for float tensors; integer buffers are taken from ``b``."""
    if set(a) != set(b):
        raise NeuralignError("cannot interpolate: the two state dicts have different keys")
    out = {}
    for k, vb in b.items():
        va = a[k]
        if va.shape != vb.shape:
            raise NeuralignError(
                f"cannot interpolate {k!r}: shapes {tuple(va.shape)} vs {tuple(vb.shape)}"
            )
        out[k] = torch.lerp(va.to(vb.dtype), vb, alpha) if vb.is_floating_point() else vb.clone()
    return out


@register_strategy("full")
class Full(Strategy):
    """Full fine-tuning with the cross-entropy (ERM) loss: every parameter trains."""

    summary = "full fine-tuning (ERM): every parameter trains"


@register_strategy("bn_adapt")
class BNAdapt(Strategy):
    """Batch-norm adaptation only: re-estimate every batch-norm layer's running statistics on
    the fine-tuning data (cumulative average over one pass, ``neuralign.merge.reset_bn``); no
    weight changes, no labels used. The row that tells how much of an input-shift gain is the
    statistics alone. Needs the model's own head (an unchanged label set)."""

    summary = "re-estimate batch-norm statistics on the target data; no weight changes"
    defaults = {"max_batches": None}

    def fit(
        self, model: nn.Module, loader: DataLoader, ctx: FinetuneContext
    ) -> tuple[nn.Module, Any]:
        from neuralign.finetune.bn import bn_modules
        from neuralign.merge import reset_bn

        if not bn_modules(model):
            raise NeuralignError("bn_adapt: the model has no batch-norm layer to adapt")
        if ctx.extras.get("_new_head"):
            raise NeuralignError(
                "bn_adapt changes no weight, so a freshly initialised head would stay random: "
                "use it only when the label set is unchanged (no num_classes change, no "
                "reset_head)"
            )
        from neuralign.finetune.api import as_loader

        ds = getattr(loader, "dataset", None)  # one pass in a fixed order (not the shuffle)
        passes = loader if ds is None else as_loader(ds, batch_size=loader.batch_size or 32)
        out = reset_bn(model, passes, max_batches=self.options["max_batches"])
        self.info.update(bn="adapt", bn_requested=ctx.bn, weights_changed=False)
        return out, None


@register_strategy("linear_probe")
class LinearProbe(Strategy):
    """Only the classifier head trains; the features (and their BN statistics) stay fixed."""

    summary = "linear probe: only the head trains"

    def param_groups(self, model: nn.Module) -> list[dict]:
        return [{"params": head_params(model)}]


@register_strategy("half")
class Half(Strategy):
    """The top half of ``block_names(model)`` and the head train; the bottom half is frozen."""

    summary = "tune the top half of the blocks (and the head)"

    def param_groups(self, model: nn.Module) -> list[dict]:
        tops = top_half_blocks(model)
        head_name, _ = head_module(model)
        prefixes = tuple(f"{n}." for n in [*tops, head_name])
        params = [p for n, p in model.named_parameters() if n.startswith(prefixes)]
        self.info["trained_blocks"] = tops
        return [{"params": params}]


@register_strategy("wise_ft")
class WiseFT(Strategy):
    """WiSE-FT (Wortsman et al., 2022): ``(1 - alpha) * start + alpha * fine-tuned`` weights.

    The start is the model as it entered training (after a new head, if any); with a new random
    head, ``lp_epochs > 0`` first probes the head so the start's head is a trained one (the
    usual choice when there is no zero-shot head). Float buffers (BN statistics) are
    interpolated too; ``alphas`` (a list) also reports every alpha in ``info`` via ``models``.
    """

    summary = "weight interpolation between the start and the fine-tuned model (alpha)"
    defaults = {"alpha": 0.5, "lp_epochs": 0, "lp_lr": None}

    def fit(
        self, model: nn.Module, loader: DataLoader, ctx: FinetuneContext
    ) -> tuple[nn.Module, Any]:
        alpha = float(self.options["alpha"])
        if not 0.0 <= alpha <= 1.0:
            raise NeuralignError(f"wise_ft: alpha must lie in [0, 1], got {alpha}")
        h_lp = None
        if int(self.options["lp_epochs"]) > 0:
            lp_lr = self.options["lp_lr"]
            lp_lr = 10 * ctx.lr if lp_lr is None else float(lp_lr)
            h_lp = ctx.train(
                model,
                loader,
                epochs=int(self.options["lp_epochs"]),
                lr=lp_lr,
                param_groups=[{"params": head_params(model)}],
            )
        start = {k: v.detach().clone() for k, v in model.state_dict().items()}
        history = ctx.train(model, loader)
        tuned = {k: v.detach().clone() for k, v in model.state_dict().items()}
        model.load_state_dict(interpolate_state(start, tuned, alpha))
        self.info.update(alpha=alpha, start_state=start, finetuned_state=tuned)
        return model, history if h_lp is None else {"lp": h_lp, "ft": history}


class OutputEnsemble(nn.Module):
    """Averages the members' softmax outputs; returns log-probabilities (argmax and CE work)."""

    def __init__(self, members: list[nn.Module]) -> None:
        super().__init__()
        if not members:
            raise NeuralignError("an ensemble needs at least one member")
        self.members = nn.ModuleList(members)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        logp = torch.stack([m(x).log_softmax(-1) for m in self.members])
        return torch.logsumexp(logp, 0) - torch.log(torch.tensor(float(len(self.members))))


@register_strategy("ensemble")
class Ensemble(Strategy):
    """An output ensemble of ``m`` models fine-tuned with ``member`` (default ``full``) from
    seeds ``seed, seed+1, ...`` (different heads and data orders); ``members`` may instead be a
    list of already fine-tuned models, which are then only wrapped."""

    summary = "output ensemble of m fine-tuned models (member strategy, m seeds)"
    defaults = {"m": 6, "member": "full", "member_options": None, "members": None}

    def fit(
        self, model: nn.Module, loader: DataLoader, ctx: FinetuneContext
    ) -> tuple[nn.Module, Any]:
        from neuralign.finetune.api import finetune

        given = self.options["members"]
        if given is not None:
            return OutputEnsemble([copy.deepcopy(m) for m in given]), None
        m = int(self.options["m"])
        if m < 1:
            raise NeuralignError(f"ensemble: m must be >= 1, got {m}")
        members, histories = [], []
        for i in range(m):
            res = finetune(
                ctx.original_model,
                ctx.train_data,
                strategy=self.options["member"],
                epochs=ctx.epochs,
                lr=ctx.lr,
                num_classes=ctx.num_classes,
                val_data=None if ctx.val_loader is None else ctx.val_loader,
                seed=ctx.seed + i,
                device=ctx.device,
                progress=ctx.progress,
                batch_size=ctx.batch_size,
                select=ctx.select,
                bn=ctx.bn,
                train_options=ctx.train_kwargs,
                **(self.options["member_options"] or {}),
            )
            members.append(res.model)
            histories.append(res.history)
        self.info["member_seeds"] = [ctx.seed + i for i in range(m)]
        return OutputEnsemble(members), histories


from neuralign.finetune.lpft import LPFT  # noqa: E402 - re-exported (lives in lpft.py)
