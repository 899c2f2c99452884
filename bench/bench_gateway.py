"""What the gateway adds in front of real vLLM: latency, time to first token, throughput.

    CMW_VLLM_PYTHON=.venv-vllm/bin/python .venv/bin/python bench/bench_gateway.py \\
        [--requests 300] [--streams 64] [--router PATH/TO/vllm-router]

One tiny random-model vLLM server (tests/tiny_model.py, CPU build unless CMW_VLLM_PYTHON
points elsewhere) is started once; `cmw-vllm gateway` runs in front of it (a separate
process, as users run it) and, with --router, vllm-router (Rust) too. Each figure compares
the same requests sent directly and through each proxy, interleaved:

- added latency: p50 and p99 of sequential non-streamed chat requests of 1 token, proxy
  minus direct (keep-alive connection, one request at a time);
- TTFT overhead: p50 of the time to the first streamed token, proxy minus direct;
- tokens/s at N concurrent streams (each 128 tokens, ignore_eos), proxy / direct.
Figures, not pass/fail. Takes about two minutes after the server is up.
"""

from __future__ import annotations

import argparse
import asyncio
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
from collections.abc import Callable
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from bench.bench_cli import cli_cmd, machine  # noqa: E402
from bench.bench_lifecycle import free_port, health_ok  # noqa: E402

MODEL = "tiny"


def wait_health(port: int, proc: subprocess.Popen[bytes] | None, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise SystemExit(f"process on port {port} exited ({proc.returncode})")
        if health_ok(port):
            return
        time.sleep(0.2)
    raise SystemExit(f"nothing healthy on port {port} after {timeout:g}s")


def chat_body(max_tokens: int, stream: bool) -> bytes:
    return json.dumps({"model": MODEL, "messages": [{"role": "user", "content": "Hello"}],
                       "max_tokens": max_tokens, "stream": stream, "ignore_eos": True}).encode()


class Client:
    """One keep-alive connection; times requests the way a thin client sees them."""

    def __init__(self, port: int) -> None:
        self.conn = http.client.HTTPConnection("127.0.0.1", port, timeout=120)
        self.one = chat_body(1, False)
        self.streamed = chat_body(16, True)
        self.headers = {"Content-Type": "application/json"}

    def latency(self) -> float:
        begin = time.perf_counter()
        self.conn.request("POST", "/v1/chat/completions", self.one, self.headers)
        resp = self.conn.getresponse()
        resp.read()
        elapsed = time.perf_counter() - begin
        assert resp.status == 200, resp.status
        return elapsed

    def ttft(self) -> float:
        begin = time.perf_counter()
        self.conn.request("POST", "/v1/chat/completions", self.streamed, self.headers)
        resp = self.conn.getresponse()
        assert resp.status == 200, resp.status
        first = None
        while True:
            line = resp.readline()
            if not line:
                break
            if first is None and line.startswith(b"data: ") and b'"content"' in line:
                first = time.perf_counter() - begin
        assert first is not None
        return first


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def interleaved(ports: dict[str, int], runs: int, measure: Callable[[Client], float]
                ) -> dict[str, list[float]]:
    clients = {label: Client(port) for label, port in ports.items()}
    for client in clients.values():  # warm up each path
        for _ in range(5):
            measure(client)
    out: dict[str, list[float]] = {label: [] for label in ports}
    for _ in range(runs):
        for label, client in clients.items():
            out[label].append(measure(client))
    return out


async def stream_round(port: int, streams: int, tokens: int) -> float:
    """Tokens per second of ``streams`` concurrent streams (aiohttp client)."""
    import aiohttp

    body = chat_body(tokens, True)
    url = f"http://127.0.0.1:{port}/v1/chat/completions"
    connector = aiohttp.TCPConnector(limit=0)
    async with aiohttp.ClientSession(connector=connector,
                                     timeout=aiohttp.ClientTimeout(total=600)) as session:

        async def one() -> int:
            count = 0
            async with session.post(url, data=body,
                                    headers={"Content-Type": "application/json"}) as resp:
                assert resp.status == 200, resp.status
                async for line in resp.content:
                    if line.startswith(b"data: ") and b'"content"' in line:
                        count += 1
            return count

        begin = time.perf_counter()
        counts = await asyncio.gather(*(one() for _ in range(streams)))
        elapsed = time.perf_counter() - begin
    return sum(counts) / elapsed


def start_gateway(home: Path, env: dict[str, str]) -> tuple[subprocess.Popen[bytes], int]:
    port = free_port()
    proc = subprocess.Popen([*cli_cmd(), "gateway", "--port", str(port), "--idle-timeout", "0"],
                            env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            start_new_session=True)
    wait_health(port, proc, 60)
    return proc, port


def start_router(router: str, upstream: int) -> tuple[subprocess.Popen[bytes], int]:
    port = free_port()
    proc = subprocess.Popen([router, "--host", "127.0.0.1", "--port", str(port),
                             "--worker-urls", f"http://127.0.0.1:{upstream}",
                             "--policy", "round_robin", "--prometheus-port", str(free_port()),
                             "--log-level", "warning"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            start_new_session=True)
    wait_health(port, proc, 120)
    return proc, port


def report(ports: dict[str, int], args: argparse.Namespace) -> None:
    lat = interleaved(ports, args.requests, Client.latency)
    ttft = interleaved(ports, args.ttft_runs, Client.ttft)
    rates: dict[str, list[float]] = {label: [] for label in ports}
    for _ in range(args.rounds):
        for label, port in ports.items():
            rates[label].append(asyncio.run(stream_round(port, args.streams, 128)))
    d50, d99 = percentile(lat["direct"], 0.5), percentile(lat["direct"], 0.99)
    t50 = percentile(ttft["direct"], 0.5)
    rate = statistics.median(rates["direct"])
    print(f"\n{'path':<22} {'p50 ms':>8} {'p99 ms':>8} {'+p50 ms':>8} {'+p99 ms':>8} "
          f"{'TTFT ms':>8} {'+TTFT ms':>8} {'tok/s @' + str(args.streams):>11} {'% direct':>9}")
    for label in ports:
        p50, p99 = percentile(lat[label], 0.5), percentile(lat[label], 0.99)
        f50 = percentile(ttft[label], 0.5)
        r = statistics.median(rates[label])
        print(f"{label:<22} {p50 * 1e3:8.2f} {p99 * 1e3:8.2f} {(p50 - d50) * 1e3:8.2f} "
              f"{(p99 - d99) * 1e3:8.2f} {f50 * 1e3:8.2f} {(f50 - t50) * 1e3:8.2f} "
              f"{r:11.0f} {100 * r / rate:8.1f}%")
    print(f"\n({args.requests} sequential 1-token requests per path, interleaved; TTFT p50 of "
          f"{args.ttft_runs} streams of 16 tokens; tok/s median of {args.rounds} rounds of "
          f"{args.streams} streams x 128 tokens)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", help="model directory (default: make the tiny model)")
    parser.add_argument("--requests", type=int, default=300)
    parser.add_argument("--ttft-runs", type=int, default=50)
    parser.add_argument("--streams", type=int, default=64)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--router", default=shutil.which("vllm-router"),
                        help="vllm-router binary to compare (default: on PATH, if any)")
    args = parser.parse_args()
    print(machine())
    with tempfile.TemporaryDirectory(prefix="bench-gateway-") as tmp:
        home = Path(tmp)
        model = args.model
        if model is None:
            from tests.tiny_model import make_tiny_model

            model = str(make_tiny_model(home / "tiny-model"))
        env = {**os.environ, "CMW_VLLM_HOME": str(home / "state"), "HF_HOME": str(home / "hf"),
               "VLLM_CPU_KVCACHE_SPACE": os.environ.get("VLLM_CPU_KVCACHE_SPACE", "1")}
        env.pop("VLLM_API_KEY", None)
        env.pop("CMW_VLLM_GATEWAY_API_KEYS", None)
        vllm_port = free_port()
        subprocess.run([*cli_cmd(), "start", model, "--name", MODEL, "--port", str(vllm_port),
                        "--max-model-len", "1024", "--timeout", "900"],
                       env=env, check=True, stdout=subprocess.DEVNULL)
        procs: list[subprocess.Popen[bytes]] = []
        try:
            gateway, gw_port = start_gateway(home, env)
            procs.append(gateway)
            ports = {"direct": vllm_port, "cmw-vllm gateway": gw_port}
            if args.router:
                router, router_port = start_router(args.router, vllm_port)
                procs.append(router)
                ports["vllm-router (Rust)"] = router_port
            else:
                print("vllm-router: not found (pass --router PATH)")
            report(ports, args)
        finally:
            for proc in procs:
                proc.send_signal(signal.SIGTERM)
                try:
                    proc.wait(30)
                except subprocess.TimeoutExpired:
                    proc.kill()
            subprocess.run([*cli_cmd(), "stop", "--all"], env=env, check=False,
                           stdout=subprocess.DEVNULL)


if __name__ == "__main__":
    main()
