"""The ``neuralign`` command.

Each sub-command lives in its own module of this package and exposes ``register(app)``;
modules are discovered automatically, so adding a command touches no other file. Modules import
only typer and the torch-free helpers at import time; torch and friends are imported inside the
command bodies, after the options and inputs have been checked.
"""

from __future__ import annotations

import importlib
import pkgutil

import typer

from neuralign.cli._common import OneLineGroup

app = typer.Typer(
    cls=OneLineGroup,
    name="neuralign",
    help="Knowledge-preserving fine-tuning and model fusion through neuron alignment.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)


@app.callback()
def _root() -> None:
    """Knowledge-preserving fine-tuning and model fusion through neuron alignment."""


def _register_all() -> None:
    for info in sorted(pkgutil.iter_modules(__path__), key=lambda m: m.name):
        if info.name.startswith("_"):
            continue
        module = importlib.import_module(f"{__name__}.{info.name}")
        register = getattr(module, "register", None)
        if register is not None:
            register(app)


_register_all()


def main() -> None:
    app()
