"""One model over several machines: the settings of one node's part, and its network.

vLLM has its own multi-node engine; cmw-vllm only drives it. Each machine runs one managed
server: rank 0 (the *leader*) serves the HTTP API, the other ranks (the *followers*) run
``vllm serve --headless`` and have no HTTP. A follower is ready when it has *joined* (its
workers are in the leader's process group); the leader is ready when ``/health`` answers,
which needs every follower.

Two layouts, which can be combined:

- tensor/pipeline parallel over nodes: ``--nnodes N --node-rank R --master-addr A
  [--master-port P]``; the leader's rank-0 worker holds the rendezvous (torch TCPStore) on
  A:P, every follower connects to it;
- data parallel over nodes: ``--data-parallel-size D --data-parallel-size-local L
  --data-parallel-address A [--data-parallel-rpc-port P]``, followers add
  ``--data-parallel-start-rank S``; their engines connect to the leader's A:P.

This module is pure (no click, no printing). The follower's watch on its leader runs in
vLLM's interpreter: :mod:`cmw_vllm.engine_entry.cmw_leader_watch`.
"""

from __future__ import annotations

import contextlib
import re
import socket
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from cmw_vllm.errors import ConfigError, EnvironmentProblem
from cmw_vllm.vocab import PORT_MAX, PORT_MIN

if TYPE_CHECKING:
    from cmw_vllm.server_config import ServerConfig
    from cmw_vllm.server_record import ServerRecord

DEFAULT_MASTER_PORT = 29501  # vLLM's default --master-port
DEFAULT_DP_RPC_PORT = 29550  # vLLM's default --data-parallel-rpc-port
DEFAULT_JOIN_TIMEOUT = 180.0

SINGLE = "single"
LEADER = "leader"
FOLLOWER = "follower"

# The vLLM flags that the fields below set; extra args must not repeat them.
MANAGED_FLAGS = {
    "--nnodes",
    "-n",
    "--node-rank",
    "-r",
    "--master-addr",
    "--master-port",
    "--headless",
    "--data-parallel-size",
    "-dp",
    "--data-parallel-size-local",
    "-dpl",
    "--data-parallel-address",
    "-dpa",
    "--data-parallel-rpc-port",
    "-dpp",
    "--data-parallel-start-rank",
    "-dpr",
    "--distributed-executor-backend",
}

# Option names shown in errors, per field.
OPTION_NAMES = {
    "nnodes": "--nnodes",
    "node_rank": "--node-rank",
    "master_addr": "--master-addr",
    "master_port": "--master-port",
    "data_parallel_size": "--data-parallel-size",
    "data_parallel_size_local": "--data-parallel-size-local",
    "data_parallel_address": "--data-parallel-address",
    "data_parallel_rpc_port": "--data-parallel-rpc-port",
    "data_parallel_start_rank": "--data-parallel-start-rank",
    "executor_backend": "--distributed-executor-backend",
    "host_ip": "--host-ip",
    "interface": "--net-if",
    "join_timeout": "--join-timeout",
}

# A follower has joined when its workers are in the process group (TP/PP over nodes), or
# when its engines have done the handshake with the leader's front end (DP over nodes): a
# headless engine builds itself ("init engine ... took") only after the leader's front end
# answered its HELLO; "Waiting for READY" follows only when the coordinator takes over 10 s.
_JOINED_RE = re.compile(
    r"rank \d+ in world size (?!1 )\d+ is assigned as|"
    r"init engine \(profile, create kv cache, warmup model\) took|"
    r"Waiting for READY message from DP Coordinator"
)
# The leader's rank-0 worker logs the size of the whole group.
_WORLD_RE = re.compile(r"world_size=(\d+) rank=0 .*distributed_init_method=tcp://([^ ]+)")


def _check_address(value: str | None) -> str | None:
    if value is None:
        return None
    value = value.strip()
    if not value or any(c.isspace() for c in value) or "/" in value:
        raise ValueError("must be a host name or IP address")
    return value


class Distributed(BaseModel):
    """This node's part in a server that spans several machines (vLLM's own engine)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    nnodes: int = Field(1, ge=1, le=4096)
    node_rank: int = Field(0, ge=0)
    master_addr: str | None = None
    master_port: int | None = Field(None, ge=PORT_MIN, le=PORT_MAX)
    data_parallel_size: int | None = Field(None, ge=1, le=4096)
    data_parallel_size_local: int | None = Field(None, ge=0, le=4096)
    data_parallel_address: str | None = None
    data_parallel_rpc_port: int | None = Field(None, ge=PORT_MIN, le=PORT_MAX)
    data_parallel_start_rank: int | None = Field(None, ge=0)
    executor_backend: Literal["mp", "ray"] | None = None
    host_ip: str | None = None
    interface: str | None = None
    join_timeout: float = Field(DEFAULT_JOIN_TIMEOUT, gt=0, le=86400)

    @field_validator("master_addr", "data_parallel_address", "host_ip")
    @classmethod
    def _check_addresses(cls, value: str | None) -> str | None:
        return _check_address(value)

    @field_validator("interface")
    @classmethod
    def _check_interface(cls, value: str | None) -> str | None:
        if value is not None and not re.fullmatch(r"[A-Za-z0-9_.:@-]{1,15}", value):
            raise ValueError("must be a network interface name such as eth0")
        return value

    @model_validator(mode="after")
    def _check_layout(self) -> Distributed:
        if self.node_rank >= self.nnodes:
            raise ValueError(f"--node-rank {self.node_rank} must be below --nnodes "
                             f"{self.nnodes}")
        if self.nnodes > 1 and not self.master_addr:
            raise ValueError("--nnodes above 1 needs --master-addr (the leader's address)")
        if self.nnodes > 1 and self.executor_backend == "ray":
            raise ValueError("with Ray, start vLLM on the head node only and leave out "
                             "--nnodes: Ray places the workers")
        size = self.data_parallel_size or 1
        local = self.data_parallel_size_local
        start = self.data_parallel_start_rank or 0
        if local is not None and local > size:
            raise ValueError(f"--data-parallel-size-local {local} is larger than "
                             f"--data-parallel-size {size}")
        if start and start + (local if local is not None else 1) > size:
            raise ValueError(f"--data-parallel-start-rank {start} leaves no room in "
                             f"--data-parallel-size {size}")
        if (start or (local is not None and local < size)) and not self.data_parallel_address:
            raise ValueError("data parallel over several nodes needs --data-parallel-address "
                             "(the leader's address)")
        if start and local == 0:
            raise ValueError("a data parallel follower needs --data-parallel-size-local "
                             "above 0")
        return self

    @property
    def role(self) -> str:
        """``leader`` (serves the API), ``follower`` (headless) or ``single`` (one node)."""
        if (self.nnodes > 1 and self.node_rank > 0) or (self.data_parallel_start_rank or 0) > 0:
            return FOLLOWER
        spans = self.nnodes > 1 or (
            self.data_parallel_size_local is not None
            and self.data_parallel_size_local < (self.data_parallel_size or 1)
        )
        return LEADER if spans else SINGLE

    @property
    def rank(self) -> int:
        """This node's rank: the node rank, or the first DP rank it runs."""
        return self.node_rank if self.nnodes > 1 else (self.data_parallel_start_rank or 0)

    def leader_address(self) -> tuple[str, int] | None:
        """Where the leader listens for the followers: (host, port), or None on one node."""
        if self.nnodes > 1 and self.master_addr:
            return self.master_addr, self.master_port or DEFAULT_MASTER_PORT
        if self.data_parallel_address and self.role != SINGLE:
            return self.data_parallel_address, self.data_parallel_rpc_port or DEFAULT_DP_RPC_PORT
        return None

    def cli_args(self) -> list[str]:
        """The ``vllm serve`` flags for this node's part."""
        args: list[str] = []
        if self.nnodes > 1:
            args += ["--nnodes", str(self.nnodes), "--node-rank", str(self.node_rank),
                     "--master-addr", str(self.master_addr)]
            if self.master_port is not None:
                args += ["--master-port", str(self.master_port)]
        for flag, value in (
            ("--data-parallel-size", self.data_parallel_size),
            ("--data-parallel-size-local", self.data_parallel_size_local),
            ("--data-parallel-address", self.data_parallel_address),
            ("--data-parallel-rpc-port", self.data_parallel_rpc_port),
            ("--data-parallel-start-rank", self.data_parallel_start_rank),
        ):
            if value is not None:
                args += [flag, str(value)]
        backend = self.executor_backend or ("mp" if self.nnodes > 1 else None)
        if backend:
            args += ["--distributed-executor-backend", backend]
        if self.role == FOLLOWER:
            args.append("--headless")
        return args


def pipeline_size(vllm_args: list[str]) -> int:
    """The ``--pipeline-parallel-size`` among extra vLLM flags (1 when absent or unreadable)."""
    for i, arg in enumerate(vllm_args):
        flag, sep, value = arg.partition("=")
        if flag in ("--pipeline-parallel-size", "-pp"):
            if not sep and i + 1 < len(vllm_args):
                value = vllm_args[i + 1]
            try:
                return max(1, int(value))
            except ValueError:
                return 1
    return 1


def check_world(dist: Distributed, tensor_parallel_size: int, vllm_args: list[str]) -> None:
    """Check that the ranks of one model copy split evenly over the nodes.

    Raises:
        ConfigError: tensor x pipeline parallel size is not a multiple of ``--nnodes``.
    """
    world = tensor_parallel_size * pipeline_size(vllm_args)
    if dist.nnodes > 1 and (world < dist.nnodes or world % dist.nnodes):
        raise ConfigError(
            f"--tensor-parallel-size x --pipeline-parallel-size ({world}) must be a multiple "
            f"of --nnodes ({dist.nnodes}): each node runs the same number of ranks"
        )


def local_device_count(dist: Distributed | None, tensor_parallel_size: int,
                       vllm_args: list[str]) -> int:
    """How many GPUs this node's part uses (its share of the ranks)."""
    world = tensor_parallel_size * pipeline_size(vllm_args)
    if dist is None:
        return world
    per_copy = world // dist.nnodes if dist.nnodes > 1 else world
    copies = dist.data_parallel_size_local
    if copies is None:
        copies = dist.data_parallel_size or 1
    return max(1, per_copy * max(copies, 1))


# --------------------------------------------------------------------------- network


@dataclass
class NodeNetwork:
    """The addresses vLLM's distributed traffic uses on this node."""

    host_ip: str
    interface: str | None
    env: dict[str, str]


def route_source(address: str) -> str:
    """The local IP address that traffic to ``address`` leaves from (no packet is sent).

    Raises:
        EnvironmentProblem: The name does not resolve, or no route leads there.
    """
    try:
        infos = socket.getaddrinfo(address, None, type=socket.SOCK_DGRAM)
    except socket.gaierror as exc:
        raise EnvironmentProblem(f"cannot resolve {address}: {exc.strerror}") from None
    family, _, _, _, sockaddr = infos[0]
    with socket.socket(family, socket.SOCK_DGRAM) as sock:
        try:
            sock.connect((sockaddr[0], 9))
        except OSError as exc:
            raise EnvironmentProblem(
                f"no route from this machine to {address} ({exc.strerror or exc})",
                hint="check the address, or this machine's network settings",
            ) from None
        return str(sock.getsockname()[0])


def local_addresses() -> dict[str, str]:
    """IP address -> the network interface that has it, for every local interface."""
    import psutil

    out: dict[str, str] = {}
    for ifname, addrs in psutil.net_if_addrs().items():
        for addr in addrs:
            if addr.family in (socket.AF_INET, socket.AF_INET6):
                out.setdefault(addr.address.split("%", 1)[0], ifname)
    return out


def node_network(dist: Distributed, environ: dict[str, str]) -> NodeNetwork:
    """Derive (or check) ``VLLM_HOST_IP`` and the interface gloo and NCCL use on this node.

    The address is, in order: ``--host-ip``, ``VLLM_HOST_IP`` from the environment, the
    local address that routes to the leader. The interface is ``--net-if``,
    ``GLOO_SOCKET_IFNAME``, else the one that has that address. Variables the user set
    are kept, but must agree with what is given.

    Raises:
        ConfigError: The address is not one of this machine's, or the interface does not
            exist or lacks that address.
        EnvironmentProblem: No route leads to the leader.
    """
    leader = dist.leader_address()
    addrs = local_addresses()
    host_ip = dist.host_ip or environ.get("VLLM_HOST_IP")
    if host_ip is None:
        host_ip = route_source(leader[0]) if leader else "127.0.0.1"
    if host_ip not in addrs:
        raise ConfigError(f"VLLM_HOST_IP {host_ip} is not an address of this machine "
                          f"(it has {', '.join(sorted(a for a in addrs if a != '::1'))})")
    interface = dist.interface or environ.get("GLOO_SOCKET_IFNAME")
    if interface is None:
        interface = addrs[host_ip]
    else:
        names = set(addrs.values())
        if interface not in names:
            raise ConfigError(f"network interface {interface} does not exist here "
                              f"(there are {', '.join(sorted(names))})")
        if addrs[host_ip] != interface:
            raise ConfigError(f"{host_ip} is on {addrs[host_ip]}, not on {interface}: "
                              "vLLM would announce one and talk through the other")
    if leader is not None and dist.role == LEADER:
        master_ip = _resolve(leader[0])
        if master_ip is not None and master_ip not in addrs:
            raise ConfigError(
                f"this node is the leader (rank 0) but {leader[0]} is not one of its "
                "addresses: give the leader's own address as the master address"
            )
    env = {"VLLM_HOST_IP": host_ip}
    for var in ("GLOO_SOCKET_IFNAME", "NCCL_SOCKET_IFNAME", "TP_SOCKET_IFNAME"):
        env[var] = environ.get(var) or interface
    return NodeNetwork(host_ip=host_ip, interface=interface, env=env)


def _resolve(host: str) -> str | None:
    try:
        return str(socket.getaddrinfo(host, None, type=socket.SOCK_STREAM)[0][4][0])
    except (socket.gaierror, IndexError):
        return None


def probe_tcp(host: str, port: int, timeout: float = 2.0) -> str | None:
    """Try to connect to ``host:port``; None when it accepts, else why not, in words."""
    from cmw_vllm.engine_entry.cmw_leader_watch import probe

    return probe(host, port, timeout)


def follower_joined(log_text: str) -> bool:
    """True when a follower's log shows that it joined the leader."""
    return _JOINED_RE.search(log_text) is not None


def log_shows_joined(path: Path) -> bool:
    """True when the follower log at ``path`` shows that it joined (reads at most 64 MiB)."""
    try:
        with path.open("rb") as fh:
            return follower_joined(fh.read(64 * 1024 * 1024).decode("utf-8", "replace"))
    except OSError:
        return False


def launch_env(config: ServerConfig, env: dict[str, str]) -> dict[str, str]:
    """Add this node's network settings (and a follower's leader watch) to ``env``.

    Args:
        config: The server about to be launched.
        env: The environment vLLM will get; changed in place.

    Returns:
        What the record keeps: ``VLLM_HOST_IP`` and ``leader`` (``HOST:PORT``), when they
        apply.

    Raises:
        ConfigError: See :func:`node_network`.
        EnvironmentProblem: No route leads to the leader.
    """
    from cmw_vllm.engine_entry.cmw_leader_watch import (
        JOIN_TIMEOUT_ENV,
        RENDEZVOUS_ENV,
        TCPSTORE,
        WATCH_ENV,
        ZMQ,
    )

    dist = config.distributed
    if dist is None or dist.role == SINGLE:
        return {}
    network = node_network(dist, env)
    env.update(network.env)
    out = {"VLLM_HOST_IP": network.host_ip}
    leader = dist.leader_address()
    if leader is not None:
        out["leader"] = f"{leader[0]}:{leader[1]}"
        if dist.role == FOLLOWER:
            env[WATCH_ENV] = out["leader"]
            env[JOIN_TIMEOUT_ENV] = f"{dist.join_timeout:g}"
            env[RENDEZVOUS_ENV] = TCPSTORE if dist.nnodes > 1 else ZMQ
    return out


def world_from_log(log_text: str) -> tuple[int, str] | None:
    """(world size, rendezvous address) from a leader's log, once its workers started."""
    match = _WORLD_RE.search(log_text)
    return (int(match.group(1)), match.group(2)) if match else None


def _plain(ip: str) -> str:
    """An IPv4 address seen through a dual-stack socket (``::ffff:a.b.c.d``) as ``a.b.c.d``."""
    return ip.removeprefix("::ffff:")


def cluster_view(record: ServerRecord, pids: list[int]) -> dict[str, Any]:
    """What a leader can see of its whole set, from its record, its log and its sockets.

    No remote login: the followers are the machines that ``pids`` (the leader's processes)
    hold TCP connections with, other than HTTP clients (tensor/pipeline parallel: the
    TCPStore and gloo; data parallel: the engines' links to the coordinator and front end).

    Returns:
        ``nnodes``, ``data_parallel_size``, ``world_size`` (from the log, once the workers
        started; None before), ``rendezvous`` (``HOST:PORT``) and ``followers_seen`` (the
        addresses connected to it, sorted).
    """
    dist = Distributed(**(record.config.get("distributed") or {}))
    log_world = None
    with contextlib.suppress(OSError), open(record.log_path, "rb") as fh:
        log_world = world_from_log(fh.read(64 * 1024 * 1024).decode("utf-8", "replace"))
    leader = dist.leader_address()
    seen: set[str] = set()
    if leader is not None and pids:
        import psutil

        wanted = set(pids)
        conns = []
        with contextlib.suppress(psutil.AccessDenied, OSError):
            conns = [c for c in psutil.net_connections(kind="tcp") if c.pid in wanted
                     and c.status == psutil.CONN_ESTABLISHED and c.laddr and c.raddr]
        # Connections between the leader's own processes show both ends; HTTP clients are
        # not nodes. What is left leads to the followers (rendezvous, gloo, DP engines).
        own_ends = {(_plain(c.laddr.ip), c.laddr.port) for c in conns}
        seen = {_plain(c.raddr.ip) for c in conns
                if (_plain(c.raddr.ip), c.raddr.port) not in own_ends
                and c.laddr.port != record.port}
    return {
        "nnodes": dist.nnodes,
        "data_parallel_size": dist.data_parallel_size or 1,
        "world_size": log_world[0] if log_world else None,
        "rendezvous": f"{leader[0]}:{leader[1]}" if leader else None,
        "followers_seen": sorted(seen),
    }
