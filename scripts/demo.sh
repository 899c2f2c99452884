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

[ -f "$MODEL_DIR/config.json" ] || .venv/bin/python tests/tiny_model.py "$MODEL_DIR"
$CMW start "$MODEL_DIR" --name tiny --port "$PORT" --max-model-len 512
curl -sS "http://127.0.0.1:$PORT/v1/chat/completions" -H 'Content-Type: application/json' \
  -d "{\"model\": \"$MODEL_DIR\", \"messages\": [{\"role\": \"user\", \"content\": \"Hello\"}], \"max_tokens\": 16}"
echo
$CMW status
$CMW stop tiny
