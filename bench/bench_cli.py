"""How fast the CLI answers: `status --json` and `--help`, and `status` with hung servers.

    .venv/bin/python bench/bench_cli.py [--runs 15] [--servers 20 --hung 5]

Prints the median wall time of each command (a fresh process per run, like a shell
script calls it) beside `python -c pass`, then the wall time of `status` over N managed
servers of which some accept connections and never answer (stand-in engine from
tests/fake_vllm, so no model is loaded). Figures, not pass/fail.
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
FAKE_VLLM = REPO / "tests" / "fake_vllm"


def machine() -> str:
    """One line about the machine the figures come from."""
    return (f"{platform.node()}: {os.cpu_count()} CPUs, {platform.machine()}, "
            f"Python {platform.python_version()}, {platform.system()} {platform.release()}")


def timed_runs(cmd: list[str], runs: int, env: dict[str, str]) -> list[float]:
    """Wall seconds of ``runs`` fresh runs of ``cmd`` (one warm-up run first)."""
    subprocess.run(cmd, capture_output=True, env=env, check=False)
    out = []
    for _ in range(runs):
        t0 = time.perf_counter()
        subprocess.run(cmd, capture_output=True, env=env, check=False)
        out.append(time.perf_counter() - t0)
    return out


def cli_cmd(*args: str) -> list[str]:
    """The installed console script when present, else ``python -m cmw_vllm``."""
    script = Path(sys.executable).with_name("cmw-vllm")
    return [str(script), *args] if script.exists() else [sys.executable, "-m", "cmw_vllm", *args]


def bench_startup(runs: int, env: dict[str, str]) -> None:
    rows = [
        ("python -c pass", [sys.executable, "-c", "pass"]),
        ("cmw-vllm --version", cli_cmd("--version")),
        ("cmw-vllm --help", cli_cmd("--help")),
        ("cmw-vllm status --json (no servers)", cli_cmd("status", "--json")),
    ]
    print(f"{'command':42} {'median':>9} {'min':>9} {'max':>9}  (ms, {runs} runs)")
    for label, cmd in rows:
        ts = timed_runs(cmd, runs, env)
        print(f"{label:42} {statistics.median(ts) * 1000:9.1f} {min(ts) * 1000:9.1f} "
              f"{max(ts) * 1000:9.1f}")


def bench_hung(servers: int, hung: int, env: dict[str, str], tmp: Path) -> None:
    wrapper = tmp / "fake-engine"
    wrapper.write_text(f'#!/bin/sh\nPYTHONPATH="{FAKE_VLLM}" exec "{sys.executable}" "$@"\n')
    wrapper.chmod(0o755)
    model = tmp / "model"
    model.mkdir()
    (model / "config.json").write_text('{"architectures": ["Qwen2ForCausalLM"]}')
    base_env = {**env, "CMW_VLLM_PYTHON": str(wrapper), "FAKE_VLLM_DELAY": "0.2"}
    try:
        for i in range(servers):
            mode = "hang" if i < hung else "ok"
            subprocess.run(
                cli_cmd("start", str(model), "--name", f"s{i:02d}", "--port", str(18400 + i),
                        "--no-wait", "--force", "--auto-port"),  # other runs may hold ports
                env={**base_env, "FAKE_VLLM_MODE": mode}, capture_output=True, check=True,
            )
        time.sleep(3)  # let them all get to "serving" (or hanging)
        timeout = float(env.get("CMW_VLLM_HEALTH_TIMEOUT", "2"))
        ts = timed_runs(cli_cmd("status", "--json"), 3, base_env)
        print(f"status --json over {servers} servers, {hung} hung, health timeout "
              f"{timeout:g}s: median {statistics.median(ts):.2f}s "
              f"(min {min(ts):.2f}s, max {max(ts):.2f}s)")
    finally:
        subprocess.run(cli_cmd("stop", "--all", "--timeout", "2"), env=base_env,
                       capture_output=True, check=False)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=15)
    parser.add_argument("--servers", type=int, default=20)
    parser.add_argument("--hung", type=int, default=5)
    args = parser.parse_args()
    print(machine())
    with tempfile.TemporaryDirectory() as d:
        tmp = Path(d)
        env = {**os.environ, "CMW_VLLM_HOME": str(tmp / "home")}
        env.pop("VLLM_API_KEY", None)
        bench_startup(args.runs, env)
        if args.servers:
            bench_hung(args.servers, args.hung, env, tmp)


if __name__ == "__main__":
    main()
