"""How fast the CLI answers: `status --json` and `--help`, and `status` with hung servers.

    .venv/bin/python bench/bench_cli.py [--runs 15] [--servers 20 --hung 5]
    .venv/bin/python bench/bench_cli.py --compare OTHER_CHECKOUT [--runs 21] [--recorded 2]

Prints the median wall time of each command (a fresh process per run, like a shell
script calls it) beside `python -c pass`, then the wall time of `status` over N managed
servers of which some accept connections and never answer (stand-in engine from
tests/fake_vllm, so no model is loaded). Figures, not pass/fail.

``--compare`` runs this checkout and another one (e.g. a worktree of an older commit)
with the same interpreter, alternating A B A B, each from its own empty ``CMW_VLLM_HOME``
(or one with ``--recorded`` healthy stand-in servers that checkout started), and prints
the wall time and the CPU time (user + sys of the child, which a loaded machine disturbs
far less than wall time) of each.
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


def bytecode_cached(env: os._Environ[str] | dict[str, str], cache: Path) -> dict[str, str]:
    """``env`` with bytecode caching on, in ``cache``, as after a pip install.

    Under ``PYTHONDONTWRITEBYTECODE`` every run compiles each changed module again, which
    measures the compiler, not the CLI; a private cache also keeps the checkouts untouched.
    """
    out = {k: v for k, v in env.items() if k not in ("PYTHONDONTWRITEBYTECODE", "VLLM_API_KEY")}
    out["PYTHONPYCACHEPREFIX"] = str(cache)
    return out


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


def run_once(cmd: list[str], env: dict[str, str], cwd: Path) -> tuple[float, float]:
    """Wall and CPU (user + sys) seconds of one run of ``cmd``, the child's own rusage.

    An exit code above 3 (3: `status` found no server) means the figure is of a failure.
    """
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, env=env, cwd=cwd, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    _, status, usage = os.wait4(proc.pid, 0)
    wall = time.perf_counter() - t0
    proc.returncode = os.waitstatus_to_exitcode(status)
    if proc.returncode > 3:
        raise SystemExit(f"{' '.join(cmd)} exited {proc.returncode} (PYTHONPATH="
                         f"{env.get('PYTHONPATH')})")
    return wall, usage.ru_utime + usage.ru_stime


def start_recorded(checkout: Path, count: int, env: dict[str, str], tmp: Path,
                   port: int) -> dict[str, str]:
    """Start ``count`` healthy stand-in servers with ``checkout``'s CLI; their environment."""
    wrapper = tmp / "fake-engine"
    fake = checkout / "tests" / "fake_vllm"
    wrapper.write_text(f'#!/bin/sh\nPYTHONPATH="{fake}" exec "{sys.executable}" "$@"\n')
    wrapper.chmod(0o755)
    model = tmp / "model"
    model.mkdir()
    (model / "config.json").write_text('{"architectures": ["Qwen2ForCausalLM"]}')
    run_env = {**env, "CMW_VLLM_PYTHON": str(wrapper), "FAKE_VLLM_DELAY": "0.2",
               "FAKE_VLLM_MODE": "ok"}
    for i in range(count):
        subprocess.run([sys.executable, "-m", "cmw_vllm", "start", str(model), "--name",
                        f"s{i}", "--port", str(port + i), "--force", "--auto-port"],
                       env=run_env, cwd=tmp, capture_output=True, check=True)
    return run_env


def bench_compare(other: Path, runs: int, recorded: int, port: int, tmp_root: Path) -> None:
    """This checkout (A) against ``other`` (B): same interpreter, runs alternating."""
    sides = {"A": REPO, "B": other.resolve()}
    empty: dict[str, dict[str, str]] = {}
    with_servers: dict[str, dict[str, str]] = {}
    for label, checkout in sides.items():
        tmp = tmp_root / label
        tmp.mkdir()
        env = {**bytecode_cached(os.environ, tmp / "pycache"), "CMW_VLLM_HOME": str(tmp / "home"),
               "PYTHONPATH": str(checkout)}
        where = subprocess.run([sys.executable, "-c", "import cmw_vllm; print(cmw_vllm.__file__)"],
                               env=env, cwd=tmp, capture_output=True, text=True, check=True)
        rev = subprocess.run(["git", "-C", str(checkout), "log", "-1", "--format=%h %s"],
                             capture_output=True, text=True, check=False).stdout.strip()
        print(f"{label}: {where.stdout.strip()} ({rev[:60]})")
        empty[label] = env
        if recorded:
            with_servers[label] = start_recorded(
                checkout, recorded, {**env, "CMW_VLLM_HOME": str(tmp / "home-servers")}, tmp, port)
            port += recorded + 10
    status = ["-m", "cmw_vllm", "status", "--json"]
    rows = [("python -c pass", ["-c", "pass"], empty),
            ("--version", ["-m", "cmw_vllm", "--version"], empty),
            ("status --json (no servers)", status, empty)]
    if recorded:
        rows.append((f"status --json ({recorded} servers)", status, with_servers))
    print(f"{'command':28} {'':2} {'wall median':>12} {'wall min':>9} {'cpu median':>11} "
          f"{'cpu min':>8}  (ms, {runs} runs each, A B alternating)")
    try:
        for label, args, envs in rows:
            figures: dict[str, list[tuple[float, float]]] = {"A": [], "B": []}
            for side in ("A", "B"):  # one warm-up each (bytecode caches)
                run_once([sys.executable, *args], envs[side], tmp_root / side)
            for i in range(runs):
                order = ("A", "B") if i % 2 == 0 else ("B", "A")
                for side in order:
                    figures[side].append(
                        run_once([sys.executable, *args], envs[side], tmp_root / side))
            for side in ("A", "B"):
                wall = [w * 1000 for w, _ in figures[side]]
                cpu = [c * 1000 for _, c in figures[side]]
                print(f"{label:28} {side:2} {statistics.median(wall):12.1f} {min(wall):9.1f} "
                      f"{statistics.median(cpu):11.1f} {min(cpu):8.1f}")
    finally:
        for side, env in with_servers.items():
            subprocess.run([sys.executable, "-m", "cmw_vllm", "stop", "--all"], env=env,
                           cwd=tmp_root / side, capture_output=True, check=False)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=15)
    parser.add_argument("--servers", type=int, default=20)
    parser.add_argument("--hung", type=int, default=5)
    parser.add_argument("--compare", type=Path, metavar="CHECKOUT",
                        help="compare this checkout (A) with another one (B)")
    parser.add_argument("--recorded", type=int, default=0,
                        help="with --compare: healthy stand-in servers each side starts first")
    parser.add_argument("--port", type=int, default=18380,
                        help="with --compare --recorded: the first port to try")
    args = parser.parse_args()
    print(machine())
    if args.compare:
        with tempfile.TemporaryDirectory() as d:
            bench_compare(args.compare, args.runs, args.recorded, args.port, Path(d))
        return
    with tempfile.TemporaryDirectory() as d:
        tmp = Path(d)
        env = {**bytecode_cached(os.environ, tmp / "pycache"), "CMW_VLLM_HOME": str(tmp / "home")}
        bench_startup(args.runs, env)
        if args.servers:
            bench_hung(args.servers, args.hung, env, tmp)


if __name__ == "__main__":
    main()
