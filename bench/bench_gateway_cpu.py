"""The gateway's own CPU per proxied request, in front of a stand-in that answers at once.

    .venv/bin/python bench/bench_gateway_cpu.py [--requests 3000] [--router PATH/TO/vllm-router]
        [--checkout OTHER/CHECKOUT]

A stand-in server (keep-alive HTTP/1.1, a fixed chat answer with a length, as uvicorn sends
it) runs in a process of its own; the gateway (this checkout's ``build_app`` and edge, with
uvloop, the stand-in as its one server, nothing started or scanned) and, with --router,
vllm-router run in front of it. Requests are sent back to back on one keep-alive connection,
so only the proxies' own work is timed (bench_gateway.py measures them in front of real
vLLM, where each request also wakes the proxy from sleep). Prints p50 latency and the CPU
time per request of each proxy process, from /proc; figures, not pass/fail.
"""

from __future__ import annotations

import argparse
import asyncio
import http.client
import json
import os
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
# Nothing of cmw_vllm is imported before serve_gateway: it may run another checkout's.

MODEL = "tiny"
ANSWER = json.dumps({
    "id": "chatcmpl-0", "object": "chat.completion", "created": 1, "model": MODEL,
    "choices": [{"index": 0, "message": {"role": "assistant", "content": "hi"},
                 "finish_reason": "length"}],
    "usage": {"prompt_tokens": 3, "completion_tokens": 1, "total_tokens": 4}}).encode()
HEAD = (b"HTTP/1.1 200 OK\r\ndate: Sat, 05 Dec 2026 22:00:00 GMT\r\nserver: uvicorn\r\n"
        b"content-length: %d\r\ncontent-type: application/json\r\n\r\n" % len(ANSWER))


class StandIn(asyncio.Protocol):
    """Answers every request at once (a GET with an empty 200)."""

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport
        self.buffer = b""

    def data_received(self, data: bytes) -> None:
        self.buffer += data
        while (end := self.buffer.find(b"\r\n\r\n")) >= 0:
            head = self.buffer[:end].lower()
            length = 0
            for line in head.split(b"\r\n"):
                if line.startswith(b"content-length:"):
                    length = int(line[15:])
            if len(self.buffer) < end + 4 + length:
                return
            self.buffer = self.buffer[end + 4 + length:]
            self.transport.write(b"HTTP/1.1 200 OK\r\ncontent-length: 0\r\n\r\n"  # type: ignore[attr-defined]
                                 if head.startswith(b"get") else HEAD + ANSWER)


def serve_stand_in(port: int) -> None:
    async def run() -> None:
        loop = asyncio.get_running_loop()
        server = await loop.create_server(StandIn, "127.0.0.1", port)
        await server.serve_forever()

    import uvloop

    uvloop.run(run())


def serve_gateway(upstream: int, port: int, checkout: str | None) -> None:
    """The gateway with the stand-in as its only server (no records read, nothing started)."""
    if checkout:  # another checkout's gateway
        sys.path.insert(0, str(Path(checkout).resolve()))
    import uvloop

    import cmw_vllm
    from cmw_vllm.gateway.edge import serve
    from cmw_vllm.gateway.metrics import Metrics
    from cmw_vllm.gateway.pool import Backend, Pool
    from cmw_vllm.gateway.proxy import build_app
    from cmw_vllm.gateway.settings import GatewaySettings

    class FixedPool(Pool):
        async def refresh(self) -> None:
            if MODEL not in self.backends:
                self.backends[MODEL] = Backend(MODEL, f"http://127.0.0.1:{upstream}", (MODEL,),
                                               owned=False, pid=0, ttl=0)
                self._reindex()

        async def check_health(self) -> None:
            pass

    print(f"gateway from {Path(cmw_vllm.__file__).parent.parent}", flush=True)
    settings = GatewaySettings(port=port, idle_timeout=0)
    metrics = Metrics()
    app = build_app(settings, FixedPool(settings, metrics, manager=object()),  # type: ignore[arg-type]
                    metrics)
    serve(app, "127.0.0.1", port, lambda: None, loop=uvloop.new_event_loop())


def wait_up(port: int) -> None:
    for _ in range(300):
        try:
            conn = http.client.HTTPConnection("127.0.0.1", port, timeout=2)
            conn.request("GET", "/health")
            conn.getresponse().read()
            return
        except OSError:
            time.sleep(0.1)
    raise SystemExit(f"nothing answers on port {port}")


def measure(port: int, pid: int | None, requests: int) -> tuple[float, float]:
    """(p50 seconds, CPU seconds of ``pid`` per request) over ``requests`` sequential ones."""
    from bench.bench_gateway import cpu_seconds

    body = json.dumps({"model": MODEL, "messages": [{"role": "user", "content": "Hello"}],
                       "max_tokens": 1}).encode()
    headers = {"Content-Type": "application/json"}
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
    for _ in range(50):  # warm up
        conn.request("POST", "/v1/chat/completions", body, headers)
        conn.getresponse().read()
    times = []
    before = cpu_seconds(pid) if pid else 0.0
    for _ in range(requests):
        begin = time.perf_counter()
        conn.request("POST", "/v1/chat/completions", body, headers)
        reply = conn.getresponse()
        reply.read()
        times.append(time.perf_counter() - begin)
        assert reply.status == 200, reply.status
    cpu = (cpu_seconds(pid) - before) / requests if pid else 0.0
    return statistics.median(times), cpu


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=3000)
    parser.add_argument("--rounds", type=int, default=3, help="rounds over every path")
    parser.add_argument("--router", default=shutil.which("vllm-router"),
                        help="vllm-router binary to compare (default: on PATH, if any)")
    parser.add_argument("--checkout", help="run the gateway of another checkout of this "
                        "repository (e.g. `git worktree add /tmp/base main`)")
    parser.add_argument("--serve-stand-in", type=int, metavar="PORT", help=argparse.SUPPRESS)
    parser.add_argument("--serve-gateway", type=int, nargs=2, metavar=("UPSTREAM", "PORT"),
                        help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.serve_stand_in:
        return serve_stand_in(args.serve_stand_in)
    if args.serve_gateway:
        return serve_gateway(*args.serve_gateway, args.checkout)
    from bench.bench_cli import machine
    from bench.bench_lifecycle import free_port

    me = [sys.executable, str(Path(__file__).resolve())]
    up, gw = free_port(), free_port()
    procs = [subprocess.Popen([*me, "--serve-stand-in", str(up)])]
    try:
        wait_up(up)
        checkout = ["--checkout", args.checkout] if args.checkout else []
        procs.append(subprocess.Popen([*me, "--serve-gateway", str(up), str(gw), *checkout],
                                      stderr=subprocess.DEVNULL))
        paths = [("direct", up, None), ("`cmw-vllm gateway`", gw, procs[-1].pid)]
        if args.router:
            port = free_port()
            procs.append(subprocess.Popen(
                [args.router, "--host", "127.0.0.1", "--port", str(port), "--worker-urls",
                 f"http://127.0.0.1:{up}", "--policy", "round_robin", "--prometheus-port",
                 str(free_port()), "--log-level", "warning"],
                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))
            paths.append(("vllm-router (Rust)", port, procs[-1].pid))
        for _, port, _ in paths:
            wait_up(port)
        print(f"{machine()}; load average {' '.join(f'{x:.2f}' for x in os.getloadavg())}")
        print("\n| round | path | p50 ms | CPU µs/request |\n|---|---|---|---|")
        for n in range(args.rounds):
            for label, port, pid in paths:
                p50, cpu = measure(port, pid, args.requests)
                print(f"| {n + 1} | {label} | {p50 * 1e3:.3f} | "
                      f"{cpu * 1e6:.0f} |" if pid else f"| {n + 1} | {label} | "
                      f"{p50 * 1e3:.3f} | |", flush=True)
        print(f"\n({args.requests} sequential requests per path and round, back to back; "
              f"load average {' '.join(f'{x:.2f}' for x in os.getloadavg())} at the end)")
    finally:
        for proc in procs:
            proc.terminate()
        for proc in procs:
            try:
                proc.wait(10)
            except subprocess.TimeoutExpired:
                proc.kill()


if __name__ == "__main__":
    main()
