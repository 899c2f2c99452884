"""``cmw-vllm status``: the state, load and roles of managed servers.

A module of its own so that ``status`` (which scripts and monitors call often) loads only
what it shows, not ``start``'s options and launch code.
"""

from __future__ import annotations

import os
import time
from typing import TYPE_CHECKING, Any

import click

from cmw_vllm.cli_common import (
    echo_err,
    echo_json,
    format_bytes,
    format_duration,
    print_table,
)
from cmw_vllm.errors import EXIT_FAILURE, EXIT_NOT_RUNNING, EXIT_OK, EXIT_STARTING, UsageError
from cmw_vllm.vocab import GATEWAY_TASK, STATE_EXIT_CODES, State

if TYPE_CHECKING:
    from cmw_vllm.server_status import ServerStatus

# status: the worst server's exit code wins (documented in docs/commands.md).
_EXIT_RANK = {EXIT_OK: 0, EXIT_STARTING: 1, EXIT_FAILURE: 2}

# Columns status adds per server (see :func:`load_cells`).
LOAD_COLUMNS = ["RUN", "WAIT", "KV", "TOK/S"]


# --------------------------------------------------------------------------- roles


def cluster_views(statuses: list[ServerStatus]) -> dict[str, dict[str, Any]]:
    """Name -> what each running leader sees of its whole set (see ``cluster_view``)."""
    out: dict[str, dict[str, Any]] = {}
    for st in statuses:
        rec = st.record
        if rec is None or rec.role != "leader" or not st.running:
            continue
        from cmw_vllm.multinode import cluster_view
        from cmw_vllm.process_group import group_members

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



def _state_cell(st: ServerStatus) -> str:
    """The STATE column: the state, with the exit code, drain left or next restart."""
    rec = st.record
    if st.state in (State.EXITED, State.FAILED) and st.returncode is not None:
        return f"{st.state} ({st.returncode})"
    left = st.drain_left()
    if left is not None:
        return f"draining ({left:.0f}s left)"
    if st.state == State.RESTARTING and rec is not None and rec.next_restart_at is not None:
        return f"restarting (in {max(0.0, rec.next_restart_at - time.time()):.0f}s)"
    if rec is not None and rec.restart_count and st.running:
        count = rec.restart_count
        return f"{st.state} ({count} restart{'' if count == 1 else 's'})"
    return str(st.state)


def _pins_of(st: ServerStatus) -> list[str]:
    """The servers a gateway keeps pinned (its record's ``pins``, noted by its dashboard)."""
    pins = st.record.config.get("pins") if st.record is not None else None
    return [p for p in pins if isinstance(p, str)] if isinstance(pins, list) else []


def gateway_pins(statuses: list[ServerStatus]) -> dict[str, list[str]]:
    """Server name -> the running gateways that keep it pinned."""
    out: dict[str, list[str]] = {}
    for st in statuses:
        if st.running and st.record is not None and st.record.task == GATEWAY_TASK:
            for name in _pins_of(st):
                out.setdefault(name, []).append(st.name)
    return out


def _status_exit_code(statuses: list[ServerStatus]) -> int:
    if not statuses:
        return EXIT_NOT_RUNNING
    worst = EXIT_OK
    for st in statuses:
        code = STATE_EXIT_CODES.get(st.state, EXIT_FAILURE)
        if _EXIT_RANK[code] > _EXIT_RANK[worst]:
            worst = code
    return worst


def _collect_status(
    names: tuple[str, ...], quiet: bool
) -> tuple[list[ServerStatus], int, dict[str, dict[str, Any]]]:
    """Statuses, the exit code, and the load (and GPU memory) of the running ones.

    Args:
        names: The servers to show (none: every managed server).
        quiet: Don't say on stderr which names are unknown (JSON, ``--watch``).
    """
    from cmw_vllm.server_record import record_names
    from cmw_vllm.server_status import list_status
    from cmw_vllm.vocab import did_you_mean, validate_name

    if names:
        for n in names:
            validate_name(n)
        known = set(record_names())
        missing = [n for n in names if n not in known]
        statuses = list_status([n for n in names if n in known])
        for n in missing:
            if not quiet:
                close = did_you_mean(n, sorted(known))
                echo_err(f"No managed server named {n!r}{close or '.'}")
        code = EXIT_NOT_RUNNING if missing else _status_exit_code(statuses)
    else:
        statuses = list_status()
        code = _status_exit_code(statuses)
    loads: dict[str, dict[str, Any]] = {}
    if any(st.state == State.HEALTHY for st in statuses):
        loads = status_load_columns(statuses)
    # An exited server's leftovers (an EngineCore after a SIGKILL) hold GPU memory too.
    holders = [st.record for st in statuses
               if st.record is not None and (st.running or st.orphans)]
    if holders:
        from cmw_vllm.gpu_info import server_gpu_memory

        for name, used in server_gpu_memory(holders).items():
            loads.setdefault(name, {})["gpu_memory_bytes"] = used
    return statuses, code, loads


def _loaded_adapters(statuses: list[ServerStatus]) -> dict[str, list[str] | None]:
    """The LoRA adapters each healthy server with LoRA serves now, asked concurrently
    (None for one that did not answer); servers without LoRA are not asked."""
    from cmw_vllm.settings import health_timeout

    asked = [st for st in statuses if st.state == State.HEALTHY and st.record is not None
             and (st.record.config or {}).get("lora")]
    if not asked:
        return {}
    from concurrent.futures import ThreadPoolExecutor

    from cmw_vllm import last_start
    from cmw_vllm.errors import CmwVllmError
    from cmw_vllm.lora_adapters import loaded_adapters

    timeout = health_timeout()

    def one(st: ServerStatus) -> list[str] | None:
        assert st.record is not None
        try:
            key = os.environ.get("VLLM_API_KEY") or last_start.stored_api_key(st.name)
            return loaded_adapters(st.record.base_url, key, timeout)
        except CmwVllmError:
            return None

    with ThreadPoolExecutor(max_workers=min(8, len(asked))) as pool:
        return dict(zip([st.name for st in asked], pool.map(one, asked), strict=True))


# --------------------------------------------------------------------------- status load


def status_load_columns(
    statuses: list[ServerStatus], timeout: float | None = None, *, store: bool = True
) -> dict[str, dict[str, Any]]:
    """Load of every healthy server in ``statuses``, scraped concurrently.

    One call costs at most about ``timeout`` seconds however many servers hang. Rates
    (tokens/s) come from the scrape stored by the previous call, so the first call after a
    while shows none.

    Args:
        statuses: From :func:`cmw_vllm.server_status.list_status`.
        timeout: Seconds per scrape (default ``CMW_VLLM_HEALTH_TIMEOUT``).
        store: Keep the scrapes for the next call's rates.

    Returns:
        Server name -> ``LoadInfo.to_json()`` (keys ``ok``, ``error``, ``requests_running``,
        ``requests_waiting``, ``kv_cache_usage`` (0..1), ``prompt_tokens_total``,
        ``generation_tokens_total``, ``prompt_tokens_per_s``, ``generation_tokens_per_s``,
        ``rate_interval_s``), for healthy servers only.
    """
    from cmw_vllm.health_check import collect_load
    from cmw_vllm.settings import health_timeout

    records = [s.record for s in statuses if s.state == State.HEALTHY and s.record is not None]
    if not records:
        return {}
    loads = collect_load(records, health_timeout() if timeout is None else timeout, store=store)
    return {name: info.to_json() for name, info in loads.items()}


def load_cells(load: dict[str, Any] | None) -> list[str]:
    """Table cells for :data:`LOAD_COLUMNS` from one :func:`status_load_columns` value.

    ``-`` where a figure is unknown (no load, scrape failed, no earlier scrape for a rate).
    """
    if not load or not load.get("ok"):
        return ["-"] * len(LOAD_COLUMNS)

    def num(value: Any) -> str:
        return "-" if value is None else str(value)

    kv = load.get("kv_cache_usage")
    rate = load.get("generation_tokens_per_s")
    return [
        num(load.get("requests_running")),
        num(load.get("requests_waiting")),
        "-" if kv is None else f"{kv * 100:.1f}%",
        "-" if rate is None else f"{rate:.1f}",
    ]


# At a narrow terminal: load figures go first, then the rest; MODEL is shortened; NAME and
# STATE are never cut (users need the exact name for stop, logs and test).
STATUS_DROP = ("TOK/S", "WAIT", "RUN", "KV", "ENABLED", "GPU MEM", "UPTIME", "PID", "GPUS",
               "PORT")
STATUS_SHRINK = ("MODEL",)


def _status_rows(
    statuses: list[ServerStatus], loads: dict[str, dict[str, Any]]
) -> tuple[list[str], list[list[str]]]:
    from cmw_vllm.server_status import record_gpus
    from cmw_vllm.systemd_unit import enabled_scope

    columns = ["NAME", "STATE", "MODEL", "PID", "PORT", "GPUS", "UPTIME", "ENABLED", "GPU MEM",
               *LOAD_COLUMNS]
    rows = []
    for st in statuses:
        rec = st.record
        state = _state_cell(st)
        rows.append(
            [
                st.name,
                state,
                rec.model if rec else "-",
                str(st.pid) if st.pid else "-",
                str(rec.port) if rec and rec.port else "-",
                ",".join(map(str, record_gpus(rec) or [])) or "-" if rec else "-",
                format_duration(st.uptime) if st.running else "-",
                enabled_scope(st.name) or "-",
                format_bytes((loads.get(st.name) or {}).get("gpu_memory_bytes")),
                *load_cells(loads.get(st.name)),
            ]
        )
    return columns, rows


def _watch(names: tuple[str, ...], interval: float) -> None:
    """Redraw the status table every ``interval`` seconds until Ctrl-C (then exit 130).

    On a terminal the table is redrawn in place and, on Ctrl-C, erased and printed once
    more, so exactly one copy (one title) stays on the screen.
    """
    from cmw_vllm.cli_common import console, fitted_table, stdout_is_tty

    def table(title: str) -> Any:
        statuses, _, loads = _collect_status(names, quiet=True)
        columns, rows = _status_rows(statuses, loads)
        return fitted_table(columns, rows, out.width, title, STATUS_DROP, STATUS_SHRINK)

    out = console()
    if not stdout_is_tty():
        while True:
            statuses, _, loads = _collect_status(names, quiet=True)
            columns, rows = _status_rows(statuses, loads)
            click.echo(time.strftime("%Y-%m-%d %H:%M:%S"))
            print_table(columns, rows)
            click.echo("")
            time.sleep(interval)
    from rich.live import Live

    last = None
    try:
        with Live(console=out, auto_refresh=False, transient=True) as live:
            while True:
                last = table(f"cmw-vllm status {time.strftime('%H:%M:%S')}")
                live.update(last, refresh=True)
                time.sleep(interval)
    except KeyboardInterrupt:
        if last is not None:
            out.print(last)
        raise


@click.command()
@click.argument("names", nargs=-1, metavar="[NAME]...")
@click.option("--json", "as_json", is_flag=True, help="Print JSON (stable keys).")
@click.option("-w", "--watch", is_flag=True, help="Refresh in place until Ctrl-C.")
@click.option("--interval", type=click.FloatRange(min=0.2), default=2.0, show_default=True,
              help="Seconds between refreshes with --watch.")
@click.pass_context
def status(ctx: click.Context, names: tuple[str, ...], as_json: bool, watch: bool,
           interval: float) -> None:
    """Show managed servers: state, model, pid, port, uptime and load.

    Load (healthy servers): requests running and waiting, KV-cache usage, and generated
    tokens per second since the previous `status` (from vLLM's /metrics).

    \b
    States: starting, healthy, unhealthy (alive, /health failing), joined (a follower node
    in its leader's group), draining (stopping: requests in flight finish), restarting
    (crashed; relaunched after a backoff), failed (crashed too often; gave up), exited, stale
    (the pid now belongs to another process), invalid (unreadable record).
    Exit codes: 0 all healthy or joined; 1 some unhealthy, draining, failed, exited, stale
    or invalid; 3 no such server / none managed; 4 some starting or restarting (worst wins).

    \b
    JSON: {"servers": [{name, state, model, served_model_name, served_model_names, task, pid,
           host, port, url, uptime_s, started_at, returncode, orphan_pids, log, error,
           log_tail, role, node_rank, leader, restart_policy, restarts, last_exit_code,
           last_exit_at, next_restart_at, drain_left_s, enabled, adapters, gpus,
           gpu_memory_utilization, gpu_memory_bytes, load, pinned_by}]}; gpus: the NVML
           indices of the GPUs it runs on (null without GPUs); pinned_by: the running
           gateways that keep it pinned (a gateway also has pins: the servers it keeps
           pinned); adapters: the LoRA adapters a healthy server serves now ([] without
           LoRA, null when not running or it did not say);
           served_model_names: every name the server answers to (the model id and the
           server's name unless --served-model-name), served_model_name the first;
           log_tail: the log lines that tell why an exited or failed server ended (else
           []); load is null or {ok, error, requests_running, requests_waiting,
           kv_cache_usage, prompt_tokens_total, generation_tokens_total,
           prompt_tokens_per_s, generation_tokens_per_s, rate_interval_s}; a leader also
           has cluster: {nnodes, data_parallel_size, world_size, rendezvous,
           followers_seen}.

    \b
    Examples:
      cmw-vllm status
      cmw-vllm status qwen --json | jq -r '.servers[0].state'
      cmw-vllm status qwen >/dev/null && echo up
      cmw-vllm status --watch
    """
    if watch:
        if as_json:
            raise UsageError("--watch and --json don't go together")
        _watch(names, interval)
        return
    statuses, code, loads = _collect_status(names, quiet=as_json)
    views = cluster_views(statuses)
    pins = gateway_pins(statuses)
    if as_json:
        adapters = _loaded_adapters(statuses)
        servers = []
        for st in statuses:
            data = st.to_json()
            data["pinned_by"] = pins.get(st.name, [])
            if st.record is not None and st.record.task == GATEWAY_TASK:
                data["pins"] = _pins_of(st)
            data["adapters"] = adapters.get(st.name, [] if st.running else None)
            if st.record is not None and st.record.role == "leader":
                data["cluster"] = views.get(st.name)
            extra = dict(loads.get(st.name) or {})
            data["gpu_memory_bytes"] = extra.pop("gpu_memory_bytes", None)
            data["load"] = extra or None
            servers.append(data)
        echo_json({"servers": servers})
    elif not statuses:
        if not names:
            click.echo("No managed servers.")
    else:
        columns, rows = _status_rows(statuses, loads)
        print_table(columns, rows, drop=STATUS_DROP, shrink=STATUS_SHRINK)
        for line in role_notes(statuses, views):
            click.echo(line)
        for st in statuses:
            if st.running and st.record is not None and st.record.task == GATEWAY_TASK \
                    and _pins_of(st):
                click.echo(f"{st.name}: pinned (never idle-stopped nor evicted): "
                           f"{', '.join(_pins_of(st))}")
        for st in statuses:
            if st.state == State.FAILED and st.log_tail:
                echo_err(f"{st.name}: gave up after repeated crashes; the end of its log:")
                for line in st.log_tail:
                    echo_err(f"  {line}")
            if st.error and st.state in (State.EXITED, State.FAILED, State.STALE,
                                         State.INVALID):
                echo_err(f"{st.name}: {st.error}")
            if st.state == State.EXITED and st.log_tail and st.record is not None:
                echo_err(f"{st.name}: from its log {st.record.log_path}:")
                for line in st.log_tail:
                    echo_err(f"  {line}")
            if st.orphans:
                echo_err(f"{st.name}: processes left behind: "
                         f"{', '.join(map(str, st.orphans))} (cmw-vllm stop {st.name})")
    ctx.exit(code)


COMMANDS: list[click.Command] = [status]
