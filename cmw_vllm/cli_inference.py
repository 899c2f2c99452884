"""CLI commands that talk to running servers: test; registered by ``cli.py``."""

from __future__ import annotations

import click

COMMANDS: list[click.Command] = []
