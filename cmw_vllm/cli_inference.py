"""CLI commands that talk to running servers: test; registered by ``cli.py``.

Also the helpers ``start --test`` and ``status`` use: :func:`run_and_render_test` and
:func:`status_load_columns` / :func:`load_cells`.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import click

from cmw_vllm.cli_common import echo_json, format_duration
from cmw_vllm.errors import EXIT_FAILURE, CmwVllmError

if TYPE_CHECKING:
    from cmw_vllm.health_check import LoadInfo
    from cmw_vllm.inference_test import TestResult
    from cmw_vllm.server_manager import ServerRecord, ServerStatus

TASK_CHOICES = ["generate", "embed", "score", "classify"]

# Columns status adds per server (see :func:`load_cells`).
LOAD_COLUMNS = ["RUN", "WAIT", "KV", "TOK/S"]


# --------------------------------------------------------------------------- test


class ServerNotHealthyError(CmwVllmError):
    """``test`` was asked to test a server that is not healthy (exit code by its state)."""

    def __init__(self, message: str, exit_code: int, hint: str | None = None) -> None:
        super().__init__(message, hint)
        self.exit_code = exit_code


def _ms(seconds: float | None) -> str:
    return "-" if seconds is None else f"{seconds * 1000:.0f} ms"


def _render_result(name: str, result: TestResult) -> None:
    click.echo(f"Test of {name!r} passed ({result.task}, model {result.model}, "
               f"{result.endpoint}).")
    if result.task == "generate":
        reply = (result.reply or "").replace("\n", " ")
        if len(reply) > 200:
            reply = reply[:197] + "..."
        click.echo(f"  Reply:        {reply!r}")
        click.echo(f"  Tokens:       {result.prompt_tokens} prompt, "
                   f"{result.completion_tokens} completion ({result.finish_reason or '-'})")
        click.echo(f"  First token:  {_ms(result.ttft_s)}")
        click.echo(f"  Total:        {_ms(result.total_s)}")
        speed = f"{result.tokens_per_s:.1f} tokens/s" if result.tokens_per_s else "-"
        if result.decode_tokens_per_s:
            speed += f" (after the first token: {result.decode_tokens_per_s:.1f} tokens/s)"
        click.echo(f"  Speed:        {speed}")
    elif result.task == "embed":
        click.echo(f"  Inputs:       {len(result.inputs)}")
        click.echo(f"  Dimension:    {result.dimension}")
        click.echo(f"  Total:        {_ms(result.total_s)}")
    elif result.task == "score":
        click.echo(f"  Query:        {result.query!r}")
        for rank, doc in enumerate(result.ranking, 1):
            click.echo(f"  {rank}. {doc.score:+.4f}  {doc.document!r}")
        click.echo(f"  Total:        {_ms(result.total_s)}")
    else:
        click.echo(f"  Input:        {result.inputs[0]!r}")
        top = max(result.probs) if result.probs else None
        prob = f" (p={top:.3f})" if top is not None else ""
        click.echo(f"  Label:        {result.label}{prob} of {result.num_classes} classes")
        click.echo(f"  Total:        {_ms(result.total_s)}")


def run_and_render_test(
    record: ServerRecord,
    *,
    task: str | None = None,
    prompt: str | None = None,
    max_tokens: int | None = None,
    timeout: float | None = None,
    as_json: bool = False,
    quiet: bool = False,
) -> TestResult:
    """Test a running server and print the result (``test`` and ``start --test``).

    Args:
        record: The server's record (base_url, served_model_name, task).
        task: Override the record's task.
        prompt: The prompt / input / query (default: a built-in sample).
        max_tokens: generate: most tokens to generate.
        timeout: Seconds the request may take.
        as_json: Print JSON (stable keys) instead of text; on failure too, before raising.
        quiet: Print nothing (a caller that merges ``TestResult.to_json()`` into its own
            output, e.g. ``start --test --json``).

    Returns:
        The measurements.

    Raises:
        InferenceTestError: The server failed the test (after the JSON was printed).
    """
    from cmw_vllm.inference_test import DEFAULT_MAX_TOKENS, DEFAULT_TIMEOUT, run_test
    from cmw_vllm.settings import api_key

    chosen = task or record.task or "generate"
    try:
        result = run_test(
            record.base_url,
            record.served_model_name,
            chosen,
            prompt=prompt,
            max_tokens=max_tokens or DEFAULT_MAX_TOKENS,
            api_key=api_key(),
            timeout=timeout or DEFAULT_TIMEOUT,
        )
    except CmwVllmError as exc:
        if as_json and not quiet:
            echo_json({"name": record.name, "ok": False, "task": chosen,
                       "model": record.served_model_name, "url": record.base_url,
                       "error": exc.message, "hint": exc.hint})
        raise
    if as_json and not quiet:
        echo_json({"name": record.name, **result.to_json()})
    elif not quiet:
        _render_result(record.name, result)
    return result


@click.command(name="test")
@click.argument("name")
@click.option("--task", type=click.Choice(TASK_CHOICES),
              help="Which test to run (default: the task the server was started with).")
@click.option("--prompt", help="The prompt (generate), input (embed, classify) or query (score).")
@click.option("--max-tokens", type=click.IntRange(min=1), default=32, show_default=True,
              help="Most tokens to generate.")
@click.option("--timeout", type=click.FloatRange(min=0, min_open=True), default=60.0,
              show_default=True, help="Seconds the request may take.")
@click.option("--json", "as_json", is_flag=True, help="Print JSON (stable keys).")
def test_cmd(
    name: str,
    task: str | None,
    prompt: str | None,
    max_tokens: int,
    timeout: float,
    as_json: bool,
) -> None:
    """Prove a running server works: one request for its task, with timings.

    generate: a streamed chat completion (time to first token, tokens/s, reply, token
    counts from the server's usage); embed: embeddings of a few inputs (dimension, time);
    score: a query ranked against a few documents; classify: a sample classified.
    Exits 0 when the server passes, 1 with the reason when it fails (or is unhealthy), 3
    when it is not running or unknown, 4 while it is still starting.

    \b
    JSON: {name, ok, task, model, url, endpoint, total_s, and by task:
           generate: ttft_s, tokens_per_s, decode_tokens_per_s, prompt_tokens,
                     completion_tokens, finish_reason, reply;
           embed: inputs, dimension, prompt_tokens;
           score: query, ranking [{index, score, document}], prompt_tokens;
           classify: input, label, num_classes, probs, prompt_tokens}.
          On failure: {name, ok: false, task, model or state, url, error, hint}.

    \b
    Examples:
      cmw-vllm test qwen
      cmw-vllm test qwen --prompt "Write a haiku about GPUs" --max-tokens 64
      cmw-vllm test qwen3-embedding-0.6b --json | jq .dimension
      cmw-vllm start qwen && cmw-vllm test qwen --timeout 120
    """
    from cmw_vllm.errors import EXIT_NOT_RUNNING, EXIT_STARTING, NotFoundError
    from cmw_vllm.server_manager import HEALTHY, STARTING, ServerManager

    try:
        status = ServerManager().get_status(name)
    except NotFoundError as exc:
        raise ServerNotHealthyError(exc.message, EXIT_NOT_RUNNING,
                                    hint="see `cmw-vllm status` for the managed servers") from None
    if status.state != HEALTHY or status.record is None:
        state = status.state
        if status.state == "exited" and status.returncode is not None:
            state = f"exited with code {status.returncode}"
        if status.state == STARTING:
            code = EXIT_STARTING
        elif not status.running:
            code = EXIT_NOT_RUNNING
        else:
            code = EXIT_FAILURE
        err = ServerNotHealthyError(
            f"server {name!r} is {state}, not healthy", code,
            hint=f"see `cmw-vllm status {name}` and `cmw-vllm logs {name}`",
        )
        if as_json:
            echo_json({"name": name, "ok": False, "task": task, "state": status.state,
                       "error": err.message, "hint": err.hint})
        raise err
    run_and_render_test(status.record, task=task, prompt=prompt, max_tokens=max_tokens,
                        timeout=timeout, as_json=as_json)


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
    from cmw_vllm.server_manager import HEALTHY
    from cmw_vllm.settings import health_timeout

    records = [s.record for s in statuses if s.state == HEALTHY and s.record is not None]
    if not records:
        return {}
    loads: dict[str, LoadInfo] = collect_load(
        records, health_timeout() if timeout is None else timeout, store=store
    )
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


def describe_load(load: dict[str, Any] | None) -> str:
    """One line for a server's load (for a plain, non-table view), e.g. in ``status NAME``."""
    if not load:
        return "load: -"
    if not load.get("ok"):
        return f"load: unavailable ({load.get('error')})"
    run, wait, kv, rate = load_cells(load)
    interval = load.get("rate_interval_s")
    over = f" over {format_duration(interval)}" if interval else ""
    return f"load: {run} running, {wait} waiting, KV cache {kv}, {rate} tokens/s{over}"


COMMANDS: list[click.Command] = [test_cmd]
