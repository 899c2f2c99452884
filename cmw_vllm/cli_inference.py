"""CLI commands that talk to running servers: test; registered by ``cli.py``.

Also the helper ``start --test`` uses: :func:`run_and_render_test`.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import click

from cmw_vllm.cli_common import echo_json
from cmw_vllm.errors import CmwVllmError
from cmw_vllm.vocab import TASKS, Task

if TYPE_CHECKING:
    from cmw_vllm.inference_check import CheckResult
    from cmw_vllm.server_record import ServerRecord


def _ms(seconds: float | None) -> str:
    return "-" if seconds is None else f"{seconds * 1000:.0f} ms"


def _render_result(name: str, result: CheckResult) -> None:
    click.echo(f"Test of {name!r} passed ({result.task}, model {result.model}, "
               f"{result.endpoint}).")
    if result.task == Task.GENERATE:
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
    elif result.task == Task.EMBED:
        click.echo(f"  Inputs:       {len(result.inputs)}")
        click.echo(f"  Dimension:    {result.dimension}")
        click.echo(f"  Total:        {_ms(result.total_s)}")
    elif result.task == Task.SCORE:
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
) -> CheckResult:
    """Test a running server and print the result (``test`` and ``start --test``).

    Args:
        record: The server's record (base_url, served_model_name, task).
        task: Override the record's task.
        prompt: The prompt / input / query (default: a built-in sample).
        max_tokens: generate: most tokens to generate.
        timeout: Seconds the request may take.
        as_json: Print JSON (stable keys) instead of text; on failure too, before raising.
        quiet: Print nothing (a caller that merges ``CheckResult.to_json()`` into its own
            output, e.g. ``start --test --json``).

    Returns:
        The measurements.

    Raises:
        InferenceCheckError: The server failed the test (after the JSON was printed).
    """
    from cmw_vllm.inference_check import DEFAULT_MAX_TOKENS, DEFAULT_TIMEOUT, run_check
    from cmw_vllm.settings import api_key

    chosen = task or record.task or Task.GENERATE
    try:
        result = run_check(
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
                       "error": exc.message, "hint": exc.hint, "exit_code": exc.exit_code})
        raise
    if as_json and not quiet:
        echo_json({"name": record.name, **result.to_json()})
    elif not quiet:
        _render_result(record.name, result)
    return result


@click.command(name="test")
@click.argument("name")
@click.option("--task", type=click.Choice(TASKS),
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
    Exits 0 when the server passes, 1 with the reason when it fails (or is unhealthy,
    exited or stale), 3 when no server has that name, 4 while it is still starting: the
    codes `status` gives. For a gateway: /v1/models answers (with a key from
    CMW_VLLM_GATEWAY_API_KEYS or its key file when it has keys) and lists its models.

    \b
    JSON: {name, ok, task, model, url, endpoint, total_s, and by task:
           generate: ttft_s, tokens_per_s, decode_tokens_per_s, prompt_tokens,
                     completion_tokens, finish_reason, reply;
           embed: inputs, dimension, prompt_tokens;
           score: query, ranking [{index, score, document}], prompt_tokens;
           classify: input, label, num_classes, probs, prompt_tokens}.
          gateway: models [{id, state}].
          On failure: {name, ok: false, task, model or state, url, error, hint,
          exit_code}.

    \b
    Examples:
      cmw-vllm test qwen
      cmw-vllm test qwen --prompt "Write a haiku about GPUs" --max-tokens 64
      cmw-vllm test qwen3-embedding-0.6b --json | jq .dimension
      cmw-vllm start qwen && cmw-vllm test qwen --timeout 120
    """
    from cmw_vllm.errors import EXIT_FAILURE, ServerNotHealthyError
    from cmw_vllm.server_manager import ServerManager
    from cmw_vllm.vocab import STATE_EXIT_CODES, State

    status = ServerManager().get_status(name)
    if status.state != State.HEALTHY or status.record is None:
        state = status.state
        if status.state == State.EXITED and status.returncode is not None:
            state = f"exited with code {status.returncode}"
        err = ServerNotHealthyError(
            f"server {name!r} is {state}, not healthy",
            STATE_EXIT_CODES[status.state] or EXIT_FAILURE,
            hint=f"see `cmw-vllm status {name}` and `cmw-vllm logs {name}`",
        )
        if as_json:
            echo_json({"name": name, "ok": False, "task": task, "state": status.state,
                       "error": err.message, "hint": err.hint, "exit_code": err.exit_code})
        raise err
    from cmw_vllm.vocab import GATEWAY_TASK

    if status.record.task == GATEWAY_TASK:
        _test_gateway(status.record, timeout, as_json)
        return
    run_and_render_test(status.record, task=task, prompt=prompt, max_tokens=max_tokens,
                        timeout=timeout, as_json=as_json)


def _test_gateway(record: ServerRecord, timeout: float, as_json: bool) -> None:
    """``test`` of a gateway: it answers, and lists its models."""
    from cmw_vllm.gateway.service import check
    from cmw_vllm.vocab import GATEWAY_TASK

    try:
        result = check(record, timeout=timeout)
    except CmwVllmError as exc:
        if as_json:
            echo_json({"name": record.name, "ok": False, "task": GATEWAY_TASK,
                       "url": record.base_url, "error": exc.message, "hint": exc.hint,
                       "exit_code": exc.exit_code})
        raise
    if as_json:
        echo_json({"name": record.name, **result.to_json()})
        return
    click.echo(f"Test of gateway {record.name!r} passed ({record.base_url}/v1, "
               f"{_ms(result.total_s)}): {len(result.models)} models, {result.running} "
               "running")
    for model in result.models:
        if model.get("state") != "startable":
            click.echo(f"  {model.get('id')}: {model.get('state')}")


COMMANDS: list[click.Command] = [test_cmd]
