"""Feature-level shift in the BREEDS style (Santurkar et al.): classes are grouped into
super-classes; the source and the target see the same super-classes, made of disjoint
sub-classes (source: black bears; target: polar bears, for "bear").

For Fashion-MNIST the default grouping is ``FASHION_SUPERCLASSES`` (4 super-classes); each
super-class's sub-classes are shuffled by ``seed`` and split, the source taking the larger half.
"""

from __future__ import annotations

import torch
from torch.utils.data import TensorDataset

from neuralign.errors import DataError

FASHION_CLASSES = ("T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt",
                   "Sneaker", "Bag", "Ankle boot")
FASHION_SUPERCLASSES: dict[str, list[int]] = {
    "light tops": [0, 6],        # T-shirt/top, Shirt
    "warm tops": [2, 4],         # Pullover, Coat
    "footwear": [5, 7, 9],       # Sandal, Sneaker, Ankle boot
    "other": [1, 3, 8],          # Trouser, Dress, Bag
}


def split_subclasses(superclasses: dict[str, list[int]] | None = None, *, seed: int = 0
                     ) -> tuple[dict[int, int], dict[int, int]]:
    """``(source_map, target_map)``: original class -> super-class index, disjoint sub-classes."""
    superclasses = FASHION_SUPERCLASSES if superclasses is None else superclasses
    seen: set[int] = set()
    src, tgt = {}, {}
    g = torch.Generator().manual_seed(int(seed))
    for i, (name, subs) in enumerate(superclasses.items()):
        if len(subs) < 2:
            raise DataError(f"super-class {name!r} needs at least 2 sub-classes to split")
        if seen & set(subs):
            raise DataError(f"super-class {name!r} repeats a sub-class of another super-class")
        seen |= set(subs)
        order = [subs[j] for j in torch.randperm(len(subs), generator=g).tolist()]
        k = (len(order) + 1) // 2
        src.update({c: i for c in order[:k]})
        tgt.update({c: i for c in order[k:]})
    return src, tgt


def relabel(x: torch.Tensor, y: torch.Tensor, mapping: dict[int, int]
            ) -> tuple[torch.Tensor, torch.Tensor]:
    """Keep the examples whose class is in ``mapping`` and give them the mapped label."""
    y = torch.as_tensor(y)
    table = torch.full((max(int(y.max()) + 1, max(mapping) + 1),), -1, dtype=torch.long)
    table[torch.tensor(list(mapping))] = torch.tensor(list(mapping.values()))
    new = table[y]
    keep = new >= 0
    return x[keep], new[keep]


def subpopulation_shift(dataset: TensorDataset, superclasses: dict[str, list[int]] | None = None,
                        *, seed: int = 0) -> tuple[TensorDataset, TensorDataset]:
    """``(source, target)`` datasets over the same super-class labels, disjoint sub-classes."""
    src_map, tgt_map = split_subclasses(superclasses, seed=seed)
    x, y = dataset.tensors[:2]
    return TensorDataset(*relabel(x, y, src_map)), TensorDataset(*relabel(x, y, tgt_map))
