"""The estimate's KV-cache figures against what real vLLM (CPU build) logs.

For each variant of the tiny model, ``cmw-vllm estimate --json`` gives KV bytes per token
and the token count for the KV space in ``VLLM_CPU_KVCACHE_SPACE``; vLLM, started directly,
logs ``CPU KV cache size: N tokens``. They must agree exactly.
"""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import time
from pathlib import Path

import pytest
from click.testing import CliRunner

from cmw_vllm.cli import cli
from cmw_vllm.vllm_engine import build_command
from tests.tiny_model import make_tiny_model

GiB = 1024**3
KV_LINE = re.compile(r"KV cache size: ([\d,]+) tokens")
MAX_MODEL_LEN = 512
# A safety net against a hung engine, not a performance expectation.
ENGINE_DEADLINE_S = 600


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _kill_group(proc: subprocess.Popen[bytes]) -> None:
    for sig, wait in ((signal.SIGTERM, 10), (signal.SIGKILL, 10)):
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            break
        try:
            proc.wait(timeout=wait)
            # The API server is gone; sweep what is left of its group.
            os.killpg(proc.pid, signal.SIGKILL)
        except (subprocess.TimeoutExpired, ProcessLookupError):
            continue
        break


def vllm_kv_tokens(python: str, model: Path, log: Path, extra: list[str]) -> int:
    """Start vLLM on ``model``, read the logged KV-cache token count, stop it."""
    flags = ["--port", str(_free_port()), "--max-model-len", str(MAX_MODEL_LEN), *extra]
    cmd = build_command(python, str(model), flags)
    with log.open("wb") as out:
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT,
                                stdin=subprocess.DEVNULL, start_new_session=True,
                                env={**os.environ, "PYTHONUNBUFFERED": "1"})
    try:
        deadline = time.monotonic() + ENGINE_DEADLINE_S
        while time.monotonic() < deadline:
            match = KV_LINE.search(log.read_text(errors="replace"))
            if match:
                return int(match.group(1).replace(",", ""))
            if proc.poll() is not None:
                break
            time.sleep(0.5)
        tail = "\n".join(log.read_text(errors="replace").splitlines()[-30:])
        pytest.fail(f"vLLM logged no KV cache size (exit {proc.poll()}):\n{tail}")
    finally:
        _kill_group(proc)


VARIANTS = [
    pytest.param({"layers": 2, "heads": 2, "kv_heads": 1, "head_dim": 64,
                  "dtype": "bfloat16"}, None, id="tiny-bf16"),
    pytest.param({"layers": 3, "heads": 4, "kv_heads": 2, "head_dim": 128,
                  "dtype": "bfloat16"}, None, id="gqa-3layers-hd128-bf16"),
    pytest.param({"layers": 4, "heads": 4, "kv_heads": 4, "head_dim": 64,
                  "dtype": "float32"}, "float32", id="mha-4layers-fp32"),
]


@pytest.mark.vllm
@pytest.mark.parametrize(("shape", "serve_dtype"), VARIANTS)
def test_estimate_matches_vllm_kv_cache_size(
    real_vllm: str, tmp_path: Path, shape: dict[str, object], serve_dtype: str | None
) -> None:
    model = make_tiny_model(tmp_path / "model", **shape)  # type: ignore[arg-type]
    dtype_args = ["--dtype", serve_dtype] if serve_dtype else []
    result = CliRunner().invoke(
        cli, ["estimate", str(model), "--max-model-len", str(MAX_MODEL_LEN), "--json",
              *dtype_args])
    assert result.exit_code in (0, 7), result.output
    est = json.loads(result.output)
    assert est["device"] == "cpu"
    assert est["kv_space_source"] == "VLLM_CPU_KVCACHE_SPACE"
    kv_space = int(os.environ["VLLM_CPU_KVCACHE_SPACE"]) * GiB
    assert est["kv_space"] == kv_space

    logged = vllm_kv_tokens(real_vllm, model, tmp_path / "vllm.log", dtype_args)

    per_token = est["kv_bytes_per_token"]
    assert est["kv_cache_tokens"] == logged
    # vLLM hands out whole blocks: N tokens use at most the space, one more block would not fit.
    assert per_token * logged <= kv_space < per_token * (logged + est["block_size"])
