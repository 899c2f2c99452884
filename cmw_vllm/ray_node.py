"""A Ray node as a managed service: ``ray start --block`` with a record, a log and a stop.

vLLM's Ray executor (``--distributed-executor-backend ray``) places its workers on a Ray
cluster: ``cmw-vllm ray start --head`` on one machine, ``cmw-vllm ray start --address
HEAD:PORT`` on the others, then ``cmw-vllm start ... --distributed-executor-backend ray`` on
the head, which hands vLLM the cluster's address (``RAY_ADDRESS``).

One Ray node per state dir. ``ray start --block`` runs in a session of its own; Ray's
processes (GCS, raylet, agents) stay in its process group, so ``stop`` sends SIGTERM to it
(Ray ends its processes) and then SIGKILL to whatever of the group is left, never anything
else (``ray stop`` would end every Ray process of the machine). State: ``ray/node.json``
(a :class:`~cmw_vllm.server_record.ServerRecord`) and ``logs/ray.log``; the head's session
files go in ``/tmp/cmw-ray-<hash of the state dir>``, removed by ``stop``.

Token authentication (Ray 2.5x and later): ``ray start`` turns it on by itself when a token
is at hand (``RAY_AUTH_TOKEN``, ``RAY_AUTH_TOKEN_PATH`` or ``~/.ray/auth_token``), but a
driver given an explicit address (``ray status``'s query, vLLM with ``RAY_ADDRESS``) never
does, and is refused. So the node is started with ``RAY_AUTH_MODE`` set (the user's, or
``token`` when a token is at hand, else ``disabled``), the record keeps it, and every
driver of ours runs with the same mode.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import shutil
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from cmw_vllm import paths
from cmw_vllm.errors import (
    CmwVllmError,
    ConfigError,
    ConflictError,
    EnvironmentProblem,
    ServerStartError,
    StartTimeoutError,
    StopError,
)
from cmw_vllm.server_record import ServerRecord
from cmw_vllm.vocab import RAY_TASK

if TYPE_CHECKING:
    import psutil

logger = logging.getLogger(__name__)

NAME = "ray"
DEFAULT_PORT = 6379
READY_LINE = "Ray runtime started"
INSTALL_HINT = "install Ray: pip install 'cmw-vllm[ray]' (and `pip install ray` in vLLM's env)"
AUTH_MODE_ENV = "RAY_AUTH_MODE"


@dataclass
class RayNodeStatus:
    """This machine's managed Ray node and, when it runs, the cluster it sees."""

    state: str  # running, exited, none
    record: ServerRecord | None = None
    nodes: list[dict[str, Any]] = field(default_factory=list)
    error: str | None = None

    def to_json(self) -> dict[str, Any]:
        """Stable JSON shape for ``ray status --json``."""
        rec = self.record
        return {
            "state": self.state,
            "role": rec.role if rec else None,
            "pid": rec.pid if rec else None,
            "node_ip": rec.host_ip if rec else None,
            "address": rec.leader if rec else None,
            "log": rec.log_path if rec else None,
            "nodes": self.nodes,
            "error": self.error,
        }


def _dir() -> Path:
    return paths.state_dir() / "ray"


def record_file() -> Path:
    """Where the record of this machine's Ray node lies."""
    return _dir() / "node.json"


def log_file() -> Path:
    """The Ray node's log (``ray start``'s output)."""
    return paths.logs_dir() / "ray.log"


def find_ray() -> str:
    """The ``ray`` command: beside vLLM's interpreter, beside this one, or on PATH.

    Raises:
        EnvironmentProblem: Ray is not installed.
    """
    candidates = []
    engine = os.environ.get("CMW_VLLM_PYTHON")
    if engine:
        candidates.append(Path(shutil.which(engine) or engine).parent / "ray")
    candidates.append(Path(sys.executable).parent / "ray")
    for candidate in candidates:
        if candidate.is_file() and os.access(candidate, os.X_OK):
            return str(candidate)
    found = shutil.which("ray")
    if found:
        return found
    raise EnvironmentProblem("Ray is not installed", hint=INSTALL_HINT)


def read_node() -> ServerRecord | None:
    """The record of this machine's Ray node, or None."""
    try:
        return ServerRecord.from_json(json.loads(record_file().read_text(encoding="utf-8")))
    except FileNotFoundError:
        return None
    except (OSError, ValueError) as exc:
        logger.warning("unreadable Ray node record: %s", exc)
        return None


def _alive(record: ServerRecord) -> bool:
    from cmw_vllm.process_group import process as _process

    return _process(record.pid, record.create_time) is not None


def _node_ip(head: bool, address: str | None, given: str | None) -> str:
    from cmw_vllm.multinode import local_addresses, route_source

    addrs = local_addresses()
    if given:
        if given not in addrs:
            raise ConfigError(f"--node-ip-address {given} is not an address of this machine")
        return given
    if address:
        return route_source(address.rsplit(":", 1)[0].strip("[]"))
    outside = sorted(a for a in addrs if ":" not in a and not a.startswith("127."))
    if len(outside) == 1:
        return outside[0]
    raise ConfigError("give --node-ip-address: this machine has "
                      f"{len(outside) or 'no'} non-loopback addresses "
                      f"({', '.join(outside) or 'none'})")


def auth_mode(environ: dict[str, str] | None = None) -> str:
    """The ``RAY_AUTH_MODE`` a node started now gets: the one set, else what ``ray start``
    would pick by itself (``token`` when a token is at hand, else ``disabled``)."""
    env = os.environ if environ is None else environ
    mode = (env.get(AUTH_MODE_ENV) or "").strip().lower()
    if mode:
        return mode
    token_file = env.get("RAY_AUTH_TOKEN_PATH")
    has_token = bool((env.get("RAY_AUTH_TOKEN") or "").strip()) or (
        Path(token_file).is_file() if token_file
        else (Path.home() / ".ray" / "auth_token").is_file())
    return "token" if has_token else "disabled"


def driver_env(record: ServerRecord | None = None) -> dict[str, str]:
    """What a Ray driver of this node's cluster needs besides the address: the node's
    authentication mode (recorded at its start; nodes of older versions: as it would be
    picked now)."""
    mode = (record.config.get("auth_mode") if record is not None else None) or auth_mode()
    return {AUTH_MODE_ENV: str(mode)}


def _temp_dir() -> str:
    # Ray puts unix sockets under it: keep the path short (a socket path has 107 bytes).
    digest = hashlib.sha1(str(paths.state_dir().resolve()).encode()).hexdigest()[:10]
    return f"/tmp/cmw-ray-{digest}"


def start_node(*, head: bool, address: str | None = None, port: int = DEFAULT_PORT,
               node_ip: str | None = None, ray_args: list[str] | None = None,
               timeout: float = 120.0) -> tuple[ServerRecord, bool]:
    """Start this machine's Ray node (head, or a worker joining ``address``) and wait for it.

    Returns:
        (record, already_running).

    Raises:
        ConfigError: Neither or both of head and address; a bad node address.
        ConflictError: A Ray node of the other kind already runs here.
        EnvironmentProblem: Ray is not installed; no route to the head.
        ServerStartError: ``ray start`` exited (its log tail and last error line).
        StartTimeoutError: Not started within ``timeout``; it is stopped again.
    """
    if head == bool(address):
        raise ConfigError("give --head (first node) or --address HEAD:PORT (the others)")
    role = "ray-head" if head else "ray-worker"
    existing = read_node()
    if existing is not None and _alive(existing):
        if existing.role != role:
            raise ConflictError(f"a {existing.role} already runs here (pid {existing.pid})",
                                hint="cmw-vllm ray stop")
        return existing, True
    ray = find_ray()
    ip = _node_ip(head, address, node_ip)
    cmd = [ray, "start", "--block", f"--node-ip-address={ip}", "--disable-usage-stats"]
    if head:
        cmd += ["--head", f"--port={port}", "--include-dashboard=false",
                f"--temp-dir={_temp_dir()}"]
        cluster = f"{ip}:{port}"
    else:
        cmd += [f"--address={address}"]
        cluster = str(address)
    cmd += list(ray_args or [])
    for d in (paths.state_dir(), _dir(), paths.logs_dir()):
        paths.ensure_dir(d)
    record = _spawn(cmd, role, ip, cluster, auth_mode())
    _wait_started(record, timeout)
    return record, False


def _spawn(cmd: list[str], role: str, ip: str, cluster: str, mode: str) -> ServerRecord:
    import psutil

    log = log_file()
    if log.is_symlink():
        raise EnvironmentProblem(f"{log} is a symlink; refusing to write through it")
    flags = os.O_WRONLY | os.O_CREAT | os.O_TRUNC | getattr(os, "O_NOFOLLOW", 0)
    fd = os.open(log, flags, 0o600)
    env = {**os.environ, "RAY_USAGE_STATS_ENABLED": "0", AUTH_MODE_ENV: mode}
    try:
        proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=fd,
                                stderr=subprocess.STDOUT, env=env, start_new_session=True,
                                cwd=str(paths.state_dir()), close_fds=True)
    finally:
        os.close(fd)
    created = psutil.Process(proc.pid).create_time()
    record = ServerRecord(
        name=NAME, pid=proc.pid, create_time=created, supervisor_pid=proc.pid,
        supervisor_create_time=created, pgid=proc.pid, host=ip,
        port=int(cluster.rsplit(":", 1)[1]), model="ray", served_model_name="", task=RAY_TASK,
        base_url="", command=cmd, log_path=str(log), started_at=time.time(),
        config={"auth_mode": mode},
        role=role, leader=cluster, host_ip=ip,
    )
    paths.write_private(record_file(), json.dumps(asdict(record), indent=2) + "\n")
    return record


def _wait_started(record: ServerRecord, timeout: float) -> None:
    from cmw_vllm.vllm_engine import tail_lines

    deadline = time.monotonic() + timeout
    log = Path(record.log_path)
    while time.monotonic() < deadline:
        text = "\n".join(tail_lines(log, 400))
        if READY_LINE in text:
            return
        if not _alive(record):
            stop_node()
            errors = [line for line in text.splitlines() if "Error" in line]
            raise ServerStartError("ray start exited", hint=errors[-1] if errors else None,
                                   log_tail="\n".join(tail_lines(log, 15)))
        time.sleep(0.2)
    stop_node()
    raise StartTimeoutError(f"the Ray node did not start within {timeout:g}s; log: {log}")


def cluster_nodes(record: ServerRecord, timeout: float = 60.0) -> list[dict[str, Any]]:
    """The Ray cluster's nodes (address, alive, CPUs, GPUs), asked as a Ray driver.

    Raises:
        EnvironmentProblem: The cluster did not answer in time.
    """
    ray = Path(record.command[0])
    python = _script_python(ray)
    code = (
        "import json, ray\n"
        f"ray.init(address={record.leader!r}, logging_level='ERROR', log_to_driver=False)\n"
        "print(json.dumps([{'node_ip': n['NodeManagerAddress'], 'alive': n['Alive'],\n"
        "  'cpus': n['Resources'].get('CPU', 0), 'gpus': n['Resources'].get('GPU', 0)}\n"
        "  for n in ray.nodes()]))\n"
    )
    env = {**os.environ, "RAY_USAGE_STATS_ENABLED": "0", **driver_env(record)}
    try:
        proc = subprocess.run([python, "-c", code], capture_output=True, text=True,
                              timeout=timeout, env=env, check=False)
    except subprocess.TimeoutExpired:
        raise EnvironmentProblem(f"the Ray cluster at {record.leader} did not answer "
                                 f"within {timeout:g}s") from None
    lines = proc.stdout.strip().splitlines()
    if proc.returncode != 0 or not lines:
        last = (proc.stderr.strip().splitlines() or ["no output"])[-1]
        raise EnvironmentProblem(f"cannot ask the Ray cluster at {record.leader}: {last}")
    try:
        nodes = json.loads(lines[-1])
    except ValueError:
        raise EnvironmentProblem(f"cannot ask the Ray cluster at {record.leader}: "
                                 f"unexpected answer {lines[-1][:200]!r}") from None
    return sorted(nodes, key=lambda n: (not n["alive"], n["node_ip"]))


def _script_python(script: Path) -> str:
    with contextlib.suppress(OSError), script.open(encoding="utf-8", errors="replace") as fh:
        first = fh.readline().strip()
        if first.startswith("#!"):
            return first[2:].strip().split()[0]
    return sys.executable


def node_status(with_nodes: bool = True) -> RayNodeStatus:
    """This machine's Ray node, and the cluster's nodes when it runs."""
    record = read_node()
    if record is None:
        return RayNodeStatus(state="none")
    if not _alive(record):
        return RayNodeStatus(state="exited", record=record)
    status = RayNodeStatus(state="running", record=record)
    if with_nodes:
        try:
            status.nodes = cluster_nodes(record)
        except CmwVllmError as exc:
            status.error = exc.message
    return status


def stop_node(timeout: float = 30.0) -> tuple[bool, list[int]]:
    """Stop this machine's Ray node: SIGTERM, then SIGKILL what is left of its group.

    Returns:
        (whether it was running, the pids that needed SIGKILL).

    Raises:
        StopError: Processes of it survived SIGKILL.
    """
    from cmw_vllm.process_group import process as _process

    record = read_node()
    if record is None:
        return False, []
    main = _process(record.pid, record.create_time)
    killed, remaining = _terminate(record, main, timeout)
    if remaining:
        raise StopError("Ray processes survived SIGKILL: " + ", ".join(map(str, remaining)))
    if record.role == "ray-head":
        _remove_temp_dir(Path(_temp_dir()))
    with contextlib.suppress(FileNotFoundError):
        record_file().unlink()
    return main is not None, killed


def _remove_temp_dir(path: Path) -> None:
    """Remove the head's session files (sockets, logs, ports) once none of its processes run.

    The directory is this state dir's own (see :func:`_temp_dir`); one that is a link, or
    belongs to another user, is left alone.
    """
    try:
        info = path.lstat()
    except FileNotFoundError:
        return
    if not path.is_dir() or path.is_symlink() or info.st_uid != os.getuid():
        logger.warning("left %s alone: not a directory of this user", path)
        return
    shutil.rmtree(path, ignore_errors=True)
    if path.exists():
        logger.warning("could not remove all of %s", path)


def _terminate(record: ServerRecord, main: psutil.Process | None, timeout: float,
               kill_timeout: float = 10.0) -> tuple[list[int], list[int]]:
    """SIGTERM the node's main process, then SIGKILL whatever of its group is left.

    Returns:
        (pids that got SIGKILL, pids still alive afterwards).
    """
    import signal

    from cmw_vllm.process_group import group_members, send_signal, wait_gone

    members = group_members(record)
    if main is not None and all(m.pid != main.pid for m in members):
        members.append(main)
    if not members:
        return [], []
    if main is not None and timeout:
        send_signal(main, signal.SIGTERM)
        alive = wait_gone(members, timeout)
    else:
        alive = members
    sigkill = getattr(signal, "SIGKILL", signal.SIGTERM)
    killed: list[int] = []
    remaining: list[psutil.Process] = []
    # Two sweeps: children forked between the listing and the kill are caught by the second.
    for batch in (alive, None):
        procs = batch if batch is not None else [
            p for p in group_members(record) if p.pid not in killed]
        for proc in procs:
            send_signal(proc, sigkill)
            killed.append(proc.pid)
        remaining += wait_gone(procs, kill_timeout)
    return killed, [p.pid for p in remaining]


def ray_address() -> str | None:
    """The address of the Ray cluster this machine's managed node belongs to, if it runs."""
    record = read_node()
    return record.leader if record is not None and _alive(record) else None
