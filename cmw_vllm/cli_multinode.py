"""CLI pieces for one model over several machines: ``start``'s options, ``cmw-vllm ray``."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import click

from cmw_vllm.vocab import PORT_MAX, PORT_MIN

# (option names, dest, click type, help) in the order --help shows them.
_OPTIONS: list[tuple[tuple[str, ...], str, Any, str]] = [
    (("--nnodes",), "nnodes", click.IntRange(min=1),
     "Machines that share one model copy (tensor/pipeline parallel over nodes)."),
    (("--node-rank",), "node_rank", click.IntRange(min=0),
     "This machine's rank: 0 serves the API, the others run headless."),
    (("--master-addr",), "master_addr", str, "The rank-0 machine's address."),
    (("--master-port",), "master_port", click.IntRange(PORT_MIN, PORT_MAX),
     "Its rendezvous port (vLLM's default 29501)."),
    (("-dp", "--data-parallel-size"), "data_parallel_size", click.IntRange(min=1),
     "Model copies in all (data parallel)."),
    (("--data-parallel-size-local",), "data_parallel_size_local", click.IntRange(min=0),
     "Copies on this machine."),
    (("--data-parallel-address",), "data_parallel_address", str,
     "The DP leader's address (data parallel over machines)."),
    (("--data-parallel-rpc-port",), "data_parallel_rpc_port", click.IntRange(PORT_MIN, PORT_MAX),
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


# --------------------------------------------------------------------------- ray


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
def ray() -> None:
    """Run this machine's Ray node as a managed service (for vLLM's Ray executor).

    \b
    Examples:
      cmw-vllm ray start --head                       # first machine
      cmw-vllm ray start --address 10.0.0.1:6379      # every other machine
      cmw-vllm start qwen -tp 8 --distributed-executor-backend ray   # on the head
      cmw-vllm ray status
      cmw-vllm ray stop
    """


@ray.command(name="start")
@click.argument("ray_args", nargs=-1, type=click.UNPROCESSED, metavar="[-- RAY_FLAGS...]")
@click.option("--head", is_flag=True, help="Start the cluster's head node.")
@click.option("--address", help="Join the cluster whose head is HOST:PORT.")
@click.option("--port", type=click.IntRange(PORT_MIN, PORT_MAX), default=6379, show_default=True,
              help="The head's port.")
@click.option("--node-ip-address", help="This machine's address in the cluster (default: "
              "the one that routes to the head; on the head, its only non-loopback one).")
@click.option("--timeout", type=click.FloatRange(min=0, min_open=True), default=120.0,
              show_default=True, help="Seconds to wait for the node to start.")
@click.option("--json", "as_json", is_flag=True, help="Print JSON (as `ray status --json`).")
def ray_start(ray_args: tuple[str, ...], head: bool, address: str | None, port: int,
              node_ip_address: str | None, timeout: float, as_json: bool) -> None:
    """Start this machine's Ray node in the background (`ray start --block`, logged).

    Starting a node that already runs reports it and exits 0.

    \b
    JSON: {state, role, pid, node_ip, address, log, nodes, error}
    """
    from cmw_vllm.cli_common import echo_json
    from cmw_vllm.ray_node import node_status, start_node

    record, already = start_node(head=head, address=address, port=port,
                                 node_ip=node_ip_address, ray_args=list(ray_args),
                                 timeout=timeout)
    if as_json:
        echo_json(node_status(with_nodes=False).to_json())
        return
    verb = "already runs" if already else "started"
    click.echo(f"Ray {record.role.removeprefix('ray-')} node {verb} (pid {record.pid}, "
               f"{record.host_ip}); cluster {record.leader}.")
    click.echo(f"  Log:  {record.log_path}")
    if record.role == "ray-head":
        click.echo(f"  Join: cmw-vllm ray start --address {record.leader}")


@ray.command(name="status")
@click.option("--json", "as_json", is_flag=True, help="Print JSON (stable keys).")
@click.pass_context
def ray_status(ctx: click.Context, as_json: bool) -> None:
    """Show this machine's Ray node and every node of its cluster.

    Exit codes: 0 running; 1 exited; 3 no Ray node here; 8 it runs but its cluster could
    not be asked (the reason on stderr and in "error").

    \b
    JSON: {state, role, pid, node_ip, address, log, nodes: [{node_ip, alive, cpus, gpus}],
           error}
    """
    from cmw_vllm.cli_common import echo_err, echo_json, print_table
    from cmw_vllm.errors import EXIT_ENVIRONMENT, EXIT_FAILURE, EXIT_NOT_RUNNING, EXIT_OK
    from cmw_vllm.ray_node import node_status

    status = node_status()
    code = {"running": EXIT_OK, "exited": EXIT_FAILURE}.get(status.state, EXIT_NOT_RUNNING)
    if status.error:
        code = EXIT_ENVIRONMENT
    if as_json:
        echo_json(status.to_json())
        ctx.exit(code)
    rec = status.record
    if rec is None:
        click.echo("No Ray node here (cmw-vllm ray start --head).")
        ctx.exit(code)
    click.echo(f"Ray {rec.role.removeprefix('ray-')} node: {status.state} (pid {rec.pid}, "
               f"{rec.host_ip}); cluster {rec.leader}")
    if status.nodes:
        rows = [[n["node_ip"], "alive" if n["alive"] else "dead", f"{n['cpus']:g}",
                 f"{n['gpus']:g}"] for n in status.nodes]
        print_table(["NODE", "STATE", "CPUS", "GPUS"], rows)
    if status.error:
        echo_err(status.error)
    ctx.exit(code)


@ray.command(name="stop")
@click.option("--timeout", type=click.FloatRange(min=0), default=30.0, show_default=True,
              help="Seconds between SIGTERM and SIGKILL.")
def ray_stop(timeout: float) -> None:
    """Stop this machine's Ray node (only the processes it started)."""
    from cmw_vllm.ray_node import stop_node

    was_running, killed = stop_node(timeout)
    if not was_running and not killed:
        click.echo("No Ray node was running here.")
    else:
        how = f"forced: {', '.join(map(str, killed))}" if killed else "graceful"
        click.echo(f"Stopped the Ray node ({how}).")


COMMANDS: list[click.Command] = [ray]
