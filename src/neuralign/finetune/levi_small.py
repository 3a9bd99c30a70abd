"""The small from-scratch models of LEVI (Roh et al. 2024, Appendix D.2) and how to build them.

- ``CNN4``: four 3x3 convolutions (32, 64, 64, 64 features), each followed by batch norm, ReLU
  and 2x2 max pooling; the last map is flattened (the vision small model).
- ``TextMLP``: token embeddings averaged over the non-padding tokens, then a two-layer MLP (512
  and 256 units; the recommendation small model, "a two-layer MLP with input embedding layers").
- ``TextTransformer``: token + position embeddings, one pre-norm transformer encoder layer, mean
  over the non-padding tokens (a from-scratch text model with word order).

Both output features, not logits: LEVI's adapting heads make the predictions.
"""

from __future__ import annotations

import itertools

import torch
from torch import nn

from neuralign.errors import NeuralignError


class _Pool(nn.Module):
    """2x2 max pooling that leaves maps smaller than 2x2 as they are (small inputs: digits)."""

    def forward(self, x):
        return x if min(x.shape[-2:]) < 2 else nn.functional.max_pool2d(x, 2)


class CNN4(nn.Module):
    def __init__(self, in_channels: int = 1, widths=(32, 64, 64, 64)):
        super().__init__()
        layers, cin = [], in_channels
        for w in widths:
            layers += [nn.Conv2d(cin, w, 3, padding=1), nn.BatchNorm2d(w), nn.ReLU(), _Pool()]
            cin = w
        self.features = nn.Sequential(*layers)
        self.flatten = nn.Flatten()

    def forward(self, x):
        return self.flatten(self.features(x))


class TextMLP(nn.Module):
    def __init__(self, vocab_size: int, embed_dim: int = 64, hidden=(512, 256),
                 pad_token_id: int = 0):
        super().__init__()
        self.pad_token_id = pad_token_id
        self.embed = nn.Embedding(vocab_size, embed_dim, padding_idx=pad_token_id)
        dims = [embed_dim, *hidden]
        mlp = []
        for a, b in itertools.pairwise(dims):
            mlp += [nn.Linear(a, b), nn.ReLU()]
        self.mlp = nn.Sequential(*mlp)

    def forward(self, input_ids=None, attention_mask=None):
        if isinstance(input_ids, dict):
            input_ids, attention_mask = input_ids["input_ids"], input_ids.get("attention_mask")
        mask = (input_ids != self.pad_token_id) if attention_mask is None else attention_mask.bool()
        m = mask.unsqueeze(-1).float()
        e = (self.embed(input_ids) * m).sum(1) / m.sum(1).clamp_min(1.0)
        return self.mlp(e)


class TextTransformer(nn.Module):
    def __init__(self, vocab_size: int, dim: int = 128, heads: int = 4, layers: int = 1,
                 max_length: int = 128, pad_token_id: int = 0):
        super().__init__()
        self.pad_token_id, self.max_length = pad_token_id, max_length
        self.embed = nn.Embedding(vocab_size, dim, padding_idx=pad_token_id)
        self.pos = nn.Embedding(max_length, dim)
        layer = nn.TransformerEncoderLayer(dim, heads, 2 * dim, dropout=0.0, batch_first=True,
                                           norm_first=True)
        self.encoder = nn.TransformerEncoder(layer, layers, enable_nested_tensor=False)
        self.norm = nn.LayerNorm(dim)

    def forward(self, input_ids=None, attention_mask=None):
        if isinstance(input_ids, dict):
            input_ids, attention_mask = input_ids["input_ids"], input_ids.get("attention_mask")
        if input_ids.shape[1] > self.max_length:
            raise NeuralignError(f"TextTransformer takes at most {self.max_length} tokens, got "
                                 f"{input_ids.shape[1]}; build it with a larger max_length")
        mask = (input_ids != self.pad_token_id) if attention_mask is None else attention_mask.bool()
        pos = torch.arange(input_ids.shape[1], device=input_ids.device)
        h = self.encoder(self.embed(input_ids) + self.pos(pos), src_key_padding_mask=~mask)
        m = mask.unsqueeze(-1).to(h.dtype)
        return self.norm((h * m).sum(1) / m.sum(1).clamp_min(1.0))


def build_small(spec, example_input=None, *, seed: int = 0, **kwargs) -> nn.Module:
    """A small model from a name or a module. ``cnn4`` (paper, default for images), ``text_mlp``
    or ``text_transformer`` (need ``vocab_size``), or any ``neuralign.models`` name whose head is then removed so that
    it outputs features; an ``nn.Module`` is returned as is."""
    if isinstance(spec, nn.Module):
        return spec
    if not isinstance(spec, str):
        raise NeuralignError(f"small model must be a name or an nn.Module, got {type(spec).__name__}")
    in_ch = int(example_input.shape[1]) if (example_input is not None and
                                            torch.is_tensor(example_input) and
                                            example_input.dim() == 4) else 1
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        if spec == "cnn4":
            return CNN4(**{"in_channels": in_ch, **kwargs})
        if spec in ("text_mlp", "text_transformer"):
            if "vocab_size" not in kwargs:
                raise NeuralignError(f"small={spec!r} needs vocab_size")
            return (TextMLP if spec == "text_mlp" else TextTransformer)(**kwargs)
        from neuralign.models import get_head_name, get_model

        kw = dict(kwargs)
        if example_input is not None and torch.is_tensor(example_input) and example_input.dim() == 4:
            kw.setdefault("in_channels", in_ch)
            kw.setdefault("image_size", int(example_input.shape[-1]))
        model = get_model(spec, **kw)
        head = get_head_name(model)
        parent, _, child = head.rpartition(".")
        setattr(model.get_submodule(parent) if parent else model, child, nn.Identity())
        return model
