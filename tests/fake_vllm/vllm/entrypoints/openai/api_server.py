"""A stand-in for vLLM's OpenAI server, for fast lifecycle tests (run as ``vllm serve``).

It accepts the same command line shape, writes vLLM's start-up log lines, starts a child
process (like EngineCore) in its process group, and serves /health, /v1/models and a chat
completion. ``FAKE_VLLM_MODE`` picks a behaviour: ``ok`` (default), ``oom`` (dies during
start with vLLM's KV-cache message), ``ignore_term`` (ignores SIGTERM), ``die_after_ready``
(exits 3 shortly after being ready), ``exit0_after_ready`` (exits 0 then, like vLLM when
its engine dies), ``hang`` (accepts connections, never answers), ``hang_post`` (healthy,
but never answers a POST). A POST's answer echoes the ``Authorization`` and ``X-Api-Key``
headers it got (``seen_headers``), and the size and framing of the body it got (``seen_body``).
``FAKE_VLLM_DELAY`` is the load time in seconds, ``FAKE_VLLM_DIE_AFTER`` the seconds of
readiness before the ``*_after_ready`` exits, ``FAKE_VLLM_GEN_SECONDS`` how long one
completion takes (when set, each logs ``generating a completion`` once it is in flight).
Like vLLM, ``--shutdown-timeout N`` makes SIGTERM let completions in flight finish for up to
N seconds (new ones get 503) before it exits 0 (or ``FAKE_VLLM_TERM_EXIT``, to tell its
code from a default), and logs what vLLM 0.32's EngineCore logs on the way (``draining
in-flight requests`` when some were, then ``request processing complete``). Its EngineCore
then takes ``FAKE_VLLM_TEARDOWN`` seconds to exit (vLLM's teardown of its workers); the
server logs ``EngineCore exited with N`` (-9 when something SIGKILLed it meanwhile).
``FAKE_VLLM_LOAD`` is what /metrics says is running and waiting: ``R,W`` (default ``1,2``),
or ``live`` for the completions in flight and none waiting.
``FAKE_VLLM_ENGINE_SHM=1``: its EngineCore maps a file in /dev/shm (``psm_cmwfake_PID``,
logged as ``shared memory /dev/shm/...``) that its teardown removes and a SIGKILL leaves.
``FAKE_VLLM_SHM=1`` makes shared memory as vLLM does (a ``SharedMemory``, ``psm_*``, and a
multiprocessing lock, ``sem.mp-*``) and logs their /dev/shm names (``shared memory: psm_x
sem.mp-y``). It takes them off Python's resource tracker, which would remove them at a
normal exit, and after a SIGKILL only when it happened to outlive the others: so they are
left behind on every exit, and only cmw-vllm's clean-up removes them.
Like vLLM, ``--enable-lora`` with ``--lora-modules NAME=DIR ...`` serves LoRA adapters
(listed by /v1/models with their ``parent``; a request naming one is answered with
``model`` = its name, an unknown name gets 404), and with
``VLLM_ALLOW_RUNTIME_LORA_UPDATING=True`` in the environment ``/v1/load_lora_adapter``
(``{"lora_name", "lora_path"}``; the directory must hold ``adapter_config.json``) and
``/v1/unload_lora_adapter`` (``{"lora_name"}``) change them while it runs; each load and
unload is logged (``lora loaded NAME``, ``lora unloaded NAME``).
``FAKE_VLLM_ORPHAN=PATH`` leaves an orphan once ready: a grandchild whose parent exits at
once; re-parented, it writes ``PID PPID`` (as it sees them) to PATH and exits, so that its
new parent must reap it (PID 1 in a container, where cmw-vllm is that parent).
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer


def log(msg: str, level: str = "INFO", proc: str = "APIServer") -> None:
    """Write a line as vLLM does: ``(APIServer pid=1) INFO 11-26 02:07:01 [file.py:1] msg``."""
    stamp = time.strftime("%m-%d %H:%M:%S")
    sys.stderr.write(f"({proc} pid={os.getpid()}) {level} {stamp} [api_server.py:1] {msg}\n")
    sys.stderr.flush()


ORPHAN_CODE = """
import os, sys, time
parent = os.getpid()
if os.fork():
    os._exit(0)  # the orphan's parent exits at once
deadline = time.monotonic() + 30
while os.getppid() == parent and time.monotonic() < deadline:  # until re-parented
    time.sleep(0.01)
with open(sys.argv[1] + ".tmp", "w") as fh:
    fh.write(f"{os.getpid()} {os.getppid()}")
os.replace(sys.argv[1] + ".tmp", sys.argv[1])
"""


# With FAKE_VLLM_ENGINE_SHM=1, like vLLM's EngineCore and its message queues: a file in /dev/shm
# that it maps, and that its teardown removes (a SIGKILL leaves it behind).
ENGINE_SHM_CODE = """
import mmap, os
cleanup = lambda: None
if os.environ.get("FAKE_VLLM_ENGINE_SHM") == "1" and os.path.isdir("/dev/shm"):
    shm_path = f"/dev/shm/psm_cmwfake_{os.getpid()}"
    fd = os.open(shm_path, os.O_CREAT | os.O_RDWR, 0o600)
    os.ftruncate(fd, 4096)
    shm_map = mmap.mmap(fd, 4096)
    sys.stderr.write(f"(EngineCore pid={os.getpid()}) INFO shared memory {shm_path}\\n")
    sys.stderr.flush()
    def cleanup():
        try:
            os.unlink(shm_path)
        except OSError:
            pass
"""


def leave_orphan(path: str) -> None:
    """Start a process that forks and exits: its child is an orphan that exits soon after."""
    subprocess.run([sys.executable, "-c", ORPHAN_CODE, path], check=True)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="vllm serve")
    parser.add_argument("--model", required=True)
    parser.add_argument("--host", default="0.0.0.0")
    parser.add_argument("--port", type=int, default=8000)
    parser.add_argument("--max-model-len", type=int)
    parser.add_argument("--served-model-name", nargs="+")
    parser.add_argument("--dtype")
    parser.add_argument("--gpu-memory-utilization", type=float)
    parser.add_argument("--tensor-parallel-size", type=int)
    parser.add_argument("--kv-cache-memory-bytes")
    parser.add_argument("--max-num-seqs", type=int)
    parser.add_argument("--enforce-eager", action="store_true")
    parser.add_argument("--shutdown-timeout", type=int, default=0)
    parser.add_argument("--runner", choices=["auto", "draft", "generate", "pooling"])
    parser.add_argument("--convert", choices=["auto", "classify", "embed", "none"])
    parser.add_argument("--enable-lora", action="store_true")
    parser.add_argument("--max-lora-rank", type=int, default=16,
                        choices=[1, 8, 16, 32, 64, 128, 256, 320, 512])
    parser.add_argument("--max-loras", type=int, default=1)
    parser.add_argument("--lora-modules", nargs="+", default=[])
    args = parser.parse_args(argv)
    mode = os.environ.get("FAKE_VLLM_MODE", "ok")
    delay = float(os.environ.get("FAKE_VLLM_DELAY", "0.5"))
    if mode == "ignore_term":
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
    log(f"Starting to load model {args.model}...")
    # Like VLLM::EngineCore: a child in our process group that holds the model.
    child_code = "import signal,sys,time\n" + ENGINE_SHM_CODE
    if mode == "ignore_term":
        child_code += "signal.signal(signal.SIGTERM, signal.SIG_IGN)\n"
    else:
        teardown = float(os.environ.get("FAKE_VLLM_TEARDOWN", "0"))
        child_code += ("signal.signal(signal.SIGTERM, "
                       f"lambda *_: (time.sleep({teardown}), cleanup(), sys.exit(0)))\n")
    child_code += "time.sleep(3600)"
    # Titled like vLLM's (setproctitle): argv[0] is what `ps` and psutil show.
    engine = subprocess.Popen(["VLLM::EngineCore", "-c", child_code], executable=sys.executable)
    time.sleep(delay / 2)
    log("Loading weights took 0.01 seconds")
    if os.environ.get("FAKE_VLLM_SHM"):
        from multiprocessing import get_context, resource_tracker, shared_memory

        segment = shared_memory.SharedMemory(create=True, size=4096)
        lock = get_context("spawn").Lock()
        resource_tracker.unregister(segment._name, "shared_memory")  # type: ignore[attr-defined]
        resource_tracker.unregister(lock._semlock.name, "semaphore")
        held = (segment, lock)  # noqa: F841  (kept mapped while the server runs)
        log(f"shared memory: {segment.name} sem{lock._semlock.name.replace('/', '.')}")
    if mode == "oom":
        log("EngineCore failed to start.", "ERROR", "EngineCore")
        log("Traceback (most recent call last):", "ERROR", "EngineCore")
        log('  File "core.py", line 1, in run_engine_core', "ERROR", "EngineCore")
        log("ValueError: To serve at least one request with the models's max seq len (99999), "
            "(12.0 GiB KV cache is needed, which is larger than the available KV cache memory "
            "(1.0 GiB). Based on the available memory, the estimated maximum model length is "
            "8192. Try increasing `gpu_memory_utilization` or decreasing `max_model_len`",
            "ERROR", "EngineCore")
        sys.stderr.write("Traceback (most recent call last):\n  File \"entry.py\", line 1\n"
                         "RuntimeError: Engine core initialization failed. See root cause "
                         "above.\n")
        engine.kill()
        sys.exit(1)
    time.sleep(delay / 2)
    log("CPU KV cache size: 2,097,152 tokens, Maximum concurrency for 512 tokens: 4096.00x")
    served_names = args.served_model_name or [args.model]
    served = served_names[0]
    if args.lora_modules and not args.enable_lora:
        sys.stderr.write("error: --lora-modules needs --enable-lora\n")
        engine.kill()
        sys.exit(2)
    loras: dict[str, str] = {}
    for spec in args.lora_modules:
        lname, _sep, lpath = spec.partition("=")
        loras[lname] = lpath
        log(f"lora loaded {lname}")
    runtime_lora = os.environ.get("VLLM_ALLOW_RUNTIME_LORA_UPDATING", "").lower() in (
        "1", "true")
    counter = [0]  # completions served, for the token counters in /metrics
    in_flight = [0]
    # Set on SIGTERM; a plain flag, not an Event: the handler must take no lock (see on_term).
    draining = [False]
    gen_seconds = float(os.environ.get("FAKE_VLLM_GEN_SECONDS", "0"))

    class Handler(BaseHTTPRequestHandler):
        def log_message(self, *a: object) -> None:
            pass

        def _send(self, code: int, body: dict | None = None) -> None:
            data = json.dumps(body).encode() if body is not None else b""
            self.send_response(code)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def do_GET(self) -> None:  # noqa: N802
            if mode == "hang":
                time.sleep(3600)
            if self.path == "/health":
                self._send(200)
            elif self.path == "/v1/models":
                data = [{"id": n, "max_model_len": args.max_model_len, "parent": None}
                        for n in served_names]
                data += [{"id": n, "root": p, "parent": served, "max_model_len":
                          args.max_model_len} for n, p in list(loras.items())]
                self._send(200, {"object": "list", "data": data})
            elif self.path == "/metrics":
                label = f'{{model_name="{served}"}}'
                load = os.environ.get("FAKE_VLLM_LOAD", "1,2")
                running, waiting = (in_flight[0], 0) if load == "live" else load.split(",")
                text = (
                    f"vllm:num_requests_running{label} {float(running)}\n"
                    f"vllm:num_requests_waiting{label} {float(waiting)}\n"
                    f"vllm:kv_cache_usage_perc{label} 0.25\n"
                    f"vllm:prompt_tokens_total{label} {3 * counter[0]}.0\n"
                    f"vllm:generation_tokens_total{label} {counter[0]}.0\n"
                ).encode()
                self.send_response(200)
                self.send_header("Content-Type", "text/plain")
                self.send_header("Content-Length", str(len(text)))
                self.end_headers()
                self.wfile.write(text)
            elif self.path == "/version":
                self._send(200, {"version": "0.0.0-fake"})
            else:
                self._send(404, {"error": "not found"})

        def _stream(self, tokens: int, usage: bool = False) -> None:
            """An SSE answer of ``tokens`` chunks, as vLLM streams a chat (no length: the
            end of the stream is the end of the connection); with ``usage``
            (``stream_options.include_usage``) a last chunk with the token counts."""
            self.send_response(200)
            self.send_header("Content-Type", "text/event-stream")
            self.end_headers()
            for _ in range(tokens):
                self.wfile.write(b'data: {"choices":[{"delta":{"content":"hi"}}]}\n\n')
                self.wfile.flush()
            if usage:
                counts = {"prompt_tokens": 3, "completion_tokens": tokens,
                          "total_tokens": 3 + tokens}
                self.wfile.write(b"data: " + json.dumps({"choices": [], "usage": counts})
                                 .encode() + b"\n\n")
            self.wfile.write(b"data: [DONE]\n\n")

        def _lora_admin(self, request: dict) -> None:
            if not runtime_lora:
                self._send(404, {"detail": "Not Found"})
                return
            lname = request.get("lora_name")
            if self.path == "/v1/unload_lora_adapter":
                if lname not in loras:
                    self._send(404, {"error": {"message": f"The lora adapter '{lname}' cannot "
                                               "be found.", "code": 404}})
                    return
                del loras[lname]
                log(f"lora unloaded {lname}")
                self._send(200, {"ok": True})
                return
            lpath = request.get("lora_path") or ""
            if not lname or not os.path.isfile(os.path.join(lpath, "adapter_config.json")):
                self._send(400, {"error": {"message": "bad adapter", "code": 400}})
                return
            if lname in loras:
                self._send(400, {"error": {"message": f"The lora adapter '{lname}' has "
                                           "already been loaded.", "code": 400}})
                return
            loras[lname] = lpath
            log(f"lora loaded {lname}")
            self._send(200, {"ok": True})

        def do_POST(self) -> None:  # noqa: N802
            length = int(self.headers.get("Content-Length") or 0)
            raw = self.rfile.read(length)
            seen_body = {"bytes": len(raw), "content_length": self.headers.get("Content-Length"),
                         "content_encoding": self.headers.get("Content-Encoding")}
            try:
                request = json.loads(raw or b"{}")
            except ValueError:
                request = {}
            if not isinstance(request, dict):
                request = {}
            if mode == "hang_post":
                time.sleep(3600)
            if self.path in ("/v1/load_lora_adapter", "/v1/unload_lora_adapter"):
                self._lora_admin(request)
                return
            asked = request.get("model")
            if args.enable_lora and asked not in (None, *served_names, *loras):
                self._send(404, {"error": {"message": f"The model `{asked}` does not exist.",
                                           "type": "NotFoundError", "code": 404}})
                return
            answered = asked if asked in loras else served
            loras_at_start = set(loras)
            if draining[0]:
                self._send(503, {"error": "shutting down"})
                return
            in_flight[0] += 1
            if gen_seconds:
                log(f"generating a completion ({gen_seconds:g}s)")  # it is in flight now
            try:
                time.sleep(gen_seconds)
            finally:
                in_flight[0] -= 1
            if asked in loras_at_start and asked not in loras:
                self._send(500, {"error": {"message": f"adapter {asked} was unloaded while "
                                           "it served this request", "code": 500}})
                return
            counter[0] += 1
            if request.get("stream"):
                options = request.get("stream_options")
                self._stream(int(request.get("max_tokens") or 16),
                             isinstance(options, dict) and bool(options.get("include_usage")))
                return
            seen = {k.lower(): v for k, v in self.headers.items()
                    if k.lower() in ("authorization", "x-api-key")}
            self._send(200, {"model": answered,
                             "choices": [{"message": {"role": "assistant", "content": "hi"}}],
                             "usage": {"prompt_tokens": 3, "completion_tokens": 1},
                             "seen_headers": seen, "seen_body": seen_body})

    server = ThreadingHTTPServer((args.host, args.port), Handler)
    log(f"Starting vLLM server on http://{args.host}:{args.port}")
    sys.stderr.write("INFO:     Application startup complete.\n")
    sys.stderr.flush()

    def on_term(_signum: int, _frame: object) -> None:
        # Like vLLM, a second SIGTERM is ignored. Python may run this handler again inside
        # itself (at any call), so the check and the mark come first and call nothing: a
        # nested run that took a lock the outer run holds would wait for it forever.
        if draining[0]:
            return
        draining[0] = True
        log(f"[shutdown] stopping engine client mode="
            f"{'drain' if args.shutdown_timeout else 'abort'} timeout={args.shutdown_timeout}s")
        timeout = args.shutdown_timeout
        log(f"[shutdown] EngineCore: start mode={'drain' if timeout else 'abort'} "
            f"timeout={timeout}s", proc="EngineCore")
        if in_flight[0] and timeout:
            log(f"[shutdown] EngineCore: draining in-flight requests count={in_flight[0]} "
                f"timeout={timeout}s", proc="EngineCore")
        deadline = time.monotonic() + timeout
        while in_flight[0] and time.monotonic() < deadline:
            time.sleep(0.02)
        log("[shutdown] EngineCore: request processing complete; starting resource teardown",
            proc="EngineCore")
        engine.terminate()
        log(f"EngineCore exited with {engine.wait()}")
        os._exit(int(os.environ.get("FAKE_VLLM_TERM_EXIT", "0")))

    if mode != "ignore_term":
        signal.signal(signal.SIGTERM, on_term)
    die_after = float(os.environ.get("FAKE_VLLM_DIE_AFTER", "1.0"))
    if mode == "die_after_ready":
        threading.Timer(die_after, lambda: os._exit(3)).start()
    elif mode == "exit0_after_ready":
        threading.Timer(die_after, lambda: os._exit(0)).start()
    if os.environ.get("FAKE_VLLM_ORPHAN"):
        threading.Thread(target=leave_orphan, args=(os.environ["FAKE_VLLM_ORPHAN"],),
                         daemon=True).start()
    server.serve_forever()


if __name__ == "__main__":
    main()
