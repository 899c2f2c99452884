"""Shared-memory segments a server's processes leave in ``/dev/shm`` when they are killed.

vLLM's processes make POSIX shared memory (``psm_*``, Python's ``SharedMemory``) and named
semaphores (``sem.mp-*``, multiprocessing's locks); both are removed by the process that
made them, or by Python's resource tracker, when they exit normally. A SIGKILL (``stop
--now``, a crash, an eviction, a hung server) kills the tracker with them, and the files
stay until the machine reboots.

While a server runs, the segments its processes map are noted (``servers/NAME.shm``: name,
device and inode of each); once its processes are gone, each noted file is removed, but
only when it is still that very file (same device and inode), belongs to this user, and no
live process maps it or holds it open. Nothing else in ``/dev/shm`` is ever touched.

A semaphore's creator maps a temporary file that glibc then links under the final name
(``sem.mp-*``) and unlinks, so its map shows a deleted path: segments are matched to
``/dev/shm`` entries by device and inode, not by the name in the map.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import stat
from collections.abc import Iterable, Iterator
from dataclasses import asdict, dataclass
from pathlib import Path

from cmw_vllm import paths
from cmw_vllm.errors import CmwVllmError
from cmw_vllm.server_record import shm_path

logger = logging.getLogger(__name__)

SHM_DIR = Path("/dev/shm")
# What vLLM's processes make: multiprocessing.shared_memory and multiprocessing's semaphores.
NAME_PREFIXES = ("psm_", "sem.mp-")


@dataclass(frozen=True)
class Segment:
    """One file in ``/dev/shm``: its name, device and inode."""

    name: str
    dev: int
    ino: int


def _mapped_inodes(pid: int) -> set[tuple[int, int]]:
    """(device, inode) of every ``/dev/shm`` file that process ``pid`` maps."""
    try:
        with open(f"/proc/{pid}/maps", "rb") as fh:
            data = fh.read()
    except OSError:  # gone, or not ours to read
        return set()
    found = set()
    if b"/dev/shm/" not in data:
        return found
    for line in data.splitlines():
        if b" /dev/shm/" not in line:
            continue
        fields = line.split(None, 5)
        if len(fields) < 6:
            continue
        try:
            major, minor = (int(x, 16) for x in fields[3].split(b":"))
            found.add((os.makedev(major, minor), int(fields[4])))
        except ValueError:
            continue
    return found


def _open_inodes(pid: int) -> set[tuple[int, int]]:
    """(device, inode) of every ``/dev/shm`` file that process ``pid`` holds open."""
    fd_dir = f"/proc/{pid}/fd"
    found = set()
    try:
        fds = os.listdir(fd_dir)
    except OSError:
        return found
    for fd in fds:
        try:
            if not os.readlink(f"{fd_dir}/{fd}").startswith("/dev/shm/"):
                continue
            st = os.stat(f"{fd_dir}/{fd}")
        except OSError:
            continue
        found.add((st.st_dev, st.st_ino))
    return found


def _candidates() -> dict[tuple[int, int], Segment]:
    """This user's ``psm_*`` and ``sem.mp-*`` files in ``/dev/shm``, by (device, inode)."""
    out: dict[tuple[int, int], Segment] = {}
    try:
        names = os.listdir(SHM_DIR)
    except OSError:
        return out
    uid = os.getuid()
    for name in names:
        if not name.startswith(NAME_PREFIXES):
            continue
        try:
            st = os.lstat(SHM_DIR / name)
        except OSError:
            continue
        if stat.S_ISREG(st.st_mode) and st.st_uid == uid:
            out[(st.st_dev, st.st_ino)] = Segment(name, st.st_dev, st.st_ino)
    return out


def segments_of(pids: Iterable[int]) -> set[Segment]:
    """The ``psm_*`` / ``sem.mp-*`` files of this user that the processes ``pids`` map."""
    mapped: set[tuple[int, int]] = set()
    for pid in pids:
        mapped |= _mapped_inodes(pid)
    if not mapped:
        return set()
    return {seg for key, seg in _candidates().items() if key in mapped}


@contextlib.contextmanager
def _list_lock(name: str) -> Iterator[None]:
    """Serialise read-modify-write of one server's list (the supervisor and the CLI both
    note segments)."""
    with paths.private_lock(paths.locks_dir() / f"{name}.shm.lock", timeout=30):
        yield


def _load(name: str) -> set[Segment]:
    try:
        data = json.loads(shm_path(name).read_text(encoding="utf-8"))
        return {Segment(str(d["name"]), int(d["dev"]), int(d["ino"])) for d in data}
    except FileNotFoundError:
        return set()
    except (OSError, ValueError, TypeError, KeyError) as exc:
        logger.warning("%s: unreadable list of shared-memory segments: %s", name, exc)
        return set()


def _save(name: str, segments: set[Segment]) -> None:
    if not segments:
        with contextlib.suppress(FileNotFoundError):
            shm_path(name).unlink()
        return
    data = [asdict(s) for s in sorted(segments, key=lambda s: s.name)]
    paths.write_private(shm_path(name), json.dumps(data))


def note(name: str, pids: Iterable[int]) -> set[Segment]:
    """Add the segments that ``pids`` (server ``name``'s processes) map to its list.

    Returns:
        The segments found now.
    """
    found = segments_of(pids)
    if found:
        try:
            with _list_lock(name):
                known = _load(name)
                if not found <= known:
                    _save(name, known | found)
        except (CmwVllmError, OSError, TimeoutError) as exc:
            logger.warning("%s: cannot note its shared-memory segments: %s", name, exc)
    return found


def in_use() -> set[tuple[int, int]] | None:
    """(device, inode) of every ``/dev/shm`` file that a live process maps or holds open
    (those this user may inspect; a file of this user is mode 0600, so others map it only
    as root); None without ``/proc``, where nothing can be shown unused."""
    busy: set[tuple[int, int]] = set()
    try:
        entries = os.listdir("/proc")
    except OSError:
        return None
    for entry in entries:
        if entry.isdigit():
            pid = int(entry)
            busy |= _mapped_inodes(pid) | _open_inodes(pid)
    return busy


def remove_leftovers(name: str) -> list[str]:
    """Remove the noted segments of server ``name`` that nothing uses any more.

    A noted file is removed only while it is the same file (device and inode), this
    user's, and neither mapped nor open in any live process; the ones still in use stay
    on the list for the next clean-up.

    Returns:
        The names removed from ``/dev/shm``.
    """
    try:
        with _list_lock(name):
            return _remove_noted(name)
    except (CmwVllmError, OSError, TimeoutError) as exc:
        logger.warning("%s: cannot clean up its shared-memory segments: %s", name, exc)
        return []


def _remove_noted(name: str) -> list[str]:
    """:func:`remove_leftovers`, under the list's lock."""
    noted = _load(name)
    if not noted:
        return []
    present = _candidates()
    mine = {s for s in noted if present.get((s.dev, s.ino)) == s}
    busy = in_use() if mine else set()
    if busy is None:
        return []
    removed, kept = [], set()
    for seg in sorted(mine, key=lambda s: s.name):
        if (seg.dev, seg.ino) in busy:
            kept.add(seg)
            continue
        try:
            st = os.lstat(SHM_DIR / seg.name)
            if (st.st_dev, st.st_ino) != (seg.dev, seg.ino):
                continue
            os.unlink(SHM_DIR / seg.name)
            removed.append(seg.name)
        except FileNotFoundError:
            continue
        except OSError as exc:
            logger.warning("%s: cannot remove /dev/shm/%s: %s", name, seg.name, exc)
    if removed:
        logger.info("%s: removed shared memory left by its processes: %s", name,
                    ", ".join(removed))
    _save(name, kept)
    return removed
