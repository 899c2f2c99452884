"""restart, stop and start again, against the stand-in engine: settings and API key kept,
names checked, differing settings refused, what a dead server leaves and says."""

from __future__ import annotations

import json
import stat
from pathlib import Path

import psutil
import pytest

from cmw_vllm.server_record import read_record
from tests.conftest import free_port, wait_for_state
from tests.conftest import run_cli as run


def api_env(name: str) -> dict[str, str]:
    record = read_record(name)
    assert record is not None
    return psutil.Process(record.pid).environ()


def test_restart_keeps_the_api_key(fake_engine: Path, model_dir: Path,
                                   monkeypatch: pytest.MonkeyPatch, isolated_home: Path) -> None:
    monkeypatch.setenv("VLLM_API_KEY", "sk-kept-4711")
    port = str(free_port())
    code, _, err = run("start", str(model_dir), "--name", "k", "--host", "0.0.0.0",
                       "--port", port)
    assert code == 0, err
    assert "without an API key" not in err
    monkeypatch.delenv("VLLM_API_KEY")  # a shell without the key
    code, out, err = run("restart", "k")
    assert code == 0, err
    assert api_env("k")["VLLM_API_KEY"] == "sk-kept-4711"
    assert "without an API key" not in err
    assert "Bearer $VLLM_API_KEY" in out  # the example request sends it
    # After stop too; a key in the environment wins over the kept one.
    assert run("stop", "k")[0] == 0
    monkeypatch.setenv("VLLM_API_KEY", "sk-new")
    assert run("restart", "k")[0] == 0
    assert api_env("k")["VLLM_API_KEY"] == "sk-new"
    key_file = isolated_home / "restart" / "k.key"
    assert key_file.read_text().strip() == "sk-new"
    assert stat.S_IMODE(key_file.stat().st_mode) == 0o600


def test_restart_refuses_when_the_kept_key_cannot_be_read(
        fake_engine: Path, model_dir: Path, monkeypatch: pytest.MonkeyPatch,
        isolated_home: Path) -> None:
    monkeypatch.setenv("VLLM_API_KEY", "sk-lost")
    assert run("start", str(model_dir), "--name", "lost", "--port", str(free_port()))[0] == 0
    monkeypatch.delenv("VLLM_API_KEY")
    assert run("stop", "lost")[0] == 0
    key_file = isolated_home / "restart" / "lost.key"
    key_file.unlink()
    key_file.mkdir()  # unreadable as a file
    code, _, err = run("restart", "lost")
    assert code == 8
    assert "cannot read the API key of 'lost'" in err
    assert read_record("lost") is None  # nothing was started without it


def test_restart_of_a_public_server_without_key_warns(fake_engine: Path,
                                                      model_dir: Path) -> None:
    assert run("start", str(model_dir), "--name", "open", "--host", "0.0.0.0",
               "--port", str(free_port()))[0] == 0
    code, _, err = run("restart", "open")
    assert code == 0
    assert "without an API key" in err
    assert "VLLM_API_KEY" not in api_env("open")


def test_restart_after_stop_uses_the_last_settings(fake_engine: Path, model_dir: Path) -> None:
    port = free_port()
    assert run("start", str(model_dir), "--name", "again", "--port", str(port),
               "--max-model-len", "256", "--", "--enforce-eager")[0] == 0
    before = read_record("again")
    assert run("stop", "again")[0] == 0
    code, out, err = run("restart", "again")
    assert code == 0, err
    assert "is ready" in out
    after = read_record("again")
    assert after is not None and before is not None
    assert after.config == before.config and after.port == port
    assert "--enforce-eager" in after.command
    code, _, err = run("restart", "never-started")
    assert code == 3
    assert "cmw-vllm start" in err


def test_stop_of_an_unknown_name_is_an_error(fake_engine: Path, model_dir: Path) -> None:
    code, _, err = run("stop", "qwen3-06b")  # a typo of a registry alias
    assert code == 3
    assert "did you mean" in err and "qwen3-0.6b" in err
    code, _, err = run("stop", "nosuch")
    assert code == 3
    assert "no server or registry entry named 'nosuch'" in err
    # Known names that are not running stay exit 0: a registry alias, a stopped server.
    code, out, _ = run("stop", "qwen3-0.6b")
    assert (code, "is not running" in out) == (0, True)
    assert run("start", str(model_dir), "--name", "mine", "--port", str(free_port()))[0] == 0
    assert run("stop", "mine")[0] == 0
    code, out, _ = run("stop", "mine")
    assert (code, "is not running" in out) == (0, True)
    code, _, err = run("stop", "mien")
    assert code == 3
    assert "mine" in err


def test_second_start_with_other_settings_says_so(fake_engine: Path, model_dir: Path) -> None:
    port = str(free_port())
    assert run("start", str(model_dir), "--name", "twice", "--port", port,
               "--max-model-len", "256")[0] == 0
    pid = read_record("twice").pid  # type: ignore[union-attr]
    # The same options, or none: already running, exit 0.
    for extra in ([], ["--port", port], ["--max-model-len", "256"]):
        code, out, err = run("start", str(model_dir), "--name", "twice", *extra)
        assert (code, "already running" in out) == (0, True), err
    other = str(free_port())
    code, _, err = run("start", str(model_dir), "--name", "twice", "--port", other,
                       "--max-model-len", "512")
    assert code == 6
    assert "already runs with other settings" in err
    assert f"--port {other} (running: {port})" in err
    assert "--max-model-len 512 (running: 256)" in err
    assert "cmw-vllm stop twice" in err
    assert read_record("twice").pid == pid  # type: ignore[union-attr]


def test_failed_start_leaves_no_files(fake_engine: Path, model_dir: Path,
                                      monkeypatch: pytest.MonkeyPatch,
                                      isolated_home: Path) -> None:
    monkeypatch.setenv("FAKE_VLLM_MODE", "oom")
    code, _, err = run("start", str(model_dir), "--name", "oom", "--port", str(free_port()))
    assert code == 1
    assert "--- from the log ---" in err
    assert list((isolated_home / "servers").iterdir()) == []  # no record, pid or exit file


def test_status_of_an_exited_server_shows_the_end_of_its_log(
        fake_engine: Path, model_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("FAKE_VLLM_MODE", "die_after_ready")
    assert run("start", str(model_dir), "--name", "gone", "--port", str(free_port()))[0] == 0
    assert wait_for_state("gone", "exited").state == "exited"
    code, out, _ = run("status", "gone", "--json")
    assert code == 1
    tail = json.loads(out)["servers"][0]["log_tail"]
    assert tail and "Application startup complete." in tail[-1]
    code, _, err = run("status", "gone")
    assert code == 1
    assert "gone: from its log" in err
    assert "Application startup complete." in err


def test_unreadable_record_is_called_so(isolated_home: Path) -> None:
    servers = isolated_home / "servers"
    servers.mkdir(parents=True)
    (servers / "bad.json").write_text('{"name": "bad')
    code, _, err = run("status")
    assert code == 1
    assert "at at" not in err
    assert "Unterminated string starting at line 1, column 10" in err
    code, out, _ = run("stop", "bad")
    assert code == 0
    assert "unreadable record" in out and "stale" not in out


def test_empty_variables_never_reach_vllm(fake_engine: Path, model_dir: Path,
                                          monkeypatch: pytest.MonkeyPatch) -> None:
    example = Path(__file__).resolve().parent.parent / ".env.example"
    (Path.cwd() / ".env").write_text(example.read_text() + "HF_TOKEN=\nVLLM_API_KEY=\n")
    monkeypatch.setenv("HF_ENDPOINT", "")  # exported empty in the shell
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "")  # empty here means "no GPU": kept
    for var in ("LOG_LEVEL", "LOG_FILE_ENABLED", "CMW_VLLM_HOST", "CMW_VLLM_START_TIMEOUT",
                "CMW_VLLM_STOP_TIMEOUT", "CMW_VLLM_HEALTH_TIMEOUT"):
        monkeypatch.setenv(var, "placeholder")  # undo what the .env sets, after the test
        monkeypatch.delenv(var)
    code, _, err = run("start", str(model_dir), "--name", "dotenv", "--port", str(free_port()))
    assert code == 0, err
    environ = api_env("dotenv")
    for var in ("HF_TOKEN", "VLLM_API_KEY", "HF_ENDPOINT", "HF_HUB_OFFLINE"):
        assert var not in environ, var
    assert environ["CUDA_VISIBLE_DEVICES"] == ""


def _bare_shell(monkeypatch: pytest.MonkeyPatch) -> None:
    """A shell without what shaped the start: no CMW_VLLM_PYTHON, no KV cache size, no token."""
    for var in ("CMW_VLLM_PYTHON", "VLLM_CPU_KVCACHE_SPACE", "HF_TOKEN"):
        monkeypatch.delenv(var, raising=False)


def test_restart_keeps_the_interpreter_and_environment_of_the_last_start(
        fake_engine: Path, model_dir: Path, monkeypatch: pytest.MonkeyPatch,
        isolated_home: Path) -> None:
    secret = "hf_kept-do-not-leak-4711"
    monkeypatch.setenv("VLLM_CPU_KVCACHE_SPACE", "1")
    monkeypatch.setenv("HF_TOKEN", secret)
    assert run("start", str(model_dir), "--name", "kept", "--port", str(free_port()))[0] == 0
    _bare_shell(monkeypatch)
    monkeypatch.setenv("VLLM_LOGGING_LEVEL", "DEBUG")  # not set at the last start
    code, out, err = run("restart", "kept")
    assert code == 0, err
    record = read_record("kept")
    assert record is not None and record.command[0] == str(fake_engine)
    environ = api_env("kept")
    assert environ["VLLM_CPU_KVCACHE_SPACE"] == "1"
    assert environ["HF_TOKEN"] == secret
    assert "VLLM_LOGGING_LEVEL" not in environ  # the restart reproduces the last start
    assert "VLLM_LOGGING_LEVEL" in err and "cmw-vllm stop kept" in err
    assert secret not in out + err
    # After stop too, and the file that keeps the token is private.
    assert run("stop", "kept")[0] == 0
    code, _, err = run("restart", "kept")
    assert code == 0, err
    assert api_env("kept")["VLLM_CPU_KVCACHE_SPACE"] == "1"
    kept_file = isolated_home / "restart" / "kept.env"
    assert stat.S_IMODE(kept_file.stat().st_mode) == 0o600
    for f in isolated_home.rglob("*"):  # no other file holds the token
        if f.is_file() and f != kept_file:
            assert secret.encode() not in f.read_bytes(), f


def test_restart_whose_check_fails_leaves_the_server_running(
        fake_engine: Path, model_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    assert run("start", str(model_dir), "--name", "safe", "--port", str(free_port()))[0] == 0
    pid = read_record("safe").pid  # type: ignore[union-attr]
    # The interpreter it ran in has lost vLLM since (the running server is unaffected).
    fake_engine.write_text("#!/bin/sh\nexit 3\n")
    _bare_shell(monkeypatch)
    code, out, err = run("restart", "safe")
    assert code == 8
    status = wait_for_state("safe", "healthy")
    assert (status.state, status.pid) == ("healthy", pid)  # checked before the stop
    assert err.splitlines()[0] == f"Error: vLLM is not installed in {fake_engine}"
    assert "Traceback" not in err and out == ""


def test_restart_runs_the_memory_check_with_the_kept_settings(
        fake_engine: Path, tiny_model: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("VLLM_CPU_KVCACHE_SPACE", "100000")  # GiB: more than any RAM here
    code, _, err = run("start", str(tiny_model), "--name", "huge", "--port", str(free_port()),
                       "--force")
    assert code == 0, err
    pid = read_record("huge").pid  # type: ignore[union-attr]
    monkeypatch.setenv("VLLM_CPU_KVCACHE_SPACE", "1")  # this shell's value is not the kept one
    code, out, err = run("restart", "huge")
    assert code == 7
    assert "will not fit in RAM" in err and "--force" in err
    assert "Traceback" not in err and out == ""
    status = wait_for_state("huge", "healthy")
    assert (status.state, status.pid) == ("healthy", pid)
    code, _, err = run("restart", "huge", "--force")  # the user's call, as for start
    assert code == 0, err
    assert api_env("huge")["VLLM_CPU_KVCACHE_SPACE"] == "100000"


def test_status_counts_one_restart_in_the_singular(fake_engine: Path, model_dir: Path) -> None:
    from cmw_vllm.server_record import update_record

    assert run("start", str(model_dir), "--name", "once", "--port", str(free_port()))[0] == 0
    record = read_record("once")
    assert record is not None
    for count, shown in ((1, "healthy (1 restart)"), (2, "healthy (2 restarts)")):
        assert update_record("once", record.supervisor_pid, restart_count=count) is not None
        code, out, _ = run("status", "once")
        assert code == 0
        assert shown in out


def test_restart_counts_the_memory_of_the_running_server_as_free(
        fake_engine: Path, tiny_model: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from cmw_vllm import memory_check
    from cmw_vllm.errors import InsufficientResourcesError
    from cmw_vllm.server_config import ServerConfig
    from cmw_vllm.server_manager import _memory_held
    from cmw_vllm.vocab import GiB

    assert run("start", str(tiny_model), "--name", "held",
               "--port", str(free_port()), "--force")[0] == 0
    record = read_record("held")
    gpus, ram = _memory_held(record)
    assert gpus == [] and ram > 0  # no GPU here; its processes hold private RAM
    # 1 GiB of KV space and the runtime (3 GiB) do not fit in 2 GiB available; they do once
    # the 4 GiB the running server holds count.
    monkeypatch.setattr(memory_check, "cpu_memory", lambda: (64 * GiB, 2 * GiB))
    config = ServerConfig(name="held", model=str(tiny_model))
    environ = {"VLLM_CPU_KVCACHE_SPACE": "1"}
    with pytest.raises(InsufficientResourcesError, match="RAM"):
        memory_check.preflight(config, gpus=[], environ=environ)
    assert memory_check.preflight(config, gpus=[], environ=environ,
                                  ram_freed=4 * GiB).status == "ok"
