"""LoRA adapters on the stand-in engine: declared in models.toml, checked before a launch,
served at start, routed and loaded at run time by the gateway (least recently used unloaded
first, never one in flight), kept across a restart, shown by ``status --json``. The same
paths on real vLLM are in test_lora_real.py."""

from __future__ import annotations

import json
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest
import requests

from cmw_vllm.server_record import log_path, read_record
from tests.conftest import free_port, run_cli, wait_until, write_models
from tests.gateway_harness import gateway_maker
from tests.tiny_model import make_tiny_adapter


@pytest.fixture(scope="module")
def adapters(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Three adapters that fit the tiny model (a2 of rank 16), one made for a wider model."""
    root = tmp_path_factory.mktemp("adapters")
    return {"a1": make_tiny_adapter(root / "a1", seed=1),
            "a2": make_tiny_adapter(root / "a2", seed=2, rank=16),
            "a3": make_tiny_adapter(root / "a3", seed=3),
            "wide": make_tiny_adapter(root / "wide", heads=4)}


@pytest.fixture
def base(isolated_home: Path, tiny_model: Path,
         monkeypatch: pytest.MonkeyPatch) -> dict[str, Any]:
    """The tiny model's entry (its real config: the memory check wants a small KV space)."""
    monkeypatch.setenv("VLLM_CPU_KVCACHE_SPACE", "1")
    return {"model": str(tiny_model), "port": free_port()}


def _chat(url: str, model: str, **kw: Any) -> requests.Response:
    return requests.post(f"{url}/v1/chat/completions",
                         json={"model": model, "messages": [{"role": "user", "content": "hi"}],
                               **kw.pop("extra", {})},
                         timeout=kw.pop("timeout", 60), **kw)


# ------------------------------------------------------------------------- declared


def test_adapters_are_listed_with_their_base(isolated_home: Path, base: dict[str, Any],
                                             adapters: dict[str, Path]) -> None:
    write_models(isolated_home, {"tiny": base},
                 {"a1": {"base": "tiny", "source": str(adapters["a1"])},
                  "hub-one": {"base": "TINY", "source": "org/lora-x", "revision": "v1"}})
    code, out, err = run_cli("list", "--json")
    assert code == 0, err
    listed = {a["name"]: a for a in json.loads(out)["adapters"]}
    assert listed["a1"]["base"] == "tiny" and listed["a1"]["downloaded"] is True
    assert listed["hub-one"] == {"name": "hub-one", "base": "tiny", "source": "org/lora-x",
                                 "revision": "v1", "downloaded": False}
    code, out, _err = run_cli("list")
    assert code == 0 and "a1" in out and "org/lora-x@v1" in out


@pytest.mark.parametrize(("table", "message"), [
    ({"base": "nope", "source": "org/x"}, "line 5: adapters.bad.base: unknown model alias"),
    ({"base": "tiny", "source": "org/x", "rank": 8}, "unknown key (allowed: base, source, "
                                                     "revision)"),
    ({"base": "tiny", "source": "not a source"}, "must be a Hugging Face id"),
    ({"base": "tiny", "source": "./dir", "revision": "main"}, "revision applies to a Hugging"),
])
def test_a_bad_adapter_table_is_one_line_naming_file_and_line(
        isolated_home: Path, base: dict[str, Any], table: dict[str, Any], message: str) -> None:
    write_models(isolated_home, {"tiny": base}, {"bad": table})
    code, out, err = run_cli("list")
    assert code == 2
    assert message in err and "models.toml" in err
    assert len(err.strip().splitlines()) == 1 and "Traceback" not in err


def test_an_adapter_named_like_a_model_is_refused(isolated_home: Path,
                                                  base: dict[str, Any]) -> None:
    write_models(isolated_home, {"tiny": base}, {"qwen": {"base": "tiny", "source": "o/x"}})
    code, _out, err = run_cli("list")
    assert code == 2 and "'qwen' is already a model alias" in err


def test_verify_checks_an_adapter_against_its_base(isolated_home: Path, base: dict[str, Any],
                                                   adapters: dict[str, Path]) -> None:
    write_models(isolated_home, {"tiny": base},
                 {"a1": {"base": "tiny", "source": str(adapters["a1"])},
                  "wide": {"base": "tiny", "source": str(adapters["wide"])}})
    code, out, err = run_cli("verify", "a1")
    assert code == 0, out + err
    code, out, err = run_cli("verify", "wide", "--json")
    assert code == 1
    problems = json.loads(out)["problems"]
    assert "does not fit its base 'tiny'" in problems[0]["message"]
    assert "256->256 in the adapter but 128->128" in problems[0]["message"]


# ------------------------------------------------------------------------- served


def test_a_mismatched_adapter_is_refused_before_any_launch(
        fake_engine: Path, isolated_home: Path, base: dict[str, Any],
        adapters: dict[str, Path]) -> None:
    write_models(isolated_home, {"tiny": base},
                 {"a1": {"base": "tiny", "source": str(adapters["a1"])},
                  "wide": {"base": "tiny", "source": str(adapters["wide"])}})
    code, _out, err = run_cli("start", "tiny")
    assert code == 2
    assert err.startswith("Error: adapter 'wide' does not fit its base 'tiny': ")
    assert len(err.strip().splitlines()) == 1
    assert read_record("tiny") is None and not log_path("tiny").exists()


def test_a_missing_hub_adapter_names_the_download(fake_engine: Path, isolated_home: Path,
                                                  base: dict[str, Any]) -> None:
    write_models(isolated_home, {"tiny": base}, {"h": {"base": "tiny", "source": "org/x"}})
    code, _out, err = run_cli("start", "tiny")
    assert code == 9 and "adapter 'h': org/x is not on disk" in err
    assert "cmw-vllm download h" in err
    assert read_record("tiny") is None


def test_engine_flags_and_runtime_loading_only_on_loopback(
        isolated_home: Path, base: dict[str, Any], adapters: dict[str, Path],
        fake_engine: Path) -> None:
    from cmw_vllm.lora_adapters import with_adapters
    from cmw_vllm.model_registry import resolve_target
    from cmw_vllm.server_config import resolve_server_config
    from cmw_vllm.server_launch import engine_command
    from cmw_vllm.vllm_flags import serve_flags

    write_models(isolated_home, {"tiny": base},
                 {"a1": {"base": "tiny", "source": str(adapters["a1"])},
                  "a2": {"base": "tiny", "source": str(adapters["a2"])}})
    target = resolve_target("tiny")
    settings = with_adapters(target.entry, target.settings)
    config = resolve_server_config(target.model, entry_settings=settings)
    args = config.vllm_cli_args()
    at = args.index("--enable-lora")
    assert args[at:at + 8] == ["--enable-lora", "--max-lora-rank", "16", "--max-loras", "2",
                               "--lora-modules", f"a1={adapters['a1']}",
                               f"a2={adapters['a2']}"]
    assert {a for a in args if a.startswith("--")} <= set(serve_flags())
    env = {"VLLM_ALLOW_RUNTIME_LORA_UPDATING": "True"}
    _cmd, engine_env = engine_command(config, None, environ=env)
    assert engine_env["VLLM_ALLOW_RUNTIME_LORA_UPDATING"] == "True"
    exposed = config.model_copy(update={"host": "0.0.0.0"})
    _cmd, engine_env = engine_command(exposed, None, environ=env)
    assert "VLLM_ALLOW_RUNTIME_LORA_UPDATING" not in engine_env
    plain = config.model_copy(update={"lora": None})
    _cmd, engine_env = engine_command(plain, None, environ=env)
    assert "VLLM_ALLOW_RUNTIME_LORA_UPDATING" not in engine_env


def test_lora_flags_by_hand_next_to_declared_adapters_are_refused(
        fake_engine: Path, isolated_home: Path, base: dict[str, Any],
        adapters: dict[str, Path]) -> None:
    write_models(isolated_home, {"tiny": base},
                 {"a1": {"base": "tiny", "source": str(adapters["a1"])}})
    code, _out, err = run_cli("start", "tiny", "--", "--max-loras", "4")
    assert code == 2 and "--max-loras comes from the declared adapters" in err


def test_started_base_serves_its_adapters_and_status_lists_them(
        fake_engine: Path, isolated_home: Path, base: dict[str, Any],
        adapters: dict[str, Path]) -> None:
    write_models(isolated_home, {"tiny": base},
                 {"a1": {"base": "tiny", "source": str(adapters["a1"])}})
    code, _out, err = run_cli("start", "tiny")
    assert code == 0, err
    url = f"http://127.0.0.1:{base['port']}"
    assert _chat(url, "a1").json()["model"] == "a1"  # direct, by the adapter's name
    code, out, err = run_cli("status", "--json")
    assert code == 0, err
    (server,) = json.loads(out)["servers"]
    assert server["adapters"] == ["a1"]
    # Kept across a restart, with an adapter declared since.
    write_models(isolated_home, {"tiny": base},
                 {"a1": {"base": "tiny", "source": str(adapters["a1"])},
                  "a2": {"base": "tiny", "source": str(adapters["a2"])}})
    code, _out, err = run_cli("restart", "tiny")
    assert code == 0, err
    code, out, _err = run_cli("status", "--json")
    assert json.loads(out)["servers"][0]["adapters"] == ["a1", "a2"]
    assert _chat(url, "a2").json()["model"] == "a2"


# ------------------------------------------------------------------------- the gateway


@pytest.fixture
def gateway(fake_engine: Path) -> Iterator[Any]:
    # The tiny model's real config would make the memory check ask for a small KV space.
    with gateway_maker(health_interval=0.5, fit_check=lambda c: None) as make:
        yield make


def _log_lines(name: str, word: str) -> list[str]:
    return [line.split(word, 1)[1].strip() for line in
            log_path(name).read_text().splitlines() if word in line]


def test_gateway_routes_an_adapter_to_its_base_and_loads_new_ones_at_run_time(
        gateway: Any, isolated_home: Path, base: dict[str, Any],
        adapters: dict[str, Path]) -> None:
    write_models(isolated_home, {"tiny": {**base, "max_loras": 2}},
                 {"a1": {"base": "tiny", "source": str(adapters["a1"])}})
    gw = gateway()
    reply = _chat(gw.url, "a1")  # starts the base with a1
    assert reply.status_code == 200, reply.text
    assert reply.json()["model"] == "a1"
    pid = read_record("tiny").pid
    # Declared while the base runs: loaded into it, no restart.
    models = isolated_home / "models.toml"
    models.write_text(models.read_text() + f'[adapters.a3]\nbase = "tiny"\n'
                      f'source = "{adapters["a3"]}"\n')
    reply = _chat(gw.url, "a3")
    assert reply.status_code == 200, reply.text
    assert reply.json()["model"] == "a3"
    assert read_record("tiny").pid == pid
    assert _log_lines("tiny", "lora loaded") == ["a1", "a3"]
    listing = {m["id"]: m for m in requests.get(f"{gw.url}/v1/models", timeout=10)
               .json()["data"]}
    assert listing["a3"]["parent"] == "tiny" and listing["a3"]["state"] == "loaded"
    assert listing["tiny"]["state"] == "running"
    # The base model itself still answers as the base.
    assert _chat(gw.url, "tiny").json()["model"] != "a3"
    # The gateway still forwards no admin route.
    refused = requests.post(f"{gw.url}/v1/load_lora_adapter",
                            json={"lora_name": "x", "lora_path": str(adapters["a1"])},
                            timeout=10)
    assert refused.status_code == 404


def test_lru_unloads_the_least_recently_used_never_one_in_flight(
        gateway: Any, isolated_home: Path, base: dict[str, Any],
        adapters: dict[str, Path], monkeypatch: pytest.MonkeyPatch) -> None:
    write_models(isolated_home, {"tiny": {**base, "max_loras": 1}},
                 {"a1": {"base": "tiny", "source": str(adapters["a1"])},
                  "a2": {"base": "tiny", "source": str(adapters["a2"])}})
    monkeypatch.setenv("FAKE_VLLM_GEN_SECONDS", "1.5")  # each answer takes 1.5 s
    gw = gateway()
    assert _chat(gw.url, "a1").status_code == 200  # started with a1 in its one slot
    with ThreadPoolExecutor(2) as pool:
        slow = pool.submit(_chat, gw.url, "a1")
        wait_until(lambda: len(_log_lines("tiny", "generating a completion")) >= 2)
        # a2 needs a1's slot: a1 is not unloaded while its request is in flight (the
        # stand-in answers 500 to a request whose adapter went away meanwhile).
        second = pool.submit(_chat, gw.url, "a2")
        assert slow.result().status_code == 200, slow.result().text
        assert slow.result().json()["model"] == "a1"
        assert second.result().status_code == 200, second.result().text
    assert second.result().json()["model"] == "a2"
    assert _log_lines("tiny", "lora unloaded") == ["a1"]
    # And back: a1 takes the slot of a2, now the least recently used.
    assert _chat(gw.url, "a1").json()["model"] == "a1"
    assert _log_lines("tiny", "lora unloaded") == ["a1", "a2"]
    assert gw.metrics.evictions == {"tiny:a1": 1, "tiny:a2": 1}


def test_an_adapter_over_the_running_rank_is_a_503_naming_the_restart(
        gateway: Any, isolated_home: Path, base: dict[str, Any],
        adapters: dict[str, Path]) -> None:
    write_models(isolated_home, {"tiny": {**base, "max_loras": 2}},
                 {"a1": {"base": "tiny", "source": str(adapters["a1"])}})
    gw = gateway()
    assert _chat(gw.url, "a1").status_code == 200  # started with --max-lora-rank 8
    models = isolated_home / "models.toml"
    models.write_text(models.read_text() + f'[adapters.a2]\nbase = "tiny"\n'
                      f'source = "{adapters["a2"]}"\n')  # rank 16
    reply = _chat(gw.url, "a2")
    assert reply.status_code == 503
    error = reply.json()["error"]
    assert "has rank 16, over the 8 that 'tiny' was started with" in error["message"]
    assert error["hint"].endswith("cmw-vllm restart tiny")
    assert _log_lines("tiny", "lora loaded") == ["a1"]
