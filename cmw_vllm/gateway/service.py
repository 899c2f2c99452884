"""Running the gateway: in the foreground (also under systemd), or in the background.

Either way the gateway writes a record among the servers' (task ``gateway``), so
``cmw-vllm status`` shows it and ``cmw-vllm stop NAME`` stops it: SIGTERM makes it drain,
stop the servers it started, and remove its record.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from cmw_vllm import paths
from cmw_vllm.errors import ConflictError, EnvironmentProblem, ServerStartError
from cmw_vllm.gateway.settings import GatewaySettings
from cmw_vllm.server_record import (
    ServerRecord,
    log_path,
    pid_path,
    read_record,
    record_path,
)
from cmw_vllm.vocab import GATEWAY_TASK

logger = logging.getLogger(__name__)
SHUTDOWN_TIMEOUT = 10.0


def base_url(settings: GatewaySettings) -> str:
    """Where clients reach the gateway (loopback when bound to every interface)."""
    host = settings.host
    if host in ("0.0.0.0", "::", ""):
        host = "127.0.0.1"
    if ":" in host and not host.startswith("["):
        host = f"[{host}]"
    return f"http://{host}:{settings.port}"


def _check_free(settings: GatewaySettings) -> None:
    """Refuse when a live record has this name, or something holds the port."""
    from cmw_vllm.server_manager import ServerManager, describe_port_holder, port_is_free

    try:
        existing = read_record(settings.name)
    except ValueError:
        existing = None
    if existing is not None:
        status = ServerManager().get_status(settings.name, check_health=False)
        if status.running:
            what = "gateway" if existing.task == GATEWAY_TASK else "server"
            raise ConflictError(f"a {what} named {settings.name!r} is already running "
                                f"(pid {existing.pid}, port {existing.port})",
                                hint=f"cmw-vllm stop {settings.name}, or use --name")
    if not port_is_free(settings.host, settings.port):
        holder = describe_port_holder(settings.host, settings.port) or "another process"
        raise ConflictError(f"port {settings.port} is in use by {holder}",
                            hint="choose another with --port")


def write_record(settings: GatewaySettings) -> ServerRecord:
    """Record this process as the gateway ``settings.name`` (0600, atomic)."""
    import psutil

    me = psutil.Process()
    created = me.create_time()
    now = time.time()
    record = ServerRecord(
        name=settings.name, pid=me.pid, create_time=created, supervisor_pid=me.pid,
        supervisor_create_time=created, pgid=me.pid, host=settings.host, port=settings.port,
        model="cmw-vllm gateway", served_model_name="", task=GATEWAY_TASK,
        base_url=base_url(settings), command=me.cmdline(),
        log_path=str(log_path(settings.name)), started_at=now, config=settings.public(),
        ready_at=now,
    )
    for d in (paths.state_dir(), paths.servers_dir(), paths.logs_dir()):
        paths.ensure_dir(d)
    paths.write_private(record_path(settings.name), json.dumps(asdict(record), indent=2) + "\n")
    paths.write_private(pid_path(settings.name), f"{me.pid}\n")
    return record


def remove_record(settings: GatewaySettings) -> None:
    """Remove the record, when it is still this process's."""
    with contextlib.suppress(ValueError):
        record = read_record(settings.name)
        if record is not None and record.pid == os.getpid():
            for path in (record_path(settings.name), pid_path(settings.name)):
                with contextlib.suppress(FileNotFoundError):
                    path.unlink()


def _log_to_file(settings: GatewaySettings) -> None:
    """In the foreground, also log to the gateway's log file (``cmw-vllm logs NAME``).

    In the background, stderr already is that file.
    """
    from cmw_vllm.logging import FORMAT

    path = log_path(settings.name)
    try:
        if os.path.samestat(os.fstat(2), os.stat(path)):
            return
    except OSError:
        pass
    paths.ensure_dir(paths.logs_dir())
    flags = os.O_WRONLY | os.O_CREAT | os.O_APPEND | getattr(os, "O_NOFOLLOW", 0)
    try:
        os.close(os.open(path, flags, 0o600))
    except OSError as exc:
        raise EnvironmentProblem(f"cannot write {path}: {exc.strerror or exc}") from exc
    handler = logging.FileHandler(path, encoding="utf-8")
    handler.setFormatter(logging.Formatter(FORMAT))
    logging.getLogger("cmw_vllm").addHandler(handler)


def run_foreground(settings: GatewaySettings) -> None:
    """Serve until SIGINT or SIGTERM; then stop the servers this gateway started.

    Raises:
        ConflictError: The name or the port is taken.
    """
    from aiohttp import web

    from cmw_vllm.gateway.proxy import build_app

    _check_free(settings)
    _log_to_file(settings)
    app = build_app(settings)

    async def on_startup(app: web.Application) -> None:
        write_record(settings)
        logger.warning("gateway %r listening on %s", settings.name, base_url(settings))

    async def on_cleanup(app: web.Application) -> None:
        remove_record(settings)

    app.on_startup.append(on_startup)
    app.on_cleanup.append(on_cleanup)
    loop = None
    with contextlib.suppress(ImportError):
        import uvloop

        loop = uvloop.new_event_loop()
    web.run_app(app, host=settings.host, port=settings.port, handler_cancellation=True,
                access_log=None, print=None, shutdown_timeout=SHUTDOWN_TIMEOUT, loop=loop)


@dataclass
class BackgroundResult:
    """A gateway started in the background."""

    name: str
    pid: int
    url: str
    log_path: str


def start_background(settings: GatewaySettings, argv: list[str],
                     timeout: float = 60.0) -> BackgroundResult:
    """Run ``cmw-vllm gateway ARGV`` detached, logging to its log file; wait until it serves.

    Raises:
        ConflictError: The name or the port is taken.
        ServerStartError: It exited before serving (the end of its log attached).
    """
    import subprocess

    from cmw_vllm.health_check import probe_health
    from cmw_vllm.vllm_engine import tail_lines

    _check_free(settings)
    for d in (paths.state_dir(), paths.servers_dir(), paths.logs_dir()):
        paths.ensure_dir(d)
    log_file = log_path(settings.name)
    if log_file.is_symlink():
        raise EnvironmentProblem(f"{log_file} is a symlink; refusing to write through it")
    if log_file.exists():
        os.replace(log_file, log_file.with_name(log_file.name + ".1"))
    flags = os.O_WRONLY | os.O_CREAT | os.O_TRUNC | getattr(os, "O_NOFOLLOW", 0)
    fd = os.open(log_file, flags, 0o600)
    try:
        proc = subprocess.Popen([sys.executable, "-m", "cmw_vllm", "gateway", *argv],
                                stdin=subprocess.DEVNULL, stdout=fd, stderr=subprocess.STDOUT,
                                cwd=str(paths.state_dir()), start_new_session=True,
                                close_fds=True)
    finally:
        os.close(fd)
    url = base_url(settings)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise ServerStartError(
                f"the gateway exited at once (exit code {proc.returncode}); log: {log_file}",
                log_tail="\n".join(tail_lines(Path(log_file), 15)))
        with contextlib.suppress(ValueError):
            record = read_record(settings.name)
            if record is not None and record.pid == proc.pid \
                    and probe_health(url, 1.0) == 200:
                return BackgroundResult(settings.name, proc.pid, url, str(log_file))
        time.sleep(0.1)
    raise ServerStartError(f"the gateway does not answer after {timeout:g}s; log: {log_file}",
                           log_tail="\n".join(tail_lines(Path(log_file), 15)))
