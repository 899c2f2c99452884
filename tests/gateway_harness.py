"""Run a gateway app on its own event loop in a thread, for in-process tests."""

from __future__ import annotations

import asyncio
import contextlib
import socket
import threading
from collections.abc import Callable, Coroutine, Iterator
from typing import Any

from aiohttp import web

from cmw_vllm.gateway.edge import LANE_KEY, EdgeRunner
from cmw_vllm.gateway.metrics import Metrics
from cmw_vllm.gateway.pool import Pool
from cmw_vllm.gateway.proxy import build_app
from cmw_vllm.gateway.settings import GatewaySettings


class GatewayThread:
    """A gateway serving on ``settings.port`` until :meth:`close` (servers it started are
    stopped then, as on SIGTERM). With ``lane=False`` every connection is aiohttp's from its
    first byte (the gateway as it was before its fast lane: for comparing the two)."""

    def __init__(self, settings: GatewaySettings, lane: bool = True,
                 **pool_kwargs: Any) -> None:
        self.settings = settings
        self.lane = lane
        self.url = f"http://127.0.0.1:{settings.port}"
        self.loop = asyncio.new_event_loop()
        self.metrics = Metrics()
        self._ready = threading.Event()
        self._pool_kwargs = pool_kwargs
        self.pool: Pool | None = None
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()
        if not self._ready.wait(30):
            raise RuntimeError("gateway thread did not start")

    def _run(self) -> None:
        asyncio.set_event_loop(self.loop)
        self.pool = Pool(self.settings, self.metrics, **self._pool_kwargs)
        app = build_app(self.settings, self.pool, self.metrics)
        if not self.lane:
            del app[LANE_KEY]
        self.runner = EdgeRunner(app, shutdown_timeout=2.0)
        self.loop.run_until_complete(self.runner.setup())
        site = web.TCPSite(self.runner, "127.0.0.1", self.settings.port)
        self.loop.run_until_complete(site.start())
        self._ready.set()
        self.loop.run_forever()
        self.loop.close()

    def call(self, coro: Coroutine[Any, Any, Any], timeout: float = 60) -> Any:
        """Run ``coro`` on the gateway's loop and return its result."""
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    def close(self) -> None:
        """Shut down like SIGTERM does: drain, stop the servers it started (once)."""
        if not self._thread.is_alive():
            return
        self.call(self.runner.cleanup(), timeout=120)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self._thread.join(30)


# Arguments a test may pass to ``make`` beside the settings.
_THREAD_KWARGS = ("fit_check", "manager", "lane")


@contextlib.contextmanager
def gateway_maker(**defaults: Any) -> Iterator[Callable[..., GatewayThread]]:
    """``make(**kw)`` starts a gateway on a free port with ``defaults`` updated by ``kw``
    (settings fields, ``fit_check``/``manager`` for its pool, or ``lane``); all are closed
    on exit."""
    from tests.conftest import free_port

    made: list[GatewayThread] = []

    def make(**kw: Any) -> GatewayThread:
        kw = {"port": free_port(), **defaults, **kw}
        thread_kwargs = {k: kw.pop(k) for k in _THREAD_KWARGS if k in kw}
        gw = GatewayThread(GatewaySettings(**kw), **thread_kwargs)
        made.append(gw)
        return gw

    try:
        yield make
    finally:
        for gw in made:
            gw.close()


# ----------------------------------------------------------------- stand-in upstreams

def _read_head(conn: socket.socket) -> bytes:
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = conn.recv(65536)
        if not chunk:
            return data
        data += chunk
    head, _, rest = data.partition(b"\r\n\r\n")
    length = 0
    for line in head.split(b"\r\n")[1:]:
        name, _, value = line.partition(b":")
        if name.strip().lower() == b"content-length":
            length = int(value)
    while len(rest) < length:
        chunk = conn.recv(65536)
        if not chunk:
            break
        rest += chunk
    return head


class Upstream:
    """A one-thread-per-connection HTTP server whose answer is ``respond(conn)``; it keeps
    the request heads it got."""

    def __init__(self, respond: Callable[[socket.socket], None]) -> None:
        self.respond = respond
        self.heads: list[bytes] = []
        self.sock = socket.create_server(("127.0.0.1", 0))
        self.url = f"http://127.0.0.1:{self.sock.getsockname()[1]}"
        threading.Thread(target=self._serve, daemon=True).start()

    def _serve(self) -> None:
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            threading.Thread(target=self._one, args=(conn,), daemon=True).start()

    def _one(self, conn: socket.socket) -> None:
        with conn:
            head = _read_head(conn)
            if not head:
                return
            self.heads.append(head)
            with contextlib.suppress(OSError):
                self.respond(conn)

    def header_names(self, index: int = -1) -> dict[str, str]:
        """The headers of a request it got (lower-case names)."""
        lines = self.heads[index].decode("latin-1").split("\r\n")[1:]
        return {k.strip().lower(): v.strip() for k, _, v in (x.partition(":") for x in lines)}

    def close(self) -> None:
        self.sock.close()


@contextlib.contextmanager
def stub_gateway_maker() -> Iterator[Callable[..., GatewayThread]]:
    """``make(respond=None, **settings)``: gateways with a stand-in upstream answering with
    ``respond(conn)`` added as server ``stub`` (no health rounds); all closed on exit."""
    from cmw_vllm.gateway.pool import Backend

    stubs: list[Upstream] = []
    with gateway_maker(health_interval=3600.0) as make_gateway:

        def make(respond: Callable[[socket.socket], None] | None = None,
                 **kw: Any) -> GatewayThread:
            gw = make_gateway(**kw)
            if respond is not None:
                stub = Upstream(respond)
                stubs.append(stub)
                gw.stub = stub  # type: ignore[attr-defined]

                async def add() -> None:
                    assert gw.pool is not None
                    gw.pool.backends["stub"] = Backend("stub", stub.url, ("stub",),
                                                       owned=False, pid=0, ttl=0.0)
                    gw.pool._reindex()

                gw.call(add())
            return gw

        try:
            yield make
        finally:
            for stub in stubs:
                stub.close()
