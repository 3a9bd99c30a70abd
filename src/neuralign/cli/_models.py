"""Models from anywhere for the CLI: neuralign checkpoints, plain state dicts (with ``--arch``),
pickles (with ``--allow-pickle``) and Hugging Face model folders; every load goes through
``neuralign.io.load_model`` with the NaN/Inf check on."""

from __future__ import annotations

import inspect
from dataclasses import dataclass, field

from neuralign.cli._common import fail, parse_options
from neuralign.cli._inputs import check_checkpoint


@dataclass
class ModelArgs:
    arch: str | None = None
    model_options: list[str] | None = None
    allow_pickle: bool = False
    kwargs: dict = field(default_factory=dict)

    def __post_init__(self):
        self.kwargs = parse_options(self.model_options, flag="-m/--model-option")
        if self.kwargs and not self.arch:
            fail("-m/--model-option sets the arguments of --arch; give --arch too "
                 "(e.g. --arch resnet20 -m width=4)")
        if self.arch:
            _check_arch(self.arch)


def _check_arch(arch: str) -> None:
    source, sep, rest = arch.partition(":")
    if sep:
        if source not in ("torchvision", "timm", "hf"):
            fail(f"--arch {arch!r}: use a neuralign model name, torchvision:NAME, timm:NAME or "
                 "hf:DIR")
        if not rest:
            fail(f"--arch {arch!r}: give a name after '{source}:'")
        if source == "hf":
            from pathlib import Path

            if not (Path(rest) / "config.json").is_file():
                fail(f"--arch {arch}: {rest} is not a Hugging Face model folder (no config.json)")
    else:
        known = ("mlp", "vgg11", "vgg16", "resnet20", "cnn")
        if arch not in known:
            fail(f"--arch {arch!r}: unknown model; use {', '.join(known)}, torchvision:NAME, "
                 "timm:NAME or hf:DIR")


def precheck(paths, margs: ModelArgs) -> list[str]:
    """Torch-free checks of every model input (a one-line error on the first bad one)."""
    return [check_checkpoint(p, allow_pickle=margs.allow_pickle) for p in paths]


def read_infos(paths) -> list[dict]:
    from neuralign.io import read_info

    return [read_info(p) for p in paths]


def load_one(path: str, margs: ModelArgs, info: dict | None = None, device=None):
    """Load ``path`` (strict, finite weights) as a model in eval mode, on ``device``."""
    from neuralign.io import load_model

    info = info if info is not None else {}
    arch = margs.arch
    if arch is None and not info.get("arch"):
        fail(f"{path} records no architecture (a plain state dict): pass --arch, e.g. "
             "--arch torchvision:resnet18 or --arch mlp -m width=512")
    kw: dict = {"allow_pickle": margs.allow_pickle}
    params = inspect.signature(load_model).parameters
    if arch is None and info.get("format") == "hf-dir":
        n = _hf_num_labels(path)
        if n is not None:  # a saved classifier folder: keep its trained head
            arch, margs = info["arch"], ModelArgs()
            margs.kwargs = {"num_classes": n}
    if arch is not None:
        if "arch" in params:
            kw["arch"] = arch
            kw["model_kwargs"] = dict(margs.kwargs) or None
        else:  # an older io.load_model: build the model here and fill it
            from neuralign.models import get_model

            kw["model"] = get_model(arch, **margs.kwargs)
    if "check_finite" in params:
        kw["check_finite"] = True
    model = load_model(path, **kw)
    if "check_finite" not in params:
        _check_finite(model, path)
    model.eval()
    _adapt_hf(model)
    if device is not None:
        model.to(device)
    return model


def _hf_num_labels(folder) -> int | None:
    """The label count of a Hugging Face *ForSequenceClassification folder, else None."""
    import json
    from pathlib import Path

    try:
        cfg = json.loads((Path(folder) / "config.json").read_text())
    except (OSError, ValueError):
        return None
    archs = cfg.get("architectures") or []
    if not any(str(a).endswith("ForSequenceClassification") for a in archs):
        return None
    n = cfg.get("num_labels") or len(cfg.get("id2label") or {}) or None
    return int(n) if n else None


def load_all(paths, margs: ModelArgs, infos=None, device=None):
    infos = infos or [None] * len(paths)
    return [load_one(p, margs, i, device) for p, i in zip(paths, infos)]


def _check_finite(model, path) -> None:
    import torch

    for name, t in model.state_dict().items():
        if t.is_floating_point() and not bool(torch.isfinite(t).all()):
            fail(f"{path}: tensor {name} holds NaN or Inf values")


def _hf_pre(module, args, kwargs):
    """Give Hugging Face models the attention mask of padded token ids (pad = 0 or the
    config's pad_token_id)."""
    import torch

    ids = args[0] if args else kwargs.get("input_ids")
    if not isinstance(ids, torch.Tensor) or "attention_mask" in kwargs:
        return None
    if ids.dtype not in (torch.int64, torch.int32):
        return None
    pad = getattr(module.config, "pad_token_id", None)
    pad = 0 if pad is None else pad
    kwargs = dict(kwargs)
    if args:
        kwargs["input_ids"], args = args[0], args[1:]
    kwargs["attention_mask"] = (kwargs["input_ids"] != pad).long()
    return args, kwargs


def _hf_post(module, args, kwargs, output):
    logits = getattr(output, "logits", None)
    return logits if logits is not None else output


def _adapt_hf(model) -> None:
    """Hugging Face models: tensor in (token ids, with their attention mask), logits out, so the
    evaluation loops see a classifier. Hooks leave the weights and state dict untouched."""
    if not hasattr(model, "config") or not hasattr(model, "get_input_embeddings"):
        return
    if getattr(model, "_neuralign_hf_hooks", False):
        return
    model.register_forward_pre_hook(_hf_pre, with_kwargs=True)
    model.register_forward_hook(_hf_post, with_kwargs=True)
    model._neuralign_hf_hooks = True


def check_accepts(model, example, what: str, need_scores: bool = True) -> None:
    """One forward pass on two examples: a model that cannot take the data fails here, with
    one line, not deep inside a merge."""
    import torch

    try:
        with torch.no_grad():
            out = model(example)
    except Exception as exc:  # noqa: BLE001 - any failure means the data does not fit
        msg = " ".join(str(exc).split())[:200]
        fail(f"{what}: the model does not accept inputs of shape {tuple(example.shape)} "
             f"({type(exc).__name__}: {msg}); check --data, --image-size or --arch")
    if need_scores and not isinstance(out, torch.Tensor):
        fail(f"{what}: the model returns {type(out).__name__}, not class scores; give a "
             "classifier (a Hugging Face *ForSequenceClassification folder, or -m num_classes=K)")
