"""What state each managed server is in now: read its record, look at its processes, probe it.

``status`` needs only this (not the start and stop code of :mod:`cmw_vllm.server_manager`,
which uses it too), so the command stays quick however large orchestration grows.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from cmw_vllm.process_group import group_members, is_ours, supervisor_process
from cmw_vllm.server_record import ServerRecord, read_exit, read_record, record_names
from cmw_vllm.vocab import ALIVE_STATES, State

BAD_RECORD = "bad record: "  # how an unreadable record's error starts


@dataclass
class ServerStatus:
    """The observed state of one managed server (or of a record that could not be read)."""

    name: str
    state: State
    record: ServerRecord | None = None
    pid: int | None = None
    uptime: float | None = None
    returncode: int | None = None
    health_code: int | None = None
    orphans: list[int] = field(default_factory=list)
    error: str | None = None
    log_tail: list[str] = field(default_factory=list)

    @property
    def running(self) -> bool:
        """True when the server is alive or being kept alive (restarting, draining)."""
        return self.state in ALIVE_STATES

    def to_json(self) -> dict[str, Any]:
        """Stable JSON shape for ``status --json``."""
        rec = self.record
        out: dict[str, Any] = {
            "name": self.name,
            "state": self.state,
            "model": rec.model if rec else None,
            "served_model_name": rec.served_model_name if rec else None,
            "served_model_names": (rec.served_names or [rec.served_model_name])
            if rec else None,
            "task": rec.task if rec else None,
            "pid": self.pid,
            "host": rec.host if rec else None,
            "port": rec.port if rec and rec.port else None,
            "url": rec.base_url if rec and rec.base_url else None,
            "uptime_s": round(self.uptime, 1) if self.uptime is not None else None,
            "started_at": rec.started_at if rec else None,
            "returncode": self.returncode,
            "orphan_pids": self.orphans,
            "log": rec.log_path if rec else None,
            "error": self.error,
            "role": rec.role if rec else None,
            "node_rank": rec.node_rank if rec else None,
            "leader": rec.leader if rec else None,
            "log_tail": self.log_tail,
            "restart_policy": rec.restart_policy if rec else None,
            "restarts": rec.restart_count if rec else None,
            "last_exit_code": rec.last_exit_code if rec else None,
            "last_exit_at": rec.last_exit_at if rec else None,
            "next_restart_at": rec.next_restart_at
            if rec and self.state == State.RESTARTING else None,
            "drain_left_s": self.drain_left(),
            "enabled": _enabled_scope(self.name),
            "gpus": record_gpus(rec) if rec else None,
            "gpu_memory_utilization": (rec.config or {}).get("gpu_memory_utilization")
            if rec else None,
        }
        return out

    def drain_left(self) -> float | None:
        """Seconds the drain may still take while ``draining``, else None."""
        rec = self.record
        if self.state != State.DRAINING or rec is None or rec.drain_until is None:
            return None
        return round(max(0.0, rec.drain_until - time.time()), 1)


def _enabled_scope(name: str) -> str | None:
    from cmw_vllm.systemd_unit import enabled_scope

    return enabled_scope(name)


def list_status(names: list[str] | None = None, check_health: bool = True,
                health_timeout: float | None = None) -> list[ServerStatus]:
    """Observe every managed server (or those in ``names``), health checks concurrently.

    Args:
        names: The servers (default: every record).
        check_health: Probe ``/health`` of the running ones (else they stay ``running``).
        health_timeout: Seconds one probe may take (default ``CMW_VLLM_HEALTH_TIMEOUT``).
    """
    if health_timeout is None:
        from cmw_vllm.settings import health_timeout as default_health_timeout

        health_timeout = default_health_timeout()
    statuses = [observe(name) for name in (names if names is not None else record_names())]
    for st in statuses:
        if st.state == State.RUNNING and st.record and st.record.role == "follower":
            st.state = State.JOINED if follower_joined(st.record) else State.STARTING
    to_probe = [s for s in statuses if s.state == State.RUNNING and s.record is not None]
    if check_health and to_probe:
        codes = _probe_many([s.record.base_url for s in to_probe],  # type: ignore[union-attr]
                            health_timeout)
        for status, code in zip(to_probe, codes, strict=True):
            status.health_code = code
            if code == 200:
                status.state = State.HEALTHY
            elif code is not None or _was_ready(status.record):  # type: ignore[arg-type]
                status.state = State.UNHEALTHY
            else:
                status.state = State.STARTING
    return statuses


def _probe_many(urls: list[str], timeout: float) -> list[int | None]:
    from cmw_vllm.health_check import probe_health

    if len(urls) == 1:
        return [probe_health(urls[0], timeout)]
    from concurrent.futures import ThreadPoolExecutor

    with ThreadPoolExecutor(max_workers=min(32, len(urls))) as pool:
        return list(pool.map(lambda u: probe_health(u, timeout), urls))


def follower_joined(record: ServerRecord) -> bool:
    """A follower node has joined its leader (it was ready once, or its log says so)."""
    from cmw_vllm.multinode import log_shows_joined

    return record.ready_at is not None or log_shows_joined(Path(record.log_path))


def _was_ready(record: ServerRecord) -> bool:
    if record.ready_at is not None:
        return True
    from cmw_vllm.vllm_engine import READY_LINE

    try:
        with open(record.log_path, "rb") as fh:
            return READY_LINE.encode() in fh.read(64 * 1024 * 1024)
    except OSError:
        return False


def record_gpus(record: ServerRecord) -> list[int | str] | None:
    """The GPUs a server runs on (NVML indices; UUIDs as given), None when not set (a
    server without GPUs, or one started before placement existed)."""
    raw = (record.config or {}).get("gpus")
    if not raw:
        return None
    return [int(p) if p.isdigit() else p for p in str(raw).split(",")]


def observe(name: str) -> ServerStatus:
    """Process-level state of one server (health is added by :func:`list_status`)."""
    try:
        record = read_record(name)
    except ValueError as exc:
        return ServerStatus(name=name, state=State.INVALID, error=f"{BAD_RECORD}{exc}")
    if record is None:
        return ServerStatus(name=name, state=State.INVALID, error="no record")
    proc = is_ours(record)
    if proc is not None:
        return ServerStatus(
            name=name,
            state=State.DRAINING if record.stop_requested_at is not None else State.RUNNING,
            record=record,
            pid=record.pid,
            uptime=time.time() - record.started_at,
        )
    status = ServerStatus(name=name, state=State.EXITED, record=record, pid=record.pid)
    supervised = record.failed_at is None and supervisor_process(record) is not None
    exit_info = _exit_info(record, wait=supervised)
    if exit_info is not None:
        status.returncode = exit_info.get("returncode")
    if supervised and record.stop_requested_at is not None:
        status.state = State.DRAINING  # vLLM is gone; its supervisor finishes the stop
        return status
    if supervised and record.next_restart_at is not None:
        status.state = State.RESTARTING
        status.returncode = record.last_exit_code
        return status
    status.orphans = [p.pid for p in group_members(record)]
    if record.failed_at is not None:
        status.state = State.FAILED
        status.returncode = record.last_exit_code
    elif status.returncode is None and not supervised and _pid_alive(record.pid):
        status.state = State.STALE
        status.error = f"pid {record.pid} now belongs to another process"
    from cmw_vllm.vllm_engine import diagnose, failure_excerpt, tail_lines

    if status.state in (State.EXITED, State.FAILED):
        text = "\n".join(tail_lines(Path(record.log_path), 400))
        status.log_tail = failure_excerpt(text, 10)
        status.error = diagnose(text)
    return status


def _exit_info(record: ServerRecord, wait: bool) -> dict[str, Any] | None:
    """The supervisor's exit record of this run; with ``wait``, give it a moment.

    The supervisor writes it right after it reaps vLLM: a status taken in between must
    not read the exit as "unknown".
    """
    deadline = time.monotonic() + (0.5 if wait else 0.0)
    while True:
        info = read_exit(record.name)
        if info is not None and info.get("pid") == record.pid:
            return info
        if time.monotonic() >= deadline:
            return None
        time.sleep(0.02)


def _pid_alive(pid: int) -> bool:
    import psutil

    return psutil.pid_exists(pid)
