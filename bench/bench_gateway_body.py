"""What finding a request's ``model`` costs the gateway, per kind of body.

    .venv/bin/python bench/bench_gateway_body.py

Times ``cmw_vllm.gateway.body`` (the JSON check and parse on the event loop for small
bodies, the scan a worker thread runs for big ones, the multipart split) beside what the
gateway did before (json.loads of the whole body; a regular expression over a multipart
body), on the same bodies. Then sends big bodies to a gateway in this process (no server
behind it, an empty state dir) and probes its ``/health`` meanwhile: the slowest answer is
how long the body held the event loop. Figures, not pass/fail; the best of several runs.
"""

from __future__ import annotations

import json
import os
import re
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from cmw_vllm.gateway.body import json_model, multipart_model, scan_json_model  # noqa: E402

OLD_MULTIPART = re.compile(rb'name="model"\r\n(?:[^\r\n]+\r\n)*\r\n([^\r\n]{1,512})\r\n')
FORM = "multipart/form-data; boundary=XyZ"


def best(func: Callable[[], Any], budget: float = 2.0) -> float:
    """Seconds per call: the best of repeated batches within about ``budget`` seconds."""
    began = time.perf_counter()
    func()
    once = max(time.perf_counter() - began, 1e-7)
    number = max(1, int(0.1 / once))
    results = []
    deadline = time.perf_counter() + budget
    while not results or (time.perf_counter() < deadline and len(results) < 7):
        start = time.perf_counter()
        for _ in range(number):
            func()
        results.append((time.perf_counter() - start) / number)
    return min(results)


def show(label: str, size: int, seconds: float) -> None:
    per = f"{seconds * 1e6:.2f} us" if seconds < 1e-3 else f"{seconds * 1e3:.1f} ms"
    print(f"| {label} | {size / 1e6:.3f} MB | {per} |")


def main() -> None:
    chat = json.dumps({"model": "tiny", "messages": [{"role": "user", "content": "Hi"}],
                       "max_tokens": 1}).encode()
    image = json.dumps({"messages": [{"role": "user", "content": [
        {"type": "image_url", "image_url": {"url": "data:image/png;base64," + "QUJD" * 8_000_000}},
        {"type": "text", "text": "what is it?"}]}], "model": "tiny"}).encode()
    history = json.dumps({"messages": [{"role": "user", "content": "x" * 200}] * 100_000,
                          "model": "tiny"}).encode()
    dense = b'{"a": [' + b"[]," * 5_000_000 + b'[]], "model": "tiny"}'
    attack = b'name="model"\r\n' * 4_000
    print("| body | size | time |")
    print("|---|---|---|")
    show("chat, json.loads (before)", len(chat), best(lambda: json.loads(chat).get("model")))
    show("chat, json_model (now, on the loop)", len(chat), best(lambda: json_model(chat)))
    for label, body in (("32 MB image, base64", image), ("100k messages", history),
                        ("5 M empty arrays", dense)):
        show(f"{label}, json.loads (before, on the loop)", len(body),
             best(lambda b=body: json.loads(b).get("model")))
        show(f"{label}, scan (now, in a thread)", len(body),
             best(lambda b=body: scan_json_model(b)))
    show("multipart attack, regex (before, on the loop)", len(attack),
         best(lambda: OLD_MULTIPART.search(attack)))
    show("multipart attack, split (now)", len(attack),
         best(lambda: multipart_model(attack, FORM)))


def loop_lag() -> None:
    """The slowest /health answer while each big body is read."""
    os.environ["CMW_VLLM_HOME"] = tempfile.mkdtemp(prefix="bench-body-")
    import requests

    from bench.bench_lifecycle import free_port
    from cmw_vllm.gateway.settings import GatewaySettings
    from tests.gateway_harness import GatewayThread

    parts = b"".join(b'--XyZ\r\nContent-Disposition: form-data; name="model"\r\n\r\nm\r\n'
                     for _ in range(1_000_000)) + b"--XyZ--"
    bodies = {"30 MB of empty arrays": (b'{"a": [' + b"[]," * 10_000_000 + b'[]], "model": "x"}',
                                        "application/json"),
              "58 MB form of 1 M parts": (parts, FORM)}
    gateway = GatewayThread(GatewaySettings(port=free_port()))
    probe = requests.Session()
    try:
        print("\n| body | answer | slowest /health |\n|---|---|---|")
        for label, (body, content_type) in bodies.items():
            answers: list[int] = []
            sender = threading.Thread(target=lambda b=body, c=content_type, a=answers: a.append(
                requests.post(gateway.url + "/v1/chat/completions", data=b, timeout=300,
                              headers={"Content-Type": c}).status_code))
            sender.start()
            slowest = 0.0
            while sender.is_alive():
                began = time.perf_counter()
                probe.get(gateway.url + "/health", timeout=60)
                slowest = max(slowest, time.perf_counter() - began)
            sender.join()
            print(f"| {label} | {answers[0]} | {slowest * 1e3:.0f} ms |")
    finally:
        gateway.close()


if __name__ == "__main__":
    main()
    loop_lag()
