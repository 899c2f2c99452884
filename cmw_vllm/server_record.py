"""What ``start`` writes about a server, where it lies, and how it is read back.

State lives in the state dir (see :mod:`cmw_vllm.paths`):

- ``servers/NAME.json``: the record (pid, create time, port, command, log, config), written
  atomically under a per-name lock by :mod:`cmw_vllm.server_manager`;
- ``servers/NAME.pid``: the vLLM API server's pid alone (``kill $(cat ...)``, ``PIDFile=``);
- ``servers/NAME.exit``: how the server ended, written by :mod:`cmw_vllm.supervisor`;
- ``logs/NAME.log``: vLLM's output of the current run (earlier runs are kept as
  ``NAME.log.1``, the latest, to ``NAME.log.5``).

The record is written by ``start`` and then updated by the server's supervisor (a relaunch,
readiness) and by ``stop`` (the drain): :func:`update_record` serialises those changes.

Reading a record needs no process inspection and no third-party import, so every module
that only looks at records (``gpus``, load, status rendering) asks this one. It imports only
the package's leaf modules (:mod:`cmw_vllm.paths`, :mod:`cmw_vllm.vocab`).
"""

from __future__ import annotations

import contextlib
import json
import os
from collections.abc import Iterator
from dataclasses import MISSING, asdict, dataclass, field
from pathlib import Path
from typing import Any

from cmw_vllm import paths

RECORD_FORMAT = 1
LOG_KEEP = 5  # rotated logs of earlier runs: NAME.log.1 .. NAME.log.5


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
    foreground: bool = False  # supervised by a `start --foreground` process
    restart_count: int = 0
    last_exit_code: int | None = None
    last_exit_at: float | None = None
    next_restart_at: float | None = None  # set while the supervisor waits to relaunch
    failed_at: float | None = None  # the supervisor gave up (too many crashes)
    stop_requested_at: float | None = None  # a stop began: the server drains
    drain_until: float | None = None
    kill_at: float | None = None  # when whatever is left gets SIGKILL
    # The last automatic restart: exit_at, detected_at, cleaned_at, launched_at.
    restart_timing: dict[str, float] | None = None
    # Every name vLLM answers to (served_model_name is the first); empty in older records.
    served_names: list[str] = field(default_factory=list)
    # The gateway that started the server (its name), so that a gateway started again under
    # that name takes it back after a crash; None for a server started by hand.
    started_by: str | None = None

    @property
    def drain(self) -> int:
        """Seconds vLLM was launched to drain for (its ``--shutdown-timeout``)."""
        value = self.config.get("drain", 0)
        return int(value) if isinstance(value, (int, float)) else 0

    @property
    def restart_policy(self) -> str:
        """``no``, ``on-failure`` or ``always``."""
        return str(self.config.get("restart") or "no")

    @property
    def group_time(self) -> float:
        """Create time of the process that began the server's process group."""
        # vLLM leads a session of its own; records of older versions had the supervisor lead.
        return self.create_time if self.pgid == self.pid else self.supervisor_create_time

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
                if f.default is not MISSING or f.default_factory is not MISSING:
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


def shm_path(name: str) -> Path:
    """The list of shared-memory segments server ``name``'s processes were seen to map."""
    return paths.servers_dir() / f"{name}.shm"


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


@contextlib.contextmanager
def _record_lock(name: str) -> Iterator[None]:
    """Serialise read-modify-write of one record (the CLI and the supervisor both update it).

    Held only for a moment, never across a stop or a start (that is the per-name lock).
    """
    with paths.private_lock(paths.locks_dir() / f"{name}.record.lock", timeout=30):
        yield


def save_record(record: ServerRecord) -> None:
    """Write the record and the PID file (atomically, 0600).

    Raises:
        EnvironmentProblem: They cannot be written.
    """
    paths.write_private(record_path(record.name),
                        json.dumps(asdict(record), indent=2) + "\n", fsync=True)
    paths.write_private(pid_path(record.name), f"{record.pid}\n", fsync=True)


def update_record(name: str, supervisor_pid: int, *, only_pid: int | None = None,
                  **changes: Any) -> ServerRecord | None:
    """Change fields of the record of ``name`` if it still belongs to ``supervisor_pid``.

    Args:
        name: Server name.
        supervisor_pid: The supervisor the record must name (another one: left alone).
        only_pid: Also require this vLLM pid (a change about one run only).
        **changes: Field values.

    Returns:
        The updated record, or None when the record is gone or belongs to another run.

    Raises:
        EnvironmentProblem: The record cannot be written.
    """
    with _record_lock(name):
        try:
            record = read_record(name)
        except ValueError:
            return None
        if record is None or record.supervisor_pid != supervisor_pid:
            return None
        if only_pid is not None and record.pid != only_pid:
            return None
        for key, value in changes.items():
            setattr(record, key, value)
        save_record(record)
        return record


def rotate_log(log_file: Path, keep: int = LOG_KEEP) -> None:
    """Shift ``NAME.log`` to ``NAME.log.1`` (``.1`` to ``.2``, ...), keeping ``keep`` of them.

    Raises:
        EnvironmentProblem: The log is a symlink (never written through).
    """
    from cmw_vllm.errors import EnvironmentProblem

    if log_file.is_symlink():
        raise EnvironmentProblem(f"{log_file} is a symlink; refusing to write through it")
    for i in range(keep - 1, 0, -1):
        older = log_file.with_name(f"{log_file.name}.{i}")
        if older.exists() and not older.is_symlink():
            os.replace(older, log_file.with_name(f"{log_file.name}.{i + 1}"))
    if log_file.exists():
        os.replace(log_file, log_file.with_name(log_file.name + ".1"))


def open_log(log_file: Path) -> int:
    """Open a fresh log file for writing (0600, never through a symlink); returns the fd.

    Raises:
        EnvironmentProblem: The file cannot be created.
    """
    from cmw_vllm.errors import EnvironmentProblem

    flags = os.O_WRONLY | os.O_CREAT | os.O_TRUNC | getattr(os, "O_NOFOLLOW", 0)
    try:
        return os.open(log_file, flags, 0o600)
    except OSError as exc:
        raise EnvironmentProblem(f"cannot write {log_file}: {exc.strerror or exc}") from exc
