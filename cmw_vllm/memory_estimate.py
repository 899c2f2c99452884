"""How much memory a model needs under vLLM, and whether it fits before we launch it.

The inputs are the model's ``config.json`` and the sizes (or safetensors headers) of its
weights, found in a local directory, the Hugging Face cache, or fetched from the Hub (only
those small files). The KV-cache figures follow vLLM 0.32.0's own rules:

- bytes per token = sum over attention layers of ``2 x kv_heads/TP x head_dim x
  bytes(kv dtype)``; MLA layers hold one latent of ``kv_lora_rank + qk_rope_head_dim``
  (not split by tensor parallel); sliding-window layers hold only about ``window`` tokens
  per request;
- ``--kv-cache-dtype auto`` is the model dtype, and a float32 checkpoint served with
  ``--dtype auto`` runs in bfloat16 (float16 for pooling models);
- the cache is cut into blocks (16 tokens on GPU, 128 on CPU); the token count vLLM logs is
  ``int(num_blocks / cdiv(max_model_len, block) x max_model_len)``.

Weights, activations and the runtime's own memory are estimates with a margin; the KV
figures are exact for standard attention layers.
"""

from __future__ import annotations

import json
import logging
import math
import os
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from cmw_vllm import hf_cache
from cmw_vllm.errors import (
    ConfigError,
    EnvironmentProblem,
    InsufficientResourcesError,
    NotFoundError,
    UsageError,
)

if TYPE_CHECKING:
    from cmw_vllm.gpu_info import GpuInfo
    from cmw_vllm.server_config import ServerConfig

logger = logging.getLogger(__name__)

GiB = 1024**3
DEFAULT_GPU_MEMORY_UTILIZATION = 0.92  # vLLM's --gpu-memory-utilization default
GPU_BLOCK_SIZE = 16
CPU_BLOCK_SIZE = 128  # vllm/platforms/cpu.py sets 128 unless --block-size is given
CPU_KV_SPACE_ENV = "VLLM_CPU_KVCACHE_SPACE"
DEFAULT_MAX_NUM_BATCHED_TOKENS = 8192
DEFAULT_MAX_NUM_SEQS = 256
# CUDA context, cuBLAS/NCCL workspaces and CUDA graphs: memory vLLM uses outside the
# weights, activations and KV cache on each GPU.
GPU_RUNTIME_BYTES = int(1.5 * GiB)
# RSS of the API server, EngineCore and worker before any weights or KV cache (measured
# ~630 MB + ~610 MB + ~1.7 GB with a tiny model on the CPU build).
CPU_RUNTIME_BYTES = 3 * GiB
# The part of that the API server and EngineCore hold before the CPU worker measures what
# RAM is available.
CPU_FRONTEND_BYTES = int(1.25 * GiB)

FLOAT_DTYPES = {"F64", "F32", "F16", "BF16"}
DTYPE_BYTES = {"float32": 4, "float16": 2, "bfloat16": 2}
_DTYPE_ALIASES = {
    "half": "float16", "float16": "float16", "fp16": "float16",
    "float": "float32", "float32": "float32", "fp32": "float32",
    "bfloat16": "bfloat16", "bf16": "bfloat16",
    "F32": "float32", "F16": "float16", "BF16": "bfloat16",
}
KV_CACHE_DTYPE_BYTES = {
    "bfloat16": 2, "float16": 2,
    "fp8": 1, "fp8_e4m3": 1, "fp8_e5m2": 1, "fp8_inc": 1,
}
_MAX_LEN_KEYS = (
    "max_position_embeddings", "n_positions", "max_seq_len", "seq_length",
    "model_max_length", "max_target_positions", "max_sequence_length", "max_seq_length",
    "seq_len",
)
_ROPE_TYPES_ALREADY_SCALED = {
    "su", "longrope", "llama3", "yarn", "deepseek_yarn", "deepseek_llama_scaling",
}

Device = Literal["gpu", "cpu"]


# --------------------------------------------------------------------------- model spec


@dataclass
class ModelSpec:
    """What the estimate needs to know about a model.

    Attributes:
        model: The id or path given.
        source: ``local``, ``hf-cache`` or ``hub``.
        path: The directory read (None for the Hub).
        model_type: ``config.json``'s ``model_type``.
        architectures: ``config.json``'s ``architectures``.
        num_layers: Decoder layers.
        num_attention_heads: Query heads.
        num_kv_heads: Key/value heads (GQA when fewer than query heads).
        head_dim: Size of one attention head.
        hidden_size: Model width.
        intermediate_size: MLP width (per token: the active experts' width for MoE).
        vocab_size: Vocabulary size.
        layer_kinds: Per layer: ``full`` or ``sliding`` attention, or ``none`` (no KV cache:
            linear attention, mamba, ...).
        sliding_window: Window of the sliding layers, in tokens.
        kv_lora_rank: MLA latent rank (None when the model has no MLA).
        qk_rope_head_dim: MLA rotary part of the key.
        config_dtype: The checkpoint's dtype (``bfloat16``, ...), None when unknown.
        params_by_dtype: Parameter counts per safetensors dtype (``{"BF16": 123}``).
        weight_file_bytes: Bytes of the weight files (used when no headers were read).
        derived_max_model_len: The longest context the config allows (vLLM's rule).
        pooling: Whether vLLM runs it as a pooling (embedding/score) model.
    """

    model: str
    source: str
    path: str | None
    model_type: str | None
    architectures: list[str]
    num_layers: int
    num_attention_heads: int
    num_kv_heads: int
    head_dim: int
    hidden_size: int
    intermediate_size: int
    vocab_size: int
    layer_kinds: list[str]
    sliding_window: int | None = None
    kv_lora_rank: int | None = None
    qk_rope_head_dim: int | None = None
    config_dtype: str | None = None
    params_by_dtype: dict[str, int] = field(default_factory=dict)
    weight_file_bytes: int | None = None
    derived_max_model_len: int = 2048
    pooling: bool = False

    @property
    def is_mla(self) -> bool:
        """True for multi-head latent attention (DeepSeek V2/V3, Kimi K2, ...)."""
        return bool(self.kv_lora_rank)

    @property
    def num_parameters(self) -> int | None:
        """Parameter count from the safetensors headers, when known."""
        return sum(self.params_by_dtype.values()) if self.params_by_dtype else None


def _int(value: Any) -> int | None:
    if isinstance(value, bool):
        return None
    if isinstance(value, int):
        return value
    if isinstance(value, float) and value.is_integer():
        return int(value)
    return None


def _first(cfg: Mapping[str, Any], *keys: str) -> Any:
    for key in keys:
        value = cfg.get(key)
        if value is not None:
            return value
    return None


def _text_config(config: Mapping[str, Any]) -> dict[str, Any]:
    """The language model's config (``text_config`` of multimodal models over the root)."""
    merged = dict(config)
    for key in ("text_config", "llm_config", "language_config"):
        sub = config.get(key)
        if isinstance(sub, dict):
            merged.update({k: v for k, v in sub.items() if v is not None})
            break
    return merged


def _normalise_dtype(value: Any) -> str | None:
    if value is None:
        return None
    text = str(value).removeprefix("torch.")
    return _DTYPE_ALIASES.get(text)


def _layer_kinds(cfg: Mapping[str, Any], num_layers: int) -> tuple[list[str], int | None]:
    """Per-layer attention kind and the sliding window, following the config's conventions."""
    window = _int(cfg.get("sliding_window"))
    layer_types = cfg.get("layer_types")
    if isinstance(layer_types, list) and len(layer_types) == num_layers:
        kinds = []
        for kind in layer_types:
            text = str(kind).lower()
            if text in ("full_attention", "attention", "global", "full", "global_attention"):
                kinds.append("full")
            elif "sliding" in text or text in ("local", "local_attention"):
                kinds.append("sliding" if window else "full")
            else:
                kinds.append("none")
        return kinds, window
    if not window or cfg.get("use_sliding_window") is False:
        return ["full"] * num_layers, None
    model_type = str(cfg.get("model_type") or "")
    if model_type.startswith("qwen") and "max_window_layers" in cfg:
        first = _int(cfg.get("max_window_layers")) or 0
        return ["sliding" if i >= first else "full" for i in range(num_layers)], window
    pattern = _int(cfg.get("sliding_window_pattern"))
    if pattern and pattern > 1:
        return [
            "full" if (i + 1) % pattern == 0 else "sliding" for i in range(num_layers)
        ], window
    if model_type == "gemma2":
        return ["sliding" if i % 2 == 0 else "full" for i in range(num_layers)], window
    return ["sliding"] * num_layers, window


def derive_max_model_len(
    config: Mapping[str, Any], tokenizer_config: Mapping[str, Any] | None = None
) -> int:
    """The context length vLLM derives when ``--max-model-len`` is not given."""
    cfg = _text_config(config)
    derived = math.inf
    for key in _MAX_LEN_KEYS:
        value = cfg.get(key)
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            derived = min(derived, value)
    if isinstance(cfg.get("model_max_length"), (int, float)) and cfg["model_max_length"]:
        derived = cfg["model_max_length"]
    if tokenizer_config:
        tok_len = tokenizer_config.get("model_max_length")
        if isinstance(tok_len, (int, float)) and not isinstance(tok_len, bool):
            derived = min(derived, tok_len)
    if derived == math.inf:
        derived = 2048
    rope = cfg.get("rope_scaling") or cfg.get("rope_parameters")
    if isinstance(rope, dict) and "gemma3" not in str(cfg.get("model_type", "")):
        rope_type = rope.get("rope_type") or rope.get("type") or "default"
        factor = rope.get("factor")
        if rope_type not in _ROPE_TYPES_ALREADY_SCALED and isinstance(factor, (int, float)):
            derived *= factor
    return int(derived)


def spec_from_config(
    config: Mapping[str, Any],
    *,
    model: str,
    source: str,
    path: str | None = None,
    params_by_dtype: Mapping[str, int] | None = None,
    weight_file_bytes: int | None = None,
    tokenizer_config: Mapping[str, Any] | None = None,
) -> ModelSpec:
    """Build a :class:`ModelSpec` from a parsed ``config.json``.

    Raises:
        UsageError: The config lacks what the estimate needs (layers, heads, width).
    """
    cfg = _text_config(config)
    num_layers = _int(_first(cfg, "num_hidden_layers", "n_layer", "num_layers", "n_layers"))
    heads = _int(_first(cfg, "num_attention_heads", "n_head", "n_heads", "num_heads"))
    hidden = _int(_first(cfg, "hidden_size", "n_embd", "d_model", "dim"))
    if not num_layers or not heads or not hidden:
        raise UsageError(
            f"cannot estimate {model}: its config.json has no layer count, head count or "
            "hidden size this estimate understands"
        )
    kv_heads = _int(_first(cfg, "num_key_value_heads", "num_kv_heads", "n_head_kv",
                           "multi_query_group_num", "kv_n_heads"))
    if kv_heads is None:
        kv_heads = 1 if cfg.get("multi_query") else heads
    head_dim = _int(cfg.get("head_dim")) or hidden // heads
    intermediate = _int(_first(cfg, "intermediate_size", "ffn_hidden_size", "n_inner")) or (
        4 * hidden
    )
    moe_width = _int(cfg.get("moe_intermediate_size"))
    experts_per_tok = _int(_first(cfg, "num_experts_per_tok", "moe_topk", "top_k"))
    if moe_width and experts_per_tok:
        intermediate = max(intermediate, moe_width * experts_per_tok)
    kinds, window = _layer_kinds(cfg, num_layers)
    kv_lora_rank = _int(cfg.get("kv_lora_rank"))
    rope_dim = _int(cfg.get("qk_rope_head_dim")) if kv_lora_rank else None
    config_dtype = _normalise_dtype(_first(cfg, "dtype", "torch_dtype"))
    params = dict(params_by_dtype or {})
    if config_dtype is None and params:
        floats = {d for d in params if d in FLOAT_DTYPES}
        if len(floats) == 1:
            config_dtype = _normalise_dtype(floats.pop())
    architectures = [str(a) for a in (config.get("architectures") or [])]
    pooling = any(
        a.endswith(("Model", "ForSequenceClassification", "ForRewardModeling", "EmbeddingModel"))
        for a in architectures
    ) and not any(a.endswith(("ForCausalLM", "ForConditionalGeneration")) for a in architectures)
    return ModelSpec(
        model=model,
        source=source,
        path=path,
        model_type=cfg.get("model_type"),
        architectures=architectures,
        num_layers=num_layers,
        num_attention_heads=heads,
        num_kv_heads=kv_heads,
        head_dim=head_dim,
        hidden_size=hidden,
        intermediate_size=intermediate,
        vocab_size=_int(cfg.get("vocab_size")) or 32000,
        layer_kinds=kinds,
        sliding_window=window,
        kv_lora_rank=kv_lora_rank,
        qk_rope_head_dim=rope_dim,
        config_dtype=config_dtype,
        params_by_dtype=params,
        weight_file_bytes=weight_file_bytes,
        derived_max_model_len=derive_max_model_len(config, tokenizer_config),
        pooling=pooling,
    )


def _params_from_headers(files: Sequence[Path]) -> dict[str, int]:
    counts: dict[str, int] = {}
    for path in files:
        _length, header = hf_cache.read_safetensors_header(path)
        for name, info in header.items():
            if name == "__metadata__" or not isinstance(info, dict):
                continue
            numel = math.prod(int(d) for d in info.get("shape", []))
            dtype = str(info.get("dtype", "?"))
            counts[dtype] = counts.get(dtype, 0) + numel
    return counts


def _weight_files(directory: Path) -> list[Path]:
    """The checkpoint files vLLM would load (the index's shards, else every top-level file)."""
    index = directory / "model.safetensors.index.json"
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text(encoding="utf-8")).get("weight_map", {})
            names = sorted(set(weight_map.values()))
            files = [directory / n for n in names]
            if files and all(f.exists() for f in files):
                return files
        except (OSError, ValueError):
            pass
    safetensors = sorted(directory.glob("*.safetensors"))
    if safetensors:
        model_files = [f for f in safetensors if f.name.startswith("model")]
        return model_files or safetensors
    return sorted(directory.glob("pytorch_model*.bin")) or sorted(directory.glob("*.bin"))


def _read_json(path: Path) -> dict[str, Any] | None:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def spec_from_dir(directory: str | os.PathLike[str], *, model: str | None = None,
                  source: str = "local") -> ModelSpec:
    """Read a model directory (``config.json`` plus safetensors headers).

    Raises:
        NotFoundError: There is no ``config.json``.
        UsageError: The config cannot be understood.
    """
    path = Path(directory)
    config = _read_json(path / "config.json")
    if config is None:
        raise NotFoundError(f"{path} has no readable config.json")
    files = _weight_files(path)
    params: dict[str, int] = {}
    sizes = 0
    for f in files:
        try:
            sizes += f.stat().st_size
        except OSError:
            continue
    st_files = [f for f in files if f.suffix == ".safetensors"]
    if st_files:
        try:
            params = _params_from_headers(st_files)
        except (OSError, ValueError) as exc:
            logger.warning("cannot read safetensors headers in %s: %s", path, exc)
    return spec_from_config(
        config,
        model=model or str(path),
        source=source,
        path=str(path),
        params_by_dtype=params,
        weight_file_bytes=sizes or None,
        tokenizer_config=_read_json(path / "tokenizer_config.json"),
    )


def spec_from_hub(repo_id: str, revision: str | None = None, *,
                  timeout: float = 10.0) -> ModelSpec:
    """Fetch only ``config.json`` and the weight files' metadata from the Hub.

    Raises:
        NotFoundError: The repo, revision or its config.json does not exist.
        EnvironmentProblem: The Hub is unreachable, offline mode is on, or the repo is gated.
    """
    from huggingface_hub import HfApi, hf_hub_download
    from huggingface_hub.errors import (
        EntryNotFoundError,
        GatedRepoError,
        LocalEntryNotFoundError,
        OfflineModeIsEnabled,
        RepositoryNotFoundError,
        RevisionNotFoundError,
    )

    # huggingface_hub reads HF_ENDPOINT and the cache location once, at import; read them
    # now so that the environment of this call is the one used.
    endpoint = hf_cache.endpoint()
    cache_dir = str(hf_cache.hub_cache_dir())

    def fetch(filename: str) -> str:
        return str(hf_hub_download(repo_id, filename, revision=revision, etag_timeout=timeout,
                                   endpoint=endpoint, cache_dir=cache_dir))

    try:
        # model_info first: it fails at once when the Hub is unreachable, where
        # hf_hub_download retries with backoff for about 20 s.
        info = HfApi(endpoint=endpoint).model_info(repo_id, revision=revision,
                                                   files_metadata=True, timeout=timeout)
        config_path = fetch("config.json")
        tok_config = None
        siblings = [s.rfilename for s in (info.siblings or [])]
        if "tokenizer_config.json" in siblings:
            try:
                tok_config = _read_json(Path(fetch("tokenizer_config.json")))
            except Exception as exc:  # the tokenizer only caps max_model_len; go on
                logger.debug("no tokenizer_config.json for %s: %s", repo_id, exc)
    except GatedRepoError as exc:
        raise EnvironmentProblem(
            f"{repo_id} is gated", hint="accept its licence on the Hub and set HF_TOKEN"
        ) from exc
    except (RepositoryNotFoundError, RevisionNotFoundError) as exc:
        raise NotFoundError(f"{repo_id} (revision {revision or 'main'}) not found on the Hub") \
            from exc
    except EntryNotFoundError as exc:
        raise NotFoundError(f"{repo_id} has no config.json") from exc
    except (LocalEntryNotFoundError, OfflineModeIsEnabled) as exc:
        raise EnvironmentProblem(f"{repo_id} is not cached and the Hub cannot be reached") \
            from exc
    except OSError as exc:
        raise EnvironmentProblem(f"cannot reach the Hub for {repo_id}: {exc}") from exc
    except Exception as exc:  # httpx/requests errors differ between hub versions
        raise EnvironmentProblem(
            f"cannot reach the Hub for {repo_id}: {type(exc).__name__}: {exc}"
        ) from exc
    config = _read_json(Path(config_path))
    if config is None:
        raise NotFoundError(f"{repo_id}'s config.json is not valid JSON")
    params: dict[str, int] = {}
    st_info = getattr(info, "safetensors", None)
    if st_info is not None and getattr(st_info, "parameters", None):
        params = {str(k): int(v) for k, v in st_info.parameters.items()}
    sizes = [(s.rfilename, s.size or 0) for s in (info.siblings or [])]
    st_sizes = [size for name, size in sizes if name.endswith(".safetensors") and "/" not in name]
    bin_sizes = [size for name, size in sizes if name.endswith(".bin") and "/" not in name]
    weight_bytes = sum(st_sizes) or sum(bin_sizes) or None
    return spec_from_config(
        config, model=repo_id, source="hub", params_by_dtype=params,
        weight_file_bytes=weight_bytes, tokenizer_config=tok_config,
    )


def load_model_spec(model: str, *, revision: str | None = None,
                    allow_network: bool = True) -> ModelSpec:
    """Find a model's config and weight sizes: local dir, then HF cache, then the Hub.

    Args:
        model: A local directory or a Hugging Face id.
        revision: Hub revision (branch, tag or commit).
        allow_network: Ask the Hub when the model is not on disk.

    Raises:
        NotFoundError: Not found locally and the Hub does not have it (or may not be asked).
        EnvironmentProblem: Not on disk and the Hub is unreachable.
        UsageError: The config cannot be understood.
    """
    path = Path(model).expanduser()
    if path.is_dir():
        return spec_from_dir(path, model=model, source="local")
    if path.exists() or model.startswith(("/", "./", "../", "~")):
        raise NotFoundError(f"{model} is not a model directory")
    snapshot = hf_cache.snapshot_dir(model, revision, needs="config.json")
    if snapshot is not None:
        return spec_from_dir(snapshot, model=model, source="hf-cache")
    if not allow_network or hf_cache.offline():
        raise EnvironmentProblem(
            f"{model} is not in the local cache and the Hub may not be asked",
            hint=f"download it first (cmw-vllm download {model})",
        )
    return spec_from_hub(model, revision)


# --------------------------------------------------------------------------- arithmetic


def resolve_dtype(spec: ModelSpec, dtype: str = "auto") -> str:
    """The dtype vLLM will run the model in (``bfloat16``, ``float16`` or ``float32``).

    ``auto`` keeps a 16-bit checkpoint's dtype and turns float32 into bfloat16 (float16 for
    pooling models), as vLLM does.

    Raises:
        UsageError: Unknown dtype.
    """
    if dtype in (None, "", "auto"):
        config_dtype = spec.config_dtype or "float32"
        if config_dtype == "float32":
            return "float16" if spec.pooling else "bfloat16"
        return config_dtype
    resolved = _DTYPE_ALIASES.get(dtype)
    if resolved is None:
        raise UsageError(f"unknown dtype {dtype!r} (use auto, bfloat16, float16 or float32)")
    return resolved


def weight_bytes(spec: ModelSpec, dtype: str = "auto") -> int:
    """Bytes the weights take once loaded: float tensors in the run dtype, others as stored."""
    run_bytes = DTYPE_BYTES[resolve_dtype(spec, dtype)]
    if spec.params_by_dtype:
        total = 0.0
        for code, count in spec.params_by_dtype.items():
            if code in FLOAT_DTYPES:
                total += count * run_bytes
            else:
                total += count * hf_cache.SAFETENSORS_DTYPE_BITS.get(code, 8) / 8
        return int(total)
    if spec.weight_file_bytes:
        stored = DTYPE_BYTES.get(spec.config_dtype or "bfloat16", 2)
        return int(spec.weight_file_bytes * run_bytes / stored)
    # Nothing on disk to go by: count the parameters of a dense transformer.
    per_layer = 4 * spec.hidden_size * spec.hidden_size + 3 * spec.hidden_size * (
        spec.intermediate_size
    )
    params = spec.num_layers * per_layer + 2 * spec.vocab_size * spec.hidden_size
    return params * run_bytes


@dataclass
class KvCacheLayout:
    """KV-cache bytes of one model under one set of settings, per GPU (or CPU rank).

    Attributes:
        kv_cache_dtype: The KV dtype after resolving ``auto``.
        bytes_per_element: Bytes of one cached value.
        kv_heads_per_rank: KV heads each tensor-parallel rank holds.
        full_layers: Layers that cache every token.
        sliding_layers: Layers that cache only the window.
        bytes_per_token: Bytes per cached token over the full-attention layers (the part that
            grows with context).
        sliding_bytes_per_token: Bytes per token over the sliding layers (held for at most
            ``sliding_window`` tokens per request).
        sliding_window: The window in tokens.
        in_flight_tokens: Tokens scheduled but not yet settled (``max_num_batched_tokens``):
            a sliding layer keeps them on top of the window during chunked prefill.
    """

    kv_cache_dtype: str
    bytes_per_element: int
    kv_heads_per_rank: int
    full_layers: int
    sliding_layers: int
    bytes_per_token: int
    sliding_bytes_per_token: int = 0
    sliding_window: int | None = None
    in_flight_tokens: int = DEFAULT_MAX_NUM_BATCHED_TOKENS

    def sliding_tokens(self, tokens: int) -> int:
        """Tokens a sliding layer holds for one request of ``tokens`` tokens (vLLM's
        admission bound: the window minus one plus the in-flight tokens)."""
        if not self.sliding_window:
            return tokens
        return min(self.sliding_window - 1 + self.in_flight_tokens, tokens)

    def request_bytes(self, tokens: int) -> int:
        """KV bytes one request of ``tokens`` tokens holds."""
        return self.bytes_per_token * tokens + self.sliding_bytes_per_token * (
            self.sliding_tokens(tokens))


def kv_cache_layout(
    spec: ModelSpec,
    *,
    kv_cache_dtype: str = "auto",
    dtype: str = "auto",
    tensor_parallel_size: int = 1,
    max_num_batched_tokens: int = DEFAULT_MAX_NUM_BATCHED_TOKENS,
) -> KvCacheLayout:
    """KV bytes per token per rank, by vLLM's rule.

    Raises:
        UsageError: A KV-cache dtype the estimate does not model, or a bad TP size.
    """
    if tensor_parallel_size < 1:
        raise UsageError("--tensor-parallel-size must be at least 1")
    if kv_cache_dtype in (None, "", "auto"):
        kv_dtype = resolve_dtype(spec, dtype)
        elem = DTYPE_BYTES[kv_dtype]
    elif kv_cache_dtype in KV_CACHE_DTYPE_BYTES:
        kv_dtype = kv_cache_dtype
        elem = KV_CACHE_DTYPE_BYTES[kv_cache_dtype]
    else:
        raise UsageError(
            f"--kv-cache-dtype {kv_cache_dtype} is not modelled by the estimate "
            f"(use auto, {', '.join(KV_CACHE_DTYPE_BYTES)})"
        )
    if spec.is_mla:
        # One latent per token, replicated on every rank rather than split.
        kv_heads = 1
        per_layer = (int(spec.kv_lora_rank or 0) + int(spec.qk_rope_head_dim or 0)) * elem
    else:
        kv_heads = max(1, spec.num_kv_heads // tensor_parallel_size)
        per_layer = 2 * kv_heads * spec.head_dim * elem
    full = spec.layer_kinds.count("full")
    sliding = spec.layer_kinds.count("sliding")
    return KvCacheLayout(
        kv_cache_dtype=kv_dtype,
        bytes_per_element=elem,
        kv_heads_per_rank=kv_heads,
        full_layers=full,
        sliding_layers=sliding,
        bytes_per_token=per_layer * full,
        sliding_bytes_per_token=per_layer * sliding,
        sliding_window=spec.sliding_window if sliding else None,
        in_flight_tokens=max_num_batched_tokens,
    )


def _cdiv(a: int, b: int) -> int:
    return -(-a // b)


def _request_blocks(kv: KvCacheLayout, tokens: int, block_size: int) -> int:
    """Blocks of the shared pool one request of ``tokens`` tokens takes."""
    blocks = _cdiv(tokens, block_size) if kv.full_layers else 0
    if kv.sliding_layers:
        # One block more than the tokens cover: the window may start mid-block.
        sliding_blocks = _cdiv(kv.sliding_tokens(tokens), block_size) + 1
        # Both kinds draw pages from one pool; counted here in blocks of all layers.
        total_layers = kv.full_layers + kv.sliding_layers
        return max(1, _cdiv(blocks * kv.full_layers + sliding_blocks * kv.sliding_layers,
                            total_layers))
    return max(1, blocks)


def _block_bytes(kv: KvCacheLayout, block_size: int) -> int:
    per_token_all_layers = kv.bytes_per_token + kv.sliding_bytes_per_token
    return max(1, per_token_all_layers * block_size)


def kv_cache_blocks(kv_space: int, kv: KvCacheLayout, block_size: int) -> int:
    """Blocks vLLM cuts ``kv_space`` bytes into."""
    return max(0, kv_space) // _block_bytes(kv, block_size)


def kv_cache_tokens(kv_space: int, kv: KvCacheLayout, max_model_len: int,
                    block_size: int) -> int:
    """The token count vLLM logs as ``KV cache size: N tokens`` for ``kv_space`` bytes."""
    num_blocks = kv_cache_blocks(kv_space, kv, block_size)
    per_request = _request_blocks(kv, max_model_len, block_size)
    return int(num_blocks / per_request * max_model_len)


def max_concurrency(kv_space: int, kv: KvCacheLayout, context: int, block_size: int) -> float:
    """How many requests of ``context`` tokens the KV cache holds at once."""
    return kv_cache_blocks(kv_space, kv, block_size) / _request_blocks(kv, context, block_size)


def largest_max_model_len(kv_space: int, kv: KvCacheLayout, block_size: int,
                          limit: int) -> int:
    """The longest ``max_model_len`` (at most ``limit``) whose one request fits the cache."""
    blocks = kv_cache_blocks(kv_space, kv, block_size)
    if blocks <= 0:
        return 0
    if _request_blocks(kv, limit, block_size) <= blocks:
        return limit
    lo, hi = 0, limit
    while lo < hi:
        mid = (lo + hi + 1) // 2
        if _request_blocks(kv, mid, block_size) <= blocks:
            lo = mid
        else:
            hi = mid - 1
    return lo


def activation_bytes(spec: ModelSpec, *, dtype: str = "auto", tensor_parallel_size: int = 1,
                     max_num_batched_tokens: int = DEFAULT_MAX_NUM_BATCHED_TOKENS,
                     max_num_seqs: int = DEFAULT_MAX_NUM_SEQS) -> int:
    """Peak activation memory of vLLM's profiling run, per rank (an allowance, not exact).

    One forward pass of ``max_num_batched_tokens`` tokens keeps the MLP's gate and up
    projections, a few hidden-size buffers and the attention projections alive; sampling
    ``max_num_seqs`` sequences adds float32 logits.
    """
    elem = DTYPE_BYTES[resolve_dtype(spec, dtype)]
    tp = max(1, tensor_parallel_size)
    qkv = (spec.num_attention_heads + 2 * spec.num_kv_heads) * spec.head_dim
    per_token = (2 * spec.intermediate_size + qkv) / tp + 4 * spec.hidden_size
    logits = max_num_seqs * spec.vocab_size * 4 * 2
    return int(max_num_batched_tokens * per_token * elem + logits)


# --------------------------------------------------------------------------- estimate


@dataclass
class EstimateSettings:
    """The serving settings an estimate is made for."""

    max_model_len: int | None = None
    tensor_parallel_size: int = 1
    dtype: str = "auto"
    kv_cache_dtype: str = "auto"
    gpu_memory_utilization: float | None = None
    block_size: int | None = None
    concurrency_context: int | None = None
    max_num_batched_tokens: int = DEFAULT_MAX_NUM_BATCHED_TOKENS
    kv_cache_memory_bytes: int | None = None


@dataclass
class MemoryTarget:
    """The memory a model is checked against.

    Attributes:
        device: ``gpu`` or ``cpu``.
        memory_total: Bytes of one GPU (the smallest of those used), or of RAM.
        memory_free: Bytes free on that GPU (the least free of those used), or RAM
            available; None when unknown (a size given on the command line).
        devices: GPUs used (one per tensor-parallel rank); 1 for the CPU.
        description: Where the numbers come from (``GPU 0 (NVIDIA H100)``, ``RAM``).
        cpu_kv_space: Bytes of ``VLLM_CPU_KVCACHE_SPACE`` (CPU only; None when unset).
    """

    device: Device
    memory_total: int
    memory_free: int | None
    devices: int = 1
    description: str = ""
    cpu_kv_space: int | None = None


@dataclass
class MemoryEstimate:
    """Whether a model fits, and with which settings it would.

    Byte figures are per GPU (per rank on the CPU) unless named ``*_total``.
    """

    model: str
    source: str
    device: Device
    target: str
    dtype: str
    kv_cache_dtype: str
    tensor_parallel_size: int
    block_size: int
    weight_bytes_total: int
    weight_bytes: int
    activation_bytes: int
    runtime_bytes: int
    kv_bytes_per_token: int
    kv_bytes_per_token_total: int
    kv_sliding_bytes_per_token: int
    max_model_len: int
    derived_max_model_len: int
    memory_total: int
    memory_free: int | None
    gpu_memory_utilization: float
    budget: int
    kv_space: int
    kv_space_source: str
    kv_cache_tokens: int
    fits: bool
    max_model_len_that_fits: int
    needed_bytes: int
    gpu_memory_utilization_needed: float | None
    free_memory_ok: bool
    concurrency_context: int
    concurrency: float
    problems: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    def to_json(self) -> dict[str, Any]:
        """Stable JSON shape for ``estimate --json``."""
        return asdict(self)


def estimate(spec: ModelSpec, settings: EstimateSettings, target: MemoryTarget) -> MemoryEstimate:
    """Estimate memory for ``spec`` served with ``settings`` on ``target``.

    Raises:
        UsageError: Settings the estimate cannot model (unknown dtype, bad TP size).
    """
    tp = settings.tensor_parallel_size
    dtype = resolve_dtype(spec, settings.dtype)
    kv = kv_cache_layout(spec, kv_cache_dtype=settings.kv_cache_dtype, dtype=settings.dtype,
                         tensor_parallel_size=tp,
                         max_num_batched_tokens=settings.max_num_batched_tokens)
    block = settings.block_size or (
        CPU_BLOCK_SIZE if target.device == "cpu" else GPU_BLOCK_SIZE
    )
    weights_total = weight_bytes(spec, settings.dtype)
    weights = _cdiv(weights_total, tp)
    acts = activation_bytes(spec, dtype=settings.dtype, tensor_parallel_size=tp,
                            max_num_batched_tokens=settings.max_num_batched_tokens)
    max_len = settings.max_model_len or spec.derived_max_model_len
    context = settings.concurrency_context or max_len
    util = settings.gpu_memory_utilization or DEFAULT_GPU_MEMORY_UTILIZATION
    problems: list[str] = []
    notes: list[str] = []
    if settings.max_model_len and settings.max_model_len > spec.derived_max_model_len:
        problems.append(
            f"--max-model-len {settings.max_model_len} is longer than the model allows "
            f"({spec.derived_max_model_len}); vLLM refuses it"
        )
    if spec.num_attention_heads % tp or (
        not spec.is_mla and spec.num_kv_heads % tp and tp % spec.num_kv_heads
    ):
        problems.append(
            f"{spec.num_attention_heads} attention heads ({spec.num_kv_heads} KV) cannot be "
            f"split over {tp} tensor-parallel ranks; vLLM refuses it"
        )
    settings_refused = bool(problems)
    if kv.sliding_layers:
        notes.append(
            f"{kv.sliding_layers} sliding-window layers (window {kv.sliding_window}) hold at "
            f"most the window plus {kv.in_flight_tokens} in-flight tokens per request"
        )
    if spec.layer_kinds.count("none"):
        notes.append(
            f"{spec.layer_kinds.count('none')} layers without a KV cache (linear attention "
            "or state-space) are not counted; their state memory is not estimated"
        )
    if spec.is_mla:
        notes.append("MLA: one latent per token, replicated on every tensor-parallel rank")

    free_ok = True
    if target.device == "gpu":
        runtime = GPU_RUNTIME_BYTES
        budget = int(target.memory_total * util)
        if settings.kv_cache_memory_bytes is not None:
            kv_space = settings.kv_cache_memory_bytes
            kv_source = "--kv-cache-memory-bytes"
        else:
            kv_space = budget - weights - acts - runtime
            kv_source = f"{util:g} x GPU memory - weights - activations - runtime"
        if target.memory_free is not None and target.memory_free < budget:
            free_ok = False
            problems.append(
                f"{target.description or 'the GPU'} has {_gib(target.memory_free)} free but "
                f"--gpu-memory-utilization {util:g} asks for {_gib(budget)} "
                f"of {_gib(target.memory_total)}"
            )
    else:
        runtime = CPU_RUNTIME_BYTES
        if settings.kv_cache_memory_bytes is not None:
            kv_space = settings.kv_cache_memory_bytes
            kv_source = "--kv-cache-memory-bytes"
            budget = weights + acts + runtime + kv_space
        elif target.cpu_kv_space is not None:
            kv_space = target.cpu_kv_space
            kv_source = CPU_KV_SPACE_ENV
            budget = weights + acts + runtime + kv_space
        else:
            # vLLM's CPU worker asks for util x RAM and leaves what its own process does not
            # use for the KV cache (vllm/v1/worker/cpu_worker.py).
            budget = int(target.memory_total * util)
            kv_space = budget - weights - acts - runtime // 2
            kv_source = f"{util:g} x RAM - weights - worker memory (vLLM's CPU default)"
            if (target.memory_free is not None
                    and target.memory_free - CPU_FRONTEND_BYTES < budget):
                free_ok = False
                problems.append(
                    f"RAM has {_gib(target.memory_free)} available, about "
                    f"{_gib(max(0, target.memory_free - CPU_FRONTEND_BYTES))} once vLLM's API "
                    f"server and engine run, but its CPU worker asks for {util:g} x "
                    f"{_gib(target.memory_total)} = {_gib(budget)} when {CPU_KV_SPACE_ENV} "
                    "is unset"
                )
        if free_ok and target.memory_free is not None and budget > target.memory_free:
            free_ok = False
            problems.append(
                f"RAM has {_gib(target.memory_free)} available but the server needs about "
                f"{_gib(budget)} (weights {_gib(weights)}, KV cache {_gib(kv_space)}, "
                f"runtime {_gib(runtime + acts)})"
            )
    tokens = kv_cache_tokens(kv_space, kv, max_len, block) if kv_space > 0 else 0
    fit_len = largest_max_model_len(kv_space, kv, block, spec.derived_max_model_len)
    needed = weights + acts + runtime + kv.request_bytes(max_len)
    util_needed = None
    if target.device == "gpu" and target.memory_total:
        util_needed = math.ceil(needed / target.memory_total * 100) / 100
    kv_fits = kv_space > 0 and _request_blocks(kv, max_len, block) <= kv_cache_blocks(
        kv_space, kv, block
    )
    if kv_space <= 0:
        problems.append(
            f"no memory left for the KV cache: weights {_gib(weights)} + activations and "
            f"runtime {_gib(acts + runtime)} exceed the {_gib(budget)} budget"
        )
    elif not kv_fits:
        problems.append(
            f"one request of {max_len} tokens needs {_gib(kv.request_bytes(max_len))} of KV "
            f"cache but only {_gib(kv_space)} is left"
        )
    fits = kv_fits and free_ok and not settings_refused
    return MemoryEstimate(
        model=spec.model,
        source=spec.source,
        device=target.device,
        target=target.description,
        dtype=dtype,
        kv_cache_dtype=kv.kv_cache_dtype,
        tensor_parallel_size=tp,
        block_size=block,
        weight_bytes_total=weights_total,
        weight_bytes=weights,
        activation_bytes=acts,
        runtime_bytes=runtime,
        kv_bytes_per_token=kv.bytes_per_token,
        kv_bytes_per_token_total=kv.bytes_per_token * (1 if spec.is_mla else tp),
        kv_sliding_bytes_per_token=kv.sliding_bytes_per_token,
        max_model_len=max_len,
        derived_max_model_len=spec.derived_max_model_len,
        memory_total=target.memory_total,
        memory_free=target.memory_free,
        gpu_memory_utilization=util,
        budget=budget,
        kv_space=kv_space,
        kv_space_source=kv_source,
        kv_cache_tokens=tokens,
        fits=fits,
        max_model_len_that_fits=fit_len,
        needed_bytes=needed,
        gpu_memory_utilization_needed=util_needed,
        free_memory_ok=free_ok,
        concurrency_context=context,
        concurrency=max_concurrency(kv_space, kv, context, block) if kv_space > 0 else 0.0,
        problems=problems,
        notes=notes,
    )


def _gib(n: float) -> str:
    return f"{n / GiB:.2f} GiB"


def _size(n: float) -> str:
    return _gib(n) if abs(n) >= GiB / 10 else f"{n / 1024**2:.1f} MiB"


# --------------------------------------------------------------------------- targets


def cpu_kv_space(environ: Mapping[str, str]) -> int | None:
    """Bytes of ``VLLM_CPU_KVCACHE_SPACE`` (GiB, an integer as vLLM reads it); None if unset.

    Raises:
        ConfigError: The value is not an integer (vLLM would crash on it).
    """
    raw = environ.get(CPU_KV_SPACE_ENV, "")
    if raw == "":
        return None
    try:
        return int(raw) * GiB
    except ValueError:
        raise ConfigError(
            f"{CPU_KV_SPACE_ENV}={raw!r} is not a whole number of GiB (vLLM reads it with int())"
        ) from None


def cpu_memory() -> tuple[int, int]:
    """(total, available) bytes of RAM as vLLM's CPU worker counts them.

    vLLM reads the NUMA node of the first CPU it may run on
    (``/sys/devices/system/node/nodeN/meminfo``; available = MemFree + Active(file) +
    Inactive(file) + SReclaimable) and clamps both to a cgroup memory limit
    (``vllm/utils/cpu_resource_utils.py``). The node can be much smaller than the machine.
    """
    node = 0
    try:
        cpu = min(os.sched_getaffinity(0))
        links = list(Path(f"/sys/devices/system/cpu/cpu{cpu}").glob("node[0-9]*"))
        if links:
            node = int(links[0].name[4:])
    except (AttributeError, OSError, ValueError):
        pass
    info: dict[str, int] = {}
    try:
        for line in Path(f"/sys/devices/system/node/node{node}/meminfo").read_text().splitlines():
            parts = line.split()
            if len(parts) >= 4 and parts[3].isdigit():
                info[parts[2].rstrip(":")] = int(parts[3]) * 1024
    except OSError:
        info = {}
    if "MemTotal" in info and "MemFree" in info:
        total = info["MemTotal"]
        available = info["MemFree"] + sum(
            info.get(k, 0) for k in ("Active(file)", "Inactive(file)", "SReclaimable"))
    else:
        import psutil

        vm = psutil.virtual_memory()
        total, available = vm.total, vm.available
    limit = _cgroup_limit()
    if limit is not None and limit < total:
        total = limit
        available = max(0, min(available, limit - (_cgroup_usage() or 0)))
    return total, available


def ram_target(environ: Mapping[str, str] | None = None) -> MemoryTarget:
    """RAM as the target of the CPU build, measured the way vLLM measures it."""
    total, available = cpu_memory()
    return MemoryTarget(
        device="cpu",
        memory_total=total,
        memory_free=available,
        devices=1,
        description="RAM",
        cpu_kv_space=cpu_kv_space(environ if environ is not None else os.environ),
    )


def _read_int(path: str) -> int | None:
    try:
        text = Path(path).read_text().strip()
    except OSError:
        return None
    return int(text) if text.isdigit() else None


def _cgroup_limit() -> int | None:
    v2 = _read_int("/sys/fs/cgroup/memory.max")
    if v2 is not None:
        return v2
    v1 = _read_int("/sys/fs/cgroup/memory/memory.limit_in_bytes")
    return v1 if v1 is not None and v1 < (1 << 62) else None


def _cgroup_usage() -> int | None:
    return _read_int("/sys/fs/cgroup/memory.current") or _read_int(
        "/sys/fs/cgroup/memory/memory.usage_in_bytes"
    )


def select_gpus(gpus: Sequence[GpuInfo], wanted: str | None, count: int) -> list[GpuInfo]:
    """The GPUs a server would use: ``wanted`` (indices or UUIDs) or the first ones.

    Raises:
        InsufficientResourcesError: Fewer GPUs than tensor-parallel ranks.
        ConfigError: ``wanted`` names a GPU that does not exist.
    """
    chosen = list(gpus)
    if wanted:
        chosen = []
        for part in wanted.split(","):
            part = part.strip()
            match = [g for g in gpus if str(g.index) == part or g.uuid == part]
            if not match:
                raise ConfigError(f"GPU {part!r} does not exist (cmw-vllm gpus lists them)")
            chosen.append(match[0])
    if len(chosen) < count:
        raise InsufficientResourcesError(
            f"--tensor-parallel-size {count} needs {count} GPUs but {len(chosen)} "
            f"{'is' if len(chosen) == 1 else 'are'} visible",
            hint=f"use --tensor-parallel-size {max(1, len(chosen))} or make more GPUs visible",
        )
    return chosen[:count]


def gpu_target(gpus: Sequence[GpuInfo]) -> MemoryTarget:
    """The smallest and least-free of ``gpus`` as the target (every rank must fit)."""
    smallest = min(gpus, key=lambda g: g.memory_total or 0)
    least_free = min(gpus, key=lambda g: g.memory_free if g.memory_free is not None else 0)
    names = ", ".join(f"GPU {g.index}" for g in gpus)
    return MemoryTarget(
        device="gpu",
        memory_total=int(smallest.memory_total or 0),
        memory_free=None if least_free.memory_free is None else int(least_free.memory_free),
        devices=len(gpus),
        description=f"{names} ({smallest.name})",
    )


def given_gpu_target(memory_gb: float, devices: int = 1) -> MemoryTarget:
    """A GPU of ``memory_gb`` GiB given on the command line (assumed empty)."""
    total = int(memory_gb * GiB)
    return MemoryTarget(device="gpu", memory_total=total, memory_free=total, devices=devices,
                        description=f"{memory_gb:g} GiB GPU")


# --------------------------------------------------------------------------- preflight


@dataclass
class PreflightResult:
    """What the check before ``start`` found (a refusal raises instead).

    Attributes:
        status: ``ok`` (it fits) or ``unknown`` (the model's files could not be read).
        device: ``gpu`` or ``cpu``; None when unknown.
        estimate: The estimate behind an ``ok``.
        reason: Why the result is ``unknown``.
    """

    status: Literal["ok", "unknown"]
    device: Device | None = None
    estimate: MemoryEstimate | None = None
    reason: str | None = None

    @property
    def ok(self) -> bool:
        """True when the model was checked and fits."""
        return self.status == "ok"


def flag_value(args: Sequence[str], flag: str) -> str | None:
    """The value of the last ``flag VALUE`` or ``flag=VALUE`` in ``args``; None if absent."""
    value = None
    for i, arg in enumerate(args):
        if arg == flag and i + 1 < len(args):
            value = args[i + 1]
        elif arg.startswith(flag + "="):
            value = arg.split("=", 1)[1]
    return value


def _human_int(text: str) -> int:
    """Parse vLLM's human-readable ints (``4G``, ``512M``, ``1024``)."""
    units = {"k": 10**3, "m": 10**6, "g": 10**9, "t": 10**12}
    binary = {"ki": 2**10, "mi": 2**20, "gi": 2**30, "ti": 2**40}
    t = text.strip().lower()
    for suffix, mult in binary.items():
        if t.endswith(suffix):
            return int(float(t[: -len(suffix)]) * mult)
    if t and t[-1] in units:
        return int(float(t[:-1]) * units[t[-1]])
    return int(t)


def settings_from_config(config: ServerConfig) -> tuple[EstimateSettings, str | None]:
    """Estimate settings (and the revision) from a server config and its extra vLLM flags.

    Raises:
        ConfigError: An extra flag's value cannot be read.
    """
    args = list(config.vllm_args)
    settings = EstimateSettings(
        max_model_len=config.max_model_len,
        tensor_parallel_size=config.tensor_parallel_size,
        dtype=config.dtype,
        gpu_memory_utilization=config.gpu_memory_utilization,
    )
    try:
        if (value := flag_value(args, "--kv-cache-dtype")) is not None:
            settings.kv_cache_dtype = value
        if (value := flag_value(args, "--block-size")) is not None:
            settings.block_size = int(value)
        if (value := flag_value(args, "--max-num-batched-tokens")) is not None:
            settings.max_num_batched_tokens = _human_int(value)
        if (value := flag_value(args, "--kv-cache-memory-bytes")) is not None:
            settings.kv_cache_memory_bytes = _human_int(value)
    except ValueError as exc:
        raise ConfigError(f"cannot read an extra vLLM flag: {exc}") from None
    return settings, flag_value(args, "--revision")


def _refusal(est: MemoryEstimate, config: ServerConfig) -> InsufficientResourcesError:
    where = "RAM" if est.device == "cpu" else (est.target or "the GPU")
    per = " per GPU" if est.tensor_parallel_size > 1 else ""
    summary = (
        f"{config.model} will not fit in {where}: " + "; ".join(est.problems)
        + f" (weights {_size(est.weight_bytes)}{per}, KV cache for max_model_len "
        f"{est.max_model_len} {_size(est.kv_bytes_per_token * est.max_model_len)}, "
        f"KV space {_size(max(est.kv_space, 0))})"
    )
    fixes: list[str] = []
    if not est.free_memory_ok and est.device == "gpu" and est.memory_free:
        frac = math.floor(est.memory_free / est.memory_total * 100) / 100
        if est.gpu_memory_utilization_needed and est.gpu_memory_utilization_needed <= frac:
            fixes.append(f"--gpu-memory-utilization {frac:g}")
        else:
            fixes.append("free the GPU (cmw-vllm gpus shows what holds it)")
    if not est.free_memory_ok and est.device == "cpu":
        spare = (est.memory_free or 0) - est.weight_bytes - est.activation_bytes - (
            est.runtime_bytes)
        if spare >= GiB:
            fixes.append(f"{CPU_KV_SPACE_ENV}={spare // GiB} (GiB of KV cache that fit)")
        else:
            fixes.append("free RAM (stop other servers)")
        if est.kv_space_source not in (CPU_KV_SPACE_ENV, "--kv-cache-memory-bytes") and (
            est.memory_free and est.memory_total
        ):
            frac = math.floor(
                (est.memory_free - CPU_FRONTEND_BYTES) / est.memory_total * 100) / 100
            if frac > 0:
                fixes.append(f"--gpu-memory-utilization {frac:g} (on the CPU build: the "
                             "share of RAM)")
    if est.max_model_len_that_fits and est.max_model_len_that_fits < est.max_model_len:
        fixes.append(f"--max-model-len {est.max_model_len_that_fits}")
    elif est.device == "gpu" and (
        est.gpu_memory_utilization_needed and est.gpu_memory_utilization_needed <= 1
        and est.free_memory_ok
    ):
        fixes.append(f"--gpu-memory-utilization {est.gpu_memory_utilization_needed:g}")
    if est.device == "gpu" and est.free_memory_ok:
        fixes.append(f"--tensor-parallel-size {est.tensor_parallel_size * 2}")
    fixes.append("--force to start anyway")
    return InsufficientResourcesError(summary, hint="try " + ", or ".join(fixes))


def preflight(
    config: ServerConfig,
    *,
    gpus: Sequence[GpuInfo] | None = None,
    environ: Mapping[str, str] | None = None,
) -> PreflightResult:
    """Check that ``config`` fits this machine before vLLM spends minutes loading it.

    GPUs present: the GPUs the server will use must have the free memory that
    ``gpu_memory_utilization`` asks for, and weights + activations + the KV cache of one
    ``max_model_len`` request must fit in that budget. No GPU (the CPU build): RAM must hold
    the weights, the runtime and the KV space (``VLLM_CPU_KVCACHE_SPACE`` or vLLM's
    default of ``gpu_memory_utilization`` x RAM), and the KV space must hold one request.

    Args:
        config: The server about to be started.
        gpus: The machine's GPUs (default: asked from NVML).
        environ: The environment vLLM will get (default ``os.environ`` with
            ``config.env`` on top).

    Returns:
        ``ok`` with the estimate, or ``unknown`` when the model's files cannot be found
        locally and the Hub cannot be asked.

    Raises:
        InsufficientResourcesError: It does not fit; the message has the numbers and the
            hint the setting that would fit.
        ConfigError: A setting that vLLM would reject (``VLLM_CPU_KVCACHE_SPACE`` not an
            integer, a GPU that does not exist).
    """
    env: dict[str, str] = dict(os.environ if environ is None else environ)
    if environ is None:
        env.update(config.env)
    settings, revision = settings_from_config(config)
    try:
        spec = load_model_spec(config.model, revision=revision)
    except (NotFoundError, EnvironmentProblem, UsageError) as exc:
        logger.info("preflight skipped for %s: %s", config.model, exc.message)
        return PreflightResult(status="unknown", reason=exc.message)
    if config.task != "generate":
        spec.pooling = True
    if gpus is None:
        from cmw_vllm.gpu_info import query_gpus

        gpus = query_gpus(match_servers=False).gpus
    if gpus:
        wanted = config.gpus
        if wanted is None and env.get("CUDA_VISIBLE_DEVICES"):
            wanted = env["CUDA_VISIBLE_DEVICES"]
        chosen = select_gpus(gpus, wanted, config.tensor_parallel_size)
        target = gpu_target(chosen)
    else:
        target = ram_target(env)
    try:
        est = estimate(spec, settings, target)
    except UsageError as exc:
        return PreflightResult(status="unknown", device=target.device, reason=exc.message)
    if not est.fits:
        raise _refusal(est, config)
    return PreflightResult(status="ok", device=target.device, estimate=est)
