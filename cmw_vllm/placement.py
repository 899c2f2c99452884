"""Where a server runs: which GPUs (``--gpus auto``) and what share of them
(``--gpu-memory-utilization auto``), on a machine whose GPUs are a pool.

The ledger (:func:`read_ledger`) is NVML's view of each GPU (free memory counts every
program's use) less what managed servers have *reserved* but not yet allocated: a server
that is still loading (its record has no ``ready_at``) holds little yet but will grow into
its share (``gpu_memory_utilization`` x total, plus its CUDA context). :func:`place` tries
the GPU sets of the server's size and keeps those where the estimate
(:mod:`cmw_vllm.memory_estimate`, through :mod:`cmw_vllm.memory_check`) says it fits;
among them it prefers the fastest link between the GPUs (NVML topology) and then follows
the policy (``pack``: the fullest GPU that still fits; ``spread``: the emptiest).

Placement and the record write happen under one file lock (:func:`placement_lock`): two
starts at once never choose the same room. :func:`plan_room` is the gateway's question:
which idle servers to evict, from the GPUs the new server will use only, to make it fit.
"""

from __future__ import annotations

import contextlib
import itertools
import logging
import time
from collections.abc import Collection, Iterator, Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING

from cmw_vllm import paths
from cmw_vllm.errors import ConflictError, InsufficientResourcesError
from cmw_vllm.vocab import AUTO, format_gib

if TYPE_CHECKING:
    from cmw_vllm.gpu_info import GpuReport
    from cmw_vllm.memory_estimate import (
        EstimateSettings,
        MemoryEstimate,
        MemoryTarget,
        ModelSpec,
    )
    from cmw_vllm.server_config import ServerConfig
    from cmw_vllm.server_record import ServerRecord

logger = logging.getLogger(__name__)

# What a CUDA process holds besides its share (about 0.5 GiB on H100/H200).
CUDA_CONTEXT_BYTES = 512 * 2**20
DEFAULT_SHARE = 0.92  # vLLM's --gpu-memory-utilization default
LOCK_NAME = "placement.lock"
# Sets of GPUs tried at most (8 GPUs, tensor parallel 4: 70 sets).
MAX_SETS = 4096


# --------------------------------------------------------------------------- the ledger


@dataclass
class GpuRoom:
    """One GPU as the placement sees it. Bytes.

    Attributes:
        index: NVML index.
        name: Model name (``NVIDIA H100 80GB HBM3``).
        total: Its memory.
        free: What NVML says is free now.
        reserved: Shares of managed servers still loading, not yet allocated.
        foreign: Held by processes no managed server owns.
        servers: Managed servers placed on it (by record or seen in NVML).
    """

    index: int
    name: str | None
    total: int
    free: int
    reserved: int = 0
    foreign: int = 0
    servers: list[str] = field(default_factory=list)

    @property
    def available(self) -> int:
        """What a new server may count on: free now, less the reservations."""
        return max(0, self.free - self.reserved)

    @property
    def used(self) -> int:
        """What NVML says is in use."""
        return max(0, self.total - self.free)


@dataclass
class ServerShare:
    """A managed server's part of the GPUs.

    Attributes:
        name: The server.
        gpus: Indices of the GPUs it runs on.
        share: Its ``gpu_memory_utilization``.
        held: GPU index -> bytes its processes hold there (NVML).
        reserved: GPU index -> bytes of its share not yet allocated (still loading).
    """

    name: str
    gpus: list[int]
    share: float
    held: dict[int, int] = field(default_factory=dict)
    reserved: dict[int, int] = field(default_factory=dict)


@dataclass
class Ledger:
    """The GPUs, who is on them, and how they are linked."""

    gpus: list[GpuRoom]
    servers: dict[str, ServerShare]
    report: GpuReport

    def room(self, index: int) -> GpuRoom:
        """The GPU of NVML index ``index``."""
        return next(g for g in self.gpus if g.index == index)

    def link(self, a: int, b: int) -> str | None:
        """How GPUs ``a`` and ``b`` are linked (None when unknown)."""
        return self.report.link(a, b)

    def without(self, names: Collection[str]) -> Ledger:
        """The ledger as it would be once the servers ``names`` are gone."""
        gpus = {g.index: replace(g, servers=list(g.servers)) for g in self.gpus}
        for name in names:
            share = self.servers.get(name)
            if share is None:
                continue
            for index in share.gpus:
                room = gpus.get(index)
                if room is None:
                    continue
                room.free = min(room.total, room.free + share.held.get(index, 0))
                room.reserved = max(0, room.reserved - share.reserved.get(index, 0))
                if name in room.servers:
                    room.servers.remove(name)
        servers = {k: v for k, v in self.servers.items() if k not in names}
        return Ledger([gpus[g.index] for g in self.gpus], servers, self.report)


def gpu_indices(spec: str | None, report: GpuReport) -> list[int] | None:
    """NVML indices of a ``--gpus``/``CUDA_VISIBLE_DEVICES`` value (indices or UUIDs); None
    when unset. Unknown entries are left out (:func:`place` names them)."""
    if not spec:
        return None
    out = []
    for part in spec.split(","):
        part = part.strip()
        for gpu in report.gpus:
            if str(gpu.index) == part or (gpu.uuid and gpu.uuid == part):
                out.append(gpu.index)
                break
    return out


def _live(record: ServerRecord) -> bool:
    from cmw_vllm.process_group import is_ours, supervisor_process

    return is_ours(record) is not None or supervisor_process(record) is not None


def read_ledger(records: Sequence[ServerRecord] | None = None, *,
                topology: bool = False) -> Ledger | None:
    """Ask NVML about the GPUs and add what the managed servers reserve.

    Args:
        records: The managed servers (default: every record on disk); dead ones are skipped.
        topology: Also ask how the GPUs are linked.

    Returns:
        The ledger, or None when the machine has no GPU (NVML cannot tell of one).
    """
    from cmw_vllm.gpu_info import _load_records, query_gpus

    every = list(records) if records is not None else _load_records()
    # Processes are matched to every record (a dead server's leftovers are its, not
    # foreign); only live servers reserve.
    report = query_gpus(every, topology=topology)
    record_list = [r for r in every if r.task != "gateway" and _live(r)]
    if not report.available:
        return None
    rooms = {}
    for gpu in report.gpus:
        if gpu.memory_total is None or gpu.memory_free is None:
            continue
        rooms[gpu.index] = GpuRoom(gpu.index, gpu.name, int(gpu.memory_total),
                                   int(gpu.memory_free))
    held: dict[str, dict[int, int]] = {}
    for gpu, proc in report.processes():
        room = rooms.get(gpu.index)
        if room is None:
            continue
        if proc.server is None:
            room.foreign += proc.used_memory or 0
        else:
            on = held.setdefault(proc.server, {})
            on[gpu.index] = on.get(gpu.index, 0) + (proc.used_memory or 0)
    servers = {}
    for record in record_list:
        config = record.config or {}
        mine = held.get(record.name, {})
        indices = gpu_indices(config.get("gpus"), report)
        if indices is None:
            indices = sorted(mine) or sorted(rooms)[: int(config.get("tensor_parallel_size")
                                                         or 1)]
        raw = config.get("gpu_memory_utilization")
        share = float(raw) if isinstance(raw, (int, float)) else DEFAULT_SHARE
        entry = ServerShare(record.name, indices, share, held=dict(mine))
        for index in indices:
            room = rooms.get(index)
            if room is None:
                continue
            room.servers.append(record.name)
            if record.ready_at is None:  # still loading: it will grow into its share
                want = int(room.total * share) + CUDA_CONTEXT_BYTES
                entry.reserved[index] = max(0, want - mine.get(index, 0))
                room.reserved += entry.reserved[index]
        servers[record.name] = entry
    for name in held:
        for index in held[name]:
            if index in rooms and name not in rooms[index].servers:
                rooms[index].servers.append(name)
    return Ledger([rooms[i] for i in sorted(rooms)], servers, report)


@contextlib.contextmanager
def placement_lock(timeout: float = 120.0) -> Iterator[None]:
    """Serialise placement decisions (held until the new server's record is written)."""
    from filelock import Timeout

    try:
        with paths.private_lock(paths.state_dir() / LOCK_NAME, timeout=timeout):
            yield
    except Timeout:
        raise ConflictError("another start is placing a server on the GPUs; try again") \
            from None


# --------------------------------------------------------------------------- placing


@dataclass
class Placement:
    """Where a server goes.

    Attributes:
        config: The config to launch: ``gpus`` set, an ``auto`` share resolved (with its
            ``--kv-cache-memory-bytes``).
        gpus: The chosen GPU indices.
        status: ``ok`` (it fits), ``skipped`` (the estimate cannot model it: placed by
            free memory, vLLM judges) or ``unchecked`` (``--force``: placed without a fit).
        reason: Why these GPUs, in words (the log line's end).
        estimate: The estimate on the chosen GPUs (None when skipped).
        skipped: Why the estimate could not model the server (status ``skipped``).
    """

    config: ServerConfig
    gpus: list[int]
    status: str
    reason: str
    estimate: MemoryEstimate | None = None
    skipped: str | None = None


@dataclass
class _Try:
    gpus: list[int]
    fits: bool
    share: float
    kv_bytes: int | None
    est: MemoryEstimate | None
    left: int  # bytes the fullest GPU of the set keeps after this server
    full: bool = True  # an `auto` share got all it wanted (not squeezed to what is free)


def _target(rooms: Sequence[GpuRoom], visible: int) -> MemoryTarget:
    from cmw_vllm.memory_estimate import MemoryTarget

    smallest = min(rooms, key=lambda r: r.total)
    return MemoryTarget(
        device="gpu", memory_total=smallest.total,
        memory_free=min(r.available for r in rooms), devices=len(rooms),
        description=", ".join(f"GPU {r.index}" for r in rooms) + f" ({smallest.name})",
        devices_available=visible)


class _Model:
    """The model's spec and settings, read once for every set tried."""

    def __init__(self, config: ServerConfig) -> None:
        from cmw_vllm.errors import UsageError
        from cmw_vllm.memory_check import settings_from_config
        from cmw_vllm.model_spec import load_model_spec
        from cmw_vllm.vocab import Task

        self.config = config
        # (smallest total, least available, GPUs) -> the try: sets alike give one answer.
        self._tried: dict[tuple[int, int, int, str | None], _Try] = {}
        self.spec: ModelSpec | None = None
        self.settings: EstimateSettings | None = None
        self.skipped: str | None = None
        settings, revision = settings_from_config(config)
        try:
            spec = load_model_spec(config.model, revision=revision)
        except UsageError as exc:
            self.skipped = exc.message
            return
        if config.task != Task.GENERATE:
            spec.pooling = True
        self.spec, self.settings = spec, settings

    def attempt(self, rooms: Sequence[GpuRoom], visible: int) -> _Try:
        """Whether the server fits on ``rooms`` (the smallest total and the least available
        memory of the set decide, so alike sets are computed once)."""
        smallest = min(rooms, key=lambda r: r.total)
        key = (smallest.total, min(r.available for r in rooms), len(rooms), smallest.name)
        found = self._tried.get(key)
        if found is None or self.skipped is not None:
            found = self._tried[key] = self._attempt(rooms, visible)
        return replace(found, gpus=[r.index for r in rooms])

    def _attempt(self, rooms: Sequence[GpuRoom], visible: int) -> _Try:
        from cmw_vllm.errors import UsageError
        from cmw_vllm.memory_check import sized
        from cmw_vllm.memory_estimate import assess

        indices = [r.index for r in rooms]
        least = min(r.available for r in rooms)
        total = min(r.total for r in rooms)
        util = self.config.gpu_memory_utilization
        if self.spec is None or self.settings is None:
            share = util if isinstance(util, float) else DEFAULT_SHARE
            need = int(total * share)
            return _Try(indices, least >= need, share, None, None, least - need)
        target = _target(rooms, visible)
        if util == AUTO:
            # The new server's own CUDA context comes out of what is free too.
            target = replace(target, memory_free=max(0, least - CUDA_CONTEXT_BYTES))
        try:
            settings, _share = sized(self.spec, self.settings, target, self.config)
            est = assess(self.spec, settings, target)
            full = True
            if util == AUTO:
                wanted, _kv = sized(self.spec, self.settings, replace(target, memory_free=None),
                                    self.config)
                full = (settings.gpu_memory_utilization or 0) >= (
                    wanted.gpu_memory_utilization or 0)
        except UsageError as exc:
            self.skipped, self.spec = exc.message, None
            return self._attempt(rooms, visible)
        share = settings.gpu_memory_utilization or DEFAULT_SHARE
        kv = settings.kv_cache_memory_bytes if util == AUTO else None
        return _Try(indices, est.fits, share, kv, est, least - int(total * share), full)


def _visible(config: ServerConfig, environ: Mapping[str, str], ledger: Ledger
             ) -> tuple[list[int], bool]:
    """The GPUs a server may use and whether the user forced them (``--gpus``).

    Raises:
        ConfigError: ``--gpus`` or ``CUDA_VISIBLE_DEVICES`` names a GPU that does not exist.
    """
    from cmw_vllm.errors import ConfigError

    forced = config.gpus is not None
    wanted = config.gpus or environ.get("CUDA_VISIBLE_DEVICES") or None
    if wanted is None:
        return [g.index for g in ledger.gpus], False
    indices = gpu_indices(wanted, ledger.report)
    parts = [p.strip() for p in wanted.split(",") if p.strip()]
    if indices is None or len(indices) != len(parts):
        known = {str(g.index) for g in ledger.report.gpus} | {
            g.uuid for g in ledger.report.gpus if g.uuid}
        bad = next((p for p in parts if p not in known), wanted)
        raise ConfigError(f"GPU {bad!r} does not exist (cmw-vllm gpus lists them)")
    return [i for i in indices if any(g.index == i for g in ledger.gpus)], forced


def _sets(indices: Sequence[int], size: int) -> list[tuple[int, ...]]:
    return list(itertools.islice(itertools.combinations(indices, size), MAX_SETS))


def _worst_link(ledger: Ledger, gpus: Sequence[int]) -> int:
    from cmw_vllm.gpu_info import link_rank

    if len(gpus) < 2:
        return 0
    return max(link_rank(ledger.link(a, b)) for a, b in itertools.combinations(gpus, 2))


def _order(ledger: Ledger, tries: list[_Try], policy: str) -> list[_Try]:
    sign = 1 if policy == "pack" else -1
    # An `auto` share squeezed to what is free comes last: packing must not starve a server.
    return sorted(tries, key=lambda t: (not t.full, _worst_link(ledger, t.gpus),
                                        sign * t.left, t.gpus))


def _describe(room: GpuRoom) -> str:
    parts = [f"{format_gib(room.available)} free of {format_gib(room.total)}"]
    if room.foreign:
        parts.append(f"{format_gib(room.foreign)} held by other programs")
    if room.reserved:
        parts.append(f"{format_gib(room.reserved)} reserved by servers still loading")
    if room.servers:
        parts.append("servers " + ", ".join(room.servers))
    return f"GPU {room.index}: " + "; ".join(parts)


def _why_not(model: _Model, room: GpuRoom, visible: int) -> str:
    one = model.attempt([room], visible)
    if one.est is None:
        return f"needs {format_gib(int(room.total * one.share))}"
    if not one.est.free_memory_ok:
        return (f"needs {format_gib(int(room.total * one.share))} "
                f"(--gpu-memory-utilization {one.share:g})")
    return one.est.problems[-1] if one.est.problems else "does not fit"


def _with_gpus(config: ServerConfig, chosen: _Try) -> ServerConfig:
    update: dict[str, object] = {"gpus": ",".join(map(str, chosen.gpus))}
    if config.gpu_memory_utilization == AUTO:
        update["gpu_memory_utilization"] = chosen.share
        if chosen.kv_bytes is not None and chosen.est is not None:
            from cmw_vllm.vllm_flags import flag_value

            if flag_value(list(config.vllm_args), "--kv-cache-memory-bytes") is None:
                update["vllm_args"] = [*config.vllm_args, "--kv-cache-memory-bytes",
                                       str(chosen.kv_bytes)]
        elif chosen.est is None:
            update["gpu_memory_utilization"] = None  # vLLM's default: nothing to size from
    return config.model_copy(update=update)


def place(config: ServerConfig, environ: Mapping[str, str] | None = None, *,
          ledger: Ledger | None = None, check: bool = True, policy: str | None = None,
          only: Sequence[int] | None = None, model: _Model | None = None,
          log: bool = True) -> Placement | None:
    """Choose the GPUs for ``config`` and size an ``auto`` share.

    Args:
        config: The server; ``gpus`` None means ``auto`` (within ``CUDA_VISIBLE_DEVICES``
            when the environment sets it), else those GPUs are checked as given.
        environ: The environment vLLM gets (default ``os.environ``).
        ledger: The GPUs (default: :func:`read_ledger` now).
        check: Refuse when nothing fits; False (``--force``) places anyway, on the GPUs
            with the most room.
        policy: ``pack`` or ``spread`` (default ``CMW_VLLM_PLACEMENT``).
        only: Try this GPU set only.
        model: The model already read (the gateway's plan tries many ledgers).
        log: Log the decision (one line).

    Returns:
        The placement; None when the machine has no GPU (the RAM check applies).

    Raises:
        InsufficientResourcesError: Nothing fits; the message names each GPU considered and
            why, the hint a GPU set (or settings) that would fit.
        ConfigError: A GPU that does not exist, a bad policy.
        NotFoundError: The model does not exist.
    """
    import os

    from cmw_vllm.settings import placement_policy

    begin = time.perf_counter()
    environ = os.environ if environ is None else environ
    if ledger is None:
        ledger = read_ledger(topology=config.local_device_count() > 1)
    if ledger is None or not ledger.gpus:
        return None
    policy = policy or placement_policy()
    visible, forced = _visible(config, environ, ledger)
    size = config.local_device_count()
    model = model or _Model(config)
    if only is not None:
        sets: list[tuple[int, ...]] = [tuple(only)]
    elif forced:
        sets = [tuple(visible[:size])] if len(visible) >= size else []
    else:
        sets = _sets(visible, size)
    if not sets:
        raise InsufficientResourcesError(
            f"--tensor-parallel-size {size} needs {size} GPUs but {len(visible)} "
            f"{'is' if len(visible) == 1 else 'are'} visible",
            hint=f"use --tensor-parallel-size {max(1, len(visible))} or make more GPUs visible")
    tries = [model.attempt([ledger.room(i) for i in s], len(visible)) for s in sets]
    fitting = [t for t in tries if t.fits]
    status = "skipped" if model.skipped else "ok"
    if fitting:
        chosen = _order(ledger, fitting, policy)[0]
        why = ("as --gpus asked" if forced or only is not None else
               f"policy {policy}, {len(fitting)} of {len(tries)} GPU sets fit")
    elif not check:
        chosen = max(tries, key=lambda t: (t.left, [-i for i in t.gpus]))
        status, why = "unchecked", "nothing fits; --force places it on the most free memory"
    else:
        raise _refusal(config, model, ledger, visible, forced, size, environ)
    result = _with_gpus(config, chosen)
    link = ""
    if len(chosen.gpus) > 1:
        from cmw_vllm.gpu_info import LINK_NAMES

        rank = _worst_link(ledger, chosen.gpus)
        link = f", link {LINK_NAMES[rank] if rank < len(LINK_NAMES) else 'unknown'}"
    share = result.gpu_memory_utilization
    reason = (f"{why}; share {share if share is not None else 'vLLM default'}, "
              f"{format_gib(max(0, chosen.left))} left on the fullest{link}")
    if log:
        logger.info("placement: %s -> GPU %s (%s; %.1f ms)", config.name,
                    ",".join(map(str, chosen.gpus)), reason, (time.perf_counter() - begin) * 1e3)
    return Placement(result, chosen.gpus, status, reason, chosen.est, model.skipped)


def _refusal(config: ServerConfig, model: _Model, ledger: Ledger, visible: list[int],
             forced: bool, size: int, environ: Mapping[str, str]
             ) -> InsufficientResourcesError:
    considered = visible[:size] if forced else visible
    lines = [f"{_describe(ledger.room(i))} - {_why_not(model, ledger.room(i), len(visible))}"
             for i in considered]
    where = (f"GPU {','.join(map(str, considered))} (--gpus)" if forced else
             f"any {'set of ' + str(size) + ' ' if size > 1 else ''}of the GPUs considered")
    message = f"{config.model} will not fit on {where}: " + "; ".join(lines)
    return InsufficientResourcesError(message, hint=_hint(config, model, ledger, forced,
                                                           size, environ))


def _hint(config: ServerConfig, model: _Model, ledger: Ledger, forced: bool, size: int,
          environ: Mapping[str, str]) -> str:
    """A GPU set (or settings) that would fit, when there is one."""
    from cmw_vllm.errors import CmwVllmError
    from cmw_vllm.memory_estimate import suggestions

    options: list[str] = []
    everywhere = [g.index for g in ledger.gpus]
    if forced:
        try:
            other = place(config.model_copy(update={"gpus": None}), {}, ledger=ledger,
                          model=model, log=False)
            if other is not None:
                options.append(f"`--gpus {','.join(map(str, other.gpus))}`")
        except CmwVllmError:
            pass
    more = size * 2
    tp = config.tensor_parallel_size
    if not options and config.distributed is None and len(everywhere) >= more:
        bigger = config.model_copy(update={"tensor_parallel_size": tp * 2, "gpus": None})
        try:
            found = place(bigger, {}, ledger=ledger, log=False)
            if found is not None:
                options.append(f"`--tensor-parallel-size {tp * 2} --gpus "
                               f"{','.join(map(str, found.gpus))}`")
        except CmwVllmError:
            pass
    if not options and model.spec is not None and model.settings is not None:
        sets = _sets(everywhere, size)
        best = max(sets, key=lambda s: min(ledger.room(i).available for i in s))
        rooms = [ledger.room(i) for i in best]
        target = _target(rooms, len(everywhere))
        est = model.attempt(rooms, len(everywhere)).est
        if est is not None:
            for text in suggestions(model.spec, model.settings, target, est)[:2]:
                if "--tensor-parallel-size" not in text:
                    options.append(f"`{text} --gpus {','.join(map(str, best))}`")
    parts = ["try " + " or ".join(options)] if options else []
    parts.append("stop what holds the GPUs (cmw-vllm gpus shows it)")
    parts.append("pass --force to start anyway")
    return "; or ".join(parts)


# --------------------------------------------------------------------------- the gateway


@dataclass
class RoomPlan:
    """What the gateway does to start a server: evict ``victims`` (in this order), then
    launch ``placement.config``."""

    placement: Placement
    victims: list[str]


def plan_room(config: ServerConfig, evictable: Sequence[str],
              environ: Mapping[str, str] | None = None) -> RoomPlan | None:
    """Where ``config`` goes and which servers must go first.

    A placement that needs no eviction wins. Otherwise, for each GPU set the server could
    use, the servers of ``evictable`` (least recently used first) that are on those GPUs are
    evicted in that order until it fits; the set that needs the fewest evictions (then the
    least recently used ones) wins. Servers on other GPUs are never evicted.

    Args:
        config: The server to start.
        evictable: Servers the gateway may stop, least recently used first.
        environ: The environment vLLM gets (default ``os.environ``).

    Returns:
        The plan; None when the machine has no GPU.

    Raises:
        InsufficientResourcesError: Nothing fits even after evicting every candidate on
            the GPUs (the error of the placement without evictions).
    """
    import os

    environ = os.environ if environ is None else environ
    ledger = read_ledger(topology=config.local_device_count() > 1)
    if ledger is None or not ledger.gpus:
        return None
    model = _Model(config)
    try:
        found = place(config, environ, ledger=ledger, model=model)
        assert found is not None
        return RoomPlan(found, [])
    except InsufficientResourcesError as exc:
        refusal = exc
    visible, forced = _visible(config, environ, ledger)
    size = config.local_device_count()
    sets = [tuple(visible[:size])] if forced else _sets(visible, size)
    best: tuple[tuple[int, int], RoomPlan] | None = None
    for gpus in sets:
        victims: list[str] = []
        for name in evictable:
            share = ledger.servers.get(name)
            if share is None or not set(share.gpus) & set(gpus):
                continue
            victims.append(name)
            after = ledger.without(victims)
            try:
                found = place(config, environ, ledger=after, only=gpus, model=model, log=False)
            except InsufficientResourcesError:
                continue
            assert found is not None
            cost = (len(victims), sum(evictable.index(v) for v in victims))
            if best is None or cost < best[0]:
                best = (cost, RoomPlan(found, list(victims)))
            break
    if best is None:
        raise refusal
    plan = best[1]
    logger.info("placement: %s needs room on GPU %s: evicting %s", config.name,
                ",".join(map(str, plan.placement.gpus)), ", ".join(plan.victims))
    return plan
