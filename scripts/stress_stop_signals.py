"""Stress the tests' stand-in vLLM with two SIGTERMs close together, as ``stop`` sends them.

``cmw-vllm stop`` sends SIGTERM to the supervisor and to the API server, and the supervisor
forwards its own: the API server gets two, microseconds to milliseconds apart. A handler
that Python re-enters at the wrong moment can hang the server until the SIGKILL at drain +
margin. This starts the stand-in (``tests/fake_vllm``) again and again, sends the two
signals with a random gap, and counts the runs that did not exit within ``--exit-within``
seconds. CPU burners make the rare interleaving likelier, as on a busy CI machine.

Usage::

    python scripts/stress_stop_signals.py --seconds 300 --burners 2
"""

from __future__ import annotations

import argparse
import contextlib
import os
import random
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

FAKE_VLLM = Path(__file__).resolve().parent.parent / "tests" / "fake_vllm"


def free_port() -> int:
    """A TCP port nothing listens on right now."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def wait_healthy(port: int, proc: subprocess.Popen[bytes], timeout: float) -> bool:
    """Whether the stand-in answered /health within ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and proc.poll() is None:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=1):
                return True
        except OSError:
            time.sleep(0.02)
    return False


def one_run(log: Path, window_s: float, exit_within: float) -> str:
    """Start the stand-in, send two SIGTERMs; "ok", "hang" or "no-start"."""
    port = free_port()
    env = {**os.environ, "PYTHONPATH": str(FAKE_VLLM), "FAKE_VLLM_DELAY": "0.1"}
    with log.open("wb") as out:
        proc = subprocess.Popen(
            [sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", "m",
             "--host", "127.0.0.1", "--port", str(port)],
            stdout=out, stderr=subprocess.STDOUT, env=env, start_new_session=True)
    try:
        if not wait_healthy(port, proc, 30):
            return "no-start"
        gap = random.uniform(0, window_s)
        os.kill(proc.pid, signal.SIGTERM)
        begin = time.perf_counter()
        while time.perf_counter() - begin < gap:
            pass
        os.kill(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=exit_within)
        except subprocess.TimeoutExpired:
            said = "[shutdown]" in log.read_text()
            print(f"hang: gap {gap * 1e6:.0f} us, [shutdown] logged: {said}", flush=True)
            return "hang"
        return "ok"
    finally:
        with contextlib.suppress(OSError):
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--seconds", type=float, default=300.0, help="How long to go on.")
    parser.add_argument("--burners", type=int, default=2, help="CPU burner processes.")
    parser.add_argument("--window-us", type=float, default=500.0,
                        help="Largest gap between the two SIGTERMs, in microseconds.")
    parser.add_argument("--exit-within", type=float, default=5.0,
                        help="Seconds a run may take to exit before it counts as hung.")
    args = parser.parse_args()
    # `yes` into /dev/null: one write call after another. Against the old handler, this hung
    # 3 runs of 1,389 in 300 s; burners in pure Python (no system calls) hung none of 1,163.
    burners = [subprocess.Popen(["yes"], stdout=subprocess.DEVNULL) for _ in range(args.burners)]
    counts = {"ok": 0, "hang": 0, "no-start": 0}
    try:
        with tempfile.TemporaryDirectory() as tmp:
            log = Path(tmp) / "stand-in.log"
            end = time.monotonic() + args.seconds
            while time.monotonic() < end:
                counts[one_run(log, args.window_us / 1e6, args.exit_within)] += 1
    finally:
        for burner in burners:
            burner.kill()
            burner.wait()
    runs = counts["ok"] + counts["hang"]
    print(f"runs: {runs}  hung: {counts['hang']}  did not start: {counts['no-start']}  "
          f"({args.burners} burners, gap 0-{args.window_us:g} us, {args.seconds:g} s)")
    return 1 if counts["hang"] else 0


if __name__ == "__main__":
    sys.exit(main())
