"""Multi-node settings, network derivation, and leader/follower lifecycle on the stand-in.

The real thing (two network-namespace hosts, real vLLM) is in test_multinode_real.py.
"""

from __future__ import annotations

import contextlib
import json
import socket
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from cmw_vllm import multinode
from cmw_vllm.errors import ConfigError, EnvironmentProblem
from cmw_vllm.multinode import Distributed
from cmw_vllm.server_config import ServerConfig, build_config
from tests.conftest import alive_pids, free_port, run_cli


def _config(**dist: object) -> ServerConfig:
    tp = dist.pop("tp", 2)
    return build_config({"name": "n", "model": "m", "tensor_parallel_size": tp,
                         "distributed": dist})


# --------------------------------------------------------------------------- settings


@pytest.mark.parametrize(
    ("dist", "message"),
    [
        ({"nnodes": 2, "node_rank": 2, "master_addr": "a"}, "--node-rank 2 must be below"),
        ({"nnodes": 2, "node_rank": 1}, "needs --master-addr"),
        ({"nnodes": 3, "master_addr": "a"}, "must be a multiple of --nnodes (3)"),
        ({"nnodes": 2, "master_addr": "a", "executor_backend": "ray"}, "leave out --nnodes"),
        ({"data_parallel_size": 2, "data_parallel_size_local": 3}, "is larger than"),
        ({"data_parallel_size": 2, "data_parallel_size_local": 1}, "--data-parallel-address"),
        ({"data_parallel_size": 2, "data_parallel_start_rank": 2,
          "data_parallel_address": "a"}, "leaves no room"),
        ({"nnodes": 2, "master_addr": "a b"}, "--master-addr: must be a host name"),
        ({"nnodes": 2, "master_addr": "a", "interface": "eth0; rm"}, "--net-if"),
        ({"nnodes": 2, "master_addr": "a", "master_port": 70000}, "--master-port"),
    ],
)
def test_bad_layouts_are_refused_naming_the_option(dist: dict, message: str) -> None:
    with pytest.raises(ConfigError) as info:
        _config(**dist)
    assert message in info.value.message


def test_roles_ranks_and_flags() -> None:
    leader = _config(nnodes=2, node_rank=0, master_addr="10.0.0.1", master_port=29600)
    follower = _config(nnodes=2, node_rank=1, master_addr="10.0.0.1")
    assert (leader.role, follower.role) == ("leader", "follower")
    args = leader.vllm_cli_args()
    assert args[:4] == ["--host", "127.0.0.1", "--port", "8000"]
    assert "--headless" not in args
    assert " ".join(args).endswith("--nnodes 2 --node-rank 0 --master-addr 10.0.0.1 "
                                   "--master-port 29600 --distributed-executor-backend mp")
    fargs = follower.vllm_cli_args()
    assert "--port" not in fargs and fargs[-1] == "--headless"
    assert follower.distributed.leader_address() == ("10.0.0.1", multinode.DEFAULT_MASTER_PORT)
    assert (follower.local_device_count(), leader.local_device_count()) == (1, 1)
    dp = _config(tp=1, data_parallel_size=4, data_parallel_size_local=2,
                 data_parallel_start_rank=2, data_parallel_address="10.0.0.1")
    assert (dp.role, dp.distributed.rank, dp.local_device_count()) == ("follower", 2, 2)
    assert dp.distributed.leader_address() == ("10.0.0.1", multinode.DEFAULT_DP_RPC_PORT)
    single = _config(tp=2, data_parallel_size=2)
    assert single.role == "single" and single.local_device_count() == 4


def test_multinode_flags_are_refused_as_extra_vllm_flags(model_dir: Path) -> None:
    code, _, err = run_cli("start", str(model_dir), "--", "--nnodes", "2")
    assert code == 2
    assert "--nnodes is set by cmw-vllm" in err


def test_config_round_trips_through_the_record_json() -> None:
    cfg = _config(nnodes=2, node_rank=1, master_addr="10.0.0.1", join_timeout=5)
    again = ServerConfig(**json.loads(json.dumps(cfg.model_dump(mode="json"))))
    assert again == cfg and again.role == "follower"


# --------------------------------------------------------------------------- network


def test_network_is_derived_from_the_route_to_the_leader() -> None:
    dist = Distributed(nnodes=2, node_rank=1, master_addr="127.0.0.1")
    net = multinode.node_network(dist, {})
    assert net.host_ip == "127.0.0.1"
    assert net.interface == multinode.local_addresses()["127.0.0.1"]
    assert net.env["GLOO_SOCKET_IFNAME"] == net.interface == net.env["NCCL_SOCKET_IFNAME"]
    kept = multinode.node_network(dist, {"NCCL_SOCKET_IFNAME": "other0"})
    assert kept.env["NCCL_SOCKET_IFNAME"] == "other0"


@pytest.mark.parametrize(
    ("dist", "environ", "message"),
    [
        ({"host_ip": "192.0.2.77"}, {}, "is not an address of this machine"),
        ({}, {"VLLM_HOST_IP": "192.0.2.77"}, "is not an address of this machine"),
        ({"interface": "nosuchif0"}, {}, "does not exist here"),
        ({"node_rank": 0, "master_addr": "192.0.2.1"}, {}, "give the leader's own address"),
    ],
)
def test_network_settings_are_validated(dist: dict, environ: dict, message: str) -> None:
    values = {"nnodes": 2, "node_rank": 1, "master_addr": "127.0.0.1", **dist}
    with pytest.raises(ConfigError) as info:
        multinode.node_network(Distributed(**values), environ)
    assert message in info.value.message


def test_no_route_to_the_leader_is_an_environment_problem(monkeypatch: pytest.MonkeyPatch) \
        -> None:
    import socket

    class NoRoute(socket.socket):
        def connect(self, address: object) -> None:
            raise OSError(101, "Network is unreachable")

    monkeypatch.setattr(socket, "socket", NoRoute)
    with pytest.raises(EnvironmentProblem) as info:
        multinode.route_source("198.51.100.1")
    assert "no route from this machine to 198.51.100.1" in info.value.message


def test_probe_words() -> None:
    port = free_port()
    assert "connection refused" in (multinode.probe_tcp("127.0.0.1", port, 1) or "")


# --------------------------------------------------------------------------- lifecycle


def _pair(model_dir: Path, master_port: int, *extra: str) -> tuple[list[str], list[str]]:
    common = ["-tp", "2", "--nnodes", "2", "--master-addr", "127.0.0.1",
              "--master-port", str(master_port), "--force", "--json"]
    leader = ["start", str(model_dir), "--name", "lead", "--port", str(free_port()),
              "--node-rank", "0", *common]
    follower = ["start", str(model_dir), "--name", "fol", "--node-rank", "1", *common, *extra]
    return leader, follower


def test_follower_joins_and_stops_when_its_leader_goes(
    fake_engine: Path, model_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("CMW_VLLM_LEADER_PROBE_INTERVAL", "0.2")
    leader, follower = _pair(model_dir, free_port(), "--join-timeout", "30")
    code, out, err = run_cli(*follower[:1], *follower[1:], "--no-wait")
    assert code == 0, err
    code, out, err = run_cli(*leader)
    assert code == 0, err
    assert json.loads(out)["state"] == "healthy"
    code, out, err = run_cli("start", *follower[1:])  # the same follower: already running
    assert code == 0, err
    from tests.conftest import wait_for_state

    assert wait_for_state("fol", "joined").state == "joined"
    code, out, _ = run_cli("status", "--json")
    assert code == 0
    servers = {s["name"]: s for s in json.loads(out)["servers"]}
    assert (servers["lead"]["role"], servers["lead"]["node_rank"]) == ("leader", 0)
    assert (servers["fol"]["role"], servers["fol"]["node_rank"]) == ("follower", 1)
    assert servers["fol"]["state"] == "joined"
    assert servers["fol"]["leader"] == servers["lead"]["leader"]
    assert servers["fol"]["port"] is None and servers["fol"]["url"] is None
    assert servers["lead"]["cluster"]["nnodes"] == 2
    assert servers["lead"]["cluster"]["followers_seen"] == ["127.0.0.1"]
    code, out, _ = run_cli("status")
    assert "joined" in out and "follower of 127.0.0.1:" in out
    from cmw_vllm.server_manager import ServerManager, group_members, read_record

    rec = read_record("fol")
    assert rec is not None
    pids = [p.pid for p in group_members(rec)]
    time.sleep(1)  # the follower's watch has seen its leader
    assert run_cli("stop", "lead")[0] == 0
    # vLLM's headless node would wait forever; the follower's leader watch ends it.
    status = wait_for_state("fol", "exited", timeout=20)
    assert status.state == "exited"
    assert status.returncode == 69
    assert status.error and status.error.startswith("lost the leader at 127.0.0.1:")
    deadline = time.monotonic() + 5  # the supervisor records the exit, then ends too
    while alive_pids(pids) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert alive_pids(pids) == []
    assert ServerManager().stop("fol").killed_pids == []


def test_follower_with_a_wrong_master_fails_fast(fake_engine: Path, model_dir: Path) -> None:
    _, follower = _pair(model_dir, free_port(), "--join-timeout", "2")
    begin = time.monotonic()
    code, _, err = run_cli(*follower)
    took = time.monotonic() - begin
    assert code == 1
    assert "cannot reach the leader at 127.0.0.1:" in err
    assert "connection refused" in err
    assert took < 20
    code, _, _ = run_cli("status", "fol")
    assert code == 3  # failed start: nothing left, no record


@contextlib.contextmanager
def _impostor(behaviour: str) -> Iterator[int]:
    """A listener on a loopback port that is no rendezvous: it accepts and says nothing
    (``silent``) or sends back what it gets, then garbage (``echo``). Yields its port."""
    server = socket.create_server(("127.0.0.1", 0))
    server.settimeout(0.2)
    done = threading.Event()
    conns: list[socket.socket] = []

    def serve(conn: socket.socket) -> None:
        with contextlib.suppress(OSError):
            while not done.is_set() and (data := conn.recv(1024)):
                conn.sendall(data + b"\x00garbage\xff")

    def accept() -> None:
        while not done.is_set():
            try:
                conn, _ = server.accept()
            except OSError:
                continue
            conns.append(conn)
            if behaviour == "echo":
                threading.Thread(target=serve, args=(conn,), daemon=True).start()

    thread = threading.Thread(target=accept, daemon=True)
    thread.start()
    try:
        yield server.getsockname()[1]
    finally:
        done.set()
        thread.join(5)
        for conn in conns:
            conn.close()
        server.close()


@pytest.mark.parametrize("behaviour", ["silent", "echo"])
def test_a_port_that_answers_but_not_as_a_rendezvous_is_no_leader(
        fake_engine: Path, model_dir: Path, monkeypatch: pytest.MonkeyPatch,
        behaviour: str) -> None:
    monkeypatch.setenv("CMW_VLLM_LEADER_PROBE_INTERVAL", "0.2")
    with _impostor(behaviour) as port:
        _, follower = _pair(model_dir, port, "--join-timeout", "2")
        begin = time.monotonic()
        code, out, err = run_cli(*follower)
        took = time.monotonic() - begin
    assert code == 1
    assert err.startswith(f"Error: cannot reach the leader at 127.0.0.1:{port} after 2s: "
                          "something answers on that port, but not as vLLM's rendezvous "
                          "(torch TCPStore) does")
    assert len(err.strip().splitlines()) == 1, err
    assert "Traceback" not in err
    assert took < 30  # the join timeout, not torch's 10 minutes
    assert run_cli("status", "fol")[0] == 3  # failed start: nothing left, no record


def test_the_rendezvous_probe_knows_a_tcpstore_from_other_listeners() -> None:
    from cmw_vllm.engine_entry.cmw_leader_watch import TCPSTORE, ZMQ, rendezvous_answers
    from tests.fake_vllm.vllm.entrypoints.cli.main import _listen

    port = free_port()
    _listen("127.0.0.1", port)  # the stand-in's TCPStore (real torch: test_multinode_real)
    assert rendezvous_answers("127.0.0.1", port, TCPSTORE, timeout=2) is None
    for behaviour in ("silent", "echo"):
        with _impostor(behaviour) as other:
            for kind in (TCPSTORE, ZMQ):
                reason = rendezvous_answers("127.0.0.1", other, kind, timeout=0.5)
                assert reason is not None and "not as vLLM's rendezvous" in reason
    assert "connection refused" in (rendezvous_answers("127.0.0.1", free_port()) or "")


def test_joined_lines_from_real_vllm_logs() -> None:
    tp = ("(Worker pid=13459) INFO 11-26 02:16:10 [parallel_state.py:2350] rank 1 in world size "
          "2 is assigned as DP rank 0, PP rank 0, PCP rank 0, TP rank 1, ETP rank 1")
    dp_local = ("(Worker pid=29297) INFO 11-26 02:37:01 [parallel_state.py:2350] rank 0 in world "
                "size 1 is assigned as DP rank 0, PP rank 0, PCP rank 0, TP rank 0")
    dp = ("(EngineCore_DP1 pid=28766) INFO 11-26 02:38:15 [core.py:1247] Waiting for READY "
          "message from DP Coordinator...")
    assert multinode.follower_joined(tp)
    assert not multinode.follower_joined(dp_local)  # its own local group, not the leader's
    assert multinode.follower_joined(dp_local + "\n" + dp)
    # The coordinator answered within 10 s: no "Waiting for READY", but the engine was built
    # after the leader's front end answered its handshake.
    built = ("(EngineCore_DP1 pid=2146) INFO 11-26 05:59:20 [core.py:402] init engine (profile, "
             "create kv cache, warmup model) took 77.51 s")
    assert multinode.follower_joined(dp_local + "\n" + built)
    world = ("(Worker pid=1) INFO [parallel_state.py:1906] world_size=2 rank=0 local_rank=0 "
             "distributed_init_method=tcp://10.231.9.1:19850 backend=gloo")
    assert multinode.world_from_log(world) == (2, "10.231.9.1:19850")
