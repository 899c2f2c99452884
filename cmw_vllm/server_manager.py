"""Start, stop and inspect vLLM servers, each under its own name.

The files a server leaves in the state dir, and how a record is read and updated, are in
:mod:`cmw_vllm.server_record`; the processes they name are looked at by
:mod:`cmw_vllm.process_group`. vLLM runs under a supervisor (:mod:`cmw_vllm.supervisor`)
that records each exit, restarts crashed servers by their policy and drains on stop.
"""

from __future__ import annotations

import contextlib
import logging
import os
import time
from collections.abc import Callable, Collection, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from cmw_vllm import paths
from cmw_vllm.errors import (
    CmwVllmError,
    ConflictError,
    EnvironmentProblem,
    GatewayNotServerError,
    ServerNotRunningError,
    ServerStartError,
    StartTimeoutError,
    StopError,
    UsageError,
)
from cmw_vllm.process_group import (
    command_matches,
    describe_port_holder,
    group_members,
    is_ours,
    port_is_free,
    send_signal,
    supervisor_process,
    wait_gone,
)
from cmw_vllm.server_record import (
    ServerRecord,
    exit_path,
    log_path,
    pid_path,
    read_exit,
    read_record,
    record_names,
    record_path,
    save_record,
    update_record,
)
from cmw_vllm.server_status import (
    BAD_RECORD,
    ServerStatus,
    follower_joined,
    list_status,
    observe,
)
from cmw_vllm.vocab import GATEWAY_TASK, PORT_MAX, State, validate_name

__all__ = [  # re-exported: callers find the server's processes and ports here too
    "ServerManager", "ServerStatus", "ServerRecord", "StartResult", "StopResult",
    "command_matches", "describe_port_holder", "group_members", "log_path",
    "port_is_free", "read_record", "record_names", "running_models",
]

if TYPE_CHECKING:
    import psutil

    from cmw_vllm.gpu_info import GpuInfo
    from cmw_vllm.server_config import ServerConfig

logger = logging.getLogger(__name__)


@dataclass
class StartResult:
    """What ``start`` did."""

    name: str
    record: ServerRecord
    already_running: bool
    ready: bool
    port_changed_from: int | None = None
    ready_after_s: float | None = None
    api_key: bool = False  # vLLM was given VLLM_API_KEY
    # Foreground only: the vLLM subprocess.Popen this process must supervise, and the
    # environment it was launched with (for relaunches).
    process: Any = None
    env: dict[str, str] | None = None


@dataclass
class StopResult:
    """What ``stop`` did."""

    name: str
    was_running: bool
    forced: bool = False
    stale: bool = False
    invalid: str | None = None  # why the record could not be read (it was removed)
    killed_pids: list[int] = field(default_factory=list)
    duration_s: float = 0.0
    remaining_pids: list[int] = field(default_factory=list)


ProgressCallback = Callable[[str, float], None]


# Seconds a stop of an idle server waits for vLLM's engine to say it had nothing to drain
# (it says so within milliseconds of the SIGTERM); after that the stop is a plain drain.
IDLE_CONFIRM_S = 5.0


def _idle(record: ServerRecord) -> bool:
    """True when the server's ``/metrics`` says no request is running or waiting."""
    from cmw_vllm.health_check import scrape_metrics

    try:
        snap = scrape_metrics(record.base_url, timeout=2.0)
    except CmwVllmError as exc:  # loading, hung or not vLLM: no shortcut
        logger.debug("%s: no load figures (%s): stopping with a drain", record.name, exc)
        return False
    return snap.requests_running == 0 and snap.requests_waiting == 0


def _log_size(record: ServerRecord) -> int:
    try:
        return Path(record.log_path).stat().st_size
    except OSError:
        return 0


def _read_log_from(record: ServerRecord, offset: int, limit: int = 1 << 20) -> str:
    try:
        with open(record.log_path, "rb") as fh:
            fh.seek(offset)
            return fh.read(limit).decode("utf-8", errors="replace")
    except OSError:
        return ""


def _is_resource_tracker(proc: psutil.Process) -> bool:
    import psutil

    try:
        return any("multiprocessing.resource_tracker" in arg for arg in proc.cmdline())
    except psutil.Error:
        return False


def _is_engine_core(proc: psutil.Process) -> bool:
    """vLLM titles its engine processes ``VLLM::EngineCore`` (one per data-parallel rank;
    the kernel's name keeps 15 characters of it)."""
    import psutil

    try:
        return "EngineCor" in proc.name() or "EngineCore" in " ".join(proc.cmdline()[:1])
    except psutil.Error:
        return False


# --------------------------------------------------------------------------- files


def _no_such_server(name: str) -> ServerNotRunningError:
    """The error for ``name`` without a record, naming the servers that look like it."""
    from cmw_vllm.vocab import did_you_mean

    return ServerNotRunningError(
        f"no managed server named {name!r}{did_you_mean(name, record_names())}",
        hint="see `cmw-vllm status` for the managed servers")


def _remove(*files: Path) -> None:
    for f in files:
        with contextlib.suppress(FileNotFoundError):
            f.unlink()


def _remove_server_files(name: str) -> None:
    """Remove the record, PID and exit files of ``name``, and temp files of a writer that was
    killed mid-write (the supervisor, when a failed start or a stop SIGKILLs it); and the
    shared-memory segments its processes left (see :mod:`cmw_vllm.shm_segments`)."""
    from cmw_vllm.shm_segments import remove_leftovers

    remove_leftovers(name)
    files = [record_path(name), pid_path(name), exit_path(name)]
    temps = [t for f in files for t in f.parent.glob(f".{f.name}.*.tmp")]
    _remove(*files, *temps)


@contextlib.contextmanager
def _name_lock(name: str, timeout: float = 60.0) -> Iterator[None]:
    """Hold the per-server lock (serialises start/stop/restart of one name)."""
    from filelock import Timeout

    try:
        with paths.private_lock(paths.locks_dir() / f"{name}.lock", timeout=timeout):
            yield
    except Timeout:
        raise ConflictError(
            f"another cmw-vllm command is working on server {name!r}; try again"
        ) from None


# --------------------------------------------------------------------------- manager


class ServerManager:
    """Start, stop and inspect managed vLLM servers.

    Args:
        health_timeout: Seconds one health request may take.
        poll_interval: Seconds between readiness checks while waiting for a start.
    """

    def __init__(self, health_timeout: float | None = None, poll_interval: float = 0.1) -> None:
        from cmw_vllm.settings import health_timeout as default_health_timeout

        self.health_timeout = (
            health_timeout if health_timeout is not None else default_health_timeout()
        )
        self.poll_interval = poll_interval

    # ----------------------------------------------------------------- status

    def get_status(self, name: str, check_health: bool = True) -> ServerStatus:
        """Observe one server.

        Raises:
            ServerNotRunningError: No record for ``name``.
        """
        validate_name(name)
        status = list_status([name], check_health, self.health_timeout)[0]
        if status.state == State.INVALID and status.error == "no record":
            raise _no_such_server(name)
        return status

    def list_status(
        self, names: list[str] | None = None, check_health: bool = True
    ) -> list[ServerStatus]:
        """Observe every managed server (or those in ``names``), health checks concurrently."""
        return list_status(names, check_health, self.health_timeout)

    # ----------------------------------------------------------------- start

    def start(
        self,
        config: ServerConfig,
        *,
        wait: bool = True,
        timeout: float | None = None,
        auto_port: bool = False,
        on_progress: ProgressCallback | None = None,
        check_resources: bool = True,
        on_notice: Callable[[str], None] | None = None,
        api_key: str | None = None,
        requested: Collection[str] = (),
        foreground: bool = False,
        python: str | None = None,
        environ: Mapping[str, str] | None = None,
        started_by: str | None = None,
    ) -> StartResult:
        """Start ``config`` in the background (or join the same server already running).

        Args:
            config: The server to start.
            wait: Wait until ``/health`` answers 200.
            timeout: Seconds to wait (default ``CMW_VLLM_START_TIMEOUT``).
            auto_port: When the port is taken, use the next free one.
            on_progress: Called with (phase, elapsed seconds) while waiting.
            check_resources: Refuse before launching when the model cannot fit the GPU (or,
                on the CPU build, RAM); see :func:`cmw_vllm.memory_check.preflight`.
            on_notice: Called with a line the user should see before the wait (the memory
                check was skipped, and why).
            api_key: The key vLLM requires from clients (default ``VLLM_API_KEY``). It
                reaches vLLM through its environment and is kept for ``restart`` in a
                private file (:mod:`cmw_vllm.last_start`), never in the record.
            requested: ServerConfig fields the user set explicitly. When the server already
                runs, any of them that differs from the running settings is an error.
            foreground: Launch vLLM as a child of this process, output to a pipe, and return
                at once with ``result.process`` and ``result.env`` set; the caller
                supervises it (:func:`cmw_vllm.supervisor.run_foreground`; from the spawn
                until then a SIGTERM/SIGINT/SIGHUP to this process is held for it, so call
                this in the main thread). A server that already runs is a conflict.
            python: The interpreter with vLLM (default: found as
                :func:`cmw_vllm.vllm_engine.find_engine_python` finds it).
            environ: The environment vLLM starts from (default ``os.environ``); what the
                memory check reads too. Its kept variables are kept for ``restart``.
            started_by: The name of the gateway that starts the server, kept in its record
                (a server that already runs keeps its own).

        Raises:
            InsufficientResourcesError: The preflight check refused (numbers in the message).
            ModelUnavailableError: The model is neither on disk nor cached and the Hub
                cannot be asked.
            ConflictError: The name runs another model or other requested settings, or the
                port is held by something else.
            EnvironmentProblem: vLLM missing, state dir not writable.
            ServerStartError: vLLM exited during start-up (message has the diagnosis).
            StartTimeoutError: Not ready within ``timeout``; the server keeps starting.
        """
        from cmw_vllm.settings import api_key as env_api_key
        from cmw_vllm.settings import start_timeout

        timeout = start_timeout() if timeout is None else timeout
        api_key = api_key or env_api_key()
        for d in (paths.state_dir(), paths.servers_dir(), paths.logs_dir()):
            paths.ensure_dir(d)
        port_changed_from = None
        process = env = None
        with _name_lock(config.name):
            existing = observe(config.name)
            if existing.running and existing.record is not None:
                self._check_joinable(existing, foreground)
                self._check_same_server(existing.record, config, requested, auto_port)
                record = existing.record
                already = True
                wait = wait and existing.state != State.RESTARTING
            else:
                if existing.record is not None or existing.state == State.INVALID:
                    self._cleanup_dead(config.name, existing)
                if config.role != "follower":  # a follower has no HTTP port
                    config, port_changed_from = self._choose_port(config, auto_port)
                from cmw_vllm.placement import placement_lock

                # Placement and the record that reserves its share are one step: a start
                # beside this one sees the reservation.
                with placement_lock():
                    config = self._place(config, environ, check_resources, on_notice)
                    record, process, env = self._launch(
                        config, api_key, foreground, python=python, environ=environ,
                        started_by=started_by)
                already = False
        result = StartResult(
            name=config.name,
            record=record,
            already_running=already,
            ready=False,
            port_changed_from=port_changed_from,
            api_key=bool(api_key) if not already else _has_api_key(record),
            process=process,
            env=env,
        )
        if wait and not foreground:
            result.ready_after_s = self.wait_ready(record, timeout, on_progress)
            result.ready = True
        return result

    @staticmethod
    def _place(config: ServerConfig, environ: Mapping[str, str] | None, check_resources: bool,
               on_notice: Callable[[str], None] | None) -> ServerConfig:
        """Choose the GPUs (``--gpus auto``) and size an ``auto`` share; check the fit.

        Without GPUs the RAM check of the CPU build applies (an ``auto`` share is then
        vLLM's default).

        Raises:
            InsufficientResourcesError: It fits nowhere (each GPU considered, and why).
        """
        from cmw_vllm.memory_check import preflight
        from cmw_vllm.placement import place
        from cmw_vllm.vocab import AUTO

        env = dict(os.environ if environ is None else environ)
        env.update(config.env)
        placed = place(config, env, check=check_resources)
        if placed is None:
            if config.gpu_memory_utilization == AUTO:
                config = config.model_copy(update={"gpu_memory_utilization": None})
            if check_resources:
                check = preflight(config, environ=environ)
                if check.status == "skipped" and on_notice is not None:
                    on_notice(f"memory check skipped: {check.reason}")
            return config
        if placed.status == "skipped" and on_notice is not None:
            on_notice(f"memory check skipped: {placed.skipped}")
        return placed.config

    @staticmethod
    def _check_joinable(existing: ServerStatus, foreground: bool) -> None:
        """Refuse to join a server that is stopping, or one wanted in the foreground here."""
        assert existing.record is not None
        name = existing.name
        if existing.state == State.DRAINING:
            raise ConflictError(f"server {name!r} is stopping; try again when it has stopped")
        if foreground:
            raise ConflictError(
                f"server {name!r} already runs (pid {existing.record.pid})",
                hint=f"stop it first (cmw-vllm stop {name}) to run it in the foreground",
            )

    @staticmethod
    def _check_same_server(record: ServerRecord, config: ServerConfig,
                           requested: Collection[str], auto_port: bool) -> None:
        """Refuse a start whose model or explicitly requested settings differ from the running
        server's (rather than report "already running" and ignore them)."""
        from cmw_vllm.server_launch import differing_settings

        name = config.name
        if record.model != config.model:
            raise ConflictError(
                f"server {name!r} already runs {record.model}",
                hint=f"stop it first (cmw-vllm stop {name}) or use --name",
            )
        ignore = {"port"} if auto_port else set()
        differ = differing_settings(record.config, config, set(requested) - ignore)
        if differ:
            raise ConflictError(
                f"server {name!r} already runs with other settings: {'; '.join(differ)}",
                hint=f"to apply them, stop it (cmw-vllm stop {name}) and start it again with "
                "them; or pick another --name",
            )

    def _cleanup_dead(self, name: str, status: ServerStatus) -> None:
        """Remove what a dead server left: its supervisor, orphans of its group, its files."""
        if status.record is not None:
            self._kill_server(status.record, kill_timeout=5.0)
        _remove_server_files(name)

    def _choose_port(
        self, config: ServerConfig, auto_port: bool
    ) -> tuple[ServerConfig, int | None]:
        taken_by_ours = {}
        for other in record_names():
            if other == config.name:
                continue
            st = observe(other)
            if st.running and st.record is not None:
                taken_by_ours[st.record.port] = other
        port = config.port
        for _attempt in range(200):
            holder: str | None = None
            if port in taken_by_ours:
                holder = f"cmw-vllm server {taken_by_ours[port]!r}"
            elif not port_is_free(config.host, port):
                holder = describe_port_holder(config.host, port) or "another process"
            if holder is None:
                if port != config.port:
                    return config.model_copy(update={"port": port}), config.port
                return config, None
            if not auto_port:
                raise ConflictError(
                    f"port {port} is in use by {holder}",
                    hint="choose another with --port, or pass --auto-port",
                )
            port += 1
            if port > PORT_MAX:
                break
        raise ConflictError(f"no free port found from {config.port}")

    def _launch(self, config: ServerConfig, api_key: str | None, foreground: bool = False, *,
                python: str | None = None, environ: Mapping[str, str] | None = None,
                started_by: str | None = None
                ) -> tuple[ServerRecord, Any, dict[str, str] | None]:
        """Spawn vLLM under a supervisor (or, in the foreground, as our child); write the
        record and the restart files (with the interpreter and the kept variables of
        ``environ``, default ``os.environ``).

        Returns:
            The record; in the foreground also the vLLM ``Popen`` and its environment.

        Raises:
            ConfigError: A setting of the supervisor is not a number.
            EnvironmentProblem: vLLM missing, the log or record cannot be written.
            ServerStartError: The supervisor did not get vLLM running.
        """
        from cmw_vllm import last_start
        from cmw_vllm.server_launch import engine_command, open_fresh_log, spawn, spawn_here
        from cmw_vllm.supervisor import check_settings

        check_settings()
        base = os.environ if environ is None else environ
        command, env = engine_command(config, api_key, python=python, environ=base)
        from cmw_vllm.multinode import launch_env

        network = launch_env(config, env)
        follower = config.role == "follower"
        log_file = open_fresh_log(log_path(config.name))
        exit_file = exit_path(config.name)
        _remove(exit_file)
        process = None
        if foreground:
            sup, child, process = spawn_here(command, env)
        else:
            sup, child = spawn(config.name, command, env, log_file)
        record = ServerRecord(
            name=config.name,
            pid=child.pid,
            create_time=child.create_time(),
            supervisor_pid=sup.pid,
            supervisor_create_time=sup.create_time(),
            pgid=child.pid,  # vLLM leads a session of its own
            host=config.host,
            port=0 if follower else config.port,
            model=config.model,
            served_model_name=config.served_name(),
            served_names=config.served_names(),
            task=config.task,
            base_url="" if follower else config.base_url(),
            command=command,
            log_path=str(log_file),
            started_at=time.time(),
            config=config.model_dump(mode="json"),
            role=config.role,
            node_rank=config.distributed.rank if config.distributed else 0,
            leader=network.get("leader"),
            host_ip=network.get("VLLM_HOST_IP"),
            foreground=foreground,
            started_by=started_by,
        )
        try:
            self._save(record)
            last_start.save(config.name, record.config, api_key,
                            last_start.KeptStart(python=command[0], environ=dict(base)))
        except CmwVllmError:
            self._kill_server(record, kill_timeout=5.0)
            _remove(record_path(record.name), pid_path(record.name))
            if foreground:
                from cmw_vllm.supervisor import release_held_signals

                release_held_signals()
            raise
        return record, process, (env if foreground else None)

    @staticmethod
    def _save(record: ServerRecord) -> None:
        save_record(record)

    def wait_ready(
        self,
        record: ServerRecord,
        timeout: float,
        on_progress: ProgressCallback | None = None,
    ) -> float:
        """Wait until ``/health`` answers 200 while the process lives.

        Returns:
            Seconds since the server was started.

        Raises:
            ServerStartError: The process exited first (its record is removed).
            StartTimeoutError: ``timeout`` passed; the server is left running.
        """
        from cmw_vllm.health_check import probe_health
        from cmw_vllm.vllm_engine import detect_phase

        begin = time.monotonic()
        deadline = begin + timeout
        phase = "starting vLLM"
        log_offset = 0
        log_file = Path(record.log_path)
        exit_file = exit_path(record.name)
        proc = is_ours(record)
        follower = record.role == "follower"
        while True:
            if proc is None or not proc.is_running() or exit_file.exists():
                self._fail_start(record)
            if follower:
                code = 200 if follower_joined(record) else None
            else:
                code = probe_health(record.base_url, min(self.health_timeout, 1.0))
            if code == 200:
                self._mark_ready(record)
                if on_progress:
                    on_progress("ready", time.monotonic() - begin)
                return time.time() - record.started_at
            try:
                with log_file.open("rb") as fh:
                    fh.seek(log_offset)
                    chunk = fh.read()
                    log_offset += len(chunk)
                if chunk:
                    phase = detect_phase(chunk.decode("utf-8", errors="replace"), phase)
                    if follower and phase == "starting vLLM":
                        phase = f"joining the leader at {record.leader}"
            except OSError:
                pass
            if on_progress:
                on_progress(phase, time.monotonic() - begin)
            if time.monotonic() >= deadline:
                raise StartTimeoutError(
                    f"server {record.name!r} is not ready after {timeout:g}s (phase: {phase})",
                    hint=f"it keeps starting; watch `cmw-vllm logs {record.name} -f` or "
                    f"`cmw-vllm stop {record.name}`",
                )
            time.sleep(self.poll_interval)

    def _mark_ready(self, record: ServerRecord) -> None:
        if record.ready_at is not None:
            return
        # vLLM has made its shared memory by now; the supervisor notes it too, but a crash
        # right after the start could come before its next look.
        from cmw_vllm.shm_segments import note

        note(record.name, [p.pid for p in group_members(record)])
        record.ready_at = time.time()
        with contextlib.suppress(CmwVllmError):
            update_record(record.name, record.supervisor_pid, ready_at=record.ready_at,
                          only_pid=record.pid)

    def _fail_start(self, record: ServerRecord) -> None:
        """vLLM exited during start-up: reap what is left, remove the record, say why."""
        from cmw_vllm.engine_entry.cmw_leader_watch import EXIT_LEADER_UNREACHABLE
        from cmw_vllm.vllm_engine import (
            INSTALL_HINT,
            VLLM_MISSING_EXIT,
            diagnose_start,
            failure_excerpt,
            tail_lines,
        )

        log_file = Path(record.log_path)
        # The supervisor writes the exit file right after vLLM exits; give it a moment.
        for _ in range(20):
            if exit_path(record.name).exists():
                break
            time.sleep(0.02)
        exit_info = read_exit(record.name) or {}
        rc = exit_info.get("returncode")
        text = "\n".join(tail_lines(log_file, 2000))
        left = ""
        try:
            with _name_lock(record.name, timeout=10):
                current = None
                with contextlib.suppress(ValueError):
                    current = read_record(record.name)
                if current is not None and current.supervisor_pid == record.supervisor_pid:
                    # Also ends a supervisor about to relaunch it (restart policy).
                    self._kill_server(record, kill_timeout=5.0)
                    _remove_server_files(record.name)
        except ConflictError:
            # Another command holds the name (a stop, most likely): it cleans up; say so.
            logger.warning("%s: lock busy, left the clean-up to the command holding it",
                           record.name)
            left = f" (its record is left: cmw-vllm stop {record.name} removes it)"
        rc_text = f" (exit code {rc})" if rc is not None else ""
        if rc == VLLM_MISSING_EXIT and "No module named 'vllm'" in text:
            raise EnvironmentProblem(f"vLLM is not installed in {record.command[0]}{left}",
                                     hint=INSTALL_HINT)
        hint = diagnose_start(text, record.model)
        if rc == EXIT_LEADER_UNREACHABLE and hint and "the leader" in hint:
            # The follower's leader watch gave up: its one line says it all.
            raise ServerStartError(f"{hint}; log: {log_file}{left}")
        raise ServerStartError(
            f"vLLM exited during start-up{rc_text}; log: {log_file}{left}",
            hint=hint,
            log_tail="\n".join(failure_excerpt(text)),
        )

    # ----------------------------------------------------------------- stop

    def stop(
        self,
        name: str,
        timeout: float | None = None,
        kill_timeout: float = 10.0,
        *,
        drain: float | None = None,
        now: bool = False,
    ) -> StopResult:
        """Stop server ``name``, letting requests in flight finish, and confirm it is gone.

        The API server alone gets SIGTERM (a group-wide one would kill tensor-parallel
        workers at once), and vLLM drains for as long as it was launched to (its
        ``--shutdown-timeout``, the server's ``drain``) while refusing new requests; the
        record says ``draining`` meanwhile, since ``/health`` stays 200. Whatever is left of
        the server's group and its supervisor after the drain plus ``timeout`` gets SIGKILL.
        A process whose create time or command line does not match the record is never
        signalled; such a record is stale and is removed.

        Args:
            name: Server name.
            timeout: Seconds vLLM gets to exit after the drain before SIGKILL (default
                ``CMW_VLLM_STOP_TIMEOUT``).
            kill_timeout: Seconds to wait for the processes to vanish after SIGKILL.
            drain: Seconds requests in flight may still take (at most the server's own
                drain); None: the server's drain.
            now: Abort requests in flight: SIGKILL everything at once.

        Raises:
            ServerNotRunningError: No server, kept settings or registry entry has that name.
            ConfigError: No server has that name and the models file is invalid.
            StopError: Processes of the server survived SIGKILL.
        """
        from cmw_vllm.settings import stop_timeout

        validate_name(name)
        margin = stop_timeout() if timeout is None else timeout
        begin = time.monotonic()
        with _name_lock(name):
            status = observe(name)
            if status.record is None:
                if status.state == State.INVALID and status.error != "no record":
                    _remove_server_files(name)
                    why = (status.error or "").removeprefix(BAD_RECORD)
                    return StopResult(name=name, was_running=False, invalid=why)
                from cmw_vllm.server_launch import check_known_name

                check_known_name(name, record_names())
                return StopResult(name=name, was_running=False)
            record = status.record
            result = StopResult(name=name, was_running=status.running,
                                stale=status.state == State.STALE)
            forced, killed, remaining = self._stop_processes(record, margin, kill_timeout,
                                                             drain, now)
            result.forced, result.killed_pids, result.remaining_pids = forced, killed, remaining
            if remaining:
                raise StopError(
                    f"processes of {name!r} survived SIGKILL: "
                    + ", ".join(str(p) for p in remaining)
                )
            _remove_server_files(name)
        result.duration_s = time.monotonic() - begin
        return result

    def _stop_processes(
        self,
        record: ServerRecord,
        margin: float,
        kill_timeout: float,
        drain: float | None,
        now: bool,
    ) -> tuple[bool, list[int], list[int]]:
        """Ask the supervisor and the API server to stop; SIGKILL what is left at the deadline.

        Returns:
            (forced, pids that got SIGKILL, pids still alive afterwards).
        """
        import signal  # not at the top: `status` never signals, and the import costs

        main = is_ours(record)
        sup = supervisor_process(record)
        if main is None or now:
            drain_s = 0.0
        else:
            drain_s = float(record.drain if drain is None else min(drain, record.drain))
        # Without a live API server there is nothing to drain: leftovers get SIGKILL at once,
        # a supervisor waiting to restart gets the margin to end its loop.
        grace = 0.0 if now or (main is None and sup is None) else drain_s + margin
        if main is not None or sup is not None:
            t = time.time()
            update_record(record.name, record.supervisor_pid, stop_requested_at=t,
                          drain_until=t + drain_s, kill_at=t + grace)
        # Checked once the record says draining (the gateway sends it nothing more); see
        # _skip_idle_teardown for why a request that comes in after the check is safe.
        watch = _log_size(record) if main is not None and drain_s > 0 and not now \
            and record.task != GATEWAY_TASK and _idle(record) else None
        if not now:
            # The supervisor forwards SIGTERM too (vLLM ignores the second one); telling it
            # first keeps it from taking the exit for a crash, and ends a backoff wait.
            # A gateway is its own supervisor: one SIGTERM per process.
            if sup is not None and (main is None or sup.pid != main.pid):
                send_signal(sup, signal.SIGTERM)
            if main is not None:
                send_signal(main, signal.SIGTERM)
        deadline = time.monotonic() + grace
        watch_until = time.monotonic() + min(grace, IDLE_CONFIRM_S)
        alive = self._server_processes(record)
        while alive and time.monotonic() < deadline:
            if watch is not None and main is not None and (
                    self._skip_idle_teardown(record, main, watch) is not None
                    or time.monotonic() >= watch_until):
                watch = None
            time.sleep(0.05)
            alive = self._server_processes(record)
        if not alive:
            return False, [], []
        killed, remaining = self._kill_server(record, kill_timeout)
        return True, killed, remaining

    @staticmethod
    def _skip_idle_teardown(record: ServerRecord, main: psutil.Process, offset: int
                            ) -> bool | None:
        """On an idle server, end vLLM's engine once it confirms it has nothing to drain.

        With ``--shutdown-timeout`` > 0 vLLM's EngineCore tears down its workers gracefully
        after a drain, which takes seconds even when nothing was in flight. ``/metrics``
        said idle before the SIGTERM, but a request may come in between that check and
        the signal (or be counted late: the gauges change once per engine step). So the
        engine's own word decides: once the SIGTERM reaches it, it answers every new
        request with an abort, and it logs whether it had requests in flight then. Only
        when it had none are EngineCore and its workers SIGKILLed, which is what vLLM
        does itself without a drain timeout (SIGTERM, then the kill of its process tree);
        a request that came in meanwhile is drained as on a busy server. The shared memory
        the killed processes map (their teardown would have removed it) is noted first, so
        that the stop removes it once they are gone (:mod:`cmw_vllm.shm_segments`).

        Returns:
            True: the engine had nothing in flight and was killed; False: it is draining
            requests; None: it has not said yet.
        """
        import signal

        from cmw_vllm.vllm_engine import nothing_to_drain

        # multiprocessing's resource trackers stay: once the processes they track are gone
        # they remove what those left registered (semaphores, shared memory) and exit.
        engine = [p for p in group_members(record)
                  if p.pid != main.pid and not _is_resource_tracker(p)]
        verdict = nothing_to_drain(_read_log_from(record, offset),
                                   sum(1 for p in engine if _is_engine_core(p)))
        if verdict is True:
            logger.info("%s: no request was in flight: skipping vLLM's engine teardown",
                        record.name)
            from cmw_vllm.shm_segments import note

            note(record.name, [p.pid for p in engine])
            for proc in engine:
                send_signal(proc, getattr(signal, "SIGKILL", signal.SIGTERM))
        elif verdict is False:
            logger.info("%s: requests came in before the stop: draining them", record.name)
        return verdict

    @staticmethod
    def _server_processes(record: ServerRecord) -> list[psutil.Process]:
        """The live supervisor and process-group members of the server (any of its runs)."""
        procs: dict[int, psutil.Process] = {}
        sup = supervisor_process(record)
        if sup is not None:
            procs[sup.pid] = sup
        records = [record]
        with contextlib.suppress(ValueError):
            current = read_record(record.name)
            if current is not None and current.supervisor_pid == record.supervisor_pid \
                    and current.pgid != record.pgid:
                records.append(current)  # the supervisor relaunched it meanwhile
        for rec in records:
            main = is_ours(rec)
            for proc in group_members(rec) + ([main] if main is not None else []):
                procs.setdefault(proc.pid, proc)
        return list(procs.values())

    def _kill_server(self, record: ServerRecord, kill_timeout: float
                     ) -> tuple[list[int], list[int]]:
        """SIGKILL the supervisor first (so nothing is relaunched), then the server's groups.

        Returns:
            (pids that got SIGKILL, pids still alive afterwards).
        """
        import signal

        sigkill = getattr(signal, "SIGKILL", signal.SIGTERM)
        killed: list[int] = []
        remaining: list[psutil.Process] = []
        sup = supervisor_process(record)
        if sup is not None:
            send_signal(sup, sigkill)
            killed.append(sup.pid)
            remaining += wait_gone([sup], kill_timeout)
        # What the processes map is noted now: after the SIGKILL nothing tells it any more.
        from cmw_vllm.shm_segments import note

        note(record.name, [p.pid for p in self._server_processes(record)])
        # Two sweeps: children forked between the listing and the kill are caught by the second.
        for _sweep in range(2):
            alive = [p for p in self._server_processes(record) if p.pid not in killed]
            for proc in alive:
                send_signal(proc, sigkill)
                killed.append(proc.pid)
            remaining += wait_gone(alive, kill_timeout)
        return killed, [p.pid for p in remaining]

    def stop_all(self, timeout: float | None = None, *, drain: float | None = None,
                 now: bool = False) -> list[StopResult]:
        """Stop every managed server (see :meth:`stop`)."""
        return [self.stop(name, timeout, drain=drain, now=now) for name in record_names()]

    # ----------------------------------------------------------------- restart

    def restart(
        self,
        name: str,
        *,
        wait: bool = True,
        timeout: float | None = None,
        on_progress: ProgressCallback | None = None,
        drain: float | None = None,
        check_resources: bool = True,
        on_notice: Callable[[str], None] | None = None,
    ) -> StartResult:
        """Stop ``name`` (if it runs; draining, see :meth:`stop`) and start it again as its
        last start did.

        What shaped the last start is kept after ``stop`` (:mod:`cmw_vllm.last_start`), so a
        stopped server can be restarted too: its settings, the engine interpreter and the
        ``VLLM_*``/``CMW_VLLM_*``/``HF_*`` variables then in effect, which win over this
        shell's (as in a systemd unit; new values take a ``stop`` and a ``start``). The API
        key is the environment's ``VLLM_API_KEY`` when set, else the one it was started
        with: a server started with a key never comes back without one.

        Everything that can be checked is checked before the server is stopped: the
        interpreter has vLLM, the port is free (when the server does not hold it), the model
        can be found and it fits (the memory the running server holds counts as free). A
        refusal leaves the running server as it was.

        Args:
            name: Server name.
            wait: Wait until the new server is ready.
            timeout: Seconds to wait (default ``CMW_VLLM_START_TIMEOUT``).
            on_progress: Called with (phase, elapsed seconds) while waiting.
            drain: Seconds requests in flight may take while it stops (see :meth:`stop`).
            check_resources: Run the memory check (see :meth:`start`).
            on_notice: Called with a line the user should see: variables of this shell that
                the restart does not use, a skipped memory check.

        Raises:
            ServerNotRunningError: ``name`` was never started here.
            GatewayNotServerError: ``name`` is a gateway (its record or kept settings say so).
            UsageError: Its record is unreadable, or the kept settings no longer validate.
            EnvironmentProblem: The kept API key or environment cannot be read; the kept
                interpreter has no vLLM.
            InsufficientResourcesError: The memory check refused.
            ConflictError: The port is held by something else.
        """
        from pydantic import ValidationError

        from cmw_vllm import last_start
        from cmw_vllm.server_config import ServerConfig

        validate_name(name)
        try:
            record = read_record(name)
        except ValueError as exc:
            raise UsageError(
                f"cannot restart {name!r}: its record is unreadable ({exc})",
                hint=f"`cmw-vllm stop {name}` removes it; then start the server again",
            ) from None
        settings = record.config if record is not None else last_start.load_settings(name)
        if settings is None:
            raise ServerNotRunningError(
                f"no managed server named {name!r}",
                hint=f"start it first: cmw-vllm start MODEL --name {name}",
            )
        task = record.task if record is not None else settings.get("task")
        if task == GATEWAY_TASK:
            raise GatewayNotServerError(
                f"cannot restart {name!r} as a vLLM server: it is a gateway",
                hint=f"`cmw-vllm restart {name}` runs it again (in Python: "
                "cmw_vllm.gateway.service.restart)",
            )
        try:
            config = ServerConfig(**settings)
        except (ValidationError, TypeError) as exc:
            raise UsageError(
                f"cannot restart {name!r}: its kept settings are invalid ({exc})",
                hint="start it again with cmw-vllm start",
            ) from None
        if config.lora is not None:
            # The adapters declared now answer again, those loaded at run time included.
            from cmw_vllm.lora_adapters import refreshed

            config = config.model_copy(update={"lora": refreshed(config.lora, config.name)})
        api_key = last_start.api_key_for_restart(name)
        python, environ = _restart_environment(name, record, on_notice)
        self._check_restart(config, record, python, environ, check_resources, on_notice)
        if record is not None:
            self.stop(name, drain=drain)
        return self.start(config, wait=wait, timeout=timeout, on_progress=on_progress,
                          check_resources=False, api_key=api_key, python=python,
                          environ=environ)

    def _check_restart(self, config: ServerConfig, record: ServerRecord | None, python: str,
                       environ: Mapping[str, str], check_resources: bool,
                       on_notice: Callable[[str], None] | None) -> None:
        """What ``start`` would refuse, checked before a restart stops anything.

        Raises:
            EnvironmentProblem: ``python`` has no vLLM.
            ConflictError: The port is held by something other than this server.
            InsufficientResourcesError: The memory check refused.
            NotFoundError: The model cannot be found.
            ModelUnavailableError: The model is neither on disk nor cached and the Hub
                cannot be asked.
        """
        from cmw_vllm.vllm_engine import check_engine_python

        check_engine_python(python)
        status = observe(config.name)
        running = status.running and status.record is not None
        if config.role != "follower" and not running:
            self._choose_port(config, auto_port=False)
        if not check_resources:
            return
        from cmw_vllm.memory_check import preflight

        gpus, ram_freed = _memory_held(status.record if running else None)
        with _hub_environ(environ):
            check = preflight(config, gpus=gpus, environ=environ, ram_freed=ram_freed)
        if check.status == "skipped" and on_notice is not None:
            on_notice(f"memory check skipped: {check.reason}")


def _restart_environment(name: str, record: ServerRecord | None,
                         on_notice: Callable[[str], None] | None
                         ) -> tuple[str, dict[str, str]]:
    """The interpreter and environment a restart of ``name`` uses: those of its last start.

    A start by an older cmw-vllm kept neither: then the record's interpreter (else the one
    found here) and this environment.

    Raises:
        EnvironmentProblem: The kept file cannot be read; no interpreter with vLLM.
    """
    from cmw_vllm import last_start

    kept = last_start.load_kept(name)
    if kept is None:
        from cmw_vllm.vllm_engine import find_engine_python

        python = record.command[0] if record is not None and record.command else None
        return python or find_engine_python(), dict(os.environ)
    environ, ignored = last_start.restart_environ(os.environ, kept)
    if ignored and on_notice is not None:
        on_notice(
            f"restart keeps the environment of the last start of {name!r}; not used from "
            f"here: {', '.join(ignored)} (to apply them: cmw-vllm stop {name}, then "
            "cmw-vllm start with them)"
        )
    return kept.python, environ


def _memory_held(record: ServerRecord | None) -> tuple[list[GpuInfo] | None, int]:
    """The GPUs with the memory ``record``'s server holds counted free, and the RAM it holds
    (private memory of its processes); (None, 0) without a server."""
    if record is None:
        return None, 0
    import dataclasses

    import psutil

    from cmw_vllm.gpu_info import query_gpus

    report = query_gpus([record])
    gpus = []
    for gpu in report.gpus:
        held = sum(p.used_memory or 0 for p in gpu.processes if p.server == record.name)
        free = gpu.memory_free
        if held and free is not None:
            free = min(gpu.memory_total or free + held, free + held)
        gpus.append(dataclasses.replace(gpu, memory_free=free))
    ram = 0
    for proc in ServerManager._server_processes(record):
        with contextlib.suppress(psutil.Error):
            info = proc.memory_info()
            ram += max(0, info.rss - getattr(info, "shared", 0))
    return gpus, ram


@contextlib.contextmanager
def _hub_environ(environ: Mapping[str, str]) -> Iterator[None]:
    """Let the Hub settings of ``environ`` (``HF_*``) stand in ``os.environ`` meanwhile, so
    that the model is looked up in the cache and Hub the engine will use."""
    names = {k for k in (*os.environ, *environ) if k.startswith(("HF_", "HUGGING_FACE_"))}
    saved = {k: os.environ.get(k) for k in names}
    try:
        for key in names:
            if key in environ:
                os.environ[key] = environ[key]
            else:
                os.environ.pop(key, None)
        yield
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


def _has_api_key(record: ServerRecord) -> bool:
    """Whether the running server was started with an API key (its key file exists)."""
    from cmw_vllm import last_start

    return last_start.key_path(record.name).exists()


def running_models() -> dict[str, list[str]]:
    """Model id -> names of managed servers whose process is alive (no health checks)."""
    out: dict[str, list[str]] = {}
    for status in ServerManager().list_status(check_health=False):
        if status.running and status.record is not None:
            out.setdefault(status.record.model, []).append(status.name)
    return out

