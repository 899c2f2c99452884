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


def launch_vllm(python: str, model: Path, log: Path, extra: list[str]
                ) -> subprocess.Popen[bytes]:
    """Start vLLM on ``model`` in a session of its own, its output to ``log``."""
    flags = ["--port", str(_free_port()), "--max-model-len", str(MAX_MODEL_LEN), *extra]
    cmd = build_command(python, str(model), flags)
    with log.open("wb") as out:
        return subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT,
                                stdin=subprocess.DEVNULL, start_new_session=True,
                                env={**os.environ, "PYTHONUNBUFFERED": "1"})


def logged_kv_tokens(runs: dict[str, tuple[subprocess.Popen[bytes], Path]]
                     ) -> dict[str, int | str]:
    """Wait for each run's ``KV cache size`` line, stopping each engine once it has logged.

    Returns:
        Per run, the token count, or the log's tail when vLLM exited (or hung) without it.
    """
    found: dict[str, int | str] = {}
    deadline = time.monotonic() + ENGINE_DEADLINE_S
    try:
        while len(found) < len(runs) and time.monotonic() < deadline:
            for key, (proc, log) in runs.items():
                if key in found:
                    continue
                match = KV_LINE.search(log.read_text(errors="replace"))
                if match:
                    found[key] = int(match.group(1).replace(",", ""))
                    _kill_group(proc)  # frees its CPU for the others
                elif proc.poll() is not None:
                    tail = "\n".join(log.read_text(errors="replace").splitlines()[-30:])
                    found[key] = f"vLLM logged no KV cache size (exit {proc.poll()}):\n{tail}"
            time.sleep(0.5)
    finally:
        for proc, _ in runs.values():
            _kill_group(proc)
    for key, (_, log) in runs.items():
        if key not in found:
            tail = "\n".join(log.read_text(errors="replace").splitlines()[-30:])
            found[key] = f"vLLM logged no KV cache size in {ENGINE_DEADLINE_S} s:\n{tail}"
    return found


VARIANTS = {
    "tiny-bf16": ({"layers": 2, "heads": 2, "kv_heads": 1, "head_dim": 64,
                   "dtype": "bfloat16"}, None),
    "gqa-3layers-hd128-bf16": ({"layers": 3, "heads": 4, "kv_heads": 2, "head_dim": 128,
                                "dtype": "bfloat16"}, None),
    "mha-4layers-fp32": ({"layers": 4, "heads": 4, "kv_heads": 4, "head_dim": 64,
                          "dtype": "float32"}, "float32"),
}


@pytest.mark.vllm
def test_estimate_matches_vllm_kv_cache_size(real_vllm: str, tmp_path: Path) -> None:
    """Every variant at once: three engines side by side take about half as long as one
    after another on 2 cores, and the KV figure does not depend on the load."""
    kv_space = int(os.environ["VLLM_CPU_KVCACHE_SPACE"]) * GiB
    estimates, runs = {}, {}
    for key, (shape, serve_dtype) in VARIANTS.items():
        model = make_tiny_model(tmp_path / key / "model", **shape)  # type: ignore[arg-type]
        dtype_args = ["--dtype", serve_dtype] if serve_dtype else []
        result = CliRunner().invoke(
            cli, ["estimate", str(model), "--max-model-len", str(MAX_MODEL_LEN), "--json",
                  *dtype_args])
        assert result.exit_code in (0, 7), (key, result.output)
        est = json.loads(result.output)
        assert est["device"] == "cpu", key
        assert est["kv_space_source"] == "VLLM_CPU_KVCACHE_SPACE", key
        assert est["kv_space"] == kv_space, key
        estimates[key] = est
        log = tmp_path / key / "vllm.log"
        runs[key] = (launch_vllm(real_vllm, model, log, dtype_args), log)

    logged = logged_kv_tokens(runs)

    for key, est in estimates.items():
        tokens = logged[key]
        assert isinstance(tokens, int), f"{key}: {tokens}"
        per_token = est["kv_bytes_per_token"]
        assert est["kv_cache_tokens"] == tokens, key
        # vLLM hands out whole blocks: N tokens use at most the space, one more would not fit.
        assert per_token * tokens <= kv_space < per_token * (tokens + est["block_size"]), key
