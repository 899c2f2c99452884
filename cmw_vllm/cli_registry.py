"""CLI commands for the model registry: list; registered by ``cli.py``."""

from __future__ import annotations

import click

COMMANDS: list[click.Command] = []
