"""CLI commands for server lifecycle: start, stop, restart, status, logs."""

from __future__ import annotations

import click

COMMANDS: list[click.Command] = []
