"""Time from a crash to healthy again under `--restart on-failure`, split into its parts.

    CMW_VLLM_PYTHON=.venv-vllm/bin/python .venv/bin/python bench/bench_restart.py [--crashes 2]

Starts the tiny random model of tests/tiny_model.py (made on the fly) with `--restart
on-failure` and a backoff of 0, then SIGKILLs the API server (which orphans EngineCore)
`--crashes` times, each once the server is healthy again. For each crash it prints:

- detection: SIGKILL -> the supervisor has seen the exit;
- cleanup: the crashed run's leftovers (EngineCore, workers) SIGKILLed and gone, port free;
- backoff: the wait the restart policy adds (0 here; 2 s doubling by default);
- vLLM load: relaunch -> first 200 of /health (a side poller every 5 ms);
- total: SIGKILL -> healthy again.

The supervisor's own timestamps come from the record (`restart_timing`). Figures, not
pass/fail; each crash costs one vLLM start (about a minute on 2 cores).
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from bench.bench_cli import cli_cmd, machine  # noqa: E402
from bench.bench_lifecycle import FirstHealthy, free_port  # noqa: E402


def read_record(env: dict[str, str], name: str) -> dict:
    return json.loads((Path(env["CMW_VLLM_HOME"]) / "servers" / f"{name}.json").read_text())


def crash_once(env: dict[str, str], name: str, port: int, count: int) -> dict[str, float]:
    """SIGKILL the API server; wait for restart number ``count`` to be healthy."""
    before = read_record(env, name)
    poller = FirstHealthy(port)
    killed_at = time.time()
    os.kill(before["pid"], signal.SIGKILL)
    deadline = time.time() + 900
    while True:
        rec = read_record(env, name)
        if rec.get("restart_count") == count and rec.get("pid") != before["pid"]:
            break
        if time.time() > deadline:
            raise RuntimeError("no restart within 900 s")
        time.sleep(0.01)
    poller.start()
    poller.join(timeout=900)
    if poller.at is None:
        raise RuntimeError("not healthy again within 900 s")
    timing = rec["restart_timing"]
    return {
        "detection": timing["detected_at"] - killed_at,
        "cleanup": timing["cleaned_at"] - timing["detected_at"],
        "backoff": timing["launched_at"] - timing["cleaned_at"],
        "vLLM load": poller.at - timing["launched_at"],
        "total": poller.at - killed_at,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", type=Path, help="model dir (default: make the tiny one)")
    parser.add_argument("--crashes", type=int, default=2)
    args = parser.parse_args()
    home = Path(tempfile.mkdtemp(prefix="cmw-bench-restart-"))
    env = {**os.environ, "CMW_VLLM_HOME": str(home / "state"), "HF_HOME": str(home / "hf"),
           "VLLM_CPU_KVCACHE_SPACE": os.environ.get("VLLM_CPU_KVCACHE_SPACE", "1"),
           "CMW_VLLM_RESTART_BACKOFF": "0"}
    model = args.model
    if model is None:
        from tests.tiny_model import make_tiny_model

        model = make_tiny_model(home / "tiny-qwen2")
    name, port = "bench-restart", free_port()
    print(machine())
    subprocess.run(cli_cmd("start", str(model), "--name", name, "--port", str(port),
                           "--max-model-len", "512", "--restart", "on-failure"),
                   env=env, check=True, capture_output=True)
    rows: list[dict[str, float]] = []
    try:
        for i in range(1, args.crashes + 1):
            rows.append(crash_once(env, name, port, i))
    finally:
        subprocess.run(cli_cmd("stop", name), env=env, check=False, capture_output=True)
    print(f"crash (SIGKILL of the API server) -> healthy again, {len(rows)} crashes, "
          "seconds (median, max):")
    for part in ("detection", "cleanup", "backoff", "vLLM load", "total"):
        values = [r[part] for r in rows]
        print(f"  {part:<10} {statistics.median(values):8.3f} {max(values):8.3f}")


if __name__ == "__main__":
    main()
