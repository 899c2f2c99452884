"""Start and stop a server again and again with a wrapper script as the engine interpreter.

``CMW_VLLM_PYTHON`` may name a script that execs Python (a pyenv shim, ``exec python3
"$@"``, conda or a module system). The process then shows several command lines in turn,
and for an instant none while it execs; a start that looked at it at the wrong moment
reported "vLLM exited during start-up". This runs ``cmw-vllm start`` / ``stop`` cycles
with such a wrapper and counts the starts that failed.

By default the engine is the tests' stand-in (``tests/fake_vllm``, about a second per
cycle) behind ``#!/bin/sh`` + ``exec python3 "$@"`` (``python3`` as found on PATH, itself a
shim where pyenv is used). ``--python`` puts another interpreter behind the wrapper,
``--no-wrapper`` uses it directly, ``--real`` serves the tiny test model with real vLLM
(about a minute per cycle).

Usage::

    .venv/bin/python scripts/wrapper_start_loop.py --cycles 20
    .venv/bin/python scripts/wrapper_start_loop.py --cycles 20 --no-wrapper
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
FAKE_VLLM = REPO / "tests" / "fake_vllm"


def free_port() -> int:
    """A TCP port nothing listens on right now."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def main() -> int:
    """Run the cycles; print each failure and the count."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cycles", type=int, default=20)
    parser.add_argument("--python", default="python3",
                        help="interpreter behind the wrapper (default: python3 on PATH)")
    parser.add_argument("--no-wrapper", action="store_true",
                        help="use the interpreter itself (resolved to its binary)")
    parser.add_argument("--real", action="store_true",
                        help="real vLLM and the tiny test model instead of the stand-in")
    opts = parser.parse_args()

    work = Path(tempfile.mkdtemp(prefix="cmw-wrapper-loop-"))
    env = dict(os.environ, CMW_VLLM_HOME=str(work / "home"), FAKE_VLLM_DELAY="0.4")
    python = opts.python
    if opts.no_wrapper:
        # The binary itself, not a shim: what the interpreter reports as its executable.
        python = subprocess.run([shutil.which(python) or python, "-c",
                                 "import sys; print(sys.executable)"],
                                capture_output=True, text=True, check=True).stdout.strip()
    if opts.real:
        sys.path.insert(0, str(REPO))
        from tests.tiny_model import make_tiny_model

        model = make_tiny_model(work / "tiny")
        env.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
    else:
        model = work / "model"
        model.mkdir()
        (model / "config.json").write_text(json.dumps({"architectures": ["Qwen2ForCausalLM"]}))
        env["PYTHONPATH"] = str(FAKE_VLLM)
    if opts.no_wrapper:
        env["CMW_VLLM_PYTHON"] = python
    else:
        wrapper = work / "engine-python"
        wrapper.write_text(f'#!/bin/sh\nexec {python} "$@"\n')
        wrapper.chmod(0o755)
        env["CMW_VLLM_PYTHON"] = str(wrapper)
    cli = [sys.executable, "-m", "cmw_vllm"]
    failures = 0
    try:
        for i in range(opts.cycles):
            started = subprocess.run([*cli, "start", str(model), "--name", "loop", "--port",
                                      str(free_port())], env=env, capture_output=True,
                                     text=True, cwd=REPO)
            if started.returncode != 0:
                failures += 1
                last = (started.stderr.strip().splitlines() or ["?"])[-1]
                print(f"cycle {i + 1}: start failed (exit {started.returncode}): {last}")
            stopped = subprocess.run([*cli, "stop", "loop"], env=env, capture_output=True,
                                     text=True, cwd=REPO)
            if stopped.returncode != 0:
                print(f"cycle {i + 1}: stop failed (exit {stopped.returncode})")
    finally:
        subprocess.run([*cli, "stop", "--all", "--now"], env=env, capture_output=True, cwd=REPO)
        shutil.rmtree(work, ignore_errors=True)
    how = "directly" if opts.no_wrapper else "behind a wrapper"
    print(f"{failures} of {opts.cycles} starts failed ({python} {how})")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
