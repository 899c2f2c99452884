"""CLI commands for models: list, download, verify; registered by ``cli.py``."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import click

from cmw_vllm.cli_common import (
    echo_err,
    echo_json,
    format_bytes,
    format_duration,
    stderr_is_tty,
)
from cmw_vllm.errors import EXIT_FAILURE, UsageError

if TYPE_CHECKING:
    from cmw_vllm.model_downloader import DownloadPlan, DownloadResult, ProgressBar
    from cmw_vllm.model_verifier import VerifyReport

COMMANDS: list[click.Command] = []

PLAIN_PROGRESS_INTERVAL = 10.0  # seconds between plain progress lines


def _resolve(name: str) -> tuple[str, bool]:
    """(HF repo id or directory, is it a directory) for an alias, adapter, repo id or path."""
    from cmw_vllm.model_registry import resolve_target

    adapter = _adapter(name)
    if adapter is not None:
        return adapter.local_source(), adapter.is_local
    target = resolve_target(name)
    return str(target.model), bool(target.is_local)


def _adapter(name: str) -> Any:
    """The LoRA adapter declared under ``name`` in models.toml, if ``name`` is one."""
    from cmw_vllm.model_registry import find_adapter
    from cmw_vllm.vocab import looks_like_path

    if looks_like_path(name) or "/" in name:
        return None
    return find_adapter(name)


def _check_adapter_fit(name: str, report: VerifyReport) -> None:
    """Add a problem to ``report`` when adapter ``name`` does not fit its base model."""
    from cmw_vllm.errors import NotFoundError
    from cmw_vllm.lora_adapters import check_adapter
    from cmw_vllm.model_registry import all_entries
    from cmw_vllm.model_verifier import Problem

    adapter = _adapter(name)
    if adapter is None or not report.ok:
        return
    try:
        check_adapter(adapter, all_entries()[adapter.base])
    except NotFoundError:
        return  # reported by verify already
    except UsageError as exc:
        report.problems.append(Problem("config", "adapter_config.json", exc.message))


def _short(commit: str | None) -> str:
    return commit[:12] if commit else "-"


# --------------------------------------------------------------------------------------------
# Progress drawing: one rich bar of bytes on a terminal, else a plain line now and then


def _rich_bytes_progress(label: str, *extra: Any) -> Any:
    """A rich Progress on stderr: label, bar, bytes, speed, time left, then ``extra``."""
    from rich.progress import (
        BarColumn,
        DownloadColumn,
        Progress,
        TextColumn,
        TimeRemainingColumn,
        TransferSpeedColumn,
    )

    from cmw_vllm.cli_common import console

    return Progress(TextColumn(label), BarColumn(), DownloadColumn(binary_units=True),
                    TransferSpeedColumn(), TimeRemainingColumn(), *extra,
                    console=console(stderr=True), transient=False)


class _PlainTicker:
    """Writes a progress line to stderr at most every PLAIN_PROGRESS_INTERVAL seconds.

    Worker threads call it; a lock keeps their counts and lines apart.
    """

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.last = time.monotonic()

    def due(self) -> bool:
        """True when the interval has passed (call with :attr:`lock` held)."""
        return time.monotonic() - self.last >= PLAIN_PROGRESS_INTERVAL

    def write(self, text: str) -> None:
        """Write one line now (call with :attr:`lock` held)."""
        echo_err(text)
        self.last = time.monotonic()


def _rich_download_progress(plan: DownloadPlan) -> tuple[type[ProgressBar], Any]:
    """A ProgressBar subclass drawing one rich bar (bytes, speed, ETA, files) on stderr."""
    from rich.progress import TextColumn

    from cmw_vllm.model_downloader import ProgressBar

    progress = _rich_bytes_progress("[bold]{task.description}", TextColumn("{task.fields[files]}"))
    task = progress.add_task(plan.repo_id, total=plan.bytes_to_fetch or None,
                             files=f"0/{len(plan.files)} files")

    class RichBar(ProgressBar):
        def on_update(self) -> None:
            if self.kind == "bytes":
                progress.update(task, completed=self.n)
            elif self.kind == "files":
                progress.update(task, files=f"{int(self.n)}/{int(self.total or 0)} files")

    return RichBar, progress


def _plain_download_progress(plan: DownloadPlan) -> type[ProgressBar]:
    """A ProgressBar subclass writing a line per finished file and every few seconds."""
    from cmw_vllm.model_downloader import ProgressBar

    state = {"bytes": 0.0, "files": 0}
    ticker = _PlainTicker()
    total_files = len(plan.files)

    def line() -> None:
        ticker.write(f"  {state['files']}/{total_files} files, "
                     f"{format_bytes(state['bytes'])} of {format_bytes(plan.bytes_to_fetch)}")

    class PlainBar(ProgressBar):
        def on_update(self) -> None:
            with ticker.lock:
                if self.kind == "bytes":
                    state["bytes"] = self.n
                    if ticker.due():
                        line()
                elif self.kind == "files" and int(self.n) != state["files"]:
                    state["files"] = int(self.n)
                    line()

    return PlainBar


def _hash_progress(full: bool, as_json: bool) -> tuple[dict[str, Any], Any]:
    """Callbacks for :func:`verify_model` that draw hashing progress, and the rich
    Progress to stop afterwards (None when nothing is drawn or lines are plain)."""
    if not full:
        return {}, None
    if stderr_is_tty():
        progress = _rich_bytes_progress("[bold]hashing")
        task = progress.add_task("hash", total=None)

        def start(files: int, total: int) -> None:
            progress.update(task, total=total)
            progress.start()

        return {"on_hash_start": start,
                "progress": lambda n: progress.advance(task, n)}, progress
    if as_json:
        return {}, None
    state = {"done": 0, "total": 0}
    ticker = _PlainTicker()

    def start_plain(files: int, total: int) -> None:
        state["total"] = total
        echo_err(f"Hashing {files} files, {format_bytes(total)}")

    def advance_plain(n: int) -> None:
        with ticker.lock:
            state["done"] += n
            if ticker.due():
                ticker.write(f"  {format_bytes(state['done'])} of {format_bytes(state['total'])}")

    return {"on_hash_start": start_plain, "progress": advance_plain}, None


# --------------------------------------------------------------------------------------------
# Rendering reports


def _print_verify(report: VerifyReport, repair_target: str | None) -> None:
    for problem in report.problems:
        click.echo(f"  {problem.kind:<11} {problem}")
    what = f"{report.files_checked} files, {format_bytes(report.bytes_checked)}"
    nothing_hashed = report.mode == "full" and not report.files_hashed and report.files_checked
    if report.mode == "full":
        what += f", {report.files_hashed} hashed"
        if report.files_without_hash:
            what += f", {report.files_without_hash} without a recorded hash"
    took = f"{report.seconds:.2f}s" if report.seconds < 60 else format_duration(report.seconds)
    if report.ok:
        verdict = "OK (fast checks only)" if nothing_hashed else "OK"
        click.echo(f"Verify ({report.mode}): {verdict}, {what} in {took}")
    else:
        count = len(report.problems)
        click.echo(f"Verify ({report.mode}): FAILED, {count} problem{'s' if count != 1 else ''} "
                   f"({what})")
    if nothing_hashed:
        why = ("a local folder has no Hub records" if report.source == "local"
               else "the cache holds no Hub records of these files")
        click.echo(f"Nothing could be hashed: {why}.")
    if report.partial:
        click.echo("Checked only the files --include/--exclude chose when downloading.")
    if not report.ok and repair_target and report.files_to_repair:
        click.echo(f"Repair with: cmw-vllm download {repair_target} --repair")


# --------------------------------------------------------------------------------------------
# download


@click.command()
@click.argument("name")
@click.option("--revision", "-r", default=None, help="Branch, tag or commit (default: main).")
@click.option("--include", "include", multiple=True, metavar="PATTERN",
              help="Download only files matching this glob (repeatable); replaces the default "
                   "selection.")
@click.option("--exclude", "exclude", multiple=True, metavar="PATTERN",
              help="Leave out files matching this glob (repeatable).")
@click.option("--local-dir", type=click.Path(file_okay=False, path_type=Path), default=None,
              help="Download into this directory instead of the Hugging Face cache.")
@click.option("--force", is_flag=True, help="Download even when free disk space looks too small.")
@click.option("--repair", is_flag=True,
              help="Hash the copy on disk and fetch again exactly the files that fail.")
@click.option("--json", "as_json", is_flag=True, help="Print the result as JSON.")
@click.pass_context
def download(ctx: click.Context, name: str, revision: str | None, include: tuple[str, ...],
             exclude: tuple[str, ...], local_dir: Path | None, force: bool, repair: bool,
             as_json: bool) -> None:
    """Download a model from the Hugging Face Hub, then verify it.

    NAME is a registry alias or a Hugging Face repo id. By default only what vLLM needs is
    fetched: safetensors weights, configs, tokenizer and chat template files (PyTorch .bin
    weights only when the repo has no safetensors). Files land in the Hugging Face cache
    (HF_HOME) unless --local-dir is given. Gated repos need HF_TOKEN. Running it again on a
    complete download finishes without fetching anything; after Ctrl-C it carries on.

    Exits 0 when the files are there and verify is happy, 1 when verify finds problems,
    7 when disk space is short, 8 when the Hub cannot be reached or refuses access, 9 when
    the repo or revision does not exist.

    JSON keys: ok, repo_id, revision, commit, path, already_complete, offline,
    bytes_downloaded, seconds, plan {repo_id, revision, commit, target, files,
    files_to_fetch, bytes_total, bytes_to_fetch, free_bytes, repair}, verify (as in
    `cmw-vllm verify --json`).

    \b
    Examples:
      cmw-vllm download qwen
      cmw-vllm download Qwen/Qwen3-0.6B --revision main
      cmw-vllm download org/model --include '*.safetensors' --include '*.json'
      cmw-vllm download org/model --local-dir ./models/model
      cmw-vllm download org/model --repair      # fetch again what verify --full flags
      cmw-vllm download org/model --json
    """
    from cmw_vllm.model_downloader import download_model

    repo_id, is_local = _resolve(name)
    if is_local:
        raise UsageError(f"{name} is a local directory; there is nothing to download",
                         hint=f"check it with: cmw-vllm verify {name}")
    adapter = _adapter(name)
    if adapter is not None and revision is None:
        revision = adapter.revision

    drawing = _DownloadDrawing(as_json)
    try:
        result = download_model(
            repo_id, revision=revision, include=include, exclude=exclude, local_dir=local_dir,
            force=force, repair=repair, progress_class=drawing.bar, on_plan=drawing.on_plan,
        )
    finally:
        drawing.stop()
    if adapter is not None:
        _check_adapter_fit(name, result.verify)
    _report_download(result, name, as_json)
    if not result.ok:
        ctx.exit(EXIT_FAILURE)


def _announce_plan(plan: DownloadPlan) -> None:
    """One line on stderr: what the download will fetch, before any byte is fetched."""
    if plan.repair:
        echo_err(f"Repairing {plan.repo_id}@{_short(plan.commit)}: fetching "
                 f"{len(plan.repair)} file(s) again, {format_bytes(plan.bytes_to_fetch)}")
    elif plan.bytes_to_fetch == 0:
        echo_err(f"{plan.repo_id}@{plan.revision}: all {len(plan.files)} files are on disk")
    else:
        echo_err(f"Downloading {plan.repo_id}@{plan.revision} (commit {_short(plan.commit)}): "
                 f"{plan.files_to_fetch} of {len(plan.files)} files, "
                 f"{format_bytes(plan.bytes_to_fetch)} to fetch, "
                 f"{format_bytes(plan.free_bytes)} free in {plan.target}")


class _DownloadDrawing:
    """Announces the plan, then draws the download's progress: a rich bar on a terminal,
    plain lines otherwise, nothing for ``--json``."""

    def __init__(self, as_json: bool) -> None:
        self.as_json = as_json
        self.bar_class: Callable[..., ProgressBar] | None = None
        self.progress: Any = None

    def on_plan(self, plan: DownloadPlan) -> None:
        _announce_plan(plan)
        if plan.bytes_to_fetch and stderr_is_tty():
            self.bar_class, self.progress = _rich_download_progress(plan)
            self.progress.start()
        elif plan.bytes_to_fetch and not self.as_json:
            self.bar_class = _plain_download_progress(plan)

    def bar(self, *args: Any, **kwargs: Any) -> ProgressBar:
        """The progress class huggingface_hub instantiates (the plain one before a plan)."""
        from cmw_vllm.model_downloader import ProgressBar

        return (self.bar_class or ProgressBar)(*args, **kwargs)

    def stop(self) -> None:
        if self.progress is not None:
            self.progress.stop()


def _report_download(result: DownloadResult, name: str, as_json: bool) -> None:
    if as_json:
        echo_json(result.to_dict())
        return
    if result.offline:
        click.echo(f"HF_HUB_OFFLINE is set: using the cached {result.repo_id} at {result.path}")
    elif result.already_complete:
        click.echo(f"{result.repo_id} is complete at {result.path}")
    elif result.plan is not None and result.plan.repair:
        click.echo(f"Fetched {len(result.plan.repair)} file(s) of {result.repo_id} again "
                   f"({format_bytes(result.bytes_downloaded)}) into {result.path}")
    else:
        rate = result.bytes_downloaded / result.seconds if result.seconds > 0 else 0
        click.echo(f"Downloaded {result.repo_id} ({format_bytes(result.bytes_downloaded)} in "
                   f"{result.seconds:.1f}s, {format_bytes(rate)}/s) to {result.path}")
    _print_verify(result.verify, name)


COMMANDS.append(download)


# --------------------------------------------------------------------------------------------
# verify


def _repair_args(report: VerifyReport, name: str) -> str | None:
    """The ``download`` arguments that repair what ``report`` describes, if it can."""
    if not report.repo_id:
        return None
    if report.source == "local":
        return f"{report.repo_id} --local-dir {report.path}"
    target = name if not Path(name).expanduser().is_dir() else report.repo_id
    if report.revision and report.revision != "main":
        target += f" --revision {report.revision}"
    return target


@click.command()
@click.argument("name")
@click.option("--revision", "-r", default=None,
              help="Branch, tag or commit of a cached repo (default: main).")
@click.option("--full", is_flag=True, help="Also hash every file against the Hub's records.")
@click.option("--json", "as_json", is_flag=True, help="Print the report as JSON.")
@click.pass_context
def verify(ctx: click.Context, name: str, revision: str | None, full: bool,
           as_json: bool) -> None:
    """Check a downloaded model's files, offline.

    NAME is a registry alias, a Hugging Face repo id (its snapshot in the cache is checked)
    or a model directory. The fast mode checks that every expected file is there with the
    size the Hub recorded, that safetensors headers parse and their tensor data exactly fills
    each file, that config.json names an architecture, that a tokenizer is present and that
    the index file's shards exist. --full also hashes every file (sha256 for LFS files, git
    blob sha1 for small ones), in parallel.

    A folder with no Hub records of its files (one not downloaded from the Hub) cannot be
    hashed: --full then says so and runs the fast checks only. After a download with
    --include/--exclude, only the files it chose are checked.

    Prints one line per problem and a summary; exits 0 only when all is well (1 otherwise,
    9 when the model is not on disk).

    JSON keys: ok, path, repo_id, revision, commit, source (cache|local), mode (fast|full),
    metadata, files_checked, bytes_checked, files_hashed, bytes_hashed, files_without_hash,
    seconds, problems [{kind, file, message, repairable}].

    \b
    Examples:
      cmw-vllm verify qwen
      cmw-vllm verify Qwen/Qwen3-0.6B --full
      cmw-vllm verify ./models/my-model --json
    """
    from cmw_vllm.errors import UsageError
    from cmw_vllm.model_verifier import verify_model

    try:
        target, is_local = _resolve(name)
    except UsageError:
        from cmw_vllm.cli_gateway import not_a_model

        not_a_model(name, "verify")
        raise
    if is_local and not Path(target).expanduser().is_dir():
        from cmw_vllm.errors import NotFoundError

        raise NotFoundError(f"{target} is not a directory")
    adapter = _adapter(name)
    if adapter is not None and revision is None and not is_local:
        revision = adapter.revision
    callbacks, drawn = _hash_progress(full, as_json)
    try:
        report = verify_model(target, revision=revision, full=full, **callbacks)
    finally:
        if drawn is not None:
            drawn.stop()
    _check_adapter_fit(name, report)
    if as_json:
        echo_json(report.to_dict())
    else:
        where = report.repo_id or report.path
        rev = f"@{report.revision}" if report.revision else ""
        commit = f" (commit {_short(report.commit)})" if report.commit else ""
        click.echo(f"{where}{rev}{commit} at {report.path}")
        _print_verify(report, _repair_args(report, name))
    if not report.ok:
        ctx.exit(EXIT_FAILURE)


COMMANDS.append(verify)
