"""A simulated NVML with several GPUs, for the placement tests (never part of the product).

Put this directory first on ``PYTHONPATH`` (or in ``sys.path``) and point
``CMW_FAKE_NVML`` at a JSON file::

    {"gpus": [{"name": "Sim H100", "total_gib": 80}, ...],
     "foreign": [{"gpu": 0, "gib": 70}],            # other programs' memory
     "links": [[0, 1, "NVLINK"], [2, 3, "PIX"]],    # others: "SYS"
     "hold_after": 0}                               # seconds before an engine holds memory

The GPU memory of the stand-in engines (``tests/fake_vllm``) is what vLLM would take: each
``VLLM::EngineCore`` whose environment has the same ``CMW_FAKE_NVML`` holds
``--gpu-memory-utilization`` (default 0.92) of each of the first ``--tensor-parallel-size``
GPUs of its ``CUDA_VISIBLE_DEVICES`` (default ``0``), plus a 512 MiB CUDA context, once it
has run for ``hold_after`` seconds (a loading server holds nothing yet).
"""

from __future__ import annotations

import json
import os
import time
from types import SimpleNamespace
from typing import Any

import psutil

GiB = 2**30
CONTEXT = 512 * 2**20
NVML_TEMPERATURE_GPU = 0
NVML_P2P_CAPS_INDEX_NVLINK = 2
NVML_P2P_STATUS_OK = 0
NVML_P2P_STATUS_NOT_SUPPORTED = 5
_LEVELS = {"PIX": 10, "PXB": 20, "PHB": 30, "NODE": 40, "SYS": 50}
FOREIGN_PID_BASE = 3_900_000  # pids no process has (pid_max is 4194304)

_state: dict[str, Any] = {}


class NVMLError(Exception):
    """NVML's error class."""


def _flag(cmd: list[str], name: str) -> str | None:
    for i, part in enumerate(cmd):
        if part == name and i + 1 < len(cmd):
            return cmd[i + 1]
        if part.startswith(name + "="):
            return part.split("=", 1)[1]
    return None


def _engines(path: str, gpus: list[dict[str, Any]], hold_after: float
             ) -> dict[int, list[tuple[int, int]]]:
    out: dict[int, list[tuple[int, int]]] = {i: [] for i in range(len(gpus))}
    now = time.time()
    for proc in psutil.process_iter(["cmdline"]):
        try:
            cmd = proc.info["cmdline"] or []
            if not cmd or not cmd[0].startswith("VLLM::EngineCore"):
                continue
            env = proc.environ()
            if env.get("CMW_FAKE_NVML") != path or now - proc.create_time() < hold_after:
                continue
            parent = proc.parent()
            args = parent.cmdline() if parent is not None else []
        except psutil.Error:
            continue
        share = float(_flag(args, "--gpu-memory-utilization") or 0.92)
        tp = int(_flag(args, "--tensor-parallel-size") or 1)
        visible = [int(p) for p in env.get("CUDA_VISIBLE_DEVICES", "0").split(",") if p]
        for index in visible[:tp]:
            if 0 <= index < len(gpus):
                out[index].append((proc.pid, int(gpus[index]["total_gib"] * GiB * share)
                                   + CONTEXT))
    return out


def nvmlInit() -> None:  # noqa: N802 - NVML's names
    path = os.environ.get("CMW_FAKE_NVML")
    if not path:
        raise NVMLError("Driver Not Loaded")
    with open(path) as f:
        spec = json.load(f)
    gpus = spec["gpus"]
    procs = _engines(path, gpus, float(spec.get("hold_after", 0)))
    for n, item in enumerate(spec.get("foreign", [])):
        procs[item["gpu"]].append((FOREIGN_PID_BASE + n, int(item["gib"] * GiB)))
    links = {}
    for a, b, kind in spec.get("links", []):
        links[frozenset((a, b))] = kind
    _state.update(gpus=gpus, procs=procs, links=links)


def nvmlShutdown() -> None:  # noqa: N802
    _state.clear()


def nvmlSystemGetDriverVersion() -> str:  # noqa: N802
    return "580.0"


def nvmlSystemGetCudaDriverVersion() -> int:  # noqa: N802
    return 13000


def nvmlDeviceGetCount() -> int:  # noqa: N802
    return len(_state["gpus"])


def nvmlDeviceGetHandleByIndex(index: int) -> int:  # noqa: N802
    if not 0 <= index < len(_state["gpus"]):
        raise NVMLError("Invalid Argument")
    return index


def nvmlDeviceGetName(handle: int) -> str:  # noqa: N802
    return str(_state["gpus"][handle].get("name", "Simulated H100"))


def nvmlDeviceGetUUID(handle: int) -> str:  # noqa: N802
    return f"GPU-sim-{handle}"


def nvmlDeviceGetPciInfo(handle: int) -> SimpleNamespace:  # noqa: N802
    return SimpleNamespace(busId=f"00000000:{handle + 0x10:02X}:00.0")


def nvmlDeviceGetMemoryInfo(handle: int) -> SimpleNamespace:  # noqa: N802
    total = int(_state["gpus"][handle]["total_gib"] * GiB)
    used = min(total, sum(b for _p, b in _state["procs"][handle]))
    return SimpleNamespace(total=total, used=used, free=total - used)


def nvmlDeviceGetUtilizationRates(_handle: int) -> SimpleNamespace:  # noqa: N802
    return SimpleNamespace(gpu=0, memory=0)


def nvmlDeviceGetTemperature(_handle: int, _sensor: int) -> int:  # noqa: N802
    return 30


def nvmlDeviceGetPowerUsage(_handle: int) -> int:  # noqa: N802
    return 100_000


def nvmlDeviceGetEnforcedPowerLimit(_handle: int) -> int:  # noqa: N802
    return 700_000


def nvmlDeviceGetComputeRunningProcesses(handle: int) -> list[SimpleNamespace]:  # noqa: N802
    return [SimpleNamespace(pid=p, usedGpuMemory=b) for p, b in _state["procs"][handle]]


def nvmlDeviceGetGraphicsRunningProcesses(_handle: int) -> list[SimpleNamespace]:  # noqa: N802
    return []


def _link(a: int, b: int) -> str:
    return str(_state["links"].get(frozenset((a, b)), "SYS"))


def nvmlDeviceGetP2PStatus(a: int, b: int, index: int) -> int:  # noqa: N802
    if index == NVML_P2P_CAPS_INDEX_NVLINK and _link(a, b) == "NVLINK":
        return NVML_P2P_STATUS_OK
    return NVML_P2P_STATUS_NOT_SUPPORTED


def nvmlDeviceGetTopologyCommonAncestor(a: int, b: int) -> int:  # noqa: N802
    link = _link(a, b)
    return _LEVELS.get(link, 10)  # NVLink pairs usually share a switch too
