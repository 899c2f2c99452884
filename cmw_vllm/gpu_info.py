"""NVIDIA GPUs through NVML (``nvidia-ml-py``), and which managed server uses each.

``pynvml`` is imported inside :func:`query_gpus`. A machine without the NVIDIA driver or
without GPUs is a normal answer (:attr:`GpuReport.available` is False with a reason), never
an exception: the CPU build of vLLM is then the path. Every NVML query that a GPU does not
support (power on some boards, processes inside some containers) leaves that field None.

A GPU process belongs to managed server X when its process group is X's (``record.pgid``:
EngineCore and workers stay in it even when orphaned) or it descends from X's API server
(``record.pid``). Anything else is foreign.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING, Any, TypeVar

if TYPE_CHECKING:
    from cmw_vllm.server_record import ServerRecord

logger = logging.getLogger(__name__)

T = TypeVar("T")
NO_GPU = "no NVIDIA GPU found"


@dataclass
class GpuProcess:
    """A process that holds memory on a GPU.

    Attributes:
        pid: Process id (as NVML reports it: the host's pid namespace).
        used_memory: Bytes it holds on this GPU; None when NVML cannot tell.
        kind: ``compute`` or ``graphics``.
        name: Process title or command (``VLLM::EngineCore``), when readable.
        server: Name of the managed server it belongs to; None when foreign.
    """

    pid: int
    used_memory: int | None
    kind: str = "compute"
    name: str | None = None
    server: str | None = None

    @property
    def foreign(self) -> bool:
        """True when no managed server owns the process."""
        return self.server is None


@dataclass
class GpuInfo:
    """One GPU. Memory in bytes, power in watts, temperature in degrees Celsius."""

    index: int
    name: str | None = None
    uuid: str | None = None
    memory_total: int | None = None
    memory_used: int | None = None
    memory_free: int | None = None
    utilization_gpu: int | None = None
    utilization_memory: int | None = None
    temperature_c: int | None = None
    power_w: float | None = None
    power_limit_w: float | None = None
    pci_bus_id: str | None = None
    processes: list[GpuProcess] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)


# How two GPUs are linked, fastest first, with nvidia-smi's names (`nvidia-smi topo -m`):
# NVLink, one PCIe switch, several switches, one host bridge, one NUMA node, across nodes.
LINK_NAMES = ("NVLINK", "PIX", "PXB", "PHB", "NODE", "SYS")
# NVML's nvmlGpuTopologyLevel_t values -> the names above.
_TOPOLOGY_LEVELS = {0: "PIX", 10: "PIX", 20: "PXB", 30: "PHB", 40: "NODE", 50: "SYS"}


def link_rank(link: str | None) -> int:
    """0 for the fastest link (NVLink), higher for slower ones; unknown links rank last."""
    return LINK_NAMES.index(link) if link in LINK_NAMES else len(LINK_NAMES)


@dataclass
class GpuLink:
    """How two GPUs reach each other (``link`` is one of :data:`LINK_NAMES`)."""

    a: int
    b: int
    link: str


@dataclass
class GpuReport:
    """Every GPU on the machine, or why there are none.

    Attributes:
        available: True when NVML answered and found at least one GPU.
        gpus: The GPUs, by NVML index.
        driver_version: NVIDIA driver version (``550.54.15``).
        cuda_version: Highest CUDA version the driver supports (``12.4``).
        reason: Why ``available`` is False (``no NVIDIA GPU found: ...``).
    """

    available: bool
    gpus: list[GpuInfo] = field(default_factory=list)
    driver_version: str | None = None
    cuda_version: str | None = None
    reason: str | None = None
    links: list[GpuLink] = field(default_factory=list)

    def link(self, a: int, b: int) -> str | None:
        """The link between GPUs ``a`` and ``b`` (None when NVML did not say)."""
        for item in self.links:
            if {item.a, item.b} == {a, b}:
                return item.link
        return None

    def to_json(self) -> dict[str, Any]:
        """Stable JSON shape for ``gpus --json``."""
        gpus = []
        for gpu in self.gpus:
            data = asdict(gpu)
            for proc in data["processes"]:
                proc["foreign"] = proc["server"] is None
            gpus.append(data)
        return {
            "available": self.available,
            "reason": self.reason,
            "driver_version": self.driver_version,
            "cuda_version": self.cuda_version,
            "gpus": gpus,
            "links": [asdict(link) for link in self.links],
        }

    def processes(self) -> Iterable[tuple[GpuInfo, GpuProcess]]:
        """Every (GPU, process) pair."""
        for gpu in self.gpus:
            for proc in gpu.processes:
                yield gpu, proc


def _text(value: Any) -> str:
    return value.decode("utf-8", errors="replace") if isinstance(value, bytes) else str(value)


def _cuda_version(raw: int | None) -> str | None:
    if not raw:
        return None
    return f"{raw // 1000}.{(raw % 1000) // 10}"


def _load_records() -> list[ServerRecord]:
    from cmw_vllm.server_record import read_record, record_names

    records = []
    for name in record_names():
        try:
            record = read_record(name)
        except ValueError as exc:
            logger.debug("skipping record %s: %s", name, exc)
            continue
        if record is not None:
            records.append(record)
    return records


def owner_of(pid: int, records: Iterable[ServerRecord]) -> str | None:
    """The managed server a process belongs to: same process group, or a descendant."""
    records = list(records)
    if not records:
        return None
    try:
        pgid = os.getpgid(pid)
    except (ProcessLookupError, PermissionError, OSError):
        pgid = None
    created: float | None = None
    import psutil

    try:
        created = psutil.Process(pid).create_time()
    except psutil.Error:  # gone, or in another pid namespace
        created = None
    if pgid is not None:
        for record in records:
            # A group id can be reused once the server is gone: the process must be younger
            # than the group's leader, as in server_manager.group_members.
            if record.pgid == pgid and (
                created is None or created + 0.05 >= record.supervisor_create_time
            ):
                return record.name
    by_pid = {r.pid: r for r in records}
    try:
        proc = psutil.Process(pid)
        for candidate in (proc, *proc.parents()):
            match = by_pid.get(candidate.pid)
            # Identity is pid + create time: a reused pid is not the server.
            if match is not None and abs(candidate.create_time() - match.create_time) < 0.05:
                return match.name
    except psutil.Error as exc:  # the process is gone or hidden
        logger.debug("cannot walk the parents of pid %s: %s", pid, exc)
    return None


def process_title(pid: int) -> str | None:
    """A process's ``VLLM::`` title, else its command line (None when gone or hidden)."""
    import psutil

    try:
        proc = psutil.Process(pid)
        title = _vllm_title(proc)
        if title is not None:
            return title
        name = proc.name()
        cmd = proc.cmdline()
        return " ".join(cmd)[:80] if cmd else name
    except psutil.Error:  # gone, hidden in another pid namespace, or access denied
        return None


def query_gpus(
    records: Iterable[ServerRecord] | None = None, *, match_servers: bool = True,
    topology: bool = False,
) -> GpuReport:
    """Ask NVML about every GPU and match their processes to managed servers.

    Args:
        records: Server records to match processes against (default: every record on disk).
        match_servers: Skip matching (and reading records) when False.
        topology: Also ask how each pair of GPUs is linked (:attr:`GpuReport.links`).

    Returns:
        The report; ``available`` is False (with a reason) when there is no driver or no GPU.
    """
    try:
        import pynvml
    except ImportError:
        return GpuReport(available=False, reason=f"{NO_GPU} (nvidia-ml-py is not installed)")
    nvml_error: type[BaseException] = getattr(pynvml, "NVMLError", Exception)
    try:
        pynvml.nvmlInit()
    except nvml_error as exc:
        return GpuReport(available=False, reason=f"{NO_GPU} (NVML: {_text(exc)})")
    except OSError as exc:
        return GpuReport(available=False, reason=f"{NO_GPU} ({exc})")
    try:
        report = _collect(pynvml, nvml_error, records, match_servers)
        if topology and len(report.gpus) > 1:
            report.links = _links(pynvml, nvml_error, len(report.gpus))
        return report
    finally:
        try:
            pynvml.nvmlShutdown()
        except nvml_error as exc:
            logger.debug("nvmlShutdown failed: %s", exc)


def _collect(pynvml: Any, nvml_error: type[BaseException],
             records: Iterable[ServerRecord] | None, match_servers: bool) -> GpuReport:
    def safe(fn: Callable[..., T], *args: Any, errors: list[str] | None = None,
             what: str = "") -> T | None:
        try:
            return fn(*args)
        except nvml_error as exc:
            if errors is not None and what:
                errors.append(f"{what}: {_text(exc)}")
            return None

    report = GpuReport(available=False)
    driver = safe(pynvml.nvmlSystemGetDriverVersion)
    report.driver_version = _text(driver) if driver is not None else None
    report.cuda_version = _cuda_version(safe(pynvml.nvmlSystemGetCudaDriverVersion))
    count = safe(pynvml.nvmlDeviceGetCount)
    if not count:
        report.reason = NO_GPU
        return report
    record_list = list(records) if records is not None else (
        _load_records() if match_servers else []
    )
    for index in range(count):
        gpu = GpuInfo(index=index)
        errors = gpu.errors
        handle = safe(pynvml.nvmlDeviceGetHandleByIndex, index, errors=errors, what="handle")
        if handle is None:
            report.gpus.append(gpu)
            continue
        name = safe(pynvml.nvmlDeviceGetName, handle, errors=errors, what="name")
        gpu.name = _text(name) if name is not None else None
        uuid = safe(pynvml.nvmlDeviceGetUUID, handle, errors=errors, what="uuid")
        gpu.uuid = _text(uuid) if uuid is not None else None
        pci = safe(getattr(pynvml, "nvmlDeviceGetPciInfo", lambda _h: None), handle)
        bus = getattr(pci, "busId", None)
        gpu.pci_bus_id = _text(bus) if bus is not None else None
        mem = safe(pynvml.nvmlDeviceGetMemoryInfo, handle, errors=errors, what="memory")
        if mem is not None:
            gpu.memory_total, gpu.memory_used, gpu.memory_free = (
                int(mem.total), int(mem.used), int(mem.free)
            )
        util = safe(pynvml.nvmlDeviceGetUtilizationRates, handle, errors=errors,
                    what="utilization")
        if util is not None:
            gpu.utilization_gpu, gpu.utilization_memory = int(util.gpu), int(util.memory)
        temp = safe(pynvml.nvmlDeviceGetTemperature, handle,
                    getattr(pynvml, "NVML_TEMPERATURE_GPU", 0), errors=errors,
                    what="temperature")
        gpu.temperature_c = int(temp) if temp is not None else None
        power = safe(pynvml.nvmlDeviceGetPowerUsage, handle, errors=errors, what="power")
        gpu.power_w = power / 1000.0 if power is not None else None
        limit = safe(pynvml.nvmlDeviceGetEnforcedPowerLimit, handle)
        gpu.power_limit_w = limit / 1000.0 if limit is not None else None
        seen: set[int] = set()
        for kind, getter in (
            ("compute", getattr(pynvml, "nvmlDeviceGetComputeRunningProcesses", None)),
            ("graphics", getattr(pynvml, "nvmlDeviceGetGraphicsRunningProcesses", None)),
        ):
            if getter is None:
                continue
            procs = safe(getter, handle, errors=errors, what=f"{kind} processes") or []
            for p in procs:
                pid = int(p.pid)
                if pid in seen:
                    continue
                seen.add(pid)
                used = getattr(p, "usedGpuMemory", None)
                gpu.processes.append(GpuProcess(
                    pid=pid,
                    used_memory=int(used) if used is not None else None,
                    kind=kind,
                    name=process_title(pid),
                    server=owner_of(pid, record_list),
                ))
        report.gpus.append(gpu)
    report.available = bool(report.gpus)
    return report


def _links(pynvml: Any, nvml_error: type[BaseException], count: int) -> list[GpuLink]:
    """How each pair of GPUs is linked: NVLink when NVML says peer-to-peer over NVLink is
    possible, else the closest common PCIe ancestor (``nvmlDeviceGetTopologyCommonAncestor``).
    Pairs NVML cannot answer for are left out."""
    nvlink_index = getattr(pynvml, "NVML_P2P_CAPS_INDEX_NVLINK", 2)
    status_ok = getattr(pynvml, "NVML_P2P_STATUS_OK", 0)
    p2p = getattr(pynvml, "nvmlDeviceGetP2PStatus", None)
    ancestor = getattr(pynvml, "nvmlDeviceGetTopologyCommonAncestor", None)
    handles = []
    for index in range(count):
        try:
            handles.append(pynvml.nvmlDeviceGetHandleByIndex(index))
        except nvml_error:
            handles.append(None)
    out = []
    for a in range(count):
        for b in range(a + 1, count):
            ha, hb = handles[a], handles[b]
            if ha is None or hb is None:
                continue
            link = None
            try:
                if p2p is not None and p2p(ha, hb, nvlink_index) == status_ok:
                    link = "NVLINK"
                elif ancestor is not None:
                    link = _TOPOLOGY_LEVELS.get(int(ancestor(ha, hb)))
            except nvml_error as exc:
                logger.debug("no topology for GPUs %d and %d: %s", a, b, _text(exc))
            if link is not None:
                out.append(GpuLink(a, b, link))
    return out


def server_gpu_memory(records: Iterable[ServerRecord],
                      report: GpuReport | None = None) -> dict[str, int]:
    """GPU memory each managed server holds (summed over its processes and GPUs).

    Args:
        records: The servers to report on.
        report: An already queried report (default: ask NVML now).

    Returns:
        Server name -> bytes, for servers that hold GPU memory (empty without GPUs).
    """
    record_list = list(records)
    if report is None:
        report = query_gpus(record_list)
    names = {r.name for r in record_list}
    out: dict[str, int] = {}
    for _gpu, proc in report.processes():
        if proc.server in names and proc.used_memory is not None:
            out[proc.server] = out.get(proc.server, 0) + proc.used_memory
    return out


@dataclass
class OrphanProcess:
    """A ``VLLM::`` process (EngineCore, worker) that no managed server owns.

    Attributes:
        pid: Its process id.
        name: Its title (``VLLM::EngineCore``).
        gpu_memory: Bytes it holds on GPUs (None without GPUs or when NVML cannot tell).
        gpus: Indices of the GPUs it holds memory on.
        server: The managed server it is left over from (that server has exited); None
            when no managed server owns it.
    """

    pid: int
    name: str
    gpu_memory: int | None = None
    gpus: list[int] = field(default_factory=list)
    server: str | None = None


VLLM_TITLE_PREFIX = "VLLM::"


def _vllm_title(proc: Any) -> str | None:
    """The ``VLLM::...`` title of a psutil process, or None."""
    import psutil

    # The command line holds the whole title; the kernel's name is cut at 15 characters.
    try:
        cmd = proc.cmdline()
        if cmd and cmd[0].startswith(VLLM_TITLE_PREFIX):
            return cmd[0].split()[0]
        name = proc.name()
    except psutil.Error:  # gone or not ours to read
        return None
    return name if name.startswith(VLLM_TITLE_PREFIX) else None


# Processes that adopt orphans: pid 1 and the usual subreapers (systemd --user, container
# inits, podman's conmon). A VLLM:: process whose parent is one of these was re-parented.
REAPER_NAMES = frozenset({
    "systemd", "init", "tini", "tini-static", "dumb-init", "docker-init", "catatonit",
    "s6-svscan", "runsvdir", "conmon", "containerd-shim", "containerd-shim-runc-v2",
})


def _looks_like_vllm(proc: Any) -> bool:
    """True when a process's command line names vLLM or cmw-vllm (an API server)."""
    import psutil

    try:
        return "vllm" in " ".join(proc.cmdline()).lower()
    except psutil.Error:
        return False


def _is_reaper(proc: Any) -> bool:
    """True for pid 1 or a known subreaper that is not itself a vLLM server (a container
    whose pid 1 is vLLM's API server is that server, alive)."""
    import psutil

    try:
        if proc.pid != 1 and proc.name() not in REAPER_NAMES:
            return False
    except psutil.Error:
        return False
    return not _looks_like_vllm(proc)


def is_orphaned(proc: Any) -> bool:
    """True when a ``VLLM::`` process has provably lost its API server.

    Its chain of ``VLLM::`` ancestors (a worker's EngineCore) must end in a process that was
    re-parented to pid 1 or a subreaper, and the leader of its process group (vLLM's API
    server, or the shell that started it) must be gone too. A live parent that is anything
    else (the API server, a script using vLLM offline, ``cmw-vllm``) means the engine is in
    use, and so does anything that cannot be read: those are never called leftovers.
    """
    import psutil

    try:
        top = proc
        parent = proc.parent()
        while parent is not None and _vllm_title(parent) is not None:
            top, parent = parent, parent.parent()
        if parent is not None and not _is_reaper(parent):
            return False
        pgid = os.getpgid(top.pid)
    except (psutil.Error, OSError):
        return False
    if pgid in (top.pid, proc.pid):
        return True
    try:
        leader = psutil.Process(pgid)
        if leader.status() == psutil.STATUS_ZOMBIE:
            return True
        # A leader younger than the process is a reused group id, not its API server.
        return leader.create_time() > top.create_time() + 0.05 or _is_reaper(leader)
    except psutil.NoSuchProcess:
        return True
    except psutil.Error:
        return False


def _is_mine(proc: Any) -> bool:
    """True when the process runs as this user (only those may be named to kill)."""
    import psutil

    try:
        return bool(proc.uids().real == os.getuid())
    except (psutil.Error, AttributeError):  # gone, or no uids (Windows)
        return False


def orphan_vllm_processes(
    report: GpuReport | None = None, records: Iterable[ServerRecord] | None = None
) -> list[OrphanProcess]:
    """This user's ``VLLM::`` processes that belong to no managed server and whose API
    server is gone (leftovers of crashes): see :func:`is_orphaned`.

    With GPUs, those holding GPU memory; without GPUs (the CPU build), every such
    ``VLLM::EngineCore`` / ``VLLM::Worker`` process on the machine. The processes of a live
    server (started by hand, by another tool, by another user) are never listed.

    Args:
        report: A GPU report already queried (default: ask NVML now).
        records: Managed servers (default: every record on disk).

    Returns:
        The orphans, by pid.
    """
    import psutil

    record_list = list(records) if records is not None else _load_records()
    if report is None:
        report = query_gpus(record_list)
    found: dict[int, OrphanProcess] = {}
    if report.available:
        for gpu, gp in report.processes():
            if gp.server is not None:
                continue
            try:
                proc = psutil.Process(gp.pid)
                title = _vllm_title(proc)
            except psutil.Error:  # in another pid namespace or gone: nothing to tell
                continue
            if title is None or not _is_mine(proc) or not is_orphaned(proc):
                continue
            orphan = found.setdefault(gp.pid, OrphanProcess(gp.pid, title, 0))
            orphan.gpu_memory = (orphan.gpu_memory or 0) + (gp.used_memory or 0)
            orphan.gpus.append(gpu.index)
        return sorted(found.values(), key=lambda o: o.pid)
    for proc in psutil.process_iter():
        title = _vllm_title(proc)
        if title is None or not title.startswith(("VLLM::EngineCore", "VLLM::Worker")):
            continue
        if not _is_mine(proc) or not is_orphaned(proc):
            continue
        if owner_of(proc.pid, record_list) is None:
            found[proc.pid] = OrphanProcess(proc.pid, title)
    return sorted(found.values(), key=lambda o: o.pid)
