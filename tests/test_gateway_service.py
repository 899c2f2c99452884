"""The gateway as a service: its systemd unit, sd_notify, and restart/test/logs of its name."""

from __future__ import annotations

import json
import os
import select
import signal
import socket
import stat
import struct
import subprocess
import sys
from pathlib import Path

import pytest
import requests

from cmw_vllm.gateway.service import shutdown_budget
from cmw_vllm.gateway.settings import GatewaySettings
from cmw_vllm.server_record import read_record, record_names
from cmw_vllm.systemd_unit import STOP_SLACK_S
from tests.conftest import alive_pids, free_port, write_models
from tests.conftest import run_cli as run
from tests.test_gateway import _chat
from tests.test_systemd_unit import unit_values, verify

KEYS = "CMW_VLLM_GATEWAY_API_KEYS"


@pytest.fixture
def unit_dirs(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> tuple[Path, Path]:
    """User units under a temp XDG_CONFIG_HOME, system units in a temp dir."""
    monkeypatch.setenv("XDG_CONFIG_HOME", str(tmp_path / "config"))
    monkeypatch.setenv("CMW_VLLM_SYSTEM_UNIT_DIR", str(tmp_path / "system"))
    monkeypatch.delenv(KEYS, raising=False)
    for var in ("CMW_VLLM_GATEWAY_API_KEY_FILE", "CMW_VLLM_STOP_TIMEOUT",
                "CMW_VLLM_DRAIN_TIMEOUT"):
        monkeypatch.delenv(var, raising=False)
    return tmp_path / "config" / "systemd" / "user", tmp_path / "system"


def _background(*args: str) -> dict[str, object]:
    code, out, err = run("gateway", *args, "--background", "--json")
    assert code == 0, err
    return json.loads(out)


def test_enable_a_gateway_writes_a_verified_unit_and_keeps_its_keys_out(
    tmp_path: Path, unit_dirs: tuple[Path, Path], isolated_home: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv(KEYS, "sk-gateway-secret-1")
    monkeypatch.setenv("VLLM_API_KEY", "sk-upstream-secret-2")
    port = free_port()
    info = _background("--name", "gw", "--port", str(port), "--idle-timeout", "300",
                       "--max-body-mb", "1.5")
    code, out, err = run("enable", "gw", "--json")
    assert code == 0, err
    files = json.loads(out)
    unit = unit_dirs[0] / "cmw-vllm-gw.service"
    assert files["unit"] == str(unit) and files["settings"] is None
    assert "systemctl --user enable --now cmw-vllm-gw.service" in files["commands"]
    text = unit.read_text()
    values = unit_values(text)
    assert values["Type"] == ["notify"] and values["KillMode"] == ["mixed"]
    assert values["Restart"] == ["on-failure"]
    exec_start = values["ExecStart"][0]
    assert exec_start.endswith(
        f"gateway --name gw --host 127.0.0.1 --port {port} --idle-timeout 300.0 "
        "--start-timeout 600.0 --queue-limit 512 --max-body-mb 1.5 --max-buffered-mb 512.0 "
        "--upstream-timeout 600.0 "
        "--header-timeout 60.0 --body-timeout 60.0 --max-client-connections 512 "
        "--shutdown-grace 10.0 --max-log-mb 16.0")
    assert values["LimitNOFILE"] == ["65536"]
    # The gateway's own shutdown: 10 s for its requests in flight (--shutdown-grace), then its
    # servers' drain + margin.
    stop_s = int(values["TimeoutStopSec"][0])
    assert stop_s == int(shutdown_budget() + STOP_SLACK_S) and stop_s >= 10 + 30 + 30
    assert read_record("gw").drain == int(shutdown_budget())  # `stop` waits as long
    assert "sk-gateway-secret-1" not in text and "sk-upstream-secret-2" not in text
    env_file = isolated_home / "services" / "gw.env"
    assert values["EnvironmentFile"] == [f"-{env_file}"]
    assert stat.S_IMODE(env_file.stat().st_mode) == 0o600
    assert env_file.read_text().splitlines() == [f"{KEYS}=sk-gateway-secret-1",
                                                 "VLLM_API_KEY=sk-upstream-secret-2"]
    verify(unit, tmp_path, user=True)

    code, out, _ = run("status", "gw", "--json")
    assert json.loads(out)["servers"][0]["enabled"] == "user"
    assert run("stop", "gw")[0] == 0 and not alive_pids([int(info["pid"])])  # type: ignore

    # Stopped, it is still known by its last run; without its key it would come back open.
    monkeypatch.delenv(KEYS)
    code, _, err = run("enable", "gw")
    assert code == 2 and "would come back without a key" in err and KEYS in err
    assert run("restart", "gw")[0] == 2

    code, out, _ = run("disable", "gw")
    assert code == 0 and "systemctl --user disable --now cmw-vllm-gw.service" in out
    assert not unit.exists() and not env_file.exists()


def test_enable_gateway_with_nothing_run_before_is_the_default_gateway(
    tmp_path: Path, unit_dirs: tuple[Path, Path], monkeypatch: pytest.MonkeyPatch,
) -> None:
    key_file = tmp_path / "keys"
    key_file.write_text("sk-from-file\n")
    key_file.chmod(0o600)
    monkeypatch.setenv("CMW_VLLM_GATEWAY_API_KEY_FILE", str(key_file))
    code, out, err = run("enable", "gateway", "--system")
    assert code == 0, err
    unit = unit_dirs[1] / "cmw-vllm-gateway.service"
    text = unit.read_text()
    values = unit_values(text)
    assert " gateway --name gateway --host 127.0.0.1 --port 4000 " in values["ExecStart"][0]
    assert values["WantedBy"] == ["multi-user.target"] and values["User"]
    assert "sk-from-file" not in text  # the key file's path goes to the 0600 env file
    verify(unit, tmp_path, user=False)
    # Any other unknown name is still an unknown server.
    code, _, err = run("enable", "no-such-gateway")
    assert code == 9 and "no managed server or registry entry" in err


def test_secret_looking_variables_never_enter_a_unit(tmp_path: Path, model_dir: Path,
                                                     isolated_home: Path) -> None:
    from cmw_vllm.server_config import build_config
    from cmw_vllm.systemd_unit import render_unit, write_env_file

    environ = {KEYS: "sk-gw", "CMW_VLLM_SOME_TOKEN": "tok", "CMW_VLLM_DRAIN_TIMEOUT": "7"}
    text = render_unit(build_config({"name": "s", "model": str(model_dir)}), system=False,
                       env_path=None, environ=environ)
    assert "sk-gw" not in text and "tok" not in text
    assert 'Environment="CMW_VLLM_DRAIN_TIMEOUT=7"' in text
    env_file = write_env_file("s", environ)
    assert env_file is not None
    assert env_file.read_text() == f"{KEYS}=sk-gw\nCMW_VLLM_SOME_TOKEN=tok\n"


def test_the_shutdown_budget_follows_the_drain(unit_dirs: tuple[Path, Path]) -> None:
    assert shutdown_budget({"CMW_VLLM_DRAIN_TIMEOUT": "120"}) == 10 + 120 + 30 + 10
    assert shutdown_budget({}) >= 10 + 30 + 30 + 10  # the default drain, or an entry's


def _receive(sock: socket.socket, timeout: float) -> tuple[str, int] | None:
    """One notify datagram and the pid that sent it; None when none came in time."""
    if not select.select([sock], [], [], timeout)[0]:
        return None
    data, ancillary, _, _ = sock.recvmsg(4096, socket.CMSG_SPACE(12))
    pid = next(struct.unpack("iII", d[:12])[0] for level, kind, d in ancillary
               if level == socket.SOL_SOCKET and kind == socket.SCM_CREDENTIALS)
    return data.decode(), pid


def test_the_gateway_unit_command_notifies_and_keeps_the_socket_to_itself(
    fake_engine: Path, model_dir: Path, tmp_path: Path, unit_dirs: tuple[Path, Path],
    isolated_home: Path,
) -> None:
    """What the unit runs: READY=1 once it listens, STOPPING=1 on SIGTERM, from its own pid
    only (the supervisor of a server it starts must not notify for the gateway's unit)."""
    write_models(isolated_home, {"a": {"model": str(model_dir), "port": free_port()}})
    port = free_port()
    _background("--name", "gw", "--port", str(port))
    assert run("enable", "gw")[0] == 0
    assert run("stop", "gw")[0] == 0
    words = unit_values((unit_dirs[0] / "cmw-vllm-gw.service").read_text())["ExecStart"][0]
    args = words.split()
    args = args[args.index("gateway"):]
    notify_path = str(tmp_path / "notify.sock")
    receiver = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    receiver.setsockopt(socket.SOL_SOCKET, socket.SO_PASSCRED, 1)
    receiver.bind(notify_path)
    proc = subprocess.Popen(
        [sys.executable, "-m", "cmw_vllm", *args],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        env={**os.environ, "NOTIFY_SOCKET": notify_path},
        preexec_fn=lambda: signal.signal(signal.SIGTERM, signal.SIG_DFL),
    )
    try:
        got = _receive(receiver, 60)
        assert got is not None and got[1] == proc.pid
        assert "READY=1" in got[0].split("\n")
        url = f"http://127.0.0.1:{port}"
        assert requests.get(f"{url}/health", timeout=10).status_code == 200  # it listens
        record = read_record("gw")
        assert record is not None and record.pid == proc.pid and record.foreground
        assert _chat(url, "a").status_code == 200  # starts server "a" under a supervisor
        code, out, err = run("test", "gw")
        assert code == 0 and "passed" in out and "a: running" in out, err
        code, _, err = run("restart", "gw")
        assert code == 6 and "runs in the foreground" in err
        assert "systemctl --user restart cmw-vllm-gw.service" in err
        proc.send_signal(signal.SIGTERM)  # what `systemctl stop` sends (KillMode=mixed)
        got = _receive(receiver, 30)
        assert got == ("STOPPING=1", proc.pid)
        assert proc.wait(timeout=60) == 0
        assert record_names() == []  # it stopped "a" too
        leftover = _receive(receiver, 0.5)
        assert leftover is None, leftover
    finally:
        if proc.poll() is None:
            proc.kill()
        receiver.close()


def test_restart_test_and_logs_of_a_background_gateway(unit_dirs: tuple[Path, Path]) -> None:
    port = free_port()
    first = _background("--name", "gw", "--port", str(port), "--idle-timeout", "123")
    code, out, err = run("restart", "gw", "--json")
    assert code == 0, err
    second = json.loads(out)
    assert second["url"] == f"http://127.0.0.1:{port}" and second["pid"] != first["pid"]
    assert not alive_pids([int(first["pid"])])  # type: ignore[call-overload]
    record = read_record("gw")
    assert record is not None and record.config["idle_timeout"] == 123.0
    assert not record.foreground

    code, out, err = run("test", "gw", "--json")
    assert code == 0, err
    result = json.loads(out)
    assert result["ok"] is True and result["task"] == "gateway"
    assert {"id": "qwen", "state": "startable"} in result["models"]
    code, out, _ = run("logs", "gw", "-n", "5")
    assert code == 0 and " INFO cmw_vllm.gateway.service: gateway 'gw' listening on " in out
    code, out, _ = run("logs", "gw", "--previous")
    assert code == 0 and "SIGTERM: shutting down" in out  # the run before the restart

    for command in ("verify", "estimate"):
        code, _, err = run(command, "gw")
        assert code == 2 and f"'gw' is a gateway, not a model: {command} takes" in err

    # After a stop, restart runs it again with the settings of its last run.
    assert run("stop", "gw")[0] == 0
    code, _, err = run("test", "gw")
    assert code == 3 and "no managed server" in err
    code, out, err = run("restart", "gw")
    assert code == 0 and f"on http://127.0.0.1:{port}/v1" in out, err
    record = read_record("gw")
    assert record is not None and record.config["idle_timeout"] == 123.0
    assert run("stop", "gw")[0] == 0


def test_test_of_a_gateway_with_keys_needs_one(unit_dirs: tuple[Path, Path],
                                               monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(KEYS, "sk-only-key")
    _background("--name", "gw", "--port", str(free_port()))
    monkeypatch.setenv(KEYS, "sk-wrong-key")
    code, _, err = run("test", "gw")
    assert code == 1 and "answered 401" in err and KEYS in err
    monkeypatch.setenv(KEYS, "sk-only-key")
    code, out, err = run("test", "gw")
    assert code == 0 and "Test of gateway 'gw' passed" in out, err
    assert run("stop", "gw")[0] == 0


# ------------------------------------------------------------------ a gateway's name elsewhere


def _keep_gateway(name: str) -> GatewaySettings:
    """Keep settings of a gateway's last run, as ``cmw-vllm gateway --name NAME`` does."""
    from cmw_vllm import last_start
    from cmw_vllm.vocab import GATEWAY_TASK

    settings = GatewaySettings(name=name, port=free_port())
    last_start.save(name, {"task": GATEWAY_TASK, **settings.public()}, None)
    return settings


def test_core_restart_of_a_gateway_says_it_is_one() -> None:
    from cmw_vllm.errors import GatewayNotServerError
    from cmw_vllm.server_manager import ServerManager

    _keep_gateway("edge")
    with pytest.raises(GatewayNotServerError, match="cannot restart 'edge' as a vLLM "
                       "server: it is a gateway") as caught:
        ServerManager().restart("edge")
    assert caught.value.hint is not None and "cmw-vllm restart edge" in caught.value.hint


@pytest.mark.parametrize("args", [("gateway", "--saved"), ("gateway",), ("edge", "--saved"),
                                  ("edge",)])
def test_start_of_a_kept_gateway_says_how_to_run_it(args: tuple[str, ...]) -> None:
    name = args[0]
    settings = _keep_gateway(name)
    code, out, err = run("start", *args)
    assert code == 2, err
    line, hint = err.strip().splitlines()
    assert line.startswith(f"Error: {name!r} is a gateway, not a vLLM server: run it with "
                           f"`cmw-vllm gateway --name {name} --host 127.0.0.1 "
                           f"--port {settings.port} "), line
    assert "enable" not in err and "saved settings" not in err
    assert f"cmw-vllm restart {name}" in hint
    assert read_record(name) is None  # nothing was started


def test_start_gateway_saved_with_nothing_run_before_points_at_the_gateway() -> None:
    code, _, err = run("start", "gateway", "--saved")
    assert code == 2
    assert err.splitlines()[0] == ("Error: 'gateway' is a gateway, not a vLLM server: run it "
                                   "with `cmw-vllm gateway`")


def test_start_of_a_running_gateway_says_it_runs() -> None:
    from cmw_vllm.gateway.service import remove_record, write_record

    settings = GatewaySettings(name="front", port=free_port())
    write_record(settings, foreground=False)  # this process, as the gateway
    try:
        code, _, err = run("start", "front", "--saved")
    finally:
        remove_record(settings)  # never let the cleanup stop this process
    assert code == 2
    assert "'front' is a gateway, not a vLLM server: run it with `cmw-vllm gateway --name " \
        "front" in err
    assert f"it already runs (pid {os.getpid()})" in err


@pytest.mark.parametrize(("key", "value", "why"), [
    ("port", "4000", "port is '4000'"),
    ("port", 70000, "port 70000 is not in 1-65535"),
    ("adopt", 1, "adopt is 1"),
    ("idle_timeout", None, "idle_timeout is None"),
    ("queue_limit", 2.5, "queue_limit is 2.5"),
])
def test_kept_gateway_settings_of_the_wrong_kind_are_one_line_errors(
        unit_dirs: tuple[Path, Path], key: str, value: object, why: str) -> None:
    from cmw_vllm import last_start
    from cmw_vllm.vocab import GATEWAY_TASK

    settings = GatewaySettings(name="edge", port=free_port())
    last_start.save("edge", {"task": GATEWAY_TASK, **settings.public(), key: value}, None)
    for command in (("restart", "edge"), ("enable", "edge")):
        code, out, err = run(*command)
        assert code == 2, (command, out, err)
        assert err.splitlines()[0] == ("Error: the kept settings of gateway 'edge' are "
                                       f"invalid: {why}"), command
        assert "Traceback" not in err
    assert read_record("edge") is None
    user_units, _ = unit_dirs
    assert not list(user_units.glob("*.service"))  # no unit was written


def test_a_broken_models_file_keeps_the_gateway_from_starting(isolated_home: Path,
                                                              unit_dirs: tuple[Path, Path]
                                                              ) -> None:
    """As `list` and `start` do: one line with the file, line and column; exit 2."""
    isolated_home.mkdir(parents=True, exist_ok=True)
    (isolated_home / "models.toml").write_text('[models.tiny]\nmodel = "a/b"\nbad = \n')
    port = str(free_port())
    code, out, err = run("gateway", "--port", port, "--background")
    lines = [line for line in err.splitlines() if line.strip()]
    assert code == 2, (out, err)
    assert lines == [f"Error: {isolated_home / 'models.toml'}: invalid TOML: Invalid value "
                     "(at line 3, column 7)"]
    assert run("list")[2] == err  # the same words as list's
    # In the foreground too (also what a systemd unit runs); bounded: it must not serve.
    proc = subprocess.run([sys.executable, "-m", "cmw_vllm", "gateway", "--port", port],
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr.strip() == lines[0]
    assert record_names() == []
    assert not (isolated_home / "logs" / "gateway.log").exists()
