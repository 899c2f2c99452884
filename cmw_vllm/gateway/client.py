"""The gateway's client towards its servers: lean HTTP/1.1 over pooled keep-alive connections.

aiohttp's ``ClientSession`` builds a request object, a URL, a header multidict, a payload,
trace hooks and timers for every request: about 200 µs of CPU per proxied request on the
project's 2-core VM, more than the rest of the gateway together. The gateway needs much less:
it sends a body it already holds to a server it knows, and relays the answer. So a
request is one ``write`` of head and body on a pooled connection, and the answer is parsed
with plain ``bytes`` operations: the status line, the headers, then a body framed by
``Content-Length``, ``Transfer-Encoding: chunked`` (decoded) or the end of the connection.

What aiohttp's client gave the gateway is kept:

- connections are reused for ``keepalive`` seconds (less than vLLM's 5 s, so that the
  gateway never sends on a connection vLLM is closing) and closed once idle longer, at most
  ``limit`` at once (0: no cap); a connection whose answer was not read to its end is
  closed, never reused;
- connecting takes at most ``connect_timeout`` seconds; a server that sends nothing for
  ``read_timeout`` seconds (between two reads, not in all) fails the request;
- a slow client pauses reading from the server (flow control), so an answer is never
  buffered whole;
- closing a response aborts its connection: vLLM sees the client gone and stops generating.
"""

from __future__ import annotations

import asyncio
import ssl
from collections import deque
from typing import Any

from multidict import CIMultiDict, CIMultiDictProxy

from cmw_vllm.errors import GatewayUpstreamConnectError as ConnectFailed
from cmw_vllm.errors import GatewayUpstreamError as UpstreamError

MAX_HEAD = 64 * 1024  # bytes of status line and headers a server may send
HIGH_WATER = 256 * 1024  # body bytes buffered before reading from the server pauses
_NO_BODY = frozenset({204, 304})


class _Connection(asyncio.Protocol):
    """One connection to a server; answers are parsed as they arrive."""

    def __init__(self, pool: UpstreamPool, loop: asyncio.AbstractEventLoop,
                 key: tuple[str, int, bool]) -> None:
        self.pool = pool
        self.loop = loop
        self.key = key
        self.transport: asyncio.Transport | None = None
        self.lost = False
        self.idle_since = 0.0
        self.response: UpstreamResponse | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def data_received(self, data: bytes) -> None:
        response = self.response
        if response is None:  # bytes nobody asked for: the connection is not reusable
            self.lost = True
            if self.transport is not None:
                self.transport.abort()
            return
        response.feed(data)

    def connection_lost(self, exc: BaseException | None) -> None:
        self.lost = True
        if self.response is not None:
            self.response.feed_eof()
        else:  # closed by the server while idle in the pool
            self.pool._drop_idle(self)

    def close(self) -> None:
        self.lost = True
        if self.transport is not None:
            self.transport.abort()


class UpstreamResponse:
    """A server's answer: status and headers once :meth:`UpstreamPool.request` returns; the
    body through :meth:`read` or :meth:`iter_any`. Always :meth:`release` it (or
    :meth:`close` it, which also cuts the connection)."""

    def __init__(self, pool: UpstreamPool, conn: _Connection) -> None:
        self.pool = pool
        self.conn = conn
        self.status = 0
        self.headers: CIMultiDictProxy[str] = CIMultiDictProxy(CIMultiDict())
        self.content_length: int | None = None
        self.keep_alive = False
        self.done = False  # the whole body has arrived
        self.error: BaseException | None = None
        self._head_waiter: asyncio.Future[None] | None = None
        self._data_waiter: asyncio.Future[None] | None = None
        self._chunks: deque[bytes] = deque()
        self._buffered = 0
        self._paused = False
        self._released = False
        # Body framing: "length" (``_left`` bytes to come), "chunked", "eof", or "head".
        self._framing = "head"
        self._left = 0
        self._raw = b""  # unparsed bytes: of the head, or of the chunked framing
        self._last_read = 0.0
        self._timer: asyncio.TimerHandle | None = None

    # ----------------------------------------------------------------- parsing

    def feed(self, data: bytes) -> None:
        """Bytes from the server."""
        self._last_read = self.conn.loop.time()
        if self.done:  # bytes past the answer: the connection is not reusable
            self.keep_alive = False
            return
        framing = self._framing
        if framing == "length":
            if len(data) >= self._left:
                extra = len(data) - self._left
                if extra:  # bytes past the answer: the connection is not reusable
                    self.keep_alive = False
                    data = data[:self._left]
                self._left = 0
                self._push(data)
                self._finish()
            else:
                self._left -= len(data)
                self._push(data)
        elif framing == "eof":
            self._push(data)
        elif framing == "chunked":
            self._raw += data
            self._dechunk()
        elif framing == "head":
            self._raw += data
            self._parse_head()

    def _parse_head(self) -> None:
        raw = self._raw
        end = raw.find(b"\r\n\r\n")
        if end < 0:
            if len(raw) > MAX_HEAD:
                self._fail(UpstreamError("the server's answer head is too large"))
            return
        lines = raw[:end].decode("latin-1").split("\r\n")
        rest = raw[end + 4:]
        status_line = lines[0].split(" ", 2)
        try:
            version, status = status_line[0], int(status_line[1])
        except (IndexError, ValueError):
            self._fail(UpstreamError("the server sent a malformed status line"))
            return
        if not version.startswith("HTTP/1.") or not 100 <= status <= 999:
            self._fail(UpstreamError("the server sent a malformed status line"))
            return
        if status < 200:  # 1xx: an interim answer; the real one follows
            self._raw = b""
            if rest:
                self.feed(rest)
            return
        headers: CIMultiDict[str] = CIMultiDict()
        for line in lines[1:]:
            name, sep, value = line.partition(":")
            if not sep or not name or name != name.strip():
                self._fail(UpstreamError("the server sent a malformed header"))
                return
            headers.add(name, value.strip(" \t"))
        self.status = status
        self.headers = CIMultiDictProxy(headers)
        connection = headers.get("Connection", "").lower()
        self.keep_alive = version == "HTTP/1.1" and "close" not in connection
        self._raw = b""
        if "chunked" in headers.get("Transfer-Encoding", "").lower():
            self._framing = "chunked"
        elif "Content-Length" in headers:
            try:
                length = int(headers["Content-Length"])
            except ValueError:
                length = -1
            if length < 0:
                self._fail(UpstreamError("the server sent a malformed Content-Length"))
                return
            self.content_length = self._left = length
            self._framing = "length"
        elif status in _NO_BODY:
            self.content_length = 0
            self._framing = "length"
        else:
            self._framing = "eof"
            self.keep_alive = False
        self._wake_head()
        if self._framing == "length" and self._left == 0:
            self._finish()
            if rest:
                self.keep_alive = False
        elif rest:
            self.feed(rest)

    def _dechunk(self) -> None:
        raw = self._raw
        pos = 0
        size = len(raw)
        while not self.done:
            if self._left > 0:  # inside a chunk's data
                take = min(self._left, size - pos)
                if take <= 0:
                    break
                self._push(raw[pos:pos + take])
                pos += take
                self._left -= take
                if self._left == 0:
                    self._left = -2  # its CRLF comes next
                continue
            if self._left == -2:
                if size - pos < 2:
                    break
                if raw[pos:pos + 2] != b"\r\n":
                    self._fail(UpstreamError("the server's chunked framing is malformed"))
                    return
                pos += 2
                self._left = 0
                continue
            line_end = raw.find(b"\r\n", pos)
            if line_end < 0:
                if size - pos > 1024:
                    self._fail(UpstreamError("the server's chunked framing is malformed"))
                    return
                break
            if self._left == -3:  # the trailer section, up to its empty line
                if line_end > pos:
                    pos = line_end + 2  # a trailer field: dropped
                    continue
                self._raw = raw[line_end + 2:]
                if self._raw:  # bytes past the answer: the connection is not reusable
                    self.keep_alive = False
                self._finish()
                return
            try:
                chunk_size = int(raw[pos:line_end].split(b";", 1)[0].strip(), 16)
            except ValueError:
                self._fail(UpstreamError("the server's chunked framing is malformed"))
                return
            pos = line_end + 2
            if chunk_size == 0:
                self._left = -3
            else:
                self._left = chunk_size
        self._raw = raw[pos:]

    def feed_eof(self) -> None:
        """The connection closed."""
        self.keep_alive = False
        if self.done or self.error is not None:
            return
        if self._framing == "eof":
            self._finish()
        else:
            self._fail(UpstreamError("the server closed the connection mid-answer"
                                     if self._framing != "head" else
                                     "the server closed the connection without an answer"))

    def _push(self, data: bytes) -> None:
        if not data:
            return
        self._chunks.append(data)
        self._buffered += len(data)
        if self._buffered > HIGH_WATER and not self._paused and self.conn.transport is not None:
            self._paused = True
            self.conn.transport.pause_reading()
        self._wake_data()

    def _finish(self) -> None:
        self.done = True
        self._stop_timer()
        self._wake_data()

    def _fail(self, error: BaseException) -> None:
        self.error = error
        self.keep_alive = False
        self._stop_timer()
        self.conn.close()
        self._wake_head()
        self._wake_data()

    def _wake_head(self) -> None:
        waiter = self._head_waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    def _wake_data(self) -> None:
        waiter = self._data_waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    # ----------------------------------------------------------------- the read timeout

    def _start_timer(self) -> None:
        timeout = self.pool.read_timeout
        if timeout and self._timer is None:
            self._last_read = self.conn.loop.time()
            self._timer = self.conn.loop.call_at(self._last_read + timeout, self._check)

    def _stop_timer(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None

    def _check(self) -> None:
        """Fires ``read_timeout`` after the last read at the earliest; fails the answer when
        nothing came since (one timer per answer, not one per read)."""
        self._timer = None
        due = self._last_read + self.pool.read_timeout
        if self._paused or self.conn.loop.time() < due:  # a slow client is not the server
            self._timer = self.conn.loop.call_at(max(due, self.conn.loop.time() + 0.05),
                                                 self._check)
            return
        self._fail(TimeoutError(f"the server sent nothing for {self.pool.read_timeout:g}s"))

    # ----------------------------------------------------------------- the body

    async def _wait_head(self) -> None:
        if self.status or self.error is not None:
            if self.error is not None:
                raise self.error
            return
        self._head_waiter = self.conn.loop.create_future()
        try:
            await self._head_waiter
        finally:
            self._head_waiter = None
        if self.error is not None:
            raise self.error

    async def readany(self) -> bytes:
        """The next piece of the body as it came (b"" at its end)."""
        while not self._chunks:
            if self.error is not None:
                raise self.error
            if self.done:
                return b""
            self._data_waiter = self.conn.loop.create_future()
            try:
                await self._data_waiter
            finally:
                self._data_waiter = None
        if len(self._chunks) == 1:
            data = self._chunks.popleft()
        else:
            data = b"".join(self._chunks)
            self._chunks.clear()
        self._buffered = 0
        if self._paused and self.conn.transport is not None:
            self._paused = False
            self.conn.transport.resume_reading()
        return data

    async def iter_any(self) -> Any:
        """The body piece by piece, as it arrives."""
        while True:
            data = await self.readany()
            if not data:
                return
            yield data

    async def read(self) -> bytes:
        """The whole body."""
        pieces = []
        while True:
            data = await self.readany()
            if not data:
                return b"".join(pieces)
            pieces.append(data)

    def close(self) -> None:
        """Cut the connection (the server sees the client gone)."""
        self.keep_alive = False
        self.conn.close()
        self.release()

    def release(self) -> None:
        """Done with the answer: its connection goes back to the pool when it can be reused."""
        if self._released:
            return
        self._released = True
        self._stop_timer()
        self.conn.response = None
        self.pool._put(self.conn, self.done and self.keep_alive and not self._chunks
                       and self.error is None)


class UpstreamPool:
    """Keep-alive connections to the gateway's servers.

    Args:
        limit: Connections open at once, all servers together (0: no cap).
        connect_timeout: Seconds to connect.
        read_timeout: Seconds a server may send nothing while an answer is awaited.
        keepalive: Seconds an idle connection is kept for reuse.
        ssl_context: How ``https`` servers are checked (default: the system's CAs and host
            name checks, as aiohttp's client did).
    """

    def __init__(self, limit: int = 0, connect_timeout: float = 10.0,
                 read_timeout: float = 600.0, keepalive: float = 3.0,
                 ssl_context: ssl.SSLContext | None = None) -> None:
        self.limit = limit
        self.connect_timeout = connect_timeout
        self.read_timeout = read_timeout
        self.keepalive = keepalive
        self.ssl_context = ssl_context
        self.idle: dict[tuple[str, int, bool], list[_Connection]] = {}
        self.open = 0
        self._waiters: deque[tuple[tuple[str, int, bool],
                                   asyncio.Future[_Connection | None]]] = deque()
        self._closed = False
        self._sweeper: asyncio.TimerHandle | None = None

    async def request(self, host: str, port: int, method: str, target: str,
                      headers: list[tuple[str, str]], body: bytes, tls: bool = False,
                      ) -> UpstreamResponse:
        """Send one request (over TLS with ``tls``); returns once the answer's status and
        headers are in.

        Raises:
            GatewayUpstreamConnectError: The server could not be reached.
            GatewayUpstreamError: It answered with something that is not HTTP, or closed.
            TimeoutError: It sent nothing for ``read_timeout`` seconds.
        """
        authority = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
        lines = [f"{method} {target} HTTP/1.1", f"Host: {authority}"]
        lines += [f"{name}: {value}" for name, value in headers]
        if body or method == "POST":
            lines.append(f"Content-Length: {len(body)}")
        head = "\r\n".join(lines)
        breaks = len(lines) - 1  # each CR and each LF must be one of the joins
        if head.count("\n") != breaks or head.count("\r") != breaks:
            raise UpstreamError("a request header holds a line break")
        data = (head + "\r\n\r\n").encode("utf-8", "surrogateescape") + body
        conn = await self._connection(host, port, tls)
        response = UpstreamResponse(self, conn)
        conn.response = response
        try:
            assert conn.transport is not None
            conn.transport.write(data)
            response._start_timer()
            await response._wait_head()
        except BaseException:
            response.close()
            raise
        return response

    async def _connection(self, host: str, port: int, tls: bool) -> _Connection:
        key = (host, port, tls)
        loop = asyncio.get_running_loop()
        idle = self.idle.get(key)
        if idle:
            now = loop.time()
            while idle:
                conn = idle.pop()
                if not conn.lost and now - conn.idle_since < self.keepalive:
                    return conn
                conn.close()
                self._forget()
        while self.limit and self.open >= self.limit:
            if self._close_one_idle():
                continue
            waiter: asyncio.Future[_Connection | None] = loop.create_future()
            entry = (key, waiter)
            self._waiters.append(entry)
            try:
                handed = await waiter
            except BaseException:
                if entry in self._waiters:
                    self._waiters.remove(entry)
                if waiter.done() and not waiter.cancelled() and waiter.result() is not None:
                    self._put(waiter.result(), True)  # handed over as we were cancelled
                elif waiter.done() and not waiter.cancelled():
                    self._wake()  # the slot we were told of goes to the next waiter
                raise
            if handed is not None:
                return handed
        self.open += 1
        context: ssl.SSLContext | None = None
        if tls:
            if self.ssl_context is None:
                self.ssl_context = ssl.create_default_context()
            context = self.ssl_context
        try:
            _, conn = await asyncio.wait_for(
                loop.create_connection(lambda: _Connection(self, loop, key), host, port,
                                       ssl=context, server_hostname=host if tls else None),
                self.connect_timeout)
        except (OSError, TimeoutError) as exc:  # ssl.SSLError is an OSError
            self._forget()
            raise ConnectFailed(f"cannot connect to {host}:{port}: "
                                f"{type(exc).__name__}") from None
        except BaseException:
            self._forget()
            raise
        return conn

    def _close_one_idle(self) -> bool:
        for conns in self.idle.values():
            if conns:
                conns.pop(0).close()
                self._forget()
                return True
        return False

    def _wake(self) -> None:
        """A connection slot is free: tell the first waiter."""
        while self._waiters:
            _, waiter = self._waiters.popleft()
            if not waiter.done():
                waiter.set_result(None)
                return

    def _forget(self) -> None:
        self.open -= 1
        if self._waiters:
            self._wake()

    def _put(self, conn: _Connection, reusable: bool) -> None:
        if reusable and not conn.lost and not self._closed:
            for entry in self._waiters:  # a request waits for a connection to this server
                if entry[0] == conn.key and not entry[1].done():
                    self._waiters.remove(entry)
                    entry[1].set_result(conn)
                    return
            if not self._waiters:
                conn.idle_since = conn.loop.time()
                self.idle.setdefault(conn.key, []).append(conn)
                if self._sweeper is None:
                    self._sweeper = conn.loop.call_later(self.keepalive, self._sweep)
                return
        conn.close()
        self._forget()

    def _sweep(self) -> None:
        """Close the connections idle for ``keepalive`` seconds (one timer per pool)."""
        self._sweeper = None
        loop = asyncio.get_running_loop()
        due = loop.time() - self.keepalive
        for conns in self.idle.values():
            while conns and conns[0].idle_since <= due:  # the oldest come first
                conns.pop(0).close()
                self._forget()
        if any(self.idle.values()):
            self._sweeper = loop.call_later(self.keepalive / 2, self._sweep)

    def _drop_idle(self, conn: _Connection) -> None:
        idle = self.idle.get(conn.key)
        if idle and conn in idle:
            idle.remove(conn)
            self._forget()

    def close(self) -> None:
        """Close every idle connection; answers in flight end when released."""
        self._closed = True
        if self._sweeper is not None:
            self._sweeper.cancel()
            self._sweeper = None
        for conns in self.idle.values():
            for conn in conns:
                conn.close()
                self._forget()
        self.idle.clear()
