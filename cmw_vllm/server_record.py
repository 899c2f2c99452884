"""What ``start`` writes about a server, where it lies, and how it is read back.

State lives in the state dir (see :mod:`cmw_vllm.paths`):

- ``servers/NAME.json``: the record (pid, create time, port, command, log, config), written
  atomically under a per-name lock by :mod:`cmw_vllm.server_manager`;
- ``servers/NAME.pid``: the vLLM API server's pid alone (``kill $(cat ...)``, ``PIDFile=``);
- ``servers/NAME.exit``: how the server ended, written by :mod:`cmw_vllm.supervisor`;
- ``logs/NAME.log``: vLLM's output (the previous run's log is kept as ``NAME.log.1``).

Reading a record needs no process inspection and no third-party import, so every module
that only looks at records (``gpus``, load, status rendering) asks this one. It imports only
the package's leaf modules (:mod:`cmw_vllm.paths`, :mod:`cmw_vllm.vocab`).
"""

from __future__ import annotations

import json
import os
from dataclasses import MISSING, dataclass
from pathlib import Path
from typing import Any

from cmw_vllm import paths

RECORD_FORMAT = 1


@dataclass
class ServerRecord:
    """What ``start`` wrote about one server."""

    name: str
    pid: int
    create_time: float
    supervisor_pid: int
    supervisor_create_time: float
    pgid: int
    host: str
    port: int
    model: str
    served_model_name: str
    task: str
    base_url: str
    command: list[str]
    log_path: str
    started_at: float
    config: dict[str, Any]
    ready_at: float | None = None
    role: str = "single"  # or "leader" / "follower" of a server over several machines
    node_rank: int = 0
    leader: str | None = None  # HOST:PORT the followers join
    host_ip: str | None = None  # VLLM_HOST_IP of this node's part
    format: int = RECORD_FORMAT

    @classmethod
    def from_json(cls, data: Any) -> ServerRecord:
        """Build a record from parsed JSON.

        Raises:
            ValueError: Missing or mistyped fields, or another record format.
        """
        if not isinstance(data, dict):
            raise ValueError("not a JSON object")
        fmt = data.get("format")
        if fmt != RECORD_FORMAT:
            raise ValueError(f"record format {fmt!r} is not {RECORD_FORMAT} (older cmw-vllm?)")
        kwargs: dict[str, Any] = {}
        for f in cls.__dataclass_fields__.values():
            if f.name not in data:
                if f.default is not MISSING:
                    continue
                raise ValueError(f"missing field {f.name!r}")
            kwargs[f.name] = data[f.name]
        for key in ("pid", "supervisor_pid", "pgid", "port"):
            if not isinstance(kwargs[key], int) or isinstance(kwargs[key], bool):
                raise ValueError(f"field {key!r} is not an integer")
        return cls(**kwargs)


def record_path(name: str) -> Path:
    """The record file of server ``name``."""
    return paths.servers_dir() / f"{name}.json"


def pid_path(name: str) -> Path:
    """The PID file of server ``name`` (the API server's pid alone)."""
    return paths.servers_dir() / f"{name}.pid"


def exit_path(name: str) -> Path:
    """The file the supervisor writes when server ``name`` exits."""
    return paths.servers_dir() / f"{name}.exit"


def log_path(name: str) -> Path:
    """The log file of server ``name``."""
    return paths.logs_dir() / f"{name}.log"


def read_record(name: str) -> ServerRecord | None:
    """Read the record of ``name``; None when there is none.

    Raises:
        ValueError: The file exists but is not a valid record.
    """
    path = record_path(name)
    try:
        raw = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        return None
    except (OSError, UnicodeDecodeError) as exc:
        raise ValueError(f"unreadable: {exc}") from exc
    if not raw.strip():
        raise ValueError("empty file")
    try:
        data = json.loads(raw)
    except json.JSONDecodeError as exc:
        at = "" if exc.msg.endswith(" at") else " at"
        raise ValueError(
            f"not valid JSON: {exc.msg}{at} line {exc.lineno}, column {exc.colno}"
        ) from None
    record = ServerRecord.from_json(data)
    if record.name != name:
        raise ValueError(f"record names server {record.name!r}, file is {path.name}")
    return record


def record_names() -> list[str]:
    """Names of every server with a record file, sorted."""
    try:
        entries = os.listdir(paths.servers_dir())
    except (FileNotFoundError, NotADirectoryError):
        return []
    return sorted(e[:-5] for e in entries if e.endswith(".json") and not e.startswith("."))


def read_exit(name: str) -> dict[str, Any] | None:
    """What the supervisor wrote when server ``name`` exited (pid, returncode), or None."""
    try:
        data = json.loads(exit_path(name).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None
