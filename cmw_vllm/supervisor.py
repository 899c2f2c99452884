"""The parent of a vLLM server: records each exit, drains on stop, restarts after a crash.

In the background, ``ServerManager.start`` runs ``python -m cmw_vllm.supervisor --name NAME
-- CMD...`` in a new session; with ``start --foreground`` the cmw-vllm process itself is the
supervisor (:func:`run_foreground`). Either way vLLM runs in a session of its own, so
SIGTERM reaches the API server alone (tensor-parallel workers exit on their first SIGTERM)
and a crashed run's leftovers are found by its process group.

- Stop: SIGTERM/SIGINT/SIGHUP to the supervisor (``cmw-vllm stop`` sends it) forwards one
  SIGTERM to the API server, which drains for its ``--shutdown-timeout``; after the drain
  plus a margin the whole group gets SIGKILL. vLLM ignores a second SIGTERM. A stop signal
  that comes between vLLM's spawn and the supervisor's taking over is held for it
  (:func:`hold_stop_signals`), never lost or fatal; once it is done they are ignored.
- Crash: any exit nobody asked for, exit code 0 included (vLLM exits 0 when its engine
  dies). With the server's restart policy ``on-failure`` or ``always`` the leftovers of the
  run are killed, the port awaited, and vLLM relaunched after a backoff that doubles from
  ``CMW_VLLM_RESTART_BACKOFF`` seconds to ``CMW_VLLM_RESTART_BACKOFF_MAX``; a run that stayed
  ready for ``CMW_VLLM_RESTART_RESET`` seconds resets it. ``on-failure`` gives up after
  ``CMW_VLLM_RESTART_LIMIT`` crashes within ``CMW_VLLM_RESTART_WINDOW`` seconds: the record
  says ``failed``. ``always`` never gives up.
- Hung engine: with ``CMW_VLLM_RESTART_UNHEALTHY`` > 0, a run whose ``/health`` has failed
  for that many seconds while its process lives is killed and counts as a crash (restarted
  as the policy says). Only once it was ready: loading, however long, is never a hang.
- systemd: with ``$NOTIFY_SOCKET`` set it sends ``READY=1`` once vLLM is healthy and
  ``STOPPING=1`` when a stop begins. As PID 1 (a container) it reaps orphaned children.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import IO, TYPE_CHECKING, Any

from cmw_vllm import paths
from cmw_vllm import process_group as pg
from cmw_vllm import server_record as sr
from cmw_vllm import shm_segments as shm

if TYPE_CHECKING:
    from cmw_vllm.server_record import ServerRecord

PREFIX = "cmw-vllm supervisor:"
HEALTH_POLL_S = 0.5  # readiness probes while loading
HANG_POLL_S = 5.0  # health probes of a ready server when hang detection is on
PORT_WAIT_S = 60.0
# How often the shared memory of vLLM's processes is noted: while loading (vLLM makes its
# segments then), and once ready (a scan of a few /proc/PID/maps).
SHM_NOTE_LOADING_S = 1.0
SHM_NOTE_READY_S = 30.0


@dataclass(frozen=True)
class Backoff:
    """When to restart a crashed server, and when to give up.

    Attributes:
        first: Seconds before the first restart of a series of crashes.
        maximum: The longest wait; each crash doubles the previous one up to this.
        reset_after: Seconds of readiness after which a crash starts a new series.
        limit: ``on-failure`` gives up at this many crashes within ``window`` seconds.
        window: See ``limit``.
        hung_after: Seconds of failing ``/health`` after readiness that make a live run a
            crash (a hung engine); 0 turns this off.
    """

    first: float = 2.0
    maximum: float = 300.0
    reset_after: float = 600.0
    limit: int = 5
    window: float = 1800.0
    hung_after: float = 0.0

    @classmethod
    def from_env(cls) -> Backoff:
        """Read the ``CMW_VLLM_RESTART_*`` variables (defaults above).

        Raises:
            ConfigError: A value is not a number.
        """
        from cmw_vllm.settings import env_float

        return cls(
            first=max(0.0, env_float("CMW_VLLM_RESTART_BACKOFF", cls.first)),
            maximum=max(0.0, env_float("CMW_VLLM_RESTART_BACKOFF_MAX", cls.maximum)),
            reset_after=env_float("CMW_VLLM_RESTART_RESET", cls.reset_after),
            limit=max(1, int(env_float("CMW_VLLM_RESTART_LIMIT", cls.limit))),
            window=env_float("CMW_VLLM_RESTART_WINDOW", cls.window),
            hung_after=max(0.0, env_float("CMW_VLLM_RESTART_UNHEALTHY", cls.hung_after)),
        )

    def delay(self, streak: int) -> float:
        """Seconds to wait before restart number ``streak`` (1-based) of a series."""
        return min(self.maximum, self.first * 2 ** max(0, streak - 1))


def check_settings() -> None:
    """Read the settings a supervisor uses, so that a bad value fails ``start`` at once.

    Raises:
        ConfigError: A ``CMW_VLLM_RESTART_*`` or ``CMW_VLLM_HEALTH_TIMEOUT`` value is not a
            number.
    """
    from cmw_vllm.settings import health_timeout

    Backoff.from_env()
    health_timeout()


def notify(message: str, address: str | None = None) -> bool:
    """Send one sd_notify datagram (``READY=1``, ``STOPPING=1``, ...) to ``$NOTIFY_SOCKET``.

    The whole protocol: one ``AF_UNIX``/``SOCK_DGRAM`` datagram; a leading ``@`` names an
    abstract socket. Returns False when there is no socket or it cannot be reached.

    Args:
        message: The datagram's text.
        address: The socket (default ``$NOTIFY_SOCKET``; a caller that took it out of the
            environment, so that its children don't inherit it, passes it here).
    """
    import socket

    address = address or os.environ.get("NOTIFY_SOCKET")
    if not address or not hasattr(socket, "AF_UNIX"):
        return False
    if address.startswith("@"):
        address = "\0" + address[1:]
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
            sock.connect(address)
            sock.sendall(message.encode())
        return True
    except OSError:
        return False


STOP_SIGNALS = tuple(sig for sig in (signal.SIGTERM, signal.SIGINT,
                                     getattr(signal, "SIGHUP", None)) if sig is not None)
_held: dict[str, Any] = {"signum": None, "previous": {}}


def hold_stop_signals() -> None:
    """From now on a stop signal is kept for the supervisor to come (:meth:`Supervisor.
    install_signals`) instead of ending this process.

    Called right before vLLM's spawn: a SIGTERM or Ctrl-C while the record is written would
    otherwise kill us and leave vLLM running unsupervised (or, as PID 1 of a container, be
    dropped: PID 1 has no default action for SIGTERM). Does nothing on Windows (no signals
    to hold: termination is plain there) or outside the main thread (Python's signal
    handlers live there).
    """
    if os.name == "nt" or threading.current_thread() is not threading.main_thread():
        return
    _held["signum"] = None
    for sig in STOP_SIGNALS:
        previous = signal.signal(sig, _hold)
        if previous is not _hold and previous is not None:
            _held["previous"][sig] = previous


def release_held_signals() -> None:
    """Undo :func:`hold_stop_signals` after a spawn that failed: the previous handlers again,
    and a stop signal that came meanwhile is delivered to them now."""
    previous: dict[int, Any] = _held["previous"]
    signum = _held["signum"]
    _held["signum"], _held["previous"] = None, {}
    for sig, handler in previous.items():
        signal.signal(sig, handler)
    if signum is not None:
        signal.raise_signal(signum)


def ignore_stop_signals() -> None:
    """Ignore stop signals from now on: for a process whose supervising is over and that
    exits now (Python's exit would restore their default action, and a late stop signal
    would end it with another status than vLLM's)."""
    if os.name == "nt" or threading.current_thread() is not threading.main_thread():
        return
    for sig in STOP_SIGNALS:
        signal.signal(sig, signal.SIG_IGN)


def _hold(signum: int, _frame: object) -> None:
    if _held["signum"] is None:
        _held["signum"] = signum


def spawn_vllm(command: list[str], log_fd: int | None, env: dict[str, str] | None = None
               ) -> subprocess.Popen[bytes]:
    """Start vLLM in a session of its own; output to ``log_fd``, or a pipe when None."""
    return subprocess.Popen(
        command,
        stdin=subprocess.DEVNULL,
        stdout=log_fd if log_fd is not None else subprocess.PIPE,
        stderr=subprocess.STDOUT,
        env=env,
        cwd=str(paths.state_dir()),
        close_fds=True,
        start_new_session=True,
    )


def exit_status(returncode: int) -> int:
    """A process exit status for a Popen-style return code (-N for signal N -> 128+N)."""
    return returncode if returncode >= 0 else 128 - returncode


class Supervisor:
    """Watches one vLLM run after another until a stop, a give-up or policy ``no``.

    Args:
        name: Server name (its record must name this process as the supervisor).
        proc: The running first vLLM process.
        env: Environment for relaunches (None: this process's).
        tee: Copy vLLM's output (a pipe) to stdout and the log file (foreground).
        backoff: Restart timing (default: from the environment).
        on_ready: Called with the record each time a run becomes ready (foreground: the
            CLI's ready line).
    """

    def __init__(self, name: str, proc: subprocess.Popen[bytes], *,
                 env: dict[str, str] | None = None, tee: bool = False,
                 backoff: Backoff | None = None,
                 on_ready: Callable[[sr.ServerRecord], None] | None = None) -> None:
        from cmw_vllm.settings import health_timeout

        self.on_ready = on_ready
        self.name = name
        self.proc = proc
        self.returncode: int | None = None
        self.env = env
        self.tee = tee
        self.backoff = backoff or Backoff.from_env()
        self.health_timeout = health_timeout()
        self.stop_signal: int | None = None
        self.crashes: list[float] = []
        self.streak = 0
        self.hung: str | None = None  # why the current run counts as hung
        self.log_fh: IO[bytes] | None = None
        self.run_done = threading.Event()

    # ------------------------------------------------------------------ messages

    def say(self, message: str) -> None:
        """One line of our own, in the log (and on the terminal in the foreground)."""
        line = f"{PREFIX} {message}\n"
        with contextlib.suppress(OSError, ValueError):
            sys.stderr.write(line)
            sys.stderr.flush()
        if self.tee and self.log_fh is not None:
            with contextlib.suppress(OSError, ValueError):
                self.log_fh.write(line.encode())
                self.log_fh.flush()

    def record(self) -> ServerRecord | None:
        """Our record, or None when it is gone or another supervisor owns it now."""
        try:
            record = sr.read_record(self.name)
        except ValueError:
            return None
        if record is None or record.supervisor_pid != os.getpid():
            return None
        return record

    def update(self, **changes: Any) -> ServerRecord | None:
        """Change fields of our record (None when it is not ours any more)."""
        from cmw_vllm.errors import CmwVllmError

        try:
            return sr.update_record(self.name, os.getpid(), **changes)
        except CmwVllmError as exc:
            self.say(f"cannot update the record: {exc.message}")
            return None

    # ------------------------------------------------------------------ signals

    def install_signals(self) -> None:
        """SIGTERM, SIGINT and SIGHUP ask for a stop (a drain); so does one that came while
        they were held (:func:`hold_stop_signals`) since vLLM's spawn."""
        for sig in STOP_SIGNALS:
            signal.signal(sig, self._on_signal)
        held, _held["signum"], _held["previous"] = _held["signum"], None, {}
        if held is not None:
            self._on_signal(held, None)

    def _on_signal(self, signum: int, _frame: object) -> None:
        if self.stop_signal is not None:
            return  # vLLM ignores a second SIGTERM anyway; the deadline escalates
        self.stop_signal = signum
        if self.returncode is None:
            with contextlib.suppress(OSError):
                os.kill(self.proc.pid, signal.SIGTERM)

    # ------------------------------------------------------------------ main loop

    def run(self) -> int:
        """Supervise until the server is stopped or given up; return our exit status."""
        self.install_signals()
        if self.tee:
            self._start_tee()
        while True:
            rc, ready_for = self._watch_run()
            exit_at = time.time()
            self._write_exit(rc, exit_at)
            record = self.record()
            if self.stop_signal is not None or record is None \
                    or record.stop_requested_at is not None:
                if record is not None:
                    self._kill_leftovers(record)
                return exit_status(rc)
            if self.hung:
                self.say(f"vLLM (pid {self.proc.pid}) was killed as hung: a crash")
            elif record.restart_policy != "no":
                self.say(f"vLLM (pid {self.proc.pid}) exited with code {rc} without a stop "
                         "request: a crash")
            delay = self._next_delay(record, exit_at, ready_for)
            if delay is None:
                return exit_status(rc) or 1
            if not self._relaunch(record, rc, exit_at, delay):
                return exit_status(rc) or 1

    def _watch_run(self) -> tuple[int, float]:
        """Wait for the current vLLM run to end, draining it on a stop request.

        Returns:
            (its return code, seconds it had been ready: 0 when it never was).
        """
        self.run_done.clear()
        self.hung = None
        ready_at: list[float] = []
        probe = threading.Thread(target=self._probe_health, args=(ready_at,), daemon=True)
        probe.start()
        kill_at: float | None = None
        killed = False
        next_note = time.monotonic() + SHM_NOTE_LOADING_S
        noted_ready = False  # one note once ready: the segments are all made by then
        try:
            while True:
                if self.stop_signal is not None and kill_at is None:
                    kill_at = self._begin_stop()  # before the reap: vLLM may be gone already
                rc = self._reap()
                if rc is not None:
                    break
                if kill_at is None and (time.monotonic() >= next_note
                                        or (ready_at and not noted_ready)):
                    noted_ready = bool(ready_at)
                    self._note_segments()
                    next_note = time.monotonic() + (
                        SHM_NOTE_READY_S if ready_at else SHM_NOTE_LOADING_S)
                if (self.hung and not killed) or (
                        kill_at is not None and not killed and time.monotonic() >= kill_at):
                    self.say(f"vLLM (pid {self.proc.pid}) is hung: {self.hung}; killing it"
                             if self.hung else "SIGKILL of the server's process group")
                    record = self.record()
                    if record is not None:
                        self._kill_leftovers(record)
                    else:
                        with contextlib.suppress(OSError):
                            os.kill(self.proc.pid, signal.SIGKILL)
                    killed = True
                time.sleep(0.05)
        finally:
            self.run_done.set()
        ready_for = time.time() - ready_at[0] if ready_at else 0.0
        return rc, ready_for

    def _reap(self) -> int | None:
        """Reap every exited child; vLLM's return code once it exited.

        Orphans of the namespace are our children too when we are PID 1 (a container): each
        call reaps them all, whether vLLM still runs, has exited, or waits for a restart.
        """
        while True:
            try:
                pid, status = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:  # no child left at all
                if self.returncode is None:
                    self.returncode = 0  # vLLM was reaped elsewhere: its code is lost
                    self.proc.returncode = 0
                return self.returncode
            if pid == 0:
                return self.returncode
            if pid == self.proc.pid and self.returncode is None:
                self.returncode = os.waitstatus_to_exitcode(status)
                self.proc.returncode = self.returncode

    def _probe_health(self, ready_at: list[float]) -> None:
        """Poll /health: mark the record ready (READY=1); with hang detection, watch on.

        A run is hung once ``/health`` has failed for ``backoff.hung_after`` seconds, counted
        from the first failing probe after it was ready (seen by this probe, or by ``start``
        on the record: ``status`` says ``unhealthy`` from then on); while it loads, however
        long, it is never hung.
        """
        from cmw_vllm.health_check import probe_health

        record = self.record()
        if record is None:
            return
        hung_after = self.backoff.hung_after
        failing_since: float | None = None
        while not self.run_done.is_set():
            asked_at = time.time()
            code = probe_health(record.base_url, self.health_timeout if ready_at else 1.0)
            if code == 200:
                failing_since = None
                if not ready_at:
                    ready_at.append(time.time())
                    self.update(ready_at=ready_at[0])
                    if self.on_ready is not None:  # before READY=1: said when it is sent
                        self.on_ready(record)
                    notify(f"READY=1\nSTATUS=serving on {record.base_url}")
                    if hung_after <= 0:
                        return
            else:
                if not ready_at and (seen := self._ready_on_record()) is not None:
                    ready_at.append(seen)
                if ready_at and hung_after > 0 and self.stop_signal is None:
                    failing_since = failing_since or asked_at
                    failed_for = time.time() - failing_since
                    if failed_for >= hung_after:
                        answer = f"HTTP {code}" if code is not None else "no answer"
                        self.hung = (f"/health has failed for {failed_for:.1f}s ({answer}; "
                                     f"CMW_VLLM_RESTART_UNHEALTHY={hung_after:g})")
                        return
            self.run_done.wait(self._health_poll_s() if ready_at else HEALTH_POLL_S)

    def _ready_on_record(self) -> float | None:
        """When ``start`` saw the current run ready (it may probe before we do), or None."""
        record = self.record()
        if record is None or record.pid != self.proc.pid:
            return None
        return record.ready_at

    def _health_poll_s(self) -> float:
        """Seconds between probes of a ready run: a few per ``hung_after``, at most 5 s."""
        return min(HANG_POLL_S, max(HEALTH_POLL_S, self.backoff.hung_after / 4))

    def _begin_stop(self) -> float:
        """Note the stop in the record (state ``draining``); return the SIGKILL deadline."""
        from cmw_vllm.settings import stop_timeout

        notify("STOPPING=1")
        record = self.record()
        now = time.time()
        if record is None:
            return time.monotonic() + 30.0
        if record.kill_at is not None and record.stop_requested_at is not None:
            return time.monotonic() + max(0.0, record.kill_at - now)  # set by `stop`
        drain = record.drain
        kill_at = now + drain + stop_timeout()
        self.say(f"stopping: in-flight requests get up to {drain}s")
        self.update(stop_requested_at=now, drain_until=now + drain, kill_at=kill_at)
        return time.monotonic() + (kill_at - now)

    # ------------------------------------------------------------------ restarts

    def _next_delay(self, record: ServerRecord, exit_at: float, ready_for: float
                    ) -> float | None:
        """Seconds until the relaunch, or None when the policy says not to restart."""
        policy = record.restart_policy
        if policy == "no":
            # Leftovers stay for `status` to list and `stop` to reap, as without a policy.
            self.update(last_exit_code=self.returncode, last_exit_at=exit_at)
            return None
        if ready_for >= self.backoff.reset_after:
            self.streak = 0
        self.streak += 1
        self.crashes = [t for t in self.crashes if exit_at - t < self.backoff.window]
        self.crashes.append(exit_at)
        if policy == "on-failure" and len(self.crashes) >= self.backoff.limit:
            self.say(f"{len(self.crashes)} crashes within {self.backoff.window:g}s: giving up")
            self._kill_leftovers(record)
            self.update(last_exit_code=self.returncode, last_exit_at=exit_at,
                        failed_at=time.time(), next_restart_at=None)
            return None
        return self.backoff.delay(self.streak)

    def _relaunch(self, record: ServerRecord, rc: int, exit_at: float, delay: float) -> bool:
        """Clean up after the crashed run, wait out the backoff, start vLLM again.

        Returns:
            False when a stop came in meanwhile (nothing was relaunched).
        """
        detected_at = time.time()
        next_at = detected_at + delay
        self.update(last_exit_code=rc, last_exit_at=exit_at, next_restart_at=next_at)
        self._kill_leftovers(record)
        port_free = self._wait_port(record)
        cleaned_at = time.time()
        self.say(f"backoff {delay:g}s: restarting in {max(0.0, next_at - cleaned_at):.1f}s"
                 + ("" if port_free else f" (port {record.port} is still taken)"))
        while time.time() < next_at and self.stop_signal is None:
            self._reap()  # orphans that end meanwhile (PID 1)
            time.sleep(min(0.1, max(0.0, next_at - time.time())))
        current = self.record()
        if self.stop_signal is not None or current is None \
                or current.stop_requested_at is not None:
            return False
        self._launch_next(current, {"exit_at": exit_at, "detected_at": detected_at,
                                    "cleaned_at": cleaned_at})
        return True

    def _launch_next(self, record: ServerRecord, timing: dict[str, float]) -> None:
        import psutil

        log_file = Path(record.log_path)
        sr.rotate_log(log_file)
        fd = sr.open_log(log_file)
        try:
            if self.tee:
                self._close_log()
                self.log_fh = os.fdopen(os.dup(fd), "ab", buffering=0)
            else:
                os.dup2(fd, 1)  # our own lines follow the current log too
                os.dup2(fd, 2)
            self.proc = spawn_vllm(record.command, None if self.tee else fd, self.env)
        finally:
            os.close(fd)
        self.returncode = None
        launched = time.time()
        child = psutil.Process(self.proc.pid)
        timing["launched_at"] = launched
        self.update(pid=self.proc.pid, create_time=child.create_time(), pgid=self.proc.pid,
                    started_at=launched, ready_at=None, next_restart_at=None,
                    restart_count=record.restart_count + 1, restart_timing=timing)
        self.say(f"restart {record.restart_count + 1}: vLLM pid {self.proc.pid}")
        if self.tee:
            self._start_tee()
        # A stop that arrived between the last check and the spawn reaches this run too.
        if self.stop_signal is not None:
            with contextlib.suppress(OSError):
                os.kill(self.proc.pid, signal.SIGTERM)

    def _kill_leftovers(self, record: ServerRecord) -> None:
        """SIGKILL what is left of a run's process group (an orphaned EngineCore holds the GPU),
        then remove the shared memory the run's processes left."""
        members = pg.group_members(record)
        shm.note(self.name, [p.pid for p in members])
        for proc in members:
            pg.send_signal(proc, signal.SIGKILL)
        alive = pg.wait_gone(members, 10.0)
        if alive:
            self.say(f"processes survived SIGKILL: {', '.join(str(p.pid) for p in alive)}")
        self._reap()
        removed = shm.remove_leftovers(self.name)
        if removed:
            self.say(f"removed shared memory left in /dev/shm: {', '.join(removed)}")

    def _note_segments(self) -> None:
        """Note the shared memory the current run's processes map (see ``shm_segments``)."""
        record = self.record()
        if record is not None:
            shm.note(self.name, [p.pid for p in pg.group_members(record)])

    def _wait_port(self, record: ServerRecord) -> bool:
        deadline = time.monotonic() + PORT_WAIT_S
        while not pg.port_is_free(record.host, record.port):
            if time.monotonic() >= deadline or self.stop_signal is not None:
                return False
            time.sleep(0.1)
        return True

    def _write_exit(self, rc: int, ended_at: float) -> None:
        import json

        data = json.dumps({"pid": self.proc.pid, "returncode": rc, "ended_at": ended_at})
        with contextlib.suppress(OSError, Exception):
            paths.write_private(sr.exit_path(self.name), data)

    # ------------------------------------------------------------------ foreground output

    def _start_tee(self) -> None:
        if self.log_fh is None:
            record = self.record()
            log_file = Path(record.log_path) if record else sr.log_path(self.name)
            self.log_fh = open(log_file, "ab", buffering=0)  # noqa: SIM115
        out = self.proc.stdout
        log_fh = self.log_fh

        def copy() -> None:
            assert out is not None
            for line in iter(out.readline, b""):
                with contextlib.suppress(OSError, ValueError):
                    log_fh.write(line)
                with contextlib.suppress(OSError, ValueError):
                    sys.stdout.buffer.write(line)
                    sys.stdout.flush()
            out.close()

        threading.Thread(target=copy, daemon=True).start()

    def _close_log(self) -> None:
        if self.log_fh is not None:
            with contextlib.suppress(OSError):
                self.log_fh.close()
            self.log_fh = None


def run_foreground(name: str, proc: subprocess.Popen[bytes], env: dict[str, str],
                   on_ready: Callable[[sr.ServerRecord], None] | None = None) -> int:
    """Supervise a vLLM process started by ``start --foreground`` in this process.

    ``on_ready`` is called with the record whenever a run becomes ready.

    Returns:
        The exit status for cmw-vllm: vLLM's after a requested stop; after an exit nobody
        asked for (policy ``no``, or given up), vLLM's code, or 1 when that was 0.
    """
    sup = Supervisor(name, proc, env=env, tee=True, on_ready=on_ready)
    try:
        status = sup.run()
        if sup.stop_signal is not None:
            # Stopped like `cmw-vllm stop` would: nothing of the server stays on record.
            # (A crash keeps its record, for `status` to show how it ended.)
            for path in (sr.record_path(name), sr.pid_path(name), sr.exit_path(name)):
                with contextlib.suppress(FileNotFoundError):
                    path.unlink()
        return status
    finally:
        sup._close_log()
        with contextlib.suppress(OSError, ValueError):
            sys.stdout.flush()


def main(argv: list[str]) -> int:
    """``--name NAME -- CMD...``: start CMD (vLLM) in a session of its own and supervise it."""
    if len(argv) < 4 or argv[0] != "--name" or argv[2] != "--":
        sys.stderr.write("usage: python -m cmw_vllm.supervisor --name NAME -- CMD...\n")
        return 2
    from cmw_vllm.errors import ConfigError

    name, cmd = argv[1], argv[3:]
    try:
        check_settings()  # `start` checked them too: never leave vLLM unsupervised
    except ConfigError as exc:
        sys.stderr.write(f"{PREFIX} {exc.message}\n")
        return 2
    hold_stop_signals()  # a stop from now on reaches vLLM, however early it comes
    try:
        proc = spawn_vllm(cmd, 1)
    except OSError as exc:
        sys.stderr.write(f"{PREFIX} cannot run {cmd[0]}: {exc}\n")
        return 127
    sup = Supervisor(name, proc)
    # The record is written by `start` right after this spawn; wait for it before relying on
    # it (a stop signal in the meantime is still honoured through stop_signal).
    sup.install_signals()
    deadline = time.monotonic() + 10.0
    while sup.record() is None and time.monotonic() < deadline and sup._reap() is None:
        time.sleep(0.02)
    status = sup.run()
    ignore_stop_signals()
    return status


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
