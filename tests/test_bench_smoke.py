"""The benchmarks run and print their figures (a smoke check: no timing is asserted)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from tests.conftest import REPO_ROOT


def bench(script: str, *args: str, env: dict[str, str] | None = None) -> str:
    proc = subprocess.run([sys.executable, str(REPO_ROOT / "bench" / script), *args],
                          capture_output=True, text=True, timeout=900, cwd=REPO_ROOT,
                          env={**os.environ, **(env or {})}, check=False)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc.stdout


def test_bench_cli_smoke() -> None:
    out = bench("bench_cli.py", "--runs", "2", "--servers", "3", "--hung", "1")
    assert "CPUs" in out
    assert "status --json (no servers)" in out
    assert "over 3 servers, 1 hung" in out


def test_bench_cli_compare_smoke() -> None:
    """Two checkouts (here the same one twice), alternating: wall and CPU of each side."""
    out = bench("bench_cli.py", "--compare", str(REPO_ROOT), "--runs", "1")
    for side in ("A", "B"):
        assert f"{side}: {REPO_ROOT / 'cmw_vllm' / '__init__.py'}" in out
        assert any(line.startswith("status --json (no servers)") and f" {side} " in line
                   for line in out.splitlines())
    assert "cpu median" in out


def test_bench_verify_smoke() -> None:
    out = bench("bench_verify.py", "--size-mb", "8", "--files", "2", "--repeat", "1")
    assert "sha256sum" in out


def test_bench_download_smoke() -> None:
    out = bench("bench_download.py", "--size-mb", "4", "--shards", "2", "--repeat", "1")
    assert "hf download" in out


def test_bench_lifecycle_smoke(fake_engine: Path, model_dir: Path) -> None:
    """On the stand-in engine: each real vLLM start costs a minute, and the bench makes five
    (run it on real vLLM for the figures; the suite's real tests cover the same paths)."""
    out = bench("bench_lifecycle.py", "--overhead-runs", "1", "--stop-runs", "1",
                "--model", str(model_dir),
                env={"CMW_VLLM_DRAIN_TIMEOUT": "1"})  # the frozen server's stop: no 30 s drain
    for figure in ("exit -> report", "first 200 of /health", "stop of an idle server",
                   "ignoring SIGTERM", "start overhead"):
        assert figure in out


def test_bench_restart_smoke(fake_engine: Path, model_dir: Path) -> None:
    """On the stand-in engine (the figures that matter come from real vLLM)."""
    out = bench("bench_restart.py", "--crashes", "1", "--model", str(model_dir))
    for part in ("detection", "cleanup", "backoff", "vLLM load", "total"):
        assert part in out


def test_bench_gateway_smoke(fake_engine: Path, model_dir: Path) -> None:
    """On the stand-in engine, which answers streams too (real vLLM: `bench_gateway.py`)."""
    out = bench("bench_gateway.py", "--model", str(model_dir), "--router", "",
                "--requests", "10", "--ttft-runs", "3", "--streams", "4", "--tokens", "8",
                "--rounds", "2", "--disconnects", "0")  # the stand-in's gauges are fixed
    assert "round 2: direct" in out
    rows = [line.split("|") for line in out.splitlines() if line.startswith("| ")]
    assert [row[1].strip() for row in rows] == ["path", "direct", "`cmw-vllm gateway`"]
    gateway = [cell.strip() for cell in rows[2]]
    assert float(gateway[8]) > 0  # tok/s through the gateway
    assert float(gateway[10]) > 0 and float(gateway[11]) > 0  # its CPU per request, token


def test_bench_dashboard_smoke() -> None:
    out = bench("bench_dashboard.py", "--servers", "3", "--requests", "20", "--loads", "1")
    assert "| GET /api/state p99 |" in out and "page first" in out


def test_bench_placement_smoke() -> None:
    """Placement timings on the simulated NVML (stand-in engines, no GPU)."""
    out = bench("bench_placement.py", "--gpus", "4", "--servers", "3", "--runs", "2")
    assert "4 simulated GPUs" in out
    for tp in (1, 2, 4):
        assert f"placement TP {tp} (-> GPU " in out


def test_bench_lora_smoke(fake_engine: Path) -> None:
    """On the stand-in engine, which loads adapters at run time too (real vLLM: the same)."""
    out = bench("bench_lora.py", "--adapters", "1")
    rows = [line.split("|") for line in out.splitlines() if line.startswith("| ")]
    assert [row[1].strip() for row in rows][1:] == [
        "first request of an adapter loaded at run time", "second request of that adapter",
        "adapter loaded at start (warm)"]
    assert all(row[2].strip().endswith(" ms") for row in rows[1:])


def test_bench_gateway_cpu_smoke() -> None:
    out = bench("bench_gateway_cpu.py", "--requests", "100", "--rounds", "1", "--router", "")
    assert "| 1 | `cmw-vllm gateway` |" in out and "CPU µs/request" in out
