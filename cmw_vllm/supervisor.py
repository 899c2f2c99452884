"""A tiny parent for the vLLM process that records how it ended.

Run as ``python -m cmw_vllm.supervisor EXIT_FILE -- CMD...`` by ``ServerManager.start`` in a
new session. It starts CMD, forwards SIGTERM/SIGINT/SIGHUP to it, and when it exits writes
``{"pid", "returncode", "ended_at"}`` to EXIT_FILE atomically, so that ``status`` can say
how a server died. It imports nothing heavy: it lives as long as the server.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import time


def _write_exit(path: str, pid: int, returncode: int | None) -> None:
    tmp = f"{path}.tmp{os.getpid()}"
    data = json.dumps({"pid": pid, "returncode": returncode, "ended_at": time.time()})
    try:
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | getattr(os, "O_NOFOLLOW", 0),
                     0o600)
        with os.fdopen(fd, "w") as fh:
            fh.write(data)
        os.replace(tmp, path)
    except OSError:
        pass


def main(argv: list[str]) -> int:
    """Run the command in ``argv`` (``EXIT_FILE -- CMD...``) and record its exit."""
    if len(argv) < 3 or argv[1] != "--":
        sys.stderr.write("usage: python -m cmw_vllm.supervisor EXIT_FILE -- CMD...\n")
        return 2
    exit_file, cmd = argv[0], argv[2:]
    try:
        proc = subprocess.Popen(cmd)
    except OSError as exc:
        sys.stderr.write(f"cmw-vllm: cannot run {cmd[0]}: {exc}\n")
        _write_exit(exit_file, -1, 127)
        return 127

    def forward(signum: int, _frame: object) -> None:
        with contextlib.suppress(OSError):
            proc.send_signal(signum)

    for sig in (signal.SIGTERM, signal.SIGINT, getattr(signal, "SIGHUP", None)):
        if sig is not None:
            signal.signal(sig, forward)
    returncode = proc.wait()
    _write_exit(exit_file, proc.pid, returncode)
    return returncode if returncode >= 0 else 128 - returncode


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
