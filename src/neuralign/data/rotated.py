"""Rotated domains (Rotated-MNIST style, as in DomainBed) and leave-one-domain-out splits.

``rotated_domains(images, labels, angles=(0, 15, 30, 45, 60, 75))`` splits the images into
disjoint, seeded, class-mixed parts, one per angle, and rotates each part by its angle;
``leave_one_domain_out(domains, test_domain)`` gives the same ``DomainSplits`` as
``neuralign.data.load_domains`` does for ImageFolder data (sources split into train and a
training-domain validation set, the held-out domain as test), so one benchmark serves both.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch
import torch.nn.functional as F
from torch.utils.data import ConcatDataset, Dataset, Subset, TensorDataset

from neuralign.data.domainbed import DomainSplits
from neuralign.errors import DataError

__all__ = [
    "rotate",
    "rotated_domains",
    "leave_one_domain_out",
    "domain_name",
    "rotated_fashion_mnist",
    "domain_splits",
]


def domain_name(angle: float) -> str:
    return f"rot{int(angle) if float(angle).is_integer() else angle}"


def rotate(
    images: torch.Tensor, angle: float | torch.Tensor, fill: float | None = None
) -> torch.Tensor:
    """Rotate a batch ``(N, C, H, W)`` clockwise (as displayed) by ``angle`` degrees (bilinear);
    ``angle`` is one number or one per image (shape ``(N,)``). The uncovered corners get ``fill``
    (default: the batch minimum, the background of standardised Fashion-MNIST / MNIST).
    Vectorised: one ``grid_sample`` call."""
    if images.dim() != 4:
        raise DataError(f"rotate expects (N, C, H, W) images, got shape {tuple(images.shape)}")
    n = images.shape[0]
    ang = torch.as_tensor(angle, dtype=images.dtype).reshape(-1)
    if ang.numel() not in (1, n):
        raise DataError(f"rotate: {ang.numel()} angles for {n} images")
    if n == 0 or bool((ang == 0).all()):
        return images.clone()
    fill = float(images.amin()) if fill is None else float(fill)
    t = torch.deg2rad(ang).expand(n)
    c, s = torch.cos(t), torch.sin(t)
    zero = torch.zeros_like(c)
    theta = torch.stack([torch.stack([c, s, zero], 1), torch.stack([-s, c, zero], 1)], 1)
    grid = F.affine_grid(theta, list(images.shape), align_corners=False)
    out = F.grid_sample(
        images - fill, grid, mode="bilinear", padding_mode="zeros", align_corners=False
    )
    return out + fill


def rotated_domains(
    images: torch.Tensor,
    labels: torch.Tensor,
    angles: Sequence[float] = (0, 15, 30, 45, 60, 75),
    *,
    per_domain: int | None = None,
    seed: int = 0,
    fill: float | None = None,
) -> dict[str, TensorDataset]:
    """One ``TensorDataset`` per angle (``rot0``, ``rot15``, ...), from disjoint random parts of
    ``images`` (``per_domain`` images each; default: an equal share of all)."""
    if len(angles) < 2:
        raise DataError(f"need at least 2 angles for domains, got {list(angles)}")
    if images.shape[0] != labels.shape[0]:
        raise DataError(f"{images.shape[0]} images but {labels.shape[0]} labels")
    n = images.shape[0]
    per = n // len(angles) if per_domain is None else int(per_domain)
    if per < 1 or per * len(angles) > n:
        raise DataError(
            f"cannot take {per} images for each of {len(angles)} domains from {n} images"
        )
    fill = float(images.amin()) if fill is None else float(fill)
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed))
    out = {}
    for i, a in enumerate(angles):
        idx = perm[i * per : (i + 1) * per]
        out[domain_name(a)] = TensorDataset(rotate(images[idx], a, fill), labels[idx].clone())
    return out


def leave_one_domain_out(
    domains: Mapping[str, Dataset],
    test_domain: str,
    *,
    source_domains: Sequence[str] | None = None,
    val_fraction: float = 0.2,
    seed: int = 0,
    classes: Sequence[str] | None = None,
) -> DomainSplits:
    """DomainBed's leave-one-domain-out split of in-memory domains: each source domain loses a
    seeded ``val_fraction`` to the training-domain validation set; the test domain is kept whole."""
    if test_domain not in domains:
        raise DataError(f"test domain {test_domain!r} not among {list(domains)}")
    sources = list(source_domains) if source_domains else [d for d in domains if d != test_domain]
    for d in sources:
        if d not in domains or d == test_domain:
            raise DataError(
                f"bad source domain {d!r}; domains: {list(domains)}, test: {test_domain}"
            )
    if not 0.0 < val_fraction < 1.0:
        raise DataError(f"val_fraction must lie in (0, 1), got {val_fraction}")
    gen = torch.Generator().manual_seed(seed)
    train_parts, val_parts = [], []
    for d in sources:
        ds = domains[d]
        perm = torch.randperm(len(ds), generator=gen).tolist()
        n_val = max(1, int(round(val_fraction * len(ds))))
        val_parts.append(Subset(ds, perm[:n_val]))
        train_parts.append(Subset(ds, perm[n_val:]))
    if classes is None:
        first = domains[test_domain]
        ys = (
            first.tensors[1]
            if isinstance(first, TensorDataset)
            else torch.tensor([y for _, y in first])
        )
        classes = [str(c) for c in range(int(ys.max()) + 1)]
    return DomainSplits(
        ConcatDataset(train_parts),
        ConcatDataset(val_parts),
        domains[test_domain],
        list(classes),
        sources,
        test_domain,
    )


def rotated_fashion_mnist(
    *,
    angles: Sequence[float] = (0, 15, 30, 45, 60, 75),
    classes: Sequence[int] | None = None,
    per_domain: int | None = None,
    seed: int = 0,
    root=None,
    split: str = "train",
) -> dict[str, TensorDataset]:
    """Rotated Fashion-MNIST domains from the (standardised) ``split`` images of ``classes``
    (default all ten; labels re-indexed to ``0..len(classes)-1`` in the given order)."""
    from neuralign.data.core import FASHION_MEAN, FASHION_STD, load_fashion_mnist_arrays

    arr = load_fashion_mnist_arrays(root)
    x = (
        torch.from_numpy(arr[f"{split}_images"].copy())
        .float()
        .div(255.0)
        .sub(FASHION_MEAN)
        .div(FASHION_STD)
    )
    y = torch.from_numpy(arr[f"{split}_labels"].copy()).long()
    if classes is not None:
        cls = torch.tensor(list(classes), dtype=torch.long)
        keep = torch.isin(y, cls)
        x, y = x[keep], y[keep]
        y = (y[:, None] == cls[None, :]).long().argmax(1)
    return rotated_domains(x[:, None], y, angles, per_domain=per_domain, seed=seed)


def domain_splits(
    data: str,
    test_domain: str,
    *,
    source_domains: Sequence[str] | None = None,
    seed: int = 0,
    val_fraction: float = 0.2,
    per_domain: int | None = None,
    classes: Sequence[int] | None = None,
    image_size: int = 224,
    root=None,
) -> DomainSplits:
    """Leave-one-domain-out splits of ``data``: ``"rotated_fashion_mnist"`` (domains ``rot0`` ...
    ``rot75``) or a folder in DomainBed layout (``root/<domain>/<class>/<image>``: PACS, VLCS,
    TerraIncognita, ...)."""
    from pathlib import Path

    from neuralign.data.domainbed import load_domains

    if data == "rotated_fashion_mnist":
        doms = rotated_fashion_mnist(classes=classes, per_domain=per_domain, seed=seed, root=root)
        return leave_one_domain_out(
            doms, test_domain, source_domains=source_domains, val_fraction=val_fraction, seed=seed
        )
    if Path(data).is_dir():
        return load_domains(
            data,
            test_domain,
            source_domains=list(source_domains) if source_domains else None,
            image_size=image_size,
            val_fraction=val_fraction,
            seed=seed,
        )
    raise DataError(
        f"domain data {data!r} is neither 'rotated_fashion_mnist' nor a folder in "
        "DomainBed layout (root/<domain>/<class>/<image>)"
    )
