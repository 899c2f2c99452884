"""Shared memory that a SIGKILLed server leaves in /dev/shm is removed, and nothing else is.

The stand-in engine (``FAKE_VLLM_SHM=1``) makes a ``psm_*`` segment and a ``sem.mp-*``
semaphore the way vLLM's processes do; a SIGKILL of its group leaves both behind.
"""

from __future__ import annotations

import contextlib
import os
import re
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from multiprocessing import shared_memory
from pathlib import Path

import pytest

from cmw_vllm import paths, shm_segments
from cmw_vllm.server_record import read_record, shm_path
from tests.conftest import _stop_everything, free_port, wait_for_state
from tests.conftest import run_cli as run

SHM = Path("/dev/shm")
pytestmark = pytest.mark.skipif(not SHM.is_dir(), reason="no /dev/shm on this system")

MAP_AND_WAIT = """
import mmap, sys, time
with open(sys.argv[1], "r+b") as fh:
    view = mmap.mmap(fh.fileno(), 0)
print("mapped", flush=True)
time.sleep(120)
"""


def server_segments(name: str) -> list[str]:
    """The /dev/shm names the stand-in logged for server ``name``."""
    record = read_record(name)
    assert record is not None
    found = re.search(r"shared memory: (psm_\S+) (sem\.mp-\S+)", Path(record.log_path).read_text())
    assert found, "the stand-in logged no shared memory"
    return [found.group(1), found.group(2)]


@pytest.fixture
def stranger() -> Iterator[str]:
    """A psm_ segment of this user that no server made (and that nothing maps)."""
    segment = shared_memory.SharedMemory(create=True, size=4096)
    segment.close()
    yield segment.name
    with contextlib.suppress(FileNotFoundError):
        segment.unlink()


@pytest.fixture
def shm_engine(fake_engine: Path, isolated_home: Path,
               monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    """The stand-in making shared memory; whatever a failing test leaves of it is removed."""
    monkeypatch.setenv("FAKE_VLLM_SHM", "1")
    yield fake_engine
    _stop_everything(isolated_home)
    busy = shm_segments.in_use() or set()
    for log in (isolated_home / "logs").glob("*.log*"):
        for names in re.findall(r"shared memory: (psm_\S+) (sem\.mp-\S+)", log.read_text()):
            for name in names:
                with contextlib.suppress(FileNotFoundError):
                    st = os.stat(SHM / name)
                    if (st.st_dev, st.st_ino) not in busy:
                        (SHM / name).unlink()


def test_stop_now_removes_the_servers_shared_memory_only(
        shm_engine: Path, model_dir: Path, isolated_home: Path, stranger: str) -> None:
    assert run("start", str(model_dir), "--name", "a", "--port", str(free_port()))[0] == 0
    assert run("start", str(model_dir), "--name", "b", "--port", str(free_port()))[0] == 0
    seg_a, seg_b = server_segments("a"), server_segments("b")
    assert all((SHM / n).exists() for n in seg_a + seg_b)
    # Another process maps one of a's segments: in use, it must stay.
    holder = subprocess.Popen([sys.executable, "-c", MAP_AND_WAIT, str(SHM / seg_a[0])],
                              stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout is not None and holder.stdout.readline().strip() == "mapped"
        code, _, err = run("stop", "a", "--now")
        assert code == 0, err
        assert (SHM / seg_a[0]).exists()  # mapped by the holder
        assert not (SHM / seg_a[1]).exists()  # the semaphore: SIGKILLed with its tracker
        assert (SHM / stranger).exists()
        assert all((SHM / n).exists() for n in seg_b)  # server b runs on
        assert run("status", "b")[0] == 0
    finally:
        holder.kill()
        holder.wait()
    with contextlib.suppress(FileNotFoundError):
        (SHM / seg_a[0]).unlink()
    assert run("stop", "b", "--now")[0] == 0
    assert not any((SHM / n).exists() for n in seg_b)
    assert (SHM / stranger).exists()
    assert not shm_path("b").exists()


def test_a_crash_then_stop_removes_what_the_crashed_run_left(
        shm_engine: Path, model_dir: Path, isolated_home: Path) -> None:
    assert run("start", str(model_dir), "--name", "c", "--port", str(free_port()))[0] == 0
    segments = server_segments("c")
    record = read_record("c")
    assert record is not None
    # The supervisor notes them while vLLM loads and once it is ready.
    deadline = time.monotonic() + 10
    while not set(segments) <= {s.name for s in shm_segments._load("c")}:
        assert time.monotonic() < deadline, "the supervisor did not note the segments"
        time.sleep(0.05)
    os.killpg(record.pgid, signal.SIGKILL)  # everything of vLLM at once, as the OOM killer
    assert wait_for_state("c", "exited").state == "exited"
    assert all((SHM / n).exists() for n in segments)  # left behind, as by vLLM
    assert run("stop", "c")[0] == 0
    assert not any((SHM / n).exists() for n in segments)


def test_a_restarting_supervisor_removes_the_crashed_runs_shared_memory(
        shm_engine: Path, model_dir: Path, isolated_home: Path,
        monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CMW_VLLM_RESTART_BACKOFF", "0.2")
    assert run("start", str(model_dir), "--name", "r", "--port", str(free_port()),
               "--restart", "on-failure")[0] == 0
    first = read_record("r")
    assert first is not None
    segments = server_segments("r")
    os.killpg(first.pgid, signal.SIGKILL)
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        current = read_record("r")
        if current is not None and current.pid != first.pid and current.ready_at:
            break
        time.sleep(0.05)
    else:
        raise AssertionError("the supervisor did not relaunch the server")
    assert not any((SHM / n).exists() for n in segments)
    assert run("stop", "r")[0] == 0


def test_a_noted_file_replaced_by_another_is_left_alone(isolated_home: Path,
                                                         stranger: str) -> None:
    paths.ensure_dir(paths.servers_dir())
    st = os.stat(SHM / stranger)
    other = shm_segments.Segment(stranger, st.st_dev, st.st_ino + 1)  # same name, not the file
    shm_segments._save("x", {other})
    assert shm_segments.remove_leftovers("x") == []
    assert (SHM / stranger).exists()
    mine = shm_segments.Segment(stranger, st.st_dev, st.st_ino)
    shm_segments._save("x", {mine})
    assert shm_segments.remove_leftovers("x") == [stranger]
    assert not (SHM / stranger).exists()
    assert not shm_path("x").exists()
