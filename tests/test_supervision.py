"""Drain on stop, restart policies and foreground mode, on the stand-in engine.

The stand-in (tests/fake_vllm) starts in under a second, drains like vLLM with
``--shutdown-timeout`` and can crash on cue (``FAKE_VLLM_MODE``); the real-vLLM side of the
same promises is in test_serving_real.py.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import pytest
import requests

from cmw_vllm.server_manager import ServerManager, group_members, read_record
from cmw_vllm.supervisor import Backoff
from tests.conftest import alive_pids, free_port, notify_socket, wait_for_state, wait_until
from tests.conftest import run_cli as run


@pytest.fixture
def fast_restarts(monkeypatch: pytest.MonkeyPatch) -> None:
    """Backoff of 0.2 s doubling, give up at 3 crashes a minute."""
    monkeypatch.setenv("CMW_VLLM_RESTART_BACKOFF", "0.2")
    monkeypatch.setenv("CMW_VLLM_RESTART_LIMIT", "3")
    monkeypatch.setenv("CMW_VLLM_RESTART_WINDOW", "60")


def _everything(name: str) -> list[int]:
    """Pids of the server's supervisor and process group."""
    record = read_record(name)
    assert record is not None
    return [p.pid for p in group_members(record)] + [record.supervisor_pid]


def _restarts(name: str) -> int:
    """The restart count on the server's record (0 while there is none)."""
    record = read_record(name)
    return record.restart_count if record is not None else 0


def _all_logs(home: Path, name: str) -> str:
    """Every run's log, the oldest first (NAME.log.N ... NAME.log.1, NAME.log)."""
    files = sorted((home / "logs").glob(f"{name}.log*"),
                   key=lambda p: -int(p.suffix[1:]) if p.suffix[1:].isdigit() else 0)
    return "".join(p.read_text(errors="replace") for p in files)


# --------------------------------------------------------------------------- drain


def test_stop_lets_a_request_in_flight_finish(fake_engine: Path, model_dir: Path,
                                              monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("FAKE_VLLM_GEN_SECONDS", "2")
    port = free_port()
    assert run("start", str(model_dir), "--name", "d", "--port", str(port),
               "--drain", "10")[0] == 0
    record = read_record("d")
    assert record is not None and "--shutdown-timeout" in record.command
    everything = _everything("d")
    url = f"http://127.0.0.1:{port}/v1/chat/completions"
    replies: dict[str, Any] = {}

    def ask(key: str) -> None:
        try:
            reply = requests.post(url, json={"messages": []}, timeout=30)
            replies[key] = reply.status_code
        except requests.RequestException as exc:
            replies[key] = exc

    first = threading.Thread(target=ask, args=("in_flight",))
    first.start()
    time.sleep(0.5)
    stopped: dict[str, Any] = {}

    def stop() -> None:
        stopped["in_flight_then"] = "in_flight" not in replies
        stopped["result"] = ServerManager().stop("d")

    stopper = threading.Thread(target=stop)
    stopper.start()
    status = wait_for_state("d", "draining", timeout=5)
    assert status.state == "draining"
    assert 0 < status.to_json()["drain_left_s"] <= 10
    code, out, _ = run("status", "d")
    assert code == 1 and "draining (" in out
    ask("late")
    first.join(10)
    stopper.join(20)
    assert replies["in_flight"] == 200  # finished although the stop came first
    assert replies["late"] != 200  # nothing new is served during the drain
    assert not stopped["result"].forced
    # In flight when the stop began, and answered: the stop waited for it. (When this client
    # read the reply says nothing: on a loaded machine it may read it after the stop returned.)
    assert stopped["in_flight_then"]
    assert not alive_pids(everything)
    assert read_record("d") is None


def _stop_while_asking(name: str, port: int) -> tuple[Any, Any]:
    """Stop ``name`` while one completion is in flight; (the reply's status, StopResult)."""
    replies: dict[str, Any] = {}

    def ask() -> None:
        try:
            replies["code"] = requests.post(f"http://127.0.0.1:{port}/v1/chat/completions",
                                            json={"messages": []}, timeout=30).status_code
        except requests.RequestException as exc:
            replies["code"] = exc

    asker = threading.Thread(target=ask)
    asker.start()
    log = Path(os.environ["CMW_VLLM_HOME"]) / "logs" / f"{name}.log"
    assert wait_until(lambda: "generating a completion" in log.read_text(), timeout=10)
    result = ServerManager().stop(name)
    asker.join(30)
    return replies.get("code"), result


def test_stop_of_an_idle_server_skips_the_engine_teardown(
        fake_engine: Path, model_dir: Path, isolated_home: Path,
        monkeypatch: pytest.MonkeyPatch) -> None:
    # /metrics says what is in flight; the stand-in's EngineCore takes 10 s to tear down
    # after a drain, as vLLM's workers take seconds.
    monkeypatch.setenv("FAKE_VLLM_LOAD", "live")
    monkeypatch.setenv("FAKE_VLLM_TEARDOWN", "10")
    monkeypatch.setenv("FAKE_VLLM_ENGINE_SHM", "1")  # its engine maps a /dev/shm file
    assert run("start", str(model_dir), "--name", "idle", "--port", str(free_port()),
               "--drain", "30")[0] == 0
    everything = _everything("idle")
    log_file = isolated_home / "logs" / "idle.log"
    assert wait_until(lambda: "shared memory /dev/shm/" in log_file.read_text(), timeout=10)
    shm = Path(re.findall(r"shared memory (/dev/shm/\S+)", log_file.read_text())[0])
    assert shm.exists()
    result = ServerManager().stop("idle")
    log = log_file.read_text()
    # The engine said it had nothing to drain, then was SIGKILLed in its teardown (as vLLM
    # does without a drain timeout), instead of being waited for.
    assert "request processing complete" in log
    assert "draining in-flight requests" not in log
    assert "EngineCore exited with -9" in log
    assert not shm.exists()  # what its teardown would have removed is gone all the same
    assert not result.forced  # the API server itself exited on its SIGTERM
    assert not alive_pids(everything)
    assert read_record("idle") is None


@pytest.mark.parametrize("load", [
    "live",
    # /metrics says idle although a request is in flight: a request that came in right after
    # the check, or one that vLLM's gauges (updated once per engine step) do not show yet.
    # The engine's own word at the SIGTERM wins: it drains, and it is not killed.
    "0,0",
], ids=["busy", "idle-check-missed-the-request"])
def test_stop_of_a_busy_server_still_drains(fake_engine: Path, model_dir: Path,
                                            isolated_home: Path,
                                            monkeypatch: pytest.MonkeyPatch,
                                            load: str) -> None:
    monkeypatch.setenv("FAKE_VLLM_LOAD", load)
    monkeypatch.setenv("FAKE_VLLM_GEN_SECONDS", "2")
    monkeypatch.setenv("FAKE_VLLM_TEARDOWN", "0.5")
    port = free_port()
    assert run("start", str(model_dir), "--name", "busy", "--port", str(port),
               "--drain", "30")[0] == 0
    code, result = _stop_while_asking("busy", port)
    log = (isolated_home / "logs" / "busy.log").read_text()
    assert code == 200  # in flight when the stop came, and answered
    assert "draining in-flight requests count=1" in log
    assert "EngineCore exited with 0" in log  # its teardown ran: nothing cut it short
    assert not result.forced


def test_stop_now_aborts_at_once(fake_engine: Path, model_dir: Path,
                                 monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("FAKE_VLLM_GEN_SECONDS", "20")
    port = free_port()
    assert run("start", str(model_dir), "--name", "n", "--port", str(port),
               "--drain", "60")[0] == 0
    everything = _everything("n")
    outcome: dict[str, Any] = {}

    def ask() -> None:
        try:
            outcome["code"] = requests.post(f"http://127.0.0.1:{port}/v1/chat/completions",
                                            json={}, timeout=30).status_code
        except requests.RequestException as exc:
            outcome["error"] = exc

    asker = threading.Thread(target=ask)
    asker.start()
    time.sleep(0.5)
    begin = time.monotonic()
    code, out, err = run("stop", "n", "--now", "--json")
    took = time.monotonic() - begin
    asker.join(10)
    assert code == 0, err
    assert json.loads(out)["servers"][0]["forced"] is True
    assert took < 3
    assert "error" in outcome  # the request was cut
    assert not alive_pids(everything)


def test_drain_settings_are_kept_and_checked(fake_engine: Path, model_dir: Path,
                                             monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CMW_VLLM_DRAIN_TIMEOUT", "7")
    assert run("start", str(model_dir), "--name", "k", "--port", str(free_port()),
               "--restart", "always")[0] == 0
    record = read_record("k")
    assert record is not None and record.drain == 7 and record.restart_policy == "always"
    i = record.command.index("--shutdown-timeout")
    assert record.command[i + 1] == "7"
    assert run("restart", "k", "--drain", "1")[0] == 0
    again = read_record("k")
    assert again is not None and again.drain == 7 and again.restart_policy == "always"
    code, _, err = run("stop", "k", "--now", "--drain", "3")
    assert code == 2 and "--now and --drain" in err
    code, _, err = run("start", str(model_dir), "--name", "x", "--",
                       "--shutdown-timeout", "5")
    assert code == 2 and "--drain" in err


def test_models_file_sets_restart_and_drain(isolated_home: Path,
                                            monkeypatch: pytest.MonkeyPatch) -> None:
    from cmw_vllm.model_registry import resolve_target
    from cmw_vllm.server_config import resolve_server_config

    isolated_home.mkdir(parents=True, exist_ok=True)
    (isolated_home / "models.toml").write_text(
        '[models.kept]\nmodel = "org/kept-model"\nport = 8123\nrestart = "always"\n'
        "drain = 90\n")
    target = resolve_target("kept")
    config = resolve_server_config(target.model, entry_settings=target.settings, environ={})
    assert (config.restart, config.drain) == ("always", 90)
    args = config.vllm_cli_args()
    assert args[args.index("--shutdown-timeout") + 1] == "90"
    env = {"CMW_VLLM_DRAIN_TIMEOUT": "5", "CMW_VLLM_RESTART": "no"}
    config = resolve_server_config(target.model, entry_settings=target.settings, environ=env)
    assert (config.restart, config.drain) == ("no", 5)  # env beats the models file


# --------------------------------------------------------------------------- restarts


def test_crash_is_restarted_with_a_new_pid(fake_engine: Path, model_dir: Path,
                                           isolated_home: Path, fast_restarts: None) -> None:
    port = free_port()
    assert run("start", str(model_dir), "--name", "r", "--port", str(port),
               "--restart", "on-failure")[0] == 0
    first = read_record("r")
    assert first is not None
    first_group = [p.pid for p in group_members(first)]
    os.kill(first.pid, signal.SIGKILL)  # orphans the stand-in's engine child
    assert wait_until(lambda: _restarts("r") == 1)
    status = wait_for_state("r", "healthy")
    assert status.state == "healthy"
    second = read_record("r")
    assert second is not None and second.pid != first.pid
    assert second.supervisor_pid == first.supervisor_pid
    assert second.last_exit_code == -9
    assert (isolated_home / "servers" / "r.pid").read_text().strip() == str(second.pid)
    assert not alive_pids(first_group)  # the orphaned engine was killed before the relaunch
    timing = second.restart_timing
    assert timing is not None
    assert timing["exit_at"] <= timing["detected_at"] <= timing["cleaned_at"] \
        <= timing["launched_at"]
    code, out, _ = run("status", "r", "--json")
    server = json.loads(out)["servers"][0]
    assert (server["restarts"], server["last_exit_code"], server["restart_policy"]) == \
        (1, -9, "on-failure")
    assert "was killed" not in out
    logs = sorted(p.name for p in (isolated_home / "logs").glob("r.log*"))
    assert logs == ["r.log", "r.log.1"]  # the current run, and the crashed one rotated
    assert "Application startup complete" in (isolated_home / "logs" / "r.log").read_text()


def test_exit_0_nobody_asked_for_is_a_crash(fake_engine: Path, model_dir: Path,
                                            monkeypatch: pytest.MonkeyPatch,
                                            fast_restarts: None) -> None:
    monkeypatch.setenv("FAKE_VLLM_MODE", "exit0_after_ready")
    monkeypatch.setenv("FAKE_VLLM_DIE_AFTER", "1")
    monkeypatch.setenv("CMW_VLLM_RESTART_LIMIT", "20")
    assert run("start", str(model_dir), "--name", "z", "--port", str(free_port()),
               "--restart", "on-failure")[0] == 0
    assert wait_until(lambda: _restarts("z") >= 1)
    record = read_record("z")
    assert record is not None and record.last_exit_code == 0


def test_crash_loop_gives_up_as_failed(fake_engine: Path, model_dir: Path,
                                       isolated_home: Path, monkeypatch: pytest.MonkeyPatch,
                                       fast_restarts: None) -> None:
    monkeypatch.setenv("FAKE_VLLM_MODE", "die_after_ready")
    monkeypatch.setenv("FAKE_VLLM_DIE_AFTER", "1")
    assert run("start", str(model_dir), "--name", "loop", "--port", str(free_port()),
               "--restart", "on-failure")[0] == 0
    record = read_record("loop")
    assert record is not None
    supervisor = record.supervisor_pid
    status = wait_for_state("loop", "failed", timeout=30)
    assert status.state == "failed"
    assert status.returncode == 3
    code, out, err = run("status", "loop", "--json")
    assert code == 1
    server = json.loads(out)["servers"][0]
    assert (server["state"], server["restarts"], server["last_exit_code"]) == ("failed", 2, 3)
    assert server["log_tail"] and any("Application startup complete" in line
                                      for line in server["log_tail"])
    code, out, err = run("status", "loop")
    assert "failed (3)" in out and "gave up after repeated crashes" in err
    assert wait_until(lambda: not alive_pids([supervisor]), 10)
    assert not status.orphans  # the last run's engine child was killed when it gave up
    delays = [float(d) for d in re.findall(r"backoff ([\d.]+)s",
                                           _all_logs(isolated_home, "loop"))]
    assert len(delays) == 2 and delays[1] > delays[0]  # the backoff doubles
    # A failed server starts again like an exited one.
    monkeypatch.setenv("FAKE_VLLM_MODE", "ok")
    code, _, err = run("start", str(model_dir), "--name", "loop", "--port", str(free_port()))
    assert code == 0, err


def test_policy_always_never_gives_up(fake_engine: Path, model_dir: Path,
                                      monkeypatch: pytest.MonkeyPatch,
                                      fast_restarts: None) -> None:
    monkeypatch.setenv("FAKE_VLLM_MODE", "die_after_ready")
    monkeypatch.setenv("FAKE_VLLM_DIE_AFTER", "1")
    monkeypatch.setenv("CMW_VLLM_RESTART_BACKOFF_MAX", "0.2")
    assert run("start", str(model_dir), "--name", "a", "--port", str(free_port()),
               "--restart", "always")[0] == 0
    assert wait_until(lambda: _restarts("a") >= 4, timeout=30)
    assert ServerManager().get_status("a").state != "failed"


def test_a_hung_server_is_restarted_counting_from_readiness(
    fake_engine: Path, model_dir: Path, isolated_home: Path,
    monkeypatch: pytest.MonkeyPatch, fast_restarts: None
) -> None:
    monkeypatch.setenv("CMW_VLLM_RESTART_UNHEALTHY", "1")
    monkeypatch.setenv("FAKE_VLLM_DELAY", "3")  # loading fails /health 3x longer than that
    assert run("start", str(model_dir), "--name", "h", "--port", str(free_port()),
               "--restart", "on-failure")[0] == 0
    first = read_record("h")
    assert first is not None
    assert first.restart_count == 0  # a slow load is no hang: counted from readiness
    assert "is hung" not in _all_logs(isolated_home, "h")
    first_group = [p.pid for p in group_members(first)]
    hung_at = time.time()
    os.kill(first.pid, signal.SIGSTOP)  # the process lives; /health gets no answer
    assert wait_until(lambda: _restarts("h") == 1, timeout=30)
    status = wait_for_state("h", "healthy", timeout=30)
    assert status.state == "healthy"
    second = read_record("h")
    assert second is not None and second.pid != first.pid
    assert second.supervisor_pid == first.supervisor_pid
    assert second.last_exit_code == -signal.SIGKILL
    assert second.restart_timing is not None
    assert second.restart_timing["exit_at"] - hung_at >= 1  # not before the limit
    assert not alive_pids(first_group)  # the stopped API server and its engine
    code, out, _ = run("status", "h", "--json")
    server = json.loads(out)["servers"][0]
    assert (server["restarts"], server["last_exit_code"]) == (1, -signal.SIGKILL)
    log = _all_logs(isolated_home, "h")
    assert re.search(rf"vLLM \(pid {first.pid}\) is hung: /health has failed for [\d.]+s "
                     r"\(no answer; CMW_VLLM_RESTART_UNHEALTHY=1\); killing it", log), log
    assert f"vLLM (pid {first.pid}) was killed as hung: a crash" in log


def test_bad_restart_setting_fails_start(fake_engine: Path, model_dir: Path,
                                         isolated_home: Path,
                                         monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CMW_VLLM_RESTART_UNHEALTHY", "soon")
    code, _, err = run("start", str(model_dir), "--name", "bad", "--port", str(free_port()))
    assert code == 2
    assert "CMW_VLLM_RESTART_UNHEALTHY='soon' is not a number" in err
    assert "Traceback" not in err
    assert read_record("bad") is None  # nothing launched to run unsupervised


def test_stop_during_backoff_ends_the_loop(fake_engine: Path, model_dir: Path,
                                           monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("FAKE_VLLM_MODE", "die_after_ready")
    monkeypatch.setenv("FAKE_VLLM_DIE_AFTER", "1")
    monkeypatch.setenv("CMW_VLLM_RESTART_BACKOFF", "60")
    assert run("start", str(model_dir), "--name", "b", "--port", str(free_port()),
               "--restart", "on-failure")[0] == 0
    record = read_record("b")
    assert record is not None
    pids = _everything("b")
    status = wait_for_state("b", "restarting", timeout=10)
    assert status.state == "restarting"
    assert status.to_json()["next_restart_at"] > time.time() + 30
    code, out, _ = run("status", "b")
    assert code == 4 and "restarting (in " in out
    begin = time.monotonic()
    assert run("stop", "b")[0] == 0
    assert time.monotonic() - begin < 5
    assert not alive_pids(pids)
    assert read_record("b") is None
    time.sleep(0.5)
    assert read_record("b") is None  # nothing was relaunched behind stop's back


def test_backoff_doubles_up_to_its_maximum() -> None:
    backoff = Backoff(first=2, maximum=300)
    assert [backoff.delay(n) for n in range(1, 11)] == \
        [2, 4, 8, 16, 32, 64, 128, 256, 300, 300]


def test_a_long_ready_run_resets_the_backoff(fake_engine: Path, model_dir: Path,
                                             isolated_home: Path,
                                             monkeypatch: pytest.MonkeyPatch,
                                             fast_restarts: None) -> None:
    monkeypatch.setenv("FAKE_VLLM_MODE", "die_after_ready")
    monkeypatch.setenv("FAKE_VLLM_DIE_AFTER", "0.8")
    monkeypatch.setenv("CMW_VLLM_RESTART_RESET", "0.3")  # each run is ready longer
    monkeypatch.setenv("CMW_VLLM_RESTART_LIMIT", "20")
    assert run("start", str(model_dir), "--name", "s", "--port", str(free_port()),
               "--restart", "on-failure")[0] == 0
    assert wait_until(lambda: _restarts("s") >= 3, timeout=30)
    delays = [float(d) for d in re.findall(r"backoff ([\d.]+)s",
                                           _all_logs(isolated_home, "s"))]
    assert len(delays) >= 3 and max(delays) <= 0.25


# --------------------------------------------------------------------------- foreground


def _foreground(model_dir: Path, name: str, port: int, *extra: str,
                env: dict[str, str] | None = None) -> subprocess.Popen[str]:
    def default_signals() -> None:
        signal.signal(signal.SIGINT, signal.SIG_DFL)
        signal.signal(signal.SIGTERM, signal.SIG_DFL)

    return subprocess.Popen(
        [sys.executable, "-m", "cmw_vllm", "start", str(model_dir), "--name", name,
         "--port", str(port), "--foreground", *extra],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        env={**os.environ, **(env or {})}, preexec_fn=default_signals,
    )


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_foreground_notifies_systemd_and_drains_on_signal(
    fake_engine: Path, model_dir: Path, tmp_path: Path, isolated_home: Path, sig: int
) -> None:
    sock, path = notify_socket(tmp_path)
    port = free_port()
    proc = _foreground(model_dir, "fg", port, env={"NOTIFY_SOCKET": path})
    try:
        message = sock.recv(4096).decode()
        assert "READY=1" in message.split("\n")
        # The same record as a background server: status from another shell sees it.
        status = ServerManager().get_status("fg")
        assert status.state == "healthy"
        record = status.record
        assert record is not None and record.foreground
        assert record.supervisor_pid == proc.pid
        everything = [p.pid for p in group_members(record)]
        proc.send_signal(sig)
        assert "STOPPING=1" in sock.recv(4096).decode()
        out, err = proc.communicate(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
        sock.close()
    assert proc.returncode == 0  # vLLM's (the stand-in's) exit code after a drain
    assert "Application startup complete." in out  # vLLM's output on the terminal ...
    log = (isolated_home / "logs" / "fg.log").read_text()
    assert "Application startup complete." in log  # ... and in the log file
    assert "in the foreground" in err
    # The ready line of a background start, with the endpoint (stderr: stdout is vLLM's).
    assert re.search(r"^Server 'fg' is ready \(.+, pid \d+, [\d.]+s\)\.$", err, re.M), err
    assert f"\n  Endpoint: http://127.0.0.1:{port}/v1\n" in err
    assert not alive_pids(everything)
    assert read_record("fg") is None


def test_foreground_restarts_and_stops_from_another_shell(
    fake_engine: Path, model_dir: Path, monkeypatch: pytest.MonkeyPatch, fast_restarts: None
) -> None:
    port = free_port()
    proc = _foreground(model_dir, "fr", port, "--restart", "on-failure")
    try:
        assert wait_until(lambda: read_record("fr") is not None)
        assert wait_for_state("fr", "healthy", timeout=30).state == "healthy"
        first = read_record("fr")
        assert first is not None
        os.kill(first.pid, signal.SIGKILL)
        assert wait_until(lambda: _restarts("fr") == 1)
        assert wait_for_state("fr", "healthy", timeout=30).state == "healthy"
        code, out, err = run("stop", "fr")
        assert code == 0, err
        proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 0


def test_foreground_exit_nobody_asked_for_is_a_failure(
    fake_engine: Path, model_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("FAKE_VLLM_MODE", "exit0_after_ready")
    monkeypatch.setenv("FAKE_VLLM_DIE_AFTER", "0.3")
    proc = _foreground(model_dir, "fx", free_port())
    proc.communicate(timeout=30)
    assert proc.returncode == 1  # so that systemd's Restart=on-failure fires on vLLM's 0
    code, out, _ = run("status", "fx", "--json")
    assert json.loads(out)["servers"][0]["last_exit_code"] == 0


def test_foreground_refuses_a_server_already_running(fake_engine: Path,
                                                     model_dir: Path) -> None:
    port = free_port()
    assert run("start", str(model_dir), "--name", "bg", "--port", str(port))[0] == 0
    code, _, err = run("start", str(model_dir), "--name", "bg", "--port", str(port),
                       "--foreground")
    assert code == 6 and "already runs" in err


def _signal_from_spawn(proc: subprocess.Popen[Any], sig: int, timeout: float = 60.0) -> int:
    """Send ``sig`` to ``proc`` again and again from the moment vLLM appears under it (its
    child in a session of its own; probes of the engine run in ours) until ``proc`` exits:
    whatever the timing, one lands between the spawn and the handlers of its supervisor.

    Returns:
        vLLM's pid (it leads vLLM's process group).
    """
    import psutil

    parent = psutil.Process(proc.pid)
    deadline = time.monotonic() + timeout
    child = None
    while child is None and proc.poll() is None and time.monotonic() < deadline:
        with contextlib.suppress(psutil.Error, OSError):
            child = next((c.pid for c in parent.children() if os.getsid(c.pid) == c.pid),
                         None)
    assert child is not None, "vLLM did not appear"
    while proc.poll() is None and time.monotonic() < deadline:
        proc.send_signal(sig)  # send_signal does nothing once proc has exited
        time.sleep(0.005)
    return child


def _group_left(pgid: int) -> list[int]:
    """Live processes of the process group ``pgid``."""
    import psutil

    left = []
    for process in psutil.process_iter():
        try:
            if os.getpgid(process.pid) == pgid and process.status() != psutil.STATUS_ZOMBIE:
                left.append(process.pid)
        except (OSError, psutil.Error):
            continue
    return left


def _kill_group(pgid: int) -> None:
    for pid in _group_left(pgid):
        with contextlib.suppress(OSError):
            os.kill(pid, signal.SIGKILL)


def _stops_with_its_vllm(proc: subprocess.Popen[Any], sig: int) -> None:
    """Signal ``proc`` from vLLM's spawn on; it must exit on its own, taking vLLM with it.

    Whatever the outcome, nothing of ``proc`` or of vLLM's group is left behind.
    """
    vllm = None
    try:
        vllm = _signal_from_spawn(proc, sig)
        proc.communicate(timeout=60)
        assert proc.returncode >= 0, "killed by the signal, not stopped by it"
        assert wait_until(lambda: not _group_left(vllm), timeout=15), _group_left(vllm)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
        if vllm is not None:
            _kill_group(vllm)


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_foreground_stop_signal_right_after_the_spawn_stops_the_server(
    fake_engine: Path, model_dir: Path, sig: int
) -> None:
    _stops_with_its_vllm(_foreground(model_dir, "fw", free_port()), sig)
    assert read_record("fw") is None


def test_background_supervisor_stop_signal_right_after_the_spawn_stops_vllm(
    isolated_home: Path,
) -> None:
    """A SIGTERM (``cmw-vllm stop``) to the supervisor before its handlers are installed."""
    from cmw_vllm import paths

    paths.ensure_dir(paths.state_dir())
    sleeper = [sys.executable, "-c", "import time; time.sleep(120)"]
    proc = subprocess.Popen(
        [sys.executable, "-m", "cmw_vllm.supervisor", "--name", "bw", "--", *sleeper],
        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
    )
    _stops_with_its_vllm(proc, signal.SIGTERM)


def test_supervision_variables_are_documented() -> None:
    import cmw_vllm.supervisor as supervisor

    root = Path(__file__).resolve().parent.parent
    names = set(re.findall(r'"(CMW_VLLM_[A-Z_]+)"', Path(supervisor.__file__).read_text()))
    assert "CMW_VLLM_RESTART_UNHEALTHY" in names
    page = (root / "docs" / "serving.md").read_text()
    example = (root / ".env.example").read_text()
    for name in sorted(names):
        assert f"`{name}" in page, f"docs/serving.md does not document {name}"
        assert re.search(rf"^# {name}=\d", example, re.M), name
