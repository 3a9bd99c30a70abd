"""Progress of the long loops (training, evaluation): a Rich bar on a terminal, plain lines on
stderr otherwise (CI logs, ``nohup``, pipes), nothing when switched off.

Off a terminal a loop writes one line per epoch and, in between, at most one line every
``every`` seconds (10 by default), e.g.::

    train: epoch 2/10, step 94/470, loss 0.5321, 2150 img/s, 41 s

The per-step cost is one clock read: the caller asks ``due()`` and builds its message only then.
"""

from __future__ import annotations

import sys
import time


class Progress:
    """``mode``: ``True`` (bar on a terminal, lines elsewhere), ``False`` (silent) or ``"auto"``
    (lines off a terminal once the loop has run ``every`` seconds; silent on a terminal, where
    a short evaluation inside a longer loop must not draw a second bar)."""

    def __init__(self, name: str, total: int | None, mode: bool | str = True,
                 every: float = 10.0, unit: str = "img"):
        self.name, self.total, self.every, self.unit = name, total, every, unit
        mode = mode if mode == "auto" else bool(mode)
        stream = sys.stderr
        tty = stream is not None and stream.isatty()
        self.bar = None
        if mode is True and tty:
            from rich.console import Console
            from rich.progress import BarColumn, MofNCompleteColumn, TextColumn, TimeRemainingColumn
            from rich.progress import Progress as Bar

            self.bar = Bar(TextColumn("[bold]{task.description}"), BarColumn(),
                           MofNCompleteColumn(), TextColumn("{task.fields[info]}"),
                           TimeRemainingColumn(), console=Console(stderr=True), transient=True)
        self.lines = (mode is True or mode == "auto") and not tty and stream is not None
        self.enabled = self.bar is not None or self.lines
        self.steps = self.items = 0
        self.start = self.last = time.perf_counter()
        self.interval = 0.2 if self.bar is not None else every
        self.printed = 0

    def __enter__(self):
        if self.bar is not None:
            self.bar.__enter__()
            self.task = self.bar.add_task(self.name, total=self.total, info="")
        return self

    def __exit__(self, *exc):
        if self.bar is not None:
            self.bar.__exit__(*exc)
        return False

    def advance(self, items: int) -> bool:
        """Count one step of ``items`` examples; True when the caller should ``report``."""
        self.steps += 1
        self.items += items
        if not self.enabled:
            return False
        return time.perf_counter() - self.last >= self.interval

    def rate(self) -> float:
        return self.items / max(time.perf_counter() - self.start, 1e-9)

    def line(self, info: str) -> None:
        """Report ``info`` now: the bar's text on a terminal, one plain line elsewhere."""
        self.last = time.perf_counter()
        if self.bar is not None:
            self.bar.update(self.task, completed=self.steps, info=info)
        if not self.lines:
            return
        step = f"step {self.steps}/{self.total}, " if self.total else f"step {self.steps}, "
        sys.stderr.write(f"{self.name}: {info}{', ' if info else ''}{step}"
                         f"{self.rate():.0f} {self.unit}/s, {self.last - self.start:.0f} s\n")
        sys.stderr.flush()
        self.printed += 1

    report = line  # what a loop calls when ``advance`` says a report is due
