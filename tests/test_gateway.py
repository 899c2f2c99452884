"""The gateway on the stand-in engine: routing, single-flight starts, queue limit, start
failure fan-out, eviction order, a request racing an idle stop, a hung upstream, auth and
limits. The same paths on real vLLM are in test_gateway_real.py."""

from __future__ import annotations

import json
import logging
import os
import signal
import socket
import stat
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest
import requests

from cmw_vllm.errors import InsufficientResourcesError
from cmw_vllm.gateway.settings import load_api_keys
from cmw_vllm.server_manager import ServerManager, record_names
from tests.conftest import alive_pids, free_port, write_models
from tests.conftest import run_cli as run
from tests.gateway_harness import gateway_maker


@pytest.fixture
def entries(isolated_home: Path, model_dir: Path) -> list[str]:
    """Three startable entries (a, b, c) on the stand-in model."""
    names = ["a", "b", "c"]
    write_models(isolated_home, {n: {"model": str(model_dir), "port": free_port()}
                                 for n in names})
    return names


def _chat(url: str, model: str, **kw: Any) -> requests.Response:
    return requests.post(f"{url}/v1/chat/completions",
                         json={"model": model, "messages": [{"role": "user", "content": "hi"}]},
                         timeout=kw.pop("timeout", 60), **kw)


@pytest.fixture
def gateway_factory(fake_engine: Path) -> Iterator[Any]:
    with gateway_maker(health_interval=0.5) as make:
        yield make


def _live_servers() -> list[str]:
    return [s.name for s in ServerManager().list_status(check_health=False) if s.running]


def test_unknown_model_is_404_at_once_and_starts_nothing(gateway_factory: Any,
                                                         entries: list[str]) -> None:
    gw = gateway_factory()
    begin = time.monotonic()
    reply = _chat(gw.url, "no-such-model")
    assert reply.status_code == 404
    assert reply.json()["error"]["type"] == "NotFoundError"
    assert "no-such-model" in reply.json()["error"]["message"]
    assert time.monotonic() - begin < 5
    assert record_names() == []


def test_concurrent_first_requests_make_one_start(gateway_factory: Any,
                                                  entries: list[str]) -> None:
    gw = gateway_factory()
    with ThreadPoolExecutor(20) as pool:
        replies = list(pool.map(lambda _: _chat(gw.url, "a"), range(20)))
    assert [r.status_code for r in replies] == [200] * 20
    assert gw.metrics.starts == {"a": 1}
    assert _live_servers() == ["a"]
    # Direct too: the server answers to its entry's alias.
    listing = requests.get(f"{gw.url}/v1/models", timeout=10).json()["data"]
    states = {m["id"]: m["state"] for m in listing}
    assert states["a"] == "running" and states["b"] == "startable"
    # Its model id reaches the same server.
    assert _chat(gw.url, str(Path(listing[0]["aliases"][0]))).status_code == 200


def test_queue_limit_answers_429_with_retry_after(gateway_factory: Any, entries: list[str],
                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("FAKE_VLLM_DELAY", "3")
    gw = gateway_factory(queue_limit=2)
    with ThreadPoolExecutor(6) as pool:
        replies = list(pool.map(lambda _: _chat(gw.url, "a"), range(6)))
    codes = sorted(r.status_code for r in replies)
    assert codes == [200, 200, 429, 429, 429, 429]
    refused = [r for r in replies if r.status_code == 429]
    assert all(r.headers["Retry-After"] == "5" for r in refused)
    assert refused[0].json()["error"]["type"] == "RateLimitError"
    assert gw.metrics.starts == {"a": 1}


def test_start_timeout_answers_503_and_the_start_goes_on(gateway_factory: Any,
                                                         entries: list[str],
                                                         monkeypatch: pytest.MonkeyPatch
                                                         ) -> None:
    monkeypatch.setenv("FAKE_VLLM_DELAY", "3")
    gw = gateway_factory(start_timeout=0.5)
    reply = _chat(gw.url, "a")
    assert reply.status_code == 503 and reply.headers["Retry-After"] == "10"
    assert reply.json()["error"]["message"].startswith("model `a` is not ready after 0.5s")
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline and _chat(gw.url, "a").status_code != 200:
        time.sleep(0.3)
    assert _chat(gw.url, "a").status_code == 200
    assert gw.metrics.starts == {"a": 1}


def test_start_failure_reaches_every_waiter_then_next_request_retries(
        gateway_factory: Any, entries: list[str], monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("FAKE_VLLM_MODE", "oom")
    gw = gateway_factory(start_backoff=0)  # the back-off: test_gateway_pool.py
    logged = _Lines()
    logged.setFormatter(logging.Formatter("%(levelname)s %(message)s"))
    logging.getLogger("cmw_vllm").addHandler(logged)
    try:
        with ThreadPoolExecutor(5) as pool:
            replies = list(pool.map(lambda _: _chat(gw.url, "a"), range(5)))
    finally:
        logging.getLogger("cmw_vllm").removeHandler(logged)
    # The gateway's log says it once, on one line: which model, and start's diagnosis.
    failed = [line for line in logged.lines if "failed" in line]
    assert len(failed) == 1 and "\n" not in failed[0], logged.lines
    assert failed[0].startswith("ERROR starting a on demand failed: ")
    assert "exited during start-up" in failed[0] and "max-model-len 8192" in failed[0]
    assert [r.status_code for r in replies] == [503] * 5
    errors = [r.json()["error"] for r in replies]
    assert all(e["type"] == "ServerStartError" for e in errors)
    assert all("exited during start-up" in e["message"] for e in errors)
    assert all("max-model-len 8192" in e["hint"] for e in errors)  # start's diagnosis
    assert gw.metrics.starts == {"a": 1}
    monkeypatch.setenv("FAKE_VLLM_MODE", "ok")
    assert _chat(gw.url, "a").status_code == 200
    assert gw.metrics.starts == {"a": 2}
    assert gw.metrics.start_failures == {"a": 1}


def test_eviction_stops_the_least_recently_used_idle_server(gateway_factory: Any,
                                                            entries: list[str]) -> None:
    def two_fit(config: Any) -> None:
        running = [n for n in _live_servers() if n != config.name]
        if len(running) >= 2:
            raise InsufficientResourcesError(f"{config.name} does not fit beside {running}")

    gw = gateway_factory(fit_check=two_fit)
    assert _chat(gw.url, "a").status_code == 200
    assert _chat(gw.url, "b").status_code == 200
    assert _chat(gw.url, "a").status_code == 200  # b is now the least recently used
    b_pids = [p.pid for p in _group("b")]
    assert _chat(gw.url, "c").status_code == 200
    assert sorted(_live_servers()) == ["a", "c"]
    assert not alive_pids(b_pids)
    assert gw.metrics.evictions == {"b": 1}
    assert _chat(gw.url, "b").status_code == 200  # and now a goes (c is newer)
    assert sorted(_live_servers()) == ["b", "c"]


def test_nothing_to_evict_is_a_clear_503(gateway_factory: Any, entries: list[str]) -> None:
    def never(config: Any) -> None:
        raise InsufficientResourcesError("needs 80 GiB, 24 GiB free", hint="use a smaller one")

    gw = gateway_factory(fit_check=never)
    reply = _chat(gw.url, "a")
    assert reply.status_code == 503
    assert "needs 80 GiB" in reply.json()["error"]["message"]
    assert reply.json()["error"]["hint"] == "use a smaller one"
    assert record_names() == []


def _group(name: str) -> list[Any]:
    from cmw_vllm.server_manager import group_members, read_record

    record = read_record(name)
    assert record is not None
    return group_members(record)


class SlowStop(ServerManager):
    """Stops take 3 s longer, so a request can arrive while one is under way."""

    def stop(self, name: str, *a: Any, **kw: Any) -> Any:
        time.sleep(3.0)
        return super().stop(name, *a, **kw)


def test_request_racing_an_idle_stop_starts_the_model_again(gateway_factory: Any,
                                                            entries: list[str]) -> None:
    gw = gateway_factory(idle_timeout=1.0, manager=SlowStop())
    assert _chat(gw.url, "a").status_code == 200
    backend = gw.pool.backends["a"]
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline and backend.state != "stopping":
        time.sleep(0.02)
    assert backend.state == "stopping" and not backend.gone.is_set()
    reply = _chat(gw.url, "a", timeout=30)  # arrives during the stop (llama-swap #946)
    assert reply.status_code == 200
    assert gw.metrics.starts == {"a": 2}
    assert gw.metrics.stops == {("a", "idle"): 1}


def test_idle_stop_waits_for_requests_in_flight(gateway_factory: Any,
                                                entries: list[str]) -> None:
    gw = gateway_factory(idle_timeout=0.3)
    assert _chat(gw.url, "a").status_code == 200
    backend = gw.pool.backends["a"]
    backend.in_flight += 1  # a request still streaming
    backend.last_used -= 10
    time.sleep(1.5)
    assert backend.state == "running" and _live_servers() == ["a"]
    gw.loop.call_soon_threadsafe(gw.pool.release, backend)
    deadline = time.monotonic() + 15
    while time.monotonic() < deadline and _live_servers():
        time.sleep(0.1)
    assert _live_servers() == []


def test_hand_started_servers_are_used_but_never_stopped(gateway_factory: Any,
                                                         model_dir: Path) -> None:
    port = free_port()
    code, _, err = run("start", str(model_dir), "--name", "mine", "--port", str(port))
    assert code == 0, err
    gw = gateway_factory(idle_timeout=0.3)
    assert _chat(gw.url, "mine").status_code == 200
    time.sleep(2)
    assert _live_servers() == ["mine"]
    assert gw.metrics.starts == {}
    gw.close()
    assert _live_servers() == ["mine"]  # shutting the gateway down leaves it alone too


def test_hung_upstream_gives_504_without_hanging(gateway_factory: Any, model_dir: Path,
                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("FAKE_VLLM_MODE", "hang_post")
    code, _, err = run("start", str(model_dir), "--name", "stuck", "--port", str(free_port()))
    assert code == 0, err
    gw = gateway_factory(upstream_timeout=1.0)
    for _ in range(2):
        begin = time.monotonic()
        reply = _chat(gw.url, "stuck")
        assert reply.status_code == 504, reply.text
        assert "sent nothing for 1s" in reply.json()["error"]["message"]
        assert time.monotonic() - begin < 8
    assert gw.pool.backends["stuck"].in_flight == 0


def test_unhealthy_server_gets_no_requests(gateway_factory: Any, model_dir: Path) -> None:
    code, _, err = run("start", str(model_dir), "--name", "sick", "--port", str(free_port()))
    assert code == 0, err
    gw = gateway_factory(health_interval=0.2)
    assert _chat(gw.url, "sick").status_code == 200
    from cmw_vllm.server_manager import read_record

    record = read_record("sick")
    assert record is not None
    os.kill(record.pid, signal.SIGSTOP)  # alive, but /health no longer answers
    try:
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline and gw.pool.backends["sick"].state != "unhealthy":
            time.sleep(0.1)
        reply = _chat(gw.url, "sick", timeout=10)
        assert reply.status_code == 503 and "unhealthy" in reply.json()["error"]["message"]
        assert reply.headers["Retry-After"] == "5"
    finally:
        os.kill(record.pid, signal.SIGCONT)


class _Lines(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.lines: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.lines.append(self.format(record))


def test_keys_are_checked_and_replaced_by_the_upstream_key(gateway_factory: Any,
                                                           model_dir: Path) -> None:
    code, _, err = run("start", str(model_dir), "--name", "cap", "--port", str(free_port()))
    assert code == 0, err
    logged = _Lines()
    root = logging.getLogger("cmw_vllm")
    root.addHandler(logged)
    root.setLevel(logging.DEBUG)
    aiohttp_log = logging.getLogger("aiohttp")
    aiohttp_log.addHandler(logged)
    aiohttp_log.setLevel(logging.DEBUG)
    gw = gateway_factory(api_keys=frozenset({"gw-secret-1"}), upstream_key="vllm-secret-2")
    assert _chat(gw.url, "cap").status_code == 401
    assert _chat(gw.url, "cap", headers={"Authorization": "Bearer wrong"}).status_code == 401
    assert requests.get(f"{gw.url}/v1/models", timeout=10).status_code == 401
    assert requests.get(f"{gw.url}/metrics", timeout=10).status_code == 401
    assert requests.get(f"{gw.url}/health", timeout=10).status_code == 200
    seen = []
    for headers in ({"Authorization": "Bearer gw-secret-1"}, {"x-api-key": "gw-secret-1"}):
        ok = _chat(gw.url, "cap", headers=headers)
        assert ok.status_code == 200
        seen.append(ok.json()["seen_headers"])
    assert seen == [{"authorization": "Bearer vllm-secret-2"}] * 2
    root.removeHandler(logged)
    aiohttp_log.removeHandler(logged)
    text = "\n".join(logged.lines)
    assert "found server cap" in text  # the log was captured ...
    assert "gw-secret-1" not in text and "vllm-secret-2" not in text  # ... without keys


def test_body_limit_paths_and_bad_bodies(gateway_factory: Any) -> None:
    gw = gateway_factory(max_body_bytes=1000)
    big = requests.post(f"{gw.url}/v1/chat/completions", data=b"{" + b" " * 2000 + b"}",
                        headers={"Content-Type": "application/json"}, timeout=10)
    assert big.status_code == 413 and "limit of 1000 bytes" in big.json()["error"]["message"]
    for path in ("/sleep", "/v1/load_lora_adapter", "/../etc/passwd", "/collective_rpc"):
        reply = requests.post(f"{gw.url}{path}", json={"model": "x"}, timeout=10)
        assert reply.status_code == 404, path
    # An absolute URI in the request line cannot send the gateway elsewhere.
    with socket.create_connection(("127.0.0.1", gw.settings.port), timeout=10) as sock:
        sock.sendall(b"GET http://example.com/v1/models HTTP/1.1\r\nHost: 127.0.0.1\r\n"
                     b"Connection: close\r\n\r\n")
        head = sock.recv(4096).decode()
    assert head.startswith("HTTP/1.1 200") and "example.com" not in head.split("\r\n\r\n")[1]
    bad = requests.post(f"{gw.url}/v1/completions", data=b"{not json",
                        headers={"Content-Type": "application/json"}, timeout=10)
    assert bad.status_code == 400
    nameless = requests.post(f"{gw.url}/v1/completions", json={"prompt": "x"}, timeout=10)
    assert nameless.status_code == 400 and "names no `model`" in nameless.text


def test_key_file_must_be_private(tmp_path: Path) -> None:
    from cmw_vllm.errors import ConfigError

    key_file = tmp_path / "keys"
    key_file.write_text("# keys\nk1\n\nk2\n")
    key_file.chmod(0o644)
    with pytest.raises(ConfigError, match="readable by others"):
        load_api_keys(str(key_file), environ={})
    key_file.chmod(0o600)
    assert load_api_keys(str(key_file), environ={"CMW_VLLM_GATEWAY_API_KEYS": "k3, k4"}) == {
        "k1", "k2", "k3", "k4"}
    assert stat.S_IMODE(key_file.stat().st_mode) == 0o600


def test_metrics_count_requests_starts_and_stops(gateway_factory: Any,
                                                 entries: list[str]) -> None:
    gw = gateway_factory()
    assert _chat(gw.url, "a").status_code == 200
    assert _chat(gw.url, "zzz").status_code == 404
    text = requests.get(f"{gw.url}/metrics", timeout=10).text
    assert 'cmw_vllm_gateway_requests_total{model="a",code="200"} 1' in text
    assert 'cmw_vllm_gateway_requests_total{model="unknown",code="404"} 1' in text
    assert 'cmw_vllm_gateway_starts_total{model="a"} 1' in text
    assert 'cmw_vllm_gateway_request_duration_seconds_count{model="a"} 1' in text
    assert 'cmw_vllm_gateway_in_flight_requests{model="a"} 0' in text


def test_background_gateway_shows_in_status_and_stops(fake_engine: Path, entries: list[str],
                                                      isolated_home: Path) -> None:
    port = free_port()
    code, out, err = run("gateway", "--port", str(port), "--background", "--json")
    assert code == 0, err
    info = json.loads(out)
    assert info["url"] == f"http://127.0.0.1:{port}"
    assert _chat(info["url"], "a").status_code == 200
    code, out, _ = run("status", "--json")
    states = {s["name"]: s["state"] for s in json.loads(out)["servers"]}
    assert states == {"gateway": "healthy", "a": "healthy"}
    server_pids = [p.pid for p in _group("a")]
    code, out, err = run("stop", "gateway")
    assert code == 0, err
    assert not alive_pids([info["pid"]])
    assert not alive_pids(server_pids)  # it stopped the server it started
    assert record_names() == []
    code, _, err = run("gateway", "--port", str(port), "--json")
    assert code == 2 and "--json goes with --background" in err


def test_second_sigterm_does_not_cut_the_gateway_shutdown_short(
        fake_engine: Path, entries: list[str], isolated_home: Path,
        monkeypatch: pytest.MonkeyPatch) -> None:
    # stop signals the API server and its supervisor: for a gateway, the same process twice.
    monkeypatch.setenv("FAKE_VLLM_GEN_SECONDS", "2")
    port = free_port()
    code, out, err = run("gateway", "--port", str(port), "--background", "--json")
    assert code == 0, err
    info = json.loads(out)
    assert _chat(info["url"], "a").status_code == 200
    server_pids = [p.pid for p in _group("a")]
    with ThreadPoolExecutor(1) as pool:
        in_flight = pool.submit(_chat, info["url"], "a")
        time.sleep(0.5)
        os.kill(info["pid"], signal.SIGTERM)
        time.sleep(0.5)  # the gateway now waits for the request in flight
        os.kill(info["pid"], signal.SIGTERM)
        assert in_flight.result().status_code == 200
    deadline = time.monotonic() + 30
    while alive_pids([info["pid"]]) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not alive_pids([info["pid"]])
    assert not alive_pids(server_pids)
    assert record_names() == []
    from cmw_vllm.server_record import log_path

    assert "already shutting down" in log_path("gateway").read_text()


def test_public_bind_without_key_warns(fake_engine: Path) -> None:
    port = free_port()
    holder = socket.socket()
    holder.bind(("0.0.0.0", port))
    holder.listen(1)
    try:
        code, _, err = run("gateway", "--host", "0.0.0.0", "--port", str(port))
    finally:
        holder.close()
    assert "without a gateway API key" in err
    assert code == 6 and f"port {port} is in use" in err
    assert os.environ.get("CMW_VLLM_GATEWAY_API_KEYS") is None


def test_server_draining_after_a_stop_gets_no_new_requests(gateway_factory: Any,
                                                           model_dir: Path) -> None:
    from cmw_vllm.server_record import read_record, update_record

    code, _, err = run("start", str(model_dir), "--name", "mine", "--port", str(free_port()))
    assert code == 0, err
    gw = gateway_factory(health_interval=0.2, start_timeout=1.5)
    assert _chat(gw.url, "mine").status_code == 200
    record = read_record("mine")
    assert record is not None
    # What `cmw-vllm stop` records while vLLM lets its requests finish.
    update_record("mine", record.supervisor_pid, stop_requested_at=time.time(),
                  drain_until=time.time() + 60)
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline and gw.pool.backends["mine"].state != "draining":
        time.sleep(0.1)
    assert gw.pool.backends["mine"].state == "draining"
    reply = _chat(gw.url, "mine")
    assert reply.status_code == 503
