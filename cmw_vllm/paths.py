"""Where cmw-vllm keeps its state. One place, one override (``CMW_VLLM_HOME``)."""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from pathlib import Path

HOME_ENV = "CMW_VLLM_HOME"


def state_dir() -> Path:
    """Return the state directory (``$CMW_VLLM_HOME`` or ``~/.cmw-vllm``)."""
    override = os.environ.get(HOME_ENV)
    return Path(override).expanduser() if override else Path.home() / ".cmw-vllm"


def servers_dir() -> Path:
    """Directory of server records (``NAME.json``) and PID files (``NAME.pid``)."""
    return state_dir() / "servers"


def logs_dir() -> Path:
    """Directory of server logs (``NAME.log``) and cmw-vllm's own log."""
    return state_dir() / "logs"


def locks_dir() -> Path:
    """Directory of per-server lock files."""
    return state_dir() / "locks"


def user_models_file() -> Path:
    """The user's models file that adds to or overrides the built-in registry."""
    return state_dir() / "models.toml"


def ensure_dir(path: Path) -> Path:
    """Create ``path`` (and parents) private to the user, refusing symlinks inside the state dir.

    The state dir itself is made mode 0700 (it may be a symlink the user set up to another
    disk); a directory inside it that is a symlink is refused, so nothing is ever written
    through a link planted there.

    Raises:
        EnvironmentProblem: The directory cannot be created or is a planted symlink.
    """
    from cmw_vllm.errors import EnvironmentProblem

    root = state_dir()
    if path != root and root in path.parents:
        ensure_dir(root)
    try:
        path.mkdir(mode=0o700, parents=True, exist_ok=True)
        if path == root and path.stat().st_mode & 0o077:
            path.chmod(0o700)
    except OSError as exc:
        raise EnvironmentProblem(
            f"cannot create {path}: {exc.strerror or exc}",
            hint=f"set {HOME_ENV} to a writable directory",
        ) from exc
    if path != root and path.is_symlink():
        raise EnvironmentProblem(f"{path} is a symlink; refusing to write through it")
    return path


def write_private(path: Path, text: str, *, fsync: bool = False) -> None:
    """Write ``text`` to ``path`` atomically, mode 0600, never through a symlink.

    A temp file beside it is created exclusively (``O_EXCL | O_NOFOLLOW``) and renamed over
    ``path``, so readers see the old or the new content, never half of it, and a symlink
    planted at ``path`` is replaced rather than followed.

    Args:
        path: The file to write.
        text: Its new content.
        fsync: Flush to disk before the rename (records that must survive a crash).

    Raises:
        EnvironmentProblem: The file cannot be written (read-only dir, disk full, ...).
    """
    import contextlib
    import threading

    from cmw_vllm.errors import EnvironmentProblem

    tmp = path.with_name(f".{path.name}.{os.getpid()}.{threading.get_ident()}.tmp")
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_NOFOLLOW", 0)
    try:
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()
        fd = os.open(tmp, flags, 0o600)
        try:
            os.write(fd, text.encode("utf-8"))
            if fsync:
                os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, path)
    except OSError as exc:
        with contextlib.suppress(OSError):
            tmp.unlink()
        raise EnvironmentProblem(f"cannot write {path}: {exc.strerror or exc}") from exc


@contextlib.contextmanager
def private_lock(lock_file: Path, timeout: float) -> Iterator[None]:
    """Hold the file lock ``lock_file`` (created 0600 in a private directory, never through
    a symlink) for the ``with`` block.

    Raises:
        EnvironmentProblem: The directory cannot be made, or ``lock_file`` is a symlink.
        filelock.Timeout: Another process held it for ``timeout`` seconds.
    """
    from filelock import FileLock

    from cmw_vllm.errors import EnvironmentProblem

    ensure_dir(lock_file.parent)
    if lock_file.is_symlink():
        raise EnvironmentProblem(f"{lock_file} is a symlink; refusing to use it")
    with FileLock(str(lock_file), timeout=timeout, mode=0o600):
        yield


def restart_dir() -> Path:
    """Directory of what each server's last start used, kept for ``restart`` (``NAME.json``,
    ``NAME.key``)."""
    return state_dir() / "restart"
