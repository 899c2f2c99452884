"""Memory estimate and preflight: KV rules, weights from headers, sources, refusals."""

from __future__ import annotations

import json
import math
import shutil
import struct
from pathlib import Path
from types import SimpleNamespace

import pytest

from cmw_vllm import memory_check as mc
from cmw_vllm import memory_estimate as me
from cmw_vllm import model_spec as ms
from cmw_vllm.errors import (
    UsageError,
)
from cmw_vllm.gpu_info import GpuInfo
from cmw_vllm.server_config import ServerConfig
from tests.tiny_model import make_tiny_model

GiB = 1024**3

# A Llama-3-8B-shaped config: big enough that context length decides the fit.
LLAMA8B = {
    "architectures": ["LlamaForCausalLM"],
    "model_type": "llama",
    "hidden_size": 4096,
    "intermediate_size": 14336,
    "num_hidden_layers": 32,
    "num_attention_heads": 32,
    "num_key_value_heads": 8,
    "vocab_size": 128256,
    "max_position_embeddings": 131072,
    "torch_dtype": "bfloat16",
}


def write_big_model(directory: Path, config: dict[str, object]) -> Path:
    """A model directory whose safetensors file has only a header (shapes of the real
    tensors, no data): enough for the estimate, which reads headers only."""
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "config.json").write_text(json.dumps(config))
    h = int(config["hidden_size"])  # type: ignore[call-overload]
    inter = int(config["intermediate_size"])  # type: ignore[call-overload]
    heads = int(config["num_attention_heads"])  # type: ignore[call-overload]
    kv = int(config["num_key_value_heads"])  # type: ignore[call-overload]
    vocab = int(config["vocab_size"])  # type: ignore[call-overload]
    hd = h // heads
    shapes = {"model.embed_tokens.weight": [vocab, h], "lm_head.weight": [vocab, h]}
    for i in range(int(config["num_hidden_layers"])):  # type: ignore[call-overload]
        p = f"model.layers.{i}."
        shapes[p + "q"] = [heads * hd, h]
        shapes[p + "kv"] = [2 * kv * hd, h]
        shapes[p + "o"] = [h, heads * hd]
        shapes[p + "mlp"] = [3 * inter, h]
    header: dict[str, object] = {}
    offset = 0
    for name, shape in shapes.items():
        size = math.prod(shape) * 2
        header[name] = {"dtype": "BF16", "shape": shape, "data_offsets": [offset, offset + size]}
        offset += size
    raw = json.dumps(header).encode()
    (directory / "model.safetensors").write_bytes(struct.pack("<Q", len(raw)) + raw)
    return directory


def fake_gpu(index: int = 0, total_gib: float = 80, free_gib: float | None = None) -> GpuInfo:
    total = int(total_gib * GiB)
    free = total if free_gib is None else int(free_gib * GiB)
    return GpuInfo(index=index, name="Fake GPU", uuid=f"GPU-{index}", memory_total=total,
                   memory_used=total - free, memory_free=free)


def config_for(model: Path | str, **kw: object) -> ServerConfig:
    return ServerConfig(name="t", model=str(model), **kw)  # type: ignore[arg-type]


# --------------------------------------------------------------------------- KV rule


@pytest.mark.parametrize(("layers", "kv_heads", "head_dim", "dtype"), [
    (2, 1, 64, "bfloat16"), (3, 2, 128, "float16"), (5, 4, 64, "bfloat16"),
])
def test_kv_bytes_per_token_follows_vllm_rule(tmp_path: Path, layers: int, kv_heads: int,
                                              head_dim: int, dtype: str) -> None:
    model = make_tiny_model(tmp_path / "m", layers=layers, heads=4, kv_heads=kv_heads,
                            head_dim=head_dim, dtype=dtype)
    spec = ms.load_model_spec(str(model))
    kv = me.kv_cache_layout(spec)
    assert spec.source == "local"
    assert kv.bytes_per_token == 2 * kv_heads * head_dim * 2 * layers
    assert kv.kv_cache_dtype == dtype


def test_float32_checkpoint_runs_in_16_bits_unless_asked(tmp_path: Path) -> None:
    model = make_tiny_model(tmp_path / "m", dtype="float32")
    spec = ms.load_model_spec(str(model))
    auto = me.kv_cache_layout(spec)
    fp32 = me.kv_cache_layout(spec, dtype="float32")
    assert auto.kv_cache_dtype == "bfloat16"
    assert fp32.bytes_per_token == 2 * auto.bytes_per_token
    spec.pooling = True
    assert me.resolve_dtype(spec) == "float16"


def test_kv_cache_dtype_fp8_halves_and_unknown_is_refused(tiny_model: Path) -> None:
    spec = ms.load_model_spec(str(tiny_model))
    base = me.kv_cache_layout(spec)
    assert me.kv_cache_layout(spec, kv_cache_dtype="fp8").bytes_per_token * 2 == (
        base.bytes_per_token)
    with pytest.raises(UsageError, match="not modelled"):
        me.kv_cache_layout(spec, kv_cache_dtype="nvfp4")


def test_tensor_parallel_splits_kv_heads_and_replicates_when_fewer() -> None:
    spec = ms.spec_from_config(LLAMA8B, model="x", source="test")
    one = me.kv_cache_layout(spec).bytes_per_token
    assert me.kv_cache_layout(spec, tensor_parallel_size=2).bytes_per_token * 2 == one
    assert me.kv_cache_layout(spec, tensor_parallel_size=8).bytes_per_token * 8 == one
    # 8 KV heads over 16 ranks: each rank keeps a whole head.
    sixteen = me.kv_cache_layout(spec, tensor_parallel_size=16)
    assert sixteen.kv_heads_per_rank == 1
    assert sixteen.bytes_per_token == one // 8


def test_mla_caches_one_latent_not_split_by_tp() -> None:
    cfg = {"model_type": "deepseek_v3", "hidden_size": 7168, "num_hidden_layers": 61,
           "num_attention_heads": 128, "num_key_value_heads": 128, "kv_lora_rank": 512,
           "qk_rope_head_dim": 64, "v_head_dim": 128, "torch_dtype": "bfloat16"}
    spec = ms.spec_from_config(cfg, model="ds", source="test")
    kv1 = me.kv_cache_layout(spec)
    kv8 = me.kv_cache_layout(spec, tensor_parallel_size=8)
    assert spec.is_mla
    latent = int(str(cfg["kv_lora_rank"])) + int(str(cfg["qk_rope_head_dim"]))
    assert kv1.bytes_per_token == latent * 2 * int(str(cfg["num_hidden_layers"]))
    assert kv8.bytes_per_token == kv1.bytes_per_token


def test_sliding_window_layers_hold_only_the_window() -> None:
    layers = 6
    cfg = {**LLAMA8B, "num_hidden_layers": layers, "sliding_window": 1024,
           "layer_types": ["sliding_attention", "full_attention"] * (layers // 2)}
    spec = ms.spec_from_config(cfg, model="swa", source="test")
    in_flight = 2048
    kv = me.kv_cache_layout(spec, max_num_batched_tokens=in_flight)
    per_layer = 2 * 8 * 128 * 2
    assert (kv.full_layers, kv.sliding_layers) == (layers // 2, layers // 2)
    assert kv.bytes_per_token == per_layer * kv.full_layers
    # A sliding layer holds the window (minus the current token) plus the in-flight chunk.
    held = 1024 - 1 + in_flight
    assert kv.request_bytes(100_000) == kv.bytes_per_token * 100_000 + (
        kv.sliding_bytes_per_token * held)
    assert kv.request_bytes(100) == (kv.bytes_per_token + kv.sliding_bytes_per_token) * 100
    # Long contexts cost the sliding layers nothing more: capacity grows past the
    # all-full-attention figure.
    full = me.kv_cache_layout(ms.spec_from_config({**cfg, "layer_types": None,
                                                   "sliding_window": None},
                                                  model="f", source="t"))
    space, block = 8 * GiB, 16
    assert me.kv_cache_tokens(space, kv, 65536, block) > me.kv_cache_tokens(
        space, full, 65536, block)


def test_sliding_window_configs_by_convention() -> None:
    base = {**LLAMA8B, "num_hidden_layers": 4, "sliding_window": 512}
    qwen_off = ms.spec_from_config({**base, "model_type": "qwen2", "use_sliding_window": False},
                                   model="q", source="test")
    assert qwen_off.layer_kinds == ["full"] * 4
    qwen_on = ms.spec_from_config({**base, "model_type": "qwen2", "use_sliding_window": True,
                                   "max_window_layers": 2}, model="q", source="test")
    assert qwen_on.layer_kinds == ["full", "full", "sliding", "sliding"]
    gemma2 = ms.spec_from_config({**base, "model_type": "gemma2"}, model="g", source="test")
    assert gemma2.layer_kinds == ["sliding", "full", "sliding", "full"]
    mistral = ms.spec_from_config({**base, "model_type": "mistral"}, model="m", source="test")
    assert mistral.layer_kinds == ["sliding"] * 4


def test_kv_cache_tokens_counts_whole_blocks_like_vllm() -> None:
    spec = ms.spec_from_config({**LLAMA8B, "num_hidden_layers": 3}, model="x", source="t")
    kv = me.kv_cache_layout(spec)
    space, block = GiB, 128
    blocks = space // (kv.bytes_per_token * block)
    assert me.kv_cache_tokens(space, kv, 512, block) == blocks * block
    # max_model_len not a multiple of the block: vLLM scales by whole blocks per request.
    assert me.kv_cache_tokens(space, kv, 500, block) == int(blocks / math.ceil(500 / block) * 500)
    assert me.max_concurrency(space, kv, 1024, block) == blocks / (1024 // block)
    fit = me.largest_max_model_len(space, kv, block, limit=10**9)
    assert fit == blocks * block
    assert me.largest_max_model_len(space, kv, block, limit=1000) == 1000


# --------------------------------------------------------------------------- weights


def test_weight_bytes_from_safetensors_headers(tiny_model: Path) -> None:
    spec = ms.load_model_spec(str(tiny_model))
    st = tiny_model / "model.safetensors"
    header_len = struct.unpack("<Q", st.read_bytes()[:8])[0]
    data_bytes = st.stat().st_size - 8 - header_len
    assert me.weight_bytes(spec) == data_bytes
    assert me.weight_bytes(spec, "float32") == 2 * data_bytes
    assert spec.params_by_dtype == {"BF16": data_bytes // 2}  # every tensor of it is BF16


def test_sharded_checkpoint_counts_each_shard_once(tmp_path: Path, tiny_model: Path) -> None:
    sharded = make_tiny_model(tmp_path / "sharded", shards=3)
    # A stray consolidated file next to the index is not what vLLM loads.
    shutil.copy(tiny_model / "model.safetensors", sharded / "consolidated.safetensors")
    one = me.weight_bytes(ms.load_model_spec(str(tiny_model)))
    assert me.weight_bytes(ms.load_model_spec(str(sharded))) == one


def test_derived_max_model_len_rules() -> None:
    cfg = {"max_position_embeddings": 8192}
    assert ms.derive_max_model_len(cfg) == 8192
    assert ms.derive_max_model_len(cfg, {"model_max_length": 4096}) == 4096
    linear = {**cfg, "rope_scaling": {"type": "linear", "factor": 4.0}}
    assert ms.derive_max_model_len(linear) == 4 * 8192
    yarn = {**cfg, "rope_scaling": {"rope_type": "yarn", "factor": 4.0}}
    assert ms.derive_max_model_len(yarn) == 8192
    assert ms.derive_max_model_len({}) == 2048


# --------------------------------------------------------------------------- sources


def _cache_repo(tiny_model: Path, repo_id: str) -> Path:
    from cmw_vllm.hf_cache import repo_dir

    repo = repo_dir(repo_id)
    snap = repo / "snapshots" / "0123abcd"
    shutil.copytree(tiny_model, snap)
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text("0123abcd")
    return snap


def test_model_from_hf_cache_snapshot(tiny_model: Path) -> None:
    snap = _cache_repo(tiny_model, "org/tiny")
    spec = ms.load_model_spec("org/tiny")
    assert spec.source == "hf-cache"
    assert spec.path == str(snap)
    assert me.weight_bytes(spec) == me.weight_bytes(ms.load_model_spec(str(tiny_model)))


def test_model_from_hub_metadata_only(monkeypatch: pytest.MonkeyPatch, tiny_model: Path) -> None:
    import huggingface_hub

    fetched: list[str] = []

    def fake_download(repo_id: str, filename: str, **kw: object) -> str:
        fetched.append(filename)
        return str(tiny_model / filename)

    params = {"BF16": 1_000_000, "F32": 10}
    info = SimpleNamespace(
        siblings=[SimpleNamespace(rfilename="model.safetensors", size=2_000_040),
                  SimpleNamespace(rfilename="config.json", size=700),
                  SimpleNamespace(rfilename="tokenizer_config.json", size=100)],
        safetensors=SimpleNamespace(parameters=params, total=sum(params.values())),
    )
    monkeypatch.setattr(huggingface_hub, "hf_hub_download", fake_download)
    monkeypatch.setattr(huggingface_hub.HfApi, "model_info", lambda self, *a, **kw: info)
    spec = ms.load_model_spec("org/remote")
    assert spec.source == "hub"
    assert set(fetched) == {"config.json", "tokenizer_config.json"}
    assert me.weight_bytes(spec) == (params["BF16"] + params["F32"]) * 2


def test_cpu_default_follows_vllm_memory_fraction(tiny_model: Path) -> None:
    spec = ms.load_model_spec(str(tiny_model))
    total = 64 * GiB
    roomy = me.MemoryTarget(device="cpu", memory_total=total, memory_free=total)
    est = me.estimate(spec, me.EstimateSettings(), roomy)
    assert est.budget == int(total * me.DEFAULT_GPU_MEMORY_UTILIZATION)
    assert est.fits
    # vLLM's CPU worker refuses when util x RAM exceeds what is available.
    tight = me.MemoryTarget(device="cpu", memory_total=total, memory_free=total // 2)
    refused = me.estimate(spec, me.EstimateSettings(), tight)
    assert not refused.fits and not refused.free_memory_ok
    lowered = me.estimate(spec, me.EstimateSettings(gpu_memory_utilization=0.4), tight)
    assert lowered.fits


def test_cpu_kv_space_offered_is_proportionate_to_the_model(tiny_model: Path,
                                                             tmp_path: Path) -> None:
    """The KV space a refusal offers is what the model can use (its max_model_len at vLLM's
    default concurrency, whole GiB up), never all that is left for a model of a megabyte;
    a big model is offered what fits."""
    # 23.6 GiB with 21.7 available: vLLM's default share (0.92 x RAM) does not fit.
    tight = me.MemoryTarget(device="cpu", memory_total=int(23.6 * GiB),
                            memory_free=int(21.7 * GiB))
    offered: dict[str, int] = {}
    for label, spec in (("tiny", ms.load_model_spec(str(tiny_model))),
                        ("llama", ms.load_model_spec(str(write_big_model(tmp_path / "l",
                                                                         LLAMA8B))))):
        settings = me.EstimateSettings(max_model_len=4096)
        est = me.estimate(spec, settings, tight)
        assert not est.fits
        kv = [x for x in est.suggestions if x.startswith("VLLM_CPU_KVCACHE_SPACE=")]
        assert kv, est.suggestions
        space = int(kv[0].split("=")[1].split()[0])
        offered[label] = space
        layout = me.kv_cache_layout(spec)
        wanted = layout.request_bytes(est.max_model_len) * me.DEFAULT_MAX_NUM_SEQS
        most = me.cpu_kv_space_that_fits(tight, est.weight_bytes + est.activation_bytes)
        assert space == min(most, max(1, math.ceil(wanted / GiB)))
        sized = me.MemoryTarget(device="cpu", memory_total=tight.memory_total,
                                memory_free=tight.memory_free, cpu_kv_space=space * GiB)
        assert me.estimate(spec, settings, sized).fits  # what is offered works
    assert offered["tiny"] == 1  # 0.7 MB of weights: not the 17 GiB that is left
    assert offered["llama"] > 1  # 256 requests of 4096 tokens want 128 GiB: what fits


def test_settings_vllm_refuses_do_not_fit(tmp_path: Path) -> None:
    spec = ms.spec_from_config(LLAMA8B, model="x", source="t")
    target = mc.given_gpu_target(80)
    assert me.estimate(spec, me.EstimateSettings(max_model_len=8192), target).fits
    past_end = int(str(LLAMA8B["max_position_embeddings"])) + 1
    too_long = me.estimate(spec, me.EstimateSettings(max_model_len=past_end), target)
    assert not too_long.fits and "longer than the model" in too_long.problems[0]
    odd_tp = me.estimate(spec, me.EstimateSettings(max_model_len=8192,
                                                   tensor_parallel_size=3), target)
    assert not odd_tp.fits and "tensor-parallel" in odd_tp.problems[0]
