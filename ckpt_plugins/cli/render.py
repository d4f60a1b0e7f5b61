"""Terminal output: rich tables and progress bars on a terminal, plain columns in a pipe, JSON.

Tables have no borders, so ``grep`` and ``awk`` still work on them. Colour and progress bars
appear only on a terminal (and never with ``--json``); a pipe or a file gets plain text.
"""

from __future__ import annotations

import json
import math
import os
import sys
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from typing import Any

from rich.console import Console
from rich.progress import BarColumn, Progress, TaskProgressColumn, TextColumn, TimeRemainingColumn
from rich.table import Table
from rich.text import Text

__all__ = ["emit_json", "human_age", "human_bytes", "print_table", "progress", "stdout"]

PIPE_WIDTH = 120
"""Width of tables written to a pipe or file when ``COLUMNS`` is not set."""


def stdout() -> Console:
    """A console on the current ``sys.stdout`` (its own width on a terminal, else ``COLUMNS`` or 120)."""
    width = None
    if not sys.stdout.isatty():
        columns = os.environ.get("COLUMNS", "")
        width = int(columns) if columns.isdigit() and int(columns) > 20 else PIPE_WIDTH
    return Console(file=sys.stdout, width=width, highlight=False, markup=False, emoji=False, soft_wrap=False)


def print_table(
    columns: Sequence[str], rows: Sequence[Sequence[str]], *, fold: Sequence[str] = (), console: Console | None = None
) -> None:
    """Print ``rows`` under ``columns``. Columns named in ``fold`` wrap long values onto more
    lines (a long key stays readable); the others stay on one line."""
    table = Table(box=None, pad_edge=False, show_edge=False, header_style="bold", expand=False)
    for name in columns:
        table.add_column(name, overflow="fold" if name in fold else "ellipsis", no_wrap=name not in fold)
    for row in rows:
        table.add_row(*(Text(str(cell)) for cell in row))
    console = console or stdout()
    with console.capture() as captured:
        console.print(table)
    text = "\n".join(line.rstrip() for line in captured.get().splitlines())
    console.file.write(text + "\n")  # without the padding rich puts after the last column


def _plain(value: Any) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
        return repr(value)  # "nan", "inf": JSON has no such numbers
    if isinstance(value, dict):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    return value


def emit_json(doc: dict[str, Any]) -> None:
    """Write one JSON document on stdout (NaN and infinities as the strings "nan", "inf")."""
    sys.stdout.write(json.dumps(_plain(doc), indent=2, allow_nan=False) + "\n")
    sys.stdout.flush()


@contextmanager
def progress(description: str, total: float | None, *, enabled: bool = True) -> Iterator[Callable[[float], None]]:
    """A progress bar on stderr while the block runs; yields ``advance(amount)``.

    Shown only when stderr is a terminal and ``enabled`` (the commands pass ``not args.json``),
    and removed when done, so pipes, files and scripts see nothing of it.
    """
    if not enabled or not sys.stderr.isatty():
        yield _ignore
        return
    columns = (TextColumn("{task.description}"), BarColumn(), TaskProgressColumn(), TimeRemainingColumn())
    # Lines printed meanwhile go above the bar when stdout is the same terminal; a piped stdout
    # is left alone (rich would otherwise route it to the terminal).
    shared = sys.stdout.isatty()
    with Progress(
        *columns, console=Console(file=sys.stderr), transient=True, redirect_stdout=shared, redirect_stderr=False
    ) as bar:
        task = bar.add_task(description, total=total)

        def advance(amount: float = 1) -> None:
            bar.advance(task, amount)

        yield advance


def _ignore(amount: float = 1) -> None:
    """``advance`` when no bar is shown."""


def human_bytes(n: float) -> str:
    """``1536`` -> ``"1.5 KiB"``."""
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} TiB"


def human_age(seconds: float | None) -> str:
    """``5400`` -> ``"1.5h"``; ``None`` (no trustworthy time) -> ``"-"``."""
    if seconds is None:
        return "-"
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
        if seconds >= size:
            return f"{seconds / size:.1f}{unit}"
    return f"{max(seconds, 0):.0f}s"
