"""scripts/gpu_check.sh, the check for a real GPU, runs end to end here: against a simulated
GPU (tests/gpu/simulated: NVML and torch that see what the processes' command lines
allocate), and without a GPU, where it says so and exits 0."""

from __future__ import annotations

import os
import subprocess
import sys
import uuid
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def run_script(tmp_path: Path, pythonpath: Path) -> tuple[int, str]:
    env = {**os.environ, "PYTHON": sys.executable, "OUT": str(tmp_path / "out"),
           "PYTHONPATH": str(pythonpath), "CMW_GPU_SIM_TOKEN": uuid.uuid4().hex,
           "GPU_CHECK_REPEAT": "1"}
    proc = subprocess.run(["bash", str(ROOT / "scripts" / "gpu_check.sh")], env=env,
                          capture_output=True, text=True, timeout=300,
                          stdin=subprocess.DEVNULL)
    report = (tmp_path / "out" / "report.txt").read_text()
    assert (tmp_path / "out" / "details.txt").exists() or "no GPU" in report
    return proc.returncode, report


def test_gpu_check_on_a_simulated_gpu(tmp_path: Path) -> None:
    code, report = run_script(tmp_path, ROOT / "tests" / "gpu" / "simulated")
    assert code == 0, report
    steps = [line.split(":")[0] for line in report.splitlines() if line.startswith("PASS")]
    assert steps == [
        "PASS estimate 8B on a given 141 GiB GPU", "PASS gpus",
        "PASS setup --json", "PASS estimate 8B on this GPU",
        "PASS start g1 (engine holds 6 GiB)", "PASS status shows g1's 6 GiB",
        "PASS gpus matches the EngineCore to g1", "PASS foreign process holds most of the GPU",
        "PASS estimate 8B with the GPU held", "PASS start 8B refused before launch, with a "
        "hint that fits", "PASS start 8B with the suggested setting",
        "PASS status --json after SIGKILL of g1's API server",
        "PASS setup names g1's leftovers", "PASS stop --all frees the GPU",
        "PASS start pk1 with --gpu-memory-utilization auto on GPU 0",
        "PASS start pk2 with --gpu-memory-utilization auto on GPU 0",
        "PASS two auto-sized servers share GPU 0"], report
    assert report.rstrip().endswith("ALL PASSED")


def test_gpu_check_without_a_gpu_says_so(tmp_path: Path) -> None:
    no_gpu = tmp_path / "nvml"
    no_gpu.mkdir()
    (no_gpu / "pynvml.py").write_text(
        "class NVMLError(Exception):\n    pass\n\n\n"
        "def nvmlInit():\n    raise NVMLError('Driver Not Loaded')\n")
    code, report = run_script(tmp_path, no_gpu)
    assert code == 0, report
    assert "no GPU: no NVIDIA GPU found (NVML: Driver Not Loaded)" in report
    assert "FAIL" not in report
