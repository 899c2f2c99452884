"""``mkmodel.py OUT tiny|8b|70b``: a Llama-shaped model whose weights take no disk.

Writes ``config.json`` and one bf16 safetensors file whose header is exact and whose data is
a hole (a sparse file): enough for ``estimate`` and the start preflight, which read headers.
"""

from __future__ import annotations

import json
import struct
import sys
from pathlib import Path

# hidden, intermediate, layers, heads, kv heads, vocabulary
SHAPES = {"tiny": (128, 256, 2, 2, 1, 512), "8b": (4096, 14336, 32, 32, 8, 128256),
          "70b": (8192, 28672, 80, 64, 8, 128256)}


def make(out: Path, kind: str) -> int:
    """Write the model; returns its parameter count."""
    h, inter, layers, heads, kv, vocab = SHAPES[kind]
    hd = h // heads
    config = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": h,
              "intermediate_size": inter, "num_hidden_layers": layers,
              "num_attention_heads": heads, "num_key_value_heads": kv, "head_dim": hd,
              "vocab_size": vocab,
              "max_position_embeddings": 131072 if kind != "tiny" else 2048,
              "torch_dtype": "bfloat16", "rms_norm_eps": 1e-5, "rope_theta": 500000.0,
              "tie_word_embeddings": False, "eos_token_id": 2, "bos_token_id": 1}
    out.mkdir(parents=True, exist_ok=True)
    (out / "config.json").write_text(json.dumps(config))
    shapes = {"model.embed_tokens.weight": [vocab, h], "model.norm.weight": [h],
              "lm_head.weight": [vocab, h]}
    for i in range(layers):
        p = f"model.layers.{i}."
        shapes.update({
            p + "self_attn.q_proj.weight": [heads * hd, h],
            p + "self_attn.k_proj.weight": [kv * hd, h],
            p + "self_attn.v_proj.weight": [kv * hd, h],
            p + "self_attn.o_proj.weight": [h, heads * hd],
            p + "mlp.gate_proj.weight": [inter, h], p + "mlp.up_proj.weight": [inter, h],
            p + "mlp.down_proj.weight": [h, inter],
            p + "input_layernorm.weight": [h], p + "post_attention_layernorm.weight": [h]})
    header: dict[str, object] = {}
    offset = 0
    for name, shape in shapes.items():
        size = 2
        for d in shape:
            size *= d
        header[name] = {"dtype": "BF16", "shape": shape, "data_offsets": [offset, offset + size]}
        offset += size
    header["__metadata__"] = {"format": "pt"}
    raw = json.dumps(header).encode()
    raw += b" " * (-len(raw) % 8)
    with open(out / "model.safetensors", "wb") as fh:
        fh.write(struct.pack("<Q", len(raw)))
        fh.write(raw)
        fh.truncate(8 + len(raw) + offset)
    return offset // 2


if __name__ == "__main__":
    print(sys.argv[2], "params", make(Path(sys.argv[1]), sys.argv[2]))
