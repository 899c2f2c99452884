"""Offline integrity checks of a downloaded model (HF cache snapshot or local directory).

Nothing here touches the network. What a file should be comes from what the download left
on disk (the cache's layout is described in :mod:`cmw_vllm.hf_cache`):

- ``<repo cache>/trees/<commit>.json`` (or ``<local dir>/.cache/huggingface/trees/``): size,
  git blob id and LFS sha256 of every file of the commit;
- the blob a snapshot entry links to is named after its ETag (sha256 for LFS files, git blob
  sha1 for small ones);
- ``<local dir>/.cache/huggingface/download/<path>.metadata``: commit and ETag per file;
- cmw-vllm's own download manifest (which files were asked for).

Fast mode checks presence, sizes and structure (safetensors headers, config, tokenizer,
index); full mode also hashes every file, in parallel.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import re
import threading
import time
from collections.abc import Callable, Iterable
from concurrent.futures import ThreadPoolExecutor, as_completed
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

from cmw_vllm import hf_cache
from cmw_vllm.errors import NotFoundError, UsageError
from cmw_vllm.vocab import looks_like_path

logger = logging.getLogger(__name__)

SHA256_RE = re.compile(r"^[0-9a-f]{64}$")
SHA1_RE = re.compile(r"^[0-9a-f]{40}$")
HASH_CHUNK = 4 << 20

# Any one of these makes a tokenizer vLLM can load.
TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer.model",
    "spiece.model",
    "sentencepiece.bpe.model",
    "tekken.json",
    "vocab.json",
    "vocab.txt",
    "qwen.tiktoken",
)
WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth")

PROBLEM_KINDS = (
    "missing",  # an expected file is absent (or a dangling link)
    "size",  # a file's size differs from what the Hub recorded
    "blob",  # a snapshot entry links to a blob of other content than recorded
    "hash",  # the content's hash differs from what the Hub recorded (full mode)
    "safetensors",  # header unreadable, or tensor data does not fill the file exactly
    "index",  # an index file names a shard or tensor that is not there
    "config",  # config.json missing, unparsable, or without an architecture
    "tokenizer",  # no tokenizer file
    "json",  # another JSON file does not parse
    "weights",  # no weight files at all
    "unreadable",  # an OS error while reading
)


@dataclass(frozen=True)
class ExpectedFile:
    """What the Hub recorded about one file of a commit."""

    path: str
    size: int | None = None
    sha256: str | None = None  # LFS files
    blob_id: str | None = None  # git blob sha1 (small files; for LFS files, of the pointer)

    @property
    def is_lfs(self) -> bool:
        """True when the content hash to compare is a sha256."""
        return self.sha256 is not None


@dataclass(frozen=True)
class Problem:
    """One thing wrong with a model folder.

    Attributes:
        kind: One of :data:`PROBLEM_KINDS`.
        file: The repo-relative path concerned, or None for folder-level problems.
        message: One line for humans.
        repairable: Fetching ``file`` again can fix it.
    """

    kind: str
    file: str | None
    message: str
    repairable: bool = False

    def __str__(self) -> str:
        return f"{self.file}: {self.message}" if self.file else self.message


@dataclass
class ModelLocation:
    """Where a model's files are and what is known about them."""

    path: Path
    repo_id: str | None = None
    revision: str | None = None
    commit: str | None = None
    expected: dict[str, ExpectedFile] = field(default_factory=dict)
    selected: list[str] | None = None  # files the download asked for, when known
    custom_selection: bool = False  # the download was given --include/--exclude
    source: str = "local"  # "cache" (HF cache snapshot) or "local" (a directory)
    metadata: str = "none"  # where expectations came from: tree, manifest, blobs, none


@dataclass
class VerifyReport:
    """The outcome of :func:`verify_model`."""

    path: str
    repo_id: str | None
    revision: str | None
    commit: str | None
    source: str
    mode: str
    metadata: str
    files_checked: int = 0
    bytes_checked: int = 0
    files_hashed: int = 0
    bytes_hashed: int = 0
    files_without_hash: int = 0
    seconds: float = 0.0
    problems: list[Problem] = field(default_factory=list)
    partial: bool = False  # a download's --include/--exclude chose the files checked

    @property
    def ok(self) -> bool:
        """True when no problem was found."""
        return not self.problems

    @property
    def files_to_repair(self) -> list[str]:
        """Repo paths whose fetching again can fix a problem, in order."""
        seen: dict[str, None] = {}
        for problem in self.problems:
            if problem.repairable and problem.file:
                seen.setdefault(problem.file, None)
        return list(seen)

    def to_dict(self) -> dict[str, object]:
        """Stable JSON form (keys documented in the README)."""
        return {
            "ok": self.ok,
            "path": self.path,
            "repo_id": self.repo_id,
            "revision": self.revision,
            "commit": self.commit,
            "source": self.source,
            "mode": self.mode,
            "metadata": self.metadata,
            "files_checked": self.files_checked,
            "bytes_checked": self.bytes_checked,
            "files_hashed": self.files_hashed,
            "bytes_hashed": self.bytes_hashed,
            "files_without_hash": self.files_without_hash,
            "seconds": round(self.seconds, 3),
            "problems": [asdict(p) for p in self.problems],
        }


HashProgress = Callable[[int], None]
"""Called from worker threads with a byte count each time that many more were hashed."""


# --------------------------------------------------------------------------------------------
# Finding the files, offline


def manifest_path(repo_id: str, commit: str) -> Path:
    """Where cmw-vllm records which files a cache download asked for."""
    from cmw_vllm.paths import state_dir

    return state_dir() / "downloads" / hf_cache.repo_folder_name(repo_id) / f"{commit}.json"


def local_manifest_path(local_dir: Path) -> Path:
    """Where cmw-vllm records which files a ``--local-dir`` download asked for."""
    return hf_cache.local_metadata_dir(local_dir) / "cmw-vllm-download.json"


def write_manifest(path: Path, data: dict[str, object]) -> None:
    """Write a download manifest atomically, mode 0600.

    Raises:
        EnvironmentProblem: It cannot be written.
    """
    from cmw_vllm import paths

    path.parent.mkdir(parents=True, exist_ok=True)
    paths.write_private(path, json.dumps(data, indent=1, sort_keys=True))


def _read_json(path: Path) -> object | None:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None


def read_tree(tree_file: Path) -> dict[str, ExpectedFile] | None:
    """Parse a ``trees/<commit>.json`` written by ``snapshot_download``; None if unusable."""
    data = _read_json(tree_file)
    if not isinstance(data, dict) or not isinstance(data.get("files"), dict):
        return None
    out: dict[str, ExpectedFile] = {}
    for name, info in data["files"].items():
        if not isinstance(info, dict):
            continue
        sha256 = info.get("lfs_sha256")
        size = info.get("lfs_size") if sha256 else info.get("size")
        out[name] = ExpectedFile(name, size if isinstance(size, int) else None, sha256,
                                 info.get("blob_id"))
    return out


def _read_manifest(path: Path) -> dict[str, object] | None:
    """A download manifest with a usable file list, or None."""
    data = _read_json(path)
    if isinstance(data, dict) and isinstance(data.get("files"), list):
        return data
    return None


def _apply_manifest(loc: ModelLocation, manifest: dict[str, object]) -> None:
    files = manifest["files"]
    loc.selected = [str(f) for f in files] if isinstance(files, list) else None
    loc.custom_selection = bool(manifest.get("include") or manifest.get("exclude"))


def locate_cached(repo_id: str, revision: str | None = None,
                  cache_dir: Path | None = None) -> ModelLocation:
    """Find a repo's snapshot in the HF cache without the network.

    Args:
        repo_id: ``org/name``.
        revision: Branch, tag or commit hash (default ``main``).
        cache_dir: The hub cache (default from the environment).

    Returns:
        The snapshot's location with what the Hub recorded about its files.

    Raises:
        NotFoundError: The repo, revision or snapshot is not in the cache.
    """
    rev = revision or "main"
    repo_dir = hf_cache.repo_dir(repo_id, cache_dir)
    if not repo_dir.is_dir():
        raise NotFoundError(
            f"{repo_id} is not in the Hugging Face cache ({repo_dir.parent})",
            hint=f"download it first: cmw-vllm download {repo_id}",
        )
    commit = hf_cache.resolve_commit(repo_dir, rev)
    if commit is None:
        known = hf_cache.refs(repo_dir)
        raise NotFoundError(
            f"revision {rev!r} of {repo_id} is not in the cache"
            + (f" (cached: {', '.join(known)})" if known else ""),
            hint=f"download it: cmw-vllm download {repo_id} --revision {rev}",
        )
    snapshot = hf_cache.snapshot_path(repo_dir, commit)
    if not snapshot.is_dir():
        raise NotFoundError(
            f"snapshot {commit[:12]} of {repo_id} is missing from the cache",
            hint=f"download it again: cmw-vllm download {repo_id} --revision {rev}",
        )
    loc = ModelLocation(snapshot, repo_id, rev, commit, source="cache")
    tree = read_tree(hf_cache.tree_file(repo_dir, commit))
    if tree is not None:
        loc.expected = tree
        loc.metadata = "tree"
    else:
        loc.expected = _expected_from_blob_names(snapshot)
        loc.metadata = "blobs" if loc.expected else "none"
    manifest = _read_manifest(manifest_path(repo_id, commit))
    if manifest is not None:
        _apply_manifest(loc, manifest)
        if loc.metadata == "tree":
            loc.metadata = "tree+manifest"
    return loc


def _expected_from_blob_names(snapshot: Path) -> dict[str, ExpectedFile]:
    """Without a tree listing, the blob names still give each entry's hash."""
    out: dict[str, ExpectedFile] = {}
    for entry in _walk(snapshot):
        full = snapshot / entry
        if not full.is_symlink():
            continue
        name = Path(os.readlink(full)).name
        if SHA256_RE.match(name):
            out[entry] = ExpectedFile(entry, sha256=name)
        elif SHA1_RE.match(name):
            out[entry] = ExpectedFile(entry, blob_id=name)
    return out


def locate_local(path: Path) -> ModelLocation:
    """Describe a local model directory, using ``.cache/huggingface`` metadata when present.

    Raises:
        NotFoundError: The directory does not exist.
    """
    path = Path(path).expanduser()
    if not path.is_dir():
        raise NotFoundError(f"{path} is not a directory")
    loc = ModelLocation(path.resolve(), source="local")
    hf_dir = hf_cache.local_metadata_dir(path)
    commits: dict[str, None] = {}
    etags: dict[str, str] = {}
    download_dir = hf_dir / "download"
    if download_dir.is_dir():
        for meta in download_dir.rglob("*.metadata"):
            try:
                lines = meta.read_text(encoding="utf-8").splitlines()
            except OSError:
                continue
            if len(lines) >= 2:
                rel = meta.relative_to(download_dir).as_posix()[: -len(".metadata")]
                commits.setdefault(lines[0].strip(), None)
                etags[rel] = lines[1].strip()
    for commit in commits:
        tree = read_tree(hf_cache.tree_file(hf_dir, commit))
        if tree is not None:
            loc.commit, loc.expected, loc.metadata = commit, tree, "tree"
            break
    if not loc.expected and etags:
        for rel, etag in etags.items():
            if SHA256_RE.match(etag):
                loc.expected[rel] = ExpectedFile(rel, sha256=etag)
            elif SHA1_RE.match(etag):
                loc.expected[rel] = ExpectedFile(rel, blob_id=etag)
        loc.metadata = "etags"
        loc.commit = next(iter(commits), None)
    manifest = _read_manifest(local_manifest_path(path))
    if manifest is not None:
        _apply_manifest(loc, manifest)
        loc.repo_id = str(manifest.get("repo_id") or "") or None
        loc.revision = str(manifest.get("revision") or "") or None
        loc.metadata += "+manifest"
    return loc


def _walk(root: Path) -> list[str]:
    """Repo-relative paths of the files (and links) under ``root``, skipping ``.cache``."""
    out: list[str] = []
    for dirpath, dirnames, filenames in os.walk(root):
        rel_dir = Path(dirpath).relative_to(root)
        if rel_dir == Path("."):
            dirnames[:] = [d for d in dirnames if d != ".cache"]
        for name in filenames:
            out.append((rel_dir / name).as_posix() if rel_dir != Path(".") else name)
    # os.walk lists symlinks to files as files, and symlinks to dirs as dirs: good enough.
    return sorted(out)


# --------------------------------------------------------------------------------------------
# Structure checks


def safetensors_problem(path: Path, size: int) -> tuple[str | None, set[str]]:
    """Check one safetensors file's header against its size.

    Returns:
        (problem text or None, tensor names in the header).
    """
    try:
        header_len, header = hf_cache.read_safetensors_header(path, size)
    except ValueError as exc:
        return str(exc), set()
    spans: list[tuple[int, int]] = []
    names: set[str] = set()
    for name, info in header.items():
        if name == "__metadata__":
            continue
        try:
            begin, end = (int(x) for x in info["data_offsets"])
            shape = [int(d) for d in info["shape"]]
            dtype = str(info["dtype"])
        except (KeyError, TypeError, ValueError):
            return f"tensor {name!r} has a malformed header entry", names
        if end < begin:
            return f"tensor {name!r} has offsets {begin}..{end}", names
        bits = hf_cache.SAFETENSORS_DTYPE_BITS.get(dtype)
        need = math.prod(shape) * bits if bits is not None else (end - begin) * 8
        if need != (end - begin) * 8:
            need_text = f"{need // 8} bytes" if need % 8 == 0 else f"{need} bits"
            return (f"tensor {name!r} ({dtype} {shape}) needs {need_text}, "
                    f"header gives {end - begin}"), names
        spans.append((begin, end))
        names.add(name)
    spans.sort()
    cursor = 0
    for begin, end in spans:
        if begin != cursor:
            what = "overlap" if begin < cursor else "a gap"
            return f"tensor data has {what} at byte {min(begin, cursor)}", names
        cursor = end
    expected = 8 + header_len + cursor
    if expected != size:
        return (f"is {size} bytes but its header describes {expected} "
                f"({'truncated' if size < expected else 'trailing data'})"), names
    return None, names


def _config_problem(path: Path) -> str | None:
    data = _read_json(path)
    if data is None:
        return "does not parse as JSON"
    if not isinstance(data, dict):
        return "is not a JSON object"
    archs = data.get("architectures")
    if not (isinstance(archs, list) and archs and all(isinstance(a, str) for a in archs)):
        # Some repos keep the architecture under a nested text config only.
        nested = data.get("text_config")
        nested_archs = nested.get("architectures") if isinstance(nested, dict) else None
        if not nested_archs and not data.get("model_type"):
            return "names no architecture (no 'architectures' or 'model_type')"
    return None


def _has_tokenizer(names: Iterable[str]) -> bool:
    for name in names:
        base = name.rsplit("/", 1)[-1]
        if base in TOKENIZER_FILES or base.endswith(".tiktoken"):
            return True
    return False


# --------------------------------------------------------------------------------------------
# Hashing


def git_blob_sha1_of(path: Path, size: int, buf: bytearray | None = None,
                     progress: HashProgress | None = None) -> str:
    """The git blob id of a file's content, as the Hub records for small files."""
    digest = hashlib.sha1(b"blob %d\0" % size)
    _feed(digest, path, buf, progress)
    return digest.hexdigest()


def sha256_of(path: Path, buf: bytearray | None = None,
              progress: HashProgress | None = None) -> str:
    """The sha256 of a file's content (LFS files)."""
    digest = hashlib.sha256()
    _feed(digest, path, buf, progress)
    return digest.hexdigest()


def _feed(digest: hashlib._Hash, path: Path, buf: bytearray | None,
          progress: HashProgress | None) -> None:
    buffer = buf if buf is not None else bytearray(HASH_CHUNK)
    view = memoryview(buffer)
    with path.open("rb", buffering=0) as fh:
        while True:
            n = fh.readinto(buffer)
            if not n:
                break
            digest.update(view[:n])  # releases the GIL for large updates
            if progress is not None:
                progress(n)


def _hash_jobs(jobs: list[tuple[str, Path, ExpectedFile, int]], workers: int,
               progress: HashProgress | None) -> list[Problem]:
    """Hash each file once (links to one blob are hashed once) and compare."""
    by_target: dict[Path, list[tuple[str, ExpectedFile, int]]] = {}
    for rel, full, exp, size in jobs:
        by_target.setdefault(full.resolve(), []).append((rel, exp, size))
    local = threading.local()

    def one(target: Path, items: list[tuple[str, ExpectedFile, int]]) -> list[Problem]:
        buf = getattr(local, "buf", None)
        if buf is None:
            buf = local.buf = bytearray(HASH_CHUNK)
        rel, exp, size = items[0]
        out: list[Problem] = []
        try:
            if exp.is_lfs:
                got, want, algo = sha256_of(target, buf, progress), exp.sha256, "sha256"
            else:
                got = git_blob_sha1_of(target, size, buf, progress)
                want, algo = exp.blob_id, "git sha1"
        except OSError as exc:
            return [Problem("unreadable", r, f"cannot read: {exc.strerror or exc}", True)
                    for r, _e, _s in items]
        if got != want:
            for r, _e, _s in items:
                out.append(Problem("hash", r, f"{algo} mismatch: expected {want}, got {got}",
                                   True))
        return out

    problems: list[Problem] = []
    with ThreadPoolExecutor(max_workers=max(1, workers),
                            thread_name_prefix="cmw-verify") as pool:
        futures = [pool.submit(one, t, items) for t, items in by_target.items()]
        for future in as_completed(futures):
            problems.extend(future.result())
    return problems


def default_workers() -> int:
    """Hashing threads: one per core, at most 8 (disks rarely feed more)."""
    return max(1, min(8, os.cpu_count() or 1))


# --------------------------------------------------------------------------------------------
# The check


def verify_location(
    loc: ModelLocation,
    *,
    full: bool = False,
    workers: int | None = None,
    progress: HashProgress | None = None,
    on_hash_start: Callable[[int, int], None] | None = None,
) -> VerifyReport:
    """Check a model folder; see the module docstring for what is checked.

    After a download given ``--include``/``--exclude``, only what it selected is checked:
    the whole-model checks (weights, tokenizer, config, index shards) skip what the
    selection left out.

    Args:
        loc: From :func:`locate_cached` or :func:`locate_local`.
        full: Also hash every file that has a recorded hash.
        workers: Hashing threads (default :func:`default_workers`).
        progress: Called with byte counts while hashing (from worker threads).
        on_hash_start: Called once with (files, bytes) before hashing starts.

    Returns:
        The report; ``report.ok`` is True when nothing is wrong.
    """
    started = time.perf_counter()
    report = VerifyReport(str(loc.path), loc.repo_id, loc.revision, loc.commit, loc.source,
                          "full" if full else "fast", loc.metadata,
                          partial=loc.custom_selection)
    expected_names = _expected_names(loc)
    to_check = sorted(set(expected_names) | set(_walk(loc.path)))
    sizes, hash_jobs = _check_files(loc, to_check, set(expected_names), full, report)
    reported_missing = {p.file for p in report.problems if p.kind == "missing"}
    selection = set(expected_names) if loc.custom_selection else None
    _structure_checks(loc.path, sorted(sizes), sizes, report.problems, reported_missing,
                      selection)
    if full and hash_jobs:
        _hash_files(report, hash_jobs, workers or default_workers(), progress, on_hash_start)
    _order_problems(report.problems, loc, expected_names, to_check)
    report.seconds = time.perf_counter() - started
    logger.debug("verified %s: %d files, %d problems", loc.path, report.files_checked,
                 len(report.problems))
    return report


def _expected_names(loc: ModelLocation) -> list[str]:
    """The files the folder should hold: what the download asked for, else the default pick."""
    if loc.selected is not None:
        return list(loc.selected)
    if loc.expected:
        allow, ignore = hf_cache.select_files(list(loc.expected))
        return hf_cache.filter_names(list(loc.expected), allow, ignore)
    return []


_HashJob = tuple[str, Path, ExpectedFile, int]  # repo path, file, what the Hub recorded, size


def _check_files(loc: ModelLocation, to_check: list[str], expected_names: set[str],
                 full: bool, report: VerifyReport) -> tuple[dict[str, int], list[_HashJob]]:
    """Presence, size and blob link of each file; returns the sizes and what to hash."""
    problems = report.problems
    sizes: dict[str, int] = {}
    hash_jobs: list[_HashJob] = []
    for rel in to_check:
        full_path = loc.path / rel
        exp = loc.expected.get(rel)
        try:
            size = full_path.stat().st_size
        except FileNotFoundError:
            if full_path.is_symlink():
                problems.append(Problem("missing", rel, "link points to a missing blob", True))
            elif rel in expected_names:
                problems.append(Problem("missing", rel, "missing", True))
            continue
        except OSError as exc:
            problems.append(Problem("unreadable", rel, f"cannot stat: {exc.strerror}", True))
            continue
        sizes[rel] = size
        report.files_checked += 1
        report.bytes_checked += size
        if exp is None:
            report.files_without_hash += 1 if full else 0
            continue
        if exp.size is not None and exp.size != size:
            problems.append(Problem("size", rel, f"size {size} bytes, expected {exp.size}", True))
        if loc.source == "cache" and full_path.is_symlink():
            problems.extend(_blob_link_problems(rel, full_path, exp))
        if full:
            if exp.sha256 or exp.blob_id:
                hash_jobs.append((rel, full_path, exp, size))
            else:
                report.files_without_hash += 1
    return sizes, hash_jobs


def _blob_link_problems(rel: str, link: Path, exp: ExpectedFile) -> list[Problem]:
    """A snapshot entry that links to a blob named after other content than recorded."""
    blob = Path(os.readlink(link)).name
    want = exp.sha256 or exp.blob_id
    if want and blob != want and (SHA256_RE.match(blob) or SHA1_RE.match(blob)):
        return [Problem("blob", rel, f"links to blob {blob[:12]}, expected {want[:12]}", True)]
    return []


def _hash_files(report: VerifyReport, hash_jobs: list[_HashJob], workers: int,
                progress: HashProgress | None,
                on_hash_start: Callable[[int, int], None] | None) -> None:
    """Hash what has a recorded hash; a file already reported missing or of the wrong size
    gets no second problem."""
    report.files_hashed = len({p.resolve() for _r, p, _e, _s in hash_jobs})
    report.bytes_hashed = sum(s for _r, _p, _e, s in hash_jobs)
    if on_hash_start is not None:
        on_hash_start(report.files_hashed, report.bytes_hashed)
    already = {p.file for p in report.problems if p.kind in ("size", "missing")}
    hash_problems = _hash_jobs(hash_jobs, workers, progress)
    report.problems.extend(p for p in hash_problems if p.file not in already)


def _order_problems(problems: list[Problem], loc: ModelLocation, expected_names: list[str],
                    to_check: list[str]) -> None:
    """Sort problems in file order; only files the Hub knows can be fetched again."""
    known = set(loc.expected) | set(expected_names)
    problems[:] = [p if not p.repairable or p.file in known else replace(p, repairable=False)
                   for p in problems]
    order = {name: i for i, name in enumerate(to_check)}
    problems.sort(key=lambda p: (order.get(p.file or "", len(order)), p.kind))


def _structure_checks(root: Path, names: list[str], sizes: dict[str, int],
                      problems: list[Problem], reported_missing: set[str | None],
                      selection: set[str] | None = None) -> None:
    """What vLLM needs of the folder as a whole: headers, JSON, config, tokenizer, weights.

    Args:
        selection: The files a custom download selection asked for; the checks of what
            it left out (weights, a tokenizer, config.json, index shards) are skipped.
    """
    tensors_by_file = _file_content_checks(root, names, sizes, problems)
    if "adapter_config.json" in sizes:  # a LoRA adapter: no config.json nor tokenizer
        try:
            read_adapter(root)
        except (NotFoundError, UsageError) as exc:
            problems.append(Problem("config", "adapter_config.json", exc.message))
        return
    wanted = (lambda name: True) if selection is None else selection.__contains__
    if "config.json" in sizes:
        text = _config_problem(root / "config.json")
        if text:
            problems.append(Problem("config", "config.json", text, True))
    elif "config.json" not in reported_missing and wanted("config.json"):
        problems.append(Problem("config", "config.json", "missing (vLLM needs it)", False))
    if not _has_tokenizer(names) and (selection is None or _has_tokenizer(selection)):
        problems.append(Problem("tokenizer", None, "no tokenizer file (tokenizer.json, "
                                "tokenizer.model, vocab.json, *.tiktoken, ...)"))
    if not any(n.endswith(WEIGHT_SUFFIXES) for n in names) and (
            selection is None or any(n.endswith(WEIGHT_SUFFIXES) for n in selection)):
        problems.append(Problem("weights", None, "no weight files (*.safetensors, *.bin)"))
    for rel in names:
        if rel.endswith(".index.json"):
            _index_checks(root, rel, sizes, tensors_by_file, problems, reported_missing, wanted)


def _file_content_checks(root: Path, names: list[str], sizes: dict[str, int],
                         problems: list[Problem]) -> dict[str, set[str]]:
    """Safetensors headers and JSON syntax, file by file; returns each file's tensor names."""
    tensors_by_file: dict[str, set[str]] = {}
    for rel in names:
        full = root / rel
        if rel.endswith(".safetensors"):
            try:
                text, tensor_names = safetensors_problem(full, sizes[rel])
            except OSError as exc:
                problems.append(Problem("unreadable", rel, f"cannot read: {exc.strerror}", True))
                continue
            tensors_by_file[rel] = tensor_names
            if text:
                problems.append(Problem("safetensors", rel, text, True))
        elif (rel.endswith(".json") and rel.rsplit("/", 1)[-1] != "config.json"
              and _read_json(full) is None):
            problems.append(Problem("json", rel, "does not parse as JSON", True))
    return tensors_by_file


def _index_checks(root: Path, rel: str, sizes: dict[str, int],
                  tensors_by_file: dict[str, set[str]], problems: list[Problem],
                  reported_missing: set[str | None], wanted: Callable[[str], bool]) -> None:
    """Every shard an index file names is there and holds the tensors it puts there."""
    index = _read_json(root / rel)
    weight_map = index.get("weight_map") if isinstance(index, dict) else None
    if not isinstance(weight_map, dict):
        problems.append(Problem("index", rel, "has no weight_map", True))
        return
    base = rel.rsplit("/", 1)[0] + "/" if "/" in rel else ""
    shards: dict[str, list[str]] = {}
    for tensor, shard in weight_map.items():
        shards.setdefault(base + str(shard), []).append(str(tensor))
    for shard, tensors in sorted(shards.items()):
        if shard not in sizes:
            if shard not in reported_missing and wanted(shard):
                problems.append(Problem("index", shard, f"shard named by {rel} is missing",
                                        True))
            continue
        have = tensors_by_file.get(shard)
        if have:
            absent = [t for t in tensors if t not in have]
            if absent:
                problems.append(Problem("index", shard, f"lacks {len(absent)} tensor(s) "
                                        f"{rel} puts there (e.g. {absent[0]})", True))


def verify_model(
    target: str | Path,
    *,
    revision: str | None = None,
    full: bool = False,
    workers: int | None = None,
    progress: HashProgress | None = None,
    on_hash_start: Callable[[int, int], None] | None = None,
) -> VerifyReport:
    """Verify a local directory or a cached Hugging Face repo, offline.

    Args:
        target: A directory, or an ``org/name`` repo id found in the HF cache.
        revision: Branch, tag or commit for a repo id (default ``main``).
        full: Also hash every file.
        workers: Hashing threads.
        progress: Byte-count callback while hashing.
        on_hash_start: Called with (files, bytes) before hashing.

    Raises:
        NotFoundError: Nothing to verify there.
        UsageError: ``revision`` given with a directory.
    """
    path = Path(target).expanduser()
    if path.is_dir():
        if revision:
            raise UsageError("--revision applies to a Hugging Face repo, not a directory")
        cached = hf_cache.snapshot_of_path(path)
        loc = locate_cached(*cached) if cached else locate_local(path)
    else:
        text = str(target)
        if text.count("/") != 1 or looks_like_path(text):
            raise NotFoundError(f"{text} is neither a directory nor a Hugging Face repo id")
        loc = locate_cached(text, revision)
    return verify_location(loc, full=full, workers=workers, progress=progress,
                           on_hash_start=on_hash_start)


# --------------------------------------------------------------------------------------------
# LoRA adapters (PEFT layout: adapter_config.json and adapter_model.safetensors)

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = ("adapter_model.safetensors", "adapter_model.bin")
_LORA_TENSOR = re.compile(r"^(?:base_model\.model\.)?(?P<module>.+)\.lora_(?P<ab>[AB])"
                          r"(?:\.[^.]+)?\.weight$")


@dataclass(frozen=True)
class AdapterInfo:
    """What a LoRA adapter's files say about it.

    Attributes:
        path: Its directory.
        rank: The LoRA rank (``r``).
        target_modules: The module names it adapts (``q_proj``, ...), sorted.
        shapes: Module path -> (in features, out features) read off lora_A and lora_B.
    """

    path: Path
    rank: int
    target_modules: tuple[str, ...]
    shapes: dict[str, tuple[int, int]] = field(default_factory=dict)


def is_adapter_dir(path: Path) -> bool:
    """True when ``path`` holds a PEFT adapter (an ``adapter_config.json``)."""
    return (path / ADAPTER_CONFIG).is_file()


def read_adapter(path: Path) -> AdapterInfo:
    """Read and check a LoRA adapter's config and weights' headers.

    Raises:
        NotFoundError: No adapter_config.json or no adapter weights in ``path``.
        UsageError: The files are not a usable LoRA adapter (the message says why).
    """
    config = _read_json(path / ADAPTER_CONFIG)
    if not (path / ADAPTER_CONFIG).is_file():
        raise NotFoundError(f"{path} has no {ADAPTER_CONFIG}: not a LoRA adapter")
    if not isinstance(config, dict):
        raise UsageError(f"{path / ADAPTER_CONFIG} does not parse as a JSON object")
    if str(config.get("peft_type", "LORA")).upper() != "LORA":
        raise UsageError(f"{path}: peft_type {config.get('peft_type')!r} is not LORA")
    rank = config.get("r")
    if not isinstance(rank, int) or isinstance(rank, bool) or rank < 1:
        raise UsageError(f"{path / ADAPTER_CONFIG}: rank r must be a positive integer "
                         f"(got {rank!r})")
    targets = config.get("target_modules")
    if isinstance(targets, str):
        targets = [targets]
    if not isinstance(targets, list) or not targets or not all(
            isinstance(t, str) for t in targets):
        raise UsageError(f"{path / ADAPTER_CONFIG}: target_modules must name the modules "
                         "the adapter changes")
    weights = next((path / n for n in ADAPTER_WEIGHTS if (path / n).is_file()), None)
    if weights is None:
        raise NotFoundError(f"{path} has no adapter weights ({' or '.join(ADAPTER_WEIGHTS)})")
    shapes: dict[str, tuple[int, int]] = {}
    if weights.suffix == ".safetensors":
        try:
            _len, header = hf_cache.read_safetensors_header(weights, weights.stat().st_size)
        except (ValueError, OSError) as exc:
            raise UsageError(f"{weights}: {exc}") from None
        halves: dict[str, dict[str, list[int]]] = {}
        for name, meta in header.items():
            match = _LORA_TENSOR.match(name)
            if match and isinstance(meta, dict) and len(meta.get("shape") or []) == 2:
                halves.setdefault(match["module"], {})[match["ab"]] = meta["shape"]
        if not halves:
            raise UsageError(f"{weights}: no lora_A/lora_B tensors")
        for module, pair in halves.items():
            a, b = pair.get("A"), pair.get("B")
            if a is None or b is None:
                raise UsageError(f"{weights}: {module} has only lora_{'A' if a else 'B'}")
            if a[0] != rank or b[1] != rank:
                raise UsageError(f"{weights}: {module} has rank {a[0]}x{b[1]}, the config "
                                 f"says r={rank}")
            shapes[module] = (a[1], b[0])
    return AdapterInfo(path, rank, tuple(sorted(set(targets))), shapes)


def base_weight_shapes(model_dir: Path) -> dict[str, tuple[int, int]]:
    """Module path -> (in features, out features) of every 2-D weight of a model on disk,
    from its safetensors headers (nothing else is read)."""
    out: dict[str, tuple[int, int]] = {}
    for file in sorted(model_dir.glob("*.safetensors")):
        try:
            _len, header = hf_cache.read_safetensors_header(file, file.stat().st_size)
        except (ValueError, OSError):
            continue
        for name, meta in header.items():
            if name.endswith(".weight") and isinstance(meta, dict) \
                    and len(meta.get("shape") or []) == 2:
                out_features, in_features = meta["shape"]
                out[name[: -len(".weight")]] = (in_features, out_features)
    return out


def adapter_mismatch(info: AdapterInfo, base_dir: Path) -> str | None:
    """Why the adapter cannot serve on the model in ``base_dir``, or None when it fits.

    Checks that every target module exists in the base model and that the adapter's
    matrices have the base's input and output sizes.
    """
    shapes = base_weight_shapes(base_dir)
    if not shapes:
        return None  # no safetensors headers to compare with: vLLM has the last word
    leaves = {name.rsplit(".", 1)[-1] for name in shapes}
    missing = [t for t in info.target_modules if t not in leaves and t not in shapes]
    if missing:
        return (f"target module(s) {', '.join(missing)} do not exist in the base model "
                f"(it has {', '.join(sorted(leaves)[:8])}, ...)")
    for module, (in_f, out_f) in sorted(info.shapes.items()):
        base = shapes.get(module)
        if base is None:
            return f"{module} is not a module of the base model"
        if base != (in_f, out_f):
            return (f"{module} is {in_f}->{out_f} in the adapter but {base[0]}->{base[1]} "
                    "in the base model")
    return None
