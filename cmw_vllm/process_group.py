"""The processes of a managed server: identity checks, its process group, signals, ports.

A process is ours only when its pid, create time and command line match the record. vLLM
runs in a session of its own whose group id is the API server's pid; EngineCore and the
workers stay in that group even when the API server was killed and they were re-parented,
which is how a crashed run's leftovers are found.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import psutil

    from cmw_vllm.server_record import ServerRecord

IS_WINDOWS = os.name == "nt"
# The module the supervisor runs as (``python -m cmw_vllm.supervisor ... -- COMMAND``).
SUPERVISOR_MODULE = "cmw_vllm.supervisor"
# How long a command line may read empty while its process execs (a wrapper's exec).
EXEC_WINDOW_S = 1.0
EXEC_MIN_READS = 5


def process(pid: int, create_time: float) -> psutil.Process | None:
    """The live process with this pid and create time, or None (gone or pid reused)."""
    import psutil

    try:
        proc = psutil.Process(pid)
        if abs(proc.create_time() - create_time) > 0.05:
            return None
        if proc.status() == psutil.STATUS_ZOMBIE:
            return None
        return proc
    except (psutil.NoSuchProcess, psutil.AccessDenied, ValueError):
        return None


def is_ours(record: ServerRecord) -> psutil.Process | None:
    """The API server process when pid, create time and command line match the record."""
    return verified_process(record.pid, record.create_time,
                            lambda cmdline: command_matches(cmdline, record.command))


def verified_process(pid: int, create_time: float, matches: Callable[[list[str]], bool]
                     ) -> psutil.Process | None:
    """The live process of this pid and create time whose command line ``matches``, or None.

    A recorded pid may name another process by now (reused), or one we may not inspect:
    either is "not ours".
    """
    import psutil

    proc = process(pid, create_time)
    if proc is None:
        return None
    deadline = time.monotonic() + EXEC_WINDOW_S
    reads = 0
    while True:
        try:
            cmdline = proc.cmdline()
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            return None
        reads += 1
        # A process in the middle of an exec (a wrapper that execs the interpreter) shows an
        # empty command line for a moment: read it again rather than call it someone else.
        # A few reads at least, whatever the clock says: on a loaded machine this process may
        # get no CPU for the whole window.
        if cmdline or (time.monotonic() >= deadline and reads >= EXEC_MIN_READS):
            break
        time.sleep(0.005)
    return proc if matches(cmdline) else None


def command_matches(cmdline: list[str], command: list[str]) -> bool:
    """True when a process's command line is the command that was recorded for it.

    The recorded arguments must end the command line exactly. Only the program may show
    differently, as one word or several: a ``#!`` script runs as ``python SCRIPT ARGS``, a
    wrapper that execs the interpreter (``exec python "$@"``) replaces it, and shims that
    exec through other programs first (pyenv: ``bash .../pyenv exec python3 ARGS``, then
    ``python3 ARGS``; ``/usr/bin/env bash SHIM ARGS``) show each stage in turn. The one
    command line that ends with the arguments but is not the command is our supervisor's
    (``python -m cmw_vllm.supervisor ... -- COMMAND``), which its child shows between fork
    and exec. vLLM renames its EngineCore and worker children (``VLLM::EngineCore``) but not
    the API server, the process a record names.
    """
    if not command:
        return False
    args = command[1:]
    head = len(cmdline) - len(args)
    if head < 1 or cmdline[head:] != args:
        return False
    return SUPERVISOR_MODULE not in cmdline[:head]


def supervisor_process(record: ServerRecord) -> psutil.Process | None:
    """The server's supervisor (pid and create time match), or None when it is gone.

    None as well when the supervisor is this very process (a foreground server).
    """
    if record.supervisor_pid == os.getpid():
        return None
    # `python -m cmw_vllm.supervisor ...`, or `cmw-vllm start ... --foreground`.
    return verified_process(
        record.supervisor_pid, record.supervisor_create_time,
        lambda cmdline: any("cmw_vllm" in part or "cmw-vllm" in part for part in cmdline))


def group_members(record: ServerRecord) -> list[psutil.Process]:
    """Every live process of the server's process group, when that group is still ours.

    EngineCore and workers stay in the group (and the session) the server was started in,
    even when the API server was killed and they were re-parented: that is how orphans are
    found. The group counts as ours only when the record postdates the last boot, the group
    leader is either gone or is the process that began the group (same create time: the
    API server, or the supervisor for records of older versions), and each member was
    created after it, is in its session, and is not this process or one of its ancestors.
    Anything else is a reused id and is left alone.
    """
    import psutil

    if IS_WINDOWS:
        proc = is_ours(record)
        if proc is None:
            return []
        try:
            return [proc, *proc.children(recursive=True)]
        except psutil.NoSuchProcess:
            return []
    if record.group_time < psutil.boot_time():
        return []
    try:
        leader = psutil.Process(record.pgid)
        if abs(leader.create_time() - record.group_time) > 0.05:
            return []  # the group id now belongs to a process started later
    except psutil.NoSuchProcess:
        pass
    protected = {os.getpid(), *(p.pid for p in psutil.Process().parents())}
    members = []
    for proc in psutil.process_iter(["create_time", "status"]):
        if proc.pid in protected:
            continue
        try:
            if os.getpgid(proc.pid) != record.pgid or os.getsid(proc.pid) != record.pgid:
                continue
        except (ProcessLookupError, PermissionError, OSError):
            continue
        info = proc.info
        if info.get("status") == psutil.STATUS_ZOMBIE:
            continue
        created = info.get("create_time") or 0.0
        if created + 0.05 < record.group_time:
            continue
        members.append(proc)
    return members


def send_signal(proc: psutil.Process, sig: int) -> bool:
    import signal

    import psutil

    try:
        if IS_WINDOWS:
            proc.kill() if sig == getattr(signal, "SIGKILL", -1) else proc.terminate()
        else:
            proc.send_signal(sig)
        return True
    except (psutil.NoSuchProcess, ProcessLookupError):
        return False


def wait_gone(procs: list[psutil.Process], timeout: float) -> list[psutil.Process]:
    """Wait until every process has exited; return those still running after ``timeout``.

    A zombie counts as gone: it holds no memory, and an orphan's zombie waits for init
    to reap it, which can take a while (psutil.wait_procs would wait for that).
    """
    import psutil

    def running(proc: psutil.Process) -> bool:
        try:
            return proc.is_running() and proc.status() != psutil.STATUS_ZOMBIE
        except psutil.NoSuchProcess:
            return False

    deadline = time.monotonic() + max(timeout, 0)
    alive = [p for p in procs if running(p)]
    while alive and time.monotonic() < deadline:
        time.sleep(0.02)
        alive = [p for p in alive if running(p)]
    return alive


def describe_port_holder(host: str, port: int) -> str | None:
    """Who listens on (or has bound) ``port``, as ``pid 123 (python3 -m http.server)``."""
    import psutil

    try:
        conns = psutil.net_connections(kind="inet")
    except (psutil.AccessDenied, OSError):
        return None
    for conn in conns:
        if not conn.laddr or conn.laddr.port != port:
            continue
        if conn.status not in (psutil.CONN_LISTEN, psutil.CONN_NONE):
            continue
        if conn.pid is None:
            return "another process"
        try:
            proc = psutil.Process(conn.pid)
            cmd = " ".join(proc.cmdline())[:80] or proc.name()
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            cmd = "?"
        return f"pid {conn.pid} ({cmd})"
    return None


def port_is_free(host: str, port: int) -> bool:
    """True when nothing listens on or has bound ``host:port``."""
    import socket

    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as sock:
        if not IS_WINDOWS:
            # Ignore TIME_WAIT leftovers of our own previous server on this port.
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((host, port))
        except OSError:
            return False
    # vLLM binds with SO_REUSEADDR long before it listens: look for bound sockets too.
    return describe_port_holder(host, port) is None
