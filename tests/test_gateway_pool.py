"""The gateway's pool under trouble, on the stand-in engine: a stalled event loop, a gateway
killed with SIGKILL and started again, the environment its servers get, a model whose start
always fails."""

from __future__ import annotations

import asyncio
import json
import logging
import os
import signal
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import requests

from cmw_vllm.gateway.settings import GatewaySettings
from cmw_vllm.server_manager import ServerManager
from tests.conftest import alive_pids, free_port, wait_until
from tests.conftest import run_cli as run
from tests.gateway_harness import gateway_maker


@pytest.fixture
def gateway_factory(fake_engine: Path) -> Iterator[Any]:
    # Health rounds only when the test runs one.
    with gateway_maker(health_interval=3600.0) as make:
        yield make


def _chat(url: str, model: str, **kw: Any) -> requests.Response:
    return requests.post(f"{url}/v1/chat/completions",
                         json={"model": model, "messages": [{"role": "user", "content": "hi"}]},
                         timeout=kw.pop("timeout", 60), **kw)


def _live_servers() -> list[str]:
    return [s.name for s in ServerManager().list_status(check_health=False) if s.running]


def _processes(name: str) -> list[int]:
    """The supervisor and every process of server ``name``'s group (API server, engine)."""
    from cmw_vllm.process_group import group_members
    from cmw_vllm.server_record import read_record

    record = read_record(name)
    assert record is not None
    return [record.supervisor_pid, *(p.pid for p in group_members(record))]


# ----------------------------------------------------------------------- a stalled loop


def test_a_stalled_loop_does_not_make_a_healthy_server_unhealthy(gateway_factory: Any,
                                                                  model_dir: Path) -> None:
    code, _, err = run("start", str(model_dir), "--name", "mine", "--port", str(free_port()))
    assert code == 0, err
    gw = gateway_factory()
    assert _chat(gw.url, "mine").status_code == 200
    pool = gw.pool
    assert pool is not None

    async def stalled_round() -> None:
        """A health round during which the loop is blocked longer than a probe may take
        (3 s), as a slow request on the loop blocks it."""
        task = asyncio.ensure_future(pool.check_health())
        for _ in range(5):
            await asyncio.sleep(0)  # the probe is on its way
        time.sleep(4.0)
        await task

    for _ in range(3):  # as many rounds as make a server that fails them unhealthy
        gw.call(stalled_round())
    assert pool.backends["mine"].state == "running"
    assert _chat(gw.url, "mine").status_code == 200


def test_probes_that_fail_while_the_loop_is_blocked_do_not_count() -> None:
    from cmw_vllm.gateway.metrics import Metrics
    from cmw_vllm.gateway.pool import Backend, Pool

    async def scenario() -> tuple[dict[str, str], dict[str, str]]:
        loop = asyncio.get_running_loop()

        async def loop_timed_probe(base_url: str) -> bool:
            """A probe whose deadline is a loop timer (1 s): a stall of the loop fails it."""
            begin = loop.time()
            await asyncio.sleep(0.05)
            return base_url == "http://ok" and loop.time() - begin < 1.0

        pool = Pool(GatewaySettings(), Metrics(), manager=ServerManager(),
                    probe=loop_timed_probe)
        pool.backends = {name: Backend(name, f"http://{name}", (name,), owned=False, pid=1,
                                       ttl=0) for name in ("ok", "sick")}
        for _ in range(3):
            task = asyncio.ensure_future(pool.check_health())
            await asyncio.sleep(0.01)  # the probes are on their way
            time.sleep(1.5)  # the gateway's loop is blocked (a slow request)
            await task
        during = {name: b.state for name, b in pool.backends.items()}
        for _ in range(3):
            await pool.check_health()
        return during, {name: b.state for name, b in pool.backends.items()}

    during, after = asyncio.run(scenario())
    assert during == {"ok": "running", "sick": "running"}  # the stalls were the gateway's
    assert after == {"ok": "running", "sick": "unhealthy"}  # a sick server is still found


# ----------------------------------------------------------------------- SIGKILL


def test_a_gateway_killed_and_started_again_takes_its_servers_back(
        fake_engine: Path, entries: list[str], isolated_home: Path) -> None:
    code, out, err = run("gateway", "--port", str(free_port()), "--background", "--json")
    assert code == 0, err
    first = json.loads(out)
    assert _chat(first["url"], "a").status_code == 200
    server_pids = _processes("a")
    os.kill(first["pid"], signal.SIGKILL)
    assert wait_until(lambda: not alive_pids([first["pid"]]), 10)
    assert _live_servers() == ["a"]  # the server outlives the gateway
    code, out, err = run("gateway", "--port", str(free_port()), "--background", "--json")
    assert code == 0, err
    second = json.loads(out)
    listing = requests.get(f"{second['url']}/v1/models", timeout=10).json()["data"]
    a = next(m for m in listing if m["id"] == "a")
    assert a["state"] == "running" and a["started_by_gateway"] is True
    code, _, err = run("stop", "gateway")
    assert code == 0, err
    assert not alive_pids([second["pid"]])
    assert not alive_pids(server_pids)  # it stopped the server its first run started
    # A server started by hand is still never its own.
    code, _, err = run("start", "a", "--port", str(free_port()))
    assert code == 0, err
    code, out, err = run("gateway", "--port", str(free_port()), "--background", "--json")
    assert code == 0, err
    third = json.loads(out)
    listing = requests.get(f"{third['url']}/v1/models", timeout=10).json()["data"]
    assert next(m for m in listing if m["id"] == "a")["started_by_gateway"] is False
    code, _, err = run("stop", "gateway")
    assert code == 0, err
    assert _live_servers() == ["a"]


# ----------------------------------------------------------------------- environment


def test_servers_the_gateway_starts_get_only_their_own_key(
        gateway_factory: Any, entries: list[str], tmp_path: Path, isolated_home: Path,
        monkeypatch: pytest.MonkeyPatch) -> None:
    key_file = tmp_path / "keys"
    key_file.write_text("gw-secret-from-file\n")
    key_file.chmod(0o600)
    monkeypatch.setenv("CMW_VLLM_GATEWAY_API_KEYS", "gw-secret-from-env")
    monkeypatch.setenv("CMW_VLLM_GATEWAY_API_KEY_FILE", str(key_file))
    monkeypatch.setenv("VLLM_API_KEY", "upstream-key")
    from cmw_vllm.gateway.settings import load_api_keys

    keys = load_api_keys()
    assert keys == {"gw-secret-from-env", "gw-secret-from-file"}
    gw = gateway_factory(api_keys=keys, upstream_key="upstream-key")
    reply = _chat(gw.url, "a", headers={"Authorization": "Bearer gw-secret-from-env"})
    assert reply.status_code == 200
    pids = _processes("a")
    assert len(set(pids)) >= 3  # supervisor, API server, EngineCore
    for pid in pids:
        raw = Path(f"/proc/{pid}/environ").read_bytes()
        env = dict(item.split(b"=", 1) for item in raw.split(b"\0") if b"=" in item)
        assert env.get(b"VLLM_API_KEY") == b"upstream-key", pid
        assert b"gw-secret" not in raw, pid
        assert not [k for k in env if k.startswith(b"CMW_VLLM_GATEWAY_")], pid
    # Nor is any kept for restart: what a start keeps is what its engine got.
    for kept in (isolated_home / "restart").iterdir():
        assert b"gw-secret" not in kept.read_bytes(), kept


# ----------------------------------------------------------------------- start storms


def test_a_model_that_fails_to_start_is_not_launched_on_every_request(
        gateway_factory: Any, entries: list[str], isolated_home: Path,
        monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="cmw_vllm")
    monkeypatch.setenv("FAKE_VLLM_MODE", "oom")
    gw = gateway_factory()  # the default back-off: 5 s after a first failure
    replies = [_chat(gw.url, "a") for _ in range(20)]
    assert [r.status_code for r in replies] == [503] * 20
    assert gw.metrics.starts == {"a": 1}  # one launch, not twenty
    first, later = replies[0].json()["error"], [r.json()["error"] for r in replies[1:]]
    assert "exited during start-up" in first["message"]
    for error in later:
        assert error["type"] == "ServerStartError"
        assert "exited during start-up" in error["message"]  # the last diagnosis
        assert "max-model-len 8192" in error["hint"]
    assert all(1 <= int(r.headers["Retry-After"]) <= 5 for r in replies)
    # Clients learn nothing of the file system; the gateway's log has the paths.
    for reply in replies:
        assert str(isolated_home) not in reply.text and "/tmp/" not in reply.text
        assert "<path>" in reply.json()["error"]["message"]
    assert str(isolated_home / "logs" / "a.log") in caplog.text
    # When the back-off is over, the next request starts it again.
    monkeypatch.setenv("FAKE_VLLM_MODE", "ok")
    assert wait_until(lambda: _chat(gw.url, "a").status_code == 200, 30, interval=0.2)
    assert gw.metrics.starts == {"a": 2}


def test_the_back_off_doubles_up_to_its_cap_and_a_success_clears_it() -> None:
    from cmw_vllm.gateway.backoff import StartBackoff, hide_paths

    backoff = StartBackoff(first=5.0, cap=300.0)
    delays = [backoff.failed("m", "boom", None, now=0.0).until for _ in range(9)]
    assert delays == [5.0, 10.0, 20.0, 40.0, 80.0, 160.0, 300.0, 300.0, 300.0]
    assert backoff.blocked("m", now=299.0) is not None
    assert backoff.blocked("m", now=300.0) is None
    assert backoff.blocked("other", now=0.0) is None
    backoff.succeeded("m")
    assert backoff.failed("m", "boom", None, now=0.0).until == 5.0
    assert hide_paths("log: /home/u/.cache/cmw-vllm/logs/a.log (see ~/x/y, 'C')") == \
        "log: <path> (see <path>, 'C')"
    kept = "GET http://127.0.0.1:8000/health: 8/16 GiB, a/b, --max-model-len 8192"
    assert hide_paths(kept) == kept
