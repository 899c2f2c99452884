"""GPU placement, packing and per-GPU eviction on a simulated multi-GPU machine.

``tests/nvml_sim/pynvml.py`` stands in for NVML: several GPUs, foreign programs declared in
a JSON file, and the stand-in engines (``fake_engine``) holding what vLLM would hold on the
GPUs of their ``CUDA_VISIBLE_DEVICES``. The CLI runs as a subprocess with that module first
on ``PYTHONPATH``; the gateway runs in this process with it in ``sys.path``.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import free_port, write_models

ROOT = Path(__file__).resolve().parent.parent
SIM = Path(__file__).resolve().parent / "nvml_sim"
sys.path.insert(0, str(ROOT / "tests" / "gpu"))
from mkmodel import make  # noqa: E402

GiB = 2**30


@pytest.fixture(scope="module")
def model_8b(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A Llama-8B-shaped model whose weights take no disk (the estimate reads headers)."""
    out = tmp_path_factory.mktemp("m8b")
    make(out, "8b")
    return out


class Machine:
    """The simulated GPUs: the JSON file the stand-in NVML reads, and the CLI beside it."""

    def __init__(self, path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
        self.path = path
        self.spec: dict[str, Any] = {"gpus": [], "foreign": [], "links": [], "hold_after": 0}
        monkeypatch.setenv("CMW_FAKE_NVML", str(path))
        monkeypatch.setenv("PYTHONPATH", os.pathsep.join(
            [str(SIM), str(ROOT), *filter(None, [os.environ.get("PYTHONPATH")])]))
        monkeypatch.syspath_prepend(str(SIM))
        monkeypatch.delitem(sys.modules, "pynvml", raising=False)
        monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
        monkeypatch.delenv("CMW_VLLM_PLACEMENT", raising=False)

    def set(self, gpus: int, total_gib: float = 80, **more: Any) -> None:
        self.spec.update(gpus=[{"name": "Sim H100", "total_gib": total_gib}] * gpus, **more)
        self.path.write_text(json.dumps(self.spec))

    def cli(self, *args: str, **env: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([sys.executable, "-m", "cmw_vllm", *args], capture_output=True,
                              text=True, timeout=120, stdin=subprocess.DEVNULL,
                              env={**os.environ, **env})

    def status(self) -> dict[str, Any]:
        proc = self.cli("status", "--json")
        assert proc.returncode in (0, 4), proc.stderr  # 4: some are still starting
        return {s["name"]: s for s in json.loads(proc.stdout)["servers"]}

    def gpus(self) -> dict[str, Any]:
        proc = self.cli("gpus", "--json")
        assert proc.returncode == 0, proc.stderr
        return json.loads(proc.stdout)


@pytest.fixture
def machine(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, fake_engine: Path) -> Machine:
    return Machine(tmp_path / "nvml.json", monkeypatch)


def start(machine: Machine, model: Path, name: str, *extra: str, verbose: bool = False,
          **env: str) -> subprocess.CompletedProcess[str]:
    return machine.cli(*(["-v"] if verbose else []), "start", str(model), "--name", name,
                       "--port", str(free_port()), "--auto-port", "--timeout", "60", *extra,
                       **env)


# --------------------------------------------------------------------------- placement


def test_start_goes_to_a_gpu_that_has_room(machine: Machine, model_8b: Path) -> None:
    """The issue's case: GPU 0 is held by another program; the 8B model goes to GPU 1."""
    machine.set(4, foreign=[{"gpu": 0, "gib": 70}])
    proc = start(machine, model_8b, "m1", verbose=True)
    assert proc.returncode == 0, proc.stderr
    assert machine.status()["m1"]["gpus"] == [1]
    assert "placement: m1 -> GPU 1" in proc.stderr
    assert "  GPUs:     1\n" in proc.stdout


def test_forced_gpu_refusal_names_each_gpu_and_a_set_that_fits(machine: Machine,
                                                                model_8b: Path) -> None:
    machine.set(4, foreign=[{"gpu": 0, "gib": 70}])
    proc = start(machine, model_8b, "m1", "--gpus", "0")
    assert proc.returncode == 7, proc.stderr
    assert "GPU 0: 10.00 GiB free of 80.00 GiB; 70.00 GiB held by other programs" in proc.stderr
    assert "`--gpus 1`" in proc.stderr
    assert "Traceback" not in proc.stderr


def test_refusal_when_no_gpu_fits_names_every_gpu(machine: Machine, model_8b: Path) -> None:
    machine.set(2, foreign=[{"gpu": 0, "gib": 60}, {"gpu": 1, "gib": 55}])
    proc = start(machine, model_8b, "m1", "--max-model-len", "8192")
    assert proc.returncode == 7, proc.stderr
    line = proc.stderr
    assert "GPU 0: 20.00 GiB free" in line and "GPU 1: 25.00 GiB free" in line
    # The hint names settings that fit on the GPU with the most room, and they do.
    hint = re.search(r"try `([^`]*--gpus 1)`", line)
    assert hint is not None, line
    again = start(machine, model_8b, "m1", "--max-model-len", "8192", *hint.group(1).split())
    assert again.returncode == 0, again.stderr


def test_tensor_parallel_prefers_the_fastest_link(machine: Machine, model_8b: Path) -> None:
    machine.set(4, links=[[0, 1, "PHB"], [2, 3, "NVLINK"], [0, 2, "SYS"], [0, 3, "SYS"],
                          [1, 2, "SYS"], [1, 3, "SYS"]])
    proc = start(machine, model_8b, "tp", "--tensor-parallel-size", "2")
    assert proc.returncode == 0, proc.stderr
    assert machine.status()["tp"]["gpus"] == [2, 3]
    links = {(x["a"], x["b"]): x["link"] for x in machine.gpus()["links"]}
    assert links[(2, 3)] == "NVLINK" and links[(0, 1)] == "PHB"


# --------------------------------------------------------------------------- packing


def test_auto_share_packs_two_servers_on_one_gpu(machine: Machine, model_8b: Path) -> None:
    machine.set(2)
    for name in ("p1", "p2"):
        proc = start(machine, model_8b, name, "--gpu-memory-utilization", "auto",
                     "--max-model-len", "4096")
        assert proc.returncode == 0, proc.stderr
    servers = machine.status()
    assert servers["p1"]["gpus"] == servers["p2"]["gpus"] == [0]
    gpu0 = machine.gpus()["gpus"][0]
    assert sorted(gpu0["servers"]) == ["p1", "p2"]
    assert gpu0["memory_used"] <= gpu0["memory_total"]
    shares = [servers[n]["gpu_memory_utilization"] for n in ("p1", "p2")]
    assert all(0.2 < s < 0.5 for s in shares), shares


def test_spread_policy_uses_the_emptiest_gpu(machine: Machine, model_8b: Path) -> None:
    machine.set(2)
    for name in ("p1", "p2"):
        proc = start(machine, model_8b, name, "--gpu-memory-utilization", "auto",
                     "--max-model-len", "4096", CMW_VLLM_PLACEMENT="spread")
        assert proc.returncode == 0, proc.stderr
    servers = machine.status()
    assert {servers["p1"]["gpus"][0], servers["p2"]["gpus"][0]} == {0, 1}


def test_estimate_shows_the_auto_share(machine: Machine, model_8b: Path) -> None:
    machine.set(1)
    proc = machine.cli("estimate", str(model_8b), "--max-model-len", "4096", "--json")
    assert proc.returncode == 0, proc.stderr
    share = json.loads(proc.stdout)["gpu_memory_utilization_auto"]
    assert 0.2 < share < 0.5
    text = machine.cli("estimate", str(model_8b), "--max-model-len", "4096").stdout
    assert f"--gpu-memory-utilization auto: {share:g}" in text


def test_concurrent_starts_pick_different_gpus(machine: Machine, model_8b: Path) -> None:
    """Loading servers hold nothing yet (hold_after): only the reservations keep the second
    start off the first one's GPU."""
    machine.set(2, hold_after=3600)
    results: dict[str, subprocess.CompletedProcess[str]] = {}

    def run(name: str) -> None:
        results[name] = start(machine, model_8b, name, "--no-wait", FAKE_VLLM_DELAY="60")

    threads = [threading.Thread(target=run, args=(n,)) for n in ("c1", "c2")]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert all(r.returncode == 0 for r in results.values()), results
    servers = machine.status()
    assert sorted(servers["c1"]["gpus"] + servers["c2"]["gpus"]) == [0, 1]
    third = start(machine, model_8b, "c3", "--no-wait", FAKE_VLLM_DELAY="60")
    assert third.returncode == 7, third.stderr
    assert "reserved by servers still loading" in third.stderr


def test_gpus_shows_reserved_memory_and_servers(machine: Machine, model_8b: Path) -> None:
    machine.set(2, hold_after=3600)
    # Loading for a minute: a server that is ready reserves nothing (on a busy machine the
    # stand-in could be ready before `gpus` runs).
    proc = start(machine, model_8b, "r1", "--no-wait", "--gpu-memory-utilization", "0.5",
                 FAKE_VLLM_DELAY="60")
    assert proc.returncode == 0, proc.stderr
    data = machine.gpus()
    gpu = data["gpus"][0]
    assert gpu["servers"] == ["r1"]
    assert gpu["memory_reserved"] == 40 * GiB + 512 * 2**20
    table = machine.cli("gpus").stdout
    assert "RESERVED" in table and "40.5 GiB" in table


# --------------------------------------------------------------------------- the gateway


@pytest.fixture
def gateway(machine: Machine, isolated_home: Path, model_8b: Path) -> Iterator[Callable]:
    from cmw_vllm.gateway.settings import GatewaySettings
    from tests.gateway_harness import GatewayThread

    made: list[Any] = []

    def make(models: dict[str, dict[str, Any]]) -> Any:
        write_models(isolated_home, {
            name: {"model": str(model_8b), "port": free_port(), "max_model_len": 4096, **extra}
            for name, extra in models.items()})
        gw = GatewayThread(GatewaySettings(port=free_port(), health_interval=0.5,
                                           memory_wait=5))
        made.append(gw)
        return gw

    yield make
    for gw in made:
        gw.close()


def _chat(url: str, model: str) -> int:
    import requests

    return requests.post(f"{url}/v1/chat/completions", timeout=60, json={
        "model": model, "messages": [{"role": "user", "content": "hi"}]}).status_code


def test_gateway_evicts_only_from_the_gpu_the_new_model_uses(machine: Machine,
                                                             gateway: Callable) -> None:
    """a on GPU 0, b on GPU 1, both half a GPU; c needs more than half: the least recently
    used server goes, and only that one."""
    machine.set(2)
    gw = gateway({"a": {"gpus": "0", "gpu_memory_utilization": 0.6},
                  "b": {"gpus": "1", "gpu_memory_utilization": 0.6},
                  "c": {"gpu_memory_utilization": 0.6}})
    assert _chat(gw.url, "a") == 200
    assert _chat(gw.url, "b") == 200
    assert _chat(gw.url, "a") == 200  # b is now the least recently used
    assert _chat(gw.url, "c") == 200
    assert gw.metrics.evictions == {"b": 1}
    servers = machine.status()
    assert servers["c"]["gpus"] == [1] and servers["a"]["gpus"] == [0]
    assert "b" not in servers


def test_gateway_prefers_a_gpu_that_needs_no_eviction(machine: Machine,
                                                     gateway: Callable) -> None:
    machine.set(2)
    gw = gateway({"a": {}, "b": {}})  # auto share: both fit on GPU 0 beside each other
    assert _chat(gw.url, "a") == 200
    assert _chat(gw.url, "b") == 200
    assert gw.metrics.evictions == {}
    servers = machine.status()
    assert servers["a"]["gpus"] == servers["b"]["gpus"] == [0]


def test_gateway_starts_on_a_free_gpu_instead_of_evicting(machine: Machine,
                                                          gateway: Callable) -> None:
    """a holds most of GPU 0; b goes to GPU 1 and a keeps running."""
    machine.set(2)
    gw = gateway({"a": {"gpus": "0", "gpu_memory_utilization": 0.6},
                  "b": {"gpu_memory_utilization": 0.6}})
    assert _chat(gw.url, "a") == 200
    assert _chat(gw.url, "b") == 200
    assert gw.metrics.evictions == {}
    servers = machine.status()
    assert servers["a"]["gpus"] == [0] and servers["a"]["state"] == "healthy"
    assert servers["b"]["gpus"] == [1]
