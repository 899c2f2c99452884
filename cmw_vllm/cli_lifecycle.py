"""CLI commands for server lifecycle: start, stop, restart, logs (status: cli_status)."""

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
    stderr_is_tty,
)
from cmw_vllm.cli_multinode import distributed_values, multinode_options
from cmw_vllm.errors import UsageError
from cmw_vllm.vocab import (
    CLI_DTYPES,
    LOOPBACK,
    RESTART_POLICIES,
    TASKS,
    State,
    Task,
    parse_port,
)

if TYPE_CHECKING:
    from cmw_vllm.server_manager import StartResult
    from cmw_vllm.server_record import ServerRecord


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
        click.echo(_ready_line(result.name, record, elapsed))
    else:
        click.echo(f"Server {result.name!r} is starting ({record.model}, pid {record.pid}).")
        click.echo(f"  Log:      {record.log_path}")
        click.echo(f"  Check:    cmw-vllm status {result.name}")
    if record.role == "follower":  # headless: the leader serves the API
        state = "has joined" if result.ready else "joins"
        click.echo(f"  Follower: rank {record.node_rank}, {state} the leader at {record.leader}")
        return
    click.echo(f"  Endpoint: {record.base_url}/v1")
    if (record.config or {}).get("gpus") and not result.already_running:
        share = record.config.get("gpu_memory_utilization")
        click.echo(f"  GPUs:     {record.config['gpus']}"
                   + (f" (share {share:g} of each)" if isinstance(share, float) else ""))
    if result.ready:
        click.echo(f"  Try:      {_example_request(record, ' ' * 12, result.api_key)}")


def _ready_line(name: str, record: ServerRecord, elapsed: float) -> str:
    """``Server 'x' is ready (model, pid N, 12.3s).``: the background and foreground starts'."""
    return f"Server {name!r} is ready ({record.model}, pid {record.pid}, {elapsed:.1f}s)."


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
    from cmw_vllm.lora_adapters import with_adapters
    from cmw_vllm.model_registry import resolve_target
    from cmw_vllm.server_config import resolve_server_config

    resolved = resolve_target(target)
    cli_values = dict(options)
    cli_values["vllm_args"] = list(vllm_args) or None
    return resolve_server_config(
        resolved.model,
        entry_settings=with_adapters(resolved.entry, resolved.settings),
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


def _misplaced_vllm_flags(command: click.Command, args: list[str],
                          prefix: tuple[str, ...] = ("cmw-vllm", "start")) -> UsageError | None:
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
    fixed = [*prefix, *kept, "--", *moved, *args[split + 1:]]
    return UsageError(
        f"{', '.join(names)} "
        + ("is a vLLM flag, not a cmw-vllm option" if len(names) == 1
           else "are vLLM flags, not cmw-vllm options")
        + ": put vLLM flags after `--`",
        hint=shlex.join(fixed),
    )


class _StartCommand(click.Command):
    """``start`` (and ``export``): vLLM flags given before ``--`` get a clear error, never a
    look-alike."""

    def parse_args(self, ctx: click.Context, args: list[str]) -> list[str]:
        """Parse as click does; on an unknown option, check it against vLLM's flags."""
        try:
            return super().parse_args(ctx, list(args))
        except click.NoSuchOption:
            error = _misplaced_vllm_flags(self, list(args),
                                          ("cmw-vllm", *ctx.command_path.split()[1:]))
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
@click.option("--gpu-memory-utilization", metavar="FRACTION|auto",
              help="Fraction (0, 1] of each GPU's memory this server may use; auto sizes it "
              "from the estimate so that small models share a GPU (default: vLLM's 0.92).")
@click.option("--max-model-len", type=int, help="Maximum context length in tokens.")
@click.option("--dtype", type=click.Choice(CLI_DTYPES),
              help="Weight and activation dtype (default auto: the checkpoint's, env "
              "CMW_VLLM_DTYPE).")
@click.option("--gpus", help="GPUs this server uses, e.g. 0,1 (sets CUDA_VISIBLE_DEVICES); "
              "auto (the default) places it on the GPUs that have room.")
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
    gpu_memory_utilization: str | None,
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
           leader}; with --test also test: the object of `cmw-vllm test --json` (failed:
           {ok: false, error, hint, exit_code}).

    \b
    Several machines: the rank-0 node (--node-rank 0) serves the API, the others run
    headless and are ready once they joined it (docs/multinode.md).

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
    _refuse_gateway(target, name, saved)
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
        from cmw_vllm.ray_node import driver_env, ray_address, read_node

        cluster = ray_address()  # this machine's managed Ray node (`cmw-vllm ray start`)
        if cluster:
            os.environ.setdefault("RAY_ADDRESS", cluster)
            for key, value in driver_env(read_node()).items():  # its token auth mode
                os.environ.setdefault(key, value)
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
        from cmw_vllm.errors import CmwVllmError

        try:
            test = run_and_render_test(result.record, quiet=True)
            test_json, failure = test.to_json(), None
        except CmwVllmError as exc:
            test_json = {"ok": False, "error": exc.message, "hint": exc.hint,
                         "exit_code": exc.exit_code}
            failure = exc
        buffer = _start_json(result)
        buffer["test"] = test_json
        echo_json(buffer)
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
@click.option("--force", is_flag=True,
              help="Skip the memory check (the other checks still run).")
@click.option("--json", "as_json", is_flag=True, help="Print the result as JSON.")
def restart(name: str, no_wait: bool, timeout: float | None, drain: float | None,
            force: bool, as_json: bool) -> None:
    """Restart a server as its last start ran it (also after `stop`).

    It keeps the settings, the vLLM interpreter and the VLLM_*, CMW_VLLM_*, HF_* (and
    CUDA_VISIBLE_DEVICES) variables of the last start; they win over this shell's, which it
    names when they differ. To change them: `cmw-vllm stop NAME`, then `cmw-vllm start`
    with the new ones. The API key is VLLM_API_KEY when set, else the one the server was
    started with (kept in a private file). The previous log is kept as NAME.log.1 beside
    the new one.

    Before it stops the server it checks that the interpreter has vLLM, the model is found
    and fits (the memory check of `start`), and the port is free; when one fails, the
    running server is left as it was.

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
                               drain=drain, check_resources=not force,
                               on_notice=on_progress.note)

    result, elapsed = _run_start(do_restart, name, quiet=as_json or no_wait)
    _warn_exposed(result.record.host, result.api_key)
    _report_start(result, as_json, elapsed)


def _refuse_gateway(target: str, name: str | None, saved: bool) -> None:
    """``start`` of a gateway's name (``--saved``, or no ``--name``): say how a gateway runs.

    Raises:
        GatewayNotServerError: ``target`` is a gateway by its record or last run, or (with
            ``--saved``) the default gateway's name with no saved server of that name.
    """
    import shlex

    from cmw_vllm.errors import GatewayNotServerError
    from cmw_vllm.server_manager import ServerManager
    from cmw_vllm.vocab import is_valid_name

    if (name is not None and not saved) or not is_valid_name(target):
        return  # a model to serve under another name, or a model path or Hub id
    from cmw_vllm.gateway.service import find_gateway
    from cmw_vllm.gateway.settings import DEFAULT_NAME

    known = find_gateway(target)
    if known is None:
        from cmw_vllm.systemd_unit import definition_path

        if not (saved and target == DEFAULT_NAME and not definition_path(target).exists()):
            return
        command = "cmw-vllm gateway"
    else:
        command = shlex.join(["cmw-vllm", "gateway", *known.settings.cli_args()])
    if known is None:
        hint = f"its systemd unit: cmw-vllm enable {target}"
    elif known.record is not None and ServerManager().get_status(
            target, check_health=False).running:
        hint = f"it already runs (pid {known.record.pid}); `cmw-vllm stop {target}` stops it"
    else:
        hint = f"`cmw-vllm restart {target}` runs it in the background with its last settings"
    raise GatewayNotServerError(
        f"{target!r} is a gateway, not a vLLM server: run it with `{command}`", hint=hint)


def _run_foreground(manager: Any, config: Any, auto_port: bool, force: bool) -> None:
    """Launch under this process and supervise until stopped; exit with its status."""
    from cmw_vllm.supervisor import ignore_stop_signals, run_foreground

    begin = time.monotonic()
    result = manager.start(config, auto_port=auto_port, check_resources=not force,
                           foreground=True)
    record = result.record
    echo_err(f"Serving {result.name!r} in the foreground (vLLM pid {record.pid}, "
             f"{record.base_url}); SIGTERM or Ctrl-C drains and stops it.")

    def ready(now: ServerRecord) -> None:  # on stderr: stdout is vLLM's output
        echo_err(_ready_line(result.name, now, time.monotonic() - begin))
        echo_err(f"  Endpoint: {now.base_url}/v1")

    status = run_foreground(result.name, result.process, result.env, on_ready=ready)
    ignore_stop_signals()  # stopped: a late SIGTERM must not change the exit status
    raise SystemExit(status)


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


COMMANDS: list[click.Command] = [start, stop, restart, logs]
