"""Helpers shared by the CLI command modules: output, JSON, terminals, error mapping.

Only click is imported at module level; rich is imported when a table or progress bar is
actually drawn on a terminal.
"""

from __future__ import annotations

import json
import os
import sys
from typing import TYPE_CHECKING, Any

import click

from cmw_vllm.vocab import format_bytes

__all__ = ["format_bytes"]  # the CLI modules import it from here with the other helpers

if TYPE_CHECKING:
    from rich.console import Console


def stdout_is_tty() -> bool:
    """True when stdout is an interactive terminal (tables, colours, spinners)."""
    return sys.stdout.isatty()


def stderr_is_tty() -> bool:
    """True when stderr is an interactive terminal (spinners and progress bars go there)."""
    return sys.stderr.isatty()


def no_color() -> bool:
    """Honour https://no-color.org."""
    return bool(os.environ.get("NO_COLOR"))


def console(stderr: bool = False) -> Console:
    """A rich Console for stdout (or stderr), colourless under NO_COLOR."""
    from rich.console import Console

    return Console(stderr=stderr, no_color=no_color(), highlight=False)


# In the context's ``meta`` (shared by a command's contexts) once a command printed its object.
JSON_PRINTED = "cmw_vllm.json_printed"


def echo_json(data: Any) -> None:
    """Print ``data`` as indented JSON on stdout (stable key order as given).

    A command prints one object: ``CmwGroup`` adds no error object after this one.
    """
    click.echo(json.dumps(data, indent=2, default=str))
    ctx = click.get_current_context(silent=True)
    if ctx is not None:
        ctx.meta[JSON_PRINTED] = True


def echo_err(message: str) -> None:
    """Print one line on stderr."""
    click.echo(message, err=True)


def format_duration(seconds: float | None) -> str:
    """Compact duration (``3h12m``, ``45s``); ``-`` for None."""
    if seconds is None:
        return "-"
    s = int(max(seconds, 0))
    if s < 60:
        return f"{s}s"
    if s < 3600:
        return f"{s // 60}m{s % 60:02d}s"
    if s < 86400:
        return f"{s // 3600}h{(s % 3600) // 60:02d}m"
    return f"{s // 86400}d{(s % 86400) // 3600:02d}h"


def terminal_width(err: bool = False) -> int | None:
    """Columns of the terminal that stdout (or stderr) is, else None (no wrapping).

    ``COLUMNS`` wins, as for rich and ``shutil``; a stream that is not a terminal is never
    wrapped, so pipes and files get whole lines.
    """
    if not (stderr_is_tty() if err else stdout_is_tty()):
        return None
    import shutil

    return shutil.get_terminal_size().columns


def wrap_text(text: str, width: int | None, indent: str = "", first: str = "") -> str:
    """``first + text`` wrapped at word boundaries to ``width``, later lines after ``indent``.

    ``width=None`` leaves the text on one line. Words longer than a line (paths, URLs) are
    never broken: they overflow rather than being cut in the middle.
    """
    if width is None:
        return first + text
    import textwrap

    return textwrap.fill(text, width=max(width, len(indent) + 20), initial_indent=first,
                         subsequent_indent=indent, break_long_words=False,
                         break_on_hyphens=False)


def echo_wrapped(text: str, indent: str = "", first: str = "", err: bool = False) -> None:
    """Print ``first + text`` wrapped at word boundaries when the stream is a terminal."""
    click.echo(wrap_text(text, terminal_width(err), indent, first), err=err)


def shorten_middle(text: str, width: int) -> str:
    """``text`` cut to ``width`` characters by an ellipsis in the middle (both ends stay)."""
    if len(text) <= width:
        return text
    if width <= 1:
        return text[:width]
    head = (width - 1) // 2
    tail = width - 1 - head
    return text[:head] + "\u2026" + (text[-tail:] if tail else "")


# Spaces between two columns of a table (rich, box=None, pad_edge=False; the plain form too).
COLUMN_GAP = 2
# A column that may be shortened keeps at least this many characters.
SHRINK_FLOOR = 24


def fit_columns(
    columns: list[str],
    rows: list[list[str]],
    width: int,
    drop: tuple[str, ...] = (),
    shrink: tuple[str, ...] = (),
    floor: int = SHRINK_FLOOR,
) -> tuple[list[str], list[list[str]]]:
    """Make a table fit ``width`` characters without ever cutting its key columns.

    Columns in ``drop`` go first, in that order (those that show nothing, only ``-``,
    before the others) until the columns in ``shrink``, cut in the middle down to ``floor``
    characters, make it fit. A column in neither is never touched, so names stay
    whole (users need exactly those for ``stop``, ``logs`` and ``test``).

    Returns:
        The columns and rows that remain, cells already shortened.
    """
    def natural(i: int) -> int:
        return max([len(columns[i]), *(len(r[i]) for r in rows)])

    keep = list(range(len(columns)))
    widths = {i: natural(i) for i in keep}
    empty = [c for c in drop if all(r[columns.index(c)] in ("-", "") for r in rows)]
    order = [*empty, *(c for c in drop if c not in empty)]

    def total(shrunk: bool) -> int:
        size = sum(
            min(widths[i], max(floor, len(columns[i])))
            if shrunk and columns[i] in shrink else widths[i]
            for i in keep
        )
        return size + COLUMN_GAP * (len(keep) - 1)

    while total(shrunk=False) > width and order:
        if total(shrunk=True) <= width and order[0] not in empty:
            break  # shortening is enough: keep the remaining columns
        keep.remove(columns.index(order.pop(0)))
    excess = total(shrunk=False) - width
    # Down to the floor first; below it only when nothing else is left (a very narrow
    # terminal), and never below the header.
    for least_of in (lambda i: max(floor, len(columns[i])), lambda i: max(8, len(columns[i]))):
        for i in sorted((i for i in keep if columns[i] in shrink), key=lambda i: -widths[i]):
            cut = min(max(excess, 0), max(widths[i] - least_of(i), 0))
            widths[i] -= cut
            excess -= cut
    out_rows = [[shorten_middle(r[i], widths[i]) for i in keep] for r in rows]
    return [columns[i] for i in keep], out_rows


def make_table(
    columns: list[str], rows: list[list[str]], title: str | None = None,
    whole: tuple[str, ...] = (),
) -> Any:
    """A rich Table of strings that never wraps a cell (imports rich).

    Columns in ``whole`` are never shortened by rich, even on a terminal too narrow for them.
    """
    from rich.table import Table

    table = Table(title=title, box=None, pad_edge=False, header_style="bold")
    for i, col in enumerate(columns):
        least = max([len(col), *(len(r[i]) for r in rows)]) if col in whole else None
        table.add_column(col, no_wrap=True, min_width=least)
    for row in rows:
        table.add_row(*row)
    return table


def fitted_table(
    columns: list[str],
    rows: list[list[str]],
    width: int,
    title: str | None = None,
    drop: tuple[str, ...] = (),
    shrink: tuple[str, ...] = (),
    floor: int = SHRINK_FLOOR,
) -> Any:
    """:func:`make_table` of the columns that fit ``width`` (see :func:`fit_columns`)."""
    whole = tuple(c for c in columns if c not in drop and c not in shrink)
    columns, rows = fit_columns(columns, rows, width, drop, shrink, floor)
    return make_table(columns, rows, title, whole)


def print_table(
    columns: list[str],
    rows: list[list[str]],
    title: str | None = None,
    drop: tuple[str, ...] = (),
    shrink: tuple[str, ...] = (),
    floor: int = SHRINK_FLOOR,
) -> None:
    """A rich table fitted to the terminal, or plain aligned columns when piped.

    On a terminal the columns in ``drop`` are left out and those in ``shrink`` shortened
    until the table fits (:func:`fit_columns`), and a line under it names the columns left
    out that had something to show; piped output keeps every column whole.
    """
    if stdout_is_tty():
        out = console()
        whole = tuple(c for c in columns if c not in drop and c not in shrink)
        shown, cells = fit_columns(columns, rows, out.width, drop, shrink, floor)
        out.print(make_table(shown, cells, title, whole))
        hidden = [c for i, c in enumerate(columns) if c not in shown
                  and any(r[i] not in ("-", "") for r in rows)]
        if hidden:
            what = "1 column" if len(hidden) == 1 else f"{len(hidden)} columns"
            click.echo(wrap_text(f"{what} hidden ({', '.join(hidden)}): widen the terminal "
                                 "or use --json", out.width))
        return
    widths = [len(c) for c in columns]
    for row in rows:
        widths = [max(w, len(cell)) for w, cell in zip(widths, row, strict=False)]
    lines = [columns, *rows]
    gap = " " * COLUMN_GAP
    for line in lines:
        click.echo(gap.join(cell.ljust(w) for cell, w in zip(line, widths, strict=False)).rstrip())
