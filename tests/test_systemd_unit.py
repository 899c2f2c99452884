"""enable / disable: systemd units checked by `systemd-analyze verify`, secrets kept out."""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import stat
import subprocess
import sys
from pathlib import Path

import pytest

from cmw_vllm.server_record import read_record
from cmw_vllm.systemd_unit import definition_for, render_unit
from tests.conftest import free_port
from tests.conftest import run_cli as run


@pytest.fixture
def unit_dirs(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> tuple[Path, Path]:
    """User units under a temp XDG_CONFIG_HOME, system units in a temp dir."""
    monkeypatch.setenv("XDG_CONFIG_HOME", str(tmp_path / "config"))
    monkeypatch.setenv("CMW_VLLM_SYSTEM_UNIT_DIR", str(tmp_path / "system"))
    return tmp_path / "config" / "systemd" / "user", tmp_path / "system"


def verify(unit: Path, tmp_path: Path, user: bool) -> None:
    """`systemd-analyze verify` must accept the unit without a single warning."""
    analyze = shutil.which("systemd-analyze")
    if analyze is None:
        if os.environ.get("CI"):
            pytest.fail("CI must provide systemd-analyze (scripts/install.sh installs it)")
        pytest.skip("systemd-analyze is not installed")
    runtime = tmp_path / "runtime"
    runtime.mkdir(mode=0o700, exist_ok=True)
    cmd = [analyze, *(["--user"] if user else []), "verify", str(unit)]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=60,
                          env={**os.environ, "XDG_RUNTIME_DIR": str(runtime)})
    assert done.returncode == 0, done.stderr
    assert done.stderr == "", done.stderr


def unit_values(text: str) -> dict[str, list[str]]:
    values: dict[str, list[str]] = {}
    for line in text.splitlines():
        if "=" in line and not line.startswith(("#", "[")):
            key, _, value = line.partition("=")
            values.setdefault(key, []).append(value)
    return values


def test_enable_a_running_server_writes_a_verified_user_unit(
    fake_engine: Path, model_dir: Path, tmp_path: Path, unit_dirs: tuple[Path, Path],
    isolated_home: Path, monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("VLLM_API_KEY", "sk-secret-key-123")
    port = free_port()
    assert run("start", str(model_dir), "--name", "web", "--port", str(port), "--drain", "45",
               "--restart", "on-failure", "--max-model-len", "512")[0] == 0
    code, out, err = run("enable", "web")
    assert code == 0, err
    unit = unit_dirs[0] / "cmw-vllm-web.service"
    assert f"Wrote {unit}" in out
    assert "systemctl --user daemon-reload" in out
    assert "systemctl --user enable --now cmw-vllm-web.service" in out
    assert "loginctl enable-linger" in out
    text = unit.read_text()
    values = unit_values(text)
    assert values["Type"] == ["notify"] and values["KillMode"] == ["mixed"]
    assert values["Restart"] == ["on-failure"]
    assert values["TimeoutStopSec"] == [str(45 + 30 + 15)]  # drain + stop timeout + slack
    assert int(values["TimeoutStartSec"][0]) >= 1800
    assert values["ExecStart"][0].endswith("start web --foreground --saved")
    assert values["WantedBy"] == ["default.target"]
    assert f'Environment="CMW_VLLM_HOME={isolated_home}"' in text
    # The secret is in a 0600 env file the unit names, never in the unit itself.
    assert "sk-secret-key-123" not in text
    env_file = isolated_home / "services" / "web.env"
    assert values["EnvironmentFile"] == [f"-{env_file}"]
    assert stat.S_IMODE(env_file.stat().st_mode) == 0o600
    assert "VLLM_API_KEY=sk-secret-key-123" in env_file.read_text()
    saved = json.loads((isolated_home / "services" / "web.json").read_text())
    assert (saved["model"], saved["port"], saved["drain"], saved["restart"]) == \
        (str(model_dir), port, 45, "on-failure")
    verify(unit, tmp_path, user=True)

    code, out, _ = run("status", "web", "--json")
    assert json.loads(out)["servers"][0]["enabled"] == "user"
    code, out, _ = run("status", "web")  # the table says it too
    header, row = out.splitlines()[:2]
    assert row.split()[header.split().index("ENABLED")] == "user"

    code, out, _ = run("disable", "web")
    assert code == 0
    assert "systemctl --user disable --now cmw-vllm-web.service" in out
    assert not unit.exists() and not env_file.exists()
    code, out, _ = run("status", "web", "--json")
    assert json.loads(out)["servers"][0]["enabled"] is None
    code, out, _ = run("status", "web")
    header, row = out.splitlines()[:2]
    assert row.split()[header.split().index("ENABLED")] == "-"
    code, _, err = run("disable", "web")
    assert code == 9 and "not enabled" in err


def test_enable_a_registry_entry_as_a_system_unit(tmp_path: Path, unit_dirs: tuple[Path, Path],
                                                  isolated_home: Path) -> None:
    from cmw_vllm.model_registry import builtin_entries

    entry = builtin_entries()[0]
    code, out, err = run("enable", entry.alias, "--system")
    assert code == 0, err
    unit = unit_dirs[1] / f"cmw-vllm-{entry.alias}.service"
    text = unit.read_text()
    values = unit_values(text)
    assert values["WantedBy"] == ["multi-user.target"]
    assert values["User"] and values["After"] == ["network-online.target"]
    assert "loginctl" not in out and "systemctl daemon-reload" in out
    saved = json.loads((isolated_home / "services" / f"{entry.alias}.json").read_text())
    assert saved["model"] == entry.model and saved["port"] == entry.port
    verify(unit, tmp_path, user=False)


@pytest.mark.parametrize("booted", [True, False], ids=["systemd", "no-systemd"])
def test_enable_says_when_systemd_is_not_running_here(
        booted: bool, tmp_path: Path, unit_dirs: tuple[Path, Path],
        monkeypatch: pytest.MonkeyPatch) -> None:
    """The unit is written either way (for the machine that boots with it); a warning says
    when nothing here will start it."""
    from cmw_vllm import systemd_unit
    from cmw_vllm.model_registry import builtin_entries

    run_dir = tmp_path / "run-systemd-system"
    if booted:
        run_dir.mkdir()
    monkeypatch.setattr(systemd_unit, "SYSTEMD_RUN_DIR", run_dir)
    alias = builtin_entries()[0].alias
    code, out, err = run("enable", alias, "--json")
    assert code == 0, err
    assert json.loads(out)["systemd_running"] is booted
    assert (unit_dirs[0] / f"cmw-vllm-{alias}.service").is_file()
    warned = "Warning: systemd is not running on this machine (no /run/systemd/system)"
    assert (warned in err) is not booted
    assert len(err.splitlines()) == (0 if booted else 1)


def test_units_quote_odd_values(tmp_path: Path, model_dir: Path) -> None:
    """Spaces, % and $ in paths and values survive systemd's parsing."""
    from cmw_vllm.server_config import build_config

    config = build_config({"name": "odd", "model": str(model_dir)})
    text = render_unit(config, system=False, env_path=tmp_path / "a b" / "odd.env",
                       environ={"CMW_VLLM_HOME": "x", "HF_HOME": str(tmp_path / "100% $HOME"),
                                "VLLM_API_KEY": "secret", "UNRELATED": "nope"})
    assert "secret" not in text and "UNRELATED" not in text
    assert "100%% $HOME" in text
    unit = tmp_path / "cmw-vllm-odd.service"
    unit.write_text(text)
    verify(unit, tmp_path, user=True)


def test_enable_needs_a_known_server(unit_dirs: tuple[Path, Path]) -> None:
    code, _, err = run("enable", "no-such-server-anywhere")
    assert code == 9 and "no managed server or registry entry" in err
    code, _, err = run("start", "nothing-saved", "--saved")
    assert code == 9 and "cmw-vllm enable nothing-saved" in err


def test_the_unit_command_runs_in_the_foreground_and_notifies(
    fake_engine: Path, model_dir: Path, tmp_path: Path, unit_dirs: tuple[Path, Path],
) -> None:
    """What the unit runs: `start NAME --foreground --saved`, READY=1 to $NOTIFY_SOCKET."""
    port = free_port()
    assert run("start", str(model_dir), "--name", "svc", "--port", str(port))[0] == 0
    assert run("enable", "svc")[0] == 0
    assert definition_for("svc").port == port
    assert run("stop", "svc")[0] == 0
    notify_path = str(tmp_path / "notify.sock")
    receiver = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    receiver.bind(notify_path)
    receiver.settimeout(30)
    proc = subprocess.Popen(
        [sys.executable, "-m", "cmw_vllm", "start", "svc", "--foreground", "--saved"],
        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
        env={**os.environ, "NOTIFY_SOCKET": notify_path},
        preexec_fn=lambda: signal.signal(signal.SIGTERM, signal.SIG_DFL),
    )
    try:
        assert "READY=1" in receiver.recv(4096).decode().split("\n")
        record = read_record("svc")
        assert record is not None and record.foreground and record.port == port
        proc.send_signal(signal.SIGTERM)  # what `systemctl stop` sends (KillMode=mixed)
        assert "STOPPING=1" in receiver.recv(4096).decode()
        proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
        receiver.close()
    assert proc.returncode == 0


def test_enable_from_a_bare_shell_keeps_what_the_last_start_used(
    fake_engine: Path, model_dir: Path, tmp_path: Path, unit_dirs: tuple[Path, Path],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Like restart, the unit starts the server as it was last started: its interpreter and
    its VLLM_* settings, not those of the shell that runs `enable`."""
    monkeypatch.setenv("VLLM_CPU_KVCACHE_SPACE", "3")
    assert run("start", str(model_dir), "--name", "kept", "--port", str(free_port()))[0] == 0
    monkeypatch.delenv("CMW_VLLM_PYTHON")
    monkeypatch.delenv("VLLM_CPU_KVCACHE_SPACE")
    monkeypatch.setenv("VLLM_LOGGING_LEVEL", "DEBUG")  # set here only: not the last start's
    code, _, err = run("enable", "kept")
    assert code == 0, err
    text = (unit_dirs[0] / "cmw-vllm-kept.service").read_text()
    assert 'Environment="VLLM_CPU_KVCACHE_SPACE=3"' in text
    assert f'Environment="CMW_VLLM_PYTHON={fake_engine}"' in text
    assert "VLLM_LOGGING_LEVEL" not in text
    verify(unit_dirs[0] / "cmw-vllm-kept.service", tmp_path, user=True)
