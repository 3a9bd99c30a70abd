"""Spurious cues painted onto real images, for LEVI's setting (Roh et al. 2024, Corollary 3).

A cue is a small class-specific pattern added to an image. With probability ``rho`` the pattern
encodes the image's true label, otherwise a uniformly drawn *other* label; ``rho=None`` draws the
cue's label uniformly over all classes, independent of the true label (the OOD condition, where
no cue predicts the label). Three kinds, deliberately different in shape and place:

- ``barcode``: the top ``size`` rows carry a class-specific binary code (fixed random bits per
  class, drawn from ``code_seed``), bright where the bit is 1;
- ``patch``: a bright ``size`` x ``size`` square whose position along the bottom border encodes the
  class;
- ``grating``: a class-specific diagonal/horizontal/vertical stripe texture of amplitude
  ``strength`` (relative to the image range) over the whole image.

``spurious_split`` applies any number of cues to one set of images; ``levi_spurious_benchmark``
builds the pre-training / fine-tuning / ID test / OOD test sets of a vision LEVI experiment
(the retired vision benchmark used them; the LEVI benchmark is now ``benchmarks/levi_text.py``).
"""

from __future__ import annotations

import math
from collections.abc import Mapping

import torch
from torch.utils.data import TensorDataset

from neuralign.errors import DataError

CUE_KINDS = ("barcode", "patch", "grating")


def cue_labels(labels: torch.Tensor, num_classes: int, rho: float | None, seed: int = 0):
    """Label each image's cue: the true label with probability ``rho``, else another class drawn
    uniformly; ``rho=None``: a class drawn uniformly, independent of the label."""
    g = torch.Generator().manual_seed(seed)
    labels = labels.long()
    n = labels.shape[0]
    if rho is None:
        return torch.randint(num_classes, (n,), generator=g)
    if not 0.0 <= rho <= 1.0:
        raise DataError(f"cue correlation rho must be in [0, 1], got {rho}")
    keep = torch.rand(n, generator=g) < rho
    shift = torch.randint(1, num_classes, (n,), generator=g)  # a different class
    return torch.where(keep, labels, (labels + shift) % num_classes)


def cue_patterns(kind: str, num_classes: int, shape: tuple[int, int], *, size: int = 3,
                 code_seed: int = 1234) -> torch.Tensor:
    """``(num_classes, H, W)`` masks in [0, 1] (barcode, patch) or [-1, 1] (grating)."""
    h, w = shape
    if kind == "barcode":
        g = torch.Generator().manual_seed(code_seed)
        bits = torch.randint(0, 2, (num_classes, w), generator=g).float()
        bits[:, 0] = 1.0  # every code shows something
        pat = torch.zeros(num_classes, h, w)
        pat[:, :size, :] = bits[:, None, :]
        return pat
    if kind == "patch":
        step = max((w - size) / max(num_classes - 1, 1), 1.0)
        cols = (torch.arange(num_classes) * step).round().long().clamp(max=w - size)
        yy = torch.arange(h)[None, :, None]
        xx = torch.arange(w)[None, None, :]
        in_rows = yy >= h - size
        in_cols = (xx >= cols[:, None, None]) & (xx < cols[:, None, None] + size)
        return (in_rows & in_cols).float()
    if kind == "grating":
        ang = torch.arange(num_classes).float() * math.pi / num_classes
        freq = 2 * math.pi / 4.0  # period of 4 pixels
        yy = torch.arange(h).float()[None, :, None]
        xx = torch.arange(w).float()[None, None, :]
        phase = xx * torch.cos(ang)[:, None, None] + yy * torch.sin(ang)[:, None, None]
        return torch.sin(freq * phase)
    raise DataError(f"unknown cue kind {kind!r}; use one of {', '.join(CUE_KINDS)}")


def add_cue(images: torch.Tensor, cue_label: torch.Tensor, kind: str, *, num_classes: int,
            strength: float = 1.0, size: int = 3, code_seed: int = 1234,
            value_range: tuple[float, float] | None = None) -> torch.Tensor:
    """A copy of ``images`` ``(N, C, H, W)`` with the cue of class ``cue_label[i]`` painted on image
    ``i``. Barcode/patch pixels are blended towards the top of ``value_range`` (default: the
    images' min and max) by ``strength``; a grating adds ``strength`` times the range."""
    if images.dim() != 4:
        raise DataError(f"spurious cues need image tensors (N, C, H, W), got shape {tuple(images.shape)}")
    lo, hi = value_range if value_range is not None else (images.min().item(), images.max().item())
    pats = cue_patterns(kind, num_classes, tuple(images.shape[-2:]), size=size, code_seed=code_seed)
    pat = pats[cue_label.long()].unsqueeze(1).to(images.dtype)  # (N, 1, H, W)
    if kind == "grating":
        return (images + strength * (hi - lo) * 0.5 * pat).clamp(lo, hi)
    a = strength * pat
    return images * (1 - a) + hi * a


def spurious_split(images: torch.Tensor, labels: torch.Tensor, cues: Mapping[str, Mapping], *,
                   num_classes: int, seed: int = 0, value_range=None) -> TensorDataset:
    """``TensorDataset`` of ``images`` with every cue in ``cues`` painted on. Each entry maps a
    name to ``{"kind": ..., "rho": float | None, "strength": ..., "size": ..., "code_seed": ...}``;
    ``rho`` is the cue-label correlation (``None``: independent of the label)."""
    lo_hi = value_range or (images.min().item(), images.max().item())
    out = images.clone()
    for i, (name, spec) in enumerate(sorted(cues.items())):
        spec = dict(spec)
        kind = spec.pop("kind")
        rho = spec.pop("rho", None)
        cl = cue_labels(labels, num_classes, rho, seed=seed * 7919 + i)
        out = add_cue(out, cl, kind, num_classes=num_classes, value_range=lo_hi, **spec)
    return TensorDataset(out, labels.long().clone())


def _class_subset(images, labels, classes):
    keep = torch.isin(labels, torch.as_tensor(classes))
    remap = torch.full((int(labels.max()) + 1,), -1, dtype=torch.long)
    remap[torch.as_tensor(classes)] = torch.arange(len(classes))
    return images[keep], remap[labels[keep]]


def levi_spurious_benchmark(train_images, train_labels, test_images, test_labels, *,
                            variant: str = "spurious", n_pretrain: int = 6000,
                            n_finetune: int = 1000, n_val: int = 500, rho_pre: float = 0.95,
                            rho_ft: float = 0.9, pre_cue: dict | None = None,
                            ft_cue: dict | None = None, seed: int = 0) -> dict[str, TensorDataset]:
    """The four data sets of LEVI's Corollary 3, built from real images:

    - ``pretrain``: images carrying the pre-training cue (``pre_cue``, default a top barcode,
      correlation ``rho_pre``); used only to pre-train the large model;
    - ``finetune`` / ``val`` / ``id_test``: disjoint images carrying the fine-tuning cue
      (``ft_cue``, default a bottom patch, correlation ``rho_ft``) and no pre-training cue;
    - ``ood_test``: test images carrying both cues, each drawn independently of the label.

    ``variant="domain_gap"``: pre-training uses classes 0-4 only, fine-tuning and tests classes
    5-9 (relabelled 0-4), so the pre-trained features are simply insufficient for the new task.
    Pre-training and fine-tuning images are disjoint; test images come from the test split.
    """
    pre_cue = dict(pre_cue or {"kind": "barcode", "size": 3})
    ft_cue = dict(ft_cue or {"kind": "patch", "size": 4})
    rng = torch.Generator().manual_seed(seed)
    perm = torch.randperm(train_images.shape[0], generator=rng)
    tr_x, tr_y = train_images[perm], train_labels[perm].long()
    te_x, te_y = test_images, test_labels.long()
    num_classes = int(train_labels.max()) + 1
    if variant == "domain_gap":
        half = num_classes // 2
        pre_x, pre_y = _class_subset(tr_x, tr_y, list(range(half)))
        tr_x, tr_y = _class_subset(tr_x, tr_y, list(range(half, num_classes)))
        te_x, te_y = _class_subset(te_x, te_y, list(range(half, num_classes)))
        pre_k = ft_k = half
        pre_x, pre_y = pre_x[:n_pretrain], pre_y[:n_pretrain]
        ft_x, ft_y = tr_x[:n_finetune + n_val], tr_y[:n_finetune + n_val]
    elif variant == "spurious":
        pre_k = ft_k = num_classes
        pre_x, pre_y = tr_x[:n_pretrain], tr_y[:n_pretrain]
        ft_x = tr_x[n_pretrain:n_pretrain + n_finetune + n_val]
        ft_y = tr_y[n_pretrain:n_pretrain + n_finetune + n_val]
    else:
        raise DataError(f"unknown variant {variant!r}; use 'spurious' or 'domain_gap'")
    if ft_x.shape[0] < n_finetune + n_val or pre_x.shape[0] < n_pretrain:
        raise DataError(f"not enough training images for n_pretrain={n_pretrain}, "
                        f"n_finetune={n_finetune}, n_val={n_val}")
    vr = (float(train_images.min()), float(train_images.max()))
    pre = {"pre": {**pre_cue, "rho": rho_pre}}
    ft = {"ft": {**ft_cue, "rho": rho_ft}}
    ood = {"ft": {**ft_cue, "rho": None}, "pre": {**pre_cue, "rho": None}}
    return {
        "pretrain": spurious_split(pre_x, pre_y, pre, num_classes=pre_k, seed=seed + 1, value_range=vr),
        "finetune": spurious_split(ft_x[:n_finetune], ft_y[:n_finetune], ft, num_classes=ft_k,
                                   seed=seed + 2, value_range=vr),
        "val": spurious_split(ft_x[n_finetune:], ft_y[n_finetune:], ft, num_classes=ft_k,
                              seed=seed + 3, value_range=vr),
        "id_test": spurious_split(te_x, te_y, ft, num_classes=ft_k, seed=seed + 4, value_range=vr),
        "ood_test": spurious_split(te_x, te_y, ood, num_classes=ft_k, seed=seed + 5, value_range=vr),
    }
