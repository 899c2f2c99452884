"""A two-node Ray cluster over two network namespaces, and vLLM's Ray executor on it (root).

Ray runs on CPU, so the cluster forms for real; vLLM's CPU build refuses the Ray executor
once it has connected to the cluster, and cmw-vllm must say so in one line. Needs Ray in
vLLM's interpreter (scripts/install.sh puts it there); skipped with the reason otherwise.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.conftest import REAL_VLLM_LOCK
from tests.netns import NetnsPair, locked_pair, side_env
from tests.tiny_model import make_tiny_model

pytestmark = pytest.mark.vllm

CLI = [sys.executable, "-m", "cmw_vllm"]


@dataclass
class RayPair:
    net: NetnsPair
    env: dict[str, dict[str, str]]
    model: Path

    def cli(self, side: str, *args: str, timeout: float = 180) -> tuple[int, str, str]:
        ns = self.net.a if side == "a" else self.net.b
        proc = self.net.run(ns, [*CLI, *args], self.env[side], timeout)
        return proc.returncode, proc.stdout, proc.stderr


@pytest.fixture(scope="module")
def ray_pair(tmp_path_factory: pytest.TempPathFactory, engine_python: str) -> Iterator[RayPair]:
    """Ray head in namespace A, a Ray worker in B; both stopped and the namespaces removed."""
    engine = engine_python
    if not (Path(engine).parent / "ray").exists():
        pytest.skip(f"Ray is not installed beside vLLM ({engine}); scripts/install.sh adds it")
    root = tmp_path_factory.mktemp("ray")
    with locked_pair(REAL_VLLM_LOCK, "ray") as net:
        pair = RayPair(net, {"a": side_env(root / "a", engine), "b": side_env(root / "b", engine)},
                       make_tiny_model(root / "tiny-qwen2"))
        try:
            yield pair
        finally:
            for side in ("b", "a"):
                pair.cli(side, "ray", "stop", "--timeout", "10", timeout=60)


def test_two_node_ray_cluster_forms_and_status_shows_both(ray_pair: RayPair) -> None:
    code, out, err = ray_pair.cli("a", "ray", "start", "--head", "--", "--num-cpus", "1")
    assert code == 0, err
    head = f"{ray_pair.net.addr_a}:6379"
    assert f"cluster {head}" in out
    code, out, err = ray_pair.cli("b", "ray", "start", "--address", head, "--",
                                  "--num-cpus", "1")
    assert code == 0, err
    for side in ("a", "b"):
        code, out, err = ray_pair.cli(side, "ray", "status", "--json")
        assert code == 0, err
        status = json.loads(out)
        assert status["role"] == ("ray-head" if side == "a" else "ray-worker")
        assert status["address"] == head
        alive = sorted(n["node_ip"] for n in status["nodes"] if n["alive"])
        assert alive == [ray_pair.net.addr_a, ray_pair.net.addr_b], status
    code, out, _ = ray_pair.cli("a", "ray", "status")
    assert ray_pair.net.addr_b in out and "alive" in out


def test_vllm_on_ray_on_the_cpu_build_is_diagnosed_in_one_line(ray_pair: RayPair) -> None:
    code, out, err = ray_pair.cli("a", "start", str(ray_pair.model), "--name", "onray",
                                  "-tp", "2", "--distributed-executor-backend", "ray",
                                  timeout=300)
    assert code == 1, out + err
    assert "Hint: vLLM's Ray executor refuses this platform (cpu)" in err
    assert err.count("\n") <= 25  # the error, the hint and the log's tail
    code, log, _ = ray_pair.cli("a", "logs", "onray", "-n", "400")  # the log stays
    assert code == 0
    assert f"{ray_pair.net.addr_a}:6379" in log  # vLLM joined the managed cluster
    assert "does not support ray" in log


def test_ray_stop_ends_each_node(ray_pair: RayPair) -> None:
    for side, ns in (("b", ray_pair.net.b), ("a", ray_pair.net.a)):
        code, out, err = ray_pair.cli(side, "ray", "stop")
        assert code == 0, err
        assert "Stopped the Ray node" in out
        assert ray_pair.net.pids(ns) == []
        code, _, _ = ray_pair.cli(side, "ray", "status")
        assert code == 3
