"""The gateway attacked at its edge, loopback only and bounded in count and time: malformed
requests (log flood, keys in the log), slow clients, a client holding many connections,
errors the gateway makes itself, the headers it forwards, and its shutdown grace.

Servers behind it are stand-ins written on raw sockets here (an upstream that dies
mid-reply is not something the stand-in vLLM does), added to the gateway's pool directly.
"""

from __future__ import annotations

import json
import socket
import threading
import time
import uuid
from pathlib import Path
from typing import Any

import pytest
import requests

from cmw_vllm.gateway.settings import GatewaySettings
from tests.conftest import alive_pids, free_port
from tests.conftest import run_cli as run

KEY = "gw-edge-key-1"
OK_BODY = b'{"choices":[{"message":{"role":"assistant","content":"hi"}}]}'


# ----------------------------------------------------------------- stand-in upstreams

def answer_ok(conn: socket.socket) -> None:
    conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nServer: uvicorn\r\n"
                 b"Connection: close, X-Upstream-Hop\r\nX-Upstream-Hop: 1\r\n"
                 b"Content-Length: %d\r\n\r\n%s" % (len(OK_BODY), OK_BODY))


def die_mid_reply(conn: socket.socket) -> None:
    conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\n"
                 b"Content-Length: 100\r\n\r\n{\"choices\": [")


def die_mid_stream(conn: socket.socket) -> None:
    conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\n"
                 b"Transfer-Encoding: chunked\r\n\r\n"
                 b"10\r\ndata: {\"a\": 1}\n\n\r\n")


def slow_stream(conn: socket.socket) -> None:
    conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\n"
                 b"Transfer-Encoding: chunked\r\n\r\n")
    chunk = b"data: {\"a\": 1}\n\n"
    for _ in range(300):  # 30 s at most
        conn.sendall(b"%x\r\n%s\r\n" % (len(chunk), chunk))
        time.sleep(0.1)
    conn.sendall(b"0\r\n\r\n")


def _raw(port: int, data: bytes, timeout: float = 10.0) -> bytes:
    """Send ``data`` on a fresh connection; everything the gateway answers until it closes."""
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as sock:
        sock.sendall(data)
        out = b""
        while True:
            try:
                chunk = sock.recv(65536)
            except (ConnectionResetError, TimeoutError):
                break
            if not chunk:
                break
            out += chunk
    return out


def _json_error(raw: bytes) -> tuple[int, dict[str, Any], dict[str, str]]:
    head, _, body = raw.partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    headers = {k.strip().lower(): v.strip() for k, _, v in (x.partition(":") for x in lines[1:])}
    assert headers.get("content-type", "").startswith("application/json"), raw[:300]
    error = json.loads(body)["error"]
    assert set(error) >= {"message", "type", "code"}
    return int(lines[0].split()[1]), error, headers


def _chat(url: str, **kw: Any) -> requests.Response:
    return requests.post(f"{url}/v1/chat/completions", timeout=kw.pop("timeout", 30),
                         json={"model": "stub", "messages": []}, **kw)


def _metric(url: str, line: str, headers: dict[str, str] | None = None) -> int:
    text = requests.get(f"{url}/metrics", headers=headers, timeout=10).text
    for row in text.splitlines():
        if row.startswith(line + " "):
            return int(row.rsplit(" ", 1)[1])
    return 0


# ----------------------------------------------------------------- malformed requests

def _malformed(key: str) -> list[bytes]:
    """Requests aiohttp cannot parse, each with ``key`` in its head."""
    return [
        # Bare LF framing.
        (b"POST /v1/chat/completions HTTP/1.1\nHost: x\nAuthorization: Bearer %s\n"
         b"Content-Length: 2\n\n{}" % key.encode()),
        # A control character in Authorization.
        (b"POST /v1/chat/completions HTTP/1.1\r\nHost: 127.0.0.1\r\n"
         b"Authorization: Bearer %s\x01\r\n"
         b"Content-Length: 2\r\n\r\n{}" % key.encode()),
        # A space in a header name.
        (b"GET /v1/models HTTP/1.1\r\nHost: 127.0.0.1\r\nBad Header: %s\r\n\r\n" % key.encode()),
        # Both Content-Length and a bad Transfer-Encoding.
        (b"POST /v1/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nx-api-key: %s\r\n"
         b"Transfer-Encoding: chunked, identity\r\nContent-Length: 3\r\n\r\nabc" % key.encode()),
    ]


def test_malformed_requests_get_json_400s_a_bounded_log_and_no_key_in_it(
        isolated_home: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    leak = f"sk-leak-{uuid.uuid4().hex}"
    monkeypatch.setenv("CMW_VLLM_GATEWAY_API_KEYS", KEY)
    port = free_port()
    code, out, err = run("gateway", "--port", str(port), "--background", "--json",
                         "--max-log-mb", "0.001")
    assert code == 0, err
    info = json.loads(out)
    url = info["url"]
    try:
        log_dir = isolated_home / "logs"
        before = sum(p.stat().st_size for p in log_dir.iterdir())
        sent = 0
        for _ in range(75):  # 300 malformed requests
            for data in _malformed(leak):
                status, error, headers = _json_error(_raw(port, data))
                assert status == 400 and error["type"] == "BadRequestError"
                assert leak not in error["message"]
                assert headers["server"] == "cmw-vllm"
                sent += 1
        # Bytes that are not UTF-8 in the key: a 401 like any wrong key (was a text 500).
        status, error, _ = _json_error(_raw(
            port, b"GET /v1/models HTTP/1.1\r\nHost: 127.0.0.1\r\n"
                  b"Authorization: Bearer \xff%s\r\n"
            b"Connection: close\r\n\r\n" % leak.encode()))
        assert status == 401 and error["type"] == "AuthenticationError"
        auth = {"Authorization": f"Bearer {KEY}"}
        assert _metric(url, 'cmw_vllm_gateway_requests_total{model="unknown",code="400"}',
                       auth) == sent
        assert _metric(url, 'cmw_vllm_gateway_requests_total{model="unknown",code="401"}',
                       auth) == 1
    finally:
        code, _, err = run("stop", "gateway")
    assert code == 0, err
    assert not alive_pids([info["pid"]])
    files = sorted(log_dir.iterdir())
    grown = sum(p.stat().st_size for p in files) - before
    # aiohttp logged a traceback and the request's bytes for each: about 16 KB a request.
    assert grown < 40_000, grown
    text = "".join(p.read_text(errors="replace") for p in files)
    assert text.count("malformed request from 127.0.0.1") <= 25
    assert "more lines about clients suppressed" in text
    assert "Traceback" not in text
    # Rotated by size: the current log and the ones before it stay small.
    assert (log_dir / "gateway.log.1").exists()
    assert all(p.stat().st_size < 2_000 for p in files if p.name.startswith("gateway.log"))
    # No key anywhere under the state directory.
    for path in isolated_home.rglob("*"):
        if path.is_file():
            assert leak.encode() not in path.read_bytes(), path


def test_rotating_log_keeps_five_files_of_bounded_size(tmp_path: Path) -> None:
    import logging

    from cmw_vllm.gateway.logfile import RotatingLog

    logs = tmp_path / "logs"
    logs.mkdir()
    path = logs / "gw.log"
    handler = RotatingLog(path, max_bytes=1000)
    handler.setFormatter(logging.Formatter("%(message)s"))
    record = logging.LogRecord("cmw_vllm.x", logging.WARNING, __file__, 1, "x" * 99, None, None)
    for _ in range(200):
        handler.emit(record)
    handler.close()
    names = sorted(p.name for p in logs.iterdir())
    assert names == ["gw.log", "gw.log.1", "gw.log.2", "gw.log.3", "gw.log.4", "gw.log.5"]
    assert all(p.stat().st_size <= 1000 for p in logs.iterdir())
    assert oct(path.stat().st_mode & 0o777) == "0o600"


def test_other_libraries_lines_lose_their_arguments_and_tracebacks() -> None:
    import logging

    from cmw_vllm.gateway.logfile import Scrub

    try:
        raise ValueError("Bearer sk-secret")
    except ValueError:
        import sys

        info = sys.exc_info()
    record = logging.LogRecord("aiohttp.server", logging.ERROR, __file__, 1,
                               "Error handling request %s", ("Bearer sk-secret",), info)
    assert Scrub().filter(record)
    text = logging.Formatter().format(record)
    assert "sk-secret" not in text and "ValueError" in text
    own = logging.LogRecord("cmw_vllm.gateway", logging.INFO, __file__, 1, "a %s", ("b",), None)
    assert Scrub().filter(own) and own.getMessage() == "a b"


# ----------------------------------------------------------------- slow clients

@pytest.mark.parametrize("lane", [True, False], ids=["lane", "aiohttp"])
def test_slow_heads_and_stalled_bodies_are_cut_by_the_timeouts(edge_gateway: Any,
                                                               lane: bool) -> None:
    gw = edge_gateway(answer_ok, api_keys=frozenset({KEY}), header_timeout=0.5, lane=lane,
                      body_timeout=0.5)
    port = gw.settings.port
    begin = time.monotonic()
    # Nothing at all, then half a head: closed without an answer (as nginx does).
    assert _raw(port, b"") == b""
    assert _raw(port, b"POST /v1/chat/completions HTTP/1.1\r\nHost: 127.0.0.1\r\n") == b""
    # A valid key and a body that never comes: a 408, then the connection is closed.
    raw = _raw(port, b"POST /v1/chat/completions HTTP/1.1\r\nHost: 127.0.0.1\r\n"
               b"Authorization: Bearer %s\r\nContent-Length: 100\r\n\r\n{\"mo" % KEY.encode())
    status, error, _ = _json_error(raw)
    assert status == 408 and error["type"] == "RequestTimeoutError"
    assert time.monotonic() - begin < 8
    # A slow but moving body is fine: the timeout is between two reads.
    with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
        body = json.dumps({"model": "stub", "messages": []}).encode()
        sock.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: 127.0.0.1\r\n"
                     b"Authorization: "
                     b"Bearer %s\r\nContent-Length: %d\r\nConnection: close\r\n\r\n"
                     % (KEY.encode(), len(body)))
        for i in range(0, len(body), 8):
            sock.sendall(body[i:i + 8])
            time.sleep(0.1)  # 0.1 s between reads, under the 0.5 s timeout
        assert sock.recv(65536).startswith(b"HTTP/1.1 200")
    auth = {"Authorization": f"Bearer {KEY}"}
    # The half head and the stalled body; a connection that sent nothing is not a request.
    assert _metric(gw.url, 'cmw_vllm_gateway_requests_total{model="unknown",code="408"}',
                   auth) == 2


@pytest.mark.parametrize("lane", [True, False], ids=["lane", "aiohttp"])
def test_one_address_holds_at_most_its_connections(edge_gateway: Any, lane: bool) -> None:
    gw = edge_gateway(answer_ok, max_client_connections=4, lane=lane)
    port = gw.settings.port
    held = [socket.create_connection(("127.0.0.1", port), timeout=10) for _ in range(4)]
    try:
        status, error, headers = _json_error(_raw(port, b"GET /health HTTP/1.1\r\n\r\n"))
        assert status == 503 and "too many connections" in error["message"]
        assert headers["retry-after"] == "5"
    finally:
        for sock in held:
            sock.close()
    deadline = time.monotonic() + 10
    while True:  # the closes reach the gateway's loop soon after
        reply = _chat(gw.url)
        if reply.status_code == 200 or time.monotonic() > deadline:
            break
        time.sleep(0.05)
    assert reply.status_code == 200
    assert gw.metrics.rejected[("unknown", "client_connections")] >= 1


def test_the_gateway_unit_raises_the_open_files_limit(tmp_path: Path,
                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    from cmw_vllm.gateway.service import LIMIT_NOFILE, enable_unit

    monkeypatch.setenv("XDG_CONFIG_HOME", str(tmp_path / "config"))
    files = enable_unit(GatewaySettings(name="gw"))
    text = files.unit_path.read_text()
    assert f"\nLimitNOFILE={LIMIT_NOFILE}\n" in text and LIMIT_NOFILE >= 65536


# ----------------------------------------------------------------- errors

@pytest.mark.parametrize("lane", [True, False], ids=["lane", "aiohttp"])
def test_an_upstream_dying_mid_reply_is_a_json_502_counted_as_502(edge_gateway: Any,
                                                                  lane: bool) -> None:
    gw = edge_gateway(die_mid_reply, lane=lane)
    reply = _chat(gw.url)
    assert reply.status_code == 502, reply.text
    assert reply.json()["error"]["type"] == "BadGatewayError"
    assert gw.metrics.requests == {("stub", 502): 1}


@pytest.mark.parametrize("lane", [True, False], ids=["lane", "aiohttp"])
def test_a_stream_broken_off_upstream_is_cut_and_counted_as_502(edge_gateway: Any,
                                                                lane: bool) -> None:
    gw = edge_gateway(die_mid_stream, lane=lane)
    with pytest.raises(requests.exceptions.ChunkedEncodingError), \
            _chat(gw.url, stream=True) as reply:
        assert reply.status_code == 200
        for _ in reply.iter_content(None):
            pass
    deadline = time.monotonic() + 10
    while not gw.metrics.requests and time.monotonic() < deadline:
        time.sleep(0.05)
    assert gw.metrics.requests == {("stub", 502): 1}


def test_header_bytes_that_are_not_utf8_are_a_json_400(edge_gateway: Any) -> None:
    gw = edge_gateway(answer_ok)
    body = b'{"model": "stub"}'
    raw = _raw(gw.settings.port, b"POST /v1/chat/completions HTTP/1.1\r\nHost: 127.0.0.1\r\n"
               b"X-Note: caf\xe9\xff\r\nContent-Length: %d\r\nConnection: close\r\n\r\n%s"
               % (len(body), body))
    status, error, _ = _json_error(raw)
    assert status == 400 and "not valid UTF-8" in error["message"]
    assert gw.metrics.requests == {("stub", 400): 1}


# ----------------------------------------------------------------- headers

@pytest.mark.parametrize("lane", [True, False], ids=["lane", "aiohttp"])
def test_forwarded_headers_are_a_proxys(edge_gateway: Any, lane: bool) -> None:
    body = json.dumps({"model": "stub"}).encode()
    request = (b"POST /v1/chat/completions HTTP/1.1\r\nHost: 127.0.0.1\r\n"
               b"Connection: keep-alive, X-Hop-Secret\r\nX-Hop-Secret: s\r\nKeep-Alive: 5\r\n"
               b"TE: trailers\r\nProxy-Connection: keep-alive\r\n%s"
               b"X-Forwarded-For: 6.6.6.6\r\nForwarded: for=6.6.6.6\r\nX-Real-IP: 6.6.6.6\r\n"
               b"X-Kept: yes\r\nContent-Length: %d\r\n\r\n%s"
               # (an Upgrade header sends a request to aiohttp's path)
               % (b"" if lane else b"Upgrade: h2c\r\n", len(body), body))
    gw = edge_gateway(answer_ok, lane=lane)
    raw = _raw(gw.settings.port, request.replace(b"keep-alive, X-Hop", b"close, X-Hop", 1))
    lane_served = gw.runner.server.lane.served if lane else 0  # type: ignore[union-attr]
    assert lane_served == (1 if lane else 0)
    head = raw.partition(b"\r\n\r\n")[0].decode()
    assert head.startswith("HTTP/1.1 200")
    assert "\r\nServer: cmw-vllm" in head and "aiohttp" not in head and "Python" not in head
    assert "X-Upstream-Hop" not in head  # named in the server's Connection header
    seen = gw.stub.header_names()
    for name in ("x-hop-secret", "keep-alive", "te", "proxy-connection", "upgrade",
                 "forwarded", "x-real-ip", "accept-encoding", "content-type", "accept",
                 "user-agent"):
        assert name not in seen, (name, seen)
    assert seen["x-forwarded-for"] == "127.0.0.1"  # the peer, not the client's claim
    assert seen["x-kept"] == "yes"
    # Behind a trusted proxy, its X-Forwarded-For is kept and the proxy appended.
    trusting = edge_gateway(answer_ok, trusted_proxies=("127.0.0.0/8",), lane=lane)
    _raw(trusting.settings.port, request.replace(b"keep-alive, X-Hop", b"close, X-Hop", 1))
    seen = trusting.stub.header_names()
    assert seen["x-forwarded-for"] == "6.6.6.6, 127.0.0.1"
    assert seen["x-real-ip"] == "6.6.6.6"


def _expect(port: int, key: str, length: int) -> bytes:
    with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
        sock.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: 127.0.0.1\r\n"
                     b"Authorization: Bearer "
                     b"%s\r\nExpect: 100-continue\r\nContent-Length: %d\r\n"
                     b"Connection: close\r\n\r\n" % (key.encode(), length))
        return sock.recv(65536)


def test_100_continue_comes_only_after_the_key_and_size_checks(edge_gateway: Any) -> None:
    gw = edge_gateway(answer_ok, api_keys=frozenset({KEY}), max_body_bytes=1000)
    port = gw.settings.port
    assert _expect(port, "wrong", 20).startswith(b"HTTP/1.1 401 ")
    assert _expect(port, KEY, 5000).startswith(b"HTTP/1.1 413 ")
    body = json.dumps({"model": "stub"}).encode()
    with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
        sock.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: 127.0.0.1\r\n"
                     b"Authorization: Bearer "
                     b"%s\r\nExpect: 100-continue\r\nContent-Length: %d\r\n"
                     b"Connection: close\r\n\r\n" % (KEY.encode(), len(body)))
        assert sock.recv(65536) == b"HTTP/1.1 100 Continue\r\n\r\n"
        sock.sendall(body)
        assert sock.recv(65536).startswith(b"HTTP/1.1 200 ")


# ----------------------------------------------------------------- shutdown

@pytest.mark.parametrize("lane", [True, False], ids=["lane", "aiohttp"])
def test_shutdown_gives_streams_the_grace_and_no_more(edge_gateway: Any, lane: bool) -> None:
    gw = edge_gateway(slow_stream, shutdown_grace=1.0, lane=lane)
    ended: list[float] = []
    got_first = threading.Event()

    def read() -> None:
        try:
            with _chat(gw.url, stream=True, timeout=60) as reply:
                for _ in reply.iter_content(None):
                    got_first.set()
        except requests.exceptions.RequestException:
            pass
        ended.append(time.monotonic())

    reader = threading.Thread(target=read)
    reader.start()
    assert got_first.wait(10)
    begin = time.monotonic()
    gw.close()
    reader.join(30)
    cut_after = ended[0] - begin
    # It ran for the grace (the stand-in would stream for 30 s), and was cut soon after;
    # aiohttp's own shutdown cut it at twice its timeout.
    assert 0.9 <= cut_after < 1.9 + 2, cut_after


def test_the_documented_shutdown_grace_is_the_default(isolated_home: Path) -> None:
    from cmw_vllm.gateway.service import shutdown_budget
    from cmw_vllm.gateway.settings import DEFAULT_SHUTDOWN_GRACE

    assert GatewaySettings().shutdown_grace == DEFAULT_SHUTDOWN_GRACE
    assert shutdown_budget({"CMW_VLLM_DRAIN_TIMEOUT": "0"}, grace=3.0) == \
        shutdown_budget({"CMW_VLLM_DRAIN_TIMEOUT": "0"}) - DEFAULT_SHUTDOWN_GRACE + 3.0
    args = GatewaySettings(shutdown_grace=3.0).cli_args()
    assert args[args.index("--shutdown-grace") + 1] == "3.0"


def test_aiohttp_floor_has_the_request_parser_fixes() -> None:
    """CVE-2024-52304 (fixed in 3.10.11), CVE-2025-53643 (3.12.14) and CVE-2025-69223, the
    decompression bomb (3.13.3): the package requires an aiohttp with all three, and the one
    installed here is one."""
    import tomllib
    from importlib.metadata import version

    from packaging.requirements import Requirement
    from packaging.version import Version

    project = tomllib.loads((Path(__file__).parents[1] / "pyproject.toml").read_text())
    wanted = [Requirement(r) for r in project["project"]["dependencies"]
              if Requirement(r).name == "aiohttp"]
    assert len(wanted) == 1
    floor = Version("3.13.3")
    allowed = [Version(v) for v in ("3.10.11", "3.12.14", "3.13.2", "3.13.3", "3.14.0")]
    assert [v for v in allowed if wanted[0].specifier.contains(v)] == \
        [v for v in allowed if v >= floor]
    assert wanted[0].specifier.contains(version("aiohttp"))


def test_the_docs_give_the_default_shutdown_grace() -> None:
    import re

    from cmw_vllm.gateway.settings import DEFAULT_SHUTDOWN_GRACE

    text = (Path(__file__).parents[1] / "docs" / "gateway.md").read_text()
    found = re.findall(r"`--shutdown-grace` \(default (\d+) s\)", text)
    assert found and {float(x) for x in found} == {DEFAULT_SHUTDOWN_GRACE}


def test_stalled_clients_under_a_small_fd_limit_leave_room_for_others(
        isolated_home: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """300 connections with a valid key whose bodies never come, against a gateway limited
    to 256 open files: another client is still served (one address gets a quarter of the
    descriptors at most)."""
    import os
    import resource
    import subprocess
    import sys

    monkeypatch.setenv("CMW_VLLM_GATEWAY_API_KEYS", KEY)
    port = free_port()

    def small_limit() -> None:
        resource.setrlimit(resource.RLIMIT_NOFILE, (256, 256))

    started = subprocess.run(
        [sys.executable, "-m", "cmw_vllm", "gateway", "--port", str(port), "-d", "--json"],
        preexec_fn=small_limit, capture_output=True, text=True, timeout=90,
        env=dict(os.environ), stdin=subprocess.DEVNULL)
    assert started.returncode == 0, started.stderr
    info = json.loads(started.stdout)
    stalled: list[socket.socket] = []
    try:
        for _ in range(300):
            try:
                sock = socket.create_connection(("127.0.0.1", port), timeout=5)
                stalled.append(sock)
                sock.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: 127.0.0.1\r\n"
                             b"Authorization: "
                             b"Bearer %s\r\nContent-Length: 100\r\n\r\n{" % KEY.encode())
            except OSError:
                continue
        with socket.socket() as other:
            other.settimeout(10)
            other.bind(("127.0.0.2", 0))
            other.connect(("127.0.0.1", port))
            other.sendall(b"GET /v1/models HTTP/1.1\r\nHost: 127.0.0.1\r\n"
                          b"Authorization: Bearer "
                          b"%s\r\nConnection: close\r\n\r\n" % KEY.encode())
            assert other.recv(65536).startswith(b"HTTP/1.1 200 ")
    finally:
        for sock in stalled:
            sock.close()
        code, _, err = run("stop", "gateway")
    assert code == 0, err
    assert not alive_pids([info["pid"]])


def test_refusals_before_any_server_are_json_and_counted(edge_gateway: Any) -> None:
    gw = edge_gateway(answer_ok, api_keys=frozenset({KEY}))
    auth = {"Authorization": f"Bearer {KEY}"}
    for method, path in (("POST", "/sleep"), ("GET", "/v1/chat/completions"),
                         ("DELETE", "/v1/models")):
        reply = requests.request(method, f"{gw.url}{path}", headers=auth, timeout=10)
        assert reply.status_code == 404 and reply.json()["error"]["type"] == "NotFoundError"
    assert requests.get(f"{gw.url}/v1/models", timeout=10).status_code == 401
    assert gw.metrics.requests[("unknown", 404)] == 3
    assert gw.metrics.requests[("unknown", 401)] == 1
