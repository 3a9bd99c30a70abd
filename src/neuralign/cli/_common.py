"""Shared CLI plumbing: one-line errors, the Rich console, ``--json`` output, ``key=value`` options.

Nothing here imports torch: a command pays for torch only once its inputs have been checked.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import sys

import click
import typer
from typer.core import TyperGroup

from neuralign.errors import NeuralignError


class _Consoles:
    """Rich consoles created on first use (and re-created when ``sys.stdout`` changes, as it
    does under ``CliRunner``)."""

    def __init__(self, stderr: bool):
        self.stderr, self._console, self._stream = stderr, None, None

    def __getattr__(self, name):
        stream = sys.stderr if self.stderr else sys.stdout
        if self._console is None or self._stream is not stream:
            from rich.console import Console

            self._console = Console(file=stream, soft_wrap=True, stderr=self.stderr)
            self._stream = stream
        return getattr(self._console, name)


console = _Consoles(stderr=False)
err_console = _Consoles(stderr=True)


def one_line(text: str) -> str:
    return " ".join(str(text).split())


def fail(message: str) -> None:
    """Stop a command with a one-line error (exit status 2)."""
    raise NeuralignError(message)


def warn(message: str) -> None:
    print(f"warning: {one_line(message)}", file=sys.stderr, flush=True)


def _print_error(message: str) -> None:
    print(f"error: {one_line(message)}", file=sys.stderr, flush=True)


def _user_error(exc: BaseException) -> str | None:
    """The message of an exception that means bad input (not a bug in neuralign)."""
    if isinstance(exc, NeuralignError):
        return str(exc)
    if isinstance(exc, (FileNotFoundError, IsADirectoryError, PermissionError)):
        name = getattr(exc, "filename", None)
        return f"{name}: {exc.strerror}" if name else str(exc)
    if isinstance(exc, OSError) and exc.errno is not None:
        return f"{getattr(exc, 'filename', '') or ''}: {exc.strerror}".lstrip(": ")
    if isinstance(exc, MemoryError):
        return "out of memory; try a smaller --batch-size or model"
    return None


class OneLineGroup(TyperGroup):
    """The ``neuralign`` group: every failure ends in one line on stderr and exit status 2
    (usage errors and bad input), 130 (interrupted) or 1 (a bug: rerun with NEURALIGN_DEBUG=1
    for the traceback). Used both by the console script and by ``CliRunner``."""

    def main(self, args=None, prog_name=None, complete_var=None, standalone_mode=True, **extra):
        with _InterruptFlag() as flag:
            rv = self._main_once(args, prog_name, complete_var, flag, **extra)
        if not standalone_mode:
            return rv
        if rv == 130:  # an interrupt half-way through an import can resurface at shutdown
            sys.stdout.flush()
            sys.stderr.flush()
            os._exit(130)
        sys.exit(rv if isinstance(rv, int) else 0)

    def _main_once(self, args, prog_name, complete_var, flag, **extra):
        try:
            rv = super().main(args=args, prog_name=prog_name or "neuralign",
                              complete_var=complete_var, standalone_mode=False, **extra)
        except click.exceptions.Exit as exc:  # pragma: no cover - handled by click already
            rv = exc.exit_code
        except click.ClickException as exc:
            _print_error(exc.format_message())
            return 2
        except (KeyboardInterrupt, click.Abort):
            _print_error(INTERRUPTED)
            return 130
        except BrokenPipeError:  # `neuralign ... | head`: the reader left; nothing to say
            with contextlib.suppress(Exception):
                sys.stdout = open(os.devnull, "w")  # noqa: SIM115 - absorbs the final flush
            return 1
        except Exception as exc:  # the last line of defence
            if flag.hit:  # Ctrl-C inside an import or C code surfaces as another error
                _print_error(INTERRUPTED)
                return 130
            msg = _user_error(exc)
            if msg is not None:
                _print_error(msg)
                return 2
            if os.environ.get("NEURALIGN_DEBUG"):
                raise
            _print_error(f"internal error ({type(exc).__name__}: {one_line(exc)[:300]}); "
                         "rerun with NEURALIGN_DEBUG=1 for the traceback and report it")
            return 1
        if flag.hit and rv == 130:  # typer turned the KeyboardInterrupt into exit 130
            _print_error(INTERRUPTED)
        return rv


INTERRUPTED = "interrupted (files are written atomically: none is left half-written)"


class _InterruptFlag:
    """Notes a Ctrl-C (then raises KeyboardInterrupt as usual), so that an interrupt that
    surfaces as another exception is still reported as one."""

    def __init__(self):
        self.hit, self._old = False, None

    def _handler(self, signum, frame):
        self.hit = True
        raise KeyboardInterrupt

    def __enter__(self):
        import signal
        import threading

        if threading.current_thread() is threading.main_thread() and \
                signal.getsignal(signal.SIGINT) is signal.default_int_handler:
            self._old = signal.signal(signal.SIGINT, self._handler)
        return self

    def __exit__(self, *exc):
        if self._old is not None:
            import signal

            signal.signal(signal.SIGINT, self._old)
        return False


def run_app(app: typer.Typer) -> None:
    app()


# ---------------------------------------------------------------- key=value options


def parse_options(options: list[str] | None, *, flag: str = "-o/--option",
                  allowed=None, what: str = "option") -> dict:
    """``key=value`` pairs; values parsed as int, float, bool, None or left as strings.

    ``allowed``: the keys accepted (an unknown one is a one-line error listing them)."""
    out: dict = {}
    for item in options or []:
        if "=" not in item:
            fail(f"{flag} {item!r} must look like key=value")
        k, v = item.split("=", 1)
        k = k.strip().replace("-", "_")
        if not k:
            fail(f"{flag} {item!r} has no key")
        if allowed is not None and k not in allowed:
            choices = ", ".join(sorted(allowed)) or "none"
            fail(f"unknown {what} {k!r} in {flag} {item!r}; known: {choices}")
        out[k] = _parse_value(v.strip())
    return out


def _parse_value(v: str):
    low = v.lower()
    if low in ("true", "false"):
        return low == "true"
    if low in ("none", "null"):
        return None
    for cast in (int, float):
        try:
            x = cast(v)
        except ValueError:
            continue
        if isinstance(x, float) and not math.isfinite(x):
            fail(f"option value {v!r} is not a finite number")
        return x
    return v


# ---------------------------------------------------------------- output: tables and --json


def table(title: str, columns: list[str], rows: list[list]):
    from rich.table import Table

    t = Table(title=title)
    for c in columns:
        t.add_column(c, justify="right" if c != columns[0] else "left")
    for r in rows:
        t.add_row(*[_cell(x) for x in r])
    return t


def _cell(x) -> str:
    if isinstance(x, float):
        return "nan" if math.isnan(x) else f"{x:.4f}"
    return str(x)


def json_safe(obj):
    """``obj`` with NaN/Inf as None and tuples as lists, so ``json.dumps(allow_nan=False)``
    writes valid JSON."""
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {str(k): json_safe(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [json_safe(v) for v in obj]
    if obj is None or isinstance(obj, (str, int, bool)):
        return obj
    if hasattr(obj, "item") and getattr(obj, "ndim", 1) == 0:  # numpy / torch scalars
        return json_safe(obj.item())
    if hasattr(obj, "tolist"):
        return json_safe(obj.tolist())
    return str(obj)


def dumps(obj, indent: int | None = 1) -> str:
    return json.dumps(json_safe(obj), indent=indent, allow_nan=False)


class Report:
    """What a command shows: Rich tables for people, or (``--json``) one JSON object on stdout.

    In JSON mode everything else the command prints (progress, notes) goes to stderr, so stdout
    holds nothing but the JSON document."""

    def __init__(self, as_json: bool):
        self.as_json = as_json
        self.data: dict = {}
        self._stdout = sys.stdout

    @contextlib.contextmanager
    def running(self):
        if not self.as_json:
            yield self
            return
        with contextlib.redirect_stdout(sys.stderr):
            yield self
        self._stdout.write(dumps(self.data) + "\n")
        self._stdout.flush()

    def table(self, title: str, columns: list[str], rows: list[list]) -> None:
        if self.as_json:
            return
        console.print(table(title, columns, rows))

    def note(self, text: str) -> None:
        if self.as_json:
            print(text, file=sys.stderr, flush=True)
        else:
            console.print(text, highlight=False)

    def __setitem__(self, key, value) -> None:
        self.data[key] = value


# ---------------------------------------------------------------- options shared by commands

JSON_OPT = typer.Option(False, "--json", help="print one JSON object (no tables) on stdout")
FORCE_OPT = typer.Option(False, "--force", help="replace an existing output of the same kind "
                         "(never an input, never a file of another kind)")
DEVICE_OPT = typer.Option(None, "--device", help="cpu, cuda, cuda:1, mps (default: cpu)")
PICKLE_OPT = typer.Option(False, "--allow-pickle", help="allow loading pickle files "
                          "(.pt/.pth/.bin): unpickling can run code, so only for files you trust")
ARCH_OPT = typer.Option(None, "--arch", help="architecture of checkpoints that do not record "
                        "one: a neuralign name (mlp, resnet20, ...), torchvision:NAME, timm:NAME "
                        "or hf:DIR")
MODEL_KW_OPT = typer.Option(None, "--model-option", "-m", help="model argument key=value for "
                            "--arch (repeatable), e.g. -m width=4 -m num_classes=10")
INPUT_SHAPE_OPT = typer.Option(None, "--input-shape", help="C,H,W (or L for sequences) of one "
                               "input, for tracing when neither --data nor the checkpoint says")
DATA_OPT_HELP = ("digits, fashion_mnist, mnist1d, imagefolder:DIR, npz:FILE, hf-disk:DIR or "
                 "module:function (default: what the checkpoint was trained on)")
DATA_SEED_OPT = typer.Option(None, "--data-seed", help="seed of the train/val/test split "
                             "(default: the checkpoint's, else 0); independent of --seed")
DATA_ROOT_OPT = typer.Option(None, "--data-root", help="folder of the data files "
                             "(Fashion-MNIST)")
IMAGE_SIZE_OPT = typer.Option(None, "--image-size", help="resize images from imagefolder / "
                              "hf-disk data to this many pixels (default: the model's)")
TEST_DOMAIN_OPT = typer.Option(None, "--test-domain", help="DomainBed layout "
                               "(imagefolder:DIR/<domain>/<class>/): the held-out domain")
