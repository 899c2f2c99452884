"""Time from the first request for a LoRA adapter of a running base to its first token.

    CMW_VLLM_PYTHON=.venv-vllm/bin/python .venv/bin/python bench/bench_lora.py [--adapters 4]

One tiny random-model vLLM server (tests/tiny_model.py, CPU build unless CMW_VLLM_PYTHON
points elsewhere) is started by `cmw-vllm gateway` (a separate process, as users run it)
with one adapter declared; then each further adapter (random, rank 16, q/k/v/o, from
tests/tiny_model.py) is declared in models.toml while the base runs, and the time from
sending its first streamed chat request through the gateway to the first token is measured
(the gateway loads it into the base at run time). For comparison: the same for the adapter
loaded at start, and a second request of each loaded adapter. Figures, not pass/fail,
printed in Markdown.
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from bench.bench_cli import cli_cmd, machine  # noqa: E402
from bench.bench_lifecycle import free_port  # noqa: E402


def first_token(port: int, model: str, timeout: float = 900) -> float:
    """Seconds from sending a streamed chat request for ``model`` to its first token."""
    body = json.dumps({"model": model, "messages": [{"role": "user", "content": "Hello"}],
                       "max_tokens": 8, "temperature": 0, "stream": True})
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
    begin = time.perf_counter()
    conn.request("POST", "/v1/chat/completions", body=body,
                 headers={"Content-Type": "application/json"})
    resp = conn.getresponse()
    if resp.status != 200:
        raise SystemExit(f"{model}: {resp.status} {resp.read()[:300]!r}")
    while True:
        line = resp.readline()
        if not line:
            raise SystemExit(f"{model}: the stream ended before a token")
        if line.startswith(b"data: {") and b'"content"' in line:
            took = time.perf_counter() - begin
            break
    resp.read()
    conn.close()
    return took


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--adapters", type=int, default=4,
                        help="adapters loaded at run time (default 4)")
    args = parser.parse_args()
    from tests.tiny_model import make_tiny_adapter, make_tiny_model

    work = Path(tempfile.mkdtemp(prefix="bench-lora-"))
    home = work / "home"
    home.mkdir()
    model = make_tiny_model(work / "tiny")
    adapters = {f"a{i}": make_tiny_adapter(work / f"a{i}", seed=i, rank=16,
                                           targets=("q_proj", "k_proj", "v_proj", "o_proj"))
                for i in range(args.adapters + 1)}
    models_file = home / "models.toml"
    models_file.write_text(
        f'[models.tiny]\nmodel = "{model}"\nport = {free_port()}\nmax_model_len = 1024\n'
        f"max_loras = {args.adapters + 1}\nidle_timeout = 0\n"
        f'[adapters.a0]\nbase = "tiny"\nsource = "{adapters["a0"]}"\n')
    env = {**os.environ, "CMW_VLLM_HOME": str(home), "HF_HOME": str(work / "hf"),
           "VLLM_CPU_KVCACHE_SPACE": os.environ.get("VLLM_CPU_KVCACHE_SPACE", "1")}
    env.pop("VLLM_API_KEY", None)
    port = free_port()
    log = (work / "gateway.log").open("wb")
    gateway = subprocess.Popen(cli_cmd("gateway", "--port", str(port), "--start-timeout",
                                       "900"), env=env, stdout=log, stderr=subprocess.STDOUT,
                               start_new_session=True)
    try:
        time.sleep(2)
        started = first_token(port, "a0")
        print(f"base started with a0 by its first request: {started:.1f}s to the first token",
              file=sys.stderr)
        warm = [first_token(port, "a0") for _ in range(3)]
        loads: list[float] = []
        again: list[float] = []
        for i in range(1, args.adapters + 1):
            with models_file.open("a") as fh:
                fh.write(f'[adapters.a{i}]\nbase = "tiny"\nsource = "{adapters[f"a{i}"]}"\n')
            loads.append(first_token(port, f"a{i}"))
            again.append(first_token(port, f"a{i}"))
        print(f"# LoRA: first token of an adapter on a running base ({machine()})\n")
        print("| request | p50 | min | max | n |")
        print("|---|---|---|---|---|")
        for label, values in (
                ("first request of an adapter loaded at run time", loads),
                ("second request of that adapter", again),
                ("adapter loaded at start (warm)", warm)):
            print(f"| {label} | {statistics.median(values) * 1000:.0f} ms | "
                  f"{min(values) * 1000:.0f} ms | {max(values) * 1000:.0f} ms | "
                  f"{len(values)} |")
    finally:
        gateway.send_signal(signal.SIGTERM)
        try:
            gateway.wait(120)
        except subprocess.TimeoutExpired:
            gateway.kill()
        subprocess.run(cli_cmd("stop", "--all"), env=env, capture_output=True, timeout=120,
                       check=False)
        log.close()
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
