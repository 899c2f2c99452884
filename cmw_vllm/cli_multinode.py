"""CLI pieces for one model over several machines: ``start``'s options, roles in ``status``."""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import click

if TYPE_CHECKING:
    from cmw_vllm.server_manager import ServerStatus

# (option names, dest, click type, help) in the order --help shows them.
_OPTIONS: list[tuple[tuple[str, ...], str, Any, str]] = [
    (("--nnodes",), "nnodes", click.IntRange(min=1),
     "Machines that share one model copy (tensor/pipeline parallel over nodes)."),
    (("--node-rank",), "node_rank", click.IntRange(min=0),
     "This machine's rank: 0 serves the API, the others run headless."),
    (("--master-addr",), "master_addr", str, "The rank-0 machine's address."),
    (("--master-port",), "master_port", click.IntRange(1, 65535),
     "Its rendezvous port (vLLM's default 29501)."),
    (("-dp", "--data-parallel-size"), "data_parallel_size", click.IntRange(min=1),
     "Model copies in all (data parallel)."),
    (("--data-parallel-size-local",), "data_parallel_size_local", click.IntRange(min=0),
     "Copies on this machine."),
    (("--data-parallel-address",), "data_parallel_address", str,
     "The DP leader's address (data parallel over machines)."),
    (("--data-parallel-rpc-port",), "data_parallel_rpc_port", click.IntRange(1, 65535),
     "The DP leader's port (vLLM's default 29550)."),
    (("--data-parallel-start-rank",), "data_parallel_start_rank", click.IntRange(min=0),
     "First DP rank on this machine; above 0 makes it a headless follower."),
    (("--distributed-executor-backend",), "executor_backend", click.Choice(["mp", "ray"]),
     "mp (default over nodes) or ray (a Ray cluster: `cmw-vllm ray start`)."),
    (("--host-ip",), "host_ip", str,
     "This machine's address for vLLM's own traffic (VLLM_HOST_IP; default: the one "
     "that routes to the leader)."),
    (("--net-if",), "interface", str,
     "Network interface for gloo/NCCL (default: the one with --host-ip)."),
    (("--join-timeout",), "join_timeout", click.FloatRange(min=0, min_open=True),
     "Seconds a follower waits for its leader before it gives up (default 180)."),
]
DIST_KEYS = [dest for _, dest, _, _ in _OPTIONS]


def multinode_options(func: Callable[..., Any]) -> Callable[..., Any]:
    """Add the multi-node options to a click command (they arrive as keyword arguments)."""
    for names, dest, type_, help_text in reversed(_OPTIONS):
        func = click.option(*names, dest, type=type_, help=help_text)(func)
    return func


def distributed_values(options: dict[str, Any]) -> dict[str, Any] | None:
    """The ``Distributed`` settings given on the command line; None when none was."""
    given = {key: options[key] for key in DIST_KEYS if options.get(key) is not None}
    return given or None


def cluster_views(statuses: list[ServerStatus]) -> dict[str, dict[str, Any]]:
    """Name -> what each running leader sees of its whole set (see ``cluster_view``)."""
    out: dict[str, dict[str, Any]] = {}
    for st in statuses:
        rec = st.record
        if rec is None or rec.role != "leader" or not st.running:
            continue
        from cmw_vllm.multinode import cluster_view
        from cmw_vllm.server_manager import group_members

        out[st.name] = cluster_view(rec, [p.pid for p in group_members(rec)])
    return out


def role_notes(statuses: list[ServerStatus], views: dict[str, dict[str, Any]]) -> list[str]:
    """One line per multi-node server for under the status table."""
    lines = []
    for st in statuses:
        rec = st.record
        if rec is None or rec.role == "single":
            continue
        if rec.role == "follower":
            lines.append(f"{st.name}: follower of {rec.leader} (rank {rec.node_rank})")
            continue
        view = views.get(st.name)
        text = f"{st.name}: leader (rank 0) at {rec.leader}"
        if view is not None:
            size = view["nnodes"] if view["nnodes"] > 1 else view["data_parallel_size"]
            seen = ", ".join(view["followers_seen"]) or "none yet"
            text += f" of {size} ranks/nodes; followers connected: {seen}"
        lines.append(text)
    return lines
