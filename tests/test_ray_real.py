"""A two-node Ray cluster over two network namespaces, and vLLM's Ray executor on it (root).

Ray runs on CPU, so the cluster forms for real; vLLM's CPU build refuses the Ray executor
once it has connected to the cluster, and cmw-vllm must say so in one line. Needs Ray in
vLLM's interpreter (scripts/install.sh puts it there); skipped with the reason otherwise.
"""

from __future__ import annotations

import fcntl
import json
import os
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.conftest import REAL_VLLM_LOCK
from tests.netns import NetnsPair, unavailable_reason
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


def _env(home: Path, engine: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("CMW_VLLM_", "VLLM_", "HF_", "RAY_"))}
    env.update(CMW_VLLM_HOME=str(home / "cmw-home"), HF_HOME=str(home / "hf-home"),
               HF_HUB_OFFLINE="1", CMW_VLLM_PYTHON=engine, VLLM_CPU_KVCACHE_SPACE="1")
    return env


@pytest.fixture(scope="module")
def ray_pair(tmp_path_factory: pytest.TempPathFactory, engine_python: str) -> Iterator[RayPair]:
    """Ray head in namespace A, a Ray worker in B; both stopped and the namespaces removed."""
    reason = unavailable_reason()
    if reason:
        pytest.skip(reason)
    engine = engine_python
    if not (Path(engine).parent / "ray").exists():
        pytest.skip(f"Ray is not installed beside vLLM ({engine}); scripts/install.sh adds it")
    root = tmp_path_factory.mktemp("ray")
    model = make_tiny_model(root / "tiny-qwen2")
    with REAL_VLLM_LOCK.open("a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        net = NetnsPair()
        try:
            net.create()
        except RuntimeError as exc:
            pytest.skip(str(exc))
        pair = RayPair(net, {"a": _env(root / "a", engine), "b": _env(root / "b", engine)},
                       model)
        try:
            yield pair
        finally:
            for side in ("b", "a"):
                pair.cli(side, "ray", "stop", "--timeout", "10", timeout=60)
            left = net.destroy()
            fcntl.flock(lock, fcntl.LOCK_UN)
            if left:
                print(f"ray cleanup: killed leftover pids {left}", file=sys.stderr)


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
