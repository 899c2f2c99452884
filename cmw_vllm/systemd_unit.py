"""systemd units that keep a server running across reboots (``enable`` / ``disable``).

``enable NAME`` saves the server's settings (from its record, or its registry or
``models.toml`` entry) to ``<state dir>/services/NAME.json`` and writes a unit that runs
``cmw-vllm start NAME --foreground --saved``: ``Type=notify`` (cmw-vllm sends ``READY=1``
once vLLM is healthy), ``KillMode=mixed`` (SIGTERM to cmw-vllm alone, which drains vLLM;
SIGKILL to what is left), ``TimeoutStopSec`` beyond cmw-vllm's own drain-plus-margin
deadline, ``Restart=on-failure``, which fires on vLLM's exit 0 too because cmw-vllm exits 1
after any exit it did not ask for. Secrets stay out of the unit: they go to a 0600
``services/NAME.env`` named by ``EnvironmentFile=``.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from cmw_vllm import paths
from cmw_vllm.errors import EnvironmentProblem, NotFoundError
from cmw_vllm.settings import ENGINE_ENV_PREFIXES

if TYPE_CHECKING:
    from cmw_vllm.server_config import ServerConfig

UNIT_PREFIX = "cmw-vllm-"
SYSTEM_UNIT_DIR_ENV = "CMW_VLLM_SYSTEM_UNIT_DIR"  # where --system units go (packaging, tests)
SECRET_VARS = ("VLLM_API_KEY", "HF_TOKEN", "HUGGING_FACE_HUB_TOKEN")
# Variables the unit passes on when set here (secrets go to the env file instead): those a
# start keeps for restart, the ones that shape vLLM, the Hub and cmw-vllm.
PASS_PREFIXES = ENGINE_ENV_PREFIXES
# Any passed variable whose name holds one of these is a secret too (gateway API keys, ...).
SECRET_WORDS = ("KEY", "TOKEN", "SECRET", "PASSWORD")
STOP_SLACK_S = 15  # systemd's SIGKILL comes this long after cmw-vllm's own deadline
RESTART_SEC = 10
# Exists while systemd is the running init (sd_booted(3) checks the same directory).
SYSTEMD_RUN_DIR = Path("/run/systemd/system")


@dataclass
class UnitFiles:
    """What ``enable`` wrote, and the commands the user runs next."""

    name: str
    unit_path: Path
    definition_path: Path | None
    env_path: Path | None
    system: bool
    commands: list[str]


def unit_name(name: str) -> str:
    """The unit name of server ``name`` (``cmw-vllm-NAME.service``)."""
    return f"{UNIT_PREFIX}{name}.service"


def unit_dir(system: bool) -> Path:
    """Where user (``~/.config/systemd/user``) or system (``/etc/systemd/system``) units go."""
    if system:
        return Path(os.environ.get(SYSTEM_UNIT_DIR_ENV) or "/etc/systemd/system")
    base = os.environ.get("XDG_CONFIG_HOME") or str(Path.home() / ".config")
    return Path(base) / "systemd" / "user"


def systemd_running() -> bool:
    """Whether this machine runs systemd (a container or WSL often does not): without it
    a unit is written, but nothing starts it."""
    return SYSTEMD_RUN_DIR.is_dir()


def services_dir() -> Path:
    """Saved server definitions (``NAME.json``) and secret env files (``NAME.env``)."""
    return paths.state_dir() / "services"


def definition_path(name: str) -> Path:
    """The settings ``enable`` saved for server ``name``."""
    return services_dir() / f"{name}.json"


def enabled_scope(name: str) -> str | None:
    """``user`` or ``system`` when a unit for ``name`` exists, else None."""
    for system in (False, True):
        if (unit_dir(system) / unit_name(name)).is_file():
            return "system" if system else "user"
    return None


def enabled_names() -> list[str]:
    """Names of the servers with a saved definition and a unit file."""
    try:
        names = sorted(p.stem for p in services_dir().glob("*.json"))
    except OSError:
        return []
    return [n for n in names if enabled_scope(n) is not None]


def load_definition(name: str, overrides: dict[str, Any] | None = None,
                    vllm_args: tuple[str, ...] = ()) -> ServerConfig:
    """The saved settings of ``name`` (``start NAME --saved``), with CLI overrides on top.

    Raises:
        NotFoundError: Nothing was saved for ``name``.
        ConfigError: The file does not hold valid settings.
    """
    import json

    from cmw_vllm.errors import ConfigError
    from cmw_vllm.server_config import build_config
    from cmw_vllm.vocab import validate_name

    validate_name(name)
    path = definition_path(name)
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise NotFoundError(f"no saved settings for {name!r} ({path})",
                            hint=f"save them with: cmw-vllm enable {name}") from None
    except (OSError, ValueError) as exc:
        raise ConfigError(f"cannot read {path}: {exc}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path} does not hold server settings")
    data.update({k: v for k, v in (overrides or {}).items() if v is not None})
    if vllm_args:
        data["vllm_args"] = list(data.get("vllm_args") or []) + list(vllm_args)
    return build_config(data)


def definition_for(name: str) -> ServerConfig:
    """The settings of ``name``: its record's, else those of its last start (kept after a
    stop), else its registry or ``models.toml`` entry's.

    Raises:
        NotFoundError: No record and no entry of that name.
    """
    from cmw_vllm.server_config import build_config, resolve_server_config
    from cmw_vllm.server_record import read_record

    try:
        record = read_record(name)
    except ValueError:
        record = None
    if record is not None:
        return build_config(record.config)
    from cmw_vllm import last_start

    kept = last_start.load_settings(name)
    if kept is not None:
        return build_config(kept)
    from cmw_vllm.model_registry import find_entry

    entry = find_entry(name)
    if entry is None:
        raise NotFoundError(f"no managed server or registry entry named {name!r}",
                            hint="start it once, or add it to models.toml")
    return resolve_server_config(entry.model, entry_settings=entry.server_settings(),
                                 environ=os.environ, cli={"name": name})


def _command_line() -> list[str]:
    """How the unit runs cmw-vllm: the console script beside this Python, or ``-m``."""
    script = Path(sys.executable).parent / "cmw-vllm"
    if script.is_file() and os.access(script, os.X_OK):
        return [str(script)]
    return [sys.executable, "-m", "cmw_vllm"]


def _quote(arg: str) -> str:
    """One ExecStart word, quoted for systemd (specifiers and variables escaped)."""
    text = arg.replace("%", "%%").replace("$", "$$")
    if text and not any(c in text for c in ' \t"\'\\;'):
        return text
    return '"' + text.replace("\\", "\\\\").replace('"', '\\"') + '"'


def _env_line(key: str, value: str) -> str:
    value = value.replace("%", "%%").replace("\\", "\\\\").replace('"', '\\"')
    return f'Environment="{key}={value}"'


def _is_secret(key: str) -> bool:
    """Whether variable ``key`` holds a secret (it goes to the 0600 env file, not the unit)."""
    return key in SECRET_VARS or any(word in key.upper() for word in SECRET_WORDS)


def _passed_env(environ: dict[str, str]) -> dict[str, str]:
    out = {k: v for k, v in environ.items()
           if k.startswith(PASS_PREFIXES) and not _is_secret(k) and v != ""
           and "\n" not in v}
    out["CMW_VLLM_HOME"] = str(paths.state_dir())
    out.setdefault("PYTHONUNBUFFERED", "1")
    return dict(sorted(out.items()))


def render(*, description: str, args: list[str], own_stop_s: float, start_s: float,
           system: bool, env_path: Path | None, environ: dict[str, str] | None = None,
           user: str | None = None, limit_nofile: int | None = None) -> str:
    """The text of a unit that runs ``cmw-vllm ARGS`` in the foreground (``Type=notify``).

    Args:
        description: The unit's Description.
        args: cmw-vllm's arguments (``start NAME --foreground --saved``, ``gateway ...``).
        own_stop_s: How long cmw-vllm's own stop may take after SIGTERM; systemd's SIGKILL
            comes ``STOP_SLACK_S`` later.
        start_s: How long the start may take before ``READY=1``.
        system: A system unit (``User=``, ``multi-user.target``) rather than a user unit.
        env_path: The 0600 file with secrets, or None.
        environ: Variables to pass on (default ``os.environ``; secrets never).
        user: For system units, the account to run as (default: the invoking user).
        limit_nofile: The open-files limit (``LimitNOFILE=``), for a process that holds a
            connection per client (the gateway); None keeps systemd's.
    """
    environ = dict(os.environ if environ is None else environ)
    exec_start = " ".join(_quote(a) for a in [*_command_line(), *args])
    lines = [
        "# Written by `cmw-vllm enable`; remove with `cmw-vllm disable`.",
        "[Unit]",
        f"Description={description.replace('%', '%%')}",
    ]
    if system:
        lines += ["Wants=network-online.target", "After=network-online.target"]
    lines += [
        # A crash loop stops after 5 starts within an hour (systemd's default is 5 in 10 s,
        # which a minutes-long model load never reaches).
        "StartLimitIntervalSec=3600",
        "StartLimitBurst=5",
        "",
        "[Service]",
        "Type=notify",
        "NotifyAccess=main",
        f"ExecStart={exec_start}",
        "KillMode=mixed",
        f"TimeoutStartSec={int(max(start_s, 60))}",
        f"TimeoutStopSec={int(own_stop_s + STOP_SLACK_S)}",
        "Restart=on-failure",
        f"RestartSec={RESTART_SEC}",
    ]
    if limit_nofile is not None:
        lines.append(f"LimitNOFILE={int(limit_nofile)}")
    if system:
        lines.append(f"User={user or _invoking_user()}")
    lines += [_env_line(k, v) for k, v in _passed_env(environ).items()]
    if env_path is not None:
        lines.append(f"EnvironmentFile=-{env_path}")
    lines += [
        "",
        "[Install]",
        f"WantedBy={'multi-user.target' if system else 'default.target'}",
        "",
    ]
    return "\n".join(lines)


def render_unit(config: ServerConfig, *, system: bool, env_path: Path | None,
                environ: dict[str, str] | None = None, user: str | None = None) -> str:
    """The unit file text for server ``config`` (see :func:`render`; ``drain`` sets the
    stop timeout)."""
    from cmw_vllm.settings import start_timeout, stop_timeout

    return render(description=f"cmw-vllm server {config.name} ({config.model})",
                  args=["start", config.name, "--foreground", "--saved"],
                  own_stop_s=config.drain + stop_timeout(), start_s=start_timeout(),
                  system=system, env_path=env_path, environ=environ, user=user)


def _invoking_user() -> str:
    import pwd

    return os.environ.get("SUDO_USER") or pwd.getpwuid(os.getuid()).pw_name


def write_env_file(name: str, environ: dict[str, str]) -> Path | None:
    """Write the secrets of ``environ`` (and the API key ``name`` was started with) to the
    0600 ``services/NAME.env``; none: remove it. Returns its path, or None."""
    from cmw_vllm import last_start

    secrets = {k: v for k, v in environ.items()
               if _is_secret(k) and v and "\n" not in v
               and (k in SECRET_VARS or k.startswith(PASS_PREFIXES))}
    kept_key = last_start.api_key_for_restart(name)  # the key the server was started with
    if kept_key and "VLLM_API_KEY" not in secrets:
        secrets["VLLM_API_KEY"] = kept_key
    path = services_dir() / f"{name}.env"
    if not secrets:
        if path.exists():
            path.unlink()
        return None
    paths.ensure_dir(services_dir())
    text = "".join(f"{k}={v}\n" for k, v in sorted(secrets.items()))
    paths.write_private(path, text)
    return path


def install(name: str, text: str, *, system: bool, definition: Path | None,
            env_path: Path | None) -> UnitFiles:
    """Write unit ``text`` for ``name``; return what was written and the commands to run.

    Raises:
        EnvironmentProblem: The unit directory is not writable (system units need root).
    """
    directory = unit_dir(system)
    unit_path = directory / unit_name(name)
    try:
        directory.mkdir(parents=True, exist_ok=True)
        tmp = unit_path.with_name(f".{unit_path.name}.tmp")
        tmp.write_text(text, encoding="utf-8")
        tmp.chmod(0o644)
        os.replace(tmp, unit_path)
    except OSError as exc:
        raise EnvironmentProblem(
            f"cannot write {unit_path}: {exc.strerror or exc}",
            hint="system units need root: sudo -E cmw-vllm enable ... --system" if system
            else None,
        ) from exc
    ctl = "systemctl" if system else "systemctl --user"
    commands = [f"{ctl} daemon-reload", f"{ctl} enable --now {unit_name(name)}"]
    if not system:
        commands.append(f"loginctl enable-linger {_invoking_user()}")
    return UnitFiles(name, unit_path, definition, env_path, system, commands)


def save_definition(name: str, settings: dict[str, Any]) -> Path:
    """Save ``settings`` as ``services/NAME.json`` (0600); return its path."""
    import json

    paths.ensure_dir(services_dir())
    path = definition_path(name)
    paths.write_private(path, json.dumps(settings, indent=2) + "\n")
    return path


def enable(name: str, *, system: bool = False) -> UnitFiles:
    """Save the settings of server ``name`` and write its systemd unit.

    Raises:
        NotFoundError: No record and no registry entry of that name.
        EnvironmentProblem: The unit directory is not writable (system units need root).
    """
    config = definition_for(name)
    definition = save_definition(config.name, config.model_dump(mode="json"))
    environ = start_environ(config.name)
    env_path = write_env_file(config.name, environ)
    text = render_unit(config, system=system, env_path=env_path, environ=environ)
    return install(config.name, text, system=system, definition=definition, env_path=env_path)


def start_environ(name: str, current: Mapping[str, str] | None = None) -> dict[str, str]:
    """The environment a server's unit starts it with: ``current`` (default ``os.environ``)
    with the interpreter and settings the last start of ``name`` kept in place of the shell's,
    as ``restart`` does; ``current`` as it is for a server never started.
    """
    from cmw_vllm import last_start
    from cmw_vllm.vllm_engine import PYTHON_ENV

    environ = dict(os.environ if current is None else current)
    kept = last_start.load_kept(name)
    if kept is None:
        return environ
    environ, _ = last_start.restart_environ(environ, kept)
    environ.setdefault(PYTHON_ENV, kept.python)
    return environ


def disable(name: str) -> list[Path]:
    """Remove the unit(s), saved settings and env file of ``name``; returns what was removed.

    Raises:
        NotFoundError: Nothing is enabled under that name.
        EnvironmentProblem: A unit file cannot be removed (a system unit needs root).
    """
    from cmw_vllm.vocab import validate_name

    validate_name(name)
    candidates = [unit_dir(False) / unit_name(name), unit_dir(True) / unit_name(name),
                  definition_path(name), services_dir() / f"{name}.env"]
    removed = []
    for path in candidates:
        try:
            path.unlink()
            removed.append(path)
        except FileNotFoundError:
            continue
        except OSError as exc:
            raise EnvironmentProblem(f"cannot remove {path}: {exc.strerror or exc}",
                                     hint="a system unit needs root") from exc
    if not removed:
        raise NotFoundError(f"{name!r} is not enabled")
    return removed
