"""CLI commands for models: list, download, verify; registered by ``cli.py``."""

from __future__ import annotations

import click

COMMANDS: list[click.Command] = []
