"""The gateway's client towards its servers (gateway.client), against scripted servers on
loopback: every framing, reuse, limits, timeouts and broken answers."""

from __future__ import annotations

import asyncio
import shutil
import ssl
import subprocess
from collections.abc import Callable
from pathlib import Path

import pytest

from cmw_vllm.errors import GatewayUpstreamConnectError, GatewayUpstreamError
from cmw_vllm.gateway.client import HIGH_WATER, UpstreamPool

Script = Callable[[bytes, asyncio.StreamWriter], bytes | None]


class Scripted:
    """A loopback server that answers each request head with what ``script`` returns
    (None: close the connection without a word); counts connections and requests."""

    def __init__(self, answer: bytes | Callable[[bytes], bytes | None]) -> None:
        self.answer = answer
        self.connections = 0
        self.requests: list[bytes] = []
        self.server: asyncio.Server | None = None
        self.port = 0

    async def __aenter__(self) -> Scripted:
        self.server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        self.port = self.server.sockets[0].getsockname()[1]
        return self

    async def __aexit__(self, *exc: object) -> None:
        assert self.server is not None
        self.server.close()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        try:
            while True:
                head = await reader.readuntil(b"\r\n\r\n")
                length = 0
                for line in head.split(b"\r\n"):
                    if line.lower().startswith(b"content-length:"):
                        length = int(line.split(b":")[1])
                body = await reader.readexactly(length)
                self.requests.append(head + body)
                answer = self.answer(head + body) if callable(self.answer) else self.answer
                if answer is None:
                    break
                writer.write(answer)
                await writer.drain()
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        writer.close()


def run(coro: object) -> object:
    return asyncio.run(coro)  # type: ignore[arg-type]


OK = b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: 11\r\n\r\n{\"ok\":true}"


def test_content_length_answers_reuse_one_connection() -> None:
    async def main() -> None:
        async with Scripted(OK) as server:
            pool = UpstreamPool()
            for _ in range(3):
                resp = await pool.request("127.0.0.1", server.port, "POST", "/v1/x",
                                          [("X-A", "1")], b'{"a":1}')
                assert resp.status == 200
                assert resp.headers["content-type"] == "application/json"
                assert resp.content_length == 11
                assert await resp.read() == b'{"ok":true}'
                resp.release()
            assert server.connections == 1
            first = server.requests[0]
            assert first.startswith(b"POST /v1/x HTTP/1.1\r\nHost: 127.0.0.1:")
            assert b"\r\nX-A: 1\r\nContent-Length: 7\r\n\r\n{\"a\":1}" in first
            # No header the caller did not give: no User-Agent, Accept, Accept-Encoding.
            assert b"User-Agent" not in first and b"Accept" not in first
            pool.close()

    run(main())


def test_chunked_answer_is_decoded_across_any_split() -> None:
    body = (b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\n"
            b"Transfer-Encoding: chunked\r\n\r\n"
            b"6\r\ndata: \r\n1;ext=1\r\nx\r\n10\r\n" + b"y" * 16 + b"\r\n0\r\nTrailer: t\r\n\r\n")

    async def main() -> None:
        for split in (1, 3, 7, len(body)):
            async def answer(writer: asyncio.StreamWriter, split: int = split) -> None:
                for i in range(0, len(body), split):
                    writer.write(body[i:i + split])
                    await writer.drain()
                    await asyncio.sleep(0)

            async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter,
                            ) -> None:
                while True:
                    try:
                        await reader.readuntil(b"\r\n\r\n")
                    except asyncio.IncompleteReadError:
                        break
                    await answer(writer)
                writer.close()

            server = await asyncio.start_server(serve, "127.0.0.1", 0)
            port = server.sockets[0].getsockname()[1]
            pool = UpstreamPool()
            for _ in range(2):  # the second answer reuses the connection: framing ended
                resp = await pool.request("127.0.0.1", port, "GET", "/", [], b"")
                pieces = [piece async for piece in resp.iter_any()]
                assert b"".join(pieces) == b"data: x" + b"y" * 16, split
                assert resp.done and resp.keep_alive
                resp.release()
            assert sum(len(v) for v in pool.idle.values()) == 1
            pool.close()
            server.close()

    run(main())


def test_answer_until_close_and_connection_close_are_not_reused() -> None:
    async def main() -> None:
        eof = b"HTTP/1.0 200 OK\r\nContent-Type: text/event-stream\r\n\r\ndata: 1\n\n"
        async with Scripted(lambda _: None) as closer, Scripted(eof) as server:
            # HTTP/1.0 answer without a length: the body is what comes until the close.
            server.answer = lambda _: None
            server_writes = eof

            async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter,
                            ) -> None:
                await reader.readuntil(b"\r\n\r\n")
                writer.write(server_writes)
                await writer.drain()
                writer.close()

            srv = await asyncio.start_server(serve, "127.0.0.1", 0)
            port = srv.sockets[0].getsockname()[1]
            pool = UpstreamPool()
            resp = await pool.request("127.0.0.1", port, "POST", "/", [], b"{}")
            assert await resp.read() == b"data: 1\n\n"
            resp.release()
            assert not pool.idle.get(("127.0.0.1", port)) and pool.open == 0
            # A server that closes without a word: an error, not an empty answer.
            with pytest.raises(GatewayUpstreamError):
                await pool.request("127.0.0.1", closer.port, "POST", "/", [], b"{}")
            assert pool.open == 0
            srv.close()

    run(main())


def test_idle_connections_are_closed_after_the_keepalive() -> None:
    async def main() -> None:
        async with Scripted(OK) as server:
            pool = UpstreamPool(keepalive=0.2)
            resp = await pool.request("127.0.0.1", server.port, "GET", "/", [], b"")
            await resp.read()
            resp.release()
            assert pool.open == 1
            await asyncio.sleep(0.6)  # no more requests: the pool closes it by itself
            assert pool.open == 0 and not any(pool.idle.values())

    run(main())


async def _reused_after(answer: bytes, late: bool) -> tuple[int, int]:
    """Two requests to a server that sends ``garbage`` past each answer (in its last packet,
    or ``late``: after it, before the release): (connections made, connections left open)."""
    connections = [0]

    async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        connections[0] += 1
        try:
            while True:
                await reader.readuntil(b"\r\n\r\n")
                writer.write(answer if late else answer + b"garbage")
                await writer.drain()
                if late:
                    await asyncio.sleep(0.1)
                    writer.write(b"garbage")
        except (asyncio.IncompleteReadError, ConnectionError):
            writer.close()

    srv = await asyncio.start_server(serve, "127.0.0.1", 0)
    port = srv.sockets[0].getsockname()[1]
    pool = UpstreamPool()
    for _ in range(2):
        resp = await pool.request("127.0.0.1", port, "GET", "/", [], b"")
        assert await resp.read() in (b'{"ok":true}', b"ok")
        await asyncio.sleep(0.3)  # the late bytes arrive before the release
        resp.release()
    srv.close()
    return connections[0], pool.open


def test_bytes_past_the_answer_make_the_connection_unusable() -> None:
    chunked = b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n2\r\nok\r\n0\r\n\r\n"
    for answer in (OK, chunked):
        for late in (False, True):
            assert run(_reused_after(answer, late)) == (2, 0), (answer, late)


def test_connection_close_header_is_honoured() -> None:
    answer = (b"HTTP/1.1 200 OK\r\nConnection: close\r\nContent-Length: 2\r\n\r\nok")

    async def main() -> None:
        async with Scripted(answer) as server:
            pool = UpstreamPool()
            for _ in range(2):
                resp = await pool.request("127.0.0.1", server.port, "GET", "/", [], b"")
                assert await resp.read() == b"ok"
                resp.release()
            assert server.connections == 2
            assert pool.open == 0

    run(main())


def test_broken_answers_are_errors() -> None:
    cases = [
        b"SSH-2.0-OpenSSH\r\n\r\n",  # not HTTP
        b"HTTP/1.1 200 OK\r\nbad header line\r\n\r\n",
        b"HTTP/1.1 200 OK\r\nContent-Length: -1\r\n\r\n",
    ]

    async def main() -> None:
        for answer in cases:
            async with Scripted(answer) as server:
                pool = UpstreamPool()
                with pytest.raises(GatewayUpstreamError):
                    await pool.request("127.0.0.1", server.port, "GET", "/", [], b"")
                assert pool.open == 0, answer
        # Cut mid-body: the head arrived, the read fails.
        cut = b"HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\nonly this"
        async with Scripted(lambda _: cut) as server:
            server.answer = lambda _: cut

            async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter,
                            ) -> None:
                await reader.readuntil(b"\r\n\r\n")
                writer.write(cut)
                await writer.drain()
                writer.close()

            srv = await asyncio.start_server(serve, "127.0.0.1", 0)
            pool = UpstreamPool()
            resp = await pool.request("127.0.0.1", srv.sockets[0].getsockname()[1], "GET",
                                      "/", [], b"")
            with pytest.raises(GatewayUpstreamError):
                await resp.read()
            resp.release()
            assert pool.open == 0
            srv.close()

    run(main())


def test_line_breaks_in_headers_are_refused_before_sending() -> None:
    async def main() -> None:
        async with Scripted(OK) as server:
            pool = UpstreamPool()
            for name, value in (("X-A", "1\r\nX-Injected: 1"), ("X-A\nB", "1"), ("X", "a\rb")):
                with pytest.raises(GatewayUpstreamError):
                    await pool.request("127.0.0.1", server.port, "GET", "/", [(name, value)],
                                       b"")
            assert server.requests == []

    run(main())


def test_unreachable_server_is_a_connect_error() -> None:
    from tests.conftest import free_port

    async def main() -> None:
        pool = UpstreamPool(limit=1)
        for _ in range(3):  # the slot is given back each time
            with pytest.raises(GatewayUpstreamConnectError):
                await pool.request("127.0.0.1", free_port(), "GET", "/", [], b"")
        assert pool.open == 0

    run(main())


def test_silent_server_times_out_and_a_slow_one_does_not() -> None:
    async def main() -> None:
        async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            head = await reader.readuntil(b"\r\n\r\n")
            if b"/silent" in head:
                await asyncio.sleep(5)
            else:  # a byte every 0.1 s, for longer than the timeout in all
                writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 6\r\n\r\n")
                for _ in range(6):
                    await asyncio.sleep(0.1)
                    writer.write(b"x")
                    await writer.drain()
            writer.close()

        srv = await asyncio.start_server(serve, "127.0.0.1", 0)
        port = srv.sockets[0].getsockname()[1]
        pool = UpstreamPool(read_timeout=0.35)
        loop = asyncio.get_running_loop()
        begin = loop.time()
        with pytest.raises(TimeoutError):
            await pool.request("127.0.0.1", port, "GET", "/silent", [], b"")
        assert loop.time() - begin < 2
        resp = await pool.request("127.0.0.1", port, "GET", "/slow", [], b"")
        assert await resp.read() == b"xxxxxx"
        resp.release()
        srv.close()

    run(main())


def test_limit_caps_open_connections() -> None:
    async def main() -> None:
        async with Scripted(OK) as server:
            pool = UpstreamPool(limit=2)
            first = await pool.request("127.0.0.1", server.port, "GET", "/", [], b"")
            second = await pool.request("127.0.0.1", server.port, "GET", "/", [], b"")
            third = asyncio.ensure_future(
                pool.request("127.0.0.1", server.port, "GET", "/", [], b""))
            await asyncio.sleep(0.2)
            assert not third.done() and server.connections == 2
            await first.read()
            first.release()  # its connection is reused by the third request
            resp = await asyncio.wait_for(third, 5)
            assert await resp.read() == b'{"ok":true}'
            for r in (second, resp):
                r.release()
            assert server.connections == 2

    run(main())


def test_slow_reader_pauses_the_server_and_close_cuts_it() -> None:
    async def main() -> None:
        sent = [0]
        done = asyncio.Event()

        async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            await reader.readuntil(b"\r\n\r\n")
            writer.write(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n")
            try:
                for _ in range(10_000):
                    writer.write(b"4000\r\n" + b"z" * 0x4000 + b"\r\n")
                    await writer.drain()
                    sent[0] += 0x4000
            except ConnectionError:
                pass
            done.set()
            writer.close()

        srv = await asyncio.start_server(serve, "127.0.0.1", 0)
        pool = UpstreamPool()
        resp = await pool.request("127.0.0.1", srv.sockets[0].getsockname()[1], "GET", "/",
                                  [], b"")
        await asyncio.sleep(0.5)  # nobody reads: the server is held back
        assert sent[0] < 64 * HIGH_WATER
        assert resp._buffered <= 2 * HIGH_WATER  # one read of 256 KiB at most past the mark
        piece = await resp.readany()
        assert piece and set(piece) == {ord("z")}
        resp.close()  # the client went away: the server's writes fail
        await asyncio.wait_for(done.wait(), 5)
        assert pool.open == 0
        srv.close()

    run(main())


@pytest.mark.skipif(shutil.which("openssl") is None, reason="needs the openssl command")
def test_https_servers_are_reached_over_verified_tls(tmp_path: Path) -> None:
    cert, key = tmp_path / "cert.pem", tmp_path / "key.pem"
    subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1",
                    "-subj", "/CN=127.0.0.1", "-addext", "subjectAltName=IP:127.0.0.1",
                    "-keyout", str(key), "-out", str(cert)], check=True, capture_output=True,
                   timeout=60)
    server_side = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    server_side.load_cert_chain(cert, key)

    async def main() -> None:
        async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            try:
                while True:
                    await reader.readuntil(b"\r\n\r\n")
                    writer.write(OK)
                    await writer.drain()
            except (asyncio.IncompleteReadError, ConnectionError, ssl.SSLError):
                writer.close()

        srv = await asyncio.start_server(serve, "127.0.0.1", 0, ssl=server_side)
        port = srv.sockets[0].getsockname()[1]
        trusting = UpstreamPool(ssl_context=ssl.create_default_context(cafile=str(cert)))
        for _ in range(2):
            resp = await trusting.request("127.0.0.1", port, "GET", "/", [], b"", tls=True)
            assert await resp.read() == b'{"ok":true}'
            resp.release()
        assert trusting.open == 1  # one TLS connection, reused
        trusting.close()
        # The system's CAs do not know this certificate: no request goes out over it.
        with pytest.raises(GatewayUpstreamConnectError):
            await UpstreamPool().request("127.0.0.1", port, "GET", "/", [], b"", tls=True)
        srv.close()

    run(main())
