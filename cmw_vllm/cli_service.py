"""CLI commands for boot persistence: enable and disable (systemd units)."""

from __future__ import annotations

import click

from cmw_vllm.cli_common import echo_err, echo_json


@click.command()
@click.argument("name")
@click.option("--system", is_flag=True,
              help="A system unit in /etc/systemd/system (needs root) instead of a user unit.")
@click.option("--json", "as_json", is_flag=True, help="Print what was written as JSON.")
def enable(name: str, system: bool, as_json: bool) -> None:
    """Write a systemd unit that runs server or gateway NAME at boot (and restarts it on
    failure).

    A server's settings come from NAME's record (a server started before) or its registry or
    models.toml entry, and are saved to ~/.cmw-vllm/services/NAME.json; the unit runs
    `cmw-vllm start NAME --foreground --saved`. A gateway's come from its record or its last
    run (for `gateway` with neither: the defaults), and the unit runs `cmw-vllm gateway` with
    them. Secrets (VLLM_API_KEY, HF_TOKEN, CMW_VLLM_GATEWAY_API_KEYS) go to a 0600 env file
    beside it, never into the unit. Prints the systemctl commands to run.

    \b
    When systemd is not running here (a container, WSL), the unit is still written (for the
    machine or image that boots with it) and a warning says nothing will start it.

    \b
    JSON: {name, unit, settings, env_file, scope, commands, systemd_running} (settings: null
          for a gateway, whose settings are the unit's command line).

    \b
    Examples:
      cmw-vllm enable qwen
      sudo -E cmw-vllm enable qwen --system
      cmw-vllm enable gateway
    """
    from cmw_vllm.gateway.service import enable_unit as enable_gateway_unit
    from cmw_vllm.gateway.service import settings_to_enable
    from cmw_vllm.systemd_unit import enable as enable_unit
    from cmw_vllm.systemd_unit import systemd_running
    from cmw_vllm.vocab import validate_name

    validate_name(name)
    gateway = settings_to_enable(name)
    if gateway is None:
        files = enable_unit(name, system=system)
    else:
        from cmw_vllm.vocab import LOOPBACK

        if gateway.host not in LOOPBACK and not gateway.api_keys:
            echo_err(f"Warning: gateway {name!r} listens on {gateway.host} without an API key "
                     "(set CMW_VLLM_GATEWAY_API_KEYS or --api-key-file, then enable again).")
        files = enable_gateway_unit(gateway, system=system)
    running = systemd_running()
    if not running:
        echo_err("Warning: systemd is not running on this machine (no /run/systemd/system): "
                 f"the unit is written, but nothing starts {files.name!r} until it boots "
                 "with systemd.")
    if as_json:
        echo_json({"name": files.name, "unit": str(files.unit_path),
                   "settings": str(files.definition_path) if files.definition_path else None,
                   "env_file": str(files.env_path) if files.env_path else None,
                   "scope": "system" if files.system else "user",
                   "commands": files.commands, "systemd_running": running})
        return
    click.echo(f"Wrote {files.unit_path}")
    if files.definition_path is not None:
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
    """Remove the systemd unit and saved settings of server or gateway NAME.

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
