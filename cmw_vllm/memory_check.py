"""Whether a server fits this machine: the one check behind `estimate` and `start`.

It measures the target (the GPUs a server will use, or RAM as vLLM's CPU build counts it),
reads the settings a :class:`~cmw_vllm.server_config.ServerConfig` gives vLLM (its own
fields and the extra vLLM flags that change memory), and hands both to the arithmetic in
:mod:`cmw_vllm.memory_estimate`.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Literal

from cmw_vllm.errors import (
    ConfigError,
    InsufficientResourcesError,
    UsageError,
)
from cmw_vllm.memory_estimate import (
    CPU_KV_SPACE_ENV,
    DEFAULT_AUTO_CONCURRENCY,
    Device,
    EstimateSettings,
    MemoryEstimate,
    MemoryTarget,
    ModelSpec,
    auto_utilization,
    estimate,
)
from cmw_vllm.model_spec import load_model_spec
from cmw_vllm.vllm_flags import flag_value
from cmw_vllm.vocab import GiB, Task, format_size

if TYPE_CHECKING:
    from cmw_vllm.gpu_info import GpuInfo
    from cmw_vllm.server_config import ServerConfig

logger = logging.getLogger(__name__)

# --------------------------------------------------------------------------- targets


def cpu_kv_space(environ: Mapping[str, str]) -> int | None:
    """Bytes of ``VLLM_CPU_KVCACHE_SPACE`` (GiB, an integer as vLLM reads it); None if unset.

    Raises:
        ConfigError: The value is not an integer (vLLM would crash on it).
    """
    raw = environ.get(CPU_KV_SPACE_ENV, "")
    if raw == "":
        return None
    try:
        return int(raw) * GiB
    except ValueError:
        raise ConfigError(
            f"{CPU_KV_SPACE_ENV}={raw!r} is not a whole number of GiB (vLLM reads it with int())"
        ) from None


def cpu_memory() -> tuple[int, int]:
    """(total, available) bytes of RAM as vLLM's CPU worker counts them.

    vLLM reads the NUMA node of the first CPU it may run on
    (``/sys/devices/system/node/nodeN/meminfo``; available = MemFree + Active(file) +
    Inactive(file) + SReclaimable) and clamps both to a cgroup memory limit
    (``vllm/utils/cpu_resource_utils.py``). The node can be much smaller than the machine.
    """
    node = 0
    try:
        cpu = min(os.sched_getaffinity(0))
        links = list(Path(f"/sys/devices/system/cpu/cpu{cpu}").glob("node[0-9]*"))
        if links:
            node = int(links[0].name[4:])
    except (AttributeError, OSError, ValueError):
        pass
    info: dict[str, int] = {}
    try:
        for line in Path(f"/sys/devices/system/node/node{node}/meminfo").read_text().splitlines():
            parts = line.split()
            if len(parts) >= 4 and parts[3].isdigit():
                info[parts[2].rstrip(":")] = int(parts[3]) * 1024
    except OSError:
        info = {}
    if "MemTotal" in info and "MemFree" in info:
        total = info["MemTotal"]
        available = info["MemFree"] + sum(
            info.get(k, 0) for k in ("Active(file)", "Inactive(file)", "SReclaimable"))
    else:
        import psutil

        vm = psutil.virtual_memory()
        total, available = vm.total, vm.available
    limit = _cgroup_limit()
    if limit is not None and limit < total:
        total = limit
        available = max(0, min(available, limit - (_cgroup_usage() or 0)))
    return total, available


def ram_target(environ: Mapping[str, str] | None = None, ram_freed: int = 0) -> MemoryTarget:
    """RAM as the target of the CPU build, measured the way vLLM measures it.

    Args:
        environ: The environment vLLM gets (default ``os.environ``).
        ram_freed: Bytes that count as available too (held by a server a restart stops).
    """
    total, available = cpu_memory()
    return MemoryTarget(
        device="cpu",
        memory_total=total,
        memory_free=min(total, available + max(0, ram_freed)),
        devices=1,
        description="RAM",
        cpu_kv_space=cpu_kv_space(environ if environ is not None else os.environ),
    )


def _read_int(path: str) -> int | None:
    try:
        text = Path(path).read_text().strip()
    except OSError:
        return None
    return int(text) if text.isdigit() else None


def _cgroup_limit() -> int | None:
    v2 = _read_int("/sys/fs/cgroup/memory.max")
    if v2 is not None:
        return v2
    v1 = _read_int("/sys/fs/cgroup/memory/memory.limit_in_bytes")
    return v1 if v1 is not None and v1 < (1 << 62) else None


def _cgroup_usage() -> int | None:
    return _read_int("/sys/fs/cgroup/memory.current") or _read_int(
        "/sys/fs/cgroup/memory/memory.usage_in_bytes"
    )


def visible_gpus(gpus: Sequence[GpuInfo], wanted: str | None) -> list[GpuInfo]:
    """The GPUs ``wanted`` names (indices or UUIDs, comma-separated), or all of them.

    Raises:
        ConfigError: ``wanted`` names a GPU that does not exist.
    """
    if not wanted:
        return list(gpus)
    chosen = []
    for part in wanted.split(","):
        part = part.strip()
        match = [g for g in gpus if str(g.index) == part or g.uuid == part]
        if not match:
            raise ConfigError(f"GPU {part!r} does not exist (cmw-vllm gpus lists them)")
        chosen.append(match[0])
    return chosen


def select_gpus(gpus: Sequence[GpuInfo], wanted: str | None, count: int) -> list[GpuInfo]:
    """The GPUs a server would use: the first ``count`` of :func:`visible_gpus`.

    Raises:
        InsufficientResourcesError: Fewer GPUs than tensor-parallel ranks.
        ConfigError: ``wanted`` names a GPU that does not exist.
    """
    chosen = visible_gpus(gpus, wanted)
    if len(chosen) < count:
        raise InsufficientResourcesError(
            f"--tensor-parallel-size {count} needs {count} GPUs but {len(chosen)} "
            f"{'is' if len(chosen) == 1 else 'are'} visible",
            hint=f"use --tensor-parallel-size {max(1, len(chosen))} or make more GPUs visible",
        )
    return chosen[:count]


def gpu_target(gpus: Sequence[GpuInfo], devices_available: int | None = None) -> MemoryTarget:
    """The smallest and least-free of ``gpus`` as the target (every rank must fit).

    Args:
        gpus: The GPUs the server will use, one per tensor-parallel rank.
        devices_available: GPUs it could use (default: ``len(gpus)``).
    """
    smallest = min(gpus, key=lambda g: g.memory_total or 0)
    least_free = min(gpus, key=lambda g: g.memory_free if g.memory_free is not None else 0)
    names = ", ".join(f"GPU {g.index}" for g in gpus)
    return MemoryTarget(
        device="gpu",
        memory_total=int(smallest.memory_total or 0),
        memory_free=None if least_free.memory_free is None else int(least_free.memory_free),
        devices=len(gpus),
        description=f"{names} ({smallest.name})",
        devices_available=len(gpus) if devices_available is None else devices_available,
    )


def given_gpu_target(memory_gb: float, devices: int = 1) -> MemoryTarget:
    """A GPU of ``memory_gb`` GiB given on the command line (assumed empty)."""
    total = int(memory_gb * GiB)
    return MemoryTarget(device="gpu", memory_total=total, memory_free=total, devices=devices,
                        description=f"{memory_gb:g} GiB GPU")


# --------------------------------------------------------------------------- the check


@dataclass
class PreflightResult:
    """What the check before ``start`` found (a refusal raises instead).

    Attributes:
        status: ``ok`` (it fits) or ``skipped`` (the estimate cannot model this model or
            these settings; vLLM is launched unchecked).
        device: ``gpu`` or ``cpu``; None when skipped before the target was measured.
        reason: Why the check was skipped, in words for the user.
    """

    status: Literal["ok", "skipped"]
    device: Device | None = None
    reason: str | None = None


def _human_int(text: str) -> int:
    """Parse vLLM's human-readable ints (``4G``, ``512M``, ``1024``)."""
    units = {"k": 10**3, "m": 10**6, "g": 10**9, "t": 10**12}
    binary = {"ki": 2**10, "mi": 2**20, "gi": 2**30, "ti": 2**40}
    t = text.strip().lower()
    for suffix, mult in binary.items():
        if t.endswith(suffix):
            return int(float(t[: -len(suffix)]) * mult)
    if t and t[-1] in units:
        return int(float(t[:-1]) * units[t[-1]])
    return int(t)


def settings_from_config(config: ServerConfig) -> tuple[EstimateSettings, str | None]:
    """Estimate settings (and the revision) from a server config and its extra vLLM flags.

    Raises:
        ConfigError: An extra flag's value cannot be read.
    """
    args = list(config.vllm_args)
    util = config.gpu_memory_utilization
    settings = EstimateSettings(
        max_model_len=config.max_model_len,
        tensor_parallel_size=config.tensor_parallel_size,
        dtype=config.dtype,
        gpu_memory_utilization=util if isinstance(util, float) else None,
    )
    try:
        if (value := flag_value(args, "--kv-cache-dtype")) is not None:
            settings.kv_cache_dtype = value
        if (value := flag_value(args, "--block-size")) is not None:
            settings.block_size = int(value)
        if (value := flag_value(args, "--max-num-batched-tokens")) is not None:
            settings.max_num_batched_tokens = _human_int(value)
        if (value := flag_value(args, "--kv-cache-memory-bytes")) is not None:
            settings.kv_cache_memory_bytes = _human_int(value)
    except ValueError as exc:
        raise ConfigError(f"cannot read an extra vLLM flag: {exc}") from None
    return settings, flag_value(args, "--revision")


def auto_concurrency(config: ServerConfig) -> int:
    """Full-length requests ``--gpu-memory-utilization auto`` sizes the KV cache for: vLLM's
    ``--max-num-seqs`` when given, else :data:`DEFAULT_AUTO_CONCURRENCY`."""
    raw = flag_value(list(config.vllm_args), "--max-num-seqs")
    try:
        return max(1, int(raw)) if raw is not None else DEFAULT_AUTO_CONCURRENCY
    except ValueError:
        return DEFAULT_AUTO_CONCURRENCY


def sized(spec: ModelSpec, settings: EstimateSettings, target: MemoryTarget,
          config: ServerConfig) -> tuple[EstimateSettings, float | None]:
    """``settings`` with the share ``auto`` chooses on ``target`` when ``config`` asks for it
    (and the KV bytes that go with it); also that share (None off a GPU)."""
    from dataclasses import replace

    from cmw_vllm.vocab import AUTO

    if target.device != "gpu":
        return settings, None
    share, kv_bytes = auto_utilization(spec, settings, target, auto_concurrency(config))
    if config.gpu_memory_utilization != AUTO:
        return settings, share
    return replace(settings, gpu_memory_utilization=share, kv_cache_memory_bytes=kv_bytes), share


def server_environ(config: ServerConfig, environ: Mapping[str, str] | None = None
                   ) -> dict[str, str]:
    """The environment vLLM gets: ``environ`` (default ``os.environ``) with ``config.env``."""
    env = dict(os.environ if environ is None else environ)
    env.update(config.env)
    return env


def machine_target(
    config: ServerConfig,
    environ: Mapping[str, str],
    *,
    gpus: Sequence[GpuInfo] | None = None,
    gpu_memory_gb: float | None = None,
    ram_freed: int = 0,
) -> MemoryTarget:
    """What ``config`` would run on: its GPUs (``--gpus``, else ``CUDA_VISIBLE_DEVICES``, else
    the first ones), a GPU of ``gpu_memory_gb`` GiB, or, without GPUs, RAM (with
    ``ram_freed`` bytes more available).

    Raises:
        InsufficientResourcesError: Fewer GPUs than tensor-parallel ranks.
        ConfigError: A GPU that does not exist, or ``VLLM_CPU_KVCACHE_SPACE`` not an integer.
    """
    tp = config.tensor_parallel_size
    if gpu_memory_gb is not None:
        return given_gpu_target(gpu_memory_gb, tp)
    if gpus is None:
        from cmw_vllm.gpu_info import query_gpus

        gpus = query_gpus(match_servers=False).gpus
    if not gpus:
        return ram_target(environ, ram_freed)
    wanted = config.gpus or environ.get("CUDA_VISIBLE_DEVICES") or None
    visible = visible_gpus(gpus, wanted)
    # Over several machines each node checks its own share: its GPUs (TP x PP / nnodes, times
    # its local DP copies), each holding 1/TP of the weights and KV cache.
    local = config.local_device_count()
    return gpu_target(select_gpus(visible, None, local), devices_available=len(visible))


def check_config(
    config: ServerConfig,
    *,
    gpus: Sequence[GpuInfo] | None = None,
    gpu_memory_gb: float | None = None,
    environ: Mapping[str, str] | None = None,
    concurrency_context: int | None = None,
    ram_freed: int = 0,
) -> MemoryEstimate:
    """Estimate ``config`` on this machine: the one computation of `estimate` and `start`.

    Args:
        config: The server (its fields, extra vLLM flags and ``env`` all count).
        gpus: The machine's GPUs (default: asked from NVML).
        gpu_memory_gb: Check against an empty GPU of this size instead of the machine.
        environ: The environment (default ``os.environ``); ``config.env`` goes on top.
        concurrency_context: Tokens per request for the concurrency figure.
        ram_freed: Bytes of RAM that count as available too (see :func:`ram_target`).

    Raises:
        NotFoundError: The model does not exist (not on disk, not on the Hub).
        ModelUnavailableError: Not on disk nor cached, and the Hub cannot be asked.
        UsageError: The config or settings are beyond what the estimate models.
        InsufficientResourcesError: Fewer GPUs than tensor-parallel ranks.
        ConfigError: A GPU that does not exist, an unreadable setting.
    """
    env = server_environ(config, environ)
    settings, revision = settings_from_config(config)
    settings.concurrency_context = concurrency_context
    spec = load_model_spec(config.model, revision=revision)
    if config.task != Task.GENERATE:
        spec.pooling = True
    target = machine_target(config, env, gpus=gpus, gpu_memory_gb=gpu_memory_gb,
                            ram_freed=ram_freed)
    settings, share = sized(spec, settings, target, config)
    est = estimate(spec, settings, target)
    est.gpu_memory_utilization_auto = share
    return est


def refusal_hint(est: MemoryEstimate, *, force: bool = True) -> str:
    """What to do when ``est`` does not fit: the settings that would, then other remedies."""
    parts = []
    if est.suggestions:
        shown = [f"`{s}`" + (" (the share of RAM on the CPU build)"
                             if est.device == "cpu" and "--gpu-memory-utilization" in s else "")
                 for s in est.suggestions]
        parts.append("try " + " or ".join(shown))
    too_big = est.weight_bytes + est.activation_bytes + est.runtime_bytes >= est.memory_total
    if not est.free_memory_ok and not too_big:
        parts.append("stop what holds the GPU (cmw-vllm gpus shows it)" if est.device == "gpu"
                     else "free RAM (stop other servers)")
    elif not est.suggestions:
        parts.append("use more or bigger GPUs" if est.device == "gpu"
                     else "use a machine with more RAM")
    if force:
        parts.append("pass --force to start anyway")
    return "; or ".join(parts)


def _refusal(est: MemoryEstimate, config: ServerConfig) -> InsufficientResourcesError:
    where = "RAM" if est.device == "cpu" else (est.target or "the GPU")
    per = " per GPU" if est.tensor_parallel_size > 1 else ""
    summary = (
        f"{config.model} will not fit in {where}: " + "; ".join(est.problems)
        + f" (weights {format_size(est.weight_bytes)}{per}, KV cache for max_model_len "
        f"{est.max_model_len} {format_size(est.kv_bytes_per_token * est.max_model_len)}, "
        f"KV space {format_size(max(est.kv_space, 0))})"
    )
    return InsufficientResourcesError(summary, hint=refusal_hint(est))


def preflight(
    config: ServerConfig,
    *,
    gpus: Sequence[GpuInfo] | None = None,
    environ: Mapping[str, str] | None = None,
    ram_freed: int = 0,
) -> PreflightResult:
    """Check that ``config`` fits this machine before vLLM spends minutes loading it.

    GPUs present: the GPUs the server will use must have the free memory that
    ``gpu_memory_utilization`` asks for, and weights + activations + the KV cache of one
    ``max_model_len`` request must fit in that budget. No GPU (the CPU build): RAM must hold
    the weights, the runtime and the KV space (``VLLM_CPU_KVCACHE_SPACE`` or vLLM's
    default of ``gpu_memory_utilization`` x RAM), and the KV space must hold one request.

    Args:
        config: The server about to be started.
        gpus: The machine's GPUs (default: asked from NVML).
        environ: The environment (default ``os.environ``); ``config.env`` goes on top.
        ram_freed: Bytes of RAM that count as available too: what a server that a restart
            stops first holds (GPU memory it holds is counted free in ``gpus``).

    Returns:
        ``ok``, or ``skipped`` with the reason when the estimate cannot model the model's
        config or the settings (vLLM is then the judge).

    Raises:
        InsufficientResourcesError: It does not fit; the message has the numbers and the
            hint the settings that would fit.
        ModelUnavailableError: The model is neither on disk nor cached and the Hub cannot
            be asked: vLLM could not load it either.
        NotFoundError: The model does not exist.
        ConfigError: A setting that vLLM would reject (``VLLM_CPU_KVCACHE_SPACE`` not an
            integer, a GPU that does not exist).
    """
    try:
        est = check_config(config, gpus=gpus, environ=environ, ram_freed=ram_freed)
    except ConfigError:
        raise
    except UsageError as exc:
        logger.info("memory check skipped for %s: %s", config.model, exc.message)
        return PreflightResult(status="skipped", reason=exc.message)
    if not est.fits:
        raise _refusal(est, config)
    return PreflightResult(status="ok", device=est.device)
