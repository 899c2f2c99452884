"""Real vLLM over two "machines": network namespaces joined by a veth pair (root only).

One tensor-parallel-2 server spans both namespaces (leader in A serves the API, follower in
B runs headless); the module shares it between the tests, which run in order. Each side has
its own state dir, as two machines would, and every cmw-vllm command runs inside its
namespace, so no traffic leaves the pair (and loopback). The namespaces and whatever runs
in them are removed by the fixture's finalizer, whatever happens.
"""

from __future__ import annotations

import json
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.conftest import REAL_VLLM_LOCK
from tests.netns import NetnsPair, locked_pair, side_env
from tests.tiny_model import make_tiny_model

pytestmark = pytest.mark.vllm

CLI = [sys.executable, "-m", "cmw_vllm"]
HTTP_PORT = 19801
MASTER_PORT = 19850
DP_RPC_PORT = 19860


@dataclass
class Cluster:
    """The two namespaces, the environment of each side, and the model."""

    net: NetnsPair
    env_a: dict[str, str]
    env_b: dict[str, str]
    model: Path
    leader_start: dict
    common: list[str]

    def cli(self, side: str, *args: str, timeout: float = 120) -> tuple[int, str, str]:
        ns, env = (self.net.a, self.env_a) if side == "a" else (self.net.b, self.env_b)
        proc = self.net.run(ns, [*CLI, *args], env, timeout)
        return proc.returncode, proc.stdout, proc.stderr

    def status(self, side: str) -> dict[str, dict]:
        code, out, err = self.cli(side, "status", "--json")
        assert out, err
        return {s["name"]: s for s in json.loads(out)["servers"]}


@pytest.fixture(scope="module")
def hosts(tmp_path_factory: pytest.TempPathFactory, engine_python: str) -> Iterator[Cluster]:
    """The two namespaces, under the machine-wide real-vLLM lock; everything is stopped and
    the namespaces are removed at the end, whatever happened."""
    root = tmp_path_factory.mktemp("multinode")
    with locked_pair(REAL_VLLM_LOCK, "multinode") as net:
        model = make_tiny_model(root / "tiny-qwen2")
        common = ["-tp", "2", "--nnodes", "2", "--master-addr", net.addr_a,
                  "--master-port", str(MASTER_PORT), "--json"]
        c = Cluster(net, side_env(root / "a", engine_python),
                    side_env(root / "b", engine_python), model, {}, common)
        try:
            yield c
        finally:
            for side in ("a", "b"):
                c.cli(side, "stop", "--all", "--timeout", "5", timeout=120)


@pytest.fixture(scope="module")
def cluster(hosts: Cluster) -> Cluster:
    """Leader in A, follower in B, tensor parallel 2 across them."""
    c = hosts
    code, out, err = c.cli("b", "start", str(c.model), "--name", "fol", "--node-rank", "1",
                           *c.common, "--no-wait")
    assert code == 0, err
    code, out, err = c.cli("a", "start", str(c.model), "--name", "lead", "--node-rank", "0",
                           "--port", str(HTTP_PORT), *c.common, timeout=600)
    assert code == 0, err + c.cli("b", "logs", "fol", "-n", "40")[1]
    c.leader_start = json.loads(out)
    return c


def test_leader_is_healthy_and_answers_a_chat(cluster: Cluster) -> None:
    assert cluster.leader_start["state"] == "healthy"
    assert cluster.leader_start["role"] == "leader"
    code, out, err = cluster.cli("a", "test", "lead", "--json")
    assert code == 0, err
    assert json.loads(out)["ok"] is True


def test_status_on_both_sides_shows_the_roles(cluster: Cluster) -> None:
    lead = cluster.status("a")["lead"]
    fol = cluster.status("b")["fol"]
    rendezvous = f"{cluster.net.addr_a}:{MASTER_PORT}"
    assert (lead["state"], lead["role"], lead["node_rank"]) == ("healthy", "leader", 0)
    assert (fol["state"], fol["role"], fol["node_rank"]) == ("joined", "follower", 1)
    assert lead["leader"] == fol["leader"] == rendezvous
    assert fol["port"] is None
    assert lead["cluster"]["world_size"] == 2
    assert lead["cluster"]["followers_seen"] == [cluster.net.addr_b]
    code, out, _ = cluster.cli("b", "status")
    assert code == 0 and f"fol: follower of {rendezvous} (rank 1)" in out


def test_stop_on_the_leader_then_the_follower_leaves_nothing(cluster: Cluster) -> None:
    code, out, err = cluster.cli("a", "stop", "lead", "--json")
    assert code == 0, err
    assert cluster.net.pids(cluster.net.a) == []
    # vLLM's headless follower keeps waiting for a leader that is gone; its watch ends it.
    deadline = time.monotonic() + 60
    fol = cluster.status("b")["fol"]
    while fol["state"] != "exited" and time.monotonic() < deadline:
        time.sleep(1)
        fol = cluster.status("b")["fol"]
    assert fol["state"] == "exited", fol
    assert fol["error"].startswith(f"lost the leader at {cluster.net.addr_a}:{MASTER_PORT}")
    assert fol["orphan_pids"] == []
    code, out, err = cluster.cli("b", "stop", "fol")
    assert code == 0, err
    assert cluster.net.pids(cluster.net.b) == []


def test_follower_pointed_at_a_wrong_master_fails_fast(cluster: Cluster) -> None:
    wrong = cluster.net.addr_a.rsplit(".", 1)[0] + ".99"  # in the subnet, nobody there
    begin = time.monotonic()
    code, out, err = cluster.cli(
        "b", "start", str(cluster.model), "--name", "lost", "--node-rank", "1", "-tp", "2",
        "--nnodes", "2", "--master-addr", wrong, "--master-port", str(MASTER_PORT),
        "--join-timeout", "15", timeout=300)
    took = time.monotonic() - begin
    assert code == 1, out + err
    assert f"cannot reach the leader at {wrong}:{MASTER_PORT} after 15s" in err
    assert took < 120, took
    assert cluster.net.pids(cluster.net.b) == []


def test_data_parallel_2_across_the_two_hosts(hosts: Cluster) -> None:
    """vLLM's CPU build runs data parallel over nodes: one API on A, the second copy on B."""
    c = hosts
    dp = ["-dp", "2", "--data-parallel-size-local", "1", "--data-parallel-address",
          c.net.addr_a, "--data-parallel-rpc-port", str(DP_RPC_PORT), "--json"]
    code, out, err = c.cli("b", "start", str(c.model), "--name", "dpfol",
                           "--data-parallel-start-rank", "1", *dp, "--no-wait")
    assert code == 0, err
    code, out, err = c.cli("a", "start", str(c.model), "--name", "dplead",
                           "--port", str(HTTP_PORT + 1), *dp, timeout=600)
    assert code == 0, err + c.cli("b", "logs", "dpfol", "-n", "40")[1]
    assert json.loads(out)["role"] == "leader"
    for _ in range(2):  # the API balances over both copies
        code, out, err = c.cli("a", "test", "dplead", "--json")
        assert code == 0, err
    lead = c.status("a")["dplead"]
    assert lead["cluster"]["data_parallel_size"] == 2
    assert lead["cluster"]["followers_seen"] == [c.net.addr_b]
    time.sleep(8)  # the leader closes its handshake port: the follower must stay
    fol = c.status("b")["dpfol"]
    assert (fol["state"], fol["role"], fol["node_rank"]) == ("joined", "follower", 1)
    assert c.cli("a", "stop", "dplead")[0] == 0
    deadline = time.monotonic() + 60
    while fol["state"] != "exited" and time.monotonic() < deadline:
        time.sleep(1)
        fol = c.status("b")["dpfol"]
    assert fol["error"].startswith(f"lost the leader at {c.net.addr_a}:{DP_RPC_PORT}"), fol
    assert c.cli("b", "stop", "dpfol")[0] == 0
    assert c.net.pids(c.net.a) == [] and c.net.pids(c.net.b) == []
