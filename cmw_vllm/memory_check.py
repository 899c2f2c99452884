"""Whether a server fits this machine: the one check behind `estimate` and `start`.

It measures the target (the GPUs a server will use, or RAM as vLLM's CPU build counts it),
reads the settings a :class:`~cmw_vllm.server_config.ServerConfig` gives vLLM (its own
fields and the extra vLLM flags that change memory), and hands both to the arithmetic in
:mod:`cmw_vllm.memory_estimate`.
"""

from __future__ import annotations

import logging
import math
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Literal

from cmw_vllm.errors import (
    ConfigError,
    EnvironmentProblem,
    InsufficientResourcesError,
    NotFoundError,
    UsageError,
)
from cmw_vllm.memory_estimate import (
    CPU_FRONTEND_BYTES,
    CPU_KV_SPACE_ENV,
    Device,
    EstimateSettings,
    MemoryEstimate,
    MemoryTarget,
    estimate,
)
from cmw_vllm.model_spec import load_model_spec
from cmw_vllm.vocab import GiB, format_size

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


def ram_target(environ: Mapping[str, str] | None = None) -> MemoryTarget:
    """RAM as the target of the CPU build, measured the way vLLM measures it."""
    total, available = cpu_memory()
    return MemoryTarget(
        device="cpu",
        memory_total=total,
        memory_free=available,
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


def select_gpus(gpus: Sequence[GpuInfo], wanted: str | None, count: int) -> list[GpuInfo]:
    """The GPUs a server would use: ``wanted`` (indices or UUIDs) or the first ones.

    Raises:
        InsufficientResourcesError: Fewer GPUs than tensor-parallel ranks.
        ConfigError: ``wanted`` names a GPU that does not exist.
    """
    chosen = list(gpus)
    if wanted:
        chosen = []
        for part in wanted.split(","):
            part = part.strip()
            match = [g for g in gpus if str(g.index) == part or g.uuid == part]
            if not match:
                raise ConfigError(f"GPU {part!r} does not exist (cmw-vllm gpus lists them)")
            chosen.append(match[0])
    if len(chosen) < count:
        raise InsufficientResourcesError(
            f"--tensor-parallel-size {count} needs {count} GPUs but {len(chosen)} "
            f"{'is' if len(chosen) == 1 else 'are'} visible",
            hint=f"use --tensor-parallel-size {max(1, len(chosen))} or make more GPUs visible",
        )
    return chosen[:count]


def gpu_target(gpus: Sequence[GpuInfo]) -> MemoryTarget:
    """The smallest and least-free of ``gpus`` as the target (every rank must fit)."""
    smallest = min(gpus, key=lambda g: g.memory_total or 0)
    least_free = min(gpus, key=lambda g: g.memory_free if g.memory_free is not None else 0)
    names = ", ".join(f"GPU {g.index}" for g in gpus)
    return MemoryTarget(
        device="gpu",
        memory_total=int(smallest.memory_total or 0),
        memory_free=None if least_free.memory_free is None else int(least_free.memory_free),
        devices=len(gpus),
        description=f"{names} ({smallest.name})",
    )


def given_gpu_target(memory_gb: float, devices: int = 1) -> MemoryTarget:
    """A GPU of ``memory_gb`` GiB given on the command line (assumed empty)."""
    total = int(memory_gb * GiB)
    return MemoryTarget(device="gpu", memory_total=total, memory_free=total, devices=devices,
                        description=f"{memory_gb:g} GiB GPU")


# --------------------------------------------------------------------------- preflight


@dataclass
class PreflightResult:
    """What the check before ``start`` found (a refusal raises instead).

    Attributes:
        status: ``ok`` (it fits) or ``unknown`` (the model's files could not be read).
        device: ``gpu`` or ``cpu``; None when unknown.
        estimate: The estimate behind an ``ok``.
        reason: Why the result is ``unknown``.
    """

    status: Literal["ok", "unknown"]
    device: Device | None = None
    estimate: MemoryEstimate | None = None
    reason: str | None = None

    @property
    def ok(self) -> bool:
        """True when the model was checked and fits."""
        return self.status == "ok"


def flag_value(args: Sequence[str], flag: str) -> str | None:
    """The value of the last ``flag VALUE`` or ``flag=VALUE`` in ``args``; None if absent."""
    value = None
    for i, arg in enumerate(args):
        if arg == flag and i + 1 < len(args):
            value = args[i + 1]
        elif arg.startswith(flag + "="):
            value = arg.split("=", 1)[1]
    return value


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
    settings = EstimateSettings(
        max_model_len=config.max_model_len,
        tensor_parallel_size=config.tensor_parallel_size,
        dtype=config.dtype,
        gpu_memory_utilization=config.gpu_memory_utilization,
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


def _refusal(est: MemoryEstimate, config: ServerConfig) -> InsufficientResourcesError:
    where = "RAM" if est.device == "cpu" else (est.target or "the GPU")
    per = " per GPU" if est.tensor_parallel_size > 1 else ""
    summary = (
        f"{config.model} will not fit in {where}: " + "; ".join(est.problems)
        + f" (weights {format_size(est.weight_bytes)}{per}, KV cache for max_model_len "
        f"{est.max_model_len} {format_size(est.kv_bytes_per_token * est.max_model_len)}, "
        f"KV space {format_size(max(est.kv_space, 0))})"
    )
    fixes: list[str] = []
    if not est.free_memory_ok and est.device == "gpu" and est.memory_free:
        frac = math.floor(est.memory_free / est.memory_total * 100) / 100
        if est.gpu_memory_utilization_needed and est.gpu_memory_utilization_needed <= frac:
            fixes.append(f"--gpu-memory-utilization {frac:g}")
        else:
            fixes.append("free the GPU (cmw-vllm gpus shows what holds it)")
    if not est.free_memory_ok and est.device == "cpu":
        spare = (est.memory_free or 0) - est.weight_bytes - est.activation_bytes - (
            est.runtime_bytes)
        if spare >= GiB:
            fixes.append(f"{CPU_KV_SPACE_ENV}={spare // GiB} (GiB of KV cache that fit)")
        else:
            fixes.append("free RAM (stop other servers)")
        if est.kv_space_source not in (CPU_KV_SPACE_ENV, "--kv-cache-memory-bytes") and (
            est.memory_free and est.memory_total
        ):
            frac = math.floor(
                (est.memory_free - CPU_FRONTEND_BYTES) / est.memory_total * 100) / 100
            if frac > 0:
                fixes.append(f"--gpu-memory-utilization {frac:g} (on the CPU build: the "
                             "share of RAM)")
    if est.max_model_len_that_fits and est.max_model_len_that_fits < est.max_model_len:
        fixes.append(f"--max-model-len {est.max_model_len_that_fits}")
    elif est.device == "gpu" and (
        est.gpu_memory_utilization_needed and est.gpu_memory_utilization_needed <= 1
        and est.free_memory_ok
    ):
        fixes.append(f"--gpu-memory-utilization {est.gpu_memory_utilization_needed:g}")
    if est.device == "gpu" and est.free_memory_ok:
        fixes.append(f"--tensor-parallel-size {est.tensor_parallel_size * 2}")
    fixes.append("--force to start anyway")
    return InsufficientResourcesError(summary, hint="try " + ", or ".join(fixes))


def preflight(
    config: ServerConfig,
    *,
    gpus: Sequence[GpuInfo] | None = None,
    environ: Mapping[str, str] | None = None,
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
        environ: The environment vLLM will get (default ``os.environ`` with
            ``config.env`` on top).

    Returns:
        ``ok`` with the estimate, or ``unknown`` when the model's files cannot be found
        locally and the Hub cannot be asked.

    Raises:
        InsufficientResourcesError: It does not fit; the message has the numbers and the
            hint the setting that would fit.
        ConfigError: A setting that vLLM would reject (``VLLM_CPU_KVCACHE_SPACE`` not an
            integer, a GPU that does not exist).
    """
    env: dict[str, str] = dict(os.environ if environ is None else environ)
    if environ is None:
        env.update(config.env)
    settings, revision = settings_from_config(config)
    try:
        spec = load_model_spec(config.model, revision=revision)
    except (NotFoundError, EnvironmentProblem, UsageError) as exc:
        logger.info("preflight skipped for %s: %s", config.model, exc.message)
        return PreflightResult(status="unknown", reason=exc.message)
    if config.task != "generate":
        spec.pooling = True
    if gpus is None:
        from cmw_vllm.gpu_info import query_gpus

        gpus = query_gpus(match_servers=False).gpus
    if gpus:
        wanted = config.gpus
        if wanted is None and env.get("CUDA_VISIBLE_DEVICES"):
            wanted = env["CUDA_VISIBLE_DEVICES"]
        chosen = select_gpus(gpus, wanted, config.tensor_parallel_size)
        target = gpu_target(chosen)
    else:
        target = ram_target(env)
    try:
        est = estimate(spec, settings, target)
    except UsageError as exc:
        return PreflightResult(status="unknown", device=target.device, reason=exc.message)
    if not est.fits:
        raise _refusal(est, config)
    return PreflightResult(status="ok", device=target.device, estimate=est)
