"""A stand-in for ``vllm.entrypoints.cli.main``: ``vllm serve MODEL [FLAGS]``.

It takes the model as vLLM's ``serve`` does (first argument, or ``--model``) and runs the
stand-in server of :mod:`vllm.entrypoints.openai.api_server`, which holds the behaviours.

Several machines: with ``--nnodes N --node-rank 0`` it also listens on
``--master-addr:--master-port`` (the leader's rendezvous) and keeps the connections open,
as the TCPStore does, answering its ping (the nonce back). With ``--headless`` it is a
follower: it starts a worker child, connects to the master until that answers as a TCPStore
does (something else on the port keeps it waiting, as torch does), logs vLLM's "assigned
as" line (it has joined) and then waits forever, as vLLM's headless node does when its
leader is gone.
"""

from __future__ import annotations

import argparse
import os
import socket
import struct
import subprocess
import sys
import threading
import time


def log(msg: str) -> None:
    sys.stderr.write(f"(MainProcess pid={os.getpid()}) INFO {msg}\n")
    sys.stderr.flush()


STORE_VALIDATE, STORE_PING, STORE_MAGIC = 0, 13, 0x3C85F7CE  # torch's TCPStore protocol


def _serve_store_client(conn: socket.socket) -> None:
    """Answer VALIDATE (checks the magic) and PING (sends the nonce back), as the TCPStore."""
    while True:
        try:
            kind = conn.recv(1)
            value = conn.recv(4) if kind else b""
        except OSError:
            return
        if len(value) < 4 or kind[0] not in (STORE_VALIDATE, STORE_PING) or (
                kind[0] == STORE_VALIDATE and struct.unpack("<I", value)[0] != STORE_MAGIC):
            conn.close()  # the client went, or it is not a TCPStore client
            return
        if kind[0] == STORE_PING:
            conn.sendall(value)


def _listen(host: str, port: int) -> None:
    server = socket.create_server((host, port))

    def accept() -> None:  # like the TCPStore, keep the clients' connections open
        while True:
            conn, _ = server.accept()
            threading.Thread(target=_serve_store_client, args=(conn,), daemon=True).start()

    threading.Thread(target=accept, daemon=True).start()


def _store_connect(host: str, port: int) -> socket.socket | None:
    """A connection to the TCPStore at host:port once it answers a ping, else None."""
    try:
        store = socket.create_connection((host, port), timeout=1)
        store.sendall(struct.pack("<BIBI", STORE_VALIDATE, STORE_MAGIC, STORE_PING, 77))
        if store.recv(4) == struct.pack("<I", 77):
            return store
        store.close()
    except OSError:
        pass
    return None


def _follower(args: argparse.Namespace) -> None:
    subprocess.Popen(["VLLM::Worker_TP1", "-c", "import time; time.sleep(3600)"],
                     executable=sys.executable)
    log(f"Launching vLLM (v0.0.0) headless multiproc executor, with head node address "
        f"{args.master_addr}:{args.master_port} for torch.distributed process group.")
    while True:  # like the TCPStore client, keep the connection open
        store = _store_connect(args.master_addr, args.master_port)
        if store is not None:
            break
        time.sleep(0.2)
    log(f"world_size={args.nnodes} rank={args.node_rank} local_rank=0 "
        f"distributed_init_method=tcp://{args.master_addr}:{args.master_port} backend=gloo")
    log(f"rank {args.node_rank} in world size {args.nnodes} is assigned as DP rank 0, "
        f"PP rank 0, TP rank {args.node_rank}")
    while store:
        time.sleep(3600)


def main() -> None:
    args = sys.argv[1:]
    if args[:1] != ["serve"]:
        sys.stderr.write("usage: vllm serve MODEL [FLAGS]\n")
        sys.exit(2)
    parser = argparse.ArgumentParser(prog="vllm serve")
    parser.add_argument("--nnodes", type=int, default=1)
    parser.add_argument("--node-rank", type=int, default=0)
    parser.add_argument("--master-addr", default="127.0.0.1")
    parser.add_argument("--master-port", type=int, default=29501)
    parser.add_argument("--headless", action="store_true")
    parser.add_argument("--distributed-executor-backend")
    nodes, rest = parser.parse_known_args(args[1:])
    if nodes.headless:
        _follower(nodes)
        return
    if nodes.nnodes > 1:
        _listen(nodes.master_addr, nodes.master_port)
        log(f"world_size={nodes.nnodes} rank=0 local_rank=0 distributed_init_method="
            f"tcp://{nodes.master_addr}:{nodes.master_port} backend=gloo")
    if rest and not rest[0].startswith("-"):
        rest = ["--model", rest[0], *rest[1:]]
    from vllm.entrypoints.openai.api_server import main as serve

    serve(rest)
