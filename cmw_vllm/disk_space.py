"""Free space where models, state and logs land, and the size of each cached model.

Where the Hugging Face cache is and how it is laid out is :mod:`cmw_vllm.hf_cache`'s.
"""

from __future__ import annotations

import logging
import os
import shutil
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from cmw_vllm import hf_cache, paths

logger = logging.getLogger(__name__)


@dataclass
class DiskLocation:
    """Space on the file system that holds one of our locations.

    Attributes:
        label: What lives there (``models``, ``state``, ``logs``).
        path: The location itself.
        exists: Whether the location exists yet.
        measured_at: The existing directory whose file system was measured (the location or
            its nearest existing parent).
        total: File system size in bytes.
        used: Bytes in use on it.
        free: Bytes available to this user.
        writable: Whether we could create files there.
        error: Why it could not be measured.
    """

    label: str
    path: str
    exists: bool
    measured_at: str | None = None
    total: int | None = None
    used: int | None = None
    free: int | None = None
    writable: bool | None = None
    error: str | None = None


@dataclass
class CachedModel:
    """One model repo in the Hugging Face cache.

    Attributes:
        repo_id: ``org/name``.
        path: The ``models--org--name`` directory.
        size: Bytes of its blobs (each file counted once, whatever the revisions).
        revisions: Number of snapshots.
        last_modified: Newest mtime among its blobs (epoch seconds).
    """

    repo_id: str
    path: str
    size: int
    revisions: int
    last_modified: float | None


@dataclass
class DiskReport:
    """What ``cmw-vllm disk`` shows."""

    locations: list[DiskLocation]
    hf_cache: str
    cached_models: list[CachedModel] = field(default_factory=list)

    @property
    def cached_total(self) -> int:
        """Bytes used by every cached model together."""
        return sum(m.size for m in self.cached_models)

    def to_json(self) -> dict[str, Any]:
        """Stable JSON shape for ``disk --json``."""
        return {
            "hf_cache": self.hf_cache,
            "locations": [asdict(loc) for loc in self.locations],
            "cached_models": [asdict(m) for m in self.cached_models],
            "cached_total": self.cached_total,
        }


def _existing_parent(path: Path) -> Path | None:
    current = path
    while True:
        if current.exists():
            return current
        if current.parent == current:
            return None
        current = current.parent


def measure(label: str, path: str | os.PathLike[str]) -> DiskLocation:
    """Measure the file system that holds ``path`` (or would hold it once created)."""
    target = Path(path).expanduser()
    loc = DiskLocation(label=label, path=str(target), exists=target.exists())
    base = _existing_parent(target.absolute())
    if base is None:
        loc.error = "no existing parent directory"
        return loc
    loc.measured_at = str(base)
    try:
        usage = shutil.disk_usage(base)
    except OSError as exc:
        loc.error = exc.strerror or str(exc)
        return loc
    loc.total, loc.used, loc.free = usage.total, usage.used, usage.free
    loc.writable = os.access(base, os.W_OK | os.X_OK) if base.is_dir() else False
    return loc


def _dir_size(path: Path) -> tuple[int, float | None]:
    total = 0
    newest: float | None = None
    for root, _dirs, files in os.walk(path):
        for name in files:
            try:
                st = os.lstat(os.path.join(root, name))
            except OSError:
                continue
            total += st.st_size
            newest = st.st_mtime if newest is None else max(newest, st.st_mtime)
    return total, newest


def cached_models(cache_dir: Path | None = None) -> list[CachedModel]:
    """Every model repo in the Hugging Face cache with its size, largest first."""
    out = []
    for repo_id, repo_dir in hf_cache.cached_repo_dirs(cache_dir):
        size, newest = _dir_size(hf_cache.blobs_dir(repo_dir))
        try:
            revisions = len(os.listdir(hf_cache.snapshots_dir(repo_dir)))
        except OSError:
            revisions = 0
        out.append(CachedModel(repo_id, str(repo_dir), size, revisions, newest))
    out.sort(key=lambda m: (-m.size, m.repo_id))
    return out


def disk_report(local_dir: str | os.PathLike[str] | None = None) -> DiskReport:
    """Space where models land (HF cache or ``local_dir``), the state dir and the logs.

    Args:
        local_dir: A ``--local-dir`` that models are downloaded into instead of the cache.

    Returns:
        The locations measured and the cached models with their sizes.
    """
    cache = hf_cache.hub_cache_dir()
    locations = []
    if local_dir is not None:
        locations.append(measure("models (--local-dir)", local_dir))
    locations.append(measure("models (HF cache)", cache))
    locations.append(measure("state", paths.state_dir()))
    locations.append(measure("logs", paths.logs_dir()))
    return DiskReport(locations=locations, hf_cache=str(cache), cached_models=cached_models(cache))
