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


def echo_json(data: Any) -> None:
    """Print ``data`` as indented JSON on stdout (stable key order as given)."""
    click.echo(json.dumps(data, indent=2, default=str))


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


def make_table(columns: list[str], rows: list[list[str]], title: str | None = None) -> Any:
    """A rich Table of strings (imports rich)."""
    from rich.table import Table

    table = Table(title=title, box=None, pad_edge=False, header_style="bold")
    for col in columns:
        table.add_column(col)
    for row in rows:
        table.add_row(*row)
    return table


def print_table(columns: list[str], rows: list[list[str]], title: str | None = None) -> None:
    """A rich table on a terminal, plain tab-free aligned columns otherwise."""
    if stdout_is_tty():
        console().print(make_table(columns, rows, title))
        return
    widths = [len(c) for c in columns]
    for row in rows:
        widths = [max(w, len(cell)) for w, cell in zip(widths, row, strict=False)]
    lines = [columns, *rows]
    for line in lines:
        click.echo("  ".join(cell.ljust(w) for cell, w in zip(line, widths, strict=False)).rstrip())
