"""Shared CLI plumbing: one-line errors instead of stack traces, a Rich console, loaders."""

from __future__ import annotations

import sys

import typer
from rich.console import Console
from rich.table import Table

from neuralign.errors import NeuralignError

console = Console()
err_console = Console(stderr=True, soft_wrap=True)


def run_app(app: typer.Typer) -> None:
    try:
        app()
    except NeuralignError as exc:
        err_console.print(f"[bold red]error:[/] {exc}", highlight=False)
        sys.exit(2)


def load_cli_data(name: str, seed: int = 0, root: str | None = None, subset: int | None = None):
    """Data for a command: a built-in name (digits, fashion_mnist, mnist1d)."""
    from neuralign.data import load_data

    kw = {"subset": subset} if subset is not None else {}
    return load_data(name, seed=seed, root=root, **kw)


def model_kwargs_for(splits) -> dict:
    c, *spatial = splits.input_shape
    kw = {"num_classes": splits.num_classes, "in_channels": c}
    if len(spatial) == 2:
        kw["image_size"] = spatial[0]
    return kw


def parse_options(options: list[str] | None) -> dict:
    """``key=value`` pairs; values parsed as int, float, bool or left as strings."""
    out: dict = {}
    for item in options or []:
        if "=" not in item:
            raise NeuralignError(f"option {item!r} must look like key=value")
        k, v = item.split("=", 1)
        out[k.strip().replace("-", "_")] = _parse_value(v.strip())
    return out


def _parse_value(v: str):
    low = v.lower()
    if low in ("true", "false"):
        return low == "true"
    if low in ("none", "null"):
        return None
    for cast in (int, float):
        try:
            return cast(v)
        except ValueError:
            pass
    return v


def table(title: str, columns: list[str], rows: list[list]) -> Table:
    t = Table(title=title)
    for c in columns:
        t.add_column(c, justify="right" if c != columns[0] else "left")
    for r in rows:
        t.add_row(*[f"{x:.4f}" if isinstance(x, float) else str(x) for x in r])
    return t
