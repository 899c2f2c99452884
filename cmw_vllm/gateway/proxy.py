"""The gateway's HTTP side: aiohttp server, routing, auth, streaming.

aiohttp's defaults are changed where they hurt a proxy: the request body limit (1 MiB) is
the gateway's ``max_body_bytes``, and handler cancellation is on, so a client that goes away
cancels the handler and closes the upstream request at once, and vLLM stops generating for
it. Requests go to the servers through :mod:`cmw_vllm.gateway.client` (no connection cap
unless ``max_connections``, a per-read timeout: long generations are fine, a silent server
is not).

Ordinary inference requests to a ready server do not reach these handlers: the fast lane
(:mod:`cmw_vllm.gateway.lane`) serves them on its own protocol, through
:meth:`Handlers.open_upstream`, the same pool, metrics and drain. Every other request,
and every connection from its first request the lane does not take, is aiohttp's.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import time
from typing import Any

from aiohttp import web

from cmw_vllm.errors import CmwVllmError, GatewayUpstreamConnectError, GatewayUpstreamError
from cmw_vllm.errors import GatewayRefusal as Refusal
from cmw_vllm.errors import GatewayStreamBroken as StreamBroken
from cmw_vllm.gateway.body import BodyBudget, find_model, read_body
from cmw_vllm.gateway.client import UpstreamPool, UpstreamResponse
from cmw_vllm.gateway.control import install as install_control
from cmw_vllm.gateway.control import is_control_path
from cmw_vllm.gateway.edge import EDGE_KEY, LANE_KEY, SERVER_NAME, BodyTimeout, Edge
from cmw_vllm.gateway.headers import TrustedProxies, forward_headers, key_ok, reply_headers
from cmw_vllm.gateway.lane import FORWARD_PATHS, RESPONSE_ID, Lane, small_answer
from cmw_vllm.gateway.metrics import Metrics
from cmw_vllm.gateway.origin import install as install_web_gate
from cmw_vllm.gateway.pool import READY, Backend, Pool
from cmw_vllm.gateway.settings import GatewaySettings

logger = logging.getLogger(__name__)

# vLLM closes a keep-alive connection after 5 s idle (VLLM_HTTP_TIMEOUT_KEEP_ALIVE);
# the gateway reuses one for less, so that it never sends on a connection vLLM is closing.
UPSTREAM_KEEPALIVE = 3.0

POOL_KEY: web.AppKey[Pool] = web.AppKey("pool", Pool)
UPSTREAM_KEY: web.AppKey[UpstreamPool] = web.AppKey("upstream", UpstreamPool)
SETTINGS_KEY: web.AppKey[GatewaySettings] = web.AppKey("settings", GatewaySettings)
METRICS_KEY: web.AppKey[Metrics] = web.AppKey("metrics", Metrics)


def error_response(status: int, message: str, kind: str, retry_after: int | None = None,
                   hint: str | None = None) -> web.Response:
    """An OpenAI-style error body."""
    error: dict[str, Any] = {"message": message, "type": kind, "param": None, "code": status}
    if hint:
        error["hint"] = hint
    headers = {"Server": SERVER_NAME}
    if retry_after is not None:
        headers["Retry-After"] = str(retry_after)
    return web.json_response({"error": error}, status=status, headers=headers)


def _reply_headers(upstream: UpstreamResponse) -> dict[str, str]:
    headers = reply_headers(upstream.headers)
    headers["Server"] = SERVER_NAME
    return headers


def _json(data: Any) -> web.Response:
    return web.json_response(data, headers={"Server": SERVER_NAME})


class Handlers:
    """The route handlers of one gateway app."""

    def __init__(self, settings: GatewaySettings, pool: Pool, metrics: Metrics) -> None:
        self.settings = settings
        self.pool = pool
        self.metrics = metrics
        self.upstream: UpstreamPool | None = None
        self.trusted = TrustedProxies(settings.trusted_proxies)
        # Proxied requests in flight, by id (requests are not hashable), for the drain.
        self.active: dict[int, web.Request] = {}
        self.waiting_bodies = BodyBudget(settings.max_buffered_bytes)

    async def health(self, request: web.Request) -> web.Response:
        """The gateway's own health: 200 while it serves."""
        return _json({"status": "ok"})

    async def metrics_text(self, request: web.Request) -> web.Response:
        """Prometheus metrics of the gateway itself."""
        text = self.metrics.render(self.pool.in_flight(), dict(self.pool.waiting))
        return web.Response(text=text, content_type="text/plain", charset="utf-8",
                            headers={"Server": SERVER_NAME})

    async def models(self, request: web.Request) -> web.Response:
        """Every model the gateway can serve, with its state."""
        try:
            await self.pool.refresh()
        except CmwVllmError as exc:
            logger.warning("reading the servers for /v1/models failed: %s", exc.message)
        return _json({"object": "list", "data": self.pool.listing()})

    async def proxy(self, request: web.Request) -> web.StreamResponse:
        """Route one request by its model to a server, starting the server when needed.

        Every outcome is a response with an OpenAI-style body when the gateway makes it,
        counted once in the metrics under the status the client got (499 when the client
        went away first, as nginx logs it).
        """
        begin = time.monotonic()
        model: str | None = None
        self.active[id(request)] = request
        try:
            try:
                body = await read_body(request, self.settings.max_body_bytes)
                model = await find_model(body, request)
                if model is None:
                    sole = self.pool.sole_backend()
                    if sole is None:
                        raise Refusal(400, "the request names no `model` (body field or "
                                      "?model=)", "BadRequestError")
                    model = sole.names[0]
                backend = await self._acquire(model, len(body))
            except Refusal as refusal:
                label = self.pool.label_for(model) if model and refusal.status != 404 \
                    else "unknown"
                self.metrics.request_done(label, refusal.status, time.monotonic() - begin)
                return error_response(refusal.status, refusal.message, refusal.kind,
                                      refusal.retry_after, refusal.hint)
            except BodyTimeout as exc:
                self.metrics.request_done("unknown", 408, time.monotonic() - begin)
                response = error_response(408, str(exc), "RequestTimeoutError")
                response.force_close()
                return response
            except web.RequestPayloadError:  # bad chunked framing, a bad gzip body, ...
                self.metrics.request_done("unknown", 400, time.monotonic() - begin)
                response = error_response(400, "the request body is malformed",
                                          "BadRequestError")
                response.force_close()
                return response
            except ConnectionError:
                self.metrics.request_done("unknown", 499, time.monotonic() - begin)
                raise
            return await self._send(request, backend, body, begin, model)
        except Exception as exc:  # a bug: one short line, a JSON 500, counted
            self.metrics.request_done("unknown", 500, time.monotonic() - begin)
            return _internal_error(request, exc)
        finally:
            self.active.pop(id(request), None)

    async def _send(self, request: web.Request, backend: Backend, body: bytes,
                    begin: float, model: str | None = None) -> web.StreamResponse:
        status = 499  # client closed the request (nginx's code) unless we learn otherwise
        try:
            response = await self._forward(request, backend, body)
            status = response.status
            return response
        except Refusal as refusal:
            status = refusal.status
            return error_response(refusal.status, refusal.message, refusal.kind,
                                  refusal.retry_after)
        except StreamBroken as broken:
            status = 502
            return broken.response  # type: ignore[return-value]
        except ConnectionError:
            raise  # the client went away: 499
        except Exception as exc:
            status = 500
            return _internal_error(request, exc)
        finally:
            self.pool.release(backend, model)
            self.metrics.request_done(backend.name, status, time.monotonic() - begin)

    async def _acquire(self, model: str, size: int) -> Backend:
        """A backend for ``model``; while its server starts, the body counts against the
        cap on bodies held in memory (503 beyond it)."""
        ready = self.pool.by_model.get(model)
        if ready is not None and ready.state == READY:
            return await self.pool.acquire(model)
        if not self.waiting_bodies.fits(size):
            self.metrics.rejected[(self.pool.label_for(model), "body_buffer_full")] += 1
            raise self.waiting_bodies.full()
        with self.waiting_bodies.hold(size):
            return await self.pool.acquire(model)

    async def _forward(self, request: web.Request, backend: Backend,
                       body: bytes) -> web.StreamResponse:
        upstream = await self.open_upstream(backend, request.method,
                                            request.rel_url.raw_path_qs, request.headers,
                                            request.remote or "", body)
        try:
            return await self._relay(request, upstream)
        except BaseException:
            upstream.close()  # close the connection: vLLM aborts the generation
            raise
        finally:
            upstream.release()

    async def open_upstream(self, backend: Backend, method: str, target: str, headers: Any,
                            peer: str, body: bytes) -> UpstreamResponse:
        """Send a client's request on to ``backend``; returns once its answer's head is in.

        Args:
            backend: The server (acquired).
            method: The request's method.
            target: Its path and query, as the client sent them.
            headers: The client's headers (a case-insensitive multidict).
            peer: The client's address.
            body: The body, decoded.

        Raises:
            Refusal: The server cannot be reached (502, marked unhealthy), sent nothing in
                time (504), or no valid answer (502); a header is not UTF-8 (400).
        """
        assert self.upstream is not None
        forwarded = forward_headers(headers, peer, self.settings.upstream_key, self.trusted)
        host, port, tls = backend.address
        try:
            return await self.upstream.request(host, port, method, target, forwarded, body,
                                               tls)
        except GatewayUpstreamConnectError:
            self.pool.mark_unhealthy(backend)
            raise Refusal(502, f"server {backend.name!r} does not answer", "BadGatewayError",
                          retry_after=5) from None
        except TimeoutError:
            raise Refusal(504, f"server {backend.name!r} sent nothing for "
                          f"{self.settings.upstream_timeout:g}s", "GatewayTimeoutError") from None
        except GatewayUpstreamError:
            raise Refusal(502, f"server {backend.name!r} failed: no valid answer",
                          "BadGatewayError") from None

    async def _relay(self, request: web.Request,
                     upstream: UpstreamResponse) -> web.StreamResponse:
        headers = _reply_headers(upstream)
        data = await small_answer(upstream)
        if data is not None:
            return web.Response(body=data, status=upstream.status, headers=headers)
        response = web.StreamResponse(status=upstream.status, headers=headers)
        response.headers["X-Accel-Buffering"] = "no"
        await response.prepare(request)
        try:
            async for chunk in upstream.iter_any():
                await response.write(chunk)
        except (TimeoutError, GatewayUpstreamError) as exc:
            # Headers are gone already: all we can do is cut the stream short.
            logger.warning("upstream stream for %s broke off: %s", request.path,
                           type(exc).__name__)
            upstream.close()
            if request.transport is not None:
                request.transport.close()
            raise StreamBroken(response) from None
        await response.write_eof()
        return response


def _internal_error(request: web.Request, exc: BaseException) -> web.Response:
    """A bug in the gateway: one line with the exception's type and place (its message may
    hold request bytes), and a JSON 500 that closes the connection."""
    from cmw_vllm.gateway.edge import where

    logger.error("internal error on %s %s: %s", request.method, request.path, where(exc))
    response = error_response(500, "internal error in the gateway", "InternalServerError")
    response.force_close()
    return response


@web.middleware
async def _auth_middleware(request: web.Request, handler: Any) -> web.StreamResponse:
    if request.path != "/health" and not is_control_path(request.path) \
            and not key_ok(request.headers, request.app[SETTINGS_KEY].api_keys):
        return _unauthorized(request)
    return await handler(request)


def _unauthorized(request: web.Request) -> web.Response:
    request.app[METRICS_KEY].request_done("unknown", 401, 0.0)
    return error_response(401, "a valid gateway API key is required (Authorization: "
                          "Bearer KEY or x-api-key)", "AuthenticationError")


async def _expect_continue(request: web.Request) -> web.StreamResponse | None:
    """``Expect: 100-continue``: the client is told to send its body only once its key and
    its announced size pass (nginx sends 100 when the body is first read, after access
    checks); otherwise it gets the final answer at once and sends no body."""
    expect = request.headers.get("Expect", "")
    if expect.lower() != "100-continue":
        request.app[METRICS_KEY].request_done("unknown", 417, 0.0)
        response = error_response(417, "only `Expect: 100-continue` is supported",
                                  "ExpectationFailedError")
        response.force_close()
        return response
    settings = request.app[SETTINGS_KEY]
    response: web.Response | None = None
    if settings.api_keys and request.path != "/health" \
            and not is_control_path(request.path) \
            and not key_ok(request.headers, settings.api_keys):
        response = _unauthorized(request)
    elif request.content_length is not None and request.content_length > \
            settings.max_body_bytes:
        request.app[METRICS_KEY].request_done("unknown", 413, 0.0)
        response = error_response(413, f"request body of {request.content_length} bytes is "
                                  f"over the gateway's limit of {settings.max_body_bytes} "
                                  "bytes", "RequestTooLargeError")
    if response is not None:
        response.force_close()  # the body it announced never comes: no keep-alive
        return response
    if request.version >= (1, 1):
        await request.writer.write(b"HTTP/1.1 100 Continue\r\n\r\n")
        request.writer.output_size = 0  # the answer itself has not begun
    return None


async def _not_forwarded(request: web.Request) -> web.Response:
    request.app[METRICS_KEY].request_done("unknown", 404, 0.0)
    return error_response(404, f"{request.method} {request.path} is not served by the gateway",
                          "NotFoundError")


def build_app(settings: GatewaySettings, pool: Pool | None = None,
              metrics: Metrics | None = None) -> web.Application:
    """The gateway's aiohttp application (background tasks start with it).

    Args:
        settings: The gateway's settings.
        pool: The servers behind it (default: a Pool over the managed servers).
        metrics: Its metrics (default: fresh).
    """
    metrics = metrics or (pool.metrics if pool is not None else Metrics())
    # Without keys there is no middleware at all: aiohttp then skips building the
    # middleware chain for every request.
    # Bodies are decoded by gateway.body, as a stream within the limit, not by the parser.
    app = web.Application(client_max_size=settings.max_body_bytes,
                          middlewares=[_auth_middleware] if settings.api_keys else [],
                          handler_args={"auto_decompress": False})
    handlers = Handlers(settings, pool or Pool(settings, metrics), metrics)
    handlers.pool.metrics = metrics
    gate = install_web_gate(app, settings)
    app[SETTINGS_KEY] = settings
    app[POOL_KEY] = handlers.pool
    app[METRICS_KEY] = metrics
    app[EDGE_KEY] = edge = Edge(settings, metrics)
    app[LANE_KEY] = Lane(handlers, edge, None if gate.open else gate)
    route = functools.partial(app.router.add_route, expect_handler=_expect_continue)
    route("GET", "/health", handlers.health)
    route("GET", "/metrics", handlers.metrics_text)
    route("GET", "/v1/models", handlers.models)
    for path in sorted(FORWARD_PATHS):
        route("POST", path, handlers.proxy)
    route("GET", "/v1/responses/{rid:" + RESPONSE_ID + "}", handlers.proxy)
    route("POST", "/v1/responses/{rid:" + RESPONSE_ID + "}/cancel", handlers.proxy)
    install_control(app, settings, handlers.pool)  # /api/ and /ui/: the dashboard
    route("*", "/{tail:.*}", _not_forwarded)

    async def lifecycle(app: web.Application) -> Any:
        # No header the client did not send (aiohttp's client would add User-Agent, Accept,
        # Accept-Encoding and a Content-Type of its own), nothing decompressed.
        upstream = UpstreamPool(limit=settings.max_connections, connect_timeout=10.0,
                                read_timeout=settings.upstream_timeout,
                                keepalive=UPSTREAM_KEEPALIVE)
        handlers.upstream = upstream
        app[UPSTREAM_KEY] = upstream
        pool = handlers.pool
        await pool.refresh()
        _exit_once_on_signal()  # after aiohttp installed its handlers: replaces them
        tasks = [asyncio.create_task(pool.idle_loop()), asyncio.create_task(pool.health_loop())]
        yield
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        await pool.shutdown()
        upstream.close()

    async def drain(app: web.Application) -> None:
        await _drain(handlers, settings.shutdown_grace)

    app.cleanup_ctx.append(lifecycle)
    app.on_shutdown.append(drain)
    return app


async def _drain(handlers: Handlers, grace: float) -> None:
    """On shutdown, give the requests in flight ``grace`` seconds, then cut the rest.

    aiohttp's own shutdown would wait its timeout twice (once for the handler, once after
    cancelling it) and cut streams at about twice the documented time. Cutting a request
    closes its connection: the handler is cancelled and vLLM stops generating for it.
    """
    if not handlers.active:
        return
    loop = asyncio.get_running_loop()
    deadline = loop.time() + grace
    logger.warning("shutting down: %d request(s) in flight get up to %gs to finish",
                   len(handlers.active), grace)
    while handlers.active and loop.time() < deadline:
        await asyncio.sleep(min(0.05, max(deadline - loop.time(), 0.0)))
    if handlers.active:
        logger.warning("shutdown grace of %gs over: cutting %d request(s)", grace,
                       len(handlers.active))
        for request in list(handlers.active.values()):
            if request.transport is not None:
                request.transport.close()


def _exit_once_on_signal() -> None:
    """Shut down on the first SIGINT or SIGTERM and only log the ones after it.

    ``stop`` signals the API server and its supervisor (for a gateway one process), and
    users press Ctrl-C twice: a second signal must not cut short the drain of requests in
    flight or the stop of the servers this gateway started. aiohttp's own handler would
    raise ``GracefulExit`` again and cancel that clean-up.
    """
    import signal

    loop = asyncio.get_running_loop()
    sigs = (signal.SIGINT, signal.SIGTERM)

    def first(signum: int) -> None:
        for sig in sigs:
            loop.add_signal_handler(sig, logger.warning,
                                    "already shutting down: finishing requests in flight "
                                    "and stopping the servers this gateway started")
        logger.warning("%s: shutting down", signal.Signals(signum).name)
        raise web.GracefulExit()

    for sig in sigs:
        try:
            loop.add_signal_handler(sig, first, sig)
        except (RuntimeError, ValueError, NotImplementedError):
            return  # not the main thread (tests), or no signals here

