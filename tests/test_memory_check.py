"""The fit check behind `estimate` and `start`: targets, refusals, suggestions, skips."""

from __future__ import annotations

import re
import shlex
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from cmw_vllm import memory_check as mc
from cmw_vllm import memory_estimate as me
from cmw_vllm import model_spec as ms
from cmw_vllm.errors import (
    ConfigError,
    EnvironmentProblem,
    InsufficientResourcesError,
    ModelUnavailableError,
    NotFoundError,
)
from cmw_vllm.gpu_info import GpuInfo
from cmw_vllm.server_config import ServerConfig
from tests.fake_hub import FakeHub
from tests.test_memory_estimate import LLAMA8B, write_big_model

GiB = 1024**3


def fake_gpu(index: int = 0, total_gib: float = 80, free_gib: float | None = None) -> GpuInfo:
    total = int(total_gib * GiB)
    free = total if free_gib is None else int(free_gib * GiB)
    return GpuInfo(index=index, name="Fake GPU", uuid=f"GPU-{index}", memory_total=total,
                   memory_used=total - free, memory_free=free)


def config_for(model: Path | str, **kw: Any) -> ServerConfig:
    return ServerConfig(name="t", model=str(model), **kw)


def apply(config: ServerConfig, suggestion: str) -> ServerConfig:
    """``config`` with a suggested setting applied, as a user would type it."""
    words = shlex.split(suggestion.split(" (")[0])
    update: dict[str, Any] = {}
    env = dict(config.env)
    extra = list(config.vllm_args)
    while words:
        word = words.pop(0)
        if "=" in word and not word.startswith("--"):
            key, value = word.split("=", 1)
            env[key] = value
        elif word == "--gpu-memory-utilization":
            update["gpu_memory_utilization"] = float(words.pop(0))
        elif word == "--max-model-len":
            update["max_model_len"] = int(words.pop(0))
        elif word == "--tensor-parallel-size":
            update["tensor_parallel_size"] = int(words.pop(0))
        else:
            extra += [word, words.pop(0)]
    return config.model_copy(update={**update, "env": env, "vllm_args": extra})


def suggestions_of(err: InsufficientResourcesError) -> list[str]:
    return re.findall(r"`([^`]+)`", err.hint or "")


# --------------------------------------------------------------------------- the Hub


@pytest.fixture
def hub(tiny_model: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[FakeHub]:
    """A fake Hub (HF_ENDPOINT) serving the tiny model publicly and gated."""
    with FakeHub() as server:
        server.add_repo("org/public", tiny_model)
        server.add_repo("org/gated", tiny_model, gated=True)
        monkeypatch.setenv("HF_ENDPOINT", server.url)
        monkeypatch.setenv("HF_HUB_DISABLE_XET", "1")
        yield server


def test_hub_fetch_reads_only_small_files(hub: FakeHub, tiny_model: Path) -> None:
    spec = ms.load_model_spec("org/public")
    assert spec.source == "hub"
    fetched = {r.split("/resolve/main/")[-1] for r in hub.requests if "/resolve/" in r}
    assert fetched <= {"config.json", "tokenizer_config.json"}
    assert "config.json" in fetched
    local = ms.load_model_spec(str(tiny_model))
    assert (spec.num_layers, spec.num_kv_heads, spec.head_dim) == (
        local.num_layers, local.num_kv_heads, local.head_dim)
    # Without headers the file size stands in: within the header's few KiB.
    assert 0 <= me.weight_bytes(spec) - me.weight_bytes(local) < 64 * 1024
    assert mc.preflight(config_for("org/public"), gpus=[fake_gpu()]).status == "ok"


def test_hub_missing_gated_or_down_refuses_before_launch(hub: FakeHub) -> None:
    with pytest.raises(NotFoundError):
        mc.preflight(config_for("org/absent"), gpus=[fake_gpu()])
    with pytest.raises(EnvironmentProblem, match="gated"):
        mc.preflight(config_for("org/gated"), gpus=[fake_gpu()])
    hub.fail_status = 503
    with pytest.raises(ModelUnavailableError) as err:
        mc.preflight(config_for("org/public"), gpus=[fake_gpu()])
    assert "org/public" in err.value.message and "Hub cannot be reached" in err.value.message
    assert err.value.hint == "run `cmw-vllm download org/public` first"


def test_offline_or_unreachable_and_not_cached_refuses(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(ModelUnavailableError, match="HF_HUB_OFFLINE") as err:
        mc.preflight(config_for("org/elsewhere"), gpus=[])
    assert "cmw-vllm download org/elsewhere" in (err.value.hint or "")
    monkeypatch.delenv("HF_HUB_OFFLINE")
    from tests.conftest import free_port

    monkeypatch.setenv("HF_ENDPOINT", f"http://127.0.0.1:{free_port()}")  # nothing listens
    with pytest.raises(ModelUnavailableError, match="cannot be reached"):
        mc.preflight(config_for("org/elsewhere"), gpus=[])


def test_start_of_an_unavailable_model_never_launches(monkeypatch: pytest.MonkeyPatch,
                                                      isolated_home: Path) -> None:
    from tests.conftest import run_cli

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    code, _out, err = run_cli("start", "org/nowhere", "--name", "nowhere", "--port", "19301")
    assert code == ModelUnavailableError.exit_code
    assert "run `cmw-vllm download org/nowhere` first" in err
    assert not (isolated_home / "logs" / "nowhere.log").exists()
    assert not (isolated_home / "servers" / "nowhere.json").exists()


# --------------------------------------------------------------------------- skipped


def test_unreadable_config_is_skipped_with_the_reason(tmp_path: Path) -> None:
    (tmp_path / "odd").mkdir()
    (tmp_path / "odd" / "config.json").write_text('{"model_type": "mystery"}')
    result = mc.preflight(config_for(tmp_path / "odd"), gpus=[fake_gpu()])
    assert result.status == "skipped"
    assert "cannot estimate" in (result.reason or "")


def test_unmodelled_setting_is_skipped(tiny_model: Path) -> None:
    # A KV dtype the estimate does not model: vLLM is the judge then.
    result = mc.preflight(config_for(tiny_model, vllm_args=["--kv-cache-dtype", "nvfp4"]),
                          gpus=[fake_gpu()])
    assert result.status == "skipped" and "nvfp4" in (result.reason or "")


def test_start_says_when_the_check_was_skipped(fake_engine: Path, model_dir: Path) -> None:
    from tests.conftest import free_port, run_cli

    code, _out, err = run_cli("start", str(model_dir), "--name", "skip", "--port",
                              str(free_port()), "--no-wait")
    try:
        assert code == 0, err
        assert "Warning: memory check skipped: cannot estimate" in err
    finally:
        run_cli("stop", "skip")


# --------------------------------------------------------------------------- GPU


def test_preflight_ok_on_an_empty_gpu(tiny_model: Path) -> None:
    result = mc.preflight(config_for(tiny_model), gpus=[fake_gpu()])
    assert (result.status, result.device) == ("ok", "gpu")


def test_busy_gpu_hint_is_a_utilization_that_fits_what_is_free(tiny_model: Path) -> None:
    busy = [fake_gpu(total_gib=80, free_gib=10)]
    with pytest.raises(InsufficientResourcesError) as err:
        mc.preflight(config_for(tiny_model), gpus=busy)
    assert "10.00 GiB free" in err.value.message
    first = suggestions_of(err.value)[0]
    util = float(first.split()[-1])
    assert first.startswith("--gpu-memory-utilization") and util <= 10 / 80
    assert mc.preflight(apply(config_for(tiny_model), first), gpus=busy).status == "ok"
    assert "try free" not in (err.value.hint or "")
    assert "stop what holds the GPU (cmw-vllm gpus shows it)" in (err.value.hint or "")


def test_partly_used_gpu_offers_utilization_with_the_longest_context(tmp_path: Path) -> None:
    model = write_big_model(tmp_path / "llama8b", LLAMA8B)
    gpus = [fake_gpu(total_gib=140, free_gib=30)]
    with pytest.raises(InsufficientResourcesError) as err:
        mc.preflight(config_for(model), gpus=gpus)
    found = suggestions_of(err.value)
    assert found, err.value.hint
    for suggestion in found:
        fixed = apply(config_for(model), suggestion)
        assert (fixed.gpu_memory_utilization or 0) <= 30 / 140
        assert mc.preflight(fixed, gpus=gpus).status == "ok", suggestion
    combined = [s for s in found if "--max-model-len" in s]
    assert combined and "--gpu-memory-utilization 0.21" in combined[0]
    longest = apply(config_for(model), combined[0]).max_model_len or 0
    longer = apply(config_for(model), combined[0]).model_copy(
        update={"max_model_len": longest + 1})
    with pytest.raises(InsufficientResourcesError):
        mc.preflight(longer, gpus=gpus)


def test_too_long_context_suggests_the_longest(tmp_path: Path) -> None:
    model = write_big_model(tmp_path / "llama8b", LLAMA8B)
    gpus = [fake_gpu(total_gib=24)]
    with pytest.raises(InsufficientResourcesError) as err:
        mc.preflight(config_for(model), gpus=gpus)
    assert "max_model_len 131072" in err.value.message
    context = [s for s in suggestions_of(err.value) if s.startswith("--max-model-len")]
    longest = int(context[0].split()[-1])
    assert mc.preflight(config_for(model, max_model_len=longest), gpus=gpus).status == "ok"
    with pytest.raises(InsufficientResourcesError):
        mc.preflight(config_for(model, max_model_len=longest + 1), gpus=gpus)


def test_nothing_fits_says_so_and_suggests_no_setting(tmp_path: Path) -> None:
    model = write_big_model(tmp_path / "llama8b", LLAMA8B)
    with pytest.raises(InsufficientResourcesError) as err:
        mc.preflight(config_for(model), gpus=[fake_gpu(total_gib=8)])
    assert "no memory left for the KV cache" in err.value.message
    assert suggestions_of(err.value) == []
    assert err.value.hint == "use more or bigger GPUs; or pass --force to start anyway"


def test_more_gpus_are_suggested_only_when_present(tmp_path: Path) -> None:
    model = write_big_model(tmp_path / "llama8b", LLAMA8B)
    config = config_for(model, max_model_len=8192)
    with pytest.raises(InsufficientResourcesError) as one:
        mc.preflight(config, gpus=[fake_gpu(0, total_gib=16)])
    assert "--tensor-parallel-size" not in (one.value.hint or "")
    two = [fake_gpu(0, total_gib=16), fake_gpu(1, total_gib=16)]
    with pytest.raises(InsufficientResourcesError) as err:
        mc.preflight(config, gpus=two)
    assert "`--tensor-parallel-size 2`" in (err.value.hint or "")
    assert mc.preflight(apply(config, "--tensor-parallel-size 2"), gpus=two).status == "ok"


def test_kv_cache_dtype_and_block_flags_are_honoured(tmp_path: Path) -> None:
    model = write_big_model(tmp_path / "llama8b", LLAMA8B)
    gpus = [fake_gpu(total_gib=48)]
    auto = mc.check_config(config_for(model, max_model_len=8192), gpus=gpus)
    fp8 = mc.check_config(config_for(model, max_model_len=8192,
                                     vllm_args=["--kv-cache-dtype", "fp8", "--block-size=32"]),
                          gpus=gpus)
    assert fp8.kv_bytes_per_token * 2 == auto.kv_bytes_per_token
    assert fp8.kv_cache_tokens > auto.kv_cache_tokens
    assert (auto.block_size, fp8.block_size) == (16, 32)


def test_tensor_parallel_needs_enough_gpus(tmp_path: Path) -> None:
    model = write_big_model(tmp_path / "llama8b", LLAMA8B)
    config = config_for(model, tensor_parallel_size=2, max_model_len=4096)
    with pytest.raises(InsufficientResourcesError, match="needs 2 GPUs"):
        mc.preflight(config, gpus=[fake_gpu()])
    two = mc.check_config(config, gpus=[fake_gpu(0), fake_gpu(1)])
    assert two.fits and two.weight_bytes * 2 >= two.weight_bytes_total


def test_uses_the_selected_gpu(tiny_model: Path) -> None:
    gpus = [fake_gpu(0), fake_gpu(1, free_gib=1)]
    assert mc.preflight(config_for(tiny_model, gpus="0"), gpus=gpus).status == "ok"
    with pytest.raises(InsufficientResourcesError, match="GPU 1"):
        mc.preflight(config_for(tiny_model, gpus="1"), gpus=gpus)
    with pytest.raises(InsufficientResourcesError, match="GPU 1"):
        mc.preflight(config_for(tiny_model), gpus=gpus, environ={"CUDA_VISIBLE_DEVICES": "1"})
    with pytest.raises(ConfigError, match="does not exist"):
        mc.preflight(config_for(tiny_model, gpus="5"), gpus=gpus)


# --------------------------------------------------------------------------- CPU


def test_cpu_checks_kv_space_against_ram_and_suggests_what_fits(tiny_model: Path) -> None:
    ok = mc.check_config(config_for(tiny_model, env={"VLLM_CPU_KVCACHE_SPACE": "1"}), gpus=[])
    assert ok.fits and ok.device == "cpu" and ok.kv_space == GiB
    total, available = mc.cpu_memory()
    too_much = config_for(tiny_model, env={"VLLM_CPU_KVCACHE_SPACE": str(total // GiB + 1)})
    with pytest.raises(InsufficientResourcesError, match="RAM") as err:
        mc.preflight(too_much, gpus=[])
    kv = [s for s in suggestions_of(err.value) if s.startswith("VLLM_CPU_KVCACHE_SPACE=")]
    if available < me.CPU_RUNTIME_BYTES + 2 * GiB:
        pytest.skip("too little free RAM here to check the suggestion")
    assert kv and mc.preflight(apply(too_much, kv[0]), gpus=[]).status == "ok"
    with pytest.raises(ConfigError, match="whole number"):
        mc.preflight(config_for(tiny_model, env={"VLLM_CPU_KVCACHE_SPACE": "1.5"}), gpus=[])


def test_cpu_default_asks_for_a_share_of_node_ram(tiny_model: Path) -> None:
    total, available = mc.cpu_memory()
    assert 0 < available < total
    # Asking for all of RAM always exceeds what is available, as vLLM's CPU worker finds.
    with pytest.raises(InsufficientResourcesError, match="RAM") as err:
        mc.preflight(config_for(tiny_model, gpu_memory_utilization=1.0), gpus=[], environ={})
    found = suggestions_of(err.value)
    assert found and found[0].startswith("VLLM_CPU_KVCACHE_SPACE=")
    space = int(found[0].split("=")[1].split()[0])
    # The same number setup gives for an empty model, less this model's weights.
    target = mc.ram_target({})
    assert space <= me.cpu_kv_space_that_fits(target)
    if available < 6 * GiB:
        pytest.skip("too little free RAM here to check the passing side")
    half = round(available / total / 2, 2)
    ok = mc.check_config(config_for(tiny_model, gpu_memory_utilization=half), gpus=[],
                         environ={})
    assert ok.fits and ok.kv_space_source.startswith(f"{half:g} x RAM")


def test_what_vllm_may_serve_but_the_estimate_cannot_read_is_skipped(tmp_path: Path) -> None:
    gguf = tmp_path / "model.gguf"
    gguf.write_bytes(b"GGUF")
    mistral = tmp_path / "mistral"
    mistral.mkdir()
    (mistral / "params.json").write_text("{}")
    for model, words in ((gguf, "it is a file"), (mistral, "no readable config.json")):
        result = mc.preflight(config_for(model), gpus=[fake_gpu()])
        assert result.status == "skipped" and words in (result.reason or ""), result
    with pytest.raises(NotFoundError, match="not a model directory"):
        mc.preflight(config_for(tmp_path / "absent"), gpus=[fake_gpu()])
