"""The dashboard's speed: ``GET /api/state`` with 20 servers, and the page's first paint.

    .venv/bin/python bench/bench_dashboard.py [--servers 20] [--requests 300] [--loads 5]

A gateway runs in this process (its own event loop in a thread, on loopback, with an admin
key) with ``--servers`` servers in its routing table, each with two minutes of load samples,
and two simulated GPUs; no vLLM runs (the figures are the gateway's own work). Figures:

- ``/api/state``: p50 and p99 of sequential requests over one keep-alive connection, and the
  size of the answer (goal: p99 under 20 ms);
- first paint: Debian's chromium (headless, through Playwright) loads ``/ui/`` with the key
  in an ``Authorization`` header, as a reverse proxy would add it; the median over
  ``--loads`` fresh pages of the first contentful paint and of the time until every server's
  row is on the page (goal: under 1 s). Skipped with a message when chromium or playwright
  is missing.

Figures, not pass/fail.
"""

from __future__ import annotations

import argparse
import asyncio
import http.client
import os
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from bench.bench_cli import machine  # noqa: E402
from bench.bench_lifecycle import free_port  # noqa: E402

ADMIN = "bench-admin-key-0123456789abcdef"
CHROMIUM = Path("/usr/bin/chromium")
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync", "--no-first-run"]
GiB = 1024**3


class Gateway:
    """A gateway app served from a thread, with ``servers`` made-up servers."""

    def __init__(self, servers: int) -> None:
        from aiohttp import web

        from cmw_vllm.gateway.control import CONTROL_KEY, Load
        from cmw_vllm.gateway.edge import EdgeRunner
        from cmw_vllm.gateway.metrics import Metrics
        from cmw_vllm.gateway.pool import Backend, Pool
        from cmw_vllm.gateway.proxy import build_app
        from cmw_vllm.gateway.settings import GatewaySettings

        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        settings = GatewaySettings(port=self.port, health_interval=3600,
                                   admin_keys=frozenset({ADMIN}))
        self.loop = asyncio.new_event_loop()
        ready = threading.Event()

        def run() -> None:
            asyncio.set_event_loop(self.loop)
            pool = Pool(settings, Metrics())
            app = build_app(settings, pool)
            self.runner = EdgeRunner(app, shutdown_timeout=1.0)
            self.loop.run_until_complete(self.runner.setup())
            self.loop.run_until_complete(web.TCPSite(self.runner, "127.0.0.1",
                                                     self.port).start())
            control = app[CONTROL_KEY]
            self.loop.run_until_complete(pool.refresh())  # the registry's entries

            async def no_scan() -> None:  # the made-up servers have no records to scan
                return None

            pool.refresh = no_scan  # type: ignore[method-assign]
            for i in range(servers):
                name = f"model-{i:02d}"
                # Unreachable ports: their load scrapes fail at once, as a busy server's may.
                pool.backends[name] = Backend(name, f"http://127.0.0.1:{1 + i}",
                                              (f"org/{name}", name), owned=False, pid=1,
                                              ttl=600.0)
                load = Load()
                for t in range(61):
                    load.add(float(t * 2), 3, 1, 0.4, float(t * 100 + (t % 7) * 13))
                control.loads[name] = load
            pool._reindex()
            control.gpus = {"available": True, "reason": None, "devices": [
                {"index": g, "name": "NVIDIA H100", "uuid": f"GPU-{g}",
                 "memory_total": 80 * GiB, "memory_used": 60 * GiB, "memory_free": 20 * GiB,
                 "servers": {f"model-{i:02d}": 5 * GiB for i in range(g, servers, 2)
                             if i < 22},
                 "other": GiB, "utilization": 50} for g in range(2)]}
            control.server_gpus = {f"model-{i:02d}": [{"index": i % 2, "memory": 5 * GiB}]
                                   for i in range(servers)}
            control._sampled_at = time.monotonic() + 10**6  # keep the made-up figures
            ready.set()
            self.loop.run_forever()

        self.thread = threading.Thread(target=run, daemon=True)
        self.thread.start()
        if not ready.wait(30):
            raise SystemExit("the gateway did not start")

    def close(self) -> None:
        asyncio.run_coroutine_threadsafe(self.runner.cleanup(), self.loop).result(30)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(10)


def bench_state(gw: Gateway, requests: int) -> dict[str, Any]:
    conn = http.client.HTTPConnection("127.0.0.1", gw.port, timeout=10)
    headers = {"Authorization": f"Bearer {ADMIN}"}
    times = []
    size = 0
    for i in range(requests + 10):
        begin = time.perf_counter()
        conn.request("GET", "/api/state", headers=headers)
        resp = conn.getresponse()
        body = resp.read()
        took = time.perf_counter() - begin
        if resp.status != 200:
            raise SystemExit(f"/api/state answered {resp.status}: {body[:200]!r}")
        if i >= 10:  # warm-up left out
            times.append(took * 1000)
        size = len(body)
    conn.close()
    times.sort()
    return {"p50": statistics.median(times), "p99": times[int(len(times) * 0.99) - 1],
            "bytes": size}


def bench_paint(gw: Gateway, loads: int, servers: int) -> dict[str, Any] | str:
    if not CHROMIUM.exists():
        return f"skipped: {CHROMIUM} is missing (apt-get install -y chromium)"
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        return "skipped: the playwright package is missing (pip install -e '.[test]')"
    paints, readies = [], []
    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS)
        try:
            for _ in range(loads):
                context = browser.new_context(
                    extra_http_headers={"Authorization": f"Bearer {ADMIN}"},
                    viewport={"width": 1280, "height": 900})
                page = context.new_page()
                page.goto(f"{gw.url}/ui/", wait_until="commit")
                page.locator(".model").nth(servers - 1).wait_for(timeout=10_000)
                ready = page.evaluate("performance.now()")
                paint = page.evaluate(
                    "(performance.getEntriesByName('first-contentful-paint')[0] || "
                    "{startTime: null}).startTime")
                readies.append(ready)
                if paint is not None:
                    paints.append(paint)
                context.close()
        finally:
            browser.close()
    return {"first_paint_ms": statistics.median(paints) if paints else None,
            "rows_ms": statistics.median(readies), "loads": loads}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--servers", type=int, default=20)
    parser.add_argument("--requests", type=int, default=300)
    parser.add_argument("--loads", type=int, default=5)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="cmw-bench-dash-") as home:
        os.environ["CMW_VLLM_HOME"] = home
        gw = Gateway(args.servers)
        try:
            state = bench_state(gw, args.requests)
            paint = bench_paint(gw, args.loads, args.servers)
        finally:
            gw.close()
    print(f"machine: {machine()}")
    print(f"| figure ({args.servers} servers) | value | goal |")
    print("|---|---|---|")
    print(f"| GET /api/state p50 | {state['p50']:.2f} ms | |")
    print(f"| GET /api/state p99 | {state['p99']:.2f} ms | < 20 ms |")
    print(f"| GET /api/state size | {state['bytes'] / 1024:.1f} KiB | |")
    if isinstance(paint, str):
        print(f"| page first paint | {paint} | < 1 s |")
    else:
        fcp = paint["first_paint_ms"]
        print(f"| page first contentful paint (median of {paint['loads']}) | "
              f"{'-' if fcp is None else f'{fcp:.0f} ms'} | < 1 s |")
        print(f"| page: every server's row shown (median of {paint['loads']}) | "
              f"{paint['rows_ms']:.0f} ms | < 1 s |")


if __name__ == "__main__":
    main()
