"""How much memory a model needs under vLLM: the arithmetic, pure and separately testable.

Every function here takes a :class:`ModelSpec` (what ``cmw_vllm.model_spec`` read from the
model's files), the serving settings and a :class:`MemoryTarget` (what
``cmw_vllm.memory_check`` measured on this machine), and does no I/O. The KV-cache figures
follow vLLM 0.32.0's own rules:

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

import math
from dataclasses import asdict, dataclass, field
from typing import Any, Literal

from cmw_vllm.errors import UsageError
from cmw_vllm.hf_cache import SAFETENSORS_DTYPE_BITS
from cmw_vllm.vocab import GiB, format_gib

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


def normalise_dtype(value: Any) -> str | None:
    """The dtype name (``bfloat16``, ...) of a config value or safetensors code; None if unknown."""
    if value is None:
        return None
    text = str(value).removeprefix("torch.")
    return _DTYPE_ALIASES.get(text)


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
                total += count * SAFETENSORS_DTYPE_BITS.get(code, 8) / 8
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
                f"{target.description or 'the GPU'} has {format_gib(target.memory_free)} free but "
                f"--gpu-memory-utilization {util:g} asks for {format_gib(budget)} "
                f"of {format_gib(target.memory_total)}"
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
                    f"RAM has {format_gib(target.memory_free)} available, about "
                    f"{format_gib(max(0, target.memory_free - CPU_FRONTEND_BYTES))} once "
                    "vLLM's API server and engine run, but its CPU worker asks for "
                    f"{util:g} x {format_gib(target.memory_total)} = {format_gib(budget)} "
                    f"when {CPU_KV_SPACE_ENV} is unset"
                )
        if free_ok and target.memory_free is not None and budget > target.memory_free:
            free_ok = False
            problems.append(
                f"RAM has {format_gib(target.memory_free)} available but the server needs about "
                f"{format_gib(budget)} (weights {format_gib(weights)}, KV cache "
                f"{format_gib(kv_space)}, runtime {format_gib(runtime + acts)})"
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
            f"no memory left for the KV cache: weights {format_gib(weights)} + activations and "
            f"runtime {format_gib(acts + runtime)} exceed the {format_gib(budget)} budget"
        )
    elif not kv_fits:
        problems.append(
            f"one request of {max_len} tokens needs {format_gib(kv.request_bytes(max_len))} of KV "
            f"cache but only {format_gib(kv_space)} is left"
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
