"""The gateway's connection edge: what happens to a connection before a route handler runs.

A connection starts in the fast lane (:mod:`cmw_vllm.gateway.lane`), which gives it to
aiohttp's protocol at its first request the lane does not take. aiohttp's server protocol is
kept, with what a front door needs on top (nginx's defaults in brackets; the lane keeps the
same limits for its own requests):

- a request head must arrive within ``header_timeout`` of the connection [client_header_
  timeout 60 s], and a body may pause at most ``body_timeout`` between two reads
  [client_body_timeout 60 s]; an idle keep-alive connection is closed after 75 s
  [keepalive_timeout 75 s];
- one client address may hold ``max_client_connections`` connections [limit_conn, off by
  default there]; more are answered with a 503 and closed;
- a malformed request (bad header bytes, bad framing) gets a fixed OpenAI-style JSON 400
  and at most one short, rate-limited log line without any of its bytes (aiohttp logs a
  traceback with the offending header line, key included) [nginx: a fixed HTML page and one
  error-log line];
- every error response aiohttp itself makes is JSON and counted in the gateway's metrics.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import sys
import time
import traceback
from collections import defaultdict
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, Protocol

from aiohttp import web
from aiohttp.web_protocol import RequestHandler

from cmw_vllm.errors import GatewayBodyTimeout as BodyTimeout

if TYPE_CHECKING:
    from cmw_vllm.gateway.metrics import Metrics
    from cmw_vllm.gateway.settings import GatewaySettings

logger = logging.getLogger(__name__)

SERVER_NAME = "cmw-vllm"  # the Server header: no Python or aiohttp version
KEEPALIVE_S = 75.0  # idle keep-alive connections (nginx's keepalive_timeout)
LINES_PER_MINUTE = 20  # log lines about bad clients, then one "suppressed" line a minute
LINGER_S = 1.0  # a refused connection is read (and dropped) this long so the client sees why
MAX_LINGERING = 16  # beyond this many at once (a flood), refused connections close at once

_STATUS_KIND = {400: "BadRequestError", 408: "RequestTimeoutError", 413: "RequestTooLargeError",
                414: "RequestTooLargeError", 431: "RequestTooLargeError",
                500: "InternalServerError", 501: "NotImplementedError",
                503: "ServiceUnavailableError", 504: "GatewayTimeoutError"}
_STATUS_TEXT = {400: "malformed HTTP request", 408: "the request was not sent in time",
                413: "request too large", 500: "internal error in the gateway",
                501: "request framing not supported", 504: "the gateway timed out"}


def error_body(status: int, message: str, kind: str | None = None) -> bytes:
    """An OpenAI-style error body (``{"error": {"message", "type", "param", "code"}}``)."""
    error = {"message": message, "type": kind or _STATUS_KIND.get(status, "APIError"),
             "param": None, "code": status}
    return json.dumps({"error": error}).encode()


class LineBudget:
    """A token bucket for log lines: ``per_minute`` lines, then a count of the rest.

    Args:
        per_minute: Lines allowed per minute (also the burst).
        clock: Monotonic seconds.
    """

    def __init__(self, per_minute: int = LINES_PER_MINUTE,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.per_minute = per_minute
        self.clock = clock
        self.tokens = float(per_minute)
        self.stamp = clock()
        self.suppressed = 0

    def take(self) -> bool:
        """True when a line may be logged now; else the line is counted as suppressed."""
        now = self.clock()
        self.tokens = min(float(self.per_minute),
                          self.tokens + (now - self.stamp) * self.per_minute / 60.0)
        self.stamp = now
        if self.tokens >= 1.0:
            self.tokens -= 1.0
            return True
        self.suppressed += 1
        return False

    def drain_suppressed(self) -> int:
        """How many lines were suppressed since the last call."""
        count, self.suppressed = self.suppressed, 0
        return count


class Edge:
    """Limits and counters shared by all connections of one gateway.

    Args:
        settings: The gateway's settings (timeouts, the per-client cap, trusted proxies).
        metrics: Where errors made at the edge are counted.
    """

    def __init__(self, settings: GatewaySettings, metrics: Metrics) -> None:
        from cmw_vllm.gateway.headers import TrustedProxies

        self.header_timeout = settings.header_timeout
        self.body_timeout = settings.body_timeout
        self.max_per_client = per_client_cap(settings.max_client_connections)
        self.trusted = TrustedProxies(settings.trusted_proxies)
        self.metrics = metrics
        self.connections: dict[str, int] = defaultdict(int)
        self.lingering = 0
        self.budget = LineBudget()
        self._flush: asyncio.TimerHandle | None = None

    # ----------------------------------------------------------------- log lines

    def say(self, text: str, *args: object) -> None:
        """Log one warning line about a client, within the budget (never its bytes)."""
        if self.budget.take():
            skipped = self.budget.drain_suppressed()
            if skipped:
                logger.warning("%d more lines about clients suppressed", skipped)
            logger.warning(text, *args)
        elif self._flush is None:
            with contextlib.suppress(RuntimeError):
                loop = asyncio.get_running_loop()
                self._flush = loop.call_later(60.0, self.flush)

    def flush(self) -> None:
        """Log how many lines were suppressed (once a minute while a flood lasts, and at
        shutdown)."""
        self._flush = None
        skipped = self.budget.drain_suppressed()
        if skipped:
            logger.warning("%d more lines about clients suppressed", skipped)

    # ----------------------------------------------------------------- connections

    def admit(self, addr: str) -> bool:
        """Count a new connection from ``addr``; False when it is over the cap."""
        if self.max_per_client and not self.trusted.contains(addr) \
                and self.connections[addr] >= self.max_per_client:
            return False
        self.connections[addr] += 1
        return True

    def release(self, addr: str) -> None:
        """A connection counted by :meth:`admit` closed."""
        left = self.connections[addr] - 1
        if left > 0:
            self.connections[addr] = left
        else:
            self.connections.pop(addr, None)


def per_client_cap(setting: int) -> int:
    """Connections one address may hold: the setting, but at most a quarter of the
    open-files limit, so that one client cannot take every descriptor (0: no cap)."""
    if setting <= 0:
        return 0
    try:
        import resource

        soft = resource.getrlimit(resource.RLIMIT_NOFILE)[0]
    except (ImportError, OSError, ValueError):
        return setting
    if soft == resource.RLIM_INFINITY:
        return setting
    return max(1, min(setting, soft // 4))


class ConnectionLane(Protocol):
    """What makes a connection's first protocol instead of aiohttp's (the fast lane,
    :class:`cmw_vllm.gateway.lane.Lane`), and closes its connections on shutdown."""

    def protocol(self, server: EdgeServer) -> asyncio.Protocol:
        """The protocol of a new connection (it may hand the connection to
        ``server.aiohttp_protocol()``)."""

    def pre_shutdown(self) -> None:
        """Close idle connections; busy ones after their answer."""

    def shutdown(self) -> None:
        """Close every connection left."""


EDGE_KEY: web.AppKey[Edge] = web.AppKey("edge", Edge)
LANE_KEY: web.AppKey[ConnectionLane] = web.AppKey("lane")

_OVER_CAP = (b"HTTP/1.1 503 Service Unavailable\r\nServer: " + SERVER_NAME.encode()
             + b"\r\nContent-Type: application/json\r\nRetry-After: 5\r\nConnection: close\r\n"
             b"Content-Length: %d\r\n\r\n")


class EdgeHandler(RequestHandler):
    """aiohttp's per-connection protocol with the gateway's timeouts, cap and error pages."""

    __slots__ = ("edge", "_addr", "_admitted", "_refused", "_born", "_last_read", "_watch")

    def __init__(self, manager: web.Server, edge: Edge, **kwargs: Any) -> None:
        super().__init__(manager, **kwargs)
        self.edge = edge
        self._addr = ""
        self._admitted = False
        self._refused = False
        self._born = self._last_read = 0.0
        self._watch: asyncio.TimerHandle | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        peer = transport.get_extra_info("peername")
        self._addr = peer[0] if isinstance(peer, tuple) else str(peer or "")
        if not self.edge.admit(self._addr):
            self._refuse(transport)
            return
        self._admitted = True
        super().connection_made(transport)
        self._born = self._last_read = self._loop.time()
        if self.edge.header_timeout > 0:
            self._watch = self._loop.call_later(self.edge.header_timeout, self._tick)

    def _refuse(self, transport: asyncio.BaseTransport) -> None:
        """Answer 503 at once and close after a short linger (reads are dropped), so the
        client reads the answer instead of a reset."""
        self._refused = True
        edge = self.edge
        edge.metrics.rejected[("unknown", "client_connections")] += 1
        edge.say("client %s is over its %d connections: refused", self._addr,
                 edge.max_per_client)
        body = error_body(503, f"too many connections from {self._addr} (limit "
                          f"{edge.max_per_client})", "ServiceUnavailableError")
        tcp = transport if isinstance(transport, asyncio.WriteTransport) else None
        if tcp is None:
            transport.close()
            return
        tcp.write(_OVER_CAP % len(body) + body)
        if edge.lingering >= MAX_LINGERING:  # a flood: its descriptors matter more
            transport.close()
            return
        with contextlib.suppress(OSError, RuntimeError, NotImplementedError):
            tcp.write_eof()
        edge.lingering += 1

        def close() -> None:
            edge.lingering -= 1
            transport.close()

        self._loop.call_later(LINGER_S, close)

    def data_received(self, data: bytes) -> None:
        if self._refused:
            return
        self._last_read = self._loop.time()
        super().data_received(data)

    def connection_lost(self, exc: BaseException | None) -> None:
        if self._watch is not None:
            self._watch.cancel()
            self._watch = None
        if self._refused:
            return
        if self._admitted:
            self._admitted = False
            self.edge.release(self._addr)
        super().connection_lost(exc)

    def _tick(self) -> None:
        """The read watchdog: no request head within ``header_timeout`` of the connection,
        or a body that sent nothing for ``body_timeout``, ends the connection."""
        self._watch = None
        edge = self.edge
        if self.transport is None:
            return
        now = self._loop.time()
        if self._request_count == 0:  # aiohttp counts a request once its head is parsed
            if self._last_read > self._born:  # part of a head: nginx logs a 408 too
                edge.metrics.request_done("unknown", 408, edge.header_timeout)
                edge.say("client %s sent no complete request head within %gs: closed",
                         self._addr, edge.header_timeout)
            self.force_close()
            return
        wait = edge.body_timeout if edge.body_timeout > 0 else KEEPALIVE_S
        request = self._current_request
        if edge.body_timeout > 0 and request is not None and not request.content.is_eof():
            idle = now - self._last_read
            if idle >= edge.body_timeout:
                edge.say("client %s sent no body bytes for %gs: 408", self._addr,
                         edge.body_timeout)
                request.content.set_exception(BodyTimeout(
                    f"the request body sent nothing for {edge.body_timeout:g}s"))
                return
            wait = edge.body_timeout - idle
        self._watch = self._loop.call_later(max(wait, 0.05), self._tick)

    def handle_error(self, request: Any, status: int = 500, exc: BaseException | None = None,
                     message: str | None = None) -> web.StreamResponse:
        """aiohttp's answer to a request it could not parse or a handler that raised: a fixed
        JSON body, counted, and one short line (the exception's type, never its text: it
        holds the request's bytes)."""
        edge = self.edge
        if status >= 500:
            edge.say("internal error on a request from %s: %s", self._addr, where(exc))
        else:
            edge.say("malformed request from %s: %d (%s)", self._addr, status,
                     type(exc).__name__ if exc is not None else "no detail")
        if request.writer.output_size > 0:
            raise ConnectionError("the response had begun; the connection is cut")
        edge.metrics.request_done("unknown", status, 0.0)
        body = error_body(status, _STATUS_TEXT.get(status, "request failed"))
        response = web.Response(body=body, status=status, content_type="application/json",
                                headers={"Server": SERVER_NAME})
        response.force_close()
        return response

    def log_exception(self, *args: Any, **kw: Any) -> None:
        """aiohttp's other error lines: one short line, without the exception's text."""
        info = kw.get("exc_info")
        exc = info if isinstance(info, BaseException) else sys.exc_info()[1]
        self.edge.say("connection error from %s: %s", self._addr, where(exc))


def where(exc: BaseException | None) -> str:
    """An exception's type and innermost frame (its message may hold client bytes)."""
    if exc is None:
        return "unknown error"
    frames = traceback.extract_tb(exc.__traceback__)
    if not frames:
        return type(exc).__name__
    last = frames[-1]
    return f"{type(exc).__name__} at {last.filename.rsplit('/', 1)[-1]}:{last.lineno}"


class EdgeServer(web.Server):
    """aiohttp's server, making lane protocols (:mod:`cmw_vllm.gateway.lane`) that hand
    connections to :class:`EdgeHandler` protocols; only those without a lane."""

    edge: Edge
    lane: ConnectionLane | None

    def __call__(self) -> asyncio.Protocol:  # type: ignore[override]
        if self.lane is not None:
            return self.lane.protocol(self)
        return self.aiohttp_protocol()

    def aiohttp_protocol(self) -> RequestHandler:
        """aiohttp's protocol for one connection, with the edge's limits."""
        return EdgeHandler(self, self.edge, loop=self._loop, **self._kwargs)

    def pre_shutdown(self) -> None:
        """Close idle connections (aiohttp's and the lane's)."""
        super().pre_shutdown()
        if self.lane is not None:
            self.lane.pre_shutdown()

    async def shutdown(self, timeout: float | None = None) -> None:
        """After the drain: close the connections that are left."""
        if self.lane is not None:
            self.lane.shutdown()
        await super().shutdown(timeout)


class EdgeRunner(web.AppRunner):
    """An AppRunner whose connections go through the gateway's edge.

    Args:
        app: The gateway's application (its :data:`EDGE_KEY` holds the limits and counters).
        **kwargs: AppRunner's options (handler cancellation is on, access log off and
            keep-alive at nginx's 75 s unless given).
    """

    def __init__(self, app: web.Application, **kwargs: Any) -> None:
        kwargs.setdefault("handler_cancellation", True)
        kwargs.setdefault("access_log", None)
        kwargs.setdefault("keepalive_timeout", KEEPALIVE_S)
        super().__init__(app, **kwargs)
        self.edge = app[EDGE_KEY]

    async def _make_server(self) -> web.Server:
        server = await super()._make_server()
        # aiohttp has no option for the protocol class; its Server only builds protocols.
        server.__class__ = EdgeServer
        server.edge = self.edge  # type: ignore[attr-defined]
        server.lane = self.app.get(LANE_KEY)  # type: ignore[attr-defined]
        return server

    async def cleanup(self) -> None:
        """Stop serving (see AppRunner.cleanup), then log what the budget suppressed."""
        try:
            await super().cleanup()
        finally:
            self.edge.flush()


def serve(app: web.Application, host: str, port: int,
          on_listening: Callable[[], None], loop: asyncio.AbstractEventLoop | None = None,
          shutdown_timeout: float = 2.0) -> None:
    """Serve ``app`` until SIGINT or SIGTERM (``web.GracefulExit``), then clean up.

    ``web.run_app`` without its fixed AppRunner; the app's own shutdown hook drains the
    requests in flight (see ``proxy.build_app``), so ``shutdown_timeout`` only bounds what
    is left after that.
    """
    loop = loop or asyncio.new_event_loop()
    asyncio.set_event_loop(loop)
    runner = EdgeRunner(app, handle_signals=True, shutdown_timeout=shutdown_timeout)

    async def start() -> None:
        await runner.setup()
        await web.TCPSite(runner, host, port).start()

    try:
        try:
            loop.run_until_complete(start())
            on_listening()
            loop.run_forever()
        except (web.GracefulExit, KeyboardInterrupt):
            pass
        finally:
            loop.run_until_complete(runner.cleanup())
    finally:
        tasks = asyncio.all_tasks(loop)
        for task in tasks:
            task.cancel()
        loop.run_until_complete(asyncio.gather(*tasks, return_exceptions=True))
        loop.run_until_complete(loop.shutdown_asyncgens())
        loop.close()
