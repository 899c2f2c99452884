"""What a model is, for the memory estimate: read from its ``config.json`` and weights.

The files come from a local directory, the Hugging Face cache, or the Hub (only
``config.json``, ``tokenizer_config.json`` and the weight files' metadata are fetched).
The result is a :class:`cmw_vllm.memory_estimate.ModelSpec`; the arithmetic lives there.
"""

from __future__ import annotations

import json
import logging
import math
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from cmw_vllm import hf_cache
from cmw_vllm.errors import EnvironmentProblem, ModelUnavailableError, NotFoundError, UsageError
from cmw_vllm.memory_estimate import FLOAT_DTYPES, ModelSpec, normalise_dtype
from cmw_vllm.vocab import looks_like_path

logger = logging.getLogger(__name__)

_MAX_LEN_KEYS = (
    "max_position_embeddings", "n_positions", "max_seq_len", "seq_length",
    "model_max_length", "max_target_positions", "max_sequence_length", "max_seq_length",
    "seq_len",
)
_ROPE_TYPES_ALREADY_SCALED = {
    "su", "longrope", "llama3", "yarn", "deepseek_yarn", "deepseek_llama_scaling",
}


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
    config_dtype = normalise_dtype(_first(cfg, "dtype", "torch_dtype"))
    params = dict(params_by_dtype or {})
    if config_dtype is None and params:
        floats = {d for d in params if d in FLOAT_DTYPES}
        if len(floats) == 1:
            config_dtype = normalise_dtype(floats.pop())
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
        UsageError: There is no readable ``config.json``, or it cannot be understood.
    """
    path = Path(directory)
    config = _read_json(path / "config.json")
    if config is None:
        # vLLM may still serve it (Mistral's params.json format, say): not ours to refuse.
        raise UsageError(f"cannot estimate {path}: it has no readable config.json")
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
        ModelUnavailableError: The Hub is unreachable or offline mode is on.
        EnvironmentProblem: The repo is gated.
    """
    from huggingface_hub import HfApi, hf_hub_download
    from huggingface_hub.errors import (
        EntryNotFoundError,
        GatedRepoError,
        HfHubHTTPError,
        LocalEntryNotFoundError,
        OfflineModeIsEnabled,
        RepositoryNotFoundError,
        RevisionNotFoundError,
    )

    # HfHubHTTPError derives from the HTTP client's base error (httpx or requests, by hub
    # version), which every connection and timeout error also derives from.
    network_errors = (OSError, *HfHubHTTPError.__bases__)
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
            except (*network_errors, EntryNotFoundError) as exc:  # it only caps the length
                logger.debug("no tokenizer_config.json for %s: %s", repo_id, exc)
    except GatedRepoError as exc:
        raise EnvironmentProblem(
            f"{repo_id} is gated", hint="accept its licence on the Hub and set HF_TOKEN"
        ) from exc
    except (RepositoryNotFoundError, RevisionNotFoundError) as exc:
        raise NotFoundError(f"{repo_id} (revision {revision or 'main'}) not found on the Hub") \
            from exc
    except EntryNotFoundError as exc:
        if isinstance(exc, LocalEntryNotFoundError):
            raise _unavailable(repo_id, "the Hub cannot be reached") from exc
        raise NotFoundError(f"{repo_id} has no config.json") from exc
    except OfflineModeIsEnabled as exc:
        raise _unavailable(repo_id, "the Hub may not be asked (HF_HUB_OFFLINE)") from exc
    except network_errors as exc:
        raise _unavailable(repo_id, f"the Hub cannot be reached ({_short(exc)})") from exc
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
        NotFoundError: Not found locally and the Hub does not have it.
        ModelUnavailableError: Not on disk nor cached, and the Hub is unreachable or may
            not be asked.
        EnvironmentProblem: The repo is gated.
        UsageError: The model cannot be estimated (a single file, no readable config.json,
            a config this estimate does not understand).
    """
    path = Path(model).expanduser()
    if path.is_dir():
        return spec_from_dir(path, model=model, source="local")
    if path.exists():
        # A single file (a GGUF checkpoint, say): vLLM may serve it; the estimate cannot.
        raise UsageError(f"cannot estimate {model}: it is a file, not a model directory")
    if looks_like_path(model):
        raise NotFoundError(f"{model} is not a model directory")
    snapshot = hf_cache.snapshot_dir(model, revision, needs="config.json")
    if snapshot is not None:
        return spec_from_dir(snapshot, model=model, source="hf-cache")
    if not allow_network or hf_cache.offline():
        raise _unavailable(model, "the Hub may not be asked (HF_HUB_OFFLINE)")
    return spec_from_hub(model, revision)


def _unavailable(model: str, why: str) -> ModelUnavailableError:
    return ModelUnavailableError(
        f"{model} is neither on disk nor in the Hugging Face cache, and {why}",
        hint=f"run `cmw-vllm download {model}` first",
    )


def _short(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0][:160]}" if text else type(exc).__name__
