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
from dataclasses import asdict, dataclass, field, replace
from typing import Any, Literal

from cmw_vllm.errors import UsageError
from cmw_vllm.hf_cache import SAFETENSORS_DTYPE_BITS
from cmw_vllm.vocab import Dtype, GiB, format_gib

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
F16, BF16, F32 = Dtype.FLOAT16, Dtype.BFLOAT16, Dtype.FLOAT32
DTYPE_BYTES = {F32: 4, F16: 2, BF16: 2}
# Every spelling of a float dtype (vLLM's aliases, config.json's, safetensors' codes).
_DTYPE_ALIASES = {
    Dtype.HALF: F16, F16: F16, "fp16": F16,
    Dtype.FLOAT: F32, F32: F32, "fp32": F32,
    BF16: BF16, "bf16": BF16,
    "F32": F32, "F16": F16, "BF16": BF16,
}
KV_CACHE_DTYPE_BYTES = {
    BF16: 2, F16: 2,
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
    if dtype in (None, "", Dtype.AUTO):
        config_dtype = spec.config_dtype or F32
        if config_dtype == F32:
            return F16 if spec.pooling else BF16
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
        stored = DTYPE_BYTES.get(spec.config_dtype or BF16, 2)
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
    if kv_cache_dtype in (None, "", Dtype.AUTO):
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
            available; None when unknown.
        devices: GPUs used (one per tensor-parallel rank); 1 for the CPU.
        description: Where the numbers come from (``GPU 0 (NVIDIA H100)``, ``RAM``).
        cpu_kv_space: Bytes of ``VLLM_CPU_KVCACHE_SPACE`` (CPU only; None when unset).
        devices_available: GPUs a server could be split over (None when unknown): more
            tensor-parallel ranks are suggested only up to this.
    """

    device: Device
    memory_total: int
    memory_free: int | None
    devices: int = 1
    description: str = ""
    cpu_kv_space: int | None = None
    devices_available: int | None = None


@dataclass
class MemoryEstimate:
    """Whether a model fits, and with which settings it would.

    Byte figures are per GPU (per rank on the CPU) unless named ``*_total``.
    ``suggestions`` are settings that fit (each one checked by this same estimate), empty
    when the model fits as asked or when no setting would make it fit.
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
    suggestions: list[str] = field(default_factory=list)
    # The share `--gpu-memory-utilization auto` chooses on this target (GPU only).
    gpu_memory_utilization_auto: float | None = None

    def to_json(self) -> dict[str, Any]:
        """Stable JSON shape for ``estimate --json``."""
        return asdict(self)


@dataclass
class _Budget:
    """How the target's memory is shared out: runtime, the whole budget and the KV space."""

    runtime: int
    budget: int
    kv_space: int
    kv_source: str
    problems: list[str] = field(default_factory=list)


def gpu_utilization_cap(memory_total: int, memory_free: int | None) -> float:
    """The largest ``--gpu-memory-utilization`` (two decimals) that what is free allows."""
    if not memory_total:
        return 0.0
    free = memory_total if memory_free is None else memory_free
    return max(0.0, min(1.0, math.floor(free / memory_total * 100 + 1e-9) / 100))


def _gpu_budget(target: MemoryTarget, util: float, weights: int, acts: int,
                kv_given: int | None) -> _Budget:
    runtime = GPU_RUNTIME_BYTES
    budget = int(target.memory_total * util)
    if kv_given is not None:
        out = _Budget(runtime, budget, kv_given, "--kv-cache-memory-bytes")
    else:
        out = _Budget(runtime, budget, budget - weights - acts - runtime,
                      f"{util:g} x GPU memory - weights - activations - runtime")
    if target.memory_free is not None and target.memory_free < budget:
        out.problems.append(
            f"{target.description or 'the GPU'} has {format_gib(target.memory_free)} free but "
            f"--gpu-memory-utilization {util:g} asks for {format_gib(budget)} "
            f"of {format_gib(target.memory_total)}"
        )
    return out


def _cpu_budget(target: MemoryTarget, util: float, weights: int, acts: int,
                kv_given: int | None) -> _Budget:
    runtime = CPU_RUNTIME_BYTES
    free = target.memory_free
    if kv_given is not None or target.cpu_kv_space is not None:
        kv_space = kv_given if kv_given is not None else int(target.cpu_kv_space or 0)
        source = "--kv-cache-memory-bytes" if kv_given is not None else CPU_KV_SPACE_ENV
        out = _Budget(runtime, weights + acts + runtime + kv_space, kv_space, source)
    else:
        # vLLM's CPU worker asks for util x RAM and leaves what its own process does not
        # use for the KV cache (vllm/v1/worker/cpu_worker.py).
        budget = int(target.memory_total * util)
        out = _Budget(runtime, budget, budget - weights - acts - runtime // 2,
                      f"{util:g} x RAM - weights - worker memory (vLLM's CPU default)")
        if free is not None and free - CPU_FRONTEND_BYTES < budget:
            out.problems.append(
                f"RAM has {format_gib(free)} available, about "
                f"{format_gib(max(0, free - CPU_FRONTEND_BYTES))} once vLLM's API server and "
                f"engine run, but its CPU worker asks for {util:g} x "
                f"{format_gib(target.memory_total)} = {format_gib(budget)} when "
                f"{CPU_KV_SPACE_ENV} is unset"
            )
    if not out.problems and free is not None and out.budget > free:
        out.problems.append(
            f"RAM has {format_gib(free)} available but the server needs about "
            f"{format_gib(out.budget)} (weights {format_gib(weights)}, KV cache "
            f"{format_gib(out.kv_space)}, runtime {format_gib(runtime + acts)})"
        )
    return out


def ram_problems(target: MemoryTarget, gpu_memory_utilization: float | None = None) -> list[str]:
    """Why vLLM's CPU build would refuse to start on ``target`` whatever the model (empty
    when it starts): the check ``setup`` makes, by the same rule as :func:`estimate`."""
    util = gpu_memory_utilization or DEFAULT_GPU_MEMORY_UTILIZATION
    return _cpu_budget(target, util, 0, 0, None).problems


def cpu_kv_space_that_fits(target: MemoryTarget, model_bytes: int = 0) -> int:
    """Whole GiB of ``VLLM_CPU_KVCACHE_SPACE`` that fit in RAM beside ``model_bytes`` of
    weights and activations and the runtime (0 when none do)."""
    free = target.memory_total if target.memory_free is None else target.memory_free
    return max(0, (free - model_bytes - CPU_RUNTIME_BYTES) // GiB)


def cpu_kv_space_wanted(kv: KvCacheLayout, max_model_len: int, block_size: int,
                        max_num_seqs: int = DEFAULT_MAX_NUM_SEQS) -> int:
    """Whole GiB of ``VLLM_CPU_KVCACHE_SPACE`` that hold ``max_num_seqs`` requests of
    ``max_model_len`` tokens at once: as much KV cache as vLLM's scheduler can ever use
    (rounded up, at least 1), so that a small model is not offered all of RAM."""
    blocks = _request_blocks(kv, max_model_len, block_size) * max_num_seqs
    return max(1, _cdiv(blocks * _block_bytes(kv, block_size), GiB))


def _settings_problems(spec: ModelSpec, settings: EstimateSettings) -> list[str]:
    """Settings vLLM itself refuses, whatever the memory."""
    tp = settings.tensor_parallel_size
    problems = []
    if settings.max_model_len and settings.max_model_len > spec.derived_max_model_len:
        problems.append(
            f"--max-model-len {settings.max_model_len} is longer than the model allows "
            f"({spec.derived_max_model_len}); vLLM refuses it"
        )
    if not _tp_splits(spec, tp):
        problems.append(
            f"{spec.num_attention_heads} attention heads ({spec.num_kv_heads} KV) cannot be "
            f"split over {tp} tensor-parallel ranks; vLLM refuses it"
        )
    return problems


def _tp_splits(spec: ModelSpec, tp: int) -> bool:
    return not (spec.num_attention_heads % tp or (
        not spec.is_mla and spec.num_kv_heads % tp and tp % spec.num_kv_heads))


def _notes(spec: ModelSpec, kv: KvCacheLayout) -> list[str]:
    notes = []
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
    return notes


def estimate(spec: ModelSpec, settings: EstimateSettings, target: MemoryTarget) -> MemoryEstimate:
    """Estimate memory for ``spec`` served with ``settings`` on ``target``.

    When it does not fit, ``suggestions`` lists settings that do (see :func:`suggestions`).

    Raises:
        UsageError: Settings the estimate cannot model (unknown dtype, bad TP size).
    """
    est = _assess(spec, settings, target)
    if not est.fits:
        est.suggestions = suggestions(spec, settings, target, est)
    return est


def assess(spec: ModelSpec, settings: EstimateSettings, target: MemoryTarget) -> MemoryEstimate:
    """Whether ``spec`` fits ``target`` with ``settings``, without looking for settings that
    would (cheaper than :func:`estimate`; the placement tries many targets).

    Raises:
        UsageError: Settings the estimate cannot model.
    """
    return _assess(spec, settings, target)


# Full-length requests `--gpu-memory-utilization auto` makes room for when vLLM's
# --max-num-seqs is not given.
DEFAULT_AUTO_CONCURRENCY = 4


def auto_utilization(spec: ModelSpec, settings: EstimateSettings, target: MemoryTarget,
                     concurrency: int = DEFAULT_AUTO_CONCURRENCY) -> tuple[float, int]:
    """The share of ``target`` that ``--gpu-memory-utilization auto`` gives a server, and
    the KV cache bytes that go with it (``--kv-cache-memory-bytes``).

    The share holds the weights, activations, the runtime and the KV cache of
    ``concurrency`` requests of ``max_model_len`` tokens, rounded up to 0.01. When what is
    free cannot hold that much, the share is what is free (the fit check then says whether
    one request still fits).
    """
    tp = settings.tensor_parallel_size
    kv = kv_cache_layout(spec, kv_cache_dtype=settings.kv_cache_dtype, dtype=settings.dtype,
                         tensor_parallel_size=tp,
                         max_num_batched_tokens=settings.max_num_batched_tokens)
    block = settings.block_size or GPU_BLOCK_SIZE
    weights = _cdiv(weight_bytes(spec, settings.dtype), tp)
    acts = activation_bytes(spec, dtype=settings.dtype, tensor_parallel_size=tp,
                            max_num_batched_tokens=settings.max_num_batched_tokens)
    max_len = settings.max_model_len or spec.derived_max_model_len
    kv_wanted = settings.kv_cache_memory_bytes or (
        _request_blocks(kv, max_len, block) * _block_bytes(kv, block) * max(1, concurrency))
    fixed = weights + acts + GPU_RUNTIME_BYTES
    if not target.memory_total:
        return 0.0, 0
    share = math.ceil((fixed + kv_wanted) / target.memory_total * 100 - 1e-9) / 100
    share = min(share, gpu_utilization_cap(target.memory_total, target.memory_free))
    share = max(0.01, share)
    kv_bytes = int(target.memory_total * share) - fixed
    if settings.kv_cache_memory_bytes is not None:
        kv_bytes = min(kv_bytes, settings.kv_cache_memory_bytes)
    return share, max(0, kv_bytes)


def _assess(spec: ModelSpec, settings: EstimateSettings, target: MemoryTarget) -> MemoryEstimate:
    tp = settings.tensor_parallel_size
    kv = kv_cache_layout(spec, kv_cache_dtype=settings.kv_cache_dtype, dtype=settings.dtype,
                         tensor_parallel_size=tp,
                         max_num_batched_tokens=settings.max_num_batched_tokens)
    block = settings.block_size or (CPU_BLOCK_SIZE if target.device == "cpu" else GPU_BLOCK_SIZE)
    weights_total = weight_bytes(spec, settings.dtype)
    weights = _cdiv(weights_total, tp)
    acts = activation_bytes(spec, dtype=settings.dtype, tensor_parallel_size=tp,
                            max_num_batched_tokens=settings.max_num_batched_tokens)
    max_len = settings.max_model_len or spec.derived_max_model_len
    context = settings.concurrency_context or max_len
    util = settings.gpu_memory_utilization or DEFAULT_GPU_MEMORY_UTILIZATION
    problems = _settings_problems(spec, settings)
    shares = (_gpu_budget if target.device == "gpu" else _cpu_budget)(
        target, util, weights, acts, settings.kv_cache_memory_bytes)
    problems += shares.problems
    kv_space = shares.kv_space
    needed = weights + acts + shares.runtime + kv.request_bytes(max_len)
    util_needed = None
    if target.device == "gpu" and target.memory_total:
        util_needed = math.ceil(needed / target.memory_total * 100) / 100
    kv_fits = kv_space > 0 and _request_blocks(kv, max_len, block) <= kv_cache_blocks(
        kv_space, kv, block)
    if kv_space <= 0:
        problems.append(
            f"no memory left for the KV cache: weights {format_gib(weights)} + activations and "
            f"runtime {format_gib(acts + shares.runtime)} exceed the {format_gib(shares.budget)} "
            "budget"
        )
    elif not kv_fits:
        problems.append(
            f"one request of {max_len} tokens needs {format_gib(kv.request_bytes(max_len))} of "
            f"KV cache but only {format_gib(kv_space)} is left"
        )
    return MemoryEstimate(
        model=spec.model, source=spec.source, device=target.device,
        target=target.description, dtype=resolve_dtype(spec, settings.dtype),
        kv_cache_dtype=kv.kv_cache_dtype, tensor_parallel_size=tp, block_size=block,
        weight_bytes_total=weights_total, weight_bytes=weights, activation_bytes=acts,
        runtime_bytes=shares.runtime, kv_bytes_per_token=kv.bytes_per_token,
        kv_bytes_per_token_total=kv.bytes_per_token * (1 if spec.is_mla else tp),
        kv_sliding_bytes_per_token=kv.sliding_bytes_per_token, max_model_len=max_len,
        derived_max_model_len=spec.derived_max_model_len, memory_total=target.memory_total,
        memory_free=target.memory_free, gpu_memory_utilization=util, budget=shares.budget,
        kv_space=kv_space, kv_space_source=shares.kv_source,
        kv_cache_tokens=kv_cache_tokens(kv_space, kv, max_len, block) if kv_space > 0 else 0,
        fits=kv_fits and not problems,
        max_model_len_that_fits=largest_max_model_len(kv_space, kv, block,
                                                      spec.derived_max_model_len),
        needed_bytes=needed, gpu_memory_utilization_needed=util_needed,
        free_memory_ok=not shares.problems, concurrency_context=context,
        concurrency=max_concurrency(kv_space, kv, context, block) if kv_space > 0 else 0.0,
        problems=problems, notes=_notes(spec, kv),
    )


# --------------------------------------------------------------------------- suggestions

# A context shorter than this is not worth suggesting (the model could hardly answer).
MIN_SUGGESTED_MAX_MODEL_LEN = 256


def suggestions(spec: ModelSpec, settings: EstimateSettings, target: MemoryTarget,
                est: MemoryEstimate) -> list[str]:
    """Settings under which ``spec`` fits ``target``, best first; each one is checked.

    Never more than the target has: a ``--gpu-memory-utilization`` no larger than free /
    total (with the longest ``--max-model-len`` that fits that budget when the whole context
    does not), ``VLLM_CPU_KVCACHE_SPACE`` no larger than the RAM that is left, more
    tensor-parallel ranks only on GPUs that exist.
    """
    if est.fits:
        return []
    if not _tp_splits(spec, settings.tensor_parallel_size):
        return []
    prefix: list[str] = []
    if settings.max_model_len and settings.max_model_len > spec.derived_max_model_len:
        settings = replace(settings, max_model_len=spec.derived_max_model_len)
        prefix = [f"--max-model-len {spec.derived_max_model_len}"]
        if _assess(spec, settings, target).fits:
            return prefix
    found = (_gpu_suggestions if target.device == "gpu" else _cpu_suggestions)(
        spec, settings, target)
    if prefix:
        # Every suggestion must also shorten the context vLLM refuses.
        found = [s if "--max-model-len" in s else f"{s} {prefix[0]}" for s in found]
    return found


def _fits(spec: ModelSpec, settings: EstimateSettings, target: MemoryTarget,
          **changes: Any) -> MemoryEstimate:
    return _assess(spec, replace(settings, **changes), target)


def _longest_fit(spec: ModelSpec, settings: EstimateSettings, target: MemoryTarget,
                 **changes: Any) -> int | None:
    """The longest max_model_len that fits with ``changes`` (None when too short to offer)."""
    est = _fits(spec, settings, target, **changes)
    length = est.max_model_len_that_fits
    if not est.free_memory_ok or length < min(MIN_SUGGESTED_MAX_MODEL_LEN,
                                              spec.derived_max_model_len):
        return None
    if not _fits(spec, settings, target, max_model_len=length, **changes).fits:
        return None
    return length


def _gpu_suggestions(spec: ModelSpec, settings: EstimateSettings,
                     target: MemoryTarget) -> list[str]:
    out: list[str] = []
    util = settings.gpu_memory_utilization or DEFAULT_GPU_MEMORY_UTILIZATION
    cap = gpu_utilization_cap(target.memory_total, target.memory_free)
    lowest = _lowest_utilization(spec, settings, target, cap)
    if lowest is not None:
        out.append(f"--gpu-memory-utilization {lowest:g}")
    for candidate in ([util] if util <= cap else []) + ([cap] if lowest is None else []):
        if candidate <= 0:
            continue
        length = _longest_fit(spec, settings, target, gpu_memory_utilization=candidate)
        max_len = settings.max_model_len or spec.derived_max_model_len
        if length is None or length >= max_len:
            continue
        flags = "" if candidate == util else f"--gpu-memory-utilization {candidate:g} "
        text = f"{flags}--max-model-len {length}"
        if text not in out:
            out.append(text)
    tp = settings.tensor_parallel_size
    more = tp * 2
    if (target.devices_available or 0) >= more and _tp_splits(spec, more) and _fits(
            spec, settings, target, tensor_parallel_size=more).fits:
        out.append(f"--tensor-parallel-size {more}")
    return out


def _lowest_utilization(spec: ModelSpec, settings: EstimateSettings, target: MemoryTarget,
                        cap: float) -> float | None:
    """The smallest utilization (at most ``cap``) that holds the whole context."""
    est = _fits(spec, settings, target, gpu_memory_utilization=cap) if cap > 0 else None
    if est is None or not est.fits:
        return None
    util = max(0.01, min(cap, est.gpu_memory_utilization_needed or cap))
    while util < cap and not _fits(spec, settings, target, gpu_memory_utilization=util).fits:
        util = round(util + 0.01, 2)
    return min(util, cap)


def _cpu_suggestions(spec: ModelSpec, settings: EstimateSettings,
                     target: MemoryTarget) -> list[str]:
    out: list[str] = []
    if settings.kv_cache_memory_bytes is not None:
        length = _longest_fit(spec, settings, target)
        return [f"--max-model-len {length}"] if length else []
    probe = _assess(spec, settings, target)
    space = cpu_kv_space_that_fits(target, probe.weight_bytes + probe.activation_bytes)
    if space >= 1:
        kv = kv_cache_layout(spec, kv_cache_dtype=settings.kv_cache_dtype, dtype=settings.dtype,
                             tensor_parallel_size=settings.tensor_parallel_size,
                             max_num_batched_tokens=settings.max_num_batched_tokens)
        space = min(space, cpu_kv_space_wanted(kv, probe.max_model_len, probe.block_size))
        sized = replace(target, cpu_kv_space=space * GiB)
        if _assess(spec, settings, sized).fits:
            out.append(f"{CPU_KV_SPACE_ENV}={space}")
        elif (length := _longest_fit(spec, settings, sized)) is not None:
            out.append(f"{CPU_KV_SPACE_ENV}={space} --max-model-len {length}")
    if target.cpu_kv_space is None and target.memory_free and target.memory_total:
        share = math.floor((target.memory_free - CPU_FRONTEND_BYTES) / target.memory_total
                           * 100) / 100
        if 0 < share < (settings.gpu_memory_utilization or DEFAULT_GPU_MEMORY_UTILIZATION) \
                and _fits(spec, settings, target, gpu_memory_utilization=share).fits:
            out.append(f"--gpu-memory-utilization {share:g}")
    elif target.cpu_kv_space is not None and probe.free_memory_ok:
        length = _longest_fit(spec, settings, target)
        if length is not None:
            out.append(f"--max-model-len {length}")
    return out
