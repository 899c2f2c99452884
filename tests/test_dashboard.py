"""The dashboard's control API on the stand-in engine: the admin key (401/403), the session
cookie, the Origin check, load/unload/pin, the log tail, preload and pins, start progress in
/v1/models, and an event stream that outlives a gateway restart."""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import requests

from cmw_vllm.gateway.settings import load_admin_keys
from cmw_vllm.server_manager import ServerManager
from tests.conftest import free_port, wait_until, write_models
from tests.conftest import run_cli as run
from tests.gateway_harness import gateway_maker

ADMIN = "adm-" + "x" * 28
INFER = "sk-inference-key"


@pytest.fixture
def gateway_factory(fake_engine: Path) -> Iterator[Any]:
    with gateway_maker(health_interval=0.5) as make:
        yield make


def _bearer(key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


def _admin_gateway(make: Any) -> Any:
    return make(api_keys=frozenset({INFER}), admin_keys=frozenset({ADMIN}))


def _state(gw: Any, **kw: Any) -> dict[str, Any]:
    reply = requests.get(f"{gw.url}/api/state", headers=_bearer(ADMIN), timeout=10, **kw)
    assert reply.status_code == 200, reply.text
    return reply.json()


def _model(gw: Any, name: str) -> dict[str, Any]:
    return next(m for m in _state(gw)["models"] if m["name"] == name)


def _live() -> list[str]:
    return sorted(s.name for s in ServerManager().list_status(check_health=False) if s.running)


# ------------------------------------------------------------------------------ access


def test_admin_key_file_must_be_private_and_apart_from_inference_keys(tmp_path: Path) -> None:
    from cmw_vllm.errors import ConfigError

    path = tmp_path / "admin"
    path.write_text(ADMIN + "\n")
    path.chmod(0o644)
    with pytest.raises(ConfigError, match="readable by others"):
        load_admin_keys(str(path))
    path.chmod(0o600)
    assert load_admin_keys(str(path)) == {ADMIN}
    assert load_admin_keys(None, {"CMW_VLLM_GATEWAY_ADMIN_KEY_FILE": str(path)}) == {ADMIN}
    assert load_admin_keys(None, {}) == frozenset()
    with pytest.raises(ConfigError, match="must differ"):
        load_admin_keys(str(path), api_keys=frozenset({ADMIN}))


def test_bad_admin_key_file_is_one_line_and_an_exit_code(tmp_path: Path,
                                                         entries: list[str]) -> None:
    path = tmp_path / "admin"
    path.write_text(ADMIN + "\n")
    path.chmod(0o640)
    code, out, err = run("gateway", "--port", str(free_port()), "--admin-key-file", str(path))
    assert code != 0
    assert "readable by others" in err and "Traceback" not in err


def test_no_key_is_401_an_inference_key_403_the_admin_key_200(gateway_factory: Any,
                                                              entries: list[str]) -> None:
    gw = _admin_gateway(gateway_factory)
    url = f"{gw.url}/api/state"
    assert requests.get(url, timeout=10).status_code == 401
    assert requests.get(url, headers=_bearer("wrong"), timeout=10).status_code == 401
    refused = requests.get(url, headers=_bearer(INFER), timeout=10)
    assert refused.status_code == 403
    assert refused.json()["error"]["type"] == "PermissionDeniedError"
    # The key never comes in a URL.
    assert requests.get(url, params={"key": ADMIN}, timeout=10).status_code == 401
    state = _state(gw)
    states = {m["name"]: m["state"] for m in state["models"]}
    assert states["a"] == states["b"] == "startable"  # beside the built-in entries
    # Every /api/ route is behind the same check, and the admin key is no inference key.
    for method, path in (("GET", "/api/events"), ("POST", "/api/models/a/load"),
                         ("POST", "/api/models/a/pin"), ("GET", "/api/models/a/logs")):
        assert requests.request(method, gw.url + path, timeout=10).status_code == 401
        assert requests.request(method, gw.url + path, headers=_bearer(INFER),
                                timeout=10).status_code == 403
    assert requests.get(f"{gw.url}/v1/models", headers=_bearer(ADMIN),
                        timeout=10).status_code == 401
    assert requests.get(f"{gw.url}/v1/models", headers=_bearer(INFER),
                        timeout=10).status_code == 200
    # The page itself is static and served to anyone: it shows its login form.
    page = requests.get(f"{gw.url}/ui/", timeout=10)
    assert page.status_code == 200 and 'id="login-form"' in page.text
    assert "frame-ancestors 'none'" in page.headers["Content-Security-Policy"]
    assert requests.get(f"{gw.url}/ui/app.js", timeout=10).headers["Content-Type"] \
        .startswith("text/javascript")
    for other in ("..%2f..%2fpyproject.toml", "nothing.js", "__init__.py"):
        assert requests.get(f"{gw.url}/ui/{other}", timeout=10).status_code == 404


def test_without_an_admin_key_only_a_keyless_loopback_gateway_serves_it(
        gateway_factory: Any, entries: list[str]) -> None:
    open_gw = gateway_factory()
    assert requests.get(f"{open_gw.url}/api/state", timeout=10).status_code == 200
    keyed = gateway_factory(api_keys=frozenset({INFER}))
    refused = requests.get(f"{keyed.url}/api/state", headers=_bearer(INFER), timeout=10)
    assert refused.status_code == 403
    refused = requests.get(f"{keyed.url}/api/state", timeout=10)
    assert refused.status_code == 403 and "admin key" in refused.json()["error"]["message"]


def test_login_sets_a_strict_http_only_cookie_and_changes_need_the_own_origin(
        gateway_factory: Any, entries: list[str]) -> None:
    gw = _admin_gateway(gateway_factory)
    own = {"Origin": gw.url}
    wrong = requests.post(f"{gw.url}/api/login", json={"key": "nope"}, headers=own, timeout=10)
    assert wrong.status_code == 401 and "Set-Cookie" not in wrong.headers
    inference = requests.post(f"{gw.url}/api/login", json={"key": INFER}, headers=own,
                              timeout=10)
    assert inference.status_code == 403
    foreign = requests.post(f"{gw.url}/api/login", json={"key": ADMIN},
                            headers={"Origin": "http://evil.example"}, timeout=10)
    assert foreign.status_code == 403 and "Set-Cookie" not in foreign.headers
    session = requests.Session()
    reply = session.post(f"{gw.url}/api/login", json={"key": ADMIN}, headers=own, timeout=10)
    assert reply.status_code == 200
    cookie = reply.headers["Set-Cookie"]
    assert "HttpOnly" in cookie and "SameSite=Strict" in cookie and ADMIN not in cookie
    assert session.get(f"{gw.url}/api/state", timeout=10).status_code == 200
    # A cookie alone is not enough to change anything: the page's own Origin must come too.
    assert session.post(f"{gw.url}/api/models/a/pin", json={"pinned": True},
                        timeout=10).status_code == 403
    assert session.post(f"{gw.url}/api/models/a/pin", json={"pinned": True},
                        headers={"Origin": "http://127.0.0.1:1"}, timeout=10).status_code == 403
    ok = session.post(f"{gw.url}/api/models/a/pin", json={"pinned": True}, headers=own,
                      timeout=10)
    assert ok.status_code == 200 and ok.json() == {"name": "a", "pinned": True}
    # Scripts with the key in a header send no Origin; a browser page elsewhere is refused.
    assert requests.post(f"{gw.url}/api/models/a/pin", json={"pinned": False},
                         headers=_bearer(ADMIN), timeout=10).status_code == 200
    assert requests.post(f"{gw.url}/api/models/a/pin", json={"pinned": False},
                         headers={**_bearer(ADMIN), "Sec-Fetch-Site": "cross-site"},
                         timeout=10).status_code == 403
    # A forged or expired cookie is nothing.
    value = session.cookies.get("cmw_vllm_admin")
    expires, _, sig = value.partition(".")
    for bad in (f"{int(expires) + 10}.{sig}", f"{int(time.time()) - 10}.{sig}", "1.2"):
        assert requests.get(f"{gw.url}/api/state", cookies={"cmw_vllm_admin": bad},
                            timeout=10).status_code == 401
    logout = session.post(f"{gw.url}/api/logout", headers=own, timeout=10)
    assert logout.status_code == 200
    assert session.get(f"{gw.url}/api/state", timeout=10).status_code == 401


# ------------------------------------------------------------------------------ actions


def test_load_unload_pin_and_the_log_tail(gateway_factory: Any, entries: list[str]) -> None:
    gw = _admin_gateway(gateway_factory)
    api = f"{gw.url}/api/models"
    reply = requests.post(f"{api}/a/load", headers=_bearer(ADMIN), timeout=10)
    assert reply.status_code == 202 and reply.json()["state"] == "starting"
    assert wait_until(lambda: _model(gw, "a")["state"] == "running", 30)
    assert _live() == ["a"]
    again = requests.post(f"{api}/a/load", headers=_bearer(ADMIN), timeout=10)
    assert again.status_code == 200 and again.json()["state"] == "running"
    assert gw.metrics.starts == {"a": 1}
    row = _model(gw, "a")
    assert row["owned"] and row["idle_stop_in"] is not None and row["url"].startswith("http")
    tail = requests.get(f"{api}/a/logs", params={"n": 50}, headers=_bearer(ADMIN), timeout=10)
    assert tail.status_code == 200
    assert any("Starting vLLM server" in line for line in tail.json()["lines"])
    assert len(requests.get(f"{api}/a/logs", params={"n": 2}, headers=_bearer(ADMIN),
                            timeout=10).json()["lines"]) == 2
    for bad in ("0", "x", "999999"):
        assert requests.get(f"{api}/a/logs", params={"n": bad}, headers=_bearer(ADMIN),
                            timeout=10).status_code == 400
    assert requests.get(f"{api}/nope/logs", headers=_bearer(ADMIN), timeout=10).status_code \
        == 404
    assert requests.post(f"{api}/nope/load", headers=_bearer(ADMIN), timeout=10).status_code \
        == 404
    assert requests.post(f"{api}/a/pin", data="yes", headers=_bearer(ADMIN),
                         timeout=10).status_code == 400
    assert requests.post(f"{api}/b/unload", headers=_bearer(ADMIN), timeout=10).status_code \
        == 409
    # Pinned: no idle countdown, and the idle loop and eviction pass it by.
    assert requests.post(f"{api}/a/pin", json={"pinned": True}, headers=_bearer(ADMIN),
                         timeout=10).json()["pinned"] is True
    row = _model(gw, "a")
    assert row["pinned"] and row["idle_stop_in"] is None

    async def idle_and_victim() -> tuple[list[str], Any]:
        chosen = gw.pool.idle_tick(now=time.monotonic() + 10**6)
        return [b.name for b in chosen], gw.pool._pick_victim(exclude="b")

    assert gw.call(idle_and_victim()) == ([], None)
    # An unload drains and stops it, pinned or not.
    reply = requests.post(f"{api}/a/unload", headers=_bearer(ADMIN), timeout=10)
    assert reply.status_code == 202
    assert wait_until(lambda: _live() == [], 30)
    assert wait_until(lambda: _model(gw, "a")["state"] == "startable", 10)


def test_an_unpinned_idle_server_is_chosen_and_a_pinned_one_is_not(
        gateway_factory: Any, entries: list[str], isolated_home: Path, model_dir: Path
) -> None:
    write_models(isolated_home, {"a": {"model": str(model_dir), "port": free_port(),
                                       "pin": True},
                                 "b": {"model": str(model_dir), "port": free_port()}})
    gw = gateway_factory(admin_keys=frozenset({ADMIN}))
    for name in ("a", "b"):
        requests.post(f"{gw.url}/api/models/{name}/load", headers=_bearer(ADMIN), timeout=10)
    assert wait_until(lambda: _live() == ["a", "b"], 30)
    assert wait_until(lambda: _model(gw, "a")["state"] == _model(gw, "b")["state"] == "running",
                      10)
    assert _model(gw, "a")["pinned"] and not _model(gw, "b")["pinned"]

    async def victims() -> tuple[Any, list[str]]:
        victim = gw.pool._pick_victim(exclude="c")
        chosen = gw.pool.idle_tick(now=time.monotonic() + 10**6)
        for backend in chosen:  # put them back: this test only looks
            backend.state = "running"
        return victim.name if victim else None, [b.name for b in chosen]

    assert gw.call(victims()) == ("b", ["b"])


def test_preload_starts_a_model_with_the_gateway(gateway_factory: Any, isolated_home: Path,
                                                 model_dir: Path) -> None:
    write_models(isolated_home, {"a": {"model": str(model_dir), "port": free_port(),
                                       "preload": True},
                                 "b": {"model": str(model_dir), "port": free_port()}})
    gw = gateway_factory()
    assert wait_until(lambda: _live() == ["a"], 30)
    assert wait_until(lambda: _model(gw, "a")["state"] == "running", 10)
    assert _model(gw, "a")["preload"] and _model(gw, "b")["state"] == "startable"


def test_v1_models_shows_the_start_phase_and_progress(gateway_factory: Any,
                                                      entries: list[str], isolated_home: Path,
                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("FAKE_VLLM_DELAY", "4")
    (isolated_home / "start-times.json").write_text(json.dumps({"a": [8.0, 6.0, 7.0]}))
    gw = gateway_factory(api_keys=frozenset({INFER}), admin_keys=frozenset({ADMIN}))
    requests.post(f"{gw.url}/api/models/a/load", headers=_bearer(ADMIN), timeout=10)
    seen: list[dict[str, Any]] = []

    def starting() -> bool:
        data = requests.get(f"{gw.url}/v1/models", headers=_bearer(INFER), timeout=10).json()
        row = next(m for m in data["data"] if m["id"] == "a")
        seen.append(row)
        return row["state"] == "starting" and row.get("phase") not in (None, "preparing") \
            and (row.get("progress") or 0) > 0

    assert wait_until(starting, 20), seen[-1]
    row = seen[-1]
    assert row["expected_s"] == 7.0 and 0 < row["progress"] < 1
    assert _model(gw, "a")["phase"] == row["phase"] or _model(gw, "a")["state"] == "running"
    assert wait_until(lambda: _model(gw, "a")["state"] == "running", 30)
    times = json.loads((isolated_home / "start-times.json").read_text())
    assert len(times["a"]) == 4  # this start is kept for the next estimate


def test_status_shows_the_pins_of_a_running_gateway(gateway_factory: Any,
                                                    entries: list[str]) -> None:
    from cmw_vllm.gateway.service import remove_record, write_record

    gw = gateway_factory(name="gw", admin_keys=frozenset({ADMIN}))
    write_record(gw.settings)  # this process is the gateway: status sees it running
    try:
        requests.post(f"{gw.url}/api/models/a/load", headers=_bearer(ADMIN), timeout=10)
        assert wait_until(lambda: _live() == ["a", "gw"], 30)
        requests.post(f"{gw.url}/api/models/a/pin", json={"pinned": True},
                      headers=_bearer(ADMIN), timeout=10)

        def pinned() -> bool:
            code, out, _ = run("status", "--json")
            servers = {s["name"]: s for s in json.loads(out)["servers"]}
            return servers["a"]["pinned_by"] == ["gw"] and servers["gw"]["pins"] == ["a"]

        assert wait_until(pinned, 10)
        _, out, _ = run("status")
        assert "gw: pinned (never idle-stopped nor evicted): a" in out
    finally:
        remove_record(gw.settings)


# ------------------------------------------------------------------------------ events


class EventClient:
    """Reads ``/api/events`` as a browser's EventSource does: on a dropped stream or a
    refused connection it waits the server's ``retry`` and connects again."""

    def __init__(self, url: str, headers: dict[str, str]) -> None:
        self.url = url
        self.headers = headers
        self.events: list[tuple[str, Any]] = []
        self.connects = 0
        self.retry = 1.0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                with requests.get(self.url, headers=self.headers, stream=True,
                                  timeout=(2, 20)) as reply:
                    if reply.status_code != 200:
                        raise ConnectionError(reply.status_code)
                    self.connects += 1
                    kind, data = "message", ""
                    for line in reply.iter_lines(decode_unicode=True):
                        if self._stop.is_set():
                            return
                        if line.startswith("retry:"):
                            self.retry = int(line[6:]) / 1000
                        elif line.startswith("event:"):
                            kind = line[6:].strip()
                        elif line.startswith("data:"):
                            data += line[5:].strip()
                        elif line == "" and data:
                            self.events.append((kind, json.loads(data)))
                            kind, data = "message", ""
            except (requests.RequestException, ConnectionError):
                pass
            self._stop.wait(self.retry)

    def states(self) -> list[dict[str, Any]]:
        return [data for kind, data in self.events if kind == "state"]

    def close(self) -> None:
        self._stop.set()


def test_the_event_stream_follows_changes_and_survives_a_gateway_restart(
        gateway_factory: Any, entries: list[str]) -> None:
    port = free_port()
    first = gateway_factory(name="first", port=port, admin_keys=frozenset({ADMIN}))
    client = EventClient(f"{first.url}/api/events", _bearer(ADMIN))
    try:
        assert wait_until(lambda: client.states(), 10)
        assert client.states()[0]["gateway"]["name"] == "first"
        requests.post(f"{first.url}/api/models/a/pin", json={"pinned": True},
                      headers=_bearer(ADMIN), timeout=10)
        assert wait_until(lambda: any(m["name"] == "a" and m["pinned"]
                                      for s in client.states() for m in s["models"]), 10)
        requests.post(f"{first.url}/api/models/b/load", headers=_bearer(ADMIN), timeout=10)
        assert wait_until(lambda: any(m["name"] == "b" and m["state"] == "running"
                                      for s in client.states() for m in s["models"]), 30)
        assert wait_until(lambda: any(kind == "log" and data["name"] == "b"
                                      for kind, data in client.events)
                          or any(kind == "sample" for kind, _ in client.events), 10)
        first.close()
        second = gateway_factory(name="second", port=port, admin_keys=frozenset({ADMIN}))
        assert wait_until(lambda: client.states()[-1]["gateway"]["name"] == "second", 20)
        assert client.connects >= 2
        # The first one stopped the server it started; the second one shows b startable.
        rows = {m["name"]: m for m in client.states()[-1]["models"]}
        assert rows["b"]["state"] == "startable" and not rows["a"]["pinned"]
        assert second.pool is not None
    finally:
        client.close()


def test_the_cli_prints_the_dashboard_and_keeps_the_admin_key_file(tmp_path: Path,
                                                                   isolated_home: Path) -> None:
    from cmw_vllm.server_record import log_path

    key_file = tmp_path / "admin.key"
    key_file.write_text(ADMIN + "\n")
    key_file.chmod(0o600)
    port = free_port()
    code, out, err = run("gateway", "--name", "gw", "--port", str(port), "--admin-key-file",
                         str(key_file), "--background")
    assert code == 0, err
    url = f"http://127.0.0.1:{port}"
    try:
        assert f"Dashboard: {url}/ui/" in out
        assert requests.get(f"{url}/api/state", headers=_bearer(ADMIN), timeout=10) \
            .status_code == 200
        assert requests.get(f"{url}/api/state", timeout=10).status_code == 401
        assert wait_until(lambda: f"dashboard: {url}/ui/" in log_path("gw").read_text(), 10)
        # A restart runs it with the same admin key file.
        code, out, err = run("restart", "gw")
        assert code == 0, err
        assert requests.get(f"{url}/api/state", headers=_bearer(ADMIN), timeout=10) \
            .status_code == 200
    finally:
        run("stop", "gw")
