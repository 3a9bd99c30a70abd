"""LEVI checkpoints: only what trained (adapting heads, small model, trainable large-model weights
such as LoRA adapters or the tuned top half) plus a reference to the large model.

The sidecar records LEVI's configuration, how to rebuild the small model and where the large
model comes from: ``{"name", "kwargs"}`` for a ``neuralign.models.get_model`` model (the default
when the large model was built that way) or ``{"path": ...}`` for a saved checkpoint.
"""

from __future__ import annotations

from pathlib import Path

from torch import nn

from neuralign.errors import CheckpointError, NeuralignError
from neuralign.finetune.levi import LEVI

_CONFIG_KEYS = ("num_outputs", "hidden", "task", "large_mode", "lora_r", "lora_alpha",
                "lora_targets", "early_exit", "pad_token_id", "num_heads", "pool", "feature_dims",
                "tap_dims")


def _small_spec(small: nn.Module | None):
    from neuralign.finetune.levi_small import CNN4, TextMLP, TextTransformer
    from neuralign.models import model_config

    if small is None:
        return None
    if isinstance(small, CNN4):
        conv = [m for m in small.features if isinstance(m, nn.Conv2d)]
        return {"name": "cnn4", "kwargs": {"in_channels": conv[0].in_channels,
                                           "widths": [c.out_channels for c in conv]}}
    if isinstance(small, TextMLP):
        lin = [m for m in small.mlp if isinstance(m, nn.Linear)]
        return {"name": "text_mlp", "kwargs": {
            "vocab_size": small.embed.num_embeddings, "embed_dim": small.embed.embedding_dim,
            "hidden": [m.out_features for m in lin], "pad_token_id": small.pad_token_id}}
    if isinstance(small, TextTransformer):
        layer = small.encoder.layers[0]
        return {"name": "text_transformer", "kwargs": {
            "vocab_size": small.embed.num_embeddings, "dim": small.embed.embedding_dim,
            "heads": layer.self_attn.num_heads, "layers": len(small.encoder.layers),
            "max_length": small.max_length, "pad_token_id": small.pad_token_id}}
    cfg = model_config(small)
    return {"name": cfg["name"], "kwargs": cfg["kwargs"], "headless": True} if cfg else None


def save_levi(model: LEVI, path, *, large_ref: str | dict | None = None,
              metadata: dict | None = None) -> Path:
    """Write ``model.trainable_state_dict()`` to ``path`` (safetensors) with a JSON sidecar.
    ``large_ref``: a checkpoint path or ``{"name", "kwargs"}``; default: the large model's
    ``neuralign.models.model_config`` (None when it cannot be rebuilt: pass ``large=`` to load)."""
    from neuralign.io import save_state_dict
    from neuralign.models import model_config

    if not isinstance(model, LEVI):
        raise NeuralignError(f"save_levi needs a LEVI model, got {type(model).__name__}")
    if isinstance(large_ref, (str, Path)):
        large_ref = {"path": str(large_ref)}
    if large_ref is None and model.large is not None:
        large_ref = model_config(model.large)
    meta = {"levi": {k: model.config.get(k) for k in _CONFIG_KEYS}, "taps": model.taps,
            "large": large_ref, "has_large": model.large is not None,
            "small": _small_spec(model.small), "has_small": model.small is not None,
            "metadata": metadata or {}}
    return save_state_dict(model.trainable_state_dict(), path, meta)


def _rebuild(spec: dict, what: str) -> nn.Module:
    from neuralign.finetune.levi_small import build_small
    from neuralign.io import load_model
    from neuralign.models import get_model

    if "path" in spec:
        return load_model(spec["path"])
    if spec["name"] in ("cnn4", "text_mlp", "text_transformer") or spec.get("headless"):
        return build_small(spec["name"], None, **spec["kwargs"])
    return get_model(spec["name"], **spec.get("kwargs", {}))


def load_levi(path, *, large: nn.Module | None = None, small: nn.Module | None = None) -> LEVI:
    """Rebuild a LEVI saved by ``save_levi``: the large model from ``large`` or the recorded
    reference, the small model from ``small`` or its recorded spec, then load what trained."""
    from neuralign.io import load_state_dict, read_sidecar

    side = read_sidecar(path)
    if "levi" not in side:
        raise CheckpointError(f"{path}: not a LEVI checkpoint (no 'levi' entry in its sidecar)")
    sd = load_state_dict(path)
    cfg = dict(side["levi"])
    if side.get("has_large") and large is None:
        if not side.get("large"):
            raise CheckpointError(f"{path}: the large model was not recorded; pass large=")
        large = _rebuild(side["large"], "large")
    if side.get("has_small") and small is None:
        if not side.get("small"):
            raise CheckpointError(f"{path}: the small model's architecture was not recorded; "
                                  "pass small=")
        small = _rebuild(side["small"], "small")
    taps = side.get("taps") or None
    if taps:
        taps = [t.removeprefix("base_model.model.")
                for t in taps]
    model = LEVI(large if side.get("has_large") else None,
                 small if side.get("has_small") else None, taps=taps, **cfg)
    own = model.state_dict()
    unexpected = [k for k in sd if k not in own]
    missing = [k for k in own if not k.startswith("large.") and k not in sd]
    bad = [k for k in sd if k in own and own[k].shape != sd[k].shape]
    if unexpected or missing or bad:
        first = (unexpected or missing or bad)[0]
        raise CheckpointError(f"{path} does not fit the rebuilt LEVI (e.g. {first!r}); was it "
                              "saved with another large or small model?")
    model.load_state_dict(sd, strict=False)
    return model.eval()
