"""Data from anywhere: ``imagefolder:DIR``, ``npz:FILE``, ``hf-disk:DIR`` and ``module:function``.

Every source returns :class:`~neuralign.data.Splits` whose train/val/test split is drawn from
``data_seed`` alone (never from a model's seed) unless the data brings its own splits.

* ``imagefolder:DIR`` — ``DIR/<class>/*.png|jpg|...``; or ``DIR/{train,val,test}/<class>/``;
  or the DomainBed layout ``DIR/<domain>/<class>/`` with ``test_domain=`` (the held-out domain
  is the test split; train/val are drawn from the other domains). Images keep their channels
  (1 = grey, 3 = RGB, 4 = RGBA, as the files store them; ``channels=`` converts), are resized
  (shorter side) and centre-cropped to ``image_size`` and normalised: ImageNet mean/std for
  three channels, 0.5/0.5 otherwise — what a torchvision user expects of an eval transform.
* ``npz:FILE`` — arrays ``x`` and ``y`` (optional ``x_val``/``y_val``, ``x_test``/``y_test``);
  any shape ``(N, C, ...)``; integer images (uint8) are scaled to [0, 1]. Text: an array
  ``text`` of strings instead of ``x``, tokenised with ``tokenizer``.
* ``hf-disk:DIR`` — a ``datasets`` Dataset or DatasetDict saved with ``save_to_disk``; an image
  column (``image``/``img``) or a text column (``text``/``sentence``), and ``label``/``labels``.
* ``module:function`` — ``function(data_seed=...)`` returning Splits or ``(train, val, test)``
  datasets.
"""

from __future__ import annotations

import importlib
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import Dataset, TensorDataset

from neuralign.errors import DataError

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff", ".ppm")
IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
SCHEMES = ("imagefolder", "npz", "hf-disk")


def is_source(name: str) -> bool:
    scheme, sep, rest = name.partition(":")
    return bool(sep) and (scheme in SCHEMES or ("." in scheme or scheme.isidentifier())
                          and rest.isidentifier())


def load_source(name: str, *, data_seed: int = 0, image_size: int | None = None,
                channels: int | None = None, test_domain: str | None = None, tokenizer=None,
                max_length: int = 64, val_fraction: float = 0.15, test_fraction: float = 0.15,
                **kw):
    """Load ``scheme:target`` as Splits (see the module docstring)."""
    from neuralign.data.core import Splits  # noqa: F401 - imported for the type

    scheme, _, target = name.partition(":")
    fr = (val_fraction, test_fraction)
    if scheme == "imagefolder":
        return _imagefolder(Path(target), name, data_seed, image_size, channels, test_domain, fr)
    if test_domain is not None:
        raise DataError(f"{name}: a test domain is only for imagefolder data in DomainBed layout")
    if scheme == "npz":
        return _npz(Path(target), name, data_seed, tokenizer, max_length, fr)
    if scheme == "hf-disk":
        return _hf_disk(Path(target), name, data_seed, image_size, channels, tokenizer,
                        max_length, fr)
    return _hook(name, data_seed, **kw)


# ---------------------------------------------------------------- helpers


def _make_splits(train, val, test, num_classes, input_shape, name, data_seed):
    from neuralign.data.core import Splits

    kwargs = dict(train=train, val=val, test=test, num_classes=int(num_classes),
                  input_shape=tuple(int(s) for s in input_shape), name=name)
    if "data_seed" in getattr(Splits, "__dataclass_fields__", {}):
        kwargs["data_seed"] = data_seed
    s = Splits(**kwargs)
    if not hasattr(s, "data_seed"):
        s.data_seed = data_seed
    return s


def _split(n: int, fractions, seed: int, labels=None):
    """(train, val, test) index arrays; stratified by label when labels are given."""
    rng = np.random.default_rng(seed)
    groups = [np.arange(n)] if labels is None else [np.flatnonzero(labels == c)
                                                     for c in np.unique(labels)]
    parts = [[], [], []]
    for g in groups:
        g = rng.permutation(g)
        n_val, n_test = int(round(fractions[0] * len(g))), int(round(fractions[1] * len(g)))
        parts[1].append(g[:n_val])
        parts[2].append(g[n_val:n_val + n_test])
        parts[0].append(g[n_val + n_test:])
    out = [np.sort(np.concatenate(p)) if p else np.zeros(0, int) for p in parts]
    if any(len(p) == 0 for p in out):
        raise DataError(f"{n} examples are too few for a train/val/test split; add examples")
    return out


def _labels(values, name: str):
    y = np.asarray(values)
    if y.ndim != 1 or not np.issubdtype(y.dtype, np.integer):
        raise DataError(f"{name}: labels must be a 1-D integer array, got {y.dtype} {y.shape}")
    if len(y) and y.min() < 0:
        raise DataError(f"{name}: labels must be >= 0")
    return y.astype(np.int64)


# ---------------------------------------------------------------- images


class ImageFiles(Dataset):
    """Image files decoded, resized, centre-cropped and normalised on access."""

    def __init__(self, files, labels, image_size: int, channels: int):
        self.files, self.labels = list(files), np.asarray(labels, dtype=np.int64)
        self.image_size, self.channels = image_size, channels

    def __len__(self):
        return len(self.files)

    def __getitem__(self, i):
        from PIL import Image

        with Image.open(self.files[i]) as im:
            x = to_tensor(im, self.image_size, self.channels)
        return x, torch.tensor(self.labels[i])


def _mode(channels: int) -> str:
    return {1: "L", 3: "RGB", 4: "RGBA"}.get(channels) or _bad_channels(channels)


def _bad_channels(c):
    raise DataError(f"images have 1, 3 or 4 channels; got {c}")


def to_tensor(im, image_size: int, channels: int) -> torch.Tensor:
    """A PIL image as a normalised ``(C, S, S)`` float tensor (resize shorter side, crop)."""
    from PIL import Image

    im = im.convert(_mode(channels))
    w, h = im.size
    scale = image_size / min(w, h)
    nw, nh = max(image_size, round(w * scale)), max(image_size, round(h * scale))
    if (nw, nh) != (w, h):
        im = im.resize((nw, nh), Image.BILINEAR)
    left, top = (nw - image_size) // 2, (nh - image_size) // 2
    im = im.crop((left, top, left + image_size, top + image_size))
    a = np.asarray(im, dtype=np.float32) / 255.0
    a = a[..., None] if a.ndim == 2 else a
    mean, std = (IMAGENET_MEAN, IMAGENET_STD) if channels == 3 else ((0.5,) * channels,
                                                                      (0.5,) * channels)
    a = (a - np.asarray(mean, np.float32)) / np.asarray(std, np.float32)
    return torch.from_numpy(np.ascontiguousarray(a.transpose(2, 0, 1)))


def _class_dirs(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if p.is_dir() and not p.name.startswith("."))


def _images(folder: Path) -> list[Path]:
    return sorted(p for p in folder.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES
                  and p.is_file())


def _scan(root: Path, classes: list[str]):
    files, labels = [], []
    for c, name in enumerate(classes):
        imgs = _images(root / name) if (root / name).is_dir() else []
        files += imgs
        labels += [c] * len(imgs)
    return files, np.asarray(labels, dtype=np.int64)


def _guess_channels(files) -> int:
    from PIL import Image

    with Image.open(files[0]) as im:
        return {"L": 1, "1": 1, "I": 1, "F": 1, "LA": 1, "RGBA": 4}.get(im.mode, 3)


def _imagefolder(root: Path, name, data_seed, image_size, channels, test_domain, fractions):
    if not root.is_dir():
        raise DataError(f"{name}: {root} is not a folder")
    subs = _class_dirs(root)
    if not subs:
        raise DataError(f"{name}: {root} holds no class folders (DIR/<class>/<image>)")
    split_names = {p.name for p in subs}
    domain_layout = all(_class_dirs(p) for p in subs) and not {"train", "test"} <= split_names
    if {"train", "test"} <= split_names:
        classes = sorted({c.name for s in ("train", "test") for c in _class_dirs(root / s)})
        parts = {s: _scan(root / s, classes) for s in ("train", "val", "test")
                 if (root / s).is_dir()}
        if "val" not in parts:
            f, y = parts["train"]
            tr, va = _split_two(len(f), fractions[0], data_seed, y)
            parts["train"], parts["val"] = ([f[i] for i in tr], y[tr]), ([f[i] for i in va],
                                                                          y[va])
    elif domain_layout:
        domains = [p.name for p in subs]
        if test_domain is None:
            raise DataError(f"{name} is in DomainBed layout (domains {', '.join(domains)}): "
                            "pass a test domain (CLI: --test-domain)")
        if test_domain not in domains:
            raise DataError(f"{name}: no domain {test_domain!r}; domains: {', '.join(domains)}")
        classes = sorted({c.name for d in subs for c in _class_dirs(d)})
        f_tr, y_tr = [], []
        for d in domains:
            if d != test_domain:
                f, y = _scan(root / d, classes)
                f_tr += f
                y_tr.append(y)
        y_all = np.concatenate(y_tr)
        tr, va = _split_two(len(f_tr), fractions[0] + fractions[1], data_seed, y_all)
        parts = {"train": ([f_tr[i] for i in tr], y_all[tr]),
                 "val": ([f_tr[i] for i in va], y_all[va]),
                 "test": _scan(root / test_domain, classes)}
    else:
        if test_domain is not None:
            raise DataError(f"{name}: --test-domain needs the DomainBed layout "
                            "DIR/<domain>/<class>/<image>")
        classes = [p.name for p in subs]
        f, y = _scan(root, classes)
        tr, va, te = _split(len(f), fractions, data_seed, y)
        parts = {s: ([f[i] for i in idx], y[idx]) for s, idx in
                 (("train", tr), ("val", va), ("test", te))}
    all_files = [p for s in parts.values() for p in s[0]]
    if not all_files:
        raise DataError(f"{name}: no image files ({', '.join(IMAGE_SUFFIXES)}) found")
    channels = channels or _guess_channels(all_files)
    size = image_size or 224
    ds = {s: ImageFiles(f, y, size, channels) for s, (f, y) in parts.items()}
    return _make_splits(ds["train"], ds["val"], ds["test"], len(classes), (channels, size, size),
                        name, data_seed)


def _split_two(n, held_fraction, seed, labels):
    """(train, held-out) index arrays, stratified by label, from ``seed`` alone."""
    rng = np.random.default_rng(seed)
    tr, va = [], []
    for c in np.unique(labels):
        g = rng.permutation(np.flatnonzero(labels == c))
        k = int(round(held_fraction * len(g)))
        va.append(g[:k])
        tr.append(g[k:])
    tr, va = np.sort(np.concatenate(tr)), np.sort(np.concatenate(va))
    if len(tr) == 0 or len(va) == 0:
        raise DataError(f"{n} examples are too few for a train/val split; add examples")
    return tr, va


# ---------------------------------------------------------------- arrays and text


def _tokenize(texts, tokenizer, max_length: int, name: str) -> torch.Tensor:
    if tokenizer is None:
        raise DataError(f"{name} holds text: it needs a tokenizer (CLI: a Hugging Face model "
                        "folder, whose tokenizer is used)")
    enc = tokenizer([str(t) for t in texts], padding="max_length", truncation=True,
                    max_length=max_length, return_tensors="pt")
    return enc["input_ids"].long()


def _as_inputs(x: np.ndarray, name: str) -> torch.Tensor:
    if x.ndim < 2:
        raise DataError(f"{name}: inputs must be (N, ...) with at least one feature axis")
    if np.issubdtype(x.dtype, np.integer) and x.dtype == np.uint8:
        return torch.as_tensor(x.astype(np.float32) / 255.0)
    if not np.issubdtype(x.dtype, np.number):
        raise DataError(f"{name}: inputs of dtype {x.dtype} are not numbers")
    t = torch.as_tensor(x.astype(np.float32))
    if not bool(torch.isfinite(t).all()):
        raise DataError(f"{name}: inputs hold NaN or Inf values")
    return t


def _from_arrays(arrays: dict, name, data_seed, tokenizer, max_length, fractions):
    text = "text" in arrays
    if "y" not in arrays or ("x" not in arrays and not text):
        raise DataError(f"{name}: needs arrays x (or text) and y; found "
                        f"{', '.join(arrays) or 'none'}")
    xkey = "text" if text else "x"

    def inputs(key):
        a = arrays[key]
        return _tokenize(a, tokenizer, max_length, name) if text else _as_inputs(a, name)

    for split in ("val", "test"):
        if (f"{xkey}_{split}" in arrays) != (f"y_{split}" in arrays):
            raise DataError(f"{name}: {xkey}_{split} and y_{split} come together; found only "
                            "one of them")
    x, y = inputs(xkey), _labels(arrays["y"], name)
    if len(x) != len(y):
        raise DataError(f"{name}: {len(x)} inputs but {len(y)} labels")
    have_test = f"{xkey}_test" in arrays
    have_val = f"{xkey}_val" in arrays
    if have_test:
        xt, yt = inputs(f"{xkey}_test"), _labels(arrays["y_test"], name)
        if have_val:
            xv, yv = inputs(f"{xkey}_val"), _labels(arrays["y_val"], name)
            tr = np.arange(len(y))
        else:
            tr, va = _split_two(len(y), fractions[0], data_seed, y)
            xv, yv = x[va], y[va]
        xtr, ytr = x[tr], y[tr]
    else:
        tr, va, te = _split(len(y), fractions, data_seed, y)
        xtr, ytr, xv, yv, xt, yt = x[tr], y[tr], x[va], y[va], x[te], y[te]
    classes = int(max(ytr.max(initial=0), yv.max(initial=0), yt.max(initial=0))) + 1
    mk = lambda a, b: TensorDataset(a, torch.as_tensor(b))
    return _make_splits(mk(xtr, ytr), mk(xv, yv), mk(xt, yt), classes, tuple(x.shape[1:]), name,
                        data_seed)


def _npz(path: Path, name, data_seed, tokenizer, max_length, fractions):
    try:
        with np.load(path, allow_pickle=False) as f:
            arrays = {k: f[k] for k in f.files}
    except (OSError, ValueError, EOFError) as exc:
        raise DataError(f"{name}: cannot read {path} as .npz ({exc})") from exc
    return _from_arrays(arrays, name, data_seed, tokenizer, max_length, fractions)


def _hf_disk(path: Path, name, data_seed, image_size, channels, tokenizer, max_length,
             fractions):
    try:
        import datasets
    except ImportError as exc:
        raise DataError("hf-disk data needs the datasets package: pip install datasets") from exc
    try:
        obj = datasets.load_from_disk(str(path))
    except (FileNotFoundError, ValueError, OSError) as exc:
        raise DataError(f"{name}: not a dataset saved with save_to_disk ({exc})") from exc
    parts = dict(obj) if isinstance(obj, datasets.DatasetDict) else {"train": obj}
    if "validation" in parts and "val" not in parts:
        parts["val"] = parts.pop("validation")
    cols = next(iter(parts.values())).column_names
    label = next((c for c in ("label", "labels", "y") if c in cols), None)
    image = next((c for c in ("image", "img") if c in cols), None)
    text = next((c for c in ("text", "sentence", "content") if c in cols), None)
    if label is None or (image is None and text is None):
        raise DataError(f"{name}: needs a label column (label/labels) and an image (image/img) "
                        f"or text (text/sentence) column; has {', '.join(cols)}")
    arrays = {}
    for split, d in parts.items():
        suffix = "" if split == "train" else f"_{split}"
        if split not in ("train", "val", "test"):
            continue
        arrays[f"y{suffix}"] = np.asarray(d[label], dtype=np.int64)
        if text:
            arrays[f"text{suffix}"] = np.asarray(d[text], dtype=object)
        else:
            ims = d[image]
            ch = channels or (_mode_channels(ims[0]) if len(ims) else 3)
            size = image_size or 224
            arrays[f"x{suffix}"] = np.stack([to_tensor(im, size, ch).numpy() for im in ims])
    return _from_arrays(arrays, name, data_seed, tokenizer, max_length, fractions)


def _mode_channels(im) -> int:
    return {"L": 1, "1": 1, "I": 1, "F": 1, "LA": 1, "RGBA": 4}.get(im.mode, 3)


# ---------------------------------------------------------------- module:function


def _hook(name: str, data_seed: int, **kw):
    mod_name, _, fn_name = name.partition(":")
    try:
        mod = importlib.import_module(mod_name)
    except ImportError as exc:
        raise DataError(f"{name}: cannot import module {mod_name!r} ({exc})") from exc
    fn = getattr(mod, fn_name, None)
    if not callable(fn):
        raise DataError(f"{name}: module {mod_name} has no function {fn_name!r}")
    out = fn(data_seed=data_seed, **kw)
    if hasattr(out, "train") and hasattr(out, "num_classes"):
        return out
    if not (isinstance(out, (tuple, list)) and len(out) == 3):
        raise DataError(f"{name} must return Splits or (train, val, test) datasets, got "
                        f"{type(out).__name__}")
    train, val, test = out
    x0, _ = train[0]
    labels = [int(train[i][1]) for i in range(len(train))]
    return _make_splits(train, val, test, max(labels) + 1, tuple(x0.shape), name, data_seed)
