"""The lifecycle on real vLLM (CPU build) serving the tiny random-weight model."""

from __future__ import annotations

import json
import os
import signal
from pathlib import Path

import psutil
import pytest
import requests

from cmw_vllm import shm_segments
from cmw_vllm.server_manager import group_members
from cmw_vllm.server_record import read_record
from tests.conftest import alive_pids, free_port, wait_for_state
from tests.conftest import run_cli as run

pytestmark = pytest.mark.vllm


def test_real_lifecycle(real_vllm: str, tiny_model: Path,
                        monkeypatch: pytest.MonkeyPatch) -> None:
    """start -> healthy -> chat answers -> restart from a shell without the start's settings
    -> SIGKILL API server -> stop: nothing left (no process, no shared memory in /dev/shm)."""
    port = free_port()
    code, out, err = run("start", str(tiny_model), "--name", "tiny", "--port", str(port),
                         "--max-model-len", "512", "--timeout", "600", "--test")
    assert code == 0, err
    assert "is ready" in out
    assert "Test of 'tiny' passed (generate" in out  # start --test sent a chat request

    code, out, _ = run("status", "tiny", "--json")
    assert code == 0
    assert json.loads(out)["servers"][0]["state"] == "healthy"

    url = f"http://127.0.0.1:{port}"
    reply = requests.post(
        f"{url}/v1/chat/completions",
        json={"model": str(tiny_model), "messages": [{"role": "user", "content": "Hello"}],
              "max_tokens": 8},
        timeout=60,
    )
    assert reply.status_code == 200
    body = reply.json()
    assert body["usage"]["completion_tokens"] > 0
    assert isinstance(body["choices"][0]["message"]["content"], str)
    # The server answers to its cmw-vllm name too (--served-model-name MODEL NAME).
    by_name = requests.post(
        f"{url}/v1/chat/completions",
        json={"model": "tiny", "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 2},
        timeout=60,
    )
    assert by_name.status_code == 200, by_name.text
    served = {m["id"] for m in requests.get(f"{url}/v1/models", timeout=10).json()["data"]}
    assert served == {str(tiny_model), "tiny"}

    # vLLM's own process tree: API server -> VLLM::EngineCore -> VLLM::Worker.
    first = read_record("tiny")
    assert first is not None
    # Launched through `vllm serve`, not the deprecated api_server module (and its warning).
    assert first.command[2:4] == ["serve", str(tiny_model)]
    log_text = Path(first.log_path).read_text(errors="replace")
    assert "Application startup complete." in log_text
    assert "vllm.entrypoints.openai.api_server" not in log_text  # the deprecation warning
    titles = " ".join(" ".join(p.cmdline()) for p in group_members(first))
    assert "VLLM::EngineCore" in titles

    kv_space = os.environ["VLLM_CPU_KVCACHE_SPACE"]
    monkeypatch.delenv("CMW_VLLM_PYTHON")  # a shell without what shaped the start
    monkeypatch.delenv("VLLM_CPU_KVCACHE_SPACE")
    code, out, err = run("restart", "tiny", "--timeout", "600")
    assert code == 0, err
    second = read_record("tiny")
    assert second is not None and second.pid != first.pid
    assert second.command[0] == first.command[0] == real_vllm
    assert psutil.Process(second.pid).environ()["VLLM_CPU_KVCACHE_SPACE"] == kv_space
    assert not alive_pids([p.pid for p in psutil.Process(os.getpid()).children()
                     if p.pid == first.pid])
    assert requests.get(f"{url}/health", timeout=5).status_code == 200
    assert Path(second.log_path + ".1").exists()

    # SIGKILL of the API server alone orphans EngineCore and the worker (vLLM #55510) ...
    members = [p.pid for p in group_members(second)]
    assert len(members) >= 3
    # vLLM's shared memory (psm_*, sem.mp-*), which a SIGKILL leaves in /dev/shm.
    segments = shm_segments.segments_of(members)
    assert segments, "vLLM's processes map no psm_* / sem.mp-* file"
    os.kill(second.pid, signal.SIGKILL)
    status = wait_for_state("tiny", "exited", timeout=15)
    assert status.state == "exited"
    assert status.orphans, "EngineCore should outlive a SIGKILLed API server"
    # ... and stop still reaps every one of them.
    code, out, err = run("stop", "tiny")
    assert code == 0, err
    assert not alive_pids(members)
    left = [s.name for s in segments if (shm_segments.SHM_DIR / s.name).exists()]
    assert not left, f"stop left vLLM's shared memory in /dev/shm: {left}"
    code, _, _ = run("status", "tiny")
    assert code == 3


def test_real_bad_flag_fails_fast_with_diagnosis(real_vllm: str, tiny_model: Path,
                                                 isolated_home: Path) -> None:
    code, _, err = run("start", str(tiny_model), "--name", "bad", "--port", str(free_port()),
                       "--timeout", "600", "--", "--definitely-not-a-flag")
    assert code == 1
    assert "vLLM exited during start-up (exit code 2)" in err
    assert "--definitely-not-a-flag" in err
    assert "Traceback" not in err.split("--- from the log ---")[0]
    assert not (isolated_home / "servers" / "bad.json").exists()
