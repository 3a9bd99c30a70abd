"""Matplotlib plots written as PNG: interpolation curves, CKA heat-maps, loss surfaces."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import numpy as np


def _save(fig, path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp.png")
    fig.savefig(tmp, dpi=120, bbox_inches="tight")
    plt.close(fig)
    tmp.replace(path)
    return path


def plot_curves(curves: dict, path, *, kind: str = "loss", title: str | None = None) -> Path:
    """Several curves (name -> :class:`Curve`) on one axis; ``kind`` is ``loss`` or ``accuracy``."""
    fig, ax = plt.subplots(figsize=(6, 4))
    for name, c in curves.items():
        vals = getattr(c, kind)
        if vals is None:
            continue
        vals = np.asarray(vals) * (100 if kind == "accuracy" else 1)
        ax.plot(c.t, vals, marker="o", ms=3, label=name)
    ax.set_xlabel("t (0 = model A, 1 = model B)")
    ax.set_ylabel("accuracy (%)" if kind == "accuracy" else "loss")
    if title:
        ax.set_title(title)
    ax.legend(fontsize=7)
    ax.grid(alpha=0.3)
    return _save(fig, path)


def plot_cka(matrix, layers_a, layers_b, path, *, title: str = "CKA") -> Path:
    m = np.asarray(matrix)
    fig, ax = plt.subplots(figsize=(1 + 0.45 * len(layers_b), 1 + 0.45 * len(layers_a)))
    im = ax.imshow(m, vmin=0, vmax=1, cmap="viridis", origin="lower")
    ax.set_xticks(range(len(layers_b)), layers_b, rotation=90, fontsize=7)
    ax.set_yticks(range(len(layers_a)), layers_a, fontsize=7)
    ax.set_xlabel("model B")
    ax.set_ylabel("model A")
    ax.set_title(title)
    fig.colorbar(im, ax=ax)
    return _save(fig, path)


def plot_surface(surface, path, *, title: str = "loss surface", log: bool = True) -> Path:
    fig, ax = plt.subplots(figsize=(5, 4))
    z = np.asarray(surface.loss)
    if z.ndim == 1:
        ax.plot(surface.xs, z, marker="o", ms=3)
        ax.set_xlabel("step along the direction")
        ax.set_ylabel("loss")
    else:
        zz = np.log(np.maximum(z, 1e-8)) if log else z
        cs = ax.contourf(surface.xs, surface.ys, zz, levels=20, cmap="viridis")
        fig.colorbar(cs, ax=ax, label="log loss" if log else "loss")
        for name, (x, y) in surface.points.items():
            ax.plot([x], [y], "w*", ms=10)
            ax.annotate(name, (x, y), color="white", xytext=(4, 4), textcoords="offset points")
    ax.set_title(title)
    return _save(fig, path)
