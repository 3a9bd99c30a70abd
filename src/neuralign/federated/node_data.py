"""Node-local data: each SuperNode trains on its own file, never on the whole data set.

A node's data is one NumPy ``.npz`` file (or a directory holding ``train.npz``) with two arrays:

* ``x``: ``float32`` inputs, ``(N, *input_shape)`` (e.g. ``(N, 1, 28, 28)`` for Fashion-MNIST),
  preprocessed exactly as the server's test set (neuralign's loaders scale pixels to [0, 1]);
* ``y``: integer class labels, ``(N,)``, in ``[0, num_classes)``.

The SuperNode is started with ``--node-config 'data-path="/data/node0.npz"'`` and the app's run
config says ``task.client-data = "node"``. :func:`write_node_data` (``neuralign federate
--write-node-data DIR``) writes the Dirichlet partitions of a built-in data set in this format,
one file per node, to try a deployment with real per-node files.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from torch.utils.data import TensorDataset

from neuralign.errors import DataError

FILE_NAME = "train.npz"


def resolve(path) -> Path:
    p = Path(str(path)).expanduser()
    if p.is_dir():
        p = p / FILE_NAME
    if not p.is_file():
        raise DataError(f"node data {path} not found: give a .npz file with arrays x and y, or "
                        f"a directory holding {FILE_NAME}")
    return p


def load_node_data(path, *, input_shape: tuple[int, ...] | None = None,
                   num_classes: int | None = None) -> TensorDataset:
    """Read and check a node's ``.npz`` (see the module doc); returns a ``TensorDataset``."""
    p = resolve(path)
    try:
        with np.load(p, allow_pickle=False) as z:
            missing = [k for k in ("x", "y") if k not in z.files]
            if missing:
                raise DataError(f"{p} lacks array(s) {missing}; it holds {sorted(z.files)} "
                                "(need x: inputs, y: integer labels)")
            x, y = z["x"], z["y"]
    except (OSError, ValueError) as exc:
        raise DataError(f"{p} is not a readable .npz file ({exc})") from None
    if not np.issubdtype(x.dtype, np.number) or x.ndim < 2:
        raise DataError(f"{p}: x must be a numeric array (N, *input_shape), got {x.dtype} "
                        f"{x.shape}")
    if not np.issubdtype(y.dtype, np.integer) or y.ndim != 1:
        raise DataError(f"{p}: y must be a 1-D integer array of labels, got {y.dtype} {y.shape}")
    if len(x) != len(y) or len(y) == 0:
        raise DataError(f"{p}: x has {len(x)} rows and y {len(y)}; they must match and be > 0")
    if input_shape is not None and tuple(x.shape[1:]) != tuple(input_shape):
        raise DataError(f"{p}: inputs have shape {tuple(x.shape[1:])}, the task's model takes "
                        f"{tuple(input_shape)}")
    if num_classes is not None and (y.min() < 0 or y.max() >= num_classes):
        raise DataError(f"{p}: labels span [{y.min()}, {y.max()}], the task has {num_classes} "
                        f"classes [0, {num_classes})")
    xf = x.astype(np.float32, copy=False)
    if not np.isfinite(xf).all():
        raise DataError(f"{p}: x holds NaN or infinite values")
    return TensorDataset(torch.from_numpy(np.ascontiguousarray(xf)),
                         torch.from_numpy(y.astype(np.int64)))


def write_node_data(task, directory) -> list[Path]:
    """Write ``task``'s partitions as ``directory/node-<i>.npz`` (one per client, atomically);
    returns the paths."""
    from neuralign.io import atomic_write

    d = Path(directory)
    d.mkdir(parents=True, exist_ok=True)
    train = task.splits().train
    x, y = train.tensors[0].numpy(), train.tensors[1].numpy()
    paths = []
    for i, idx in enumerate(task.partitions()):
        target = d / f"node-{i}.npz"

        def write(tmp, idx=idx):
            with open(tmp, "wb") as f:
                np.savez(f, x=x[idx].astype(np.float32), y=y[idx].astype(np.int64))

        paths.append(atomic_write(target, write))
    return paths
