"""What the gateway adds in front of real vLLM: latency, time to first token, throughput.

    CMW_VLLM_PYTHON=.venv-vllm/bin/python .venv/bin/python bench/bench_gateway.py \\
        [--requests 300] [--streams 64] [--rounds 9] [--router PATH/TO/vllm-router]
        [--baseline OTHER/CHECKOUT]

One tiny random-model vLLM server (tests/tiny_model.py, CPU build unless CMW_VLLM_PYTHON
points elsewhere) is started once; `cmw-vllm gateway` runs in front of it (a separate
process, as users run it) and, with --router, vllm-router (Rust) too. Each figure compares
the same requests sent directly and through each proxy, interleaved:

- added latency: p50 and p99 of sequential non-streamed chat requests of 1 token, proxy
  minus direct (keep-alive connection, one request at a time);
- TTFT overhead: p50 of the time to the first streamed token, proxy minus direct;
- tokens/s at N concurrent streams (each 128 tokens, ignore_eos), proxy / direct, in
  rounds that take the paths in turn (each round starts with another path); a line per
  round shows each proxy's share of the direct figure, so the noise is in plain sight,
  and the table gives the median of those shares and their range;
- CPU per request and per streamed token of each proxy process (its own CPU time, from
  /proc: unlike latency, this hardly moves when the machine is busy);
- client disconnect: a stream of --disconnect-tokens is closed by the client after its first
  token; the time until vLLM's ``num_requests_running`` is 0 again, and the tokens vLLM
  made after the close (from its ``generation_tokens_total``). Direct, that is vLLM's own
  abort; through a proxy, what the proxy adds before vLLM sees the client gone.
Figures, not pass/fail. The table is printed in Markdown, as in docs/performance.md. Takes about
three minutes after the server is up.
"""

from __future__ import annotations

import argparse
import asyncio
import http.client
import json
import os
import shutil
import signal
import socket
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
from cmw_vllm.health_check import scrape_metrics  # noqa: E402

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


def cpu_seconds(pid: int) -> float:
    """CPU time of a process so far, all threads (ns-exact from /proc where there is one)."""
    tasks = Path(f"/proc/{pid}/task")
    if tasks.is_dir():
        total = 0
        for task in tasks.iterdir():
            try:
                total += int((task / "schedstat").read_text().split()[0])
            except (OSError, ValueError, IndexError):
                continue  # a thread that ended meanwhile
        return total / 1e9
    import psutil

    times = psutil.Process(pid).cpu_times()
    return times.user + times.system


class Route:
    """One way to the server: its port and the pid of the proxy on it (None: direct)."""

    def __init__(self, label: str, port: int, pid: int | None) -> None:
        self.label, self.port, self.pid = label, port, pid
        self.cpu = 0.0  # seconds of the proxy's CPU while measured

    def cpu_now(self) -> float:
        return cpu_seconds(self.pid) if self.pid is not None else 0.0


def interleaved(paths: list[Route], runs: int, measure: Callable[[Client], float]
                ) -> dict[str, list[float]]:
    """``runs`` measurements per path, one path after the other; CPU added to each path."""
    clients = {p.label: Client(p.port) for p in paths}
    for client in clients.values():  # warm up each path
        for _ in range(5):
            measure(client)
    out: dict[str, list[float]] = {p.label: [] for p in paths}
    for path in paths:
        path.cpu = 0.0
    for _ in range(runs):
        for path in paths:
            before = path.cpu_now()
            out[path.label].append(measure(clients[path.label]))
            path.cpu += path.cpu_now() - before
    return out


async def stream_round(port: int, streams: int, tokens: int) -> tuple[float, int, list[int]]:
    """Tokens per second of ``streams`` concurrent streams (aiohttp client), the tokens,
    and the status of each stream that did not answer 200."""
    import aiohttp

    body = chat_body(tokens, True)
    url = f"http://127.0.0.1:{port}/v1/chat/completions"
    connector = aiohttp.TCPConnector(limit=0)
    async with aiohttp.ClientSession(connector=connector,
                                     timeout=aiohttp.ClientTimeout(total=600)) as session:

        failed: list[int] = []

        async def one() -> int:
            count = 0
            async with session.post(url, data=body,
                                    headers={"Content-Type": "application/json"}) as resp:
                if resp.status != 200:
                    failed.append(resp.status)
                    return 0
                async for line in resp.content:
                    if line.startswith(b"data: ") and b'"content"' in line:
                        count += 1
            return count

        begin = time.perf_counter()
        counts = await asyncio.gather(*(one() for _ in range(streams)))
        elapsed = time.perf_counter() - begin
    return sum(counts) / elapsed, sum(counts), failed


def stream_rounds(paths: list[Route], args: argparse.Namespace
                  ) -> tuple[dict[str, list[float]], dict[str, float]]:
    """Tokens/s per path and round, the paths in a new order each round (a path never
    always goes first); and each proxy's CPU seconds per streamed token."""
    for path in paths:  # warm up: the first streams after a pause are slower
        asyncio.run(stream_round(path.port, args.streams, 16))
    rates: dict[str, list[float]] = {p.label: [] for p in paths}
    cpu: dict[str, float] = dict.fromkeys(rates, 0.0)
    tokens: dict[str, int] = dict.fromkeys(rates, 0)
    errors: dict[str, list[int]] = {label: [] for label in rates}
    for n in range(args.rounds):
        shift = n % len(paths)
        for path in paths[shift:] + paths[:shift]:
            before = path.cpu_now()
            rate, count, failed = asyncio.run(stream_round(path.port, args.streams,
                                                           args.tokens))
            cpu[path.label] += path.cpu_now() - before
            if failed:
                errors[path.label] += failed
            tokens[path.label] += count
            rates[path.label].append(rate)
        direct = rates[paths[0].label][-1]
        print(f"round {n + 1}: " + ", ".join(
            f"{p.label} {rates[p.label][-1]:.0f} tok/s"
            + (f" ({100 * rates[p.label][-1] / direct:.1f} %)" if p is not paths[0] else "")
            for p in paths), flush=True)
    for label, codes in errors.items():
        if codes:
            print(f"{label}: {len(codes)} streams failed (HTTP {sorted(set(codes))})")
    return rates, {label: cpu[label] / max(tokens[label], 1) for label in rates}


def report(paths: list[Route], args: argparse.Namespace) -> None:
    """Measure every path and print the table (Markdown, as in docs/performance.md)."""
    lat = interleaved(paths, args.requests, Client.latency)
    cpu_req = {p.label: p.cpu / args.requests for p in paths}
    ttft = interleaved(paths, args.ttft_runs, Client.ttft)
    rates, cpu_tok = stream_rounds(paths, args)
    direct = paths[0].label
    d50, d99 = percentile(lat[direct], 0.5), percentile(lat[direct], 0.99)
    t50 = percentile(ttft[direct], 0.5)
    print(f"\n{machine()}; load average {' '.join(f'{x:.2f}' for x in os.getloadavg())}\n")
    print(f"| path | p50 ms | p99 ms | added p50 | added p99 | TTFT p50 | added TTFT "
          f"| tok/s, {args.streams} streams | of direct (range) | CPU µs/request "
          f"| CPU µs/token |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for path in paths:
        label = path.label
        p50, p99 = percentile(lat[label], 0.5), percentile(lat[label], 0.99)
        f50 = percentile(ttft[label], 0.5)
        rate = statistics.median(rates[label])
        if path.pid is None:
            print(f"| {label} | {p50 * 1e3:.2f} | {p99 * 1e3:.2f} | | | {f50 * 1e3:.2f} | "
                  f"| {rate:.0f} | 100 % | | |")
            continue
        # The share of direct is taken round by round (the two ran seconds apart), so
        # that the server's own drift between rounds does not count as the proxy's.
        shares = [100 * r / d for r, d in zip(rates[label], rates[direct], strict=True)]
        print(f"| {label} | {p50 * 1e3:.2f} | {p99 * 1e3:.2f} | {(p50 - d50) * 1e3:+.2f} "
              f"| {(p99 - d99) * 1e3:+.2f} | {f50 * 1e3:.2f} | {(f50 - t50) * 1e3:+.2f} "
              f"| {rate:.0f} | {statistics.median(shares):.1f} % "
              f"({min(shares):.1f}-{max(shares):.1f}) | {cpu_req[label] * 1e6:.0f} "
              f"| {cpu_tok[label] * 1e6:.1f} |")
    print(f"\n({args.requests} sequential 1-token requests per path, interleaved; TTFT p50 of "
          f"{args.ttft_runs} streams of 16 tokens; tok/s median of {args.rounds} rounds of "
          f"{args.streams} streams x {args.tokens} tokens, the paths in turn; share of direct: "
          f"median (range) of the rounds' ratios; CPU: the proxy process's own, per "
          f"sequential request and per streamed token)")


def disconnect_once(port: int, vllm_port: int, tokens: int) -> tuple[float, float]:
    """Close a stream after its first token: (seconds until vLLM runs no request, tokens
    vLLM made after the close)."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=120)
    conn.request("POST", "/v1/chat/completions", chat_body(tokens, True),
                 {"Content-Type": "application/json"})
    resp = conn.getresponse()
    assert resp.status == 200, resp.status
    while True:
        line = resp.readline()
        if not line:
            raise SystemExit("a stream ended before its first token")
        if line.startswith(b"data: ") and b'"content"' in line:
            break
    metrics = f"http://127.0.0.1:{vllm_port}"
    before = scrape_metrics(metrics, timeout=30).generation_tokens or 0.0
    closed = time.perf_counter()
    assert conn.sock is not None
    conn.sock.shutdown(socket.SHUT_RDWR)
    resp.close()
    conn.close()
    while True:
        snap = scrape_metrics(metrics, timeout=30)
        if snap.requests_running == 0:
            return time.perf_counter() - closed, (snap.generation_tokens or 0.0) - before
        if time.perf_counter() - closed > 120:
            raise SystemExit("vLLM still ran the request 120 s after the client left")
        time.sleep(0.005)


def report_disconnects(paths: list[Route], vllm_port: int, args: argparse.Namespace) -> None:
    """The client-disconnect table: each path in turn, ``args.disconnects`` times."""
    seconds: dict[str, list[float]] = {p.label: [] for p in paths}
    made: dict[str, list[float]] = {p.label: [] for p in paths}
    for _ in range(args.disconnects):
        for path in paths:
            took, tokens = disconnect_once(path.port, vllm_port, args.disconnect_tokens)
            seconds[path.label].append(took)
            made[path.label].append(tokens)
    direct = statistics.median(seconds[paths[0].label])
    print("\n| path | client gone to vLLM idle, p50 ms | max ms | added p50 "
          "| tokens made after the close, p50 (max) |")
    print("|---|---|---|---|---|")
    for path in paths:
        label = path.label
        p50 = statistics.median(seconds[label])
        added = "" if path.pid is None else f"{(p50 - direct) * 1e3:+.1f}"
        print(f"| {label} | {p50 * 1e3:.1f} | {max(seconds[label]) * 1e3:.1f} | {added} "
              f"| {statistics.median(made[label]):.0f} ({max(made[label]):.0f}) |")
    print(f"\n({args.disconnects} streams of {args.disconnect_tokens} tokens per path, "
          f"closed after the first token; vLLM's /metrics polled every 5 ms)")


def start_gateway(home: Path, env: dict[str, str], checkout: str | None = None
                  ) -> tuple[subprocess.Popen[bytes], int]:
    port = free_port()
    if checkout:  # another checkout's gateway: its package first on the path
        env = {**env, "PYTHONPATH": os.pathsep.join(
            [str(Path(checkout).resolve()), *filter(None, [env.get("PYTHONPATH")])])}
    name = "gateway-baseline" if checkout else "gateway"
    proc = subprocess.Popen([*cli_cmd(), "gateway", "--name", name, "--port", str(port),
                             "--idle-timeout", "0"],
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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", help="model directory (default: make the tiny model)")
    parser.add_argument("--requests", type=int, default=300)
    parser.add_argument("--ttft-runs", type=int, default=50)
    parser.add_argument("--streams", type=int, default=64)
    parser.add_argument("--rounds", type=int, default=9)
    parser.add_argument("--tokens", type=int, default=128, help="tokens per stream")
    parser.add_argument("--disconnects", type=int, default=20,
                        help="client disconnects per path (0: none)")
    parser.add_argument("--disconnect-tokens", type=int, default=3500,
                        help="tokens asked for in a stream the client closes")
    parser.add_argument("--baseline", metavar="CHECKOUT",
                        help="also run the gateway of another checkout of this repository "
                        "(e.g. `git worktree add /tmp/base main`), to compare in one run")
    parser.add_argument("--router", default=shutil.which("vllm-router"),
                        help="vllm-router binary to compare (default: on PATH, if any; "
                        "'' for none)")
    args = parser.parse_args()
    print(f"{machine()}; load average {' '.join(f'{x:.2f}' for x in os.getloadavg())}")
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
                        "--max-model-len", "4096", "--timeout", "900"],
                       env=env, check=True, stdout=subprocess.DEVNULL)
        procs: list[subprocess.Popen[bytes]] = []
        try:
            gateway, gw_port = start_gateway(home, env)
            procs.append(gateway)
            routes = [Route("direct", vllm_port, None),
                      Route("`cmw-vllm gateway`", gw_port, gateway.pid)]
            if args.baseline:
                base, base_port = start_gateway(home, env, args.baseline)
                procs.append(base)
                routes.append(Route("`cmw-vllm gateway` (baseline)", base_port, base.pid))
            if args.router:
                router, router_port = start_router(args.router, vllm_port)
                procs.append(router)
                routes.append(Route("vllm-router (Rust)", router_port, router.pid))
            else:
                print("vllm-router: not found (pass --router PATH)")
            report(routes, args)
            if args.disconnects:
                report_disconnects(routes, vllm_port, args)
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
