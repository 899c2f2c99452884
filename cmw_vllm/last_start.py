"""What the last start of each server used, kept for ``restart``, also after ``stop``.

In the state dir (see :mod:`cmw_vllm.paths`):

- ``restart/NAME.json``: the server's settings (the ServerConfig as JSON; no secrets);
- ``restart/NAME.key``: the API key (``VLLM_API_KEY``) it was started with, when it had one.
  Mode 0600 in a 0700 dir; the only file that holds the key (records, logs, command lines
  and status output never do).
- ``restart/NAME.env``: the engine interpreter and the ``VLLM_*``, ``CMW_VLLM_*``, ``HF_*``
  (and ``HUGGING_FACE_*``, ``CUDA_VISIBLE_DEVICES``) variables in effect at that start, as
  JSON. Mode 0600: it may hold ``HF_TOKEN`` and other secrets, which are never logged.

``restart`` takes the key from the environment when one is set there, else from
``NAME.key``, so a server started with a key never comes back without one. A restart
policy uses :func:`api_key_for_restart` the same way. Every other kept variable wins over
the restarting shell's (:func:`restart_environ`): a restart reproduces the last start, as a
systemd unit does; new values take a ``stop`` and a ``start``. This module imports nothing
heavy.
"""

from __future__ import annotations

import contextlib
import json
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from cmw_vllm import paths
from cmw_vllm.errors import EnvironmentProblem
from cmw_vllm.settings import ENGINE_ENV_PREFIXES

API_KEY_VAR = "VLLM_API_KEY"
# The variables a start keeps for restart: those that shape vLLM, the Hub and cmw-vllm.
KEPT_PREFIXES = ENGINE_ENV_PREFIXES
KEPT_NAMES = ("CUDA_VISIBLE_DEVICES",)
# Never kept: where the state lives is this shell's; the API key has its own file.
NOT_KEPT = ("CMW_VLLM_HOME", "CMW_VLLM_ENV_FILE", API_KEY_VAR)


def settings_path(name: str) -> Path:
    """The settings file of server ``name``."""
    return paths.restart_dir() / f"{name}.json"


def key_path(name: str) -> Path:
    """The API key file of server ``name``."""
    return paths.restart_dir() / f"{name}.key"


def env_path(name: str) -> Path:
    """The file with the interpreter and environment of the last start of ``name``."""
    return paths.restart_dir() / f"{name}.env"


@dataclass
class KeptStart:
    """What shaped the last start of a server besides its settings.

    Attributes:
        python: The interpreter vLLM ran in.
        environ: The kept variables (see :func:`kept_variables`) and their values.
    """

    python: str
    environ: dict[str, str] = field(default_factory=dict)


def is_kept(key: str) -> bool:
    """Whether variable ``key`` is one a start keeps for restart."""
    from cmw_vllm.settings import NEVER_TO_ENGINE_PREFIXES

    return ((key.startswith(KEPT_PREFIXES) or key in KEPT_NAMES) and key not in NOT_KEPT
            and not key.upper().startswith(NEVER_TO_ENGINE_PREFIXES))


def kept_variables(environ: Mapping[str, str]) -> dict[str, str]:
    """The variables of ``environ`` a start keeps (empty ones mean unset: not kept)."""
    return {k: v for k, v in sorted(environ.items()) if is_kept(k) and v != ""}


def save(name: str, settings: Mapping[str, Any], api_key: str | None,
         kept: KeptStart | None = None) -> None:
    """Keep the settings, API key, interpreter and environment of a start (what is None:
    any older file of it is removed).

    Raises:
        EnvironmentProblem: The files cannot be written.
    """
    paths.ensure_dir(paths.restart_dir())
    paths.write_private(settings_path(name), json.dumps(dict(settings), indent=2) + "\n")
    if api_key:
        paths.write_private(key_path(name), api_key + "\n")
    else:
        with contextlib.suppress(FileNotFoundError):
            key_path(name).unlink()
    if kept is not None:
        data = {"python": kept.python, "environ": kept_variables(kept.environ)}
        paths.write_private(env_path(name), json.dumps(data, indent=2) + "\n")
    else:
        with contextlib.suppress(FileNotFoundError):
            env_path(name).unlink()


def load_kept(name: str) -> KeptStart | None:
    """The interpreter and environment of the last start of ``name``; None when none were
    kept (a start by an older cmw-vllm).

    Raises:
        EnvironmentProblem: The file exists but cannot be read (restarting without it could
            drop secrets and settings the server ran with).
    """
    path = env_path(name)
    try:
        if path.is_symlink():
            raise EnvironmentProblem(f"{path} is a symlink; refusing to read it")
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        return None
    except (OSError, UnicodeDecodeError, ValueError) as exc:
        reason = exc.strerror if isinstance(exc, OSError) else "not valid JSON"
        raise EnvironmentProblem(
            f"cannot read what the last start of {name!r} used from {path}: {reason}",
            hint=f"remove it and start the server again: cmw-vllm start ... --name {name}",
        ) from None
    python = data.get("python") if isinstance(data, dict) else None
    environ = data.get("environ") if isinstance(data, dict) else None
    if not isinstance(python, str) or not python or not isinstance(environ, dict) or not all(
            isinstance(k, str) and isinstance(v, str) for k, v in environ.items()):
        raise EnvironmentProblem(
            f"{path} does not hold what the last start of {name!r} used",
            hint=f"remove it and start the server again: cmw-vllm start ... --name {name}",
        )
    return KeptStart(python=python, environ=dict(environ))


def restart_environ(current: Mapping[str, str], kept: KeptStart
                    ) -> tuple[dict[str, str], list[str]]:
    """The environment of a restart: ``current`` with its kept variables replaced by those
    of the last start (variables that were unset then are unset again).

    The API key is not among them (see :func:`api_key_for_restart`).

    Returns:
        (the environment, the names of variables in ``current`` whose value is not used:
        set here to something else than at the last start, or not set then).
    """
    env = {k: v for k, v in current.items() if not is_kept(k)}
    env.update(kept.environ)
    ignored = sorted(k for k, v in current.items()
                     if is_kept(k) and v != "" and kept.environ.get(k) != v)
    return env, ignored


def load_settings(name: str) -> dict[str, Any] | None:
    """The settings of the last start of ``name``; None when there are none (or unreadable)."""
    try:
        data = json.loads(settings_path(name).read_text(encoding="utf-8"))
    except FileNotFoundError:
        return None
    except (OSError, UnicodeDecodeError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def stored_api_key(name: str) -> str | None:
    """The API key server ``name`` was last started with; None when it had none.

    Raises:
        EnvironmentProblem: The key file exists but cannot be read (restarting without the
            key would open the server to anyone).
    """
    path = key_path(name)
    try:
        if path.is_symlink():
            raise EnvironmentProblem(f"{path} is a symlink; refusing to read the key from it")
        key = path.read_text(encoding="utf-8").strip()
    except FileNotFoundError:
        return None
    except (OSError, UnicodeDecodeError) as exc:
        reason = exc.strerror if isinstance(exc, OSError) else "not UTF-8 text"
        raise EnvironmentProblem(
            f"cannot read the API key of {name!r} from {path}: {reason}",
            hint=f"fix the file, or set {API_KEY_VAR} in the environment",
        ) from exc
    return key or None


def api_key_for_restart(name: str, environ: Mapping[str, str] | None = None) -> str | None:
    """The API key a restart of ``name`` must use: the environment's, else the stored one.

    Raises:
        EnvironmentProblem: The stored key cannot be read.
    """
    environ = os.environ if environ is None else environ
    return environ.get(API_KEY_VAR) or stored_api_key(name)


def names() -> list[str]:
    """Servers that have kept settings, sorted."""
    try:
        entries = os.listdir(paths.restart_dir())
    except (FileNotFoundError, NotADirectoryError):
        return []
    return sorted(e[:-5] for e in entries if e.endswith(".json") and not e.startswith("."))
