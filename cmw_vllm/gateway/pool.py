"""The servers behind the gateway: routing table, single-flight starts, idle stop, eviction.

Everything here runs on the gateway's event loop; the blocking work (reading records,
starting and stopping servers through :class:`~cmw_vllm.server_manager.ServerManager`,
the memory preflight) runs in worker threads. Because state only changes on the loop, a
check and the change it gates happen together: a server is marked ``stopping`` in the same
step that finds it idle, so no request can slip in between (llama-swap #946), and a request
that meets a stopping server waits for the stop to end and then starts the model again.

Health probes run in threads of their own, each with a total deadline of its own: a stall of
the event loop (a slow request, a busy CPU) delays their answers but never turns them into
timeouts; a probe that fails while the loop was blocked anyway does not count, and a
server is marked unhealthy only after several failed probes in a row.
A server's record names the gateway that started it, so a gateway started again under the
same name (after a crash) takes back the servers it had started.
"""

from __future__ import annotations

import asyncio
import logging
import os
import time
from collections import defaultdict
from collections.abc import Awaitable, Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any
from urllib.parse import urlsplit

from cmw_vllm.errors import (
    CmwVllmError,
    ConflictError,
    InsufficientResourcesError,
)
from cmw_vllm.errors import GatewayRefusal as Refusal
from cmw_vllm.gateway.backoff import StartBackoff, hide_paths
from cmw_vllm.gateway.history import StartHistory, StartProgress
from cmw_vllm.gateway.metrics import Metrics
from cmw_vllm.gateway.settings import GatewaySettings
from cmw_vllm.vocab import GATEWAY_TASK

if TYPE_CHECKING:
    from cmw_vllm.model_registry import AdapterEntry, ModelEntry
    from cmw_vllm.server_config import ServerConfig
    from cmw_vllm.server_manager import ServerManager

logger = logging.getLogger(__name__)

# Backend states.
READY = "running"
STARTING = "starting"
DRAINING = "draining"  # no new requests; stopped once the last one ends
STOPPING = "stopping"
UNHEALTHY = "unhealthy"
STARTABLE = "startable"  # an entry with no server (``/v1/models`` only)

PROBE_TIMEOUT = 3.0  # seconds one health probe may take in all
UNHEALTHY_AFTER = 3  # failed health probes in a row that make a ready server unhealthy
PROBE_THREADS = 4
LAG_TICK = 0.25  # seconds between the loop-lag watcher's wake-ups during a health round
STALL_EXCUSE = 1.0  # a loop stall this long during a round: its failed probes don't count


@dataclass(eq=False)
class Backend:
    """One managed server the gateway can send requests to."""

    name: str
    base_url: str
    names: tuple[str, ...]
    owned: bool
    pid: int
    ttl: float
    state: str = READY
    in_flight: int = 0
    failed_probes: int = 0  # failed health probes in a row
    last_used: float = field(default_factory=time.monotonic)
    idle: asyncio.Event = field(default_factory=asyncio.Event)
    gone: asyncio.Event = field(default_factory=asyncio.Event)
    # LoRA: adapters loaded (name -> last used), requests in flight per adapter, slots.
    max_loras: int = 0  # 0: LoRA is off on this server
    max_lora_rank: int = 0
    runtime_lora: bool = False  # adapters may be loaded while it runs
    loras: dict[str, float] = field(default_factory=dict)
    lora_in_flight: dict[str, int] = field(default_factory=dict)
    loras_synced: bool = False  # ``loras`` was read off the server since it (re)started
    lora_lock: asyncio.Lock = field(default_factory=asyncio.Lock)
    lora_freed: asyncio.Event = field(default_factory=asyncio.Event)
    address: tuple[str, int, bool] = field(init=False)  # base_url's host, port, https

    def __post_init__(self) -> None:
        self.idle.set()
        url = urlsplit(self.base_url)
        tls = url.scheme == "https"
        self.address = (url.hostname or "127.0.0.1", url.port or (443 if tls else 80), tls)


@dataclass
class Scanned:
    """A running server as its record tells it (read in a worker thread)."""

    name: str
    base_url: str
    names: tuple[str, ...]
    pid: int
    state: str = READY
    started_by: str | None = None
    max_loras: int = 0
    runtime_lora: bool = False
    max_lora_rank: int = 0


FitCheck = Callable[["ServerConfig"], Any]
# (config, servers the gateway may evict, least recently used first) -> a RoomPlan (where
# it goes, whom to evict) or None without GPUs; raises InsufficientResourcesError.
Planner = Callable[["ServerConfig", list[str]], Any]
Probe = Callable[[str], Awaitable[bool]]


def _served_names(record: Any) -> tuple[str, ...]:
    from pydantic import ValidationError

    from cmw_vllm.server_config import ServerConfig

    try:
        return tuple(ServerConfig(**record.config).served_names())
    except (ValidationError, TypeError):
        return (record.served_model_name,)


def _lora_of(record: Any) -> tuple[int, bool, int]:
    """(LoRA slots, runtime loading on, largest rank) of a server's record; zeros without
    LoRA."""
    from pydantic import ValidationError

    from cmw_vllm.server_config import ServerConfig

    try:
        config = ServerConfig(**record.config)
    except (ValidationError, TypeError):
        return 0, False, 0
    if config.lora is None:
        return 0, False, 0
    return config.lora.max_loras, config.runtime_lora, config.lora.max_rank


def scan_servers(manager: ServerManager) -> list[Scanned]:
    """Every managed vLLM server whose process is alive (gateways left out)."""
    from cmw_vllm.vocab import State

    out = []
    for status in manager.list_status(check_health=False):
        rec = status.record
        if not status.running or rec is None or rec.task == GATEWAY_TASK:
            continue
        if status.state == State.JOINED:
            continue  # a follower node: no HTTP of its own
        # A stop began (someone ran `cmw-vllm stop`), or the supervisor is relaunching it.
        state = {State.DRAINING: DRAINING, State.RESTARTING: UNHEALTHY}.get(status.state, READY)
        out.append(Scanned(rec.name, rec.base_url, _served_names(rec), rec.pid, state,
                           rec.started_by, *_lora_of(rec)))
    return out


def upstream_servers(upstreams: tuple[str, ...]) -> list[Scanned]:
    """The fixed servers of ``--upstream`` (no process of ours: pid 0)."""
    from cmw_vllm.gateway.settings import parse_upstream

    out = []
    for text in upstreams:
        name, url, names = parse_upstream(text)
        out.append(Scanned(name, url, names, 0))
    return out


class LoopLag:
    """The longest the event loop was blocked while it ran (a watcher wakes every
    :data:`LAG_TICK` seconds and measures how late it woke)."""

    def __init__(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._last = self._loop.time()
        self.worst = 0.0
        self._task = self._loop.create_task(self._watch())

    async def _watch(self) -> None:
        while True:
            await asyncio.sleep(LAG_TICK)
            now = self._loop.time()
            self.worst = max(self.worst, now - self._last - LAG_TICK)
            self._last = now

    def stop(self) -> float:
        """Stop watching; the worst lag, counting a stall the watcher has not woken from."""
        self._task.cancel()
        return max(self.worst, self._loop.time() - self._last - LAG_TICK)


_probe_executor: ThreadPoolExecutor | None = None


def _probe_threads() -> ThreadPoolExecutor:
    global _probe_executor
    if _probe_executor is None:
        _probe_executor = ThreadPoolExecutor(PROBE_THREADS, thread_name_prefix="cmw-health")
    return _probe_executor


async def probe_in_thread(base_url: str) -> bool:
    """True when ``base_url``'s ``/health`` answers 200 within :data:`PROBE_TIMEOUT`.

    The probe runs in a thread with a deadline of its own (blocking sockets, no event-loop
    timer), so time the gateway's loop spends blocked does not count against the server.
    """
    from cmw_vllm.health_check import probe_health

    loop = asyncio.get_running_loop()
    status = await loop.run_in_executor(_probe_threads(), probe_health, base_url,
                                        PROBE_TIMEOUT)
    return status == 200


def default_fit_check(config: ServerConfig) -> Any:
    """The preflight ``start`` runs: raises InsufficientResourcesError when it won't fit."""
    from cmw_vllm.memory_check import preflight

    return preflight(config)


def default_planner(config: ServerConfig, evictable: list[str]) -> Any:
    """Placement with per-GPU eviction (:func:`cmw_vllm.placement.plan_room`)."""
    from cmw_vllm.placement import plan_room

    return plan_room(config, evictable)


class Pool:
    """The gateway's view of the servers, and what it does to them.

    Args:
        settings: The gateway's settings.
        metrics: Where to count starts, stops, evictions.
        manager: Starts and stops servers (default: a new ServerManager).
        fit_check: Raises InsufficientResourcesError when a config cannot fit now; given,
            it replaces the placement (eviction then ignores which GPUs servers use).
        planner: Where a server goes and whom to evict for it (default
            :func:`default_planner`); without GPUs the preflight decides.
        probe: ``await probe(base_url)`` is True when the server's ``/health`` answers 200
            (default: :func:`probe_in_thread`).
    """

    def __init__(self, settings: GatewaySettings, metrics: Metrics, *,
                 manager: ServerManager | None = None, fit_check: FitCheck | None = None,
                 probe: Probe | None = None, planner: Planner | None = None) -> None:
        if manager is None:
            from cmw_vllm.server_manager import ServerManager

            manager = ServerManager()
        self.settings = settings
        self.metrics = metrics
        self.manager = manager
        self.fit_check = fit_check
        self.planner: Planner = planner or default_planner
        self.probe: Probe = probe or probe_in_thread
        self.backoff = StartBackoff(settings.start_backoff)
        self.backends: dict[str, Backend] = {}
        self.by_model: dict[str, Backend] = {}
        self.entries: dict[str, ModelEntry] = {}
        self.adapters: dict[str, AdapterEntry] = {}
        self.waiting: dict[str, int] = defaultdict(int)
        self._starts: dict[str, asyncio.Task[Backend]] = {}
        self._launch_lock = asyncio.Lock()
        self._tasks: set[asyncio.Task[Any]] = set()
        self._entries_mtime: float | None = -1.0
        self._forgotten: dict[str, float] = {}
        self._closing = False
        self.pins: dict[str, bool] = {}  # set at run time; else the entry's ``pin``
        self.history = StartHistory()
        self.progress: dict[str, StartProgress] = {}  # models starting now

    def pinned(self, name: str) -> bool:
        """Whether server or entry ``name`` is pinned: never idle-stopped nor evicted."""
        if name in self.pins:
            return self.pins[name]
        return bool(getattr(self.entries.get(name), "pin", False))

    # ----------------------------------------------------------------- routing table

    def _reindex(self) -> None:
        by_model: dict[str, Backend] = {}
        for backend in self.backends.values():
            for served in backend.names:
                by_model.setdefault(served, backend)
        self.by_model = by_model

    async def refresh(self) -> None:
        """Re-read the records: add servers started elsewhere, drop those that are gone."""
        scan_began = time.monotonic()
        if self.settings.upstreams:  # fixed servers: no records, nothing to start
            scanned = upstream_servers(self.settings.upstreams)
        else:
            scanned = await asyncio.to_thread(scan_servers, self.manager)
            await self._reload_entries()
        seen = set()
        for item in scanned:
            seen.add(item.name)
            known = self.backends.get(item.name)
            if known is not None and item.state == DRAINING and known.state in (READY,
                                                                              UNHEALTHY):
                known.state = DRAINING  # stopped by someone else: no new requests
                logger.info("server %s is draining", item.name)
            if item.name in self._starts or known is not None:
                continue
            if self._forgotten.get(item.name, -1.0) >= scan_began:
                continue  # stopped while the scan ran: its record was read before that
            state = item.state
            if state == READY and not await self.probe(item.base_url):
                state = UNHEALTHY
            owned = item.started_by == self.settings.name
            backend = Backend(item.name, item.base_url, item.names, owned=owned,
                              pid=item.pid, ttl=self._ttl_for(item.name), state=state,
                              max_loras=item.max_loras, runtime_lora=item.runtime_lora,
                              max_lora_rank=item.max_lora_rank)
            self.backends[item.name] = backend
            logger.info("found server %s at %s (%s%s)", item.name, item.base_url,
                        backend.state, ", started by this gateway" if owned else "")
        for name, backend in list(self.backends.items()):
            gone_by_itself = backend.state in (READY, UNHEALTHY) or (
                backend.state == DRAINING and not backend.owned)
            if name not in seen and gone_by_itself and name not in self._starts:
                logger.info("server %s is gone", name)
                self._forget(backend)
        self._reindex()

    async def _reload_entries(self) -> None:
        """Re-read the registry when the models file changed."""
        from cmw_vllm import paths

        try:
            mtime: float | None = paths.user_models_file().stat().st_mtime
        except OSError:
            mtime = None
        if mtime == self._entries_mtime:
            return
        from cmw_vllm.model_registry import all_adapters, all_entries

        try:
            self.entries = await asyncio.to_thread(all_entries)
        except CmwVllmError as exc:
            logger.error("models file ignored: %s", exc.message)
            return
        try:
            self.adapters = await asyncio.to_thread(all_adapters, self.entries)
        except CmwVllmError as exc:
            logger.error("adapters of the models file ignored: %s", exc.message)
            self.adapters = {}
        self._entries_mtime = mtime

    def _forget(self, backend: Backend) -> None:
        if self.backends.get(backend.name) is backend:
            del self.backends[backend.name]
        self._forgotten[backend.name] = time.monotonic()
        backend.gone.set()
        self._reindex()

    def adapter_for(self, model: str) -> AdapterEntry | None:
        """The declared LoRA adapter a request's ``model`` names, if any."""
        adapter = self.adapters.get(model)
        if adapter is not None:
            return adapter
        lowered = model.lower()
        return next((a for a in self.adapters.values() if a.name.lower() == lowered), None)

    def entry_for(self, model: str) -> ModelEntry | None:
        """The registry or models-file entry a request's ``model`` names (alias or id)."""
        entry = self.entries.get(model)
        if entry is not None:
            return entry
        for candidate in self.entries.values():
            if candidate.model == model:
                return candidate
        return None

    def _ttl_for(self, name: str) -> float:
        entry = self.entries.get(name)
        ttl = getattr(entry, "idle_timeout", None) if entry is not None else None
        return float(ttl) if ttl is not None else self.settings.idle_timeout

    def sole_backend(self) -> Backend | None:
        """The only server, for requests that name no model (None when not exactly one)."""
        live = [b for b in self.backends.values() if b.state == READY]
        return live[0] if len(live) == 1 else None

    # ----------------------------------------------------------------- requests

    def acquire_ready(self, model: str) -> Backend | None:
        """The server of ``model`` counted in flight when it is ready now, else None (it
        must be started, is unhealthy or draining, or ``model`` is an adapter: see
        :meth:`acquire`)."""
        backend = self.by_model.get(model)
        if backend is None or backend.state != READY:
            return None
        backend.in_flight += 1
        backend.idle.clear()
        return backend

    async def acquire(self, model: str) -> Backend:
        """A ready server for ``model``, counted in flight; start it first when needed.

        Raises:
            Refusal: Unknown model (404), queue full (429), start failed or too slow,
                server unhealthy (503).
        """
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.settings.start_timeout
        if model not in self.by_model and not self.settings.upstreams:
            adapter = self.adapter_for(model)
            if adapter is None:  # declared since? (one stat when the file is unchanged)
                await self._reload_entries()
                adapter = self.adapter_for(model)
            if adapter is not None and model not in self.by_model:
                return await self._acquire_adapter(adapter, deadline)
        refreshed = False
        while True:
            ready = self.acquire_ready(model)
            if ready is not None:
                return ready
            backend = self.by_model.get(model)
            if backend is not None:
                if backend.state == UNHEALTHY:
                    raise Refusal(503, f"server {backend.name!r} is unhealthy", retry_after=5)
                # Draining or stopping: wait until it is gone, then start it again.
                await self._wait(backend.gone.wait(), deadline, model)
                continue
            entry = self.entry_for(model)
            if entry is None:
                if not refreshed:
                    refreshed = True
                    await self.refresh()
                    continue
                raise Refusal(404, f"The model `{model}` does not exist.", "NotFoundError")
            await self._join_start(entry, deadline, model)

    async def _acquire_adapter(self, adapter: AdapterEntry, deadline: float) -> Backend:
        """The base server of ``adapter`` (started if needed) with the adapter loaded,
        counted in flight for the server and for the adapter."""
        backend = await self.acquire(adapter.base)
        try:
            await self._wait(self._ensure_adapter(backend, adapter, deadline), deadline,
                             adapter.name)
        except BaseException:
            self.release(backend)
            raise
        backend.lora_in_flight[adapter.name] = backend.lora_in_flight.get(adapter.name, 0) + 1
        backend.loras[adapter.name] = time.monotonic()
        return backend

    async def _ensure_adapter(self, backend: Backend, adapter: AdapterEntry,
                              deadline: float) -> None:
        """Load ``adapter`` into ``backend`` unless it is there; free a slot first by
        unloading the least recently used adapter with no request in flight.

        Raises:
            Refusal: The server cannot load adapters while it runs, the adapter does not
                fit, or vLLM refused it (503).
        """
        from cmw_vllm.errors import ServerRequestError
        from cmw_vllm.lora_adapters import load_adapter, loaded_adapters, unload_adapter

        key = self.settings.upstream_key
        async with backend.lora_lock:
            if not backend.loras_synced:
                try:
                    now = await asyncio.to_thread(loaded_adapters, backend.base_url, key,
                                                  PROBE_TIMEOUT)
                except ServerRequestError as exc:
                    raise Refusal(503, f"server {backend.name!r}: {exc.message}",
                                  retry_after=5) from None
                backend.loras = {name: backend.loras.get(name, 0.0) for name in now}
                backend.loras_synced = True
            if adapter.name in backend.loras:
                return
            if not backend.runtime_lora:
                raise Refusal(503, f"adapter `{adapter.name}` is not loaded on "
                              f"{backend.name!r}, which cannot load adapters while it runs",
                              "ServiceUnavailableError",
                              hint=f"restart it to load its declared adapters: "
                              f"cmw-vllm restart {backend.name}")
            path, rank = await asyncio.to_thread(self._adapter_path, adapter)
            if rank > backend.max_lora_rank:
                raise Refusal(503, f"adapter `{adapter.name}` has rank {rank}, over the "
                              f"{backend.max_lora_rank} that {backend.name!r} was started "
                              "with", "ServiceUnavailableError",
                              hint=f"restart it to size it for its declared adapters: "
                              f"cmw-vllm restart {backend.name}")
            while len(backend.loras) >= max(backend.max_loras, 1):
                idle = [n for n in backend.loras if not backend.lora_in_flight.get(n)]
                if not idle:  # every slot serves a request: wait for one to end
                    backend.lora_freed.clear()
                    await backend.lora_freed.wait()
                    continue
                victim = min(idle, key=lambda n: backend.loras[n])
                try:
                    await asyncio.to_thread(unload_adapter, backend.base_url, victim, key)
                except ServerRequestError as exc:
                    logger.warning("unloading %s from %s failed: %s", victim, backend.name,
                                   exc.message)
                backend.loras.pop(victim, None)
                self.metrics.evictions[f"{backend.name}:{victim}"] += 1
                logger.info("unloaded adapter %s from %s (least recently used)", victim,
                            backend.name)
            begin = time.monotonic()
            try:
                await asyncio.to_thread(load_adapter, backend.base_url, adapter.name, path,
                                        key)
            except ServerRequestError as exc:
                raise Refusal(503, f"loading adapter `{adapter.name}` into "
                              f"{backend.name!r} failed: {hide_paths(exc.message)}",
                              "ServiceUnavailableError", retry_after=5) from None
            backend.loras[adapter.name] = time.monotonic()
            logger.info("loaded adapter %s into %s (%.2fs)", adapter.name, backend.name,
                        time.monotonic() - begin)

    def _adapter_path(self, adapter: AdapterEntry) -> tuple[str, int]:
        """The adapter's directory and rank, checked against its base (in a worker thread).

        Raises:
            Refusal: Missing or mismatched (503).
        """
        from cmw_vllm.lora_adapters import check_adapter

        entry = self.entries.get(adapter.base)
        if entry is None:
            raise Refusal(404, f"the base `{adapter.base}` of `{adapter.name}` is unknown",
                          "NotFoundError")
        try:
            info = check_adapter(adapter, entry)
        except CmwVllmError as exc:
            raise Refusal(503, hide_paths(exc.message), "ServiceUnavailableError",
                          hint=hide_paths(exc.hint)) from None
        return str(info.path), info.rank

    def release(self, backend: Backend, model: str | None = None) -> None:
        """A request ended: the idle clock of its server (and of its adapter) starts now."""
        if model is not None and model in backend.lora_in_flight:
            backend.lora_in_flight[model] -= 1
            if backend.lora_in_flight[model] <= 0:
                del backend.lora_in_flight[model]
                backend.lora_freed.set()
            if model in backend.loras:
                backend.loras[model] = time.monotonic()
        backend.in_flight -= 1
        backend.last_used = time.monotonic()
        if backend.in_flight <= 0:
            backend.in_flight = 0
            backend.idle.set()

    def mark_unhealthy(self, backend: Backend) -> None:
        """The server refused a connection: send it nothing until a health check passes."""
        if backend.state == READY:
            backend.state = UNHEALTHY
            logger.warning("server %s does not answer; marked unhealthy", backend.name)

    async def _wait(self, awaitable: Awaitable[Any], deadline: float, model: str) -> Any:
        remaining = deadline - asyncio.get_running_loop().time()
        try:
            return await asyncio.wait_for(awaitable, max(remaining, 0.001))
        except TimeoutError:
            self.metrics.rejected[(self.label_for(model), "start_timeout")] += 1
            raise Refusal(503, f"model `{model}` is not ready after "
                          f"{self.settings.start_timeout:g}s; it keeps starting",
                          retry_after=10) from None

    def label_for(self, model: str) -> str:
        """The metrics label of ``model``: its server's name, else ``unknown``."""
        backend = self.by_model.get(model)
        if backend is not None:
            return backend.name
        adapter = self.adapter_for(model)
        if adapter is not None:
            model = adapter.base
            backend = self.by_model.get(model)
            if backend is not None:
                return backend.name
        entry = self.entry_for(model)
        return entry.alias if entry is not None else "unknown"

    # ----------------------------------------------------------------- starts

    async def _join_start(self, entry: ModelEntry, deadline: float, model: str) -> None:
        name = entry.alias
        if self.waiting[name] >= self.settings.queue_limit:
            self.metrics.rejected[(name, "queue_full")] += 1
            raise Refusal(429, f"too many requests are waiting for `{model}` to start "
                          f"(limit {self.settings.queue_limit})", "RateLimitError",
                          retry_after=5)
        task = self._starts.get(name)
        if task is None:
            failure = self.backoff.blocked(name)
            if failure is not None:
                self.metrics.rejected[(name, "start_backoff")] += 1
                wait = failure.retry_after(time.monotonic())
                raise Refusal(503, f"starting `{model}` failed ({failure.failures} in a row; "
                              f"next try in {wait}s): {hide_paths(failure.message)}",
                              "ServerStartError", retry_after=wait,
                              hint=hide_paths(failure.hint))
            self.progress[name] = StartProgress(time.monotonic(), self.history.expected(name))
            task = asyncio.create_task(self._start(entry))
            self._starts[name] = task
            task.add_done_callback(lambda t: self._start_done(name, t))
        self.waiting[name] += 1
        try:
            await self._wait(asyncio.shield(task), deadline, model)
        except Refusal:
            raise
        except CmwVllmError as exc:
            failure = self.backoff.blocked(name)
            wait = failure.retry_after(time.monotonic()) if failure is not None else 1
            raise Refusal(503, f"starting `{model}` failed: {hide_paths(exc.message)}",
                          "ServerStartError", retry_after=wait,
                          hint=hide_paths(exc.hint)) from None
        finally:
            self.waiting[name] -= 1
            if not self.waiting[name]:
                del self.waiting[name]

    def _start_done(self, name: str, task: asyncio.Task[Backend]) -> None:
        if self._starts.get(name) is task:
            del self._starts[name]
            self.progress.pop(name, None)
        if task.cancelled():
            return
        exc = task.exception()
        if exc is None:
            self.backoff.succeeded(name)
            return
        self.metrics.start_failures[name] += 1
        if isinstance(exc, CmwVllmError):
            message, hint = exc.message, exc.hint
        else:
            message, hint = f"internal error ({type(exc).__name__}; see the gateway's log)", None
        failure = self.backoff.failed(name, message, hint)
        logger.error("starting %s on demand failed: %s%s (%d in a row; no new start for %.0fs)",
                     name, " ".join(message.split()), f"; {' '.join(hint.split())}" if hint else "",
                     failure.failures, failure.until - time.monotonic())

    @staticmethod
    def _config_for(entry: ModelEntry) -> ServerConfig:
        from cmw_vllm.lora_adapters import with_adapters
        from cmw_vllm.model_registry import resolve_target
        from cmw_vllm.server_config import resolve_server_config

        target = resolve_target(entry.alias)
        return resolve_server_config(target.model,
                                     entry_settings=with_adapters(target.entry, target.settings),
                                     environ=os.environ)

    async def _start(self, entry: ModelEntry) -> Backend:
        name = entry.alias
        config = await asyncio.to_thread(self._config_for, entry)
        async with self._launch_lock:
            if self._closing:
                raise ConflictError("the gateway is shutting down")
            logger.info("starting %s (%s) on demand", name, config.model)
            begin = time.monotonic()
            config, placed = await self._make_room(config)
            self.metrics.starts[name] += 1
            progress = self.progress.get(name) or StartProgress(begin)
            launched = time.monotonic()
            # A placed server is checked again as it starts, under the placement lock: a
            # start beside the gateway may have taken the room meanwhile.
            result = await asyncio.to_thread(
                self.manager.start, config, wait=True, auto_port=True, check_resources=placed,
                started_by=self.settings.name, on_progress=progress.seen)
            self.metrics.start_duration.observe(name, time.monotonic() - begin)
            if not result.already_running:
                await asyncio.to_thread(self.history.add, name, time.monotonic() - launched)
        record = result.record
        # A server that already ran is ours when this gateway (or an earlier run of it, under
        # the same name) started it.
        owned = not result.already_running or record.started_by == self.settings.name
        backend = Backend(name, record.base_url, tuple(config.served_names()),
                          owned=owned, pid=record.pid,
                          ttl=self._ttl_for(name),
                          max_loras=config.lora.max_loras if config.lora else 0,
                          runtime_lora=config.runtime_lora,
                          max_lora_rank=config.lora.max_rank if config.lora else 0)
        self.backends[name] = backend
        self._reindex()
        logger.info("%s is ready at %s (%.1fs)", name, record.base_url,
                    time.monotonic() - begin)
        return backend

    async def _make_room(self, config: ServerConfig) -> tuple[ServerConfig, bool]:
        """Find the GPUs for ``config``; evict idle servers the gateway started from those
        GPUs only (least recently used first) when it does not fit as things are, and wait
        for their memory to come back.

        A model that sets no share gets ``--gpu-memory-utilization auto``, so that small
        models share a GPU. Without GPUs (or with a ``fit_check`` given), servers are
        evicted, least recently used first, until the preflight says it fits.

        Returns:
            The config to start (its GPUs chosen) and whether it was placed on GPUs.

        Raises:
            InsufficientResourcesError: It does not fit and nothing is left to evict.
        """
        from cmw_vllm.vocab import AUTO

        if config.gpu_memory_utilization is None:
            config = config.model_copy(update={"gpu_memory_utilization": AUTO})
        if self.fit_check is None:
            plan = await asyncio.to_thread(self.planner, config, self._evictable(config.name))
            if plan is not None:
                placed = plan.placement.config
                for name in plan.victims:
                    victim = self.backends.get(name)
                    if victim is None:
                        continue
                    logger.info("%s does not fit on GPU %s; evicting %s", config.name,
                                placed.gpus, name)
                    self.metrics.evictions[name] += 1
                    await self.stop_backend(victim, "evict")
                if plan.victims and not await self._wait_fits(placed):
                    raise InsufficientResourcesError(
                        f"{config.name} does not fit on GPU {placed.gpus} yet: the memory of "
                        f"{', '.join(plan.victims)} did not come back within "
                        f"{self.settings.memory_wait:g}s")
                return placed, True
        while True:
            try:
                await asyncio.to_thread(self._fits, config)
                return config, False
            except InsufficientResourcesError:
                victim = self._pick_victim(exclude=config.name)
                if victim is None:
                    raise
            logger.info("%s does not fit; evicting %s", config.name, victim.name)
            self.metrics.evictions[victim.name] += 1
            await self.stop_backend(victim, "evict")
            if await self._wait_fits(config):
                return config, False

    def _fits(self, config: ServerConfig) -> None:
        """Raise InsufficientResourcesError when ``config`` does not fit now (on its GPUs,
        when they are chosen)."""
        if self.fit_check is not None:
            self.fit_check(config)
            return
        if config.gpus is not None:
            plan = self.planner(config, [])
            if plan is not None:
                return
        default_fit_check(config)

    async def _wait_fits(self, config: ServerConfig) -> bool:
        """Poll the fit check until it passes or ``memory_wait`` ends (memory comes back
        late on some drivers, after the processes are gone)."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.settings.memory_wait
        while True:
            try:
                await asyncio.to_thread(self._fits, config)
                return True
            except InsufficientResourcesError:
                if loop.time() >= deadline:
                    return False
            await asyncio.sleep(0.25)

    def _candidates(self, exclude: str) -> list[Backend]:
        """Servers the gateway may evict, idle ones first, then least recently used."""
        candidates = [b for b in self.backends.values()
                      if self._may_manage(b) and b.name != exclude
                      and b.state in (READY, UNHEALTHY) and not self.pinned(b.name)]
        return sorted(candidates, key=lambda b: (b.in_flight > 0, b.last_used))

    def _evictable(self, exclude: str) -> list[str]:
        return [b.name for b in self._candidates(exclude)]

    def _may_manage(self, backend: Backend) -> bool:
        if self.settings.upstreams:
            return False  # fixed servers belong to whoever runs them (Kubernetes)
        return backend.owned or self.settings.adopt

    def _pick_victim(self, exclude: str) -> Backend | None:
        candidates = self._candidates(exclude)
        return candidates[0] if candidates else None

    # ----------------------------------------------------------------- stops

    async def stop_backend(self, backend: Backend, reason: str) -> None:
        """Drain ``backend`` (no new requests, wait for those in flight), then stop it."""
        if backend.state in (DRAINING, STOPPING):
            await backend.gone.wait()
            return
        backend.state = DRAINING
        await backend.idle.wait()
        backend.state = STOPPING
        await self._stop_marked(backend, reason)

    def idle_tick(self, now: float | None = None) -> list[Backend]:
        """Mark the servers that have been idle too long as stopping; return them.

        A server with requests in flight is never chosen; the mark and the check happen in
        one step on the loop.
        """
        now = time.monotonic() if now is None else now
        chosen = []
        for backend in list(self.backends.values()):
            if not self._may_manage(backend) or backend.ttl <= 0 or self.pinned(backend.name):
                continue
            if backend.state not in (READY, UNHEALTHY) or backend.in_flight:
                continue
            if now - backend.last_used >= backend.ttl:
                backend.state = STOPPING
                chosen.append(backend)
        return chosen

    def _spawn(self, coro: Awaitable[Any]) -> None:
        task = asyncio.ensure_future(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def idle_loop(self, interval: float = 1.0) -> None:
        """Stop idle servers every ``interval`` seconds, until cancelled."""
        while True:
            await asyncio.sleep(interval)
            for backend in self.idle_tick():
                self._spawn(self._stop_marked(backend, "idle"))

    async def _stop_marked(self, backend: Backend, reason: str) -> None:
        """Stop a server already marked stopping; forget it whatever happens."""
        logger.info("stopping %s (%s)", backend.name, reason)
        try:
            await asyncio.to_thread(self.manager.stop, backend.name)
            self.metrics.stops[(backend.name, reason)] += 1
        except CmwVllmError as exc:
            logger.error("stopping %s failed: %s", backend.name, exc.message)
        finally:
            self._forget(backend)

    async def health_loop(self) -> None:
        """Re-read the records and check every server's health, until cancelled."""
        while True:
            await asyncio.sleep(self.settings.health_interval)
            try:
                await self.refresh()
                await self.check_health()
            except CmwVllmError as exc:
                logger.warning("health round failed: %s", exc.message)

    async def check_health(self) -> None:
        """Probe ready and unhealthy servers; no new requests go to those that fail
        :data:`UNHEALTHY_AFTER` probes in a row. One probe that passes makes a server ready.

        A failed probe does not count when the gateway's own loop was blocked for
        :data:`STALL_EXCUSE` seconds or more during the round: the time was the gateway's.
        """
        targets = [b for b in self.backends.values() if b.state in (READY, UNHEALTHY)]
        if not targets:
            return
        lag = LoopLag()
        try:
            results = await asyncio.gather(*(self.probe(b.base_url) for b in targets))
        finally:
            stalled = lag.stop()
        excused = stalled >= STALL_EXCUSE
        for backend, ok in zip(targets, results, strict=True):
            if backend.state not in (READY, UNHEALTHY):
                continue
            if not ok and excused:
                logger.info("health probe of %s failed while the gateway's loop was blocked "
                            "for %.1fs; not counted", backend.name, stalled)
                continue
            backend.failed_probes = 0 if ok else backend.failed_probes + 1
            new = READY if ok else (
                UNHEALTHY if backend.failed_probes >= UNHEALTHY_AFTER else backend.state)
            if new != backend.state:
                logger.warning("server %s is now %s", backend.name, new)
                backend.state = new
                backend.loras_synced = False  # it may have been restarted: ask it again

    async def shutdown(self) -> None:
        """Stop the servers this gateway started (draining them first)."""
        self._closing = True
        for task in list(self._tasks):
            task.cancel()
        owned = [b for b in self.backends.values() if b.owned]
        # A server still starting would be left behind: stop it too (its start then fails).
        starting = [name for name in self._starts if name not in self.backends]
        await asyncio.gather(
            *(self.stop_backend(b, "shutdown") for b in owned),
            *(asyncio.to_thread(self.manager.stop, name) for name in starting),
            return_exceptions=True)

    # ----------------------------------------------------------------- listing

    def listing(self) -> list[dict[str, Any]]:
        """``/v1/models`` data: every server and every startable entry, with its state."""
        created = int(time.time())
        out: list[dict[str, Any]] = []
        listed: set[str] = set()
        for backend in sorted(self.backends.values(), key=lambda b: b.name):
            out.append({"id": backend.name, "object": "model", "created": created,
                        "owned_by": "cmw-vllm", "state": backend.state,
                        "aliases": [n for n in backend.names if n != backend.name],
                        "in_flight": backend.in_flight, "started_by_gateway": backend.owned})
            listed.update((backend.name, *backend.names))
        for alias, entry in sorted(self.entries.items()):
            if alias in listed:
                continue
            state = STARTING if alias in self._starts else STARTABLE
            row = {"id": alias, "object": "model", "created": created,
                   "owned_by": "cmw-vllm", "state": state, "aliases": [entry.model],
                   "task": str(entry.task)}
            progress = self.progress.get(alias)
            if state == STARTING and progress is not None:
                row.update(progress.to_json())
            out.append(row)
        for name, adapter in sorted(self.adapters.items()):
            base = self.by_model.get(adapter.base)
            loaded = base is not None and name in base.loras
            out.append({"id": name, "object": "model", "created": created,
                        "owned_by": "cmw-vllm", "parent": adapter.base,
                        "state": "loaded" if loaded else STARTABLE,
                        "in_flight": base.lora_in_flight.get(name, 0) if base else 0})
        return out

    def in_flight(self) -> dict[str, int]:
        """Requests in flight per server (for ``/metrics``)."""
        return {b.name: b.in_flight for b in self.backends.values()}
