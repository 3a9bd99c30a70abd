"""SHERPA (Cho et al.): align the model to a fine-tuned anchor, then fine-tune it with ERM.

Stage 1 finds the permutation ``pi`` that maximises the summed correlation of the hidden units'
activations of the anchor ``A`` and the model ``M`` on source batches (Eq. 1, activation
matching, ``neuralign.align.activation_matching``) and applies it: ``pi(M)`` computes the same
function as ``M``. Stage 2 fine-tunes ``pi(M)`` with the cross-entropy loss.

What the paper leaves open, made explicit here. Permuting ``M`` is function-preserving and
SGD (momentum, weight decay and batch norm included) is permutation-equivariant, so stage 1 with
a freshly initialised head is a provable no-op: ``head="new"`` draws the head exactly as ERM
does (the same seed, on ``M`` before it is permuted) and carries it through ``pi``, so SHERPA
with ``head="new"`` computes the same function as ERM at every step (same logits up to float
rounding, ~1e-6; ``tests/test_sherpa_erm.py``). Any difference between the two in a benchmark is
noise from the head draw, never the alignment; report it as "= ERM". The same holds for the
random-permutation baseline with ``head="new"``.

The variants in which the alignment does change the result:

* ``head="anchor"``: transplant the anchor's trained head onto the aligned features (possible
  only because the features are aligned; ``random_perm`` with ``head="anchor"`` is its control:
  the same head on randomly permuted features);
* ``lam > 0`` ("lambda start"): start at ``(1 - lam) * pi(M) + lam * A`` (BN statistics
  re-estimated when ``lam > 0``); needs the anchor;
* an anchor soup: ``anchor=[A_1, ..., A_k]`` is weight-averaged into one anchor (the paper's A=6;
  the anchors must share a pre-trained backbone), which matters only with ``head="anchor"`` or
  ``lam > 0``;
* ``select=True`` (strategy ``sherpa_select``): fine-tune only the blocks whose Kendall-tau
  distance between ``M`` and ``pi(M)`` is atypical (robust z-score, see ``select_blocks``).

``head="keep"`` carries the model's own head through ``pi`` (with an unchanged label set and no
``reset_head`` that is what ``"new"`` does too once ``finetune`` has drawn ERM's head).

``anchor`` is a model, a checkpoint path, or a list of them: a list is weight-averaged into one
soup (the paper's A=6 anchor; the anchors must share a pre-trained backbone).
"""

from __future__ import annotations

import copy
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from neuralign.errors import ArchitectureMismatchError, NeuralignError
from neuralign.finetune.api import FinetuneContext, Strategy, head_module, register_strategy

__all__ = [
    "Sherpa",
    "SherpaSelect",
    "RandomPerm",
    "soup",
    "kendall_tau_distance",
    "permutation_kendall_tau",
    "block_kendall_tau",
    "select_blocks",
    "align_to_anchor",
]


# --------------------------------------------------------------------------- helpers


def _load(anchor: Any) -> nn.Module:
    if isinstance(anchor, nn.Module):
        return anchor
    if isinstance(anchor, (str, Path)):
        from neuralign.io import load_model

        return load_model(anchor)
    raise NeuralignError(
        f"an anchor must be a model or a checkpoint path, got {type(anchor).__name__}"
    )


def soup(models: Sequence[nn.Module]) -> nn.Module:
    """Uniform weight average (a model soup) of models that share an architecture."""
    models = [_load(m) for m in models]
    if not models:
        raise NeuralignError("an anchor soup needs at least one model")
    sds = [m.state_dict() for m in models]
    ref = sds[0]
    for i, sd in enumerate(sds[1:], 1):
        if set(sd) != set(ref) or any(sd[k].shape != ref[k].shape for k in ref):
            raise ArchitectureMismatchError(f"anchor {i} does not share anchor 0's architecture")
    out = {
        k: (
            torch.stack([sd[k].float() for sd in sds]).mean(0).to(v.dtype)
            if v.is_floating_point()
            else v.clone()
        )
        for k, v in ref.items()
    }
    model = copy.deepcopy(models[0])
    model.load_state_dict(out)
    return model


def kendall_tau_distance(perm: torch.Tensor) -> float:
    """Normalised Kendall-tau distance between ``perm`` and the identity: the fraction of the
    ``n(n-1)/2`` unit pairs whose order the permutation swaps (0 = identity, 1 = reversal)."""
    p = torch.as_tensor(perm).long().flatten()
    n = p.numel()
    if n < 2:
        return 0.0
    inv = torch.triu(p[:, None] > p[None, :], diagonal=1).sum().item()
    return inv / (n * (n - 1) / 2)


def permutation_kendall_tau(perm: Mapping[str, torch.Tensor]) -> dict[str, float]:
    return {k: kendall_tau_distance(v) for k, v in perm.items()}


def _group_block(group: Any, blocks: list[str]) -> str | None:
    """The block owning a group: the block of its first place (the layer producing the units)."""
    key = group.places[0].key if group.places else group.name
    owners = [b for b in blocks if key.startswith(b + ".")]
    return max(owners, key=len) if owners else None


def block_kendall_tau(
    perm: Mapping[str, torch.Tensor], spec: Any, blocks: list[str]
) -> dict[str, float]:
    """Mean Kendall-tau distance of the groups each block produces (blocks with no group omitted)."""
    taus = permutation_kendall_tau(perm)
    acc: dict[str, list[float]] = {}
    for name, g in spec.groups.items():
        b = _group_block(g, blocks)
        if b is not None and name in taus:
            acc.setdefault(b, []).append(taus[name])
    return {b: sum(v) / len(v) for b, v in acc.items()}


def select_blocks(block_tau: Mapping[str, float], z: float = 2.0) -> list[str]:
    """Blocks whose Kendall-tau distance is atypical: robust z-score ``|d - median| / (1.4826 *
    MAD) >= z``; when none passes (or MAD is 0), the single block farthest from the median."""
    if not block_tau:
        return []
    names = list(block_tau)
    d = torch.tensor([block_tau[n] for n in names], dtype=torch.float64)
    dev = (d - d.median()).abs()
    mad = 1.4826 * dev.median()
    chosen = [n for n, s in zip(names, (dev / mad).tolist()) if s >= z] if mad > 0 else []
    return chosen or [names[int(dev.argmax())]]


def _align_loader(loader: DataLoader, batches: int | None, seed: int) -> DataLoader:
    """``batches`` batches of a seeded random sample of the training set, drawn without touching
    the training loader's generator (so the training data order is the same as ERM's)."""
    bs = loader.batch_size or 64
    ds = getattr(loader, "dataset", None)
    if ds is not None and hasattr(ds, "__len__") and len(ds) > 0:
        n = len(ds) if batches is None else min(len(ds), batches * bs)
        idx = torch.randperm(len(ds), generator=torch.Generator().manual_seed(seed))[:n]
        sample = [ds[i] for i in idx.tolist()]
        xs = torch.stack([torch.as_tensor(b[0]) for b in sample])
        ys = torch.as_tensor([int(b[1]) for b in sample])
    else:
        xs_l, ys_l = [], []
        for i, batch in enumerate(loader):
            if batches is not None and i >= batches:
                break
            xs_l.append(batch[0])
            ys_l.append(batch[1])
        if not xs_l:
            raise NeuralignError("SHERPA needs at least one source batch for activation matching")
        xs, ys = torch.cat(xs_l), torch.cat(ys_l)
    return DataLoader(TensorDataset(xs, ys), batch_size=bs)


def align_to_anchor(
    model: nn.Module,
    anchor: nn.Module,
    loader: DataLoader,
    *,
    matching: Any = "activation",
    method: str = "corr",
    spec: Any = None,
    seed: int = 0,
) -> tuple[nn.Module, Any, Any]:
    """Stage 1: ``(pi(model), pi, spec)`` with ``pi`` aligning ``model``'s units to ``anchor``'s.

    ``matching``: ``"activation"`` (Eq. 1, ``method="corr"``), ``"weight"`` (Git Re-Basin weight
    matching) or a callable ``(anchor, model, loader, spec) -> Permutation``.
    """
    from neuralign.permute import apply_permutation
    from neuralign.spec import spec_from_model

    if set(model.state_dict()) != set(anchor.state_dict()):
        raise ArchitectureMismatchError("the anchor and the model do not share an architecture")
    if spec is None:
        x = next(iter(loader))[0][:2]
        spec = spec_from_model(model, x.to(next(model.parameters()).device))
    if callable(matching):
        perm = matching(anchor, model, loader, spec)
    elif matching == "activation":
        from neuralign.align import activation_matching

        perm = activation_matching(anchor, model, loader, method=method, spec=spec)
    elif matching == "weight":
        from neuralign.align import weight_matching

        perm = weight_matching(spec, anchor.state_dict(), model.state_dict(), seed=seed)
    else:
        raise NeuralignError(
            f"matching must be 'activation', 'weight' or a callable, got {matching!r}"
        )
    return apply_permutation(model, perm, spec), perm, spec


# --------------------------------------------------------------------------- strategies


def _head_names(model: nn.Module) -> list[str]:
    name, _ = head_module(model)
    return [k for k in model.state_dict() if k.startswith(name + ".")]


@register_strategy("sherpa")
class Sherpa(Strategy):
    """SHERPA: align to the anchor (stage 1), then fine-tune with ERM (stage 2)."""

    summary = "align to a fine-tuned anchor (activation matching), then fine-tune"
    defaults = {
        "anchor": None,
        "head": "new",
        "lam": 0.0,
        "align_batches": 20,
        "matching": "activation",
        "method": "corr",
        "select": False,
        "select_z": 2.0,
        "reset_bn": True,
    }

    def _anchor(self, ctx: FinetuneContext, model: nn.Module) -> nn.Module:
        anchor = self.options["anchor"]
        if anchor is None:
            raise NeuralignError(
                f"strategy {self.name!r} needs anchor= (a fine-tuned model, a "
                "checkpoint path, or a list of them for a soup)"
            )
        anchor = soup(anchor) if isinstance(anchor, (list, tuple)) else copy.deepcopy(_load(anchor))
        _, a_head = head_module(anchor)
        _, m_head = head_module(model)
        if getattr(a_head, "out_features", None) != getattr(m_head, "out_features", None):
            if self.options["head"] == "anchor":
                raise ArchitectureMismatchError(
                    f"head='anchor' needs an anchor fine-tuned on the same {m_head.out_features} "
                    f"classes; its head has {a_head.out_features} outputs"
                )
            from neuralign.models import replace_head

            anchor = replace_head(anchor, m_head.out_features, seed=ctx.seed)  # unused by matching
        return anchor.to(next(model.parameters()).device)

    def _permute(
        self, model: nn.Module, anchor: nn.Module, align_loader: DataLoader, ctx: FinetuneContext
    ) -> tuple[nn.Module, Any, Any]:
        return align_to_anchor(
            model,
            anchor,
            align_loader,
            matching=self.options["matching"],
            method=self.options["method"],
            seed=ctx.seed,
        )

    def prepare(self, model: nn.Module, loader: DataLoader, ctx: FinetuneContext) -> nn.Module:
        head = self.options["head"]
        if head not in ("new", "anchor", "keep"):
            raise NeuralignError(f"head must be 'new', 'anchor' or 'keep', got {head!r}")
        lam = float(self.options["lam"])
        if not 0.0 <= lam <= 1.0:
            raise NeuralignError(f"lam must lie in [0, 1], got {lam}")
        anchor = self._anchor(ctx, model) if self._needs_anchor() else None
        align_loader = _align_loader(loader, self.options["align_batches"], ctx.seed)
        if head == "new" and not ctx.extras.get("_new_head"):
            # ERM's head: drawn like finetune(..., reset_head=True) draws it, before permuting
            from neuralign.finetune.api import head_out_features, new_head

            model = new_head(model, head_out_features(model), ctx.seed)
        aligned, perm, spec = self._permute(model, anchor, align_loader, ctx)
        if head == "anchor":
            sd, a_sd = aligned.state_dict(), anchor.state_dict()
            aligned.load_state_dict({**sd, **{k: a_sd[k].clone() for k in _head_names(aligned)}})
        if lam > 0:
            from neuralign.finetune.basic import interpolate_state

            aligned.load_state_dict(
                interpolate_state(aligned.state_dict(), anchor.state_dict(), lam)
            )
            if self.options["reset_bn"] and any(
                isinstance(m, nn.modules.batchnorm._BatchNorm) for m in aligned.modules()
            ):
                from neuralign.merge import reset_bn

                aligned = reset_bn(aligned, align_loader)
        from neuralign.models import block_names

        blocks = block_names(aligned)
        block_tau = block_kendall_tau(perm, spec, blocks)
        self._trainable = None
        if self.options["select"]:
            chosen = select_blocks(block_tau, float(self.options["select_z"]))
            self._trainable = chosen
            self.info["selected_blocks"] = chosen
        self.info.update(
            permutation=perm,
            spec=spec,
            kendall_tau=permutation_kendall_tau(perm),
            block_kendall_tau=block_tau,
            head=head,
            lam=lam,
            equivalent_to_erm=(head in ("new", "keep") and lam == 0.0
                               and not self.options["select"]),
            aligned_start=copy.deepcopy(aligned),
        )
        return aligned

    def _needs_anchor(self) -> bool:
        return True

    def param_groups(self, model: nn.Module) -> list[dict] | None:
        chosen = getattr(self, "_trainable", None)
        if chosen is None:
            return None
        head, _ = head_module(model)
        prefixes = tuple(f"{b}." for b in [*chosen, head])
        return [{"params": [p for n, p in model.named_parameters() if n.startswith(prefixes)]}]


@register_strategy("sherpa_select")
class SherpaSelect(Sherpa):
    """SHERPA, then fine-tune only the blocks with an atypical Kendall-tau distance (and the head)."""

    summary = "SHERPA + fine-tune only blocks with atypical Kendall-tau distance"
    defaults = {**Sherpa.defaults, "select": True}


@register_strategy("random_perm")
class RandomPerm(Sherpa):
    """The random-permutation baseline: a uniformly random ``pi`` (seed ``perm_seed``, default the
    run's seed) instead of alignment, then ERM fine-tuning. With ``head="new"`` it equals ERM
    exactly (see the module docstring); with ``head="anchor"`` (and an ``anchor``) it is the
    control of SHERPA's head transplant: the anchor's head on features it was not aligned to."""

    summary = "random permutation of the hidden units, then fine-tune (SHERPA's control)"
    defaults = {
        "perm_seed": None,
        "select": False,
        "select_z": 2.0,
        "align_batches": 1,
        "head": "new",
        "lam": 0.0,
        "anchor": None,
        "matching": "random",
        "method": "corr",
        "reset_bn": False,
    }

    def _needs_anchor(self) -> bool:
        return self.options["head"] == "anchor" or float(self.options["lam"]) > 0

    def _permute(self, model, anchor, align_loader, ctx):
        from neuralign.permute import apply_permutation, random_permutation
        from neuralign.spec import spec_from_model

        x = next(iter(align_loader))[0][:2]
        spec = spec_from_model(model, x.to(next(model.parameters()).device))
        seed = ctx.seed if self.options["perm_seed"] is None else int(self.options["perm_seed"])
        perm = random_permutation(spec, seed=seed)
        return apply_permutation(model, perm, spec), perm, spec
