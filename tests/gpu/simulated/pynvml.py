"""A simulated NVML for the GPU check's own test: one 140 GiB GPU.

Its processes are those of this run (``CMW_GPU_SIM_TOKEN`` in their environment) whose
command line allocates with ``torch.empty``: the stand-in engine (``int(GIB * 2**30)``, or
its share of the total, ``int(SHARE * torch.cuda.mem_get_info()[1])``) and the foreign
holder (a byte count). Each also holds a CUDA context of 500 MiB.
"""

from __future__ import annotations

import os
import re
from types import SimpleNamespace

import psutil

GiB = 2**30
TOTAL = 140 * GiB
CONTEXT = 500 * 2**20
NVML_TEMPERATURE_GPU = 0


class NVMLError(Exception):
    """NVML's error class."""


def _procs() -> list[SimpleNamespace]:
    token = os.environ.get("CMW_GPU_SIM_TOKEN")
    out = []
    for proc in psutil.process_iter():
        try:
            cmd = " ".join(proc.cmdline())
            if token is None or proc.environ().get("CMW_GPU_SIM_TOKEN") != token:
                continue
        except psutil.Error:
            continue
        gib = re.search(r"torch\.empty\(int\(([\d.]+) \* 2\*\*30\)", cmd)
        share = re.search(r"torch\.empty\(int\(([\d.]+) \* torch\.cuda\.mem_get_info", cmd)
        count = re.search(r"torch\.empty\((\d+),", cmd)
        if gib:
            held = int(float(gib.group(1)) * GiB)
        elif share:
            held = int(float(share.group(1)) * TOTAL)
        elif count:
            held = int(count.group(1))
        else:
            continue
        out.append(SimpleNamespace(pid=proc.pid, usedGpuMemory=held + CONTEXT))
    return out


def nvmlInit() -> None:  # noqa: N802 - NVML's names
    pass


def nvmlShutdown() -> None:  # noqa: N802
    pass


def nvmlSystemGetDriverVersion() -> str:  # noqa: N802
    return "580.0"


def nvmlSystemGetCudaDriverVersion() -> int:  # noqa: N802
    return 13000


def nvmlDeviceGetCount() -> int:  # noqa: N802
    return 1


def nvmlDeviceGetHandleByIndex(index: int) -> int:  # noqa: N802
    return index


def nvmlDeviceGetName(_handle: int) -> str:  # noqa: N802
    return "Simulated H200"


def nvmlDeviceGetUUID(_handle: int) -> str:  # noqa: N802
    return "GPU-simulated-0"


def nvmlDeviceGetMemoryInfo(_handle: int) -> SimpleNamespace:  # noqa: N802
    used = sum(p.usedGpuMemory for p in _procs()) + CONTEXT
    return SimpleNamespace(total=TOTAL, used=used, free=TOTAL - used)


def nvmlDeviceGetUtilizationRates(_handle: int) -> SimpleNamespace:  # noqa: N802
    return SimpleNamespace(gpu=0, memory=0)


def nvmlDeviceGetTemperature(_handle: int, _sensor: int) -> int:  # noqa: N802
    return 30


def nvmlDeviceGetPowerUsage(_handle: int) -> int:  # noqa: N802
    return 100_000


def nvmlDeviceGetEnforcedPowerLimit(_handle: int) -> int:  # noqa: N802
    return 700_000


def nvmlDeviceGetComputeRunningProcesses(_handle: int) -> list[SimpleNamespace]:  # noqa: N802
    return _procs()


def nvmlDeviceGetGraphicsRunningProcesses(_handle: int) -> list[SimpleNamespace]:  # noqa: N802
    return []
