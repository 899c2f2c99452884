"""A stand-in for vLLM's CLI (``vllm serve``), for fast multi-node tests.

``serve MODEL`` with ``--nnodes N --node-rank 0`` listens on ``--master-addr:--master-port``
(like the leader's rendezvous) and then serves HTTP as the stand-in OpenAI server does.
With ``--headless`` it is a follower: it starts a worker child, connects to the master
until that answers, logs vLLM's "assigned as" line (it has joined) and then waits forever,
as vLLM's headless node does when its leader is gone.
"""

from __future__ import annotations

import argparse
import os
import socket
import subprocess
import sys
import threading
import time


def log(msg: str) -> None:
    sys.stderr.write(f"(MainProcess pid={os.getpid()}) INFO {msg}\n")
    sys.stderr.flush()


def _listen(host: str, port: int) -> None:
    server = socket.create_server((host, port))

    def accept() -> None:  # like the TCPStore, keep the clients' connections open
        clients = []
        while True:
            conn, _ = server.accept()
            conn.setblocking(True)
            clients.append(conn)

    threading.Thread(target=accept, daemon=True).start()


def _follower(args: argparse.Namespace) -> None:
    subprocess.Popen(["VLLM::Worker_TP1", "-c", "import time; time.sleep(3600)"],
                     executable=sys.executable)
    log(f"Launching vLLM (v0.0.0) headless multiproc executor, with head node address "
        f"{args.master_addr}:{args.master_port} for torch.distributed process group.")
    while True:  # like the TCPStore client, keep the connection open
        try:
            store = socket.create_connection((args.master_addr, args.master_port), timeout=1)
            break
        except OSError:
            time.sleep(0.2)
    log(f"world_size={args.nnodes} rank={args.node_rank} local_rank=0 "
        f"distributed_init_method=tcp://{args.master_addr}:{args.master_port} backend=gloo")
    log(f"rank {args.node_rank} in world size {args.nnodes} is assigned as DP rank 0, "
        f"PP rank 0, TP rank {args.node_rank}")
    while store:
        time.sleep(3600)


def main() -> None:
    parser = argparse.ArgumentParser(prog="vllm")
    sub = parser.add_subparsers(dest="cmd", required=True)
    serve = sub.add_parser("serve")
    serve.add_argument("model")
    serve.add_argument("--nnodes", type=int, default=1)
    serve.add_argument("--node-rank", type=int, default=0)
    serve.add_argument("--master-addr", default="127.0.0.1")
    serve.add_argument("--master-port", type=int, default=29501)
    serve.add_argument("--headless", action="store_true")
    serve.add_argument("--distributed-executor-backend")
    args, rest = parser.parse_known_args()
    if args.headless:
        _follower(args)
        return
    if args.nnodes > 1:
        _listen(args.master_addr, args.master_port)
        log(f"world_size={args.nnodes} rank=0 local_rank=0 distributed_init_method="
            f"tcp://{args.master_addr}:{args.master_port} backend=gloo")
    from vllm.entrypoints.openai import api_server

    sys.argv = ["vllm", "--model", args.model, *rest]
    api_server.main()


if __name__ == "__main__":
    main()
