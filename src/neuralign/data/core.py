"""Splits, loaders and the three built-in data sets: digits (embedded), Fashion-MNIST, MNIST-1D."""

from __future__ import annotations

import gzip
import os
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, TensorDataset

from neuralign.errors import DataError

FASHION_MNIST_DEFAULT = "/usr/share/datasets/fashion-mnist"
FASHION_MNIST_FILES = {
    "train_images": "train-images-idx3-ubyte",
    "train_labels": "train-labels-idx1-ubyte",
    "test_images": "t10k-images-idx3-ubyte",
    "test_labels": "t10k-labels-idx1-ubyte",
}


@dataclass
class Splits:
    """Train / validation / test ``TensorDataset``s of float32 inputs and int64 labels."""

    train: TensorDataset
    val: TensorDataset
    test: TensorDataset
    num_classes: int
    input_shape: tuple[int, ...]
    name: str
    data_seed: int = 0

    def loader(self, split: str = "train", batch_size: int = 128, shuffle: bool | None = None,
               seed: int = 0) -> DataLoader:
        if split not in ("train", "val", "test"):
            raise DataError(f"split must be 'train', 'val' or 'test', got {split!r}")
        ds = getattr(self, split)
        return make_loader(ds, batch_size, shuffle=(split == "train") if shuffle is None
                           else shuffle, seed=seed)

    def __repr__(self) -> str:
        return (f"Splits({self.name}: train={len(self.train)}, val={len(self.val)}, "
                f"test={len(self.test)}, classes={self.num_classes}, shape={self.input_shape}, "
                f"data_seed={self.data_seed})")


def make_loader(dataset: Dataset, batch_size: int = 128, shuffle: bool = False,
                seed: int = 0, drop_last: bool = False) -> DataLoader:
    """A deterministic single-process DataLoader (the same seed gives the same order)."""
    gen = torch.Generator().manual_seed(seed)
    return DataLoader(dataset, batch_size=batch_size, shuffle=shuffle, generator=gen,
                      drop_last=drop_last)


def resolve_data_seed(data_seed, seed=None, where: str = "load_data") -> int:
    """The split seed: ``data_seed``; ``seed`` is its deprecated alias (FutureWarning), kept
    because older code passed a model's seed there, which made every model's test set differ."""
    if seed is not None:
        warnings.warn(f"{where}(seed=...) is deprecated: pass data_seed=; the split must not "
                      "follow a model's seed (a different seed is a different test set)",
                      FutureWarning, stacklevel=3)
        if data_seed not in (0, None, seed):
            raise DataError(f"{where}: seed={seed} and data_seed={data_seed} disagree; pass "
                            "only data_seed")
        data_seed = seed
    data_seed = 0 if data_seed is None else data_seed
    if isinstance(data_seed, bool) or not isinstance(data_seed, (int, np.integer)) \
            or data_seed < 0:
        raise DataError(f"data_seed must be an integer >= 0, got {data_seed!r}")
    return int(data_seed)


def _split_indices(n: int, fractions: tuple[float, float], seed: int) -> list[np.ndarray]:
    perm = np.random.default_rng(seed).permutation(n)
    n_val, n_test = round(fractions[0] * n), round(fractions[1] * n)
    return [perm[n_val + n_test:], perm[:n_val], perm[n_val:n_val + n_test]]


def _tensors(x: np.ndarray, y: np.ndarray) -> TensorDataset:
    return TensorDataset(torch.as_tensor(x, dtype=torch.float32),
                         torch.as_tensor(y, dtype=torch.int64))


def _balanced_subset(y: np.ndarray, n: int, seed: int) -> np.ndarray:
    """Indices of a class-balanced random subset of size ``n`` (sorted)."""
    classes = np.unique(y)
    rng = np.random.default_rng(seed)
    per = n // len(classes)
    idx = [rng.choice(np.flatnonzero(y == c), size=min(per, int((y == c).sum())), replace=False)
           for c in classes]
    return np.sort(np.concatenate(idx))


def load_digits(data_seed: int = 0, val_fraction: float = 0.15, test_fraction: float = 0.15,
                *, seed: int | None = None) -> Splits:
    """scikit-learn's bundled 8x8 digits (1797 images, 10 classes) as ``(N, 1, 8, 8)`` in [0, 1],
    standardised with the training mean and std. The embedded default: nothing to install.
    The split is drawn from ``data_seed`` (``seed``: deprecated alias)."""
    from sklearn.datasets import load_digits as sk_digits

    seed = resolve_data_seed(data_seed, seed, "load_digits")
    bunch = sk_digits()
    x = bunch.images.astype(np.float32)[:, None] / 16.0
    y = bunch.target.astype(np.int64)
    tr, va, te = _split_indices(len(y), (val_fraction, test_fraction), seed)
    mean, std = x[tr].mean(), x[tr].std()
    x = (x - mean) / std
    return Splits(_tensors(x[tr], y[tr]), _tensors(x[va], y[va]), _tensors(x[te], y[te]),
                  10, (1, 8, 8), "digits", seed)


def _read_idx(path: Path) -> np.ndarray:
    opener = gzip.open if path.suffix == ".gz" else open
    try:
        with opener(path, "rb") as f:
            data = f.read()
    except (OSError, EOFError) as exc:
        raise DataError(f"cannot read {path}: {exc}; the file is corrupt or truncated") from exc
    if len(data) < 8 or data[0] != 0 or data[1] != 0:
        raise DataError(f"{path} is not an IDX file (bad magic number)")
    ndim = data[3]
    dims = np.frombuffer(data, dtype=">i4", count=ndim, offset=4)
    offset = 4 + 4 * ndim
    if len(data) - offset != int(np.prod(dims)):
        raise DataError(f"{path} is truncated: expected {int(np.prod(dims))} bytes of data, "
                        f"found {len(data) - offset}")
    return np.frombuffer(data, dtype=np.uint8, offset=offset).reshape(dims)


def fashion_mnist_root(root: str | os.PathLike | None = None) -> Path:
    """Where the Fashion-MNIST IDX files are: ``root``, else ``$NEURALIGN_DATA/fashion-mnist``,
    else ``/usr/share/datasets/fashion-mnist``."""
    if root is not None:
        return Path(root)
    env = os.environ.get("NEURALIGN_DATA")
    if env:
        return Path(env) / "fashion-mnist"
    return Path(FASHION_MNIST_DEFAULT)


def _find(root: Path, stem: str) -> Path:
    for name in (stem + ".gz", stem):
        if (root / name).exists():
            return root / name
    raise DataError(
        f"Fashion-MNIST file {stem}(.gz) not found in {root}: run 'apt-get install -y "
        f"dataset-fashion-mnist', or put the four IDX files there and pass root= (or set "
        f"NEURALIGN_DATA to their parent folder)")


def load_fashion_mnist_arrays(root=None) -> dict[str, np.ndarray]:
    """The raw uint8 arrays: ``train_images (60000, 28, 28)``, ``train_labels``, ``test_*``."""
    r = fashion_mnist_root(root)
    if not r.is_dir():
        raise DataError(
            f"Fashion-MNIST folder {r} does not exist: run 'apt-get install -y "
            f"dataset-fashion-mnist', or pass root= / set NEURALIGN_DATA to the folder's parent")
    return {k: _read_idx(_find(r, stem)) for k, stem in FASHION_MNIST_FILES.items()}


FASHION_MEAN, FASHION_STD = 0.2860, 0.3530


def load_fashion_mnist(root=None, data_seed: int = 0, val_size: int = 5000,
                       subset: int | None = None, test_subset: int | None = None, *,
                       seed: int | None = None) -> Splits:
    """Fashion-MNIST as ``(N, 1, 28, 28)``, standardised. The test set is the official 10,000
    test images (``t10k``); the validation set is ``val_size`` images held out of the 60,000
    training images, drawn from ``data_seed``; ``subset`` keeps a class-balanced subset of the
    remaining training images, ``test_subset`` of the test images (both from ``data_seed``;
    ``seed``: deprecated alias)."""
    seed = resolve_data_seed(data_seed, seed, "load_fashion_mnist")
    arr = load_fashion_mnist_arrays(root)
    x = (arr["train_images"].astype(np.float32) / 255.0 - FASHION_MEAN) / FASHION_STD
    y = arr["train_labels"].astype(np.int64)
    xt = (arr["test_images"].astype(np.float32) / 255.0 - FASHION_MEAN) / FASHION_STD
    yt = arr["test_labels"].astype(np.int64)
    perm = np.random.default_rng(seed).permutation(len(y))
    va, tr = perm[:val_size], np.sort(perm[val_size:])
    if subset is not None:
        tr = tr[_balanced_subset(y[tr], subset, seed)]
    te = np.arange(len(yt)) if test_subset is None else _balanced_subset(yt, test_subset, seed)
    return Splits(_tensors(x[tr, None], y[tr]), _tensors(x[va, None], y[va]),
                  _tensors(xt[te, None], yt[te]), 10, (1, 28, 28), "fashion_mnist", seed)


def load_mnist1d(data_seed: int = 0, num_samples: int = 5000, val_fraction: float = 0.1, *,
                 seed: int | None = None) -> Splits:
    """MNIST-1D generated locally with ``mnist1d.data.make_dataset`` (never downloaded) as
    ``(N, 1, 40)``. ``data_seed`` seeds the generation and the validation split (``seed``:
    deprecated alias)."""
    seed = resolve_data_seed(data_seed, seed, "load_mnist1d")
    try:
        from mnist1d.data import get_dataset_args, make_dataset
    except ImportError as exc:
        raise DataError("mnist1d is not installed: pip install mnist1d") from exc
    args = get_dataset_args()
    args.num_samples = num_samples
    args.seed = seed
    data = make_dataset(args)
    x = np.asarray(data["x"], dtype=np.float32)
    y = np.asarray(data["y"], dtype=np.int64)
    xt = np.asarray(data["x_test"], dtype=np.float32)
    yt = np.asarray(data["y_test"], dtype=np.int64)
    n_val = round(val_fraction * len(y))
    perm = np.random.default_rng(seed).permutation(len(y))
    va, tr = perm[:n_val], perm[n_val:]
    mean, std = x[tr].mean(), x[tr].std()
    norm = lambda a: (a - mean) / std
    return Splits(_tensors(norm(x[tr])[:, None], y[tr]), _tensors(norm(x[va])[:, None], y[va]),
                  _tensors(norm(xt)[:, None], yt), 10, (1, x.shape[1]), "mnist1d", seed)


DATASETS = {"digits": load_digits, "fashion_mnist": load_fashion_mnist, "mnist1d": load_mnist1d}


def load_data(name: str, *, data_seed: int = 0, root=None, subset: int | None = None,
              seed: int | None = None, **kw) -> Splits:
    """Load a data set by name: ``digits`` (default, embedded), ``fashion_mnist``, ``mnist1d``, or
    a source ``imagefolder:DIR``, ``npz:FILE``, ``hf-disk:DIR``, ``module:function``; or a
    WordNet text task ``wordnet_<task>`` (a ``TextSplits`` of glosses; see
    :func:`neuralign.data.wordnet.load_wordnet`; ``max_train=`` instead of ``subset``).

    The train/val/test split is drawn from ``data_seed`` alone (default 0), never from a model's
    seed, so models trained with different seeds share one test set; the result records it
    (``Splits.data_seed``). ``seed`` is a deprecated alias of ``data_seed`` (FutureWarning).
    ``subset`` keeps a class-balanced subset of that many training examples (from ``data_seed``).
    """
    if not isinstance(name, str) or not name.strip():
        raise DataError(f"a data set name must be a non-empty string, got {name!r}")
    data_seed = resolve_data_seed(data_seed, seed, "load_data")
    if subset is not None and (isinstance(subset, bool)
                               or not isinstance(subset, (int, np.integer)) or subset < 1):
        raise DataError(f"subset must be a positive integer, got {subset!r}")
    subset = None if subset is None else int(subset)
    key = name.replace("-", "_").lower()
    if key not in DATASETS and ":" in name:
        from neuralign.data import sources

        extra = {"root": root} if root is not None else {}
        splits = sources.load_source(name, data_seed=data_seed, **extra, **kw)
        return _train_subset(splits, subset, data_seed) if subset is not None else splits
    if key.startswith("wordnet_"):   # text tasks: TextSplits of glosses
        from neuralign.data.wordnet import load_wordnet

        if subset is not None:
            raise DataError(f"{name} is a text task: pass max_train= instead of subset=")
        try:
            return load_wordnet(key, data_seed=data_seed, root=root, **kw)
        except TypeError as exc:
            raise DataError(f"bad option for data set {name!r}: {exc}") from exc
    if key not in DATASETS:
        raise DataError(f"unknown data set {name!r}; choose from {', '.join(DATASETS)}, "
                        "wordnet_<task> (text), or "
                        "imagefolder:DIR, npz:FILE, hf-disk:DIR, module:function")
    try:
        if key == "fashion_mnist":
            return load_fashion_mnist(root=root, data_seed=data_seed, subset=subset, **kw)
        if root is not None:
            raise DataError(f"{name} takes no root: it is generated or embedded")
        splits = DATASETS[key](data_seed=data_seed, **kw)
    except TypeError as exc:
        raise DataError(f"bad option for data set {name!r}: {exc}") from exc
    return _train_subset(splits, subset, data_seed) if subset is not None else splits


def _train_subset(splits: Splits, subset: int, data_seed: int) -> Splits:
    """``splits`` with a class-balanced subset of ``subset`` training examples."""
    from dataclasses import replace

    x, y = splits.train.tensors
    if subset > len(y):
        raise DataError(f"subset={subset} exceeds the {len(y)} training examples of "
                        f"{splits.name}")
    idx = _balanced_subset(y.numpy(), subset, data_seed)
    return replace(splits, train=TensorDataset(x[idx], y[idx]))
