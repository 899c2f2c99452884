"""CLI commands for the model registry: list; registered by ``cli.py``."""

from __future__ import annotations

from typing import Any

import click

from cmw_vllm.cli_common import echo_json, print_table

COMMANDS: list[click.Command] = []


@click.command(name="list")
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output (keys below).")
def list_cmd(as_json: bool) -> None:
    """List the models cmw-vllm knows: built-in entries and your models file.

    For each alias: the Hugging Face model, task, default port, approximate download size,
    whether a snapshot is in the Hugging Face cache, and which managed servers run it.
    Entries come from the built-in registry and from models.toml in the state directory
    ($CMW_VLLM_HOME, default ~/.cmw-vllm), which adds aliases or overrides built-in ones.

    \b
    Examples:
      cmw-vllm list
      cmw-vllm list --json | jq -r '.models[] | select(.downloaded) | .alias'

    \b
    JSON: {"models": [{"alias", "model", "task", "port", "size_gb", "downloaded",
           "running": [server names], "source": "built-in" | models file,
           "description"}, ...],
     "adapters": [{"name", "base", "source", "revision", "downloaded"}, ...]}
    LoRA adapters ([adapters.NAME] in models.toml) are listed after the models, with the
    model they adapt.
    """
    from cmw_vllm.lora_adapters import adapter_dir
    from cmw_vllm.model_registry import BUILTIN_SOURCE, all_adapters, all_entries, is_downloaded
    from cmw_vllm.server_manager import running_models

    running = running_models()
    running_lower = {model.lower(): names for model, names in running.items()}
    rows: list[dict[str, Any]] = []
    entries = all_entries()
    adapters = [{"name": a.name, "base": a.base, "source": a.source, "revision": a.revision,
                 "downloaded": adapter_dir(a) is not None}
                for a in all_adapters(entries).values()]
    for entry in entries.values():
        servers = running.get(entry.model) or running_lower.get(entry.model.lower()) or []
        rows.append(
            {
                "alias": entry.alias,
                "model": entry.model,
                "task": entry.task,
                "port": entry.port,
                "size_gb": entry.size_gb,
                "downloaded": is_downloaded(entry.model),
                "running": sorted(servers),
                "source": entry.source,
                "description": entry.description,
            }
        )
    if as_json:
        echo_json({"models": rows, "adapters": adapters})
        return
    print_table(
        ["ALIAS", "MODEL", "TASK", "PORT", "SIZE", "DOWNLOADED", "RUNNING"],
        [
            [
                row["alias"] + ("" if row["source"] == BUILTIN_SOURCE else " *"),
                row["model"],
                row["task"],
                str(row["port"]),
                "-" if row["size_gb"] is None else f"~{row['size_gb']:g} GB",
                "yes" if row["downloaded"] else "no",
                ", ".join(row["running"]) or "-",
            ]
            for row in rows
        ],
        # Columns showing nothing go first; the model id is cut only when little else is left.
        drop=("DOWNLOADED", "SIZE", "RUNNING", "TASK", "PORT"),
        shrink=("MODEL",),
        floor=32,
    )
    if any(row["source"] != BUILTIN_SOURCE for row in rows):
        click.echo("* from your models file")
    if adapters:
        click.echo()
        print_table(
            ["ADAPTER", "BASE", "SOURCE", "DOWNLOADED"],
            [[a["name"], a["base"], a["source"] + (f"@{a['revision']}" if a["revision"] else ""),
              "yes" if a["downloaded"] else "no"] for a in adapters],
            drop=("DOWNLOADED",), shrink=("SOURCE",), floor=24,
        )


COMMANDS.append(list_cmd)
