"""The dashboard's control API (``/api/``) and the page itself (``/ui/``).

Routes (JSON, OpenAI-style error bodies):

- ``GET /api/state``: the servers and startable models, with state, start phase and
  progress, pins, idle timers, load figures, failures, and the GPUs with the memory each
  server holds;
- ``GET /api/events``: one server-sent event stream (``state``, ``sample``, ``log``);
- ``POST /api/models/NAME/load``, ``/unload`` (drains), ``/pin`` (``{"pinned": bool}``);
- ``GET /api/models/NAME/logs?n=``: the end of the server's log;
- ``POST /api/login`` (``{"key": ...}`` or a form) and ``POST /api/logout``;
- ``GET /api/session``: whether the caller has access (the page asks this first).

Access: with an admin key (:attr:`GatewaySettings.admin_keys`) every ``/api/`` call needs it,
as ``Authorization: Bearer`` or the session cookie that ``/api/login`` sets (HttpOnly,
SameSite=Strict, signed with the key, so it outlives a gateway restart and dies with a new
key); no key is a 401, an inference key a 403. Without an admin key only a keyless gateway
bound to loopback serves them, to loopback clients. Calls that change something also check
``Origin``: the page's own origin only (a cookie-authenticated one must send it). The page
(``/ui/``) is static and holds no data: without access it shows its login form.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import hmac
import ipaddress
import json
import logging
import time
from collections import deque
from importlib import resources
from pathlib import Path
from typing import Any

from aiohttp import web

from cmw_vllm.errors import CmwVllmError
from cmw_vllm.errors import GatewayRefusal as Refusal
from cmw_vllm.gateway.headers import key_matches, presented_key
from cmw_vllm.gateway.pool import (
    DRAINING,
    READY,
    STARTABLE,
    STARTING,
    STOPPING,
    Backend,
    Pool,
)
from cmw_vllm.gateway.settings import GatewaySettings

logger = logging.getLogger(__name__)

API_PREFIX = "/api/"
UI_PREFIX = "/ui"
FAILED = "failed"  # an entry whose last start failed and that backs off now
COOKIE = "cmw_vllm_admin"
SESSION_S = 12 * 3600  # a login lasts this long
TICK_S = 0.5  # the monitor's period (state changes, log lines)
SAMPLE_S = 2.0  # load scrapes and GPU queries
WATCH_S = 60.0  # after the last /api/state call, keep sampling this long
HISTORY = 60  # load samples kept per server (two minutes)
KEEPALIVE_S = 15.0  # an SSE comment this often keeps proxies from closing the stream
QUEUE = 512  # events a slow subscriber may lag behind before it is dropped (it reconnects)
LOG_CHUNK = 64 * 1024  # bytes of new log read per file and tick
MAX_LOG_LINES = 2000
UI_FILES = {"index.html": "text/html", "app.js": "text/javascript", "style.css": "text/css",
            "favicon.svg": "image/svg+xml"}
CSP = ("default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data:; "
       "connect-src 'self'; form-action 'self'; base-uri 'none'; frame-ancestors 'none'")

CONTROL_KEY: web.AppKey[Control] = web.AppKey("control")


def _error(status: int, message: str, kind: str, hint: str | None = None) -> web.Response:
    error: dict[str, Any] = {"message": message, "type": kind, "param": None, "code": status}
    if hint:
        error["hint"] = hint
    return web.json_response({"error": error}, status=status,
                             headers={"Cache-Control": "no-store"})


def _ok(data: Any, status: int = 200) -> web.Response:
    return web.json_response(data, status=status, headers={"Cache-Control": "no-store"})


# ----------------------------------------------------------------------------- access


def _signature(key: str, expires: int) -> str:
    return hmac.new(key.encode(), f"cmw-vllm-session:{expires}".encode(),
                    hashlib.sha256).hexdigest()


def session_value(key: str, now: float | None = None) -> str:
    """A session cookie's value for admin key ``key``: its expiry and its signature."""
    expires = int((time.time() if now is None else now) + SESSION_S)
    return f"{expires}.{_signature(key, expires)}"


def session_ok(value: str, keys: frozenset[str], now: float | None = None) -> bool:
    """Whether a session cookie was signed with one of ``keys`` and has not expired."""
    expires_text, _, signature = value.partition(".")
    if not expires_text.isdigit() or len(expires_text) > 12:
        return False
    expires = int(expires_text)
    if expires < (time.time() if now is None else now):
        return False
    return any(hmac.compare_digest(signature.encode("utf-8", "surrogateescape"),
                                   _signature(key, expires).encode()) for key in keys)


def _loopback(address: str | None) -> bool:
    if not address:
        return False
    try:
        return ipaddress.ip_address(address.split("%", 1)[0]).is_loopback
    except ValueError:
        return False


def loopback_open(settings: GatewaySettings) -> bool:
    """A gateway without any key, bound to loopback: its control API needs no admin key
    (for loopback clients)."""
    if settings.admin_keys or settings.api_keys:
        return False
    host = settings.host.strip("[]")
    return host == "localhost" or _loopback(host)


def check_access(request: web.Request, settings: GatewaySettings
                 ) -> tuple[web.Response | None, bool]:
    """Whether the caller is an admin.

    Returns:
        (None, whether the session cookie, not a header, let them in), or (the refusal,
        False): no admin key 401, an inference key 403, no admin key configured 403.
    """
    token = presented_key(request.headers)
    inference = bool(token) and bool(settings.api_keys) and key_matches(token, settings.api_keys)
    if settings.admin_keys:
        if token:
            if key_matches(token, settings.admin_keys):
                return None, False
            if inference:
                return _error(403, "an inference API key cannot use the control API",
                              "PermissionDeniedError", hint="use the gateway's admin key"), False
            return _error(401, "the admin key is wrong", "AuthenticationError"), False
        cookie = request.cookies.get(COOKIE)
        if cookie and session_ok(cookie, settings.admin_keys):
            return None, True
        return _error(401, "the control API needs the gateway's admin key "
                      "(Authorization: Bearer KEY, or log in at /ui/)",
                      "AuthenticationError"), False
    if loopback_open(settings) and _loopback(request.remote):
        return None, False
    if inference:
        return _error(403, "an inference API key cannot use the control API",
                      "PermissionDeniedError", hint="give the gateway an admin key"), False
    return _error(403, "the control API is off: this gateway has no admin key",
                  "PermissionDeniedError",
                  hint="start it with --admin-key-file (or CMW_VLLM_GATEWAY_ADMIN_KEY_FILE), "
                  "a 0600 file holding the key"), False


def same_origin(request: web.Request, by_cookie: bool) -> bool:
    """Whether a state-changing call comes from the gateway's own pages (or from a client
    that is no browser: no ``Origin``, no ``Sec-Fetch-Site``, and a key in a header)."""
    origin = request.headers.get("Origin")
    if origin is None:
        if request.headers.get("Sec-Fetch-Site") in ("cross-site", "same-site"):
            return False
        return not by_cookie
    host = (request.headers.get("Host") or "").strip().lower()
    return bool(host) and origin.strip().lower().partition("://")[2] == host


# ----------------------------------------------------------------------------- events


class EventHub:
    """The subscribers of ``/api/events``; each gets every event, in order."""

    def __init__(self) -> None:
        self.subscribers: set[asyncio.Queue[bytes | None]] = set()
        self.next_id = 1
        self.closed = False

    def subscribe(self) -> asyncio.Queue[bytes | None]:
        """A new subscriber's queue (None in it: the stream ends)."""
        queue: asyncio.Queue[bytes | None] = asyncio.Queue(QUEUE)
        self.subscribers.add(queue)
        return queue

    def unsubscribe(self, queue: asyncio.Queue[bytes | None]) -> None:
        """Forget a subscriber."""
        self.subscribers.discard(queue)

    def frame(self, kind: str, data: Any) -> bytes:
        """One SSE event (``id``, ``event``, ``data``)."""
        event_id = self.next_id
        self.next_id += 1
        text = json.dumps(data, separators=(",", ":"))
        return f"id: {event_id}\nevent: {kind}\ndata: {text}\n\n".encode()

    def publish(self, kind: str, data: Any) -> None:
        """Send an event to every subscriber; one too far behind is dropped (its stream
        ends and the page reconnects, getting the whole state again)."""
        if not self.subscribers:
            return
        frame = self.frame(kind, data)
        for queue in list(self.subscribers):
            try:
                queue.put_nowait(frame)
            except asyncio.QueueFull:
                self.subscribers.discard(queue)
                with contextlib.suppress(asyncio.QueueEmpty):
                    queue.get_nowait()
                queue.put_nowait(None)

    def close(self) -> None:
        """End every stream (shutdown)."""
        self.closed = True
        for queue in list(self.subscribers):
            with contextlib.suppress(asyncio.QueueFull):
                queue.put_nowait(None)
        self.subscribers.clear()


# ----------------------------------------------------------------------------- state


class Load:
    """The recent load of one server, from its ``/metrics``."""

    def __init__(self) -> None:
        self.running: int | None = None
        self.waiting: int | None = None
        self.kv_cache: float | None = None
        self.tokens_per_s: float | None = None
        self.history: deque[float] = deque(maxlen=HISTORY)
        self._last: tuple[float, float] | None = None  # (time, generation tokens)

    def add(self, at: float, running: float | None, waiting: float | None,
            kv_cache: float | None, tokens: float | None) -> None:
        """One scrape."""
        self.running = int(running) if running is not None else None
        self.waiting = int(waiting) if waiting is not None else None
        self.kv_cache = kv_cache
        rate = None
        if tokens is not None:
            if self._last is not None and at > self._last[0] and tokens >= self._last[1]:
                rate = (tokens - self._last[1]) / (at - self._last[0])
            self._last = (at, tokens)
        self.tokens_per_s = round(rate, 2) if rate is not None else None
        if rate is not None:
            self.history.append(round(rate, 2))

    def to_json(self) -> dict[str, Any]:
        """``running``, ``waiting``, ``kv_cache`` (0..1), ``tokens_per_s``, ``history``."""
        return {"running": self.running, "waiting": self.waiting,
                "kv_cache": round(self.kv_cache, 4) if self.kv_cache is not None else None,
                "tokens_per_s": self.tokens_per_s, "history": list(self.history)}


def _gpu_view(report: Any) -> tuple[dict[str, Any], dict[str, list[dict[str, Any]]]]:
    """The GPUs for the page, and each server's GPUs (index and bytes held)."""
    devices = []
    per_server: dict[str, list[dict[str, Any]]] = {}
    for gpu in report.gpus:
        servers: dict[str, int] = {}
        for proc in gpu.processes:
            if proc.server is not None and proc.used_memory is not None:
                servers[proc.server] = servers.get(proc.server, 0) + proc.used_memory
        for name, used in servers.items():
            per_server.setdefault(name, []).append({"index": gpu.index, "memory": used})
        other = None
        if gpu.memory_used is not None:
            other = max(0, gpu.memory_used - sum(servers.values()))
        devices.append({"index": gpu.index, "name": gpu.name, "uuid": gpu.uuid,
                        "memory_total": gpu.memory_total, "memory_used": gpu.memory_used,
                        "memory_free": gpu.memory_free, "servers": servers, "other": other,
                        "utilization": gpu.utilization_gpu})
    return ({"available": report.available, "reason": report.reason, "devices": devices},
            per_server)


def _query_gpus() -> Any:
    from cmw_vllm.gpu_info import query_gpus

    return query_gpus()


def _scrape(base_url: str, model: str) -> Any:
    from cmw_vllm.health_check import scrape_metrics

    return scrape_metrics(base_url, timeout=2.0, model_name=model)


def record_pins(settings: GatewaySettings, pins: list[str]) -> None:
    """Note in the gateway's record which servers it keeps pinned (``status`` shows them);
    nothing when the record is not this process's (blocking)."""
    import os
    from dataclasses import asdict

    from cmw_vllm import paths
    from cmw_vllm.server_record import read_record, record_path

    with contextlib.suppress(ValueError):
        record = read_record(settings.name)
        if record is None or record.pid != os.getpid():
            return
        record.config = {**record.config, "pins": list(pins)}
        paths.write_private(record_path(settings.name),
                            json.dumps(asdict(record), indent=2) + "\n")


class Control:
    """The dashboard's view of one gateway: state, samples, log followers, events."""

    def __init__(self, settings: GatewaySettings, pool: Pool) -> None:
        self.settings = settings
        self.pool = pool
        self.hub = EventHub()
        self.loads: dict[str, Load] = {}
        self.gpus: dict[str, Any] = {"available": False, "reason": "not queried yet",
                                     "devices": []}
        self.server_gpus: dict[str, list[dict[str, Any]]] = {}
        self.watched_until = 0.0
        self._sampled_at = 0.0
        self._last_state = ""
        self._log_offsets: dict[str, int] = {}
        self._tasks: set[asyncio.Task[Any]] = set()
        self._recorded_pins: list[str] = []  # what the record says (nothing at first)

    # ------------------------------------------------------------------ state

    def watching(self, now: float) -> bool:
        """Whether anyone looks (a stream, or a state call within :data:`WATCH_S`)."""
        return bool(self.hub.subscribers) or now < self.watched_until

    def models(self, now: float | None = None) -> list[dict[str, Any]]:
        """One row per server and per startable model."""
        now = time.monotonic() if now is None else now
        pool = self.pool
        rows: list[dict[str, Any]] = []
        listed: set[str] = set()
        for backend in sorted(pool.backends.values(), key=lambda b: b.name):
            rows.append(self._backend_row(backend, now))
            listed.update((backend.name, *backend.names))
        for alias, entry in sorted(pool.entries.items()):
            if alias in listed:
                continue
            failure = pool.backoff.blocked(alias, now)
            state = STARTING if alias in pool._starts else (FAILED if failure else STARTABLE)
            row: dict[str, Any] = {
                "name": alias, "state": state, "model": entry.model, "task": str(entry.task),
                "aliases": [entry.model], "owned": True, "pinned": pool.pinned(alias),
                "preload": entry.preload, "in_flight": 0,
                "waiting": pool.waiting.get(alias, 0), "phase": None, "progress": None,
                "elapsed_s": None, "expected_s": pool.history.expected(alias),
                "idle_stop_in": None, "ttl": pool._ttl_for(alias), "load": None,
                "gpus": self.server_gpus.get(alias, []), "failure": None}
            progress = pool.progress.get(alias)
            if state == STARTING and progress is not None:
                row.update(progress.to_json(now))
            if failure is not None:
                row["failure"] = {"message": failure.message, "hint": failure.hint,
                                  "failures": failure.failures,
                                  "retry_in": failure.retry_after(now)}
            rows.append(row)
        return rows

    def _backend_row(self, backend: Backend, now: float) -> dict[str, Any]:
        pool = self.pool
        pinned = pool.pinned(backend.name)
        managed = backend.owned or self.settings.adopt
        idle_stop_in = None
        if managed and not pinned and backend.ttl > 0 and backend.state == READY \
                and not backend.in_flight:
            idle_stop_in = round(max(0.0, backend.ttl - (now - backend.last_used)), 1)
        entry = pool.entries.get(backend.name)
        load = self.loads.get(backend.name)
        return {
            "name": backend.name, "state": backend.state,
            "model": entry.model if entry is not None else
            (backend.names[0] if backend.names else backend.name),
            "task": str(entry.task) if entry is not None else None,
            "aliases": [n for n in backend.names if n != backend.name],
            "owned": backend.owned, "pinned": pinned,
            "preload": bool(entry.preload) if entry is not None else False,
            "in_flight": backend.in_flight, "waiting": pool.waiting.get(backend.name, 0),
            "phase": None, "progress": None, "elapsed_s": None,
            "expected_s": pool.history.expected(backend.name),
            "idle_s": round(now - backend.last_used, 1) if not backend.in_flight else 0.0,
            "idle_stop_in": idle_stop_in, "ttl": backend.ttl,
            "url": backend.base_url, "pid": backend.pid,
            "load": load.to_json() if load is not None else None,
            "gpus": self.server_gpus.get(backend.name, []), "failure": None,
        }

    def state(self) -> dict[str, Any]:
        """``GET /api/state``."""
        settings = self.settings
        return {"gateway": {"name": settings.name, "idle_timeout": settings.idle_timeout,
                            "adopt": settings.adopt, "admin_key": bool(settings.admin_keys)},
                "models": self.models(), "gpus": self.gpus, "time": time.time()}

    # ------------------------------------------------------------------ monitor

    async def run(self) -> None:
        """Publish state changes, log lines and load samples while anyone watches."""
        while True:
            await asyncio.sleep(TICK_S)
            try:
                await self.tick()
            except Exception as exc:  # one bad round must not end the dashboard's feed
                from cmw_vllm.gateway.edge import where

                logger.error("dashboard monitor round failed: %s", where(exc))

    async def tick(self) -> None:
        """One round of the monitor."""
        now = time.monotonic()
        await self._record_pins()
        if not self.watching(now):
            return
        if now - self._sampled_at >= SAMPLE_S:
            self._sampled_at = now
            await self.sample()
        self.publish_state()
        if self.hub.subscribers:
            await self.follow_logs()

    def publish_state(self, force: bool = False) -> None:
        """Send the state when it changed (the countdowns alone don't count)."""
        models = self.models()
        steady = [{k: v for k, v in m.items() if k not in ("idle_s", "idle_stop_in",
                                                           "elapsed_s", "load")}
                  for m in models]
        digest = json.dumps([steady, self.gpus], sort_keys=True, default=str)
        if force or digest != self._last_state:
            self._last_state = digest
            self.hub.publish("state", self.state())

    async def sample(self) -> None:
        """Scrape the ready servers' load and ask NVML about the GPUs; publish samples."""
        ready = [b for b in self.pool.backends.values() if b.state == READY]
        results = await asyncio.gather(
            *(asyncio.to_thread(_scrape, b.base_url, b.names[0] if b.names else b.name)
              for b in ready), return_exceptions=True)
        for backend, snap in zip(ready, results, strict=True):
            if isinstance(snap, BaseException):
                continue
            load = self.loads.setdefault(backend.name, Load())
            load.add(snap.at, snap.requests_running, snap.requests_waiting,
                     snap.kv_cache_usage, snap.generation_tokens)
            self.hub.publish("sample", {"name": backend.name, **load.to_json()})
        for name in list(self.loads):
            if name not in self.pool.backends:
                del self.loads[name]
        try:
            report = await asyncio.to_thread(_query_gpus)
            self.gpus, self.server_gpus = _gpu_view(report)
        except Exception as exc:  # NVML misbehaving is a state, not a crash
            self.gpus = {"available": False, "reason": f"GPU query failed: {exc}",
                         "devices": []}

    async def follow_logs(self) -> None:
        """Publish the new lines of the logs of the servers and the starts in progress."""
        from cmw_vllm.server_record import log_path

        names = set(self.pool.backends) | set(self.pool._starts)
        for name in list(self._log_offsets):
            if name not in names:
                del self._log_offsets[name]
        for name in sorted(names):
            lines = await asyncio.to_thread(self._new_lines, name, log_path(name))
            if lines:
                self.hub.publish("log", {"name": name, "lines": lines})

    def _new_lines(self, name: str, path: Path) -> list[str]:
        try:
            with path.open("rb") as fh:
                size = fh.seek(0, 2)
                offset = self._log_offsets.get(name)
                if offset is None or offset > size:  # first sight, or rotated
                    offset = size if offset is None else 0
                fh.seek(offset)
                data = fh.read(LOG_CHUNK)
        except OSError:
            return []
        end = data.rfind(b"\n")
        if end < 0:
            if len(data) < LOG_CHUNK:
                self._log_offsets[name] = offset
                return []
            end = len(data) - 1
        self._log_offsets[name] = offset + end + 1
        text = data[:end + 1].decode("utf-8", errors="replace")
        return [line[:2000] for line in text.splitlines()][-MAX_LOG_LINES:]

    async def _record_pins(self) -> None:
        pins = sorted(n for n in {*self.pool.pins, *self.pool.entries, *self.pool.backends}
                      if self.pool.pinned(n))
        if pins != self._recorded_pins:
            self._recorded_pins = pins
            with contextlib.suppress(CmwVllmError, OSError):
                await asyncio.to_thread(record_pins, self.settings, pins)

    def spawn(self, coro: Any) -> None:
        """Run ``coro`` in the background (kept until done)."""
        task = asyncio.ensure_future(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    # ------------------------------------------------------------------ actions

    async def load(self, name: str) -> None:
        """Start model ``name`` (single-flight with requests for it); logs a failure (the
        state shows it)."""
        try:
            backend = await self.pool.acquire(name)
        except Refusal as refusal:
            logger.warning("loading %s from the dashboard: %s", name, refusal.message)
            return
        except CmwVllmError as exc:
            logger.warning("loading %s from the dashboard failed: %s", name, exc.message)
            return
        self.pool.release(backend)

    async def preload(self) -> None:
        """Start the entries marked ``preload`` (the app's start-up scanned the servers and
        read the entries already)."""
        for alias, entry in sorted(self.pool.entries.items()):
            if entry.preload and alias not in self.pool.by_model:
                logger.info("preloading %s", alias)
                self.spawn(self.load(alias))


# ----------------------------------------------------------------------------- handlers


def _control(request: web.Request) -> Control:
    return request.app[CONTROL_KEY]


def _admin(request: web.Request, *, changes: bool = False) -> web.Response | None:
    """None when the caller may go on, else the refusal."""
    control = _control(request)
    refused, by_cookie = check_access(request, control.settings)
    if refused is not None:
        return refused
    if changes and not same_origin(request, by_cookie):
        return _error(403, "cross-site requests may not change the gateway (Origin is not "
                      "the gateway's own)", "PermissionDeniedError")
    return None


async def session(request: web.Request) -> web.Response:
    """``GET /api/session``: whether the caller has access (200 either way, no data), so
    that the page asks for the key without an error in the browser's console."""
    control = _control(request)
    refused, _ = check_access(request, control.settings)
    if refused is not None:
        body = json.loads(refused.body)  # type: ignore[arg-type]
        return _ok({"access": False, "login": bool(control.settings.admin_keys),
                    "message": body["error"]["message"], "hint": body["error"].get("hint")})
    return _ok({"access": True, "login": bool(control.settings.admin_keys)})


async def state(request: web.Request) -> web.Response:
    """``GET /api/state``."""
    refused = _admin(request)
    if refused is not None:
        return refused
    control = _control(request)
    now = time.monotonic()
    first = not control.watching(now)
    control.watched_until = now + WATCH_S
    if first:
        control._sampled_at = 0.0  # sample at the monitor's next round
    return _ok(control.state())


async def events(request: web.Request) -> web.StreamResponse:
    """``GET /api/events``: the state at once, then every change, until the client goes."""
    refused = _admin(request)
    if refused is not None:
        return refused
    control = _control(request)
    if control.hub.closed:
        return _error(503, "the gateway is shutting down", "ServiceUnavailableError")
    response = web.StreamResponse(headers={"Content-Type": "text/event-stream",
                                           "Cache-Control": "no-store",
                                           "X-Accel-Buffering": "no"})
    await response.prepare(request)
    queue = control.hub.subscribe()
    try:
        await response.write(b"retry: 1000\n\n" + control.hub.frame("state", control.state()))
        while True:
            try:
                item = await asyncio.wait_for(queue.get(), KEEPALIVE_S)
            except TimeoutError:
                await response.write(b": keep-alive\n\n")
                continue
            if item is None:
                break
            await response.write(item)
        await response.write_eof()
    except ConnectionError:
        pass  # the client went away
    finally:
        control.hub.unsubscribe(queue)
    return response


def _known(control: Control, name: str) -> bool:
    pool = control.pool
    return name in pool.backends or name in pool.entries or name in pool.by_model


async def _target(request: web.Request) -> tuple[Control, str] | web.Response:
    refused = _admin(request, changes=request.method == "POST")
    if refused is not None:
        return refused
    control = _control(request)
    name = request.match_info["name"]
    if not _known(control, name):
        with contextlib.suppress(CmwVllmError):
            await control.pool.refresh()
        if not _known(control, name):
            return _error(404, f"no model or server named {name[:100]!r}", "NotFoundError")
    return control, name


async def load(request: web.Request) -> web.Response:
    """``POST /api/models/NAME/load``: start it (202), or 200 when it serves already."""
    target = await _target(request)
    if isinstance(target, web.Response):
        return target
    control, name = target
    backend = control.pool.by_model.get(name)
    if backend is not None and backend.state == READY:
        return _ok({"name": backend.name, "state": backend.state})
    control.spawn(control.load(name))
    await asyncio.sleep(0)  # the start is registered before the answer
    control.publish_state()
    return _ok({"name": name, "state": STARTING}, status=202)


async def unload(request: web.Request) -> web.Response:
    """``POST /api/models/NAME/unload``: drain and stop it (202)."""
    target = await _target(request)
    if isinstance(target, web.Response):
        return target
    control, name = target
    pool = control.pool
    backend = pool.by_model.get(name) or pool.backends.get(name)
    if backend is None:
        if name in pool._starts:
            return _error(409, f"{name!r} is starting; unload it once it serves",
                          "ConflictError")
        return _error(409, f"{name!r} is not running", "ConflictError")
    if not (backend.owned or control.settings.adopt):
        return _error(409, f"server {backend.name!r} was not started by this gateway",
                      "ConflictError", hint=f"cmw-vllm stop {backend.name}, or run the "
                      "gateway with --adopt")
    if backend.state not in (DRAINING, STOPPING):
        control.spawn(pool.stop_backend(backend, "unload"))
        await asyncio.sleep(0)
    control.publish_state()
    return _ok({"name": backend.name, "state": backend.state}, status=202)


async def pin(request: web.Request) -> web.Response:
    """``POST /api/models/NAME/pin`` with ``{"pinned": true|false}``."""
    target = await _target(request)
    if isinstance(target, web.Response):
        return target
    control, name = target
    try:
        body = await request.json()
    except ValueError:
        body = None
    pinned = body.get("pinned") if isinstance(body, dict) else None
    if not isinstance(pinned, bool):
        return _error(400, 'the body must be {"pinned": true} or {"pinned": false}',
                      "BadRequestError")
    backend = control.pool.by_model.get(name)
    key = backend.name if backend is not None else name
    control.pool.pins[key] = pinned
    logger.info("%s %s from the dashboard", "pinned" if pinned else "unpinned", key)
    control.publish_state()
    await control._record_pins()
    return _ok({"name": key, "pinned": pinned})


async def logs(request: web.Request) -> web.Response:
    """``GET /api/models/NAME/logs?n=``: the last N (default 200, at most 2000) lines."""
    target = await _target(request)
    if isinstance(target, web.Response):
        return target
    control, name = target
    from cmw_vllm.server_record import log_path
    from cmw_vllm.vllm_engine import tail_lines

    raw = request.query.get("n", "200")
    if not raw.isdigit() or not 0 < int(raw) <= MAX_LOG_LINES:
        return _error(400, f"n must be a whole number from 1 to {MAX_LOG_LINES}",
                      "BadRequestError")
    backend = control.pool.by_model.get(name)
    server = backend.name if backend is not None else name
    lines = await asyncio.to_thread(tail_lines, log_path(server), int(raw), 1 << 20)
    return _ok({"name": server, "lines": lines})


async def login(request: web.Request) -> web.Response:
    """``POST /api/login``: the admin key (JSON ``{"key"}`` or a form field ``key``) for a
    session cookie; a form post is sent back to the page."""
    control = _control(request)
    if not same_origin(request, by_cookie=True):
        return _error(403, "log in from the gateway's own page", "PermissionDeniedError")
    is_form = request.content_type in ("application/x-www-form-urlencoded",
                                       "multipart/form-data")
    key = ""
    with contextlib.suppress(ValueError, UnicodeDecodeError):
        if is_form:
            key = str((await request.post()).get("key", ""))
        else:
            body = await request.json()
            key = str(body.get("key", "")) if isinstance(body, dict) else ""
    keys = control.settings.admin_keys
    if not keys:
        return _error(409, "this gateway has no admin key: there is nothing to log in with",
                      "ConflictError")
    key = key.strip()
    if not key or not key_matches(key, keys):
        logger.warning("dashboard login refused from %s", request.remote)
        if key and control.settings.api_keys and key_matches(key, control.settings.api_keys):
            return _error(403, "an inference API key cannot log in to the dashboard",
                          "PermissionDeniedError", hint="use the gateway's admin key")
        return _error(401, "wrong admin key", "AuthenticationError")
    response: web.Response = web.HTTPSeeOther("/ui/") if is_form else _ok({"ok": True})
    response.set_cookie(COOKIE, session_value(key), max_age=SESSION_S, path="/",
                        httponly=True, samesite="Strict", secure=request.secure)
    return response


async def logout(request: web.Request) -> web.Response:
    """``POST /api/logout``: the session cookie is removed."""
    if not same_origin(request, by_cookie=True):
        return _error(403, "log out from the gateway's own page", "PermissionDeniedError")
    response = _ok({"ok": True})
    response.del_cookie(COOKIE, path="/")
    return response


_ui_cache: dict[str, bytes] = {}


def ui_file(name: str) -> bytes:
    """A file of the page (package data, read once)."""
    data = _ui_cache.get(name)
    if data is None:
        data = resources.files("cmw_vllm.gateway").joinpath("ui", name).read_bytes()
        _ui_cache[name] = data
    return data


async def ui(request: web.Request) -> web.StreamResponse:
    """The page's static files (``/ui/`` is ``index.html``)."""
    name = request.match_info.get("file") or "index.html"
    kind = UI_FILES.get(name)
    if kind is None:
        return _error(404, f"GET {request.path[:200]} is not served by the gateway",
                      "NotFoundError")
    return web.Response(body=ui_file(name), content_type=kind,
                        charset="utf-8" if kind.startswith("text/") else None,
                        headers={"Content-Security-Policy": CSP, "X-Frame-Options": "DENY",
                                 "X-Content-Type-Options": "nosniff",
                                 "Referrer-Policy": "no-referrer", "Cache-Control": "no-cache"})


async def ui_redirect(request: web.Request) -> web.Response:
    """``/ui`` -> ``/ui/``."""
    raise web.HTTPPermanentRedirect("/ui/")


def is_control_path(path: str) -> bool:
    """Paths with access rules of their own (the admin key, not the inference keys)."""
    return path.startswith(API_PREFIX) or path == UI_PREFIX or path.startswith("/ui/")


def install(app: web.Application, settings: GatewaySettings, pool: Pool) -> Control:
    """Add the dashboard's routes to ``app`` (before any catch-all route) and its monitor,
    preload and shutdown to the app's life."""
    control = Control(settings, pool)
    app[CONTROL_KEY] = control
    add = app.router.add_route
    add("GET", "/api/session", session)
    add("GET", "/api/state", state)
    add("GET", "/api/events", events)
    add("POST", "/api/models/{name}/load", load)
    add("POST", "/api/models/{name}/unload", unload)
    add("POST", "/api/models/{name}/pin", pin)
    add("GET", "/api/models/{name}/logs", logs)
    add("POST", "/api/login", login)
    add("POST", "/api/logout", logout)
    add("GET", "/ui", ui_redirect)
    add("GET", "/ui/", ui)
    add("GET", "/ui/{file}", ui)

    async def on_startup(app: web.Application) -> None:
        control.spawn(control.run())
        control.spawn(control.preload())

    async def on_shutdown(app: web.Application) -> None:
        control.hub.close()
        for task in list(control._tasks):
            task.cancel()

    app.on_startup.append(on_startup)
    app.on_shutdown.insert(0, on_shutdown)
    return control
