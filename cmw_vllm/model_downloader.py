"""Download models from the Hugging Face Hub into the HF cache (or a local directory).

``huggingface_hub`` is imported inside the functions that need it, and everything it would
read from the environment at import time (endpoint, cache dir, offline switch) is read here
at call time and passed explicitly, so one process can download from different places.

A download is: plan (the Hub's file metadata: what to fetch, how many bytes are still
missing), a free-space check, ``snapshot_download`` of exactly the planned files, then a fast
offline verify. ``--repair`` plans only the files a full verify flagged and fetches them again.
"""

from __future__ import annotations

import errno
import logging
import shutil
import signal
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

from cmw_vllm.errors import (
    CmwVllmError,
    DownloadCancelled,
    DownloadError,
    EnvironmentProblem,
    InsufficientResourcesError,
    NotFoundError,
    UsageError,
)
from cmw_vllm.hf_cache import (
    endpoint,
    filter_names,
    has_blob,
    hub_cache_dir,
    offline,
    repo_dir,
    select_files,
    snapshot_path,
    token,
    write_ref,
)
from cmw_vllm.model_verifier import (
    ModelLocation,
    VerifyReport,
    local_manifest_path,
    locate_cached,
    locate_local,
    manifest_path,
    verify_location,
    write_manifest,
)
from cmw_vllm.vocab import format_bytes

logger = logging.getLogger(__name__)

TOKEN_HELP = "https://huggingface.co/settings/tokens"


@dataclass(frozen=True)
class PlannedFile:
    """One file a download asks for."""

    path: str
    size: int
    cached: bool


@dataclass
class DownloadPlan:
    """What a download will fetch, from the Hub's metadata, before any byte is fetched.

    Attributes:
        repo_id: ``org/name``.
        revision: What the user asked for (branch, tag or commit).
        commit: The commit ``revision`` resolves to now.
        target: Where the bytes land (the repo's cache folder or the local dir).
        local_dir: The ``--local-dir``, if any.
        files: The selected files.
        allow_patterns: Patterns passed to ``snapshot_download``.
        ignore_patterns: Patterns passed to ``snapshot_download``.
        bytes_total: Size of all selected files.
        bytes_to_fetch: Size of the selected files not on disk yet (all of them with repair).
        free_bytes: Free space where ``target`` is.
        repair: Files to fetch again (``--repair``); empty otherwise.
        gated: The Hub says the repo is gated.
    """

    repo_id: str
    revision: str
    commit: str
    target: Path
    local_dir: Path | None
    files: list[PlannedFile]
    allow_patterns: list[str] | None
    ignore_patterns: list[str] | None
    bytes_total: int
    bytes_to_fetch: int
    free_bytes: int
    repair: list[str] = field(default_factory=list)
    gated: bool = False

    @property
    def files_to_fetch(self) -> int:
        """Number of selected files not cached yet."""
        return sum(1 for f in self.files if not f.cached)

    def to_dict(self) -> dict[str, object]:
        """Stable JSON form."""
        return {
            "repo_id": self.repo_id,
            "revision": self.revision,
            "commit": self.commit,
            "target": str(self.target),
            "files": len(self.files),
            "files_to_fetch": self.files_to_fetch,
            "bytes_total": self.bytes_total,
            "bytes_to_fetch": self.bytes_to_fetch,
            "free_bytes": self.free_bytes,
            "repair": list(self.repair),
        }


@dataclass
class DownloadResult:
    """The outcome of :func:`download_model`."""

    repo_id: str
    revision: str
    commit: str | None
    path: Path
    plan: DownloadPlan | None
    seconds: float
    bytes_downloaded: int
    already_complete: bool
    offline: bool
    verify: VerifyReport

    @property
    def ok(self) -> bool:
        """True when the files are there and the fast verify found nothing wrong."""
        return self.verify.ok

    def to_dict(self) -> dict[str, object]:
        """Stable JSON form (keys documented in the README)."""
        return {
            "ok": self.ok,
            "repo_id": self.repo_id,
            "revision": self.revision,
            "commit": self.commit,
            "path": str(self.path),
            "already_complete": self.already_complete,
            "offline": self.offline,
            "bytes_downloaded": self.bytes_downloaded,
            "seconds": round(self.seconds, 3),
            "plan": self.plan.to_dict() if self.plan else None,
            "verify": self.verify.to_dict(),
        }


# --------------------------------------------------------------------------------------------
# Progress: a tqdm duck type that huggingface_hub drives and the CLI renders.


class ProgressBar:
    """A minimal tqdm stand-in for ``snapshot_download(tqdm_class=...)``.

    huggingface_hub creates three: a file counter (``kind == "files"``), a bytes-written bar
    (``"bytes"``) and a bytes-received bar (``"transfer"``). Subclasses override
    :meth:`on_update` and :meth:`on_close` to draw. Every :meth:`update` raises
    :class:`DownloadCancelled` once :attr:`cancel_event` is set, which is how Ctrl-C stops
    the download threads at their next chunk.
    """

    cancel_event: ClassVar[threading.Event | None] = None

    def __init__(self, iterable: Any = None, desc: str | None = None, total: float | None = None,
                 initial: float = 0, unit: str = "it", **_kwargs: Any) -> None:
        self.iterable = iterable
        self.desc = desc or ""
        self.total = total
        self.n = initial
        self.unit = unit
        self.postfix = ""
        self.disable = False
        self.start_t = time.monotonic()
        self._lock = threading.Lock()
        if unit != "B":
            self.kind = "files"
        elif self.desc.startswith("Downloading"):
            self.kind = "transfer"
        else:
            self.kind = "bytes"

    def update(self, n: float | None = 1) -> bool | None:
        """Advance by ``n``; raises :class:`DownloadCancelled` after Ctrl-C."""
        event = ProgressBar.cancel_event
        if event is not None and event.is_set():
            raise DownloadCancelled()
        with self._lock:
            self.n += n or 0
        self.on_update()
        return None

    def refresh(self, *_args: Any, **_kwargs: Any) -> None:
        """Redraw (tqdm API)."""
        self.on_update()

    def set_description(self, desc: str | None = None, refresh: bool = True) -> None:
        """Set the label (tqdm API)."""
        self.desc = desc or ""

    set_description_str = set_description

    def set_postfix_str(self, s: str = "", refresh: bool = True) -> None:
        """Set the suffix (tqdm API)."""
        self.postfix = s

    def reset(self, total: float | None = None) -> None:
        """Start over (tqdm API)."""
        self.n = 0
        if total is not None:
            self.total = total

    @property
    def format_dict(self) -> dict[str, Any]:
        """The numbers tqdm formats (huggingface_hub reads ``rate``)."""
        elapsed = time.monotonic() - self.start_t
        rate = self.n / elapsed if elapsed > 0 else None
        return {"n": self.n, "total": self.total, "elapsed": elapsed, "rate": rate,
                "unit": self.unit}

    def close(self) -> None:
        """Finish (tqdm API)."""
        self.on_close()

    def __enter__(self) -> ProgressBar:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __iter__(self) -> Iterator[Any]:
        for item in self.iterable or ():
            yield item
            self.update(1)

    def on_update(self) -> None:
        """Hook: the count or total changed."""

    def on_close(self) -> None:
        """Hook: the bar is done."""


# --------------------------------------------------------------------------------------------
# Environment and file selection


def free_space(path: Path) -> int:
    """Free bytes on the filesystem that holds ``path`` (or its nearest existing parent)."""
    probe = Path(path).expanduser().absolute()
    while not probe.exists() and probe != probe.parent:
        probe = probe.parent
    return shutil.disk_usage(probe).free




def _escape(name: str) -> str:
    """A pattern that matches exactly ``name`` under fnmatch."""
    return "".join(f"[{c}]" if c in "*?[" else c for c in name)


# --------------------------------------------------------------------------------------------
# Errors from the Hub, as one line each


def _is_network_error(exc: BaseException) -> bool:
    names = {cls.__name__ for cls in type(exc).__mro__}
    return bool(names & {"ConnectError", "ConnectTimeout", "TimeoutException", "NetworkError",
                         "TransportError", "ProxyError", "ReadTimeout", "RemoteProtocolError"})


def _enospc(exc: BaseException) -> OSError | None:
    seen: set[int] = set()
    current: BaseException | None = exc
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        if isinstance(current, OSError) and current.errno == errno.ENOSPC:
            return current
        current = current.__cause__ or current.__context__
    return None


def translate_hub_error(exc: BaseException, repo_id: str, revision: str,
                        target: Path | None = None) -> CmwVllmError | None:
    """Turn an exception from huggingface_hub into the package's error, or None if unknown."""
    from huggingface_hub import errors as hf_errors

    url = f"{endpoint()}/{repo_id}"
    have_token = token() is not None
    if (full := _enospc(exc)) is not None:
        where = target or hub_cache_dir()
        return InsufficientResourcesError(
            f"disk full while downloading {repo_id} into {where}"
            f" ({full.strerror or 'No space left on device'})",
            hint="free some space (the partial file was removed) and run the download again",
        )
    if isinstance(exc, hf_errors.GatedRepoError):
        return gated_error(repo_id, have_token)
    if isinstance(exc, hf_errors.RevisionNotFoundError):
        return NotFoundError(f"revision {revision!r} not found in {repo_id}",
                             hint=f"see the branches and tags at {url}")
    if isinstance(exc, hf_errors.RemoteEntryNotFoundError):
        return NotFoundError(f"a file of {repo_id}@{revision} is gone from the Hub: {exc}")
    if isinstance(exc, hf_errors.RepositoryNotFoundError):
        hint = "check the name (org/name, as on the Hub)"
        if not have_token:
            hint += "; a private repository also needs HF_TOKEN"
        return NotFoundError(f"repository {repo_id} not found on {endpoint()}", hint=hint)
    if isinstance(exc, hf_errors.OfflineModeIsEnabled):
        return EnvironmentProblem(
            f"HF_HUB_OFFLINE is set and {repo_id}@{revision} is not complete in the cache",
            hint="unset HF_HUB_OFFLINE to download it",
        )
    if isinstance(exc, hf_errors.HfHubHTTPError):
        response = getattr(exc, "response", None)
        status = getattr(response, "status_code", None)
        if status == 401 and have_token:
            return EnvironmentProblem(
                "the Hugging Face Hub rejected your token (invalid or expired)",
                hint=f"set HF_TOKEN to a valid read token from {TOKEN_HELP}",
            )
        if status is not None and status >= 500:
            return EnvironmentProblem(
                f"the Hugging Face Hub at {endpoint()} answered HTTP {status}; try again later")
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        return DownloadError(f"the Hub refused the request for {repo_id}: {first}")
    if isinstance(exc, hf_errors.LocalEntryNotFoundError) or _is_network_error(exc) or \
            isinstance(exc, ConnectionError):
        return EnvironmentProblem(
            f"cannot reach the Hugging Face Hub at {endpoint()} ({type(exc).__name__})",
            hint="check the network, proxy and HF_ENDPOINT; set HF_HUB_OFFLINE=1 to use only "
                 "the cache",
        )
    if isinstance(exc, OSError) and "Consistency check failed" in str(exc):
        return DownloadError(f"a file of {repo_id} arrived incomplete; run the download again")
    return None


def gated_error(repo_id: str, have_token: bool) -> EnvironmentProblem:
    """The error for a gated repo, telling apart no token and a token without access."""
    url = f"{endpoint()}/{repo_id}"
    if not have_token:
        return EnvironmentProblem(
            f"{repo_id} is a gated repository and no Hugging Face token was given",
            hint=f"accept its terms at {url}, then export HF_TOKEN=hf_... "
                 f"(a read token from {TOKEN_HELP}) or run `hf auth login`",
        )
    return EnvironmentProblem(
        f"{repo_id} is a gated repository and your Hugging Face token has no access to it",
        hint=f"accept its terms at {url} with the account that owns HF_TOKEN, "
             "or set HF_TOKEN to a token of an account that has access",
    )


def _hub_exceptions() -> tuple[type[BaseException], ...]:
    """What huggingface_hub raises: its errors, OS errors, and its HTTP client's errors.

    The client's base class is found through the Hub's own HTTP error, so this works with
    whichever client (httpx or httpx2) the installed huggingface_hub uses.
    """
    from huggingface_hub import errors

    client = tuple(c for c in errors.HfHubHTTPError.__mro__[1:]
                   if c.__name__ == "HTTPError" and issubclass(c, Exception))
    return (OSError, errors.EntryNotFoundError, *client)


@contextmanager
def _hub_errors(repo_id: str, revision: str, target: Path | None = None) -> Iterator[None]:
    try:
        yield
    except CmwVllmError:
        raise
    except (KeyboardInterrupt, DownloadCancelled):
        raise
    except _hub_exceptions() as exc:
        mapped = translate_hub_error(exc, repo_id, revision, target)
        if mapped is None:
            raise
        raise mapped from exc


# --------------------------------------------------------------------------------------------
# Plan


def plan_download(
    repo_id: str,
    *,
    revision: str | None = None,
    include: Sequence[str] = (),
    exclude: Sequence[str] = (),
    local_dir: Path | None = None,
    repair: Sequence[str] = (),
) -> DownloadPlan:
    """Ask the Hub what a download would fetch (one metadata request, no file bytes).

    Args:
        repo_id: ``org/name``.
        revision: Branch, tag or commit (default ``main``).
        include: Patterns replacing the default selection.
        exclude: Patterns to leave out.
        local_dir: Download into this directory instead of the HF cache.
        repair: Fetch exactly these files again (whatever is on disk).

    Raises:
        NotFoundError, EnvironmentProblem: See :func:`translate_hub_error`.
    """
    from huggingface_hub import HfApi

    rev = revision or "main"
    api = HfApi(endpoint=endpoint(), token=token() or False)
    with _hub_errors(repo_id, rev):
        info = api.model_info(repo_id, revision=rev, files_metadata=True)
    commit = info.sha or rev
    gated = bool(getattr(info, "gated", False))
    if gated and token() is None:
        raise gated_error(repo_id, have_token=False)  # the files would answer 401 anyway
    metadata = _file_metadata(info)
    names = list(metadata)
    if repair:
        allow: list[str] | None = [_escape(n) for n in repair]
        ignore: list[str] | None = None
        selected = [n for n in repair if n in metadata]
    else:
        allow, ignore = select_files(names, include, exclude)
        selected = filter_names(names, allow, ignore)
    if repair and not selected:
        raise DownloadError(
            f"cannot repair {', '.join(repair)}: not in {repo_id}@{rev} on the Hub")
    if not selected:
        raise UsageError(f"no file of {repo_id}@{rev} matches the selection",
                         hint="check --include/--exclude")
    target = Path(local_dir).expanduser().absolute() if local_dir else repo_dir(repo_id)
    files = _planned_files(selected, metadata, target, bool(local_dir), bool(repair))
    return DownloadPlan(
        repo_id=repo_id,
        revision=rev,
        commit=commit,
        target=target,
        local_dir=Path(local_dir).expanduser().absolute() if local_dir else None,
        files=files,
        allow_patterns=allow,
        ignore_patterns=ignore or None,
        bytes_total=sum(f.size for f in files),
        bytes_to_fetch=sum(f.size for f in files if not f.cached),
        free_bytes=free_space(target),
        repair=list(repair),
        gated=gated,
    )


def _file_metadata(info: Any) -> dict[str, tuple[int, str | None]]:
    """Size and ETag (LFS sha256, else git blob id) of each file, from ``model_info``."""
    metadata: dict[str, tuple[int, str | None]] = {}
    for sibling in info.siblings or []:
        lfs = getattr(sibling, "lfs", None)
        size = (lfs.size if lfs is not None else sibling.size) or 0
        etag = lfs.sha256 if lfs is not None else sibling.blob_id
        metadata[sibling.rfilename] = (int(size), etag)
    return metadata


def _planned_files(selected: list[str], metadata: dict[str, tuple[int, str | None]],
                   target: Path, local: bool, repair: bool) -> list[PlannedFile]:
    """The selected files, each marked cached when its bytes are already on disk."""
    files: list[PlannedFile] = []
    for name in selected:
        size, etag = metadata[name]
        if repair:
            cached = False
        elif local:
            on_disk = target / name
            cached = on_disk.is_file() and on_disk.stat().st_size == size
        else:
            cached = bool(etag) and has_blob(target, str(etag))
        files.append(PlannedFile(name, size, cached))
    return files


def check_disk_space(plan: DownloadPlan) -> None:
    """Refuse a download that cannot fit.

    Raises:
        InsufficientResourcesError: With the bytes needed and the bytes free.
    """
    if plan.bytes_to_fetch > plan.free_bytes:
        raise InsufficientResourcesError(
            f"{plan.repo_id} needs {format_bytes(plan.bytes_to_fetch)} "
            f"({plan.bytes_to_fetch} bytes) more but only {format_bytes(plan.free_bytes)} "
            f"({plan.free_bytes} bytes) is free in {plan.target}",
            hint="free some space, choose another place with --local-dir or HF_HOME, "
                 "or pass --force to try anyway",
        )


# --------------------------------------------------------------------------------------------
# Download


@contextmanager
def _cancel_on_sigint(event: threading.Event) -> Iterator[None]:
    """On Ctrl-C, tell the download threads to stop, then interrupt the main thread."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    busy = [False]

    def handler(signum: int, frame: object) -> None:
        # Python may run this again inside event.set(), which holds a lock a nested set()
        # would wait for forever: a Ctrl-C that comes meanwhile is the same request.
        if busy[0]:
            return
        busy[0] = True
        try:
            event.set()
        finally:
            busy[0] = False
        raise KeyboardInterrupt

    previous = signal.signal(signal.SIGINT, handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)


def fetch(plan: DownloadPlan, *, progress_class: Callable[..., ProgressBar] | None = None,
          max_workers: int = 8) -> Path:
    """Fetch the planned files with ``snapshot_download``; returns the snapshot folder.

    Ctrl-C stops the worker threads at their next chunk; huggingface_hub writes each file to
    a temporary name and renames it into place, so the cache never holds a partial blob.

    Raises:
        KeyboardInterrupt: After Ctrl-C, once the threads have stopped.
        InsufficientResourcesError: The disk filled up.
        NotFoundError, EnvironmentProblem: See :func:`translate_hub_error`.
    """
    from huggingface_hub import snapshot_download as _snapshot_download

    snapshot_download: Any = _snapshot_download  # its overloads are too many for mypy
    bar_class = progress_class or ProgressBar
    event = threading.Event()
    ProgressBar.cancel_event = event
    cache_dir = hub_cache_dir()
    try:
        with _cancel_on_sigint(event), _hub_errors(plan.repo_id, plan.revision, plan.target):
            try:
                folder = snapshot_download(
                    plan.repo_id,
                    revision=plan.commit,
                    cache_dir=str(cache_dir),
                    local_dir=str(plan.local_dir) if plan.local_dir else None,
                    allow_patterns=plan.allow_patterns,
                    ignore_patterns=plan.ignore_patterns,
                    force_download=bool(plan.repair),
                    max_workers=max_workers,
                    tqdm_class=bar_class,
                    token=token() or False,
                    endpoint=endpoint(),
                )
            except DownloadCancelled:
                raise KeyboardInterrupt from None
    finally:
        ProgressBar.cancel_event = None
    if plan.local_dir is None:
        write_ref(plan.target, plan.revision, plan.commit)
    return Path(folder)


def download_model(
    repo_id: str,
    *,
    revision: str | None = None,
    include: Sequence[str] = (),
    exclude: Sequence[str] = (),
    local_dir: Path | None = None,
    force: bool = False,
    repair: bool = False,
    progress_class: Callable[..., ProgressBar] | None = None,
    on_plan: Callable[[DownloadPlan], None] | None = None,
) -> DownloadResult:
    """Download a model, then verify it (fast mode).

    Args:
        repo_id: ``org/name``.
        revision: Branch, tag or commit (default ``main``).
        include: Patterns replacing the default selection of what vLLM needs.
        exclude: Patterns to leave out.
        local_dir: Download into this directory instead of the HF cache.
        force: Download even when the free space looks too small.
        repair: Verify the existing copy in full and fetch again exactly what failed.
        progress_class: A :class:`ProgressBar` subclass (or factory) that draws.
        on_plan: Called with the plan before any byte is fetched.

    Returns:
        What was done and the verify report.

    Raises:
        InsufficientResourcesError: Not enough free space (without ``force``), or disk full.
        NotFoundError: No such repo or revision.
        EnvironmentProblem: Offline, Hub unreachable, gated repo without access.
        KeyboardInterrupt: Ctrl-C (the cache stays consistent).
    """
    rev = revision or "main"
    if "/" not in repo_id or repo_id.count("/") != 1:
        raise UsageError(f"{repo_id!r} is not a Hugging Face repo id (org/name)")
    started = time.perf_counter()
    if offline():
        return _offline_result(repo_id, rev, local_dir, started)

    repair_files: list[str] = []
    if repair:
        existing = _existing_location(repo_id, rev, local_dir)
        if existing is not None:
            repair_files = verify_location(existing, full=True).files_to_repair
            if repair_files and existing.commit:
                rev = existing.commit  # repair the copy on disk, even if the branch moved on

    plan = plan_download(repo_id, revision=rev, include=include, exclude=exclude,
                         local_dir=local_dir, repair=repair_files)
    if on_plan is not None:
        on_plan(plan)
    if not force:
        check_disk_space(plan)
    snapshot = snapshot_path(plan.target, plan.commit) if local_dir is None else plan.target
    complete = plan.bytes_to_fetch == 0 and not plan.repair and all(
        (snapshot / f.path).exists() for f in plan.files)
    if complete:
        return _finish(repo_id, rev, plan, snapshot, started, 0, True)
    path = fetch(plan, progress_class=progress_class)
    if not plan.repair:
        _record_selection(plan, include, exclude)
    return _finish(repo_id, rev, plan, path, started, plan.bytes_to_fetch, False)


def _record_selection(plan: DownloadPlan, include: Sequence[str],
                      exclude: Sequence[str]) -> None:
    """Write the manifest that tells verify which files this download asked for."""
    data: dict[str, object] = {
        "repo_id": plan.repo_id, "revision": plan.revision, "commit": plan.commit,
        "allow_patterns": plan.allow_patterns, "ignore_patterns": plan.ignore_patterns,
        "include": list(include), "exclude": list(exclude),
        "files": [f.path for f in plan.files],
    }
    target = (local_manifest_path(plan.target) if plan.local_dir
              else manifest_path(plan.repo_id, plan.commit))
    try:
        write_manifest(target, data)
    except (OSError, EnvironmentProblem) as exc:
        logger.warning("cannot write download manifest %s: %s", target, exc)


def _existing_location(repo_id: str, rev: str,
                       local_dir: Path | None) -> ModelLocation | None:
    try:
        if local_dir is not None:
            return locate_local(Path(local_dir)) if Path(local_dir).is_dir() else None
        return locate_cached(repo_id, rev)
    except NotFoundError:
        return None


def _finish(repo_id: str, rev: str, plan: DownloadPlan, path: Path | None, started: float,
            fetched: int, complete: bool) -> DownloadResult:
    loc = locate_local(plan.target) if plan.local_dir else locate_cached(repo_id, plan.commit)
    loc.revision = rev if plan.local_dir is None else loc.revision
    report = verify_location(loc, full=False)
    return DownloadResult(repo_id, rev, plan.commit, path or loc.path, plan,
                          time.perf_counter() - started, fetched, complete, False, report)


def _offline_result(repo_id: str, rev: str, local_dir: Path | None,
                    started: float) -> DownloadResult:
    loc = _existing_location(repo_id, rev, local_dir)
    if loc is None:
        raise EnvironmentProblem(
            f"HF_HUB_OFFLINE is set and {repo_id}@{rev} is not in the cache",
            hint="unset HF_HUB_OFFLINE to download it",
        )
    report = verify_location(loc, full=False)
    missing = [p.file for p in report.problems if p.kind == "missing"]
    if missing:
        raise EnvironmentProblem(
            f"HF_HUB_OFFLINE is set and the cached {repo_id}@{rev} is incomplete "
            f"({len(missing)} file(s) missing, e.g. {missing[0]})",
            hint="unset HF_HUB_OFFLINE and run the download again to complete it",
        )
    return DownloadResult(repo_id, rev, loc.commit, loc.path, None,
                          time.perf_counter() - started, 0, report.ok, True, report)
