"""GPU stand-in for vLLM's API server: a ``VLLM::EngineCore`` child holds real GPU memory.

The child allocates ``GPU_GIB`` GiB on cuda:0 with torch and sleeps (without ``GPU_GIB``,
``--gpu-memory-utilization`` of the GPU's total, as vLLM takes its share; else 4 GiB); this
process then answers ``/health``, ``/v1/models``, ``/version`` and ``/metrics``. SIGTERM ends
both. SIGKILL of this process leaves the child holding its memory, as vLLM's EngineCore
does after its API server is killed.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

ENGINE_CODE = (
    "import torch, time\n"
    "x = torch.empty(int({gib} * 2**30), dtype=torch.uint8, device='cuda')\n"
    "torch.cuda.synchronize()\n"
    "print('ALLOCATED', flush=True)\n"
    "time.sleep(86400)\n"
)
SHARE_CODE = (
    "import torch, time\n"
    "x = torch.empty(int({share} * torch.cuda.mem_get_info()[1]), dtype=torch.uint8, "
    "device='cuda')\n"
    "torch.cuda.synchronize()\n"
    "print('ALLOCATED', flush=True)\n"
    "time.sleep(86400)\n"
)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--model")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8000)
    parser.add_argument("--served-model-name")
    parser.add_argument("--gpu-memory-utilization", type=float)
    args, _unknown = parser.parse_known_args(argv)
    gib = float(os.environ.get("GPU_GIB", "4"))
    share = args.gpu_memory_utilization
    code = (SHARE_CODE.format(share=share) if share and not os.environ.get("GPU_GIB")
            else ENGINE_CODE.format(gib=gib))
    print(f"INFO Starting to load model {args.model}...", flush=True)
    # argv[0] is the title (as setproctitle makes it); hand the import paths on.
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(p for p in sys.path if p))
    engine = subprocess.Popen(["VLLM::EngineCore", "-c", code],
                              executable=sys.executable, stdout=subprocess.PIPE, text=True,
                              env=env)
    assert engine.stdout is not None
    if "ALLOCATED" not in engine.stdout.readline():
        print("RuntimeError: Engine core initialization failed. See root cause above.",
              flush=True)
        sys.exit(1)
    print("INFO Loading weights took 0.10 seconds", flush=True)
    print("INFO GPU KV cache size: 100,000 tokens", flush=True)
    served = args.served_model_name or args.model
    models = {"object": "list",
              "data": [{"id": served, "object": "model", "max_model_len": 512}]}
    bodies = {"/health": b"", "/version": b'{"version":"0.32.0"}',
              "/v1/models": json.dumps(models).encode(),
              "/metrics": b'vllm:num_requests_running{model_name="x"} 0.0\n'}

    class Handler(BaseHTTPRequestHandler):
        def log_message(self, *_: Any) -> None:
            pass

        def do_GET(self) -> None:  # noqa: N802 (http.server's name)
            body = bodies.get(self.path)
            self.send_response(200 if body is not None else 404)
            self.send_header("Content-Length", str(len(body or b"")))
            self.end_headers()
            self.wfile.write(body or b"")

    server = ThreadingHTTPServer((args.host, args.port), Handler)

    stopping = [False]

    def term(*_: Any) -> None:
        # A second SIGTERM may run this again inside engine.wait(): it must return at once
        # (Popen.wait holds a lock a nested wait() would wait for forever).
        if stopping[0]:
            return
        stopping[0] = True
        engine.terminate()
        engine.wait()
        os._exit(0)

    signal.signal(signal.SIGTERM, term)
    print("INFO:     Application startup complete.", file=sys.stderr, flush=True)
    server.serve_forever()


if __name__ == "__main__":
    main()
