"""CLI commands about the machine: gpus, disk, setup, estimate; registered by ``cli.py``."""

from __future__ import annotations

import click

COMMANDS: list[click.Command] = []
