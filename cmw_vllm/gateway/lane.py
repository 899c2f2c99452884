"""The gateway's fast lane: ordinary inference requests to a ready server, without aiohttp.

aiohttp's server spends about 65 µs of CPU on a request before any handler runs (a request
object, a header multidict, a task and a response object, two more turns of the event loop)
where a bare protocol needs about 6 µs: on the project's 2-core VM that made the gateway cost
1.5 times vLLM's own Rust router per proxied request. Every connection therefore starts in
the lane, a plain :class:`asyncio.Protocol` that takes the requests it can serve whole and
hands the connection to aiohttp's protocol (the :mod:`~cmw_vllm.gateway.edge` handler, with
every defence it has) at the first request it cannot.

The lane serves a request only when all of this holds; anything else, valid or not, goes to
aiohttp from its first byte, so aiohttp makes every refusal and every error page:

- its head is ASCII and as strict as HTTP allows: ``POST`` (or ``GET`` of a stored
  response) of an inference route, ``HTTP/1.1``, token header names, values of visible
  characters, spaces and tabs, at most ``MAX_FIELDS`` fields in ``MAX_HEAD`` bytes;
- its body has a single plain ``Content-Length`` of at most ``INLINE_BYTES`` (no chunked
  framing, no ``Content-Encoding``, no ``Expect``, no ``Upgrade``) and is a JSON object that
  names its ``model``;
- the ``Host`` is served, it carries no ``Origin`` (browsers go through the CORS checks) and
  no ``Sec-Fetch-Site: cross-site``, and its key is valid when keys are set;
- the model's server is ready now (starts, adapters and back-off are aiohttp's).

What the edge does for aiohttp's connections the lane does for its own: the per-client
connection cap (shared), the header timeout (for every head, not only the first), the body
timeout (a 408), the keep-alive timeout, the drain on shutdown. Requests are answered one
at a time per connection, and pipelined ones wait in a bounded buffer (reading pauses).
The answer is relayed as the aiohttp path relays it: the same headers and error bodies,
whole when small, else streamed chunked with flow control.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import re
import time
from email.utils import formatdate
from http import HTTPStatus
from typing import TYPE_CHECKING, Any

from aiohttp.tcp_helpers import tcp_keepalive
from multidict import CIMultiDict

from cmw_vllm.errors import GatewayRefusal as Refusal
from cmw_vllm.errors import GatewayStreamBroken as StreamBroken
from cmw_vllm.errors import GatewayUpstreamError
from cmw_vllm.gateway.body import INLINE_BYTES, MAX_MODEL_CHARS, json_model
from cmw_vllm.gateway.edge import KEEPALIVE_S, SERVER_NAME, error_body, where
from cmw_vllm.gateway.headers import key_ok, reply_headers

if TYPE_CHECKING:
    from cmw_vllm.gateway.client import UpstreamResponse
    from cmw_vllm.gateway.edge import Edge, EdgeServer
    from cmw_vllm.gateway.origin import WebGate
    from cmw_vllm.gateway.pool import Backend
    from cmw_vllm.gateway.proxy import Handlers

logger = logging.getLogger(__name__)

MAX_HEAD = 16 * 1024  # a larger head goes to aiohttp (its limit is 8190 bytes a line)
MAX_FIELDS = 100  # more header fields go to aiohttp (its limit is 128)
MAX_PIPELINED = 2 * INLINE_BYTES  # bytes held while a request is served, then reading pauses
WHOLE_BODY_LIMIT = 1 << 20  # answers up to this size are relayed in one write

# vLLM's inference routes (0.32). Admin and dev routes (/sleep, /pause, weight updates,
# LoRA loading, profiling) are not forwarded: a gateway key must not reach them (the pool
# loads declared LoRA adapters itself, see Pool._ensure_adapter).
FORWARD_PATHS = frozenset({
    "/v1/chat/completions", "/v1/completions", "/v1/responses", "/v1/embeddings",
    "/v1/rerank", "/v1/score", "/v1/audio/transcriptions", "/v1/audio/translations",
    "/v1/messages", "/v1/messages/count_tokens", "/v1/chat/completions/render",
    "/v1/completions/render", "/v1/responses/render", "/v1/messages/render",
    "/v2/embed", "/v2/rerank", "/cohere/v2/chat", "/tokenize", "/detokenize", "/pooling",
    "/classify", "/score", "/rerank", "/invocations", "/generative_scoring",
    "/inference/v1/generate",
})
RESPONSE_ID = r"[A-Za-z0-9_-]{1,200}"  # a stored response's id, in its routes
_TOKEN = r"[!#$%&'*+.^_`|~0-9A-Za-z-]"
# The whole head, decoded as ASCII: request line, then fields. Possessive quantifiers: the
# match is linear, whatever the input.
_REQUEST_LINE = r"(POST|GET) (/[A-Za-z0-9._~!$&'()*+,;=:@/%?-]{0,8000}+) HTTP/1\.1"
_FIELD = _TOKEN + r"{1,256}+:[\t\x20-\x7e]{0,8000}+"
_HEAD = re.compile(_REQUEST_LINE + r"((?:\r\n" + _FIELD + r")*+)")
_FIRST_LINE = re.compile(_REQUEST_LINE.encode())
_FIELD_LINE = re.compile(_FIELD.encode())
# What may stand in a head that has not all come yet.
_HEAD_BYTES = re.compile(rb"[\t\r\n\x20-\x7e]*+")
_BARE_LINE_END = re.compile(rb"\r(?!\n)|(?<!\r)\n")
_RESPONSE_PATH = re.compile(r"/v1/responses/" + RESPONSE_ID + r"(/cancel)?")
# Request headers that send a request to aiohttp (lower case).
_NOT_HERE = frozenset({"transfer-encoding", "content-encoding", "expect", "upgrade", "origin"})
# Headers aiohttp's parser refuses to see twice (its SINGLETON_HEADERS): twice, they send the
# request to aiohttp, for its 400.
SINGLETONS = frozenset({"content-length", "content-location", "content-range", "content-type",
                        "etag", "host", "max-forwards", "server", "transfer-encoding",
                        "user-agent"})

_STATUS_LINES: dict[int, bytes] = {}


def _status_line(status: int) -> bytes:
    line = _STATUS_LINES.get(status)
    if line is None:
        try:
            reason = HTTPStatus(status).phrase
        except ValueError:
            reason = ""
        line = _STATUS_LINES[status] = f"HTTP/1.1 {status} {reason}\r\n".encode()
    return line


_date_second = -1
_date_text = ""


def _date() -> str:
    """The ``Date`` header's value, formatted once a second."""
    global _date_second, _date_text
    now = int(time.time())
    if now != _date_second:
        _date_second, _date_text = now, formatdate(now, usegmt=True)
    return _date_text


async def small_answer(upstream: UpstreamResponse) -> bytes | None:
    """The whole body of an answer that is relayed in one write (not a stream, known to be
    at most ``WHOLE_BODY_LIMIT``); None for one that is streamed.

    Raises:
        Refusal: The server stopped sending (504) or broke off (502, as nginx).
    """
    length = upstream.content_length
    if length is None or length > WHOLE_BODY_LIMIT \
            or "text/event-stream" in upstream.headers.get("Content-Type", ""):
        return None
    try:
        return await upstream.read()
    except TimeoutError:
        raise Refusal(504, "the server stopped sending", "GatewayTimeoutError") from None
    except GatewayUpstreamError:  # it closed or reset mid-reply (nginx: 502)
        raise Refusal(502, "the server broke off its answer", "BadGatewayError") from None


class LaneRequest:
    """One request the lane serves: what :class:`~cmw_vllm.gateway.proxy.Handlers` needs of
    it (the drain cuts it through ``transport``)."""

    __slots__ = ("method", "target", "headers", "remote", "transport", "close")

    def __init__(self, method: str, target: str, headers: CIMultiDict[str], remote: str,
                 transport: asyncio.Transport, close: bool) -> None:
        self.method = method
        self.target = target
        self.headers = headers
        self.remote = remote
        self.transport = transport
        self.close = close


class Lane:
    """What every lane connection of one gateway shares.

    Args:
        handlers: The gateway's route handlers (its pool, upstream client, metrics, drain).
        edge: The connection limits and log budget shared with aiohttp's connections.
        gate: The ``Host``/``Origin`` gate, or None when every host and origin is allowed.
    """

    def __init__(self, handlers: Handlers, edge: Edge, gate: WebGate | None) -> None:
        self.handlers = handlers
        self.edge = edge
        self.gate = gate
        self.keys = handlers.settings.api_keys
        self.max_body = min(INLINE_BYTES, handlers.settings.max_body_bytes)
        self.connections: set[LaneProtocol] = set()
        self.closing = False
        self.served = 0  # requests the lane took (the rest went to aiohttp)

    def protocol(self, server: EdgeServer) -> LaneProtocol:
        """The protocol of a new connection: it starts in the lane."""
        return LaneProtocol(server, self)

    def pre_shutdown(self) -> None:
        """Stop taking requests: idle connections close now, busy ones after their answer
        (the drain bounds how long that may take)."""
        self.closing = True
        for conn in list(self.connections):
            if conn.task is None:
                conn.close()

    def shutdown(self) -> None:
        """Close whatever is left after the drain."""
        for conn in list(self.connections):
            conn.close()


class LaneProtocol(asyncio.Protocol):
    """One client connection while it is in the lane.

    Args:
        server: The edge server (it makes the aiohttp protocol a connection is handed to).
        lane: What the lane's connections share.
    """

    def __init__(self, server: EdgeServer, lane: Lane) -> None:
        self.server = server
        self.lane = lane
        self.loop = asyncio.get_running_loop()
        self.transport: asyncio.Transport | None = None
        self.addr = ""
        self.buffer = bytearray()
        # The request being read: bytes of the buffer scanned for the head's end, where its
        # checked lines end (while it comes in pieces), and once its head is parsed: the
        # request, where its body begins and ends.
        self.scanned = 0
        self.lines_end = 0
        self.pending: tuple[LaneRequest, int, int] | None = None
        self.task: asyncio.Task[None] | None = None
        self.handed_off = False
        self.served = 0
        # The watchdog's clocks: when its last byte came, the current head began (0: no
        # byte of one yet), the connection began or its last answer ended.
        self.last_read = self.head_began = self.idle_since = 0.0
        self.watch: asyncio.TimerHandle | None = None
        self.reading_paused = False
        self.drained: asyncio.Future[None] | None = None  # set while writing is paused
        self.write_paused = False

    # ----------------------------------------------------------------- the connection

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        peer = transport.get_extra_info("peername")
        self.addr = peer[0] if isinstance(peer, tuple) else str(peer or "")
        if not self.lane.edge.admit(self.addr):  # aiohttp's protocol refuses it (503)
            self._hand_off(transport, b"", admitted=False)
            return
        self.transport = transport  # type: ignore[assignment]
        tcp_keepalive(transport)  # type: ignore[arg-type]  # as aiohttp's protocol does
        self.lane.connections.add(self)
        self.last_read = self.idle_since = self.loop.time()
        self._arm(self._idle_limit())

    def connection_lost(self, exc: BaseException | None) -> None:
        if self.handed_off:
            return
        self._forget()
        if self.task is not None:
            self.task.cancel()  # the client went away: the answer is cut, vLLM aborts it
        if self.drained is not None and not self.drained.done():
            self.drained.set_result(None)

    def _forget(self) -> None:
        if self.watch is not None:
            self.watch.cancel()
            self.watch = None
        if self in self.lane.connections:
            self.lane.connections.discard(self)
            self.lane.edge.release(self.addr)

    def close(self) -> None:
        """Close the connection (what was written is still sent)."""
        if self.transport is not None and not self.transport.is_closing():
            self.transport.close()

    def pause_writing(self) -> None:
        self.write_paused = True

    def resume_writing(self) -> None:
        self.write_paused = False
        if self.drained is not None and not self.drained.done():
            self.drained.set_result(None)

    async def _drain(self) -> None:
        if self.write_paused and self.transport is not None:
            self.drained = self.loop.create_future()
            try:
                await self.drained
            finally:
                self.drained = None
            if self.transport.is_closing():
                raise ConnectionResetError("the client went away")

    # ----------------------------------------------------------------- reading

    def data_received(self, data: bytes) -> None:
        self.last_read = self.loop.time()
        buffer = self.buffer
        buffer += data  # a bytearray: bytes that come in small pieces are not copied again
        if self.task is not None:  # pipelined: it waits for the answer before it
            if len(buffer) > MAX_PIPELINED and not self.reading_paused:
                self.reading_paused = True
                self.transport.pause_reading()  # type: ignore[union-attr]
            return
        if not self.head_began:
            self.head_began = self.last_read
        self._next()

    def eof_received(self) -> bool | None:
        return None  # as aiohttp's protocol: the transport closes, an answer in work is cut

    def _next(self) -> None:
        """Serve the request at the start of the buffer once it is whole; hand the
        connection to aiohttp when it is not one for the lane. Each byte is scanned once
        while a head comes in pieces."""
        buffer = self.buffer
        pending = self.pending
        if pending is None:
            end = buffer.find(b"\r\n\r\n", max(0, self.scanned - 3), MAX_HEAD + 4)
            if end < 0:
                if not self._may_begin(self.scanned):  # aiohttp answers it at once
                    self._hand_off(self.transport, bytes(buffer))  # type: ignore[arg-type]
                    return
                self.scanned = len(buffer)
                if self.lane.edge.header_timeout > 0:
                    self._watch_by(self.head_began + self.lane.edge.header_timeout)
                return
            pending = self._parse(buffer, end)
            if pending is None:
                self._hand_off(self.transport, bytes(buffer))  # type: ignore[arg-type]
                return
            self.pending = pending
        request, body_at, total = pending
        if len(buffer) < total:  # the body is on its way
            if self.lane.edge.body_timeout > 0:
                self._watch_by(self.last_read + self.lane.edge.body_timeout)
            return
        body = bytes(buffer[body_at:total])
        model: Any = None
        if body[:1] == b"{":
            with contextlib.suppress(Refusal):
                model = json_model(body)
        backend = self.lane.handlers.pool.acquire_ready(model) \
            if isinstance(model, str) and model and len(model) <= MAX_MODEL_CHARS else None
        if backend is None:  # no model, not JSON, a server to start: aiohttp's path
            self._hand_off(self.transport, bytes(buffer))  # type: ignore[arg-type]
            return
        del buffer[:total]
        self.pending = None
        self.scanned = self.lines_end = 0
        self.head_began = 0.0
        self.served += 1
        self.lane.served += 1
        self.lane.handlers.active[id(request)] = request  # in the drain from now on
        self.task = self.loop.create_task(self._serve(request, backend, model, body))

    def _may_begin(self, start: int) -> bool:
        """Whether an incomplete head may still become one for the lane, looking at what
        came from ``start`` on. What cannot (a bare CR or LF, a bad byte, a malformed line,
        another method or route) goes to aiohttp at once, as its parser refuses much of it
        at once."""
        buffer = self.buffer
        if len(buffer) > MAX_HEAD or not _HEAD_BYTES.fullmatch(buffer, start):
            return False
        # A CR at the very end may yet be followed by its LF.
        if _BARE_LINE_END.search(buffer, max(0, start - 1),
                                 len(buffer) - buffer.endswith(b"\r")):
            return False
        pos = self.lines_end
        while (line_end := buffer.find(b"\r\n", pos)) >= 0:
            if pos == 0:
                line = _FIRST_LINE.fullmatch(buffer, 0, line_end)
                if line is None or not self._routed(line.group(1).decode(),
                                                    line.group(2).decode()):
                    return False
            elif not _FIELD_LINE.fullmatch(buffer, pos, line_end):
                return False
            pos = line_end + 2
        self.lines_end = pos
        return pos > 0 or b"POST /".startswith(buffer[:6]) or b"GET /v".startswith(buffer[:6])

    def _routed(self, method: str, target: str) -> bool:
        """Whether the lane takes ``method`` requests for ``target``."""
        path = target.partition("?")[0]
        if method == "POST":
            return path in FORWARD_PATHS or bool((match := _RESPONSE_PATH.fullmatch(path))
                                                    and match.group(1))
        return bool((match := _RESPONSE_PATH.fullmatch(path)) and not match.group(1))

    def _parse(self, buffer: bytearray, end: int) -> tuple[LaneRequest, int, int] | None:
        """The request whose head ends at ``end``, where its body begins and ends; None
        when it is not one for the lane."""
        try:
            text = buffer[:end].decode("ascii")
        except UnicodeDecodeError:
            return None
        head = _HEAD.fullmatch(text)
        if head is None:
            return None
        method, target, fields = head.groups()
        if not self._routed(method, target):
            return None
        lines = fields.split("\r\n")
        if len(lines) > MAX_FIELDS + 1:
            return None
        headers: CIMultiDict[str] = CIMultiDict()
        for line in lines[1:]:
            name, _, value = line.partition(":")
            headers.add(name, value.strip(" \t"))
        lane = self.lane
        length = 0
        close = False
        once: set[str] = set()
        for name, value in headers.items():
            lower = name.lower()
            if lower in SINGLETONS:
                if lower in once:
                    return None
                once.add(lower)
            if lower in _NOT_HERE:
                return None
            if lower == "content-length":
                if not value.isdigit() or len(value) > 10:
                    return None
                length = int(value)
            elif lower == "connection":
                tokens = {t.strip().lower() for v in headers.getall(name) for t in v.split(",")}
                if "upgrade" in tokens:
                    return None
                close = "close" in tokens
        if "host" not in once or length > lane.max_body or (method == "GET" and length):
            return None  # (HTTP/1.1 without a Host is aiohttp's 400)
        gate = lane.gate
        if gate is not None and (not gate.host_ok(headers.get("Host"))
                                 or headers.get("Sec-Fetch-Site") == "cross-site"):
            return None
        if lane.keys and not key_ok(headers, lane.keys):
            return None
        request = LaneRequest(method, target, headers, self.addr,
                              self.transport, close)  # type: ignore[arg-type]
        return request, end + 4, end + 4 + length

    def _hand_off(self, transport: asyncio.BaseTransport, data: bytes,
                  admitted: bool = True) -> None:
        """Give the connection to aiohttp's protocol from ``data`` on (the start of a
        request it has not answered); it stays there."""
        self.handed_off = True
        self.buffer = bytearray()
        if admitted:
            self._forget()  # the edge handler admits it again
        handler = self.server.aiohttp_protocol()
        transport.set_protocol(handler)  # type: ignore[attr-defined]
        handler.connection_made(transport)
        if self.reading_paused:
            self.reading_paused = False
            transport.resume_reading()  # type: ignore[attr-defined]
        if data and not transport.is_closing():
            handler.data_received(data)

    # ----------------------------------------------------------------- the watchdog

    def _idle_limit(self) -> float:
        """How long the connection may wait for a request to begin: the header timeout
        before its first, then the keep-alive timeout."""
        timeout = self.lane.edge.header_timeout
        return timeout if not self.served and timeout > 0 else KEEPALIVE_S

    def _arm(self, delay: float) -> None:
        self.watch = self.loop.call_later(max(delay, 0.05), self._tick)

    def _watch_by(self, deadline: float) -> None:
        """Make the watchdog look again by ``deadline`` at the latest."""
        watch = self.watch
        if watch is None or watch.when() > deadline + 0.05:
            if watch is not None:
                watch.cancel()
            self._arm(deadline - self.loop.time())

    def _tick(self) -> None:
        """Close a connection whose head is slow or whose keep-alive is over; answer 408 to a
        body that stalls (as the edge does for aiohttp's connections)."""
        self.watch = None
        if self.transport is None or self.handed_off or self.transport.is_closing():
            return
        edge = self.lane.edge
        now = self.loop.time()
        if self.task is not None:
            self._arm(KEEPALIVE_S)  # answering: the upstream's read timeout applies
            return
        if not self.head_began:  # waiting for a request
            left = self.idle_since + self._idle_limit() - now
            if left <= 0:
                self.transport.close()
                return
            self._arm(left)
            return
        if self.pending is None:  # a head on its way
            if edge.header_timeout <= 0:
                self._arm(KEEPALIVE_S)
                return
            left = self.head_began + edge.header_timeout - now
            if left <= 0:
                edge.metrics.request_done("unknown", 408, edge.header_timeout)
                edge.say("client %s sent no complete request head within %gs: closed",
                         self.addr, edge.header_timeout)
                self.transport.close()
                return
            self._arm(left)
            return
        if edge.body_timeout <= 0:  # a body on its way
            self._arm(KEEPALIVE_S)
            return
        left = self.last_read + edge.body_timeout - now
        if left <= 0:
            edge.say("client %s sent no body bytes for %gs: 408", self.addr, edge.body_timeout)
            edge.metrics.request_done("unknown", 408, now - self.head_began)
            self.transport.write(self._error(408, f"the request body sent nothing for "
                                             f"{edge.body_timeout:g}s", "RequestTimeoutError",
                                             close=True))
            self.transport.close()
            return
        self._arm(left)

    # ----------------------------------------------------------------- answering

    async def _serve(self, request: LaneRequest, backend: Backend, model: str,
                     body: bytes) -> None:
        """Forward one request and relay its answer; counted as the aiohttp path counts.

        The answer's last bytes (all of a small one) are written after the request is
        counted and its server released, as aiohttp writes a handler's response after it
        returns: a client that reads the answer sees the gateway's counts up to date.
        """
        handlers = self.lane.handlers
        begin = self.loop.time()
        status = 499  # the client went away (nginx's code) unless we learn otherwise
        last = b""
        close = request.close
        try:
            try:
                upstream = await handlers.open_upstream(backend, request.method,
                                                        request.target, request.headers,
                                                        request.remote, body)
                try:
                    status = upstream.status
                    last = await self._relay(request, upstream)
                except BaseException:
                    upstream.close()  # close the connection: vLLM aborts the generation
                    raise
                finally:
                    upstream.release()
            except Refusal as refusal:
                status = refusal.status
                last = self._error(refusal.status, refusal.message, refusal.kind,
                                   refusal.retry_after, close)
            except StreamBroken:
                status = 502
            except (ConnectionError, asyncio.CancelledError):
                status = 499
            except Exception as exc:  # a bug: one short line, a JSON 500, counted
                status = 500
                logger.error("internal error on %s %s: %s", request.method,
                             request.target.partition("?")[0], where(exc))
                close = True
                last = self._error(500, "internal error in the gateway", "InternalServerError",
                                   close=True)
        finally:
            handlers.active.pop(id(request), None)
            handlers.pool.release(backend, model)
            handlers.metrics.request_done(backend.name, status, self.loop.time() - begin)
            self.task = None
        transport = self.transport
        if last and transport is not None and not transport.is_closing():
            transport.write(last)
        self._answered(close)

    def _answered(self, close: bool) -> None:
        """After an answer: close, or go on with the next request."""
        transport = self.transport
        if transport is None or transport.is_closing():
            return
        if close or self.lane.closing:
            transport.close()
            return
        self.idle_since = self.loop.time()
        if self.reading_paused:
            self.reading_paused = False
            transport.resume_reading()
        if self.buffer:
            self.head_began = self.idle_since
            self._next()

    def _head(self, status: int, headers: dict[str, str], framing: str,
              close: bool) -> bytes:
        lines = [f"{name}: {value}" for name, value in headers.items()]
        lines.append(f"Server: {SERVER_NAME}")
        lines.append(f"Date: {_date()}")
        if framing:
            lines.append(framing)
        if close:
            lines.append("Connection: close")
        # (reply_headers refused values with line breaks)
        return _status_line(status) + "\r\n".join(lines).encode("latin-1") + b"\r\n\r\n"

    async def _relay(self, request: LaneRequest, upstream: UpstreamResponse) -> bytes:
        """Relay the answer; returns its last bytes, for the caller to write."""
        transport = self.transport
        assert transport is not None
        headers = reply_headers(upstream.headers)
        status = upstream.status
        data = await small_answer(upstream)
        if data is not None:
            framing = "" if status in (204, 304) else f"Content-Length: {len(data)}"
            return self._head(status, headers, framing, request.close) + data
        headers["X-Accel-Buffering"] = "no"
        transport.write(self._head(status, headers, "Transfer-Encoding: chunked",
                                   request.close))
        try:
            async for chunk in upstream.iter_any():
                transport.write(b"%x\r\n%b\r\n" % (len(chunk), chunk))
                if self.write_paused:
                    await self._drain()
        except (TimeoutError, GatewayUpstreamError) as exc:
            # The head is gone already: all that is left is to cut the stream short.
            logger.warning("upstream stream for %s broke off: %s",
                           request.target.partition("?")[0], type(exc).__name__)
            upstream.close()
            transport.close()
            raise StreamBroken(None) from None
        return b"0\r\n\r\n"

    def _error(self, status: int, message: str, kind: str, retry_after: int | None = None,
               close: bool = False) -> bytes:
        """An OpenAI-style error answer, as the aiohttp path makes it."""
        body = error_body(status, message, kind)
        headers = {"Content-Type": "application/json; charset=utf-8"}
        if retry_after is not None:
            headers["Retry-After"] = str(retry_after)
        return self._head(status, headers, f"Content-Length: {len(body)}", close) + body
