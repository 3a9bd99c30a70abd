"""Shared CLI plumbing: one-line errors instead of stack traces, a Rich console."""

from __future__ import annotations

import sys

import typer
from rich.console import Console

from neuralign.errors import NeuralignError

console = Console()
err_console = Console(stderr=True)


def run_app(app: typer.Typer) -> None:
    try:
        app()
    except NeuralignError as exc:
        err_console.print(f"[bold red]error:[/] {exc}")
        sys.exit(2)
