"""A follower node's watch on its leader; runs in vLLM's interpreter, beside vllm_serve.py.

Standard library only (psutil, a dependency of vLLM, is imported when needed), and nothing of
cmw_vllm: :mod:`vllm_serve` imports it from this directory when ``CMW_VLLM_WATCH_LEADER``
is set.

With ``CMW_VLLM_WATCH_LEADER=HOST:PORT`` (a headless follower), a thread connects to the
leader's rendezvous port every ``CMW_VLLM_LEADER_PROBE_INTERVAL`` seconds (default 2). The
leader counts as there only once that port answers as vLLM's rendezvous does
(``CMW_VLLM_LEADER_RENDEZVOUS``: ``tcpstore``, torch's TCPStore of tensor/pipeline parallel
over nodes, answers a ping with its nonce; ``zmq``, the data-parallel handshake, greets with
ZMTP's signature): any other program on that port (a port taken by something else) never
lets vLLM join, which would otherwise wait 10 minutes in torch. If the leader is not there
within ``CMW_VLLM_JOIN_TIMEOUT`` seconds, or is gone after it was there (three failed probes
in a row), the follower writes one ``cmw-vllm:`` line with the reason to its log, ends its
workers and exits with :data:`EXIT_LEADER_UNREACHABLE`: vLLM's headless node would
otherwise keep waiting for a leader that is gone.
"""

import contextlib
import errno
import os
import socket
import struct
import sys
import threading
import time

EXIT_LEADER_UNREACHABLE = 69  # EX_UNAVAILABLE
WATCH_ENV = "CMW_VLLM_WATCH_LEADER"
JOIN_TIMEOUT_ENV = "CMW_VLLM_JOIN_TIMEOUT"
INTERVAL_ENV = "CMW_VLLM_LEADER_PROBE_INTERVAL"
RENDEZVOUS_ENV = "CMW_VLLM_LEADER_RENDEZVOUS"
TCPSTORE = "tcpstore"
ZMQ = "zmq"
PROBE_INTERVAL_S = 2.0
LOST_AFTER_FAILURES = 3

# torch's TCPStore protocol (c10d, both the libuv and the classic server): a client sends
# VALIDATE (query type 0) with the magic number, then PING (query type 13) with a nonce,
# which the store sends back; all values in the host's byte order (little-endian here).
_STORE_VALIDATE, _STORE_PING, _STORE_MAGIC = 0, 13, 0x3C85F7CE
# A ZMQ (ZMTP 3) peer greets first: 0xFF, 8 bytes of padding, 0x7F.
_ZMTP_SIGNATURE_LEN = 10


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


def _read(sock: socket.socket, size: int) -> bytes:
    data = b""
    while len(data) < size:
        chunk = sock.recv(size - len(data))
        if not chunk:
            break
        data += chunk
    return data


def rendezvous_answers(host: str, port: int, kind: str = TCPSTORE,
                       timeout: float = 2.0) -> str | None:
    """Ask ``host:port`` as vLLM's follower would; None when it answers as vLLM's
    rendezvous does (``kind``: :data:`TCPSTORE` or :data:`ZMQ`), else why not, in words."""
    nonce = (os.getpid() & 0xFFFFFFF) | 0x10000000  # never 0, never an echo of our header
    try:
        with socket.create_connection((host, port), timeout=timeout) as sock:
            sock.settimeout(timeout)
            if kind == ZMQ:
                greeting = _read(sock, _ZMTP_SIGNATURE_LEN)
                if len(greeting) == _ZMTP_SIGNATURE_LEN and greeting[0] == 0xFF \
                        and greeting[-1] == 0x7F:
                    return None
            else:
                sock.sendall(struct.pack("<BIBI", _STORE_VALIDATE, _STORE_MAGIC,
                                         _STORE_PING, nonce))
                if _read(sock, 4) == struct.pack("<I", nonce):
                    return None
    except TimeoutError:
        pass  # connected but no answer in time: not a rendezvous (or a wedged one)
    except OSError:
        return probe(host, port, timeout)  # words for why it cannot be reached
    what = "ZMQ handshake" if kind == ZMQ else "torch TCPStore"
    return (f"something answers on that port, but not as vLLM's rendezvous ({what}) does: "
            "another program holds it")


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
                 interval: float = PROBE_INTERVAL_S, kind: str = TCPSTORE) -> None:
    """Give up when the leader never answers within ``join_timeout`` or goes away.

    The leader has come once its rendezvous port answers as vLLM's does (see
    :func:`rendezvous_answers`). It is there while that port takes connections
    (tensor/pipeline parallel: the TCPStore lives as long as the leader) or while this
    node holds a connection to it (data parallel: the leader closes its handshake port
    after start-up, and the engines stay connected to its coordinator and front end).
    """
    begin = time.monotonic()
    reached = False
    failures = 0
    while True:
        wait = min(interval, 2.0)
        reason = probe(host, port, timeout=wait) if reached \
            else rendezvous_answers(host, port, kind, timeout=wait)
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


def start_from_env() -> None:
    """Start the watch thread when ``CMW_VLLM_WATCH_LEADER`` is set (a follower node)."""
    target = os.environ.get(WATCH_ENV)
    if not target:
        return
    host, _, port = target.rpartition(":")
    host = host.strip("[]")
    timeout = float(os.environ.get(JOIN_TIMEOUT_ENV) or 180)
    interval = float(os.environ.get(INTERVAL_ENV) or PROBE_INTERVAL_S)
    kind = os.environ.get(RENDEZVOUS_ENV) or TCPSTORE
    threading.Thread(target=watch_leader, args=(host, int(port), timeout, interval, kind),
                     name="cmw-vllm-leader-watch", daemon=True).start()
