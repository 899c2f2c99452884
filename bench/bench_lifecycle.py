"""What cmw-vllm adds around real vLLM: readiness latency, failure latency, stop, overhead.

    CMW_VLLM_PYTHON=.venv-vllm/bin/python .venv/bin/python bench/bench_lifecycle.py [--model DIR]

Uses the tiny random model of tests/tiny_model.py (made on the fly) and the CPU build
unless CMW_VLLM_PYTHON points elsewhere. Prints, with the machine:

- ready -> return: from the first 200 of /health (a side poller every 5 ms) to `start`
  returning;
- exit -> report: from vLLM's exit during start-up (bad flag; the supervisor's exit
  record) to `start` returning its error;
- stop: graceful `stop` of an idle server (started with the default drain) until `stop`
  returns and until no process of the server is left, a few times (``--stop-runs``; with
  ``--only-idle-stop`` nothing else); and `stop --timeout 2` of a server frozen with SIGSTOP
  (ignores SIGTERM) until all are gone;
- start overhead: `cmw-vllm start` to healthy minus the same vLLM command launched by hand
  and polled every 100 ms (each run separately, alternating).
Takes several minutes (each vLLM start is about a minute on 2 cores). Figures, not pass/fail.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from bench.bench_cli import cli_cmd, machine  # noqa: E402


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def health_ok(port: int) -> bool:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=1) as r:
            return r.status == 200
    except OSError:
        return False


class FirstHealthy(threading.Thread):
    """Polls /health every 5 ms and remembers when it first answered 200."""

    def __init__(self, port: int) -> None:
        super().__init__(daemon=True)
        self.port = port
        self.at: float | None = None
        self.stop_flag = False

    def run(self) -> None:
        while not self.stop_flag and self.at is None:
            if health_ok(self.port):
                self.at = time.time()
            else:
                time.sleep(0.005)


def record(env: dict[str, str], name: str) -> dict:
    return json.loads((Path(env["CMW_VLLM_HOME"]) / "servers" / f"{name}.json").read_text())


def group_alive(pgid: int) -> list[int]:
    import psutil

    out = []
    for p in psutil.process_iter(["status"]):
        try:
            if os.getpgid(p.pid) == pgid and p.info["status"] != psutil.STATUS_ZOMBIE:
                out.append(p.pid)
        except OSError:
            pass
    return out


def wait_group_gone(pgid: int, limit: float = 60) -> float:
    t0 = time.time()
    while group_alive(pgid) and time.time() - t0 < limit:
        time.sleep(0.02)
    return time.time()


def cmw_start(env: dict[str, str], model: Path, name: str, port: int,
              watch: bool = True) -> tuple[float, float]:
    """Run `start`; returns (seconds to return, first-200 to return).

    ``watch`` runs the 5 ms /health poller; it costs CPU that the engine's own start-up
    competes for, so the overhead comparison runs without it.
    """
    poller = FirstHealthy(port)
    if watch:
        poller.start()
    t0 = time.time()
    subprocess.run(cli_cmd("start", str(model), "--name", name, "--port", str(port),
                           "--max-model-len", "512"), env=env, check=True, capture_output=True)
    t1 = time.time()
    if watch:
        poller.join(timeout=5)
    poller.stop_flag = True
    lag = t1 - poller.at if poller.at else float("nan")
    return t1 - t0, lag


def manual_start(env: dict[str, str], python: str, model: Path, port: int) -> float:
    """Launch the same vLLM command by hand, poll every 100 ms, return seconds to healthy."""
    from cmw_vllm.vllm_engine import build_command

    cmd = build_command(python, str(model),
                        ["--host", "127.0.0.1", "--port", str(port), "--max-model-len", "512"])
    t0 = time.time()
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            start_new_session=True)
    try:
        while not health_ok(port):
            if proc.poll() is not None:
                raise RuntimeError("vLLM exited")
            time.sleep(0.1)
        return time.time() - t0
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait()
        wait_group_gone(proc.pid)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", type=Path, help="model dir (default: make the tiny one)")
    parser.add_argument("--overhead-runs", type=int, default=2)
    parser.add_argument("--only-overhead", action="store_true",
                        help="skip the latency and stop figures")
    parser.add_argument("--only-idle-stop", action="store_true",
                        help="only the stop of an idle server")
    parser.add_argument("--stop-runs", type=int, default=2,
                        help="idle stops to time (one vLLM start each)")
    args = parser.parse_args()
    print(machine())
    python = os.environ.get("CMW_VLLM_PYTHON") or str(REPO / ".venv-vllm" / "bin" / "python")
    with tempfile.TemporaryDirectory() as d:
        tmp = Path(d)
        model = args.model
        if model is None:
            from tests.tiny_model import make_tiny_model

            model = make_tiny_model(tmp / "tiny")
        env = {**os.environ, "CMW_VLLM_HOME": str(tmp / "home"), "CMW_VLLM_PYTHON": python,
               "VLLM_CPU_KVCACHE_SPACE": os.environ.get("VLLM_CPU_KVCACHE_SPACE", "1")}

        if args.only_idle_stop:
            idle_stop(env, model, args.stop_runs)
            return
        if not args.only_overhead:
            latencies(env, model)
            idle_stop(env, model, args.stop_runs)
        overhead(env, python, model, args.overhead_runs)


def latencies(env: dict[str, str], model: Path) -> None:
    """Failure and readiness latency, graceful and forced stop."""
    tmp = Path(env["CMW_VLLM_HOME"]).parent
    # Failure during start-up: vLLM exits on a bad flag.
    t0 = time.time()
    subprocess.run(cli_cmd("start", str(model), "--name", "bad", "--port",
                           str(free_port()), "--", "--not-a-flag"),
                   env=env, capture_output=True, check=False)
    returned = time.time()
    exit_rec = tmp / "home" / "servers" / "bad.exit"
    ended = json.loads(exit_rec.read_text())["ended_at"] if exit_rec.exists() else None
    if ended:
        print(f"exit -> report: {returned - ended:.3f}s (vLLM ran {ended - t0:.1f}s)")
    else:
        # The record is cleaned up after the failure; use the log's mtime instead.
        log = tmp / "home" / "logs" / "bad.log"
        print(f"exit -> report: {returned - log.stat().st_mtime:.3f}s "
              f"(upper bound, from the log's last write)")

    # Readiness latency and graceful stop.
    port = free_port()
    total, lag = cmw_start(env, model, "tiny", port)
    print(f"start -> ready: {total:.1f}s; first 200 of /health -> start returned: "
          f"{lag:.3f}s")
    subprocess.run(cli_cmd("stop", "tiny"), env=env, check=True, capture_output=True)

    # A server that ignores SIGTERM (frozen with SIGSTOP): stop --timeout 2.
    port = free_port()
    cmw_start(env, model, "frozen", port)
    rec = record(env, "frozen")
    os.kill(rec["pid"], signal.SIGSTOP)
    t0 = time.time()
    subprocess.run(cli_cmd("stop", "frozen", "--timeout", "2"), env=env, check=True,
                   capture_output=True)
    gone = wait_group_gone(rec["pgid"])
    print(f"stop --timeout 2 of a server ignoring SIGTERM: gone after {gone - t0:.2f}s")



def idle_stop(env: dict[str, str], model: Path, runs: int) -> None:
    """`stop` of a ready server with nothing in flight (launched with the default drain)."""
    returned, gone_after, skipped = [], [], []
    for i in range(runs):
        name = f"idle{i}"
        cmw_start(env, model, name, free_port(), watch=False)
        rec = record(env, name)
        t0 = time.time()
        subprocess.run(cli_cmd("stop", name), env=env, check=True, capture_output=True)
        returned.append(time.time() - t0)
        gone_after.append(wait_group_gone(rec["pgid"]) - t0)
        # vLLM logs this at the end of its engine's teardown, which the idle stop skips.
        log = Path(rec["log_path"]).read_text(errors="replace")
        skipped.append("no" if "all workers exited gracefully" in log else "yes")
    drain = rec["config"].get("drain")
    print(f"stop of an idle server (drain {drain}s): `stop` returned after "
          f"{' '.join(f'{x:.2f}' for x in returned)}s; every process gone after "
          f"{' '.join(f'{x:.2f}' for x in gone_after)}s; engine teardown skipped: "
          f"{' '.join(skipped)} ({runs} runs)")


def overhead(env: dict[str, str], python: str, model: Path, runs: int) -> None:
    """cmw-vllm start vs the same command by hand, alternating."""
    ours, theirs = [], []
    for i in range(runs):
        port = free_port()
        theirs.append(manual_start(env, python, model, port))
        ours.append(cmw_start(env, model, f"ovh{i}", port, watch=False)[0])
        subprocess.run(cli_cmd("stop", f"ovh{i}"), env=env, check=True, capture_output=True)
    m_ours, m_theirs = statistics.median(ours), statistics.median(theirs)
    print(f"start overhead: cmw-vllm {m_ours:.2f}s vs by hand {m_theirs:.2f}s -> "
          f"{m_ours - m_theirs:+.2f}s "
          f"(median of {runs}; runs ours={' '.join(f'{x:.1f}' for x in ours)} "
          f"hand={' '.join(f'{x:.1f}' for x in theirs)})")


if __name__ == "__main__":
    main()
