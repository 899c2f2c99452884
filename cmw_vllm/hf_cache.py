"""Everything cmw-vllm knows about the Hugging Face cache and the Hub settings.

The other modules ask this one where the cache is, what a repo's folder is called, whether
and where a snapshot is cached, what the token and endpoint are, whether offline mode is on,
which files of a repo a download selects, and what a safetensors header says.

Settings are read from the environment at call time, the way ``huggingface_hub`` reads them
at import time (``HF_HUB_CACHE`` > ``HF_HOME/hub`` > ``XDG_CACHE_HOME`` > ``~/.cache``), so
this module never imports ``huggingface_hub`` and ``list``/``status`` stay fast. An empty
variable counts as unset.

The cache layout (``$HF_HUB_CACHE/models--ORG--NAME/``): ``blobs/<etag>`` hold the content,
``snapshots/<commit>/<path>`` link to them, ``refs/<branch>`` hold a commit hash, and
``trees/<commit>.json`` lists every file of the commit (written by ``snapshot_download``).
"""

from __future__ import annotations

import json
import logging
import os
import re
import struct
from collections.abc import Sequence
from fnmatch import fnmatch
from pathlib import Path
from typing import Any

logger = logging.getLogger(__name__)

DEFAULT_ENDPOINT = "https://huggingface.co"
REPO_FOLDER_PREFIX = "models--"
COMMIT_RE = re.compile(r"^[0-9a-f]{40}$")

# huggingface_hub's true values for its boolean variables (compared upper-cased, unstripped).
_TRUE_VALUES = frozenset({"1", "ON", "YES", "TRUE"})

# What vLLM reads: weights, configs, tokenizer files, chat templates, remote code.
DEFAULT_ALLOW_PATTERNS = [
    "*.safetensors",
    "*.json",
    "*.txt",
    "*.model",
    "*.tiktoken",
    "*.jinja",
    "*.py",
]
# PyTorch pickles are fetched only when a repo has no safetensors at all.
TORCH_WEIGHT_PATTERNS = ["*.bin", "*.pt", "*.pth"]
# Safetensors in sub-folders (original/, metal/, onnx/, ...) duplicate the root weights.
SUBFOLDER_WEIGHT_PATTERNS = ["*/*.safetensors"]

# Bits per element of every dtype the safetensors format knows.
SAFETENSORS_DTYPE_BITS = {
    "BOOL": 8, "U8": 8, "I8": 8, "F8_E4M3": 8, "F8_E5M2": 8, "F8_E8M0": 8,
    "I16": 16, "U16": 16, "F16": 16, "BF16": 16,
    "I32": 32, "U32": 32, "F32": 32,
    "I64": 64, "U64": 64, "F64": 64, "C64": 64,
    "F4": 4, "F6_E2M3": 6, "F6_E3M2": 6,
}  # fmt: skip
MAX_SAFETENSORS_HEADER = 100 << 20


# --------------------------------------------------------------------------------------------
# Settings from the environment


def _env(name: str) -> str | None:
    value = os.environ.get(name)
    return value or None


def hf_home() -> Path:
    """The Hugging Face home directory (``HF_HOME`` or ``$XDG_CACHE_HOME/huggingface``)."""
    explicit = _env("HF_HOME")
    if explicit:
        return Path(explicit).expanduser()
    xdg = _env("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(xdg).expanduser() / "huggingface"


def hub_cache_dir() -> Path:
    """Where ``huggingface_hub`` stores downloaded repos (``HF_HUB_CACHE`` wins)."""
    explicit = _env("HF_HUB_CACHE") or _env("HUGGINGFACE_HUB_CACHE")
    if explicit:
        return Path(explicit).expanduser()
    return hf_home() / "hub"


def endpoint() -> str:
    """The Hub's URL (``HF_ENDPOINT`` or huggingface.co)."""
    return (_env("HF_ENDPOINT") or DEFAULT_ENDPOINT).rstrip("/")


def offline() -> bool:
    """True when offline mode is on, parsed exactly as ``huggingface_hub`` parses it.

    ``HF_HUB_OFFLINE`` (else ``TRANSFORMERS_OFFLINE``) is on when it is ``1``, ``on``,
    ``yes`` or ``true`` in any case; every other value is off, as for the huggingface_hub
    inside the vLLM server that cmw-vllm starts.
    """
    value = _env("HF_HUB_OFFLINE") or _env("TRANSFORMERS_OFFLINE")
    return value is not None and value.upper() in _TRUE_VALUES


def _token_and_source() -> tuple[str, str] | None:
    for name in ("HF_TOKEN", "HUGGING_FACE_HUB_TOKEN"):
        value = (_env(name) or "").strip()
        if value:
            return value, name
    saved = token_file()
    try:
        value = saved.read_text(encoding="utf-8").strip()
    except (OSError, UnicodeDecodeError):
        return None
    return (value, str(saved)) if value else None


def token_file() -> Path:
    """Where ``hf auth login`` saves the token (``HF_TOKEN_PATH`` or ``$HF_HOME/token``)."""
    explicit = _env("HF_TOKEN_PATH")
    return Path(explicit).expanduser() if explicit else hf_home() / "token"


def token() -> str | None:
    """The Hugging Face token (``HF_TOKEN``, else the one saved by ``hf auth login``)."""
    found = _token_and_source()
    return found[0] if found else None


def token_source() -> str | None:
    """Where the token comes from: a variable's name or a file's path; None without one."""
    found = _token_and_source()
    return found[1] if found else None


# --------------------------------------------------------------------------------------------
# The cache's layout


def repo_folder_name(repo_id: str) -> str:
    """``org/name`` -> ``models--org--name``, the repo's folder name in the cache."""
    return REPO_FOLDER_PREFIX + repo_id.replace("/", "--")


def repo_id_of_folder(name: str) -> str | None:
    """``models--org--name`` -> ``org/name`` (``models--gpt2`` -> ``gpt2``); else None."""
    if not name.startswith(REPO_FOLDER_PREFIX):
        return None
    parts = name[len(REPO_FOLDER_PREFIX):].split("--")
    return "/".join(parts) if len(parts) <= 2 and all(parts) else None


def repo_dir(repo_id: str, cache_dir: Path | None = None) -> Path:
    """The repo's folder under the hub cache (it may not exist)."""
    return (cache_dir or hub_cache_dir()) / repo_folder_name(repo_id)


def snapshots_dir(folder: Path) -> Path:
    """Where a repo folder keeps one folder of links per cached commit."""
    return folder / "snapshots"


def snapshot_path(folder: Path, commit: str) -> Path:
    """Where a repo folder keeps the files of a commit (it may not exist)."""
    return snapshots_dir(folder) / commit


def blobs_dir(folder: Path) -> Path:
    """Where a repo folder keeps file contents, each once, named after its ETag."""
    return folder / "blobs"


def local_metadata_dir(local_dir: Path) -> Path:
    """Where ``snapshot_download(local_dir=...)`` keeps its metadata (``download/``,
    ``trees/``) inside the folder it downloads into."""
    return local_dir / ".cache" / "huggingface"


def cached_repo_dirs(cache_dir: Path | None = None) -> list[tuple[str, Path]]:
    """(repo id, folder) of every model repo in the cache, sorted by folder name."""
    cache = cache_dir or hub_cache_dir()
    try:
        entries = sorted(os.listdir(cache))
    except (FileNotFoundError, NotADirectoryError):
        return []
    except OSError as exc:
        logger.warning("cannot list %s: %s", cache, exc)
        return []
    return [(repo_id, cache / entry) for entry in entries
            if (repo_id := repo_id_of_folder(entry)) is not None]


def refs(folder: Path) -> list[str]:
    """The branch and tag names a repo folder has refs for."""
    ref_dir = folder / "refs"
    return sorted(p.name for p in ref_dir.glob("*")) if ref_dir.is_dir() else []


def resolve_commit(folder: Path, revision: str | None = None) -> str | None:
    """The commit a revision (branch, tag or commit hash; default ``main``) is cached as."""
    rev = revision or "main"
    if COMMIT_RE.match(rev) and snapshot_path(folder, rev).is_dir():
        return rev
    try:
        return (folder / "refs" / rev).read_text(encoding="utf-8").strip() or None
    except OSError:
        return None


def write_ref(folder: Path, revision: str, commit: str) -> None:
    """Record that ``revision`` (a branch or tag) is ``commit``, as ``huggingface_hub`` does.

    A failure is logged, not raised: the snapshot is there, only the name is not.
    """
    if revision == commit or COMMIT_RE.match(revision):
        return
    ref = folder / "refs" / revision
    try:
        if ref.is_file() and ref.read_text(encoding="utf-8").strip() == commit:
            return
        ref.parent.mkdir(parents=True, exist_ok=True)
        tmp = ref.with_name(f".{ref.name}.{os.getpid()}.tmp")
        tmp.write_text(commit, encoding="utf-8")
        os.replace(tmp, ref)
    except OSError as exc:
        logger.warning("cannot record %s -> %s in %s: %s", revision, commit, folder, exc)


def has_blob(folder: Path, etag: str) -> bool:
    """True when a repo folder holds the blob of this ETag (the content is on disk)."""
    return (blobs_dir(folder) / etag).is_file()


def tree_file(folder: Path, commit: str) -> Path:
    """The file listing ``snapshot_download`` leaves for a commit (size and hash per file)."""
    return folder / "trees" / f"{commit}.json"  # also under local_metadata_dir()


def snapshot_dir(repo_id: str, revision: str | None = None, *, needs: str | None = None,
                 cache_dir: Path | None = None) -> Path | None:
    """The cached snapshot folder of a repo, or None.

    Args:
        repo_id: ``org/name``.
        revision: Branch, tag or commit. Without one, ``main`` is tried first, then the
            newest snapshot that qualifies.
        needs: A file the snapshot must have (``config.json``).
        cache_dir: The hub cache (default from the environment).
    """
    folder = repo_dir(repo_id, cache_dir)
    snapshots = snapshots_dir(folder)
    if not snapshots.is_dir():
        return None

    def qualifies(snap: Path) -> bool:
        return snap.is_dir() and (needs is None or (snap / needs).exists())

    commit = resolve_commit(folder, revision)
    if commit and qualifies(snapshots / commit):
        return snapshots / commit
    if revision:
        return None
    try:
        candidates = [d for d in snapshots.iterdir() if qualifies(d)]
    except OSError:
        return None
    return max(candidates, key=lambda d: d.stat().st_mtime) if candidates else None


def is_cached(repo_id: str, cache_dir: Path | None = None) -> bool:
    """True when the cache holds a non-empty snapshot of ``repo_id`` (any revision).

    A quick presence check; ``verify`` tells whether the files are complete.
    """
    snapshots = snapshots_dir(repo_dir(repo_id, cache_dir))
    try:
        return any(snap.is_dir() and any(snap.iterdir()) for snap in snapshots.iterdir())
    except OSError:
        return False


def snapshot_of_path(path: Path) -> tuple[str, str, Path] | None:
    """(repo id, commit, hub cache) when ``path`` is a snapshot folder in a hub cache."""
    resolved = path.resolve()
    snapshots, folder = resolved.parent, resolved.parent.parent
    repo_id = repo_id_of_folder(folder.name)
    if snapshots.name != "snapshots" or repo_id is None or not COMMIT_RE.match(resolved.name):
        return None
    return repo_id, resolved.name, folder.parent


# --------------------------------------------------------------------------------------------
# Which files of a repo a download selects


def select_files(names: Sequence[str], include: Sequence[str] = (),
                 exclude: Sequence[str] = ()) -> tuple[list[str], list[str]]:
    """The allow and ignore patterns for a repo with these files.

    Args:
        names: Every file of the repo.
        include: The user's ``--include`` patterns: they replace the default selection.
        exclude: The user's ``--exclude`` patterns, always applied.

    Returns:
        (allow patterns, ignore patterns), as ``snapshot_download`` takes them.
    """
    ignore = list(exclude)
    if include:
        return list(include), ignore
    allow = list(DEFAULT_ALLOW_PATTERNS)
    safetensors = [n for n in names if n.endswith(".safetensors")]
    if not safetensors:
        allow += TORCH_WEIGHT_PATTERNS
    elif any("/" not in n for n in safetensors) and any("/" in n for n in safetensors):
        ignore += SUBFOLDER_WEIGHT_PATTERNS
    return allow, ignore


def filter_names(names: Sequence[str], allow: Sequence[str] | None,
                 ignore: Sequence[str] | None) -> list[str]:
    """The names matching ``allow`` and no ``ignore`` pattern (as huggingface_hub filters)."""
    out = []
    for name in names:
        if allow is not None and not any(fnmatch(name, p) for p in allow):
            continue
        if ignore and any(fnmatch(name, p) for p in ignore):
            continue
        out.append(name)
    return out


# --------------------------------------------------------------------------------------------
# Safetensors headers


def read_safetensors_header(path: str | os.PathLike[str],
                            size: int | None = None) -> tuple[int, dict[str, Any]]:
    """The header of a safetensors file: its length in bytes and its JSON object.

    Args:
        path: The file.
        size: The file's size, when known: a header longer than the file is refused.

    Raises:
        ValueError: The file is not a safetensors file (the message says why).
        OSError: The file cannot be read.
    """
    with open(path, "rb") as fh:
        head = fh.read(8)
        if len(head) < 8:
            shown = size if size is not None else len(head)
            raise ValueError(f"too short for a safetensors file ({shown} bytes)")
        (header_len,) = struct.unpack("<Q", head)
        if header_len > MAX_SAFETENSORS_HEADER or (size is not None and 8 + header_len > size):
            where = f" ({size} bytes)" if size is not None else ""
            raise ValueError(f"header length {header_len} does not fit in the file{where}")
        try:
            header = json.loads(fh.read(header_len))
        except (ValueError, UnicodeDecodeError):
            raise ValueError("header is not valid JSON") from None
    if not isinstance(header, dict):
        raise ValueError("header is not a JSON object")
    return header_len, header

