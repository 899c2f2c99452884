"""Make a tiny random-weight Qwen2 model that real vLLM (CPU build) can serve.

Usage as a script::

    python tests/tiny_model.py DIR [--layers 2 --heads 2 --kv-heads 1 --head-dim 64]

The weights are random (no torch or numpy needed: safetensors are written by hand), the
tokenizer is a byte-level BPE trained on the spot with ``tokenizers``.
"""

from __future__ import annotations

import argparse
import array
import json
import random
import struct
from pathlib import Path

CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
DTYPE_CODES = {"bfloat16": "BF16", "float16": "F16", "float32": "F32"}
_TRAINING_TEXT = (
    "The quick brown fox jumps over the lazy dog. Hello, how are you today? "
    "vLLM serves large language models quickly. Say hello in one word. "
    "Numbers 0 1 2 3 4 5 6 7 8 9 and punctuation: ; , . ! ? ( ) [ ] { } "
    "Привет, как дела? Bonjour le monde. user assistant system\n"
)


def _encode(values: list[float], dtype: str) -> bytes:
    if dtype == "float32":
        return array.array("f", values).tobytes()
    if dtype == "float16":
        return struct.pack(f"<{len(values)}e", *values)
    f32 = array.array("f", values).tobytes()  # little-endian float32: bf16 is the high half
    out = bytearray(len(values) * 2)
    out[0::2] = f32[2::4]
    out[1::2] = f32[3::4]
    return bytes(out)


def write_safetensors(path: Path, tensors: dict[str, tuple[list[int], bytes]], dtype: str) -> None:
    """Write tensors (name -> (shape, raw bytes)) in safetensors format."""
    header: dict[str, object] = {"__metadata__": {"format": "pt"}}
    offset = 0
    for name, (shape, raw) in tensors.items():
        header[name] = {
            "dtype": DTYPE_CODES[dtype],
            "shape": shape,
            "data_offsets": [offset, offset + len(raw)],
        }
        offset += len(raw)
    header_bytes = json.dumps(header, separators=(",", ":")).encode()
    header_bytes += b" " * (-len(header_bytes) % 8)
    with path.open("wb") as fh:
        fh.write(struct.pack("<Q", len(header_bytes)))
        fh.write(header_bytes)
        for _shape, raw in tensors.values():
            fh.write(raw)


def _train_tokenizer(out: Path, vocab_size: int) -> None:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator([_TRAINING_TEXT] * 50, trainer=trainer)
    tok.save(str(out / "tokenizer.json"))


def make_tiny_model(
    out: str | Path,
    *,
    layers: int = 2,
    heads: int = 2,
    kv_heads: int = 1,
    head_dim: int = 64,
    intermediate: int = 256,
    vocab_size: int = 512,
    dtype: str = "bfloat16",
    shards: int = 1,
    seed: int = 0,
) -> Path:
    """Write a tiny Qwen2ForCausalLM into ``out`` and return that directory.

    Args:
        out: Target directory (created).
        layers: Number of decoder layers.
        heads: Attention heads.
        kv_heads: Key/value heads (GQA when fewer than ``heads``).
        head_dim: Size of one head (keep 64 or more: vLLM's CPU attention needs it).
        intermediate: MLP width.
        vocab_size: Vocabulary size (tokenizer and embeddings).
        dtype: bfloat16, float16 or float32.
        shards: Number of safetensors files (>1 writes an index file too).
        seed: Random seed for the weights.

    Returns:
        The model directory.
    """
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    rng = random.Random(seed)
    hidden = heads * head_dim

    def rand(*shape: int) -> tuple[list[int], bytes]:
        n = 1
        for dim in shape:
            n *= dim
        return list(shape), _encode([rng.gauss(0.0, 0.02) for _ in range(n)], dtype)

    def ones(n: int) -> tuple[list[int], bytes]:
        return [n], _encode([1.0] * n, dtype)

    tensors: dict[str, tuple[list[int], bytes]] = {
        "model.embed_tokens.weight": rand(vocab_size, hidden)
    }
    for i in range(layers):
        p = f"model.layers.{i}."
        tensors[p + "input_layernorm.weight"] = ones(hidden)
        tensors[p + "post_attention_layernorm.weight"] = ones(hidden)
        tensors[p + "self_attn.q_proj.weight"] = rand(heads * head_dim, hidden)
        tensors[p + "self_attn.q_proj.bias"] = rand(heads * head_dim)
        tensors[p + "self_attn.k_proj.weight"] = rand(kv_heads * head_dim, hidden)
        tensors[p + "self_attn.k_proj.bias"] = rand(kv_heads * head_dim)
        tensors[p + "self_attn.v_proj.weight"] = rand(kv_heads * head_dim, hidden)
        tensors[p + "self_attn.v_proj.bias"] = rand(kv_heads * head_dim)
        tensors[p + "self_attn.o_proj.weight"] = rand(hidden, heads * head_dim)
        tensors[p + "mlp.gate_proj.weight"] = rand(intermediate, hidden)
        tensors[p + "mlp.up_proj.weight"] = rand(intermediate, hidden)
        tensors[p + "mlp.down_proj.weight"] = rand(hidden, intermediate)
    tensors["model.norm.weight"] = ones(hidden)

    if shards <= 1:
        write_safetensors(out / "model.safetensors", tensors, dtype)
    else:
        names = list(tensors)
        per = -(-len(names) // shards)
        weight_map: dict[str, str] = {}
        total = 0
        for s in range(shards):
            fname = f"model-{s + 1:05d}-of-{shards:05d}.safetensors"
            part = {n: tensors[n] for n in names[s * per : (s + 1) * per]}
            write_safetensors(out / fname, part, dtype)
            for n, (_shape, raw) in part.items():
                weight_map[n] = fname
                total += len(raw)
        index = {"metadata": {"total_size": total}, "weight_map": weight_map}
        (out / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))

    _train_tokenizer(out, vocab_size)
    vocab = json.loads((out / "tokenizer.json").read_text())["model"]["vocab"]
    eos_id = vocab["<|im_end|>"]
    pad_id = vocab["<|endoftext|>"]
    config = {
        "architectures": ["Qwen2ForCausalLM"],
        "model_type": "qwen2",
        "vocab_size": vocab_size,
        "hidden_size": hidden,
        "intermediate_size": intermediate,
        "num_hidden_layers": layers,
        "num_attention_heads": heads,
        "num_key_value_heads": kv_heads,
        "max_position_embeddings": 4096,
        "rms_norm_eps": 1e-6,
        "rope_theta": 10000.0,
        "hidden_act": "silu",
        "tie_word_embeddings": True,
        "torch_dtype": dtype,
        "use_sliding_window": False,
        "bos_token_id": pad_id,
        "eos_token_id": eos_id,
    }
    (out / "config.json").write_text(json.dumps(config, indent=2))
    (out / "generation_config.json").write_text(
        json.dumps({"bos_token_id": pad_id, "eos_token_id": eos_id}, indent=2)
    )
    tok_config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "eos_token": "<|im_end|>",
        "pad_token": "<|endoftext|>",
        "bos_token": None,
        "model_max_length": 4096,
        "chat_template": CHAT_TEMPLATE,
    }
    (out / "tokenizer_config.json").write_text(json.dumps(tok_config, indent=2))
    return out


def make_tiny_adapter(
    out: str | Path,
    *,
    rank: int = 8,
    layers: int = 2,
    heads: int = 2,
    kv_heads: int = 1,
    head_dim: int = 64,
    targets: tuple[str, ...] = ("q_proj", "v_proj"),
    seed: int = 1,
    scale: float = 0.3,
) -> Path:
    """Write a LoRA adapter for :func:`make_tiny_model`'s model in PEFT's layout.

    ``adapter_config.json`` and ``adapter_model.safetensors`` with ``lora_A``/``lora_B`` of
    the attention projections in ``targets``; the weights are random and large enough
    (``scale``) that greedy answers differ from the base model's and between seeds.
    Give other ``heads``/``head_dim`` than the model's to make an adapter that does not fit.

    Returns:
        The adapter directory.
    """
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    rng = random.Random(seed)
    hidden = heads * head_dim
    sizes = {"q_proj": (hidden, heads * head_dim), "k_proj": (hidden, kv_heads * head_dim),
             "v_proj": (hidden, kv_heads * head_dim), "o_proj": (heads * head_dim, hidden)}
    tensors: dict[str, tuple[list[int], bytes]] = {}
    for i in range(layers):
        for target in targets:
            in_f, out_f = sizes[target]
            prefix = f"base_model.model.model.layers.{i}.self_attn.{target}"
            for part, shape in (("lora_A", [rank, in_f]), ("lora_B", [out_f, rank])):
                values = [rng.gauss(0.0, scale) for _ in range(shape[0] * shape[1])]
                tensors[f"{prefix}.{part}.weight"] = (shape, _encode(values, "float32"))
    write_safetensors(out / "adapter_model.safetensors", tensors, "float32")
    config = {
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "base_model_name_or_path": "tiny-qwen2",
        "r": rank,
        "lora_alpha": 2 * rank,
        "lora_dropout": 0.0,
        "bias": "none",
        "target_modules": list(targets),
        "fan_in_fan_out": False,
        "inference_mode": True,
    }
    (out / "adapter_config.json").write_text(json.dumps(config, indent=2))
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out")
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--heads", type=int, default=2)
    parser.add_argument("--kv-heads", type=int, default=1)
    parser.add_argument("--head-dim", type=int, default=64)
    parser.add_argument("--dtype", default="bfloat16", choices=sorted(DTYPE_CODES))
    parser.add_argument("--shards", type=int, default=1)
    args = parser.parse_args()
    path = make_tiny_model(
        args.out,
        layers=args.layers,
        heads=args.heads,
        kv_heads=args.kv_heads,
        head_dim=args.head_dim,
        dtype=args.dtype,
        shards=args.shards,
    )
    print(path)


if __name__ == "__main__":
    main()
