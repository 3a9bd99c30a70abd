"""Dirichlet(alpha) label partitions, computed with flwr-datasets over a local HF Dataset.

The partitioner sees only a two-column ``datasets.Dataset`` (``label``, ``idx``) built from the
label array in memory, so nothing is downloaded and the partitions are the ones Flower's
baselines get from ``DirichletPartitioner`` with the same seed.
"""

from __future__ import annotations

import numpy as np

from neuralign.errors import DataError, NeuralignError


def _require_fl():
    try:
        import datasets  # noqa: F401
        from flwr_datasets.partitioner import DirichletPartitioner
    except ImportError as exc:  # pragma: no cover - depends on the environment
        raise NeuralignError("federated learning needs Flower: pip install 'neuralign[fl]' "
                             "(flwr>=1.40, flwr-datasets, datasets)") from exc
    return DirichletPartitioner


def dirichlet_partition(labels, num_partitions: int, alpha: float, *, seed: int = 0,
                        min_partition_size: int = 10, self_balancing: bool = False
                        ) -> list[np.ndarray]:
    """Split sample indices into ``num_partitions`` parts whose label mix is Dirichlet(alpha).

    Returns one sorted ``int64`` index array per partition (disjoint, covering every sample).
    Small ``alpha`` (0.1) gives strongly heterogeneous clients, large ``alpha`` near-IID ones.
    """
    if num_partitions < 1:
        raise DataError(f"num_partitions must be >= 1, got {num_partitions}")
    if alpha <= 0:
        raise DataError(f"Dirichlet alpha must be > 0, got {alpha}")
    y = np.asarray(labels).astype(np.int64).reshape(-1)
    if len(y) < num_partitions * max(min_partition_size, 1):
        raise DataError(f"{len(y)} samples cannot fill {num_partitions} partitions of at least "
                        f"{min_partition_size} samples; use fewer clients, more data or a smaller "
                        "min_partition_size")
    DirichletPartitioner = _require_fl()
    import datasets

    ds = datasets.Dataset.from_dict({"label": y, "idx": np.arange(len(y), dtype=np.int64)})
    part = DirichletPartitioner(num_partitions=num_partitions, partition_by="label", alpha=alpha,
                                min_partition_size=min_partition_size,
                                self_balancing=self_balancing, shuffle=True, seed=seed)
    part.dataset = ds
    out = []
    for pid in range(num_partitions):
        idx = np.asarray(part.load_partition(pid)["idx"], dtype=np.int64)
        out.append(np.sort(idx))
    return out


def label_histogram(labels, parts: list[np.ndarray], num_classes: int) -> np.ndarray:
    """``(num_partitions, num_classes)`` counts of each label in each partition."""
    y = np.asarray(labels).astype(np.int64)
    return np.stack([np.bincount(y[p], minlength=num_classes) for p in parts])
