"""Multi-domain ImageFolder data sets in DomainBed layout: ``root/<domain>/<class>/<image>``.

PACS, VLCS, TerraIncognita and OfficeHome all come in this layout. ``load_domains`` gives the
leave-one-domain-out splits: the source domains' images split into train and a training-domain
validation set (DomainBed's model-selection rule), the held-out domain as the test set.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import ConcatDataset, Dataset, Subset

from neuralign.errors import DataError

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp"}
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


class ImageDomain(Dataset):
    """The images of one domain, read lazily; labels index the shared, sorted class list."""

    def __init__(self, folder: Path, classes: list[str], image_size: int = 224,
                 transform=None):
        self.folder = folder
        self.samples: list[tuple[Path, int]] = []
        for label, cls in enumerate(classes):
            cdir = folder / cls
            if cdir.is_dir():
                self.samples += [(p, label) for p in sorted(cdir.iterdir())
                                 if p.suffix.lower() in IMAGE_SUFFIXES]
        self.image_size = image_size
        self.transform = transform

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, i: int):
        from PIL import Image

        path, label = self.samples[i]
        try:
            img = Image.open(path).convert("RGB")
        except OSError as exc:
            raise DataError(f"cannot read image {path}: {exc}") from exc
        if self.transform is not None:
            return self.transform(img), label
        img = img.resize((self.image_size, self.image_size))
        x = torch.from_numpy(np.asarray(img, dtype=np.float32) / 255.0).permute(2, 0, 1)
        mean = torch.tensor(IMAGENET_MEAN).view(3, 1, 1)
        std = torch.tensor(IMAGENET_STD).view(3, 1, 1)
        return (x - mean) / std, label


@dataclass
class DomainSplits:
    train: Dataset
    val: Dataset
    test: Dataset
    classes: list[str]
    source_domains: list[str]
    test_domain: str

    @property
    def num_classes(self) -> int:
        return len(self.classes)


def list_domains(root) -> list[str]:
    r = Path(root)
    if not r.is_dir():
        raise DataError(f"domain folder {r} does not exist; expected root/<domain>/<class>/*.jpg "
                        "(DomainBed layout, e.g. PACS/art_painting/dog/...)")
    domains = sorted(p.name for p in r.iterdir() if p.is_dir())
    if len(domains) < 2:
        raise DataError(f"{r} has {len(domains)} domain folder(s); leave-one-domain-out needs "
                        "at least 2 (root/<domain>/<class>/<image>)")
    return domains


def load_domains(root, test_domain: str, *, source_domains: list[str] | None = None,
                 image_size: int = 224, val_fraction: float = 0.2, seed: int = 0,
                 transform=None) -> DomainSplits:
    """Leave ``test_domain`` out; train on the others with a seeded ``val_fraction`` held out of
    each source domain for model selection."""
    domains = list_domains(root)
    if test_domain not in domains:
        raise DataError(f"test domain {test_domain!r} not in {root}; domains: {domains}")
    sources = source_domains or [d for d in domains if d != test_domain]
    for d in sources:
        if d not in domains or d == test_domain:
            raise DataError(f"bad source domain {d!r}; domains: {domains}, test: {test_domain}")
    r = Path(root)
    classes = sorted({c.name for d in domains for c in (r / d).iterdir() if c.is_dir()})
    rng = np.random.default_rng(seed)
    train_parts, val_parts = [], []
    for d in sources:
        ds = ImageDomain(r / d, classes, image_size, transform)
        if len(ds) == 0:
            raise DataError(f"domain {d!r} in {root} has no images")
        perm = rng.permutation(len(ds))
        n_val = max(1, int(round(val_fraction * len(ds))))
        val_parts.append(Subset(ds, perm[:n_val].tolist()))
        train_parts.append(Subset(ds, perm[n_val:].tolist()))
    test = ImageDomain(r / test_domain, classes, image_size, transform)
    return DomainSplits(ConcatDataset(train_parts), ConcatDataset(val_parts), test, classes,
                        list(sources), test_domain)
