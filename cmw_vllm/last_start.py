"""What the last start of each server used, kept for ``restart``, also after ``stop``.

In the state dir (see :mod:`cmw_vllm.paths`):

- ``restart/NAME.json``: the server's settings (the ServerConfig as JSON; no secrets);
- ``restart/NAME.key``: the API key (``VLLM_API_KEY``) it was started with, when it had one.
  Mode 0600 in a 0700 dir; the only file that holds the key (records, logs, command lines
  and status output never do).

``restart`` takes the key from the environment when one is set there, else from
``NAME.key``, so a server started with a key never comes back without one. A restart
policy uses :func:`api_key_for_restart` the same way. This module imports nothing heavy.
"""

from __future__ import annotations

import contextlib
import json
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from cmw_vllm import paths
from cmw_vllm.errors import EnvironmentProblem

API_KEY_VAR = "VLLM_API_KEY"


def settings_path(name: str) -> Path:
    """The settings file of server ``name``."""
    return paths.restart_dir() / f"{name}.json"


def key_path(name: str) -> Path:
    """The API key file of server ``name``."""
    return paths.restart_dir() / f"{name}.key"


def save(name: str, settings: Mapping[str, Any], api_key: str | None) -> None:
    """Keep the settings and API key of a start (no key: any older key file is removed).

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
