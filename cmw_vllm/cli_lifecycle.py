"""CLI commands for server lifecycle: start, stop, restart, status, logs."""

from __future__ import annotations

import os
import sys
import time
from typing import TYPE_CHECKING, Any

import click

from cmw_vllm.cli_common import (
    echo_err,
    echo_json,
    echo_wrapped,
    format_bytes,
    format_duration,
    print_table,
    stderr_is_tty,
)
from cmw_vllm.cli_multinode import (
    cluster_views,
    distributed_values,
    multinode_options,
    role_notes,
)
from cmw_vllm.errors import (
    EXIT_FAILURE,
    EXIT_NOT_RUNNING,
    EXIT_OK,
    EXIT_STARTING,
    UsageError,
)
from cmw_vllm.vocab import (
    CLI_DTYPES,
    RESTART_POLICIES,
    STATE_EXIT_CODES,
    TASKS,
    State,
    Task,
    parse_port,
)

if TYPE_CHECKING:
    from cmw_vllm.server_manager import ServerStatus, StartResult
    from cmw_vllm.server_record import ServerRecord

LOOPBACK = {"127.0.0.1", "localhost", "::1"}

# status: the worst server's exit code wins (documented in the README).
_EXIT_RANK = {EXIT_OK: 0, EXIT_STARTING: 1, EXIT_FAILURE: 2}

# Columns status adds per server (see :func:`load_cells`).
LOAD_COLUMNS = ["RUN", "WAIT", "KV", "TOK/S"]


class _Progress:
    """Shows the start-up phase: a spinner on a terminal, one line per phase otherwise."""

    def __init__(self, name: str, quiet: bool = False) -> None:
        self.name = name
        self.quiet = quiet
        self.phase: str | None = None
        self.status: Any = None
        if stderr_is_tty() and not quiet:
            from cmw_vllm.cli_common import console

            self.status = console(stderr=True).status(f"Starting {name}...")
            self.status.start()

    def __call__(self, phase: str, elapsed: float) -> None:
        if self.quiet:
            return
        if self.status is not None:
            self.status.update(f"Starting {self.name}: {phase} ({elapsed:.0f}s)")
        elif phase != self.phase:
            echo_err(f"{self.name}: {phase} ({elapsed:.1f}s)")
        self.phase = phase

    def note(self, line: str) -> None:
        """Show ``line`` on stderr (above the spinner on a terminal), even when quiet."""
        if self.status is not None:
            self.status.console.print(f"Warning: {line}", markup=False, highlight=False)
        else:
            echo_err(f"Warning: {line}")

    def close(self) -> None:
        if self.status is not None:
            self.status.stop()
            self.status = None


def _example_request(record: ServerRecord, indent: str, api_key: bool) -> str:
    """A curl command for the server's task, one argument per line (copy-pasteable).

    The JSON body is split after each top-level member, so no line runs much past 80
    columns and none wraps in the middle of a word.
    """
    import json

    model = record.served_model_name
    if record.task == Task.EMBED:
        path, body = "/v1/embeddings", {"model": model, "input": "Hello"}
    elif record.task == Task.SCORE:
        path = "/rerank"
        body = {"model": model, "query": "What is vLLM?", "documents": ["An LLM server."]}
    elif record.task == Task.CLASSIFY:
        path, body = "/classify", {"model": model, "input": "Hello"}
    else:
        path = "/v1/chat/completions"
        body = {"model": model, "messages": [{"role": "user", "content": "Hello"}],
                "max_tokens": 32}
    more = indent + "  "
    lines = [f"curl {record.base_url}{path}", f"{more}-H 'Content-Type: application/json'"]
    if api_key:
        lines.append(f'{more}-H "Authorization: Bearer $VLLM_API_KEY"')
    members = [f"{json.dumps(k)}: {json.dumps(v)}" for k, v in body.items()]
    data = f",\n{more}     ".join(members).replace("'", "'\\''")  # inside '...'
    lines.append(f"{more}-d '{{{data}}}'")
    return " \\\n".join(lines)


def _warn_exposed(host: str, api_key: bool) -> None:
    if host not in LOOPBACK and not api_key:
        echo_err(
            f"Warning: binding to {host} without an API key: anyone who can reach this "
            "machine can use the server (set VLLM_API_KEY)."
        )


def _start_json(result: StartResult) -> dict[str, Any]:
    record = result.record
    return {
        "name": result.name,
        "state": (State.JOINED if record.role == "follower" else State.HEALTHY)
        if result.ready else State.STARTING,
        "already_running": result.already_running,
        "model": record.model,
        "pid": record.pid,
        "port": record.port or None,
        "url": record.base_url or None,
        "log": record.log_path,
        "role": record.role,
        "node_rank": record.node_rank,
        "leader": record.leader,
        "ready_after_s": round(result.ready_after_s, 2)
        if result.ready_after_s is not None
        else None,
    }


def _report_start(result: StartResult, as_json: bool, elapsed: float) -> None:
    record = result.record
    if as_json:
        echo_json(_start_json(result))
        return
    if result.port_changed_from is not None:
        echo_err(f"Port {result.port_changed_from} is in use; using {record.port}.")
    if result.already_running:
        verb = "is already running" if result.ready else "is already starting"
        click.echo(f"Server {result.name!r} {verb} ({record.model}, pid {record.pid}).")
    elif result.ready and record.role == "follower":
        click.echo(f"Server {result.name!r} has joined ({record.model}, pid {record.pid}, "
                   f"{elapsed:.1f}s).")
    elif result.ready:
        click.echo(
            f"Server {result.name!r} is ready ({record.model}, pid {record.pid}, "
            f"{elapsed:.1f}s)."
        )
    else:
        click.echo(f"Server {result.name!r} is starting ({record.model}, pid {record.pid}).")
        click.echo(f"  Log:      {record.log_path}")
        click.echo(f"  Check:    cmw-vllm status {result.name}")
    if record.role == "follower":  # headless: the leader serves the API
        state = "has joined" if result.ready else "joins"
        click.echo(f"  Follower: rank {record.node_rank}, {state} the leader at {record.leader}")
        return
    click.echo(f"  Endpoint: {record.base_url}/v1")
    if result.ready:
        click.echo(f"  Try:      {_example_request(record, ' ' * 12, result.api_key)}")


SECRET_VARS = {"VLLM_API_KEY", "HF_TOKEN", "HUGGING_FACE_HUB_TOKEN"}


def _parse_env(pairs: tuple[str, ...]) -> dict[str, str] | None:
    """``-e KEY=VALUE`` options as a dict (secrets are refused: they would be stored)."""
    import re

    out: dict[str, str] = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", key):
            raise UsageError(f"invalid --env {pair!r}: use KEY=VALUE")
        if key in SECRET_VARS:
            raise UsageError(f"--env {key}=... would be stored in the server's record; "
                             f"export {key} in the environment instead")
        out[key] = value
    return out or None


def _build_config(target: str, options: dict[str, Any], vllm_args: tuple[str, ...]) -> Any:
    from cmw_vllm.model_registry import resolve_target
    from cmw_vllm.server_config import resolve_server_config

    resolved = resolve_target(target)
    cli_values = dict(options)
    cli_values["vllm_args"] = list(vllm_args) or None
    return resolve_server_config(
        resolved.model,
        entry_settings=resolved.settings,
        environ=os.environ,
        cli=cli_values,
    )


def _run_start(start: Any, name: str, quiet: bool) -> tuple[StartResult, float]:
    progress = _Progress(name, quiet=quiet)
    begin = time.monotonic()
    try:
        result = start(on_progress=progress)
    except KeyboardInterrupt:
        progress.close()
        echo_wrapped(f"Stopped waiting; {name!r} keeps starting in the background. "
                     f"Stop it with: cmw-vllm stop {name}", err=True)
        raise
    finally:
        progress.close()
    return result, time.monotonic() - begin


def _misplaced_vllm_flags(command: click.Command, args: list[str]) -> UsageError | None:
    """The error for vLLM flags given before ``--`` (``start DIR --enforce-eager``), if any.

    Without this, click answers an unknown option with the closest of ours, and
    ``--enforce-eager`` became "Did you mean --force?": the flag that skips the memory check.
    """
    from cmw_vllm.vllm_flags import normalize_flag, serve_flags

    ours = {opt for param in command.params for opt in (*param.opts, *param.secondary_opts)}
    vllm = serve_flags()
    split = args.index("--") if "--" in args else len(args)
    kept: list[str] = []
    moved: list[str] = []
    i = 0
    while i < split:
        token = args[i]
        flag = normalize_flag(token)
        if flag is None or token.split("=", 1)[0] in ours or flag not in vllm:
            kept.append(token)
            i += 1
            continue
        moved.append(token)
        takes_value = vllm[flag] and "=" not in token and not (flag == "-O" and token != "-O")
        if takes_value and i + 1 < split and normalize_flag(args[i + 1]) is None:
            moved.append(args[i + 1])
            i += 1
        i += 1
    if not moved:
        return None
    import shlex

    names = [t.split("=", 1)[0] for t in moved if normalize_flag(t) is not None]
    fixed = ["cmw-vllm", "start", *kept, "--", *moved, *args[split + 1:]]
    return UsageError(
        f"{', '.join(names)} "
        + ("is a vLLM flag, not a cmw-vllm option" if len(names) == 1
           else "are vLLM flags, not cmw-vllm options")
        + ": put vLLM flags after `--`",
        hint=shlex.join(fixed),
    )


class _StartCommand(click.Command):
    """``start``: vLLM flags given before ``--`` get a clear error, never a look-alike."""

    def parse_args(self, ctx: click.Context, args: list[str]) -> list[str]:
        """Parse as click does; on an unknown option, check it against vLLM's flags."""
        try:
            return super().parse_args(ctx, list(args))
        except click.NoSuchOption:
            error = _misplaced_vllm_flags(self, list(args))
            if error is not None:
                raise error from None
            raise


@click.command(cls=_StartCommand, context_settings={"help_option_names": ["-h", "--help"]})
@click.argument("target", metavar="NAME|MODEL|DIR")
@click.argument("vllm_args", nargs=-1, type=click.UNPROCESSED, metavar="[-- VLLM_FLAGS...]")
@click.option("--name", help="Server name (default: the alias, or derived from the model).")
@click.option("--host", help="Address to bind (default 127.0.0.1, env CMW_VLLM_HOST).")
@click.option("--port", "port", metavar="PORT",
              help="HTTP port (default: the registry entry's, else 8000).")
@click.option("--auto-port", is_flag=True, help="If the port is taken, use the next free one.")
@click.option("-tp", "--tensor-parallel-size", type=int, help="GPUs to split the model over.")
@click.option("--gpu-memory-utilization", type=float,
              help="Fraction (0, 1] of each GPU's memory this server may use.")
@click.option("--max-model-len", type=int, help="Maximum context length in tokens.")
@click.option("--dtype", type=click.Choice(CLI_DTYPES),
              help="Weight and activation dtype (default auto: the checkpoint's, env "
              "CMW_VLLM_DTYPE).")
@click.option("--gpus", help="GPUs this server sees, e.g. 0,1 (sets CUDA_VISIBLE_DEVICES).")
@click.option("--served-model-name", help="Model name clients use in requests.")
@click.option("-e", "--env", "env_pairs", multiple=True, metavar="KEY=VALUE",
              help="Extra environment variable for vLLM (repeatable; kept for restart).")
@click.option("--task", type=click.Choice(TASKS),
              help="What the model does (default: from the registry, else generate).")
@click.option("--drain", type=click.IntRange(min=0), metavar="SECONDS",
              help="How long stop/restart let requests in flight finish (default 30, env "
              "CMW_VLLM_DRAIN_TIMEOUT; 0 aborts them).")
@click.option("--restart", "restart_policy", type=click.Choice(RESTART_POLICIES),
              help="Restart after a crash (default no, env CMW_VLLM_RESTART).")
@click.option("-f", "--foreground", is_flag=True,
              help="Run under this process: vLLM's output here and in the log; SIGTERM or "
              "Ctrl-C drains and stops; exits with vLLM's exit code.")
@click.option("--saved", is_flag=True,
              help="Use the settings `cmw-vllm enable NAME` saved (what its unit runs).")
@click.option("--no-wait", is_flag=True, help="Return right after launching.")
@click.option("--timeout", type=click.FloatRange(min=0, min_open=True),
              help="Seconds to wait for readiness (default 1800, env CMW_VLLM_START_TIMEOUT).")
@click.option("--force", is_flag=True,
              help="Skip the memory check that refuses a model that cannot fit.")
@click.option("--test", "run_test", is_flag=True,
              help="Once ready, send one request for the model's task (like `cmw-vllm test`).")
@click.option("--json", "as_json", is_flag=True, help="Print the result as JSON.")
@multinode_options
def start(
    target: str,
    vllm_args: tuple[str, ...],
    name: str | None,
    host: str | None,
    port: str | None,
    auto_port: bool,
    tensor_parallel_size: int | None,
    gpu_memory_utilization: float | None,
    max_model_len: int | None,
    dtype: str | None,
    gpus: str | None,
    served_model_name: str | None,
    env_pairs: tuple[str, ...],
    task: str | None,
    drain: int | None,
    restart_policy: str | None,
    foreground: bool,
    saved: bool,
    no_wait: bool,
    timeout: float | None,
    force: bool,
    run_test: bool,
    as_json: bool,
    **dist_options: Any,
) -> None:
    """Start a vLLM server in the background and wait until it is ready.

    NAME is a registry alias (see `cmw-vllm list`), MODEL a Hugging Face id, DIR a local
    model directory. Flags after `--` go to `vllm serve` unchanged. Starting a server that
    already runs reports it and exits 0.

    \b
    JSON: {name, state (healthy, joined for a follower, or starting with --no-wait),
           already_running, model, pid, port, url, log, ready_after_s, role, node_rank,
           leader}; with --test also test: the object of `cmw-vllm test --json`.

    \b
    Several machines: the rank-0 node (--node-rank 0) serves the API, the others run
    headless and are ready once they joined it (README: "Several machines").

    \b
    Examples:
      cmw-vllm start qwen
      cmw-vllm start Qwen/Qwen3-0.6B --name small --port 8010 --max-model-len 8192
      cmw-vllm start ./tiny-model --dtype float32 -- --enforce-eager
      cmw-vllm start qwen --gpus 1 --no-wait
      cmw-vllm start qwen -tp 2 --nnodes 2 --node-rank 1 --master-addr 10.0.0.1
      cmw-vllm start qwen --restart on-failure --drain 120
      cmw-vllm start qwen --foreground
    """
    from cmw_vllm.server_manager import ServerManager
    from cmw_vllm.settings import api_key

    options = {
        "name": name,
        "host": host,
        "port": None if port is None else parse_port(port),
        "tensor_parallel_size": tensor_parallel_size,
        "gpu_memory_utilization": gpu_memory_utilization,
        "max_model_len": max_model_len,
        "dtype": dtype,
        "gpus": gpus,
        "served_model_name": served_model_name,
        "task": task,
        "env": _parse_env(env_pairs),
        "distributed": distributed_values(dist_options),
        "drain": drain,
        "restart": restart_policy,
    }
    if saved:
        from cmw_vllm.systemd_unit import load_definition

        config = load_definition(target, options, vllm_args)
    else:
        config = _build_config(target, options, vllm_args)
    # What the user asked for explicitly: a running server with other values is an error.
    requested = {k for k, v in options.items() if v is not None and k != "name"}
    if vllm_args:
        requested.add("vllm_args")
    _warn_exposed(config.host, bool(api_key()))
    if config.distributed and config.distributed.executor_backend == "ray":
        from cmw_vllm.ray_node import ray_address

        cluster = ray_address()  # this machine's managed Ray node (`cmw-vllm ray start`)
        if cluster:
            os.environ.setdefault("RAY_ADDRESS", cluster)
    manager = ServerManager()
    if foreground:
        if no_wait or run_test or as_json:
            raise UsageError("--foreground does not go with --no-wait, --test or --json")
        _run_foreground(manager, config, auto_port, force)

    def do_start(on_progress: Any) -> StartResult:
        return manager.start(config, wait=not no_wait, timeout=timeout, auto_port=auto_port,
                             on_progress=on_progress, check_resources=not force,
                             on_notice=on_progress.note, requested=requested)

    if run_test and no_wait:
        raise UsageError("--test needs the server ready: drop --no-wait")
    result, elapsed = _run_start(do_start, config.name, quiet=as_json or no_wait)
    if not run_test:
        _report_start(result, as_json, elapsed)
        return
    from cmw_vllm.cli_inference import run_and_render_test

    if as_json:
        import json as _json

        from cmw_vllm.errors import CmwVllmError

        try:
            test = run_and_render_test(result.record, quiet=True)
            test_json, failure = test.to_json(), None
        except CmwVllmError as exc:
            test_json, failure = {"ok": False, "error": exc.message}, exc
        buffer = _start_json(result)
        buffer["test"] = test_json
        click.echo(_json.dumps(buffer, indent=2, default=str))
        if failure is not None:
            raise failure
        return
    _report_start(result, as_json, elapsed)
    run_and_render_test(result.record)


@click.command()
@click.argument("names", nargs=-1, metavar="[NAME]...")
@click.option("--all", "stop_all", is_flag=True, help="Stop every managed server.")
@click.option("--drain", type=click.FloatRange(min=0), metavar="SECONDS",
              help="Let requests in flight finish for at most this long (default: the "
              "server's --drain, which is also the most it can be).")
@click.option("--now", is_flag=True, help="Abort requests in flight: SIGKILL at once.")
@click.option("--timeout", type=click.FloatRange(min=0),
              help="Seconds vLLM gets to exit after the drain before SIGKILL (default 30, "
              "env CMW_VLLM_STOP_TIMEOUT).")
@click.option("--json", "as_json", is_flag=True, help="Print the result as JSON.")
def stop(names: tuple[str, ...], stop_all: bool, drain: float | None, now: bool,
         timeout: float | None, as_json: bool) -> None:
    """Stop servers: requests in flight finish (the drain), then nothing of them is left.

    SIGTERM goes to the API server, which takes no new requests and lets those in flight
    finish for up to the drain; whatever is left after the drain plus --timeout gets
    SIGKILL. `status` says `draining` meanwhile. Stopping a server that is not running
    says so and exits 0; a name that is neither a server nor a registry entry exits 3 with
    the closest names.

    \b
    JSON: {"servers": [{name, was_running, stale, invalid, forced, killed_pids,
          duration_s}]}; invalid: why an unreadable record was removed, else null

    \b
    Examples:
      cmw-vllm stop qwen
      cmw-vllm stop qwen --drain 5
      cmw-vllm stop --all --now
    """
    from cmw_vllm.server_manager import ServerManager

    if stop_all and names:
        raise UsageError("give server names or --all, not both")
    if not stop_all and not names:
        raise UsageError("name a server to stop, or pass --all")
    if now and drain is not None:
        raise UsageError("--now and --drain don't go together")
    manager = ServerManager()
    if stop_all:
        results = manager.stop_all(timeout=timeout, drain=drain, now=now)
    else:
        results = [manager.stop(n, timeout=timeout, drain=drain, now=now) for n in names]
    if as_json:
        echo_json({"servers": [
            {
                "name": r.name,
                "was_running": r.was_running,
                "stale": r.stale,
                "invalid": r.invalid,
                "forced": r.forced,
                "killed_pids": r.killed_pids,
                "duration_s": round(r.duration_s, 2),
            }
            for r in results
        ]})
        return
    if not results:
        click.echo("No managed servers.")
    for r in results:
        if r.was_running:
            how = "forced with SIGKILL" if r.forced else "graceful"
            click.echo(f"Stopped {r.name!r} ({how}, {r.duration_s:.1f}s).")
        elif r.invalid:
            click.echo(f"Server {r.name!r} had an unreadable record ({r.invalid}); removed it.")
        elif r.stale:
            click.echo(f"Server {r.name!r} was not running; removed its stale record.")
        elif r.killed_pids:
            click.echo(f"Server {r.name!r} had exited; killed leftover processes "
                       f"{', '.join(map(str, r.killed_pids))}.")
        else:
            click.echo(f"Server {r.name!r} is not running.")


@click.command()
@click.argument("name")
@click.option("--no-wait", is_flag=True, help="Return right after launching.")
@click.option("--timeout", type=click.FloatRange(min=0, min_open=True),
              help="Seconds to wait for readiness.")
@click.option("--drain", type=click.FloatRange(min=0), metavar="SECONDS",
              help="Let requests in flight finish for at most this long (default: the "
              "server's --drain).")
@click.option("--json", "as_json", is_flag=True, help="Print the result as JSON.")
def restart(name: str, no_wait: bool, timeout: float | None, drain: float | None,
            as_json: bool) -> None:
    """Restart a server with the settings of its last start (also after `stop`).

    The API key is VLLM_API_KEY when set, else the one the server was started with (kept
    in a private file). The previous log is kept as NAME.log.1 beside the new one.

    A gateway is run again in the background with the settings of its last run; one that
    runs in the foreground (a terminal, its systemd unit) is refused: restart it there.

    \b
    JSON: {name, state, already_running, model, pid, port, url, log, ready_after_s, role,
          node_rank, leader}, as for `cmw-vllm start --json`;
          for a gateway {name, pid, url, log}, as for `cmw-vllm gateway -d --json`.

    \b
    Examples:
      cmw-vllm restart qwen
      cmw-vllm restart gateway
    """
    from cmw_vllm.gateway.service import find_gateway
    from cmw_vllm.server_manager import ServerManager
    from cmw_vllm.vocab import validate_name

    validate_name(name)
    gateway = find_gateway(name)
    if gateway is not None:
        from cmw_vllm.cli_gateway import render_background
        from cmw_vllm.gateway.service import restart as restart_gateway

        render_background(restart_gateway(gateway, drain=drain, timeout=timeout or 60.0),
                          as_json)
        return

    manager = ServerManager()

    def do_restart(on_progress: Any) -> StartResult:
        return manager.restart(name, wait=not no_wait, timeout=timeout, on_progress=on_progress,
                               drain=drain)

    result, elapsed = _run_start(do_restart, name, quiet=as_json or no_wait)
    _warn_exposed(result.record.host, result.api_key)
    _report_start(result, as_json, elapsed)


def _run_foreground(manager: Any, config: Any, auto_port: bool, force: bool) -> None:
    """Launch under this process and supervise until stopped; exit with its status."""
    from cmw_vllm.supervisor import run_foreground

    result = manager.start(config, auto_port=auto_port, check_resources=not force,
                           foreground=True)
    record = result.record
    echo_err(f"Serving {result.name!r} in the foreground (vLLM pid {record.pid}, "
             f"{record.base_url}); SIGTERM or Ctrl-C drains and stops it.")
    raise SystemExit(run_foreground(result.name, result.process, result.env))


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
        return f"{st.state} ({rec.restart_count} restarts)"
    return str(st.state)


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
    from cmw_vllm.server_manager import ServerManager
    from cmw_vllm.server_record import record_names
    from cmw_vllm.vocab import validate_name

    manager = ServerManager()
    if names:
        for n in names:
            validate_name(n)
        known = set(record_names())
        missing = [n for n in names if n not in known]
        statuses = manager.list_status([n for n in names if n in known])
        for n in missing:
            if not quiet:
                echo_err(f"No managed server named {n!r}.")
        code = EXIT_NOT_RUNNING if missing else _status_exit_code(statuses)
    else:
        statuses = manager.list_status()
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


# --------------------------------------------------------------------------- status load


def status_load_columns(
    statuses: list[ServerStatus], timeout: float | None = None, *, store: bool = True
) -> dict[str, dict[str, Any]]:
    """Load of every healthy server in ``statuses``, scraped concurrently.

    One call costs at most about ``timeout`` seconds however many servers hang. Rates
    (tokens/s) come from the scrape stored by the previous call, so the first call after a
    while shows none.

    Args:
        statuses: From ``ServerManager().list_status()``.
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
STATUS_DROP = ("TOK/S", "WAIT", "RUN", "KV", "GPU MEM", "UPTIME", "PID", "PORT")
STATUS_SHRINK = ("MODEL",)


def _status_rows(
    statuses: list[ServerStatus], loads: dict[str, dict[str, Any]]
) -> tuple[list[str], list[list[str]]]:
    columns = ["NAME", "STATE", "MODEL", "PID", "PORT", "UPTIME", "GPU MEM", *LOAD_COLUMNS]
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
                format_duration(st.uptime) if st.running else "-",
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
    JSON: {"servers": [{name, state, model, served_model_name, task, pid, host, port, url,
           uptime_s, started_at, returncode, orphan_pids, log, error, log_tail, role,
           node_rank, leader, restart_policy, restarts, last_exit_code, last_exit_at,
           next_restart_at, drain_left_s, enabled, gpu_memory_bytes, load}]}; log_tail: the
           log lines that tell why an exited or failed server ended (else []); load is null
           or {ok, error, requests_running, requests_waiting, kv_cache_usage,
           prompt_tokens_total, generation_tokens_total, prompt_tokens_per_s,
           generation_tokens_per_s, rate_interval_s}; a leader also has cluster: {nnodes,
           data_parallel_size, world_size, rendezvous, followers_seen}.

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
    if as_json:
        servers = []
        for st in statuses:
            data = st.to_json()
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


@click.command()
@click.argument("name")
@click.option("-n", "--lines", type=click.IntRange(min=0), default=50, show_default=True,
              help="How many lines from the end.")
@click.option("-f", "--follow", is_flag=True, help="Keep printing new lines until Ctrl-C.")
@click.option("--previous", is_flag=True,
              help="Show the log of the run before the last start or restart.")
def logs(name: str, lines: int, follow: bool, previous: bool) -> None:
    """Show a server's log (vLLM's output).

    \b
    Examples:
      cmw-vllm logs qwen -n 100
      cmw-vllm logs qwen -f
    """
    from cmw_vllm.errors import NotFoundError
    from cmw_vllm.server_record import log_path
    from cmw_vllm.vllm_engine import tail_lines
    from cmw_vllm.vocab import validate_name

    validate_name(name)
    path = log_path(name)
    if previous:
        current = path
        path = path.with_name(path.name + ".1")
        if not path.exists() and current.exists():
            raise NotFoundError(
                f"server {name!r} has no earlier run: the previous run's log ({path.name}) "
                "is kept from its next restart on",
                hint=f"cmw-vllm logs {name} shows the current run",
            )
    if not path.exists():
        raise NotFoundError(f"no log for server {name!r} ({path})")
    for line in tail_lines(path, lines):
        click.echo(line)
    if not follow:
        return
    _follow(path)


def _follow(path: Any) -> None:
    fh = path.open("rb")
    fh.seek(0, os.SEEK_END)
    inode = os.fstat(fh.fileno()).st_ino
    try:
        while True:
            chunk = fh.read()
            if chunk:
                sys.stdout.write(chunk.decode("utf-8", errors="replace"))
                sys.stdout.flush()
                continue
            try:
                if os.stat(path).st_ino != inode:  # restarted: the log was rotated
                    fh.close()
                    fh = path.open("rb")
                    inode = os.fstat(fh.fileno()).st_ino
                    continue
            except FileNotFoundError:
                pass
            time.sleep(0.25)
    finally:  # Ctrl-C goes on to the group: "Interrupted.", exit 130
        fh.close()


COMMANDS: list[click.Command] = [start, stop, restart, status, logs]
