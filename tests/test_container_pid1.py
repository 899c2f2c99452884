"""``start --foreground`` as PID 1 of a container: it reaps orphans and stops on SIGTERM.

Each test runs ``cmw-vllm start ... --foreground`` as PID 1 of a new PID namespace
(``unshare --pid --fork --mount-proc``, root only) with the stand-in engine. In a
namespace, a process whose parent exits is re-parented to PID 1, and nobody else will ever
reap it: a zombie PID 1 leaves behind stays in the namespace's process table for as long as
PID 1 lives. The namespace's processes are read from the host's /proc (``ns/pid`` names the
namespace, ``NSpid`` gives a process's pid inside it).
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import subprocess
import sys
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from functools import cache
from pathlib import Path
from typing import Any

import pytest
import requests

from cmw_vllm import server_record as sr
from tests.conftest import free_port, notify_socket, wait_until


@cache
def _why_no_pid_namespace() -> str | None:
    """Why this machine cannot run a PID namespace here, or None when it can."""
    if not sys.platform.startswith("linux"):
        return "PID namespaces are Linux only"
    if os.geteuid() != 0:
        return "making a PID namespace (unshare --pid) needs root"
    unshare = shutil.which("unshare")
    if unshare is None:
        return "unshare (util-linux) is not installed"
    try:
        probe = subprocess.run([unshare, "--pid", "--fork", "--mount-proc", "true"],
                               capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.TimeoutExpired) as exc:
        return f"unshare --pid --fork --mount-proc does not run here: {exc}"
    if probe.returncode != 0:
        return f"unshare --pid --fork --mount-proc fails here: {probe.stderr.strip()}"
    return None


@pytest.fixture(autouse=True)
def _needs_pid_namespace() -> None:
    reason = _why_no_pid_namespace()
    if reason:
        pytest.skip(reason)


@dataclass(frozen=True)
class NsProcess:
    """A process of the namespace: its pid and parent's on the host, pid inside, state
    letter, argv."""

    host_pid: int
    host_ppid: int
    pid: int
    state: str
    cmdline: list[str]


class Container:
    """``cmw-vllm start MODEL --foreground`` as PID 1 of a PID namespace of its own."""

    def __init__(self, unshare: subprocess.Popen[str], pid1: int) -> None:
        self.unshare = unshare
        self.pid1 = pid1  # PID 1, as the host sees it
        self.namespace = os.readlink(f"/proc/{pid1}/ns/pid")

    @classmethod
    def start(cls, model_dir: Path, name: str, port: int, *extra: str,
              env: dict[str, str]) -> Container:
        def default_signals() -> None:
            signal.signal(signal.SIGINT, signal.SIG_DFL)
            signal.signal(signal.SIGTERM, signal.SIG_DFL)

        unshare = subprocess.Popen(
            ["unshare", "--pid", "--fork", "--mount-proc", sys.executable, "-m", "cmw_vllm",
             "start", str(model_dir), "--name", name, "--port", str(port), "--foreground",
             *extra],
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
            env={**os.environ, **env}, preexec_fn=default_signals,
        )
        children: list[int] = []

        def forked() -> bool:
            with contextlib.suppress(OSError):
                children[:] = [int(p) for p in Path(
                    f"/proc/{unshare.pid}/task/{unshare.pid}/children").read_text().split()]
            return bool(children) or unshare.poll() is not None

        assert wait_until(forked, timeout=30) and children, "unshare did not fork PID 1"
        container = cls(unshare, children[0])
        assert container.ns_pid(children[0]) == 1
        return container

    @staticmethod
    def ns_pid(host_pid: int) -> int | None:
        """The pid of a host process inside its innermost namespace (None when gone)."""
        try:
            status = Path(f"/proc/{host_pid}/status").read_text()
        except OSError:
            return None
        for line in status.splitlines():
            if line.startswith("NSpid:"):
                return int(line.split()[-1])
        return None

    def processes(self) -> list[NsProcess]:
        """Every process in the namespace, zombies included."""
        out = []
        for entry in Path("/proc").iterdir():
            if not entry.name.isdigit():
                continue
            try:
                if os.readlink(entry / "ns" / "pid") != self.namespace:
                    continue
                status = (entry / "status").read_text()
                cmdline = (entry / "cmdline").read_bytes().decode(errors="replace")
            except OSError:
                continue  # gone meanwhile
            fields = dict(line.split(":", 1) for line in status.splitlines() if ":" in line)
            out.append(NsProcess(host_pid=int(entry.name), host_ppid=int(fields["PPid"]),
                                 pid=int(fields["NSpid"].split()[-1]),
                                 state=fields["State"].split()[0],
                                 cmdline=cmdline.split("\0")[:-1]))
        return out

    def zombies(self) -> list[NsProcess]:
        return [p for p in self.processes() if p.state == "Z"]

    def pid1_serves(self) -> bool:
        """PID 1 is still there and not a zombie."""
        return any(p.host_pid == self.pid1 and p.state != "Z" for p in self.processes())

    def wait(self, timeout: float) -> tuple[int, str, str]:
        """Wait for the namespace to end: (PID 1's exit status, its stdout, its stderr)."""
        out, err = self.unshare.communicate(timeout=timeout)
        return self.unshare.returncode, out, err

    def kill(self) -> None:
        """SIGKILL to PID 1 ends the whole namespace."""
        if self.unshare.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(self.pid1, signal.SIGKILL)
            self.unshare.communicate(timeout=30)


@pytest.fixture
def container(fake_engine: Path, model_dir: Path) -> Iterator[dict[str, Any]]:
    """Starts containers (``holder["start"](name, *flags, env=...)``); ends them after."""
    started: list[tuple[str, Container]] = []

    def start(name: str, *extra: str, env: dict[str, str]) -> Container:
        made = Container.start(model_dir, name, free_port(), *extra, env=env)
        started.append((name, made))
        return made

    yield {"start": start}
    for name, made in started:
        made.kill()
        # Its record names pids of the namespace: never let a later stop act on them here.
        for path in (sr.record_path(name), sr.pid_path(name), sr.exit_path(name)):
            path.unlink(missing_ok=True)


def _port_of(name: str) -> int:
    record = sr.read_record(name)
    assert record is not None
    return record.port


def test_pid1_reaps_an_orphan_then_drains_on_sigterm(
    container: dict[str, Any], tmp_path: Path, isolated_home: Path
) -> None:
    sock, notify_path = notify_socket(tmp_path)
    orphan_file = tmp_path / "orphan"
    box = container["start"]("pid1", "--drain", "20", env={
        "NOTIFY_SOCKET": notify_path,
        "FAKE_VLLM_ORPHAN": str(orphan_file),  # a grandchild whose parent exits at once
        "FAKE_VLLM_GEN_SECONDS": "2",
        "FAKE_VLLM_TERM_EXIT": "7",  # vLLM's exit code after the drain, told from a default
    })
    with sock:
        assert "READY=1" in sock.recv(4096).decode().split("\n")
        # The orphan: re-parented to PID 1 (cmw-vllm), then it exits.
        assert wait_until(orphan_file.exists, timeout=30)
        orphan, parent = map(int, orphan_file.read_text().split())
        assert parent == 1
        # Reaped: gone from the namespace's process table, not left as a zombie.
        assert wait_until(lambda: orphan not in {p.pid for p in box.processes()}, 10), \
            box.processes()
        assert wait_until(lambda: not box.zombies(), 5), box.zombies()  # none stays
        assert box.pid1_serves()

        # SIGTERM to PID 1 (docker stop) drains: a completion in flight finishes.
        port = _port_of("pid1")
        log = isolated_home / "logs" / "pid1.log"
        reply: dict[str, Any] = {}

        def ask() -> None:
            try:
                reply["code"] = requests.post(f"http://127.0.0.1:{port}/v1/chat/completions",
                                              json={"messages": []}, timeout=30).status_code
            except requests.RequestException as exc:
                reply["error"] = exc

        asker = threading.Thread(target=ask)
        asker.start()
        assert wait_until(lambda: "generating a completion" in log.read_text(), 20)
        os.kill(box.pid1, signal.SIGTERM)
        assert "STOPPING=1" in sock.recv(4096).decode().split("\n")
        code, out, err = box.wait(timeout=60)
        asker.join(30)
    assert reply == {"code": 200}
    assert code == 7, err  # cmw-vllm exits with vLLM's exit code
    assert "stopping: in-flight requests get up to 20s" in err
    assert "[shutdown] stopping engine client mode=drain" in out
    assert sr.read_record("pid1") is None  # stopped like `cmw-vllm stop`: nothing on record


def test_pid1_reaps_a_crashed_runs_engine_while_it_waits_to_restart(
    container: dict[str, Any], tmp_path: Path
) -> None:
    sock, notify_path = notify_socket(tmp_path)
    box = container["start"]("pid1r", "--restart", "on-failure", env={
        "NOTIFY_SOCKET": notify_path,
        "CMW_VLLM_RESTART_BACKOFF": "120",  # a long wait before the relaunch
    })
    with sock:
        assert "READY=1" in sock.recv(4096).decode().split("\n")
    engines = [p for p in box.processes() if p.cmdline[:1] == ["VLLM::EngineCore"]]
    assert len(engines) == 1
    engine = engines[0]
    api_server = [p for p in box.processes() if p.host_pid == engine.host_ppid]
    assert len(api_server) == 1
    os.kill(api_server[0].host_pid, signal.SIGKILL)  # orphans EngineCore, to PID 1
    # The supervisor kills the crashed run's engine and reaps it, backoff or not.
    assert wait_until(lambda: engine.pid not in {p.pid for p in box.processes()}, 20), \
        box.processes()
    assert wait_until(lambda: not box.zombies(), 5), box.zombies()
    assert box.pid1_serves()
    log = Path(sr.log_path("pid1r"))
    assert wait_until(lambda: "backoff 120s" in log.read_text(), 10)
    # SIGTERM during the backoff ends the wait; the exit status is the last run's (SIGKILL).
    os.kill(box.pid1, signal.SIGTERM)
    code, _, err = box.wait(timeout=30)
    assert code == 128 + signal.SIGKILL, err
    assert sr.read_record("pid1r") is None


def test_pid1_sigterm_right_after_the_spawn_stops_the_server(
    container: dict[str, Any]
) -> None:
    """One SIGTERM (docker stop) the moment vLLM exists, before the record is written: PID 1
    has no default action for it, so unless it is held for the supervisor it is lost."""
    box = container["start"]("pid1w", env={})
    children = Path(f"/proc/{box.pid1}/task/{box.pid1}/children")

    def vllm_spawned() -> bool:  # vLLM leads a session of its own; probes run in ours
        with contextlib.suppress(OSError):
            return any(os.getsid(int(pid)) == int(pid) for pid in children.read_text().split())
        return box.unshare.poll() is not None

    assert wait_until(vllm_spawned, timeout=30, interval=0.001)
    os.kill(box.pid1, signal.SIGTERM)
    _, _, err = box.wait(timeout=60)
    assert "Serving 'pid1w' in the foreground" in err  # it got as far as supervising
    assert sr.read_record("pid1w") is None  # stopped like `cmw-vllm stop`: nothing on record
