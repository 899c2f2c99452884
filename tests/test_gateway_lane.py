"""The gateway's fast lane (``gateway/lane.py``): it answers as aiohttp's path does, and it is
attacked as the edge is: pipelining floods, heads and bodies in single bytes, slow heads on
kept-alive connections, bad bytes in unfinished heads, clients that go away mid-stream, and
servers that answer with a split header. Loopback only, bounded in count and time.

Which path served a request is read off the lane's count (``Lane.served``); a request goes
to aiohttp's path, unchanged in meaning, with ``Content-Encoding: identity``.
"""

from __future__ import annotations

import json
import socket
import threading
import time
from typing import Any

from cmw_vllm.gateway.lane import MAX_PIPELINED, Lane
from tests.conftest import wait_until
from tests.gateway_harness import GatewayThread
from tests.test_gateway_edge import OK_BODY, _json_error, _metric, _raw, answer_ok, die_mid_reply

KEY = "gw-lane-key-1"
CHAT = json.dumps({"model": "stub", "messages": [{"role": "user", "content": "hi"}]}).encode()


def _lane(gw: GatewayThread) -> Lane:
    lane = gw.runner.server.lane  # type: ignore[union-attr]
    assert lane is not None
    return lane


def _port(gw: GatewayThread) -> int:
    return gw.settings.port


def _request(extra: bytes = b"", body: bytes = CHAT, close: bool = True,
             path: bytes = b"/v1/chat/completions", key: str = KEY) -> bytes:
    return (b"POST %s HTTP/1.1\r\nHost: 127.0.0.1\r\nAuthorization: Bearer %s\r\n"
            b"Content-Type: application/json\r\nX-Kept: yes\r\n%s%s"
            b"Content-Length: %d\r\n\r\n%s"
            % (path, key.encode(), extra, b"Connection: close\r\n" if close else b"",
               len(body), body))


def _split(raw: bytes) -> tuple[str, dict[str, str], bytes]:
    head, _, body = raw.partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    headers = {k.strip().lower(): v.strip() for k, _, v in (x.partition(":") for x in lines[1:])}
    return lines[0], headers, body


def _answers(sock: socket.socket, count: int, timeout: float = 20.0) -> list[bytes]:
    """``count`` whole answers with a Content-Length read off a kept-alive connection."""
    sock.settimeout(timeout)
    data = b""
    out: list[bytes] = []
    while len(out) < count:
        end = data.find(b"\r\n\r\n")
        if end >= 0:
            _, headers, _ = _split(data[:end + 4])
            total = end + 4 + int(headers["content-length"])
            if len(data) >= total:
                out.append(data[:total])
                data = data[total:]
                continue
        chunk = sock.recv(65536)
        assert chunk, f"closed after {len(out)} answers"
        data += chunk
    return out


def short_stream(conn: socket.socket) -> None:
    conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\n"
                 b"Transfer-Encoding: chunked\r\n\r\n")
    for n in range(3):
        chunk = b'data: {"n": %d}\n\n' % n
        conn.sendall(b"%x\r\n%s\r\n" % (len(chunk), chunk))
    conn.sendall(b"0\r\n\r\n")


def split_header(conn: socket.socket) -> None:
    conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\n"
                 b"X-Note: a\nSet-Cookie: injected=1\r\nContent-Length: 2\r\n\r\n{}")


def _dechunk(body: bytes) -> bytes:
    out = b""
    while True:
        size_line, _, body = body.partition(b"\r\n")
        size = int(size_line, 16)
        if size == 0:
            return out
        out, body = out + body[:size], body[size + 2:]


# ----------------------------------------------------------------- the same answers

def test_the_lane_answers_as_aiohttps_path_does(edge_gateway: Any) -> None:
    """Whole answers, streams, the server's failures and split headers: the same status,
    headers (but Date) and body on both paths, and the same request upstream."""
    answers: dict[str, bytes] = {}
    for respond, streamed in ((answer_ok, False), (short_stream, True),
                              (die_mid_reply, False), (split_header, False)):
        gw = edge_gateway(respond, api_keys=frozenset({KEY}))
        lane_raw = _raw(_port(gw), _request())
        assert _lane(gw).served == 1, respond.__name__
        aiohttp_raw = _raw(_port(gw), _request(b"Content-Encoding: identity\r\n"))
        assert _lane(gw).served == 1, respond.__name__
        (lane_line, lane_headers, lane_body), (aio_line, aio_headers, aio_body) = \
            _split(lane_raw), _split(aiohttp_raw)
        assert lane_line == aio_line, (respond.__name__, lane_line, aio_line)
        assert lane_headers.pop("date") and aio_headers.pop("date")
        assert lane_headers == aio_headers, (respond.__name__, lane_headers, aio_headers)
        if streamed:
            assert _dechunk(lane_body) == _dechunk(aio_body) == \
                b"".join(b'data: {"n": %d}\n\n' % n for n in range(3))
        else:
            assert lane_body == aio_body, respond.__name__
        stub = gw.stub  # type: ignore[attr-defined]
        assert stub.heads[0] == stub.heads[1], respond.__name__
        answers[respond.__name__] = lane_raw
    ok_line, ok_headers, ok_body = _split(answers["answer_ok"])
    assert ok_line == "HTTP/1.1 200 OK" and ok_body == OK_BODY
    assert ok_headers["server"] == "cmw-vllm" and "x-upstream-hop" not in ok_headers
    assert _json_error(answers["die_mid_reply"])[0] == 502
    assert _json_error(answers["split_header"])[0] == 502
    assert b"injected" not in answers["split_header"].lower()


# ----------------------------------------------------------------- connections

def test_pipelined_requests_are_answered_in_order_and_a_flood_pauses_reading(
        edge_gateway: Any) -> None:
    gw = edge_gateway(answer_ok, api_keys=frozenset({KEY}))
    with socket.create_connection(("127.0.0.1", _port(gw))) as sock:
        sock.sendall(_request(close=False) * 3)
        assert [_split(a)[0] for a in _answers(sock, 3)] == ["HTTP/1.1 200 OK"] * 3
    assert _lane(gw).served == 3
    wait_until(lambda: not gw.runner.server.edge.connections, 10)  # type: ignore[union-attr]

    # A client that sends requests without reading the answers: what the lane holds stays
    # bounded (it stops reading), and other clients are served meanwhile.
    hold = threading.Event()

    def slow_ok(conn: socket.socket) -> None:
        hold.wait(30)
        answer_ok(conn)

    gw = edge_gateway(slow_ok, api_keys=frozenset({KEY}))
    flood = socket.create_connection(("127.0.0.1", _port(gw)))
    flood.settimeout(0.5)
    sent = 0
    try:
        while sent < 64 * 1024 * 1024:
            sent += flood.send(_request(close=False) * 200)
    except TimeoutError:
        pass
    held = [len(c.buffer) for c in _lane(gw).connections]
    assert held and max(held) <= MAX_PIPELINED + 4 * 1024 * 1024, (held, sent)
    assert sent < 64 * 1024 * 1024
    assert any(c.reading_paused for c in _lane(gw).connections)
    hold.set()
    other = _raw(_port(gw), _request())
    assert other.startswith(b"HTTP/1.1 200 "), other[:200]
    flood.close()


def test_a_request_in_single_bytes_is_served_and_a_slow_second_head_is_cut(
        edge_gateway: Any) -> None:
    gw = edge_gateway(answer_ok, api_keys=frozenset({KEY}), header_timeout=1.0)
    with socket.create_connection(("127.0.0.1", _port(gw))) as sock:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        for byte in _request(close=False):  # CR and LF arrive apart, too
            sock.send(bytes([byte]))
            time.sleep(0.001)
        assert _split(_answers(sock, 1)[0])[0] == "HTTP/1.1 200 OK"
        assert _lane(gw).served == 1
        # The next head on the same connection must come within the header timeout too
        # (aiohttp's protocol times only the first).
        sock.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: 127.0.0.1\r\n")
        begin = time.monotonic()
        sock.settimeout(10)
        assert sock.recv(65536) == b""
        assert 0.8 <= time.monotonic() - begin < 5
    assert _metric(gw.url, 'cmw_vllm_gateway_requests_total{model="unknown",code="408"}',
                   {"Authorization": f"Bearer {KEY}"}) == 1


def test_bad_bytes_in_an_unfinished_head_are_refused_at_once(edge_gateway: Any) -> None:
    """The lane does not sit on what aiohttp's parser refuses at once (a slow client
    could otherwise hold a connection for the whole header timeout with garbage)."""
    gw = edge_gateway(answer_ok, api_keys=frozenset({KEY}), header_timeout=30.0)
    start = b"POST /v1/chat/completions HTTP/1.1\r\nHost: 127.0.0.1\r\n"
    for partial in (start + b"X-A: 1\nX-B: 2\r\n",  # a bare LF
                    start + b"X-A: 1\r\rX-B: 2\r\n",  # a bare CR
                    start + b"X-A: a\x00b\r\n",  # a NUL
                    start + b"Bad Name: 1\r\n",  # a space in a name
                    b"POST /v1/chat/completions HTTP/1.1\n"):
        with socket.create_connection(("127.0.0.1", _port(gw)), timeout=10) as sock:
            sock.sendall(partial)
            begin = time.monotonic()
            answer = sock.recv(65536)
            assert time.monotonic() - begin < 5, partial
            assert answer.split(b" ", 2)[1] == b"400", (partial, answer[:100])
    assert _lane(gw).served == 0


def test_a_connection_moves_to_aiohttp_at_its_first_request_the_lane_does_not_take(
        edge_gateway: Any) -> None:
    gw = edge_gateway(answer_ok, api_keys=frozenset({KEY}))
    with socket.create_connection(("127.0.0.1", _port(gw))) as sock:
        sock.sendall(_request(close=False))
        assert _split(_answers(sock, 1)[0])[0] == "HTTP/1.1 200 OK"
        sock.sendall(_request(b"Origin: http://evil.example\r\n", close=False))
        status, error, _ = _json_error(_answers(sock, 1)[0])
        assert status == 403 and error["type"] == "PermissionDeniedError"
        sock.sendall(_request(close=False) + _request(key="wrong"))
        first, second = _answers(sock, 2)
        assert _split(first)[0] == "HTTP/1.1 200 OK"
        assert _json_error(second)[0] == 401
    assert _lane(gw).served == 1
    assert gw.metrics.requests[("stub", 200)] == 2


def test_a_client_leaving_mid_stream_closes_the_upstream_and_counts_499(
        edge_gateway: Any) -> None:
    cut = threading.Event()

    def endless(conn: socket.socket) -> None:
        conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\n"
                     b"Transfer-Encoding: chunked\r\n\r\n")
        chunk = b'data: {"a": 1}\n\n'
        try:
            for _ in range(600):  # 60 s at most
                conn.sendall(b"%x\r\n%s\r\n" % (len(chunk), chunk))
                time.sleep(0.1)
        except OSError:
            cut.set()

    gw = edge_gateway(endless, api_keys=frozenset({KEY}))
    with socket.create_connection(("127.0.0.1", _port(gw)), timeout=10) as sock:
        sock.sendall(_request())
        assert sock.recv(65536).startswith(b"HTTP/1.1 200 OK")
    assert cut.wait(10), "the server kept streaming to a client that left"
    assert _lane(gw).served == 1
    wait_until(lambda: gw.metrics.requests.get(("stub", 499)) == 1, 10)
    assert gw.pool is not None and gw.pool.backends["stub"].in_flight == 0


def test_closed_lane_connections_give_back_their_place_under_the_cap(
        edge_gateway: Any) -> None:
    gw = edge_gateway(answer_ok, api_keys=frozenset({KEY}), max_client_connections=2)
    for _ in range(3):
        socks = [socket.create_connection(("127.0.0.1", _port(gw)), timeout=10)
                 for _ in range(2)]
        for sock in socks:
            sock.sendall(_request(close=False))
            assert _split(_answers(sock, 1)[0])[0] == "HTTP/1.1 200 OK"
        refused = _raw(_port(gw), _request())
        assert _json_error(refused)[0] == 503
        for sock in socks:
            sock.close()
        wait_until(lambda: not gw.runner.server.edge.connections, 10)  # type: ignore[union-attr]
    assert _lane(gw).served == 6


# ----------------------------------------------------------------- the lane against aiohttp

_ODD_BYTES = b"\x00\x01\x7f\x80\xff\r\n \t:;,\"%?/=aZ9-"


def _mutants(seed: int, count: int) -> list[bytes]:
    """``count`` requests made from an ordinary one by changing, adding or removing one byte
    of its head, or by doubling or dropping one of its header lines (seeded)."""
    import random

    rng = random.Random(seed)
    base = _request(b"Connection: keep-alive\r\n", close=True)
    head_end = base.index(b"\r\n\r\n")
    out = []
    for _ in range(count):
        data = bytearray(base)
        kind = rng.randrange(5)
        if kind == 3:  # a header line twice
            lines = base[:head_end].split(b"\r\n")
            pick = rng.randrange(1, len(lines))
            lines.insert(pick, lines[pick])
            out.append(b"\r\n".join(lines) + base[head_end:])
            continue
        if kind == 4:  # a header line less
            lines = base[:head_end].split(b"\r\n")
            del lines[rng.randrange(1, len(lines))]
            out.append(b"\r\n".join(lines) + base[head_end:])
            continue
        at = rng.randrange(head_end)
        byte = _ODD_BYTES[rng.randrange(len(_ODD_BYTES))]
        if kind == 0:
            data[at] = byte
        elif kind == 1:
            data.insert(at, byte)
        else:
            del data[at]
        out.append(bytes(data))
    return out


def _outcome(port: int, data: bytes) -> str:
    """The status the gateway answered ``data`` with, ``closed`` or ``waits`` (nothing
    within a second: it waits for bytes that will not come)."""
    with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
        sock.sendall(data)
        sock.settimeout(1.0)
        try:
            answer = sock.recv(65536)
        except TimeoutError:
            return "waits"
        except ConnectionResetError:
            return "closed"
    return answer.split(b" ", 2)[1].decode() if answer else "closed"


def _without_host(head: bytes) -> bytes:
    """A forwarded head without its Host line (it names each gateway's own stand-in)."""
    return b"\r\n".join(line for line in head.split(b"\r\n")
                         if not line.lower().startswith(b"host:"))


def test_the_lane_knows_the_headers_aiohttp_refuses_twice() -> None:
    from aiohttp.http_parser import SINGLETON_HEADERS

    from cmw_vllm.gateway.lane import SINGLETONS

    assert {name.lower() for name in SINGLETON_HEADERS} == SINGLETONS


def test_mutated_requests_get_the_same_answer_from_the_lane_as_from_aiohttp(
        edge_gateway: Any) -> None:
    """A differential test: 150 requests, each an ordinary one with one byte or line
    changed, go to a gateway with its lane and to one without (aiohttp's path only). Both
    must answer each with the same status (or both wait), and forward the same head to the
    server when they forward one."""
    with_lane = edge_gateway(answer_ok, api_keys=frozenset({KEY}), header_timeout=30.0)
    without = edge_gateway(answer_ok, api_keys=frozenset({KEY}), header_timeout=30.0,
                           lane=False)
    differ = []
    for data in _mutants(seed=19, count=150):
        heads = len(with_lane.stub.heads), len(without.stub.heads)  # type: ignore[attr-defined]
        got = _outcome(_port(with_lane), data), _outcome(_port(without), data)
        if got[0] != got[1]:
            differ.append((data[:160], got))
            continue
        new = [[_without_host(head) for head in gw.stub.heads[n:]]  # type: ignore[attr-defined]
               for gw, n in ((with_lane, heads[0]), (without, heads[1]))]
        if new[0] != new[1]:
            differ.append((data[:160], new))
    assert not differ, "\n".join(repr(d) for d in differ[:8])
    assert _lane(with_lane).served > 40  # most mutants still are requests the lane takes
    assert without.runner.server.lane is None  # type: ignore[union-attr]
