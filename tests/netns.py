"""Two "machines" on one: network namespaces joined by a veth pair (needs root and `ip`).

Each namespace has only loopback and its end of the pair, so whatever runs inside can
reach the other namespace and nothing else: multi-node tests never touch another address.
Names start with ``cmwmn-`` and carry a random suffix; addresses are 10.231.X.1 and
10.231.X.2. :meth:`NetnsPair.destroy` kills every process left in either namespace (they
can only be the test's own) and deletes both; :func:`locked_pair` makes a pair under the
machine-wide real-vLLM lock and always destroys it. :func:`side_env` is the environment of
a command that runs in one namespace, as on a machine of its own.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import secrets
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest


def unavailable_reason() -> str | None:
    """Why namespaces cannot be made here (not root, no `ip`), or None when they can."""
    if os.name != "posix" or os.geteuid() != 0:
        return "multi-node tests make network namespaces, which needs root"
    if shutil.which("ip") is None:
        return "multi-node tests need the `ip` command (iproute2)"
    return None


def _ip(*args: str) -> None:
    subprocess.run(["ip", *args], check=True, capture_output=True, text=True, timeout=30)


@dataclass
class NetnsPair:
    """Two namespaces ``a`` and ``b`` with addresses ``addr_a`` and ``addr_b``."""

    suffix: str = field(default_factory=lambda: secrets.token_hex(3))
    subnet: int = field(default_factory=lambda: 1 + secrets.randbelow(250))

    @property
    def a(self) -> str:
        return f"cmwmn-{self.suffix}-a"

    @property
    def b(self) -> str:
        return f"cmwmn-{self.suffix}-b"

    @property
    def if_a(self) -> str:
        return f"cmwmn{self.suffix}a"

    @property
    def if_b(self) -> str:
        return f"cmwmn{self.suffix}b"

    @property
    def addr_a(self) -> str:
        return f"10.231.{self.subnet}.1"

    @property
    def addr_b(self) -> str:
        return f"10.231.{self.subnet}.2"

    def create(self) -> NetnsPair:
        """Make both namespaces and the link between them.

        Raises:
            RuntimeError: ``ip`` refused (no CAP_NET_ADMIN, no netns support); the message
                has its error. Whatever was made is removed.
        """
        try:
            _ip("netns", "add", self.a)
            _ip("netns", "add", self.b)
            _ip("link", "add", self.if_a, "type", "veth", "peer", "name", self.if_b)
            _ip("link", "set", self.if_a, "netns", self.a)
            _ip("link", "set", self.if_b, "netns", self.b)
            for ns, ifname, addr in ((self.a, self.if_a, self.addr_a),
                                     (self.b, self.if_b, self.addr_b)):
                _ip("-n", ns, "addr", "add", f"{addr}/24", "dev", ifname)
                _ip("-n", ns, "link", "set", "lo", "up")
                _ip("-n", ns, "link", "set", ifname, "up")
        except subprocess.CalledProcessError as exc:
            self.destroy()
            raise RuntimeError(f"cannot make network namespaces: {exc.stderr.strip()}") \
                from None
        return self

    def pids(self, ns: str) -> list[int]:
        """Processes running in namespace ``ns``."""
        proc = subprocess.run(["ip", "netns", "pids", ns], capture_output=True, text=True,
                              timeout=30, check=False)
        return [int(p) for p in proc.stdout.split()]

    def run(self, ns: str, cmd: list[str], env: dict[str, str], timeout: float,
            ) -> subprocess.CompletedProcess[str]:
        """Run ``cmd`` inside ``ns`` with ``env``; output captured as text."""
        return subprocess.run(["ip", "netns", "exec", ns, *cmd], env=env, capture_output=True,
                              text=True, timeout=timeout, check=False)

    def destroy(self) -> list[int]:
        """Kill what is left in both namespaces and delete them.

        Returns:
            The pids that had to be killed.
        """
        killed: list[int] = []
        for ns in (self.a, self.b):
            for pid in self.pids(ns):
                try:
                    os.kill(pid, signal.SIGKILL)
                    killed.append(pid)
                except ProcessLookupError:
                    pass
        deadline = time.monotonic() + 10
        while any(self.pids(ns) for ns in (self.a, self.b)) and time.monotonic() < deadline:
            time.sleep(0.1)
        for ns in (self.a, self.b):
            subprocess.run(["ip", "netns", "del", ns], capture_output=True, timeout=30,
                           check=False)
        return killed


def side_env(home: Path, engine: str) -> dict[str, str]:
    """The environment of commands run in one namespace: a machine of their own.

    Its own state dir and Hugging Face cache under ``home``, offline, vLLM's interpreter
    ``engine``, a small CPU KV cache; none of the caller's cmw-vllm, vLLM, Hugging Face or
    Ray settings, and no proxy (nothing outside the pair can be reached anyway).
    """
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("CMW_VLLM_", "VLLM_", "HF_", "RAY_"))
           and k.lower() not in ("http_proxy", "https_proxy")}
    env.update(CMW_VLLM_HOME=str(home / "cmw-home"), HF_HOME=str(home / "hf-home"),
               HF_HUB_OFFLINE="1", CMW_VLLM_PYTHON=engine, VLLM_CPU_KVCACHE_SPACE="1")
    return env


@contextlib.contextmanager
def locked_pair(lock: Path, label: str) -> Iterator[NetnsPair]:
    """A pair made and used under the machine-wide ``lock``, destroyed on the way out.

    Skips the test (with the reason) where namespaces cannot be made. The caller stops
    what it started inside the ``with``; what is left in the namespaces is killed here.

    Args:
        lock: The real-vLLM lock file (tests that start vLLM run one at a time).
        label: Names the test module in the line about leftover pids.
    """
    reason = unavailable_reason()
    if reason:
        pytest.skip(reason)
    lock.parent.mkdir(parents=True, exist_ok=True)
    with lock.open("a") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        net = NetnsPair()
        try:
            net.create()
        except RuntimeError as exc:
            pytest.skip(str(exc))
        try:
            yield net
        finally:
            left = net.destroy()
            if left:
                print(f"{label} cleanup: killed leftover pids {left}", file=sys.stderr)
