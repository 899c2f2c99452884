"""CLI commands for boot persistence: enable and disable (systemd units)."""

from __future__ import annotations

import click

from cmw_vllm.cli_common import echo_json


@click.command()
@click.argument("name")
@click.option("--system", is_flag=True,
              help="A system unit in /etc/systemd/system (needs root) instead of a user unit.")
@click.option("--json", "as_json", is_flag=True, help="Print what was written as JSON.")
def enable(name: str, system: bool, as_json: bool) -> None:
    """Write a systemd unit that runs server NAME at boot (and restarts it on failure).

    The settings come from NAME's record (a server started before) or its registry or
    models.toml entry, and are saved to ~/.cmw-vllm/services/NAME.json; the unit runs
    `cmw-vllm start NAME --foreground --saved`. Secrets (VLLM_API_KEY, HF_TOKEN) go to a
    0600 env file beside it, never into the unit. Prints the systemctl commands to run.

    \b
    Examples:
      cmw-vllm enable qwen
      sudo -E cmw-vllm enable qwen --system
    """
    from cmw_vllm.systemd_unit import enable as enable_unit
    from cmw_vllm.vocab import validate_name

    validate_name(name)
    files = enable_unit(name, system=system)
    if as_json:
        echo_json({"name": files.name, "unit": str(files.unit_path),
                   "settings": str(files.definition_path),
                   "env_file": str(files.env_path) if files.env_path else None,
                   "scope": "system" if files.system else "user",
                   "commands": files.commands})
        return
    click.echo(f"Wrote {files.unit_path}")
    click.echo(f"  settings: {files.definition_path}")
    if files.env_path is not None:
        click.echo(f"  secrets:  {files.env_path} (mode 0600)")
    click.echo("Now run:")
    for command in files.commands:
        click.echo(f"  {command}")
    click.echo(f"If {files.name!r} runs in the background now, stop it first "
               f"(cmw-vllm stop {files.name}): the unit starts it.")


@click.command()
@click.argument("name")
def disable(name: str) -> None:
    """Remove the systemd unit and saved settings of server NAME.

    \b
    Examples:
      cmw-vllm disable qwen
    """
    from cmw_vllm.systemd_unit import disable as disable_unit
    from cmw_vllm.systemd_unit import unit_dir, unit_name

    removed = disable_unit(name)
    for path in removed:
        click.echo(f"Removed {path}")
    system = unit_dir(True) in [p.parent for p in removed]
    ctl = "systemctl" if system else "systemctl --user"
    click.echo("Now run (systemd still knows the unit until then):")
    click.echo(f"  {ctl} disable --now {unit_name(name)}")
    click.echo(f"  {ctl} daemon-reload")


COMMANDS: list[click.Command] = [enable, disable]
