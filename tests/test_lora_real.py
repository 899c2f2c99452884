"""LoRA adapters on real vLLM (CPU build, tiny random model, two random adapters).

One gateway process and one base server (started on demand by the first request) are
shared by the tests of this module, in file order; the base is restarted once.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import requests

from tests.conftest import free_port, real_gateway
from tests.tiny_model import make_tiny_adapter

pytestmark = pytest.mark.vllm


@dataclass
class LoraSetup:
    url: str  # the gateway
    home: Path
    env: dict[str, str]
    adapters: dict[str, Path]
    proc: subprocess.Popen[bytes]
    answers: dict[str, str] = field(default_factory=dict)  # model -> greedy answer

    def record(self, name: str) -> dict[str, Any] | None:
        path = self.home / "servers" / f"{name}.json"
        return json.loads(path.read_text()) if path.exists() else None

    def cli(self, *args: str, timeout: float = 600) -> subprocess.CompletedProcess[str]:
        return subprocess.run([sys.executable, "-m", "cmw_vllm", *args], env=self.env,
                              capture_output=True, text=True, timeout=timeout, check=False)

    def declare(self, name: str, base: str = "tiny") -> None:
        with (self.home / "models.toml").open("a") as fh:
            fh.write(f'[adapters.{name}]\nbase = "{base}"\nsource = "{self.adapters[name]}"\n')


@pytest.fixture(scope="module")
def setup(tmp_path_factory: pytest.TempPathFactory, tiny_model: Path,
          engine_python: str) -> Iterator[LoraSetup]:
    home = tmp_path_factory.mktemp("lora-home")
    root = tmp_path_factory.mktemp("lora-adapters")
    adapters = {"a1": make_tiny_adapter(root / "a1", seed=1),
                # Loaded at run time: a rank the base was started with (a1's).
                "a2": make_tiny_adapter(root / "a2", seed=2,
                                        targets=("q_proj", "k_proj", "v_proj", "o_proj")),
                "wide": make_tiny_adapter(root / "wide", heads=4)}
    (home / "models.toml").write_text(
        f'[models.tiny]\nmodel = "{tiny_model}"\nport = {free_port()}\n'
        f"max_model_len = 1024\nmax_loras = 2\nidle_timeout = 0\n"
        f'[adapters.a1]\nbase = "tiny"\nsource = "{adapters["a1"]}"\n')
    env = {**os.environ, "CMW_VLLM_HOME": str(home), "HF_HOME": str(home / "hf"),
           "CMW_VLLM_PYTHON": engine_python,
           "VLLM_CPU_KVCACHE_SPACE": os.environ.get("VLLM_CPU_KVCACHE_SPACE", "1")}
    env.pop("VLLM_API_KEY", None)
    with real_gateway(home, env, "--start-timeout", "900") as (url, proc):
        yield LoraSetup(url, home, env, adapters, proc)


def _chat(url: str, model: str) -> requests.Response:
    payload = {"model": model, "messages": [{"role": "user", "content": "Hello"}],
               "max_tokens": 16, "temperature": 0, "ignore_eos": True}
    return requests.post(f"{url}/v1/chat/completions", json=payload, timeout=900)


def _answer(url: str, model: str) -> str:
    reply = _chat(url, model)
    assert reply.status_code == 200, reply.text
    if model != "tiny":  # the base answers with its model id
        assert reply.json()["model"] == model
    return str(reply.json()["choices"][0]["message"]["content"])


def test_a_mismatched_adapter_is_refused_before_launch(setup: LoraSetup,
                                                       tiny_model: Path) -> None:
    other = setup.home / "other"
    other.mkdir()
    (other / "models.toml").write_text(
        f'[models.tiny]\nmodel = "{tiny_model}"\nport = {free_port()}\n'
        f'[adapters.wide]\nbase = "tiny"\nsource = "{setup.adapters["wide"]}"\n')
    done = subprocess.run([sys.executable, "-m", "cmw_vllm", "start", "tiny"],
                          env={**setup.env, "CMW_VLLM_HOME": str(other)},
                          capture_output=True, text=True, timeout=120, check=False)
    assert done.returncode == 2, done.stderr
    assert done.stderr.startswith("Error: adapter 'wide' does not fit its base 'tiny': ")
    assert "Traceback" not in done.stderr
    assert not (other / "servers" / "tiny.json").exists()
    assert not (other / "logs" / "tiny.log").exists()


def test_base_and_adapter_answer_differently(setup: LoraSetup) -> None:
    setup.answers["a1"] = _answer(setup.url, "a1")  # starts the base with a1
    setup.answers["tiny"] = _answer(setup.url, "tiny")
    assert setup.answers["a1"] != setup.answers["tiny"]
    # Greedy: the same again.
    assert _answer(setup.url, "a1") == setup.answers["a1"]


def test_a_second_adapter_loads_without_restarting_the_base(setup: LoraSetup) -> None:
    pid = setup.record("tiny")["pid"]
    setup.declare("a2")
    setup.answers["a2"] = _answer(setup.url, "a2")
    assert setup.record("tiny")["pid"] == pid
    assert len(set(setup.answers.values())) == 3, setup.answers
    # Direct to the base server, by the adapter's name, too.
    base_url = setup.record("tiny")["base_url"]
    assert _answer(base_url, "a2") == setup.answers["a2"]
    listing = {m["id"]: m for m in requests.get(f"{setup.url}/v1/models", timeout=30)
               .json()["data"]}
    assert listing["a2"]["parent"] == "tiny" and listing["a2"]["state"] == "loaded"
    done = setup.cli("status", "tiny", "--json")
    assert done.returncode == 0, done.stderr
    assert sorted(json.loads(done.stdout)["servers"][0]["adapters"]) == ["a1", "a2"]


def test_both_adapters_answer_after_restart(setup: LoraSetup) -> None:
    pid = setup.record("tiny")["pid"]
    done = setup.cli("restart", "tiny", timeout=900)
    assert done.returncode == 0, done.stderr
    assert setup.record("tiny")["pid"] != pid
    base_url = setup.record("tiny")["base_url"]
    for model in ("a1", "a2", "tiny"):
        assert _answer(base_url, model) == setup.answers[model]
    done = setup.cli("status", "tiny", "--json")
    assert sorted(json.loads(done.stdout)["servers"][0]["adapters"]) == ["a1", "a2"]
