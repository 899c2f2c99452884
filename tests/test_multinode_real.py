"""Real vLLM over two "machines": network namespaces joined by a veth pair (root only).

One tensor-parallel-2 server spans both namespaces (leader in A serves the API, follower in
B runs headless); the module shares it between the tests, which run in order. Each side has
its own state dir, as two machines would, and every cmw-vllm command runs inside its
namespace, so no traffic leaves the pair (and loopback). The namespaces and whatever runs
in them are removed by the fixture's finalizer, whatever happens.
"""

from __future__ import annotations

import fcntl
import json
import os
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.conftest import REAL_VLLM_LOCK
from tests.netns import NetnsPair, unavailable_reason
from tests.tiny_model import make_tiny_model

pytestmark = pytest.mark.vllm

CLI = [sys.executable, "-m", "cmw_vllm"]
HTTP_PORT = 19801
MASTER_PORT = 19850


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


def _side_env(home: Path, engine: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("CMW_VLLM_", "VLLM_", "HF_")) and k not in ("http_proxy",
                                                                           "https_proxy")}
    env.update(CMW_VLLM_HOME=str(home / "cmw-home"), HF_HOME=str(home / "hf-home"),
               HF_HUB_OFFLINE="1", CMW_VLLM_PYTHON=engine, VLLM_CPU_KVCACHE_SPACE="1")
    return env


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory, engine_python: str) -> Iterator[Cluster]:
    """Leader in A, follower in B, TP=2 across them; torn down with the namespaces."""
    reason = unavailable_reason()
    if reason:
        pytest.skip(reason)
    engine = engine_python
    root = tmp_path_factory.mktemp("multinode")
    model = make_tiny_model(root / "tiny-qwen2")
    REAL_VLLM_LOCK.parent.mkdir(parents=True, exist_ok=True)
    with REAL_VLLM_LOCK.open("a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        net = NetnsPair()
        try:
            net.create()
        except RuntimeError as exc:
            pytest.skip(str(exc))
        try:
            common = ["-tp", "2", "--nnodes", "2", "--master-addr", net.addr_a,
                      "--master-port", str(MASTER_PORT), "--json"]
            c = Cluster(net, _side_env(root / "a", engine), _side_env(root / "b", engine),
                        model, {}, common)
            code, out, err = c.cli("b", "start", str(model), "--name", "fol",
                                   "--node-rank", "1", *common, "--no-wait")
            assert code == 0, err
            code, out, err = c.cli("a", "start", str(model), "--name", "lead", "--node-rank",
                                   "0", "--port", str(HTTP_PORT), *common, timeout=600)
            assert code == 0, err + c.cli("b", "logs", "fol", "-n", "40")[1]
            c.leader_start = json.loads(out)
            yield c
        finally:
            for side, name in (("a", "lead"), ("b", "fol")):
                c_env = _side_env(root / side, engine)
                net.run(net.a if side == "a" else net.b, [*CLI, "stop", name, "--timeout",
                                                          "5"], c_env, 60)
            left = net.destroy()
            fcntl.flock(lock, fcntl.LOCK_UN)
            if left:
                print(f"multinode cleanup: killed leftover pids {left}", file=sys.stderr)


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
