"""Web pages against a keyless gateway on loopback: DNS rebinding (a foreign ``Host``),
cross-site requests (``Origin``, ``Sec-Fetch-Site``), CORS preflights, and the settings that
allow hosts and origins."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import requests

from cmw_vllm.server_record import record_names
from tests.conftest import free_port
from tests.conftest import run_cli as run
from tests.gateway_harness import gateway_maker

CHAT = {"model": "a", "messages": [{"role": "user", "content": "hi"}]}


@pytest.fixture
def entry(isolated_home: Path, model_dir: Path) -> str:
    """One startable entry, ``a``, on the stand-in model."""
    isolated_home.mkdir(parents=True, exist_ok=True)
    (isolated_home / "models.toml").write_text(
        f"[models.a]\nmodel = {json.dumps(str(model_dir))}\nport = {free_port()}\n")
    return "a"


@pytest.fixture
def gateway_factory(fake_engine: Path) -> Iterator[Any]:
    with gateway_maker() as make:
        yield make


def _refused(reply: requests.Response) -> bool:
    return (reply.status_code == 403
            and reply.json()["error"]["type"] == "PermissionDeniedError"
            and "Access-Control-Allow-Origin" not in reply.headers)


def test_a_rebinding_page_cannot_read_the_gateway(gateway_factory: Any, entry: str) -> None:
    gw = gateway_factory()
    port = gw.settings.port
    models = f"{gw.url}/v1/models"
    for host in (f"evil.example:{port}", "evil.example", f"localhost.evil.example:{port}"):
        assert _refused(requests.get(models, headers={"Host": host}, timeout=10)), host
        reply = requests.post(f"{gw.url}/v1/chat/completions", data=json.dumps(CHAT),
                              headers={"Host": host, "Content-Type": "text/plain"}, timeout=10)
        assert _refused(reply), host
    assert record_names() == []  # nothing was started
    import socket

    for host in (f"localhost:{port}", f"127.0.0.1:{port}", f"[::1]:{port}", "LOCALHOST.",
                 f"{socket.gethostname()}:{port}", f"app.localhost:{port}",
                 f"192.168.7.7:{port}"):
        reply = requests.get(models, headers={"Host": host}, timeout=10)
        assert reply.status_code == 200, host


def test_cross_site_pages_cannot_start_models(gateway_factory: Any, entry: str) -> None:
    gw = gateway_factory()
    chat = f"{gw.url}/v1/chat/completions"
    # A form or a no-cors fetch: text/plain needs no preflight, so the POST itself arrives.
    for headers in ({"Origin": "https://evil.example"}, {"Origin": "null"},
                    {"Origin": "http://localhost:3000"},
                    {"Sec-Fetch-Site": "cross-site"}):
        reply = requests.post(chat, data=json.dumps(CHAT),
                              headers={"Content-Type": "text/plain", **headers}, timeout=10)
        assert _refused(reply), headers
    preflight = requests.options(chat, headers={"Origin": "https://evil.example",
                                                "Access-Control-Request-Method": "POST"},
                                 timeout=10)
    assert _refused(preflight)
    assert record_names() == []  # nothing was started
    # The gateway's own origin, a typed URL and clients that are no browsers are served.
    port = gw.settings.port
    for headers in ({"Origin": f"http://127.0.0.1:{port}"}, {"Sec-Fetch-Site": "none"}, {}):
        reply = requests.get(f"{gw.url}/v1/models", headers=headers, timeout=10)
        assert reply.status_code == 200, headers
        assert "Access-Control-Allow-Origin" not in reply.headers


def test_allowed_hosts_and_origins_get_in_and_get_cors(gateway_factory: Any,
                                                       entry: str) -> None:
    app = "http://app.example:3000"
    gw = gateway_factory(allowed_hosts="gw.lan, .corp.example",
                         allowed_origins=f"{app}, https://other.example")
    models = f"{gw.url}/v1/models"
    for host in ("gw.lan:4000", "x.corp.example", "corp.example.evil.example"):
        reply = requests.get(models, headers={"Host": host}, timeout=10)
        assert reply.status_code == (403 if "evil" in host else 200), host
    preflight = requests.options(f"{gw.url}/v1/chat/completions",
                                 headers={"Origin": app, "Access-Control-Request-Method": "POST",
                                          "Access-Control-Request-Headers":
                                              "authorization, content-type"}, timeout=10)
    assert preflight.status_code == 204
    assert preflight.headers["Access-Control-Allow-Origin"] == app
    assert "POST" in preflight.headers["Access-Control-Allow-Methods"]
    assert preflight.headers["Access-Control-Allow-Headers"] == "authorization, content-type"
    reply = requests.get(models, headers={"Origin": app}, timeout=10)
    assert reply.status_code == 200 and reply.headers["Access-Control-Allow-Origin"] == app
    assert "Origin" in reply.headers["Vary"]
    chat = requests.post(f"{gw.url}/v1/chat/completions", json=CHAT,
                         headers={"Origin": app, "Sec-Fetch-Site": "cross-site"}, timeout=60)
    assert chat.status_code == 200 and chat.headers["Access-Control-Allow-Origin"] == app
    assert _refused(requests.get(models, headers={"Origin": "https://evil.example"},
                                 timeout=10))


def test_star_allows_every_host_and_origin(gateway_factory: Any) -> None:
    gw = gateway_factory(allowed_hosts="*", allowed_origins="*")
    reply = requests.get(f"{gw.url}/v1/models", timeout=10,
                         headers={"Host": "anything.example", "Origin": "https://a.example"})
    assert reply.status_code == 200
    assert reply.headers["Access-Control-Allow-Origin"] == "https://a.example"


@pytest.mark.parametrize("option", ["--allowed-origins", "--allowed-hosts"])
def test_malformed_allowed_values_are_one_line_errors(fake_engine: Path, option: str) -> None:
    code, _, err = run("gateway", "--port", str(free_port()), option, "http://a.example/x y")
    assert code != 0 and "is not" in err
    assert "Traceback" not in err and len(err.strip().splitlines()) == 1
