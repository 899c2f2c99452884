"""Lifecycle through the CLI against the stand-in engine (tests/fake_vllm): fast, real processes."""

from __future__ import annotations

import json
import os
import signal
import socket
import stat
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest

from cmw_vllm.errors import EXIT_INTERRUPTED
from cmw_vllm.server_manager import ServerManager, group_members
from cmw_vllm.server_record import read_record
from tests.conftest import alive_pids, free_port, spawn_cli, wait_for_state, wait_until
from tests.conftest import run_cli as run


def alive_group(name: str) -> list[int]:
    record = read_record(name)
    assert record is not None
    return [p.pid for p in group_members(record)]


def test_start_status_stop(fake_engine: Path, model_dir: Path, isolated_home: Path) -> None:
    port = free_port()
    code, out, err = run("start", str(model_dir), "--name", "t1", "--port", str(port))
    assert code == 0, err
    assert "is ready" in out
    assert f"http://127.0.0.1:{port}/v1" in out
    assert "curl " in out and "/v1/chat/completions" in out

    record = read_record("t1")
    assert record is not None
    pid_file = isolated_home / "servers" / "t1.pid"
    assert pid_file.read_text().strip() == str(record.pid)
    cmdline = psutil.Process(record.pid).cmdline()
    assert "vllm" in " ".join(cmdline)
    # It answers to its model id and to its cmw-vllm name.
    flag = cmdline.index("--served-model-name")
    assert cmdline[flag + 1:flag + 3] == [str(model_dir), "t1"]
    # State dir private, files private.
    assert stat.S_IMODE(isolated_home.stat().st_mode) == 0o700
    for f in (pid_file, isolated_home / "servers" / "t1.json", Path(record.log_path)):
        assert stat.S_IMODE(f.stat().st_mode) == 0o600, f

    code, out, _ = run("status", "--json")
    assert code == 0
    servers = json.loads(out)["servers"]
    assert [(s["name"], s["state"], s["port"]) for s in servers] == [("t1", "healthy", port)]
    # Every name it answers to, as on vLLM's command line; served_model_name the first.
    assert servers[0]["served_model_names"] == cmdline[flag + 1:flag + 3]
    assert servers[0]["served_model_name"] == str(model_dir)

    members = alive_group("t1")
    assert len(members) >= 2  # API server and engine child, in a session of their own
    assert record.pgid == record.pid and record.supervisor_pid not in members
    members.append(record.supervisor_pid)
    code, out, _ = run("stop", "t1")
    assert code == 0
    assert "Stopped 't1' (graceful" in out
    assert not alive_pids(members)
    assert not pid_file.exists()

    code, out, _ = run("status")
    assert code == 3
    assert "No managed servers" in out
    code, out, _ = run("stop", "t1")
    assert code == 0
    assert "not running" in out


def test_start_is_idempotent(fake_engine: Path, model_dir: Path) -> None:
    port = str(free_port())
    assert run("start", str(model_dir), "--name", "idem", "--port", port)[0] == 0
    first = read_record("idem")
    code, out, _ = run("start", str(model_dir), "--name", "idem", "--port", port)
    assert code == 0
    assert "already running" in out
    assert read_record("idem").pid == first.pid  # type: ignore[union-attr]
    # Same name, another model: refused, nothing changes.
    other = model_dir.parent / "other"
    other.mkdir()
    code, _, err = run("start", str(other), "--name", "idem", "--port", port)
    assert code == 6
    assert "already runs" in err
    assert read_record("idem").pid == first.pid  # type: ignore[union-attr]


def test_concurrent_starts_make_one_server(fake_engine: Path, model_dir: Path) -> None:
    port = str(free_port())
    cmd = [sys.executable, "-m", "cmw_vllm", "start", str(model_dir), "--name", "race",
           "--port", port, "--json"]
    procs = [subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for _ in range(4)]
    outs = [p.communicate(timeout=60) for p in procs]
    assert [p.returncode for p in procs] == [0] * 4, [o[1] for o in outs]
    pids = {json.loads(o[0])["pid"] for o in outs}
    assert len(pids) == 1
    servers = []
    for proc in psutil.process_iter(["cmdline"]):
        cmdline = " ".join(proc.info["cmdline"] or [])
        if str(model_dir) in cmdline and "cmw_vllm.supervisor" not in cmdline:
            servers.append(proc)
    assert {p.pid for p in servers} == pids


def test_start_failure_is_diagnosed(fake_engine: Path, model_dir: Path,
                                    monkeypatch: pytest.MonkeyPatch,
                                    isolated_home: Path) -> None:
    monkeypatch.setenv("FAKE_VLLM_MODE", "oom")
    code, _, err = run("start", str(model_dir), "--name", "oom", "--port", str(free_port()))
    assert code == 1
    assert "exited during start-up (exit code 1)" in err
    assert "--max-model-len 8192" in err  # the diagnosis
    assert "Engine core initialization failed" in err  # the log tail
    assert "Traceback" not in err
    assert not (isolated_home / "servers" / "oom.json").exists()
    assert not (isolated_home / "servers" / "oom.pid").exists()
    assert (isolated_home / "logs" / "oom.log").exists()


def test_unknown_vllm_flag_fails_fast(fake_engine: Path, model_dir: Path) -> None:
    code, _, err = run("start", str(model_dir), "--name", "badflag", "--port",
                       str(free_port()), "--", "--no-such-flag")
    assert code == 1
    assert "vLLM does not know the flag(s) --no-such-flag" in err


def test_task_is_inferred_from_pass_through_flags(fake_engine: Path, model_dir: Path) -> None:
    code, _, err = run("start", str(model_dir), "--name", "emb", "--port", str(free_port()),
                       "--", "--runner", "pooling", "--convert", "embed")
    assert code == 0, err
    record = read_record("emb")
    assert record is not None and record.task == "embed"
    assert record.command.count("--runner") == 1  # the flags are not added a second time


def test_port_held_by_another_program(fake_engine: Path, model_dir: Path) -> None:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        sock.listen()
        port = sock.getsockname()[1]
        code, _, err = run("start", str(model_dir), "--name", "p", "--port", str(port))
        assert code == 6
        assert f"port {port} is in use by pid {os.getpid()}" in err
        code, out, err = run("start", str(model_dir), "--name", "p", "--port", str(port),
                             "--auto-port")
        assert code == 0, err
        assert f"Port {port} is in use" in err
        assert read_record("p").port != port  # type: ignore[union-attr]


def test_stop_forces_a_server_that_ignores_sigterm(fake_engine: Path, model_dir: Path,
                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("FAKE_VLLM_MODE", "ignore_term")
    assert run("start", str(model_dir), "--name", "stubborn", "--port", str(free_port()))[0] == 0
    members = alive_group("stubborn")
    code, out, _ = run("stop", "stubborn", "--drain", "0", "--timeout", "1")
    assert code == 0
    assert "forced with SIGKILL" in out
    assert not alive_pids(members)


def test_sigkill_of_api_server_leaves_no_orphan(fake_engine: Path, model_dir: Path) -> None:
    assert run("start", str(model_dir), "--name", "k9", "--port", str(free_port()))[0] == 0
    record = read_record("k9")
    assert record is not None
    members = alive_group("k9")
    os.kill(record.pid, signal.SIGKILL)
    status = wait_for_state("k9", "exited")
    assert status.state == "exited"
    assert status.returncode == -9
    assert status.orphans  # the engine child lives on in the group
    code, out, err = run("status", "k9")
    assert code == 1
    assert "exited (-9)" in out
    assert "processes left behind" in err
    assert run("stop", "k9")[0] == 0
    assert not alive_pids(members)


def test_exited_after_ready_then_start_again(fake_engine: Path, model_dir: Path,
                                             monkeypatch: pytest.MonkeyPatch) -> None:
    port = str(free_port())
    monkeypatch.setenv("FAKE_VLLM_MODE", "die_after_ready")
    assert run("start", str(model_dir), "--name", "dies", "--port", port)[0] == 0
    wait_for_state("dies", "exited")
    code, out, _ = run("status", "dies", "--json")
    assert code == 1
    server = json.loads(out)["servers"][0]
    assert (server["state"], server["returncode"]) == ("exited", 3)
    # One exit code per situation: `test` of an exited server answers as `status` does.
    code, _, err = run("test", "dies")
    assert code == 1
    assert "is exited with code 3, not healthy" in err
    monkeypatch.setenv("FAKE_VLLM_MODE", "ok")
    code, out, err = run("start", str(model_dir), "--name", "dies", "--port", port)
    assert code == 0, err
    assert "is ready" in out


def _fake_record(home: Path, name: str, pid: int, created: float, pgid: int) -> None:
    servers = home / "servers"
    servers.mkdir(parents=True, exist_ok=True)
    record = {
        "format": 1, "name": name, "pid": pid, "create_time": created,
        "supervisor_pid": pgid, "supervisor_create_time": created,
        "pgid": pgid, "host": "127.0.0.1", "port": 1, "model": "m",
        "served_model_name": "m", "task": "generate", "base_url": "http://127.0.0.1:1",
        "command": ["python", "-m", "vllm"], "log_path": str(home / "x.log"),
        "started_at": created, "config": {},
    }
    (servers / f"{name}.json").write_text(json.dumps(record))


@pytest.mark.parametrize("own_session", [False, True], ids=["our-group", "own-session"])
def test_stale_record_never_signals_the_other_process(isolated_home: Path,
                                                      own_session: bool) -> None:
    bystander = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"],
                                 start_new_session=own_session)
    try:
        created = psutil.Process(bystander.pid).create_time()
        # pid reuse: a record of an older server whose pid and group id the bystander now has.
        _fake_record(isolated_home, "old", bystander.pid, created - 5,
                     os.getpgid(bystander.pid))
        # A forged record from before the last boot, pointing at the test's own group.
        _fake_record(isolated_home, "ancient", os.getpid(), 1.0, os.getpgid(0))
        code, out, err = run("status")
        assert code == 1
        assert out.count("stale") == 2
        for name in ("old", "ancient"):
            code, out, _ = run("stop", name, "--timeout", "1")
            assert code == 0
            assert "stale record" in out
            assert not (isolated_home / "servers" / f"{name}.json").exists()
        assert bystander.poll() is None
    finally:
        bystander.kill()
        bystander.wait()


def test_a_process_is_ours_only_when_its_command_line_is_the_recorded_one(
    isolated_home: Path,
) -> None:
    # Same pid and create time as the record, and "vllm" in its arguments: but not the
    # command the record names, so it is not ours (before, any argument with "vllm" was).
    bystander = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)",
                                  "vllm.entrypoints.openai.api_server"])
    try:
        created = psutil.Process(bystander.pid).create_time()
        _fake_record(isolated_home, "other", bystander.pid, created, bystander.pid)
        code, out, _ = run("status", "other")
        assert code == 1 and "stale" in out
        assert run("stop", "other", "--timeout", "1")[0] == 0
        assert bystander.poll() is None
    finally:
        bystander.kill()
        bystander.wait()


def test_command_matches_the_record_across_launch_styles() -> None:
    from cmw_vllm.server_manager import command_matches

    args = ["-m", "vllm.entrypoints.openai.api_server", "--model", "/m", "--port", "8000"]
    assert command_matches(["/venv/bin/python", *args], ["/venv/bin/python", *args])
    # A wrapper script that execs the interpreter, and a #! script run by its interpreter.
    assert command_matches(["/usr/bin/python3", *args], ["/tmp/engine-python", *args])
    assert command_matches(["/venv/bin/python", "/venv/bin/vllm", "serve", "/m"],
                           ["/venv/bin/vllm", "serve", "/m"])
    assert not command_matches(["/venv/bin/python", *args[:-1], "8001"],
                               ["/venv/bin/python", *args])
    assert not command_matches(["VLLM::EngineCore"], ["/venv/bin/python", *args])
    # Shims that exec through other programs show each stage in turn (pyenv, env).
    assert command_matches(["bash", "/root/.pyenv/libexec/pyenv", "exec", "python3", *args],
                           ["/tmp/engine-python", *args])
    assert command_matches(["/usr/bin/env", "bash", "/root/.pyenv/shims/python3", *args],
                           ["/tmp/engine-python", *args])
    # The supervisor's child between fork and exec still shows the supervisor's line.
    assert not command_matches(
        [sys.executable, "-m", "cmw_vllm.supervisor", "--name", "x", "--",
         "/venv/bin/python", *args], ["/venv/bin/python", *args])
    assert not command_matches(args, ["/venv/bin/python", *args])
    assert not command_matches([], ["/venv/bin/python", *args])


@pytest.mark.parametrize("starved", [False, True], ids=["idle", "starved-of-cpu"])
def test_an_empty_command_line_during_an_exec_is_read_again(
        monkeypatch: pytest.MonkeyPatch, starved: bool) -> None:
    """While a wrapper execs the interpreter, its command line reads empty for a moment.

    Starved: each read seems to take longer than the whole window (a loaded machine gives
    this process no CPU for a second; seen once in CI), yet a few reads are still made.
    """
    from cmw_vllm import process_group

    if starved:
        clock = [0.0]

        def monotonic() -> float:
            clock[0] += 2 * process_group.EXEC_WINDOW_S
            return clock[0]

        monkeypatch.setattr(process_group.time, "monotonic", monotonic)

    child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(30)"])
    try:
        proc = psutil.Process(child.pid)
        # Right after the exec the child's own command line may read empty too.
        assert wait_until(proc.cmdline, timeout=10, interval=0.001)
        real = proc.cmdline()
        real_cmdline = psutil.Process.cmdline
        empty_reads = [2]

        def cmdline(self: psutil.Process) -> list[str]:
            if self.pid == child.pid and empty_reads[0]:
                empty_reads[0] -= 1
                return []
            return real_cmdline(self)

        monkeypatch.setattr(psutil.Process, "cmdline", cmdline)
        found = process_group.verified_process(child.pid, proc.create_time(),
                                               lambda cmdline: cmdline == real)
        assert found is not None and found.pid == child.pid
        assert empty_reads == [0]
    finally:
        child.kill()
        child.wait()


def test_a_wrapper_that_execs_through_a_shim_starts(
        fake_engine: Path, model_dir: Path, isolated_home: Path,
        monkeypatch: pytest.MonkeyPatch) -> None:
    """A pyenv-like shim: the wrapper execs a shell that later execs the interpreter.

    The start is made to look at the process while the shell stage runs (its command line
    has three words before vLLM's arguments), the moment a start used to call "vLLM exited
    during start-up".
    """
    shim = isolated_home.parent / "shim-python"
    shim.write_text(
        "#!/bin/sh\n"
        "sleep 0.3\n"
        f'exec /bin/sh -c \'sleep 2; exec "$0" "$@"\' "{fake_engine}" "$@"\n')
    shim.chmod(0o755)
    monkeypatch.setenv("CMW_VLLM_PYTHON", str(shim))
    original = ServerManager.wait_ready

    def wait_ready_in_the_shell_stage(self: ServerManager, record, *args, **kwargs):  # type: ignore[no-untyped-def]
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            cmdline = psutil.Process(record.pid).cmdline()
            if cmdline[:2] == ["/bin/sh", "-c"]:
                break
            time.sleep(0.01)
        else:
            raise AssertionError("the shim's shell stage was not seen")
        return original(self, record, *args, **kwargs)

    monkeypatch.setattr(ServerManager, "wait_ready", wait_ready_in_the_shell_stage)
    code, out, err = run("start", str(model_dir), "--name", "shim", "--port", str(free_port()))
    try:
        assert code == 0, err
        assert "is ready" in out
        record = read_record("shim")
        assert record is not None
        assert run("status", "shim")[0] == 0
    finally:
        assert run("stop", "shim")[0] == 0


@pytest.mark.parametrize(
    "content",
    ["", "{trunc", "[1, 2]", json.dumps({"format": 0, "name": "bad"}), "\xff\xfe"],
    ids=["empty", "truncated", "not-object", "old-format", "binary"],
)
def test_bad_records_are_reported_not_fatal(fake_engine: Path, model_dir: Path,
                                            isolated_home: Path, content: str) -> None:
    assert run("start", str(model_dir), "--name", "good", "--port", str(free_port()))[0] == 0
    (isolated_home / "servers" / "bad.json").write_text(content, errors="surrogateescape")
    code, out, err = run("status")
    assert code == 1
    assert "good" in out and "healthy" in out
    assert "bad" in out and "invalid" in out
    assert "bad: bad record" in err
    assert "Traceback" not in out + err
    code, out, _ = run("status", "--json")
    states = {s["name"]: s["state"] for s in json.loads(out)["servers"]}
    assert states == {"bad": "invalid", "good": "healthy"}
    # stop removes the unreadable record.
    assert run("stop", "bad")[0] == 0
    assert not (isolated_home / "servers" / "bad.json").exists()


def test_restart_keeps_settings_and_previous_log(fake_engine: Path, model_dir: Path) -> None:
    assert run("start", str(model_dir), "--name", "rs", "--port", str(free_port()),
               "--max-model-len", "256", "--", "--enforce-eager")[0] == 0
    before = read_record("rs")
    code, out, err = run("restart", "rs")
    assert code == 0, err
    after = read_record("rs")
    assert after is not None and before is not None
    assert after.pid != before.pid
    assert after.config == before.config
    assert "--enforce-eager" in after.command and "256" in after.command
    assert Path(after.log_path + ".1").exists()
    code, out, _ = run("logs", "rs", "-n", "1")
    assert code == 0
    assert out.strip().splitlines()[-1] == Path(after.log_path).read_text().splitlines()[-1]
    code, _, err = run("restart", "nosuch")
    assert code == 3
    assert "no managed server named 'nosuch'" in err


def test_ctrl_c_while_waiting_leaves_server_running(fake_engine: Path, model_dir: Path,
                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("FAKE_VLLM_DELAY", "6")
    proc = spawn_cli("start", str(model_dir), "--name", "cc", "--port", str(free_port()),
                     stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 20
    while read_record_safe("cc") is None and time.monotonic() < deadline:
        time.sleep(0.1)
    time.sleep(0.5)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=20)
    assert proc.returncode == 130
    assert "cmw-vllm stop cc" in err
    assert ServerManager().get_status("cc").running


def read_record_safe(name: str) -> object | None:
    try:
        return read_record(name)
    except ValueError:
        return None


def test_api_key_stays_out_of_command_lines_and_files(fake_engine: Path, model_dir: Path,
                                                      monkeypatch: pytest.MonkeyPatch,
                                                      isolated_home: Path) -> None:
    secret = "sk-test-do-not-leak-4711"
    monkeypatch.setenv("VLLM_API_KEY", secret)
    code, out, err = run("start", str(model_dir), "--name", "keyed", "--port", str(free_port()))
    assert code == 0, err
    assert secret not in out + err
    record = read_record("keyed")
    assert record is not None
    procs = [psutil.Process(p) for p in alive_group("keyed")]
    assert all(secret not in " ".join(p.cmdline()) for p in procs)
    assert psutil.Process(record.pid).environ().get("VLLM_API_KEY") == secret
    # The only file that holds the key is the private one restart reads it from.
    key_file = isolated_home / "restart" / "keyed.key"
    assert key_file.read_text().strip() == secret
    assert stat.S_IMODE(key_file.stat().st_mode) == 0o600
    for f in isolated_home.rglob("*"):
        if f.is_file() and f != key_file:
            assert secret.encode() not in f.read_bytes(), f
    code, out, _ = run("status", "--json")
    assert secret not in out


def test_public_bind_without_key_warns(fake_engine: Path, model_dir: Path) -> None:
    code, _, err = run("start", str(model_dir), "--name", "pub", "--host", "0.0.0.0",
                       "--port", str(free_port()))
    assert code == 0
    assert "without an API key" in err


def test_gpus_and_env_options_reach_vllm(fake_engine: Path, model_dir: Path) -> None:
    assert run("start", str(model_dir), "--name", "g", "--port", str(free_port()),
               "--gpus", "1,0", "-e", "VLLM_LOGGING_LEVEL=DEBUG")[0] == 0
    record = read_record("g")
    assert record is not None
    environ = psutil.Process(record.pid).environ()
    assert environ.get("CUDA_VISIBLE_DEVICES") == "1,0"
    assert environ.get("VLLM_LOGGING_LEVEL") == "DEBUG"
    assert run("restart", "g")[0] == 0  # kept for restart
    record = read_record("g")
    assert psutil.Process(record.pid).environ().get("VLLM_LOGGING_LEVEL") == "DEBUG"


def test_no_wait_then_status_reports_starting(fake_engine: Path, model_dir: Path,
                                              monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("FAKE_VLLM_DELAY", "4")
    code, out, _ = run("start", str(model_dir), "--name", "nw", "--port", str(free_port()),
                       "--no-wait")
    assert code == 0
    assert "is starting" in out
    code, out, _ = run("status", "nw")
    assert code == 4
    assert "starting" in out


def test_preflight_refuses_what_cannot_fit(fake_engine: Path, tiny_model: Path,
                                           monkeypatch: pytest.MonkeyPatch,
                                           isolated_home: Path) -> None:
    monkeypatch.setenv("VLLM_CPU_KVCACHE_SPACE", "1")
    port = str(free_port())
    code, _, err = run("start", str(tiny_model), "--name", "big", "--port", port,
                       "--max-model-len", "5000000")
    assert code == 7
    assert "not fit" in err
    assert "--max-model-len 4096" in err  # the setting that would fit
    assert not (isolated_home / "servers" / "big.json").exists()
    assert not (isolated_home / "logs" / "big.log").exists()  # nothing was launched
    code, _, err = run("start", str(tiny_model), "--name", "big", "--port", port,
                       "--max-model-len", "5000000", "--force")
    assert code == 0, err


def test_status_shows_load_of_healthy_servers(fake_engine: Path, model_dir: Path) -> None:
    assert run("start", str(model_dir), "--name", "busy", "--port", str(free_port()))[0] == 0
    code, out, _ = run("status", "--json")
    assert code == 0
    load = json.loads(out)["servers"][0]["load"]
    assert (load["requests_running"], load["requests_waiting"]) == (1, 2)
    assert load["kv_cache_usage"] == pytest.approx(0.25)
    code, out, _ = run("status")
    row = next(line for line in out.splitlines() if line.startswith("busy"))
    assert "25.0%" in row


def test_status_watch_refreshes_until_ctrl_c(fake_engine: Path, model_dir: Path) -> None:
    assert run("start", str(model_dir), "--name", "w", "--port", str(free_port()))[0] == 0
    proc = spawn_cli("status", "--watch", "--interval", "0.3", stdout=subprocess.PIPE,
                     stderr=subprocess.PIPE)
    time.sleep(2.5)
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=10)
    assert proc.returncode == EXIT_INTERRUPTED, err
    assert "Interrupted." in err and "Traceback" not in err
    assert out.count("NAME") >= 2  # redrawn at least twice
    code, _, err = run("status", "--watch", "--json")
    assert code == 2
    assert "don't go together" in err


def test_status_shows_gpu_memory_of_the_engine_processes(
    fake_engine: Path, model_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from tests.test_gpu_info import FakeGpu, make_fake_nvml

    assert run("start", str(model_dir), "--name", "onGpu", "--port", str(free_port()))[0] == 0
    record = read_record("onGpu")
    assert record is not None
    engine = [p.pid for p in group_members(record) if p.cmdline()[:1] == ["VLLM::EngineCore"]]
    gib = 1024**3
    gpus = [FakeGpu("NVIDIA H100", 80 * gib, 30 * gib, procs=[(engine[0], 20 * gib),
                                                             (1, 5 * gib)])]
    monkeypatch.setitem(sys.modules, "pynvml", make_fake_nvml(gpus))
    code, out, _ = run("status", "--json")
    assert code == 0
    assert json.loads(out)["servers"][0]["gpu_memory_bytes"] == 20 * gib  # not the foreign 5
    code, out, _ = run("status")
    assert "20.0 GiB" in out


def test_logs_follow_prints_new_lines_until_ctrl_c(fake_engine: Path, model_dir: Path) -> None:
    assert run("start", str(model_dir), "--name", "lf", "--port", str(free_port()))[0] == 0
    record = read_record("lf")
    assert record is not None
    proc = spawn_cli("logs", "lf", "-n", "1", "-f", stdout=subprocess.PIPE,
                     stderr=subprocess.PIPE)
    time.sleep(1.5)
    with open(record.log_path, "a") as fh:
        fh.write("a line written after following began\n")
    time.sleep(1.0)
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=10)
    assert proc.returncode == EXIT_INTERRUPTED, err
    assert "Interrupted." in err and "Traceback" not in err
    assert "a line written after following began" in out


def test_logs_previous_before_any_restart_says_there_was_no_earlier_run(
    fake_engine: Path, model_dir: Path
) -> None:
    assert run("start", str(model_dir), "--name", "prev", "--port", str(free_port()))[0] == 0
    code, _, err = run("logs", "prev", "--previous")
    assert code == 9
    assert "no earlier run" in err and "no log" not in err
    assert "cmw-vllm logs prev" in err  # where the current run's log is
    assert run("restart", "prev")[0] == 0
    code, out, _ = run("logs", "prev", "--previous")
    assert code == 0 and "Starting to load model" in out
    code, _, err = run("logs", "nosuch", "--previous")
    assert code == 9 and "no log for server 'nosuch'" in err
