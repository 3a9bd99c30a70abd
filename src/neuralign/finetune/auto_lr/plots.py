"""Saving and plotting chosen per-layer weights (the paper's Figures 5, 8 and 9)."""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Mapping
from pathlib import Path


def save_layer_weights(weights: Mapping[str, Mapping[str, float]], path: str | Path) -> Path:
    """Write ``{strategy: {layer: weight}}`` as JSON (atomic write)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, suffix=".tmp")
    with os.fdopen(fd, "w") as fh:
        json.dump({k: dict(v) for k, v in weights.items()}, fh, indent=1)
    os.replace(tmp, path)
    return path


def plot_layer_weights(weights: Mapping[str, Mapping[str, float]], path: str | Path, *,
                       title: str = "Per-layer learning-rate weights") -> Path:
    """One panel per strategy, a bar per layer (input to output), weights in [0, 1]."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(weights)
    layers = list(dict.fromkeys(layer for w in weights.values() for layer in w))
    cols = min(3, max(1, len(names)))
    rows = (len(names) + cols - 1) // cols
    fig, axes = plt.subplots(rows, cols, figsize=(4.2 * cols, 2.6 * rows), squeeze=False,
                             sharey=True)
    for ax, name in zip(axes.flat, names):
        vals = [weights[name].get(layer, 0.0) for layer in layers]
        ax.bar(range(len(layers)), vals, color="tab:blue")
        ax.set_title(name, fontsize=9)
        ax.set_ylim(0, 1.05)
        ax.set_xticks(range(len(layers)))
        ax.set_xticklabels(layers, rotation=90, fontsize=6)
    for ax in list(axes.flat)[len(names):]:
        ax.axis("off")
    fig.suptitle(title)
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
