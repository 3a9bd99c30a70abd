"""Data for a command: by default what the checkpoint records (data set and data seed), with
warnings when a model is evaluated on examples it was trained on."""

from __future__ import annotations

from dataclasses import dataclass

from neuralign.cli._common import fail, warn


@dataclass
class DataArgs:
    data: str | None = None
    data_seed: int | None = None
    root: str | None = None
    image_size: int | None = None
    test_domain: str | None = None
    subset: int | None = None


def resolve(dargs: DataArgs, infos=(), *, required: bool = True, paths=()) -> tuple[str | None,
                                                                                   int]:
    """(data name, data seed): the options, else the first checkpoint's record, else an
    error (when ``required``). Warns when the checkpoints disagree."""
    recorded = [(p, i.get("data"), i.get("data_seed")) for p, i in zip(paths, infos)
                if i and i.get("data")]
    data = dargs.data
    if data is None and recorded:
        data = recorded[0][1]
        names = {r[1] for r in recorded}
        if len(names) > 1:
            warn("the checkpoints were trained on different data ("
                 + ", ".join(f"{p}: {d}" for p, d, _ in recorded) + f"); using {data}")
    if data is None and required:
        fail("--data is needed: " + (", ".join(map(str, paths)) or "the checkpoint")
             + " records no training data (e.g. --data digits or --data imagefolder:DIR)")
    seed = dargs.data_seed
    if seed is None:
        same = [r for r in recorded if r[1] == data and r[2] is not None]
        seed = int(same[0][2]) if same else 0
        if len({int(r[2]) for r in same}) > 1:
            warn("the checkpoints were trained on different splits of "
                 f"{data} (data seeds {sorted({int(r[2]) for r in same})}); using data seed "
                 f"{seed}: another model's held-out examples may be in its training set")
    for p, d, s in recorded:
        if d == data and s is not None and int(s) != seed:
            warn(f"{p} was trained on the split of {data} with data seed {s}; evaluating with "
                 f"data seed {seed} mixes its training examples into the held-out ones")
    return data, seed


def warn_if_training_split(split: str, data: str, infos, paths) -> None:
    if split != "train":
        return
    for p, i in zip(paths, infos):
        if i and i.get("data") == data:
            warn(f"{p} was trained on {data}'s train split: this measures the fit to the "
                 "training data, not generalisation")


def load(data: str, seed: int, dargs: DataArgs, *, model_image_size=None, tokenizer=None):
    """Splits of ``data`` drawn from data seed ``seed``."""
    import inspect

    from neuralign.data import load_data
    from neuralign.data.sources import is_source, load_source

    if is_source(data):
        return load_source(data, data_seed=seed, image_size=dargs.image_size or model_image_size,
                           test_domain=dargs.test_domain, tokenizer=tokenizer)
    if dargs.test_domain is not None:
        fail("--test-domain is for imagefolder:DIR data in DomainBed layout")
    kw = {}
    if dargs.subset is not None:
        kw["subset"] = dargs.subset
    params = inspect.signature(load_data).parameters
    if "data_seed" in params:
        kw["data_seed"] = seed
    else:
        kw["seed"] = seed
    return load_data(data, root=dargs.root, **kw)


def tokenizer_for(paths, infos, arch: str | None):
    """The tokenizer of the first Hugging Face model folder among the inputs (or --arch hf:)."""
    from pathlib import Path

    dirs = [str(p) for p in paths if Path(p).is_dir()]
    if arch and arch.startswith("hf:"):
        dirs.append(arch[3:])
    for i in infos:
        a = (i or {}).get("arch") or ""
        if a.startswith("hf:"):
            dirs.append(a[3:])
    for d in dirs:
        if (Path(d) / "tokenizer_config.json").exists() or (Path(d) / "vocab.txt").exists() \
                or (Path(d) / "tokenizer.json").exists():
            from transformers import AutoTokenizer

            return AutoTokenizer.from_pretrained(d, local_files_only=True)
    return None


def model_image_size(infos) -> int | None:
    for i in infos:
        shape = (i or {}).get("input_shape")
        if shape and len(shape) == 3:
            return int(shape[-1])
        kw = (i or {}).get("model_kwargs") or {}
        if kw.get("image_size"):
            return int(kw["image_size"])
    return None


def metadata(command: str, data: str | None, data_seed: int | None, seed: int | None,
             splits=None, **extra) -> dict:
    """What every saved model records about where it came from."""
    meta = {"command": command, "data": absolute(data), "data_seed": data_seed, "seed": seed}
    if splits is not None:
        meta["input_shape"] = list(splits.input_shape)
        meta["num_classes"] = int(splits.num_classes)
    meta.update(extra)
    return meta


def absolute(data: str | None) -> str | None:
    """``scheme:path`` with an absolute path, so the record works from any folder."""
    import os

    if not data or ":" not in data:
        return data
    scheme, _, rest = data.partition(":")
    if scheme in ("imagefolder", "npz", "hf-disk") and rest:
        return f"{scheme}:{os.path.abspath(rest)}"
    return data


def example_batch(splits, n: int = 2):
    """The first ``n`` training inputs, stacked."""
    import torch

    xs = [splits.train[i][0] for i in range(min(n, len(splits.train)))]
    if not xs:
        fail(f"{splits.name}: the training split is empty")
    return torch.stack(xs)
