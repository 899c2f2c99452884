"""The gateway's log file: rotated by size, and scrubbed of what clients send.

The file is ``logs/NAME.log`` like a server's, rotated the same way (``NAME.log.1`` ..
``.5``, :func:`cmw_vllm.server_record.rotate_log`), but by size while the gateway runs, since
a gateway runs for months (nginx leaves this to logrotate). In the background the process's
stdout and stderr follow the current file, so nothing written there escapes the rotation.

Lines from other libraries (aiohttp, asyncio, ...) keep only their fixed text: no arguments,
no traceback, just the exception's type. Their arguments and tracebacks can hold a request's
header bytes, an API key included; the gateway's own lines never log request data.
"""

from __future__ import annotations

import logging
import os
import sys
from pathlib import Path

from cmw_vllm.server_record import LOG_KEEP, rotate_log

OWN = "cmw_vllm"


class RotatingLog(logging.Handler):
    """Append lines to ``path`` (0600, never through a symlink); past ``max_bytes``, rotate.

    Args:
        path: The log file.
        max_bytes: Size at which it is rotated.
        keep: Rotated files kept.
        follow_stdio: Point file descriptors 1 and 2 at the current file (background).

    Raises:
        OSError: The file cannot be opened.
    """

    def __init__(self, path: Path, max_bytes: int, keep: int = LOG_KEEP,
                 follow_stdio: bool = False) -> None:
        super().__init__()
        self.path = path
        self.max_bytes = max_bytes
        self.keep = keep
        self.follow_stdio = follow_stdio
        self.fd = -1
        self._open()

    def _open(self) -> None:
        flags = os.O_WRONLY | os.O_CREAT | os.O_APPEND | getattr(os, "O_NOFOLLOW", 0)
        fd = os.open(self.path, flags, 0o600)
        old, self.fd = self.fd, fd
        if self.follow_stdio:
            for std in (1, 2):
                os.dup2(fd, std)
        if old >= 0:
            os.close(old)

    def emit(self, record: logging.LogRecord) -> None:
        try:
            data = (self.format(record) + "\n").encode("utf-8", "backslashreplace")
            os.write(self.fd, data)
            if os.fstat(self.fd).st_size >= self.max_bytes:
                self.rotate()
        except Exception:  # noqa: BLE001 - logging must never raise into the gateway
            self.handleError(record)

    def rotate(self) -> None:
        """Shift the files (``NAME.log`` becomes ``NAME.log.1``) and start a new one."""
        rotate_log(self.path, self.keep)
        self._open()

    def close(self) -> None:
        if self.fd >= 0 and not self.follow_stdio:
            os.close(self.fd)
            self.fd = -1
        super().close()


class Scrub(logging.Filter):
    """Keep other libraries' lines to their fixed text (see the module's docstring)."""

    def filter(self, record: logging.LogRecord) -> bool:
        if record.name == OWN or record.name.startswith(OWN + "."):
            return True
        text = str(record.msg).splitlines()[0] if str(record.msg) else ""
        exc = record.exc_info[1] if record.exc_info else None
        if exc is not None:
            text += f" ({type(exc).__name__})"
        record.msg = text[:200]
        record.args = None
        record.exc_info = None
        record.exc_text = None
        record.stack_info = None
        return True


def setup(path: Path, max_bytes: int, background: bool) -> RotatingLog:
    """Log the gateway to ``path`` with rotation, and scrub every other library's lines.

    In the background stderr is ``path`` already: the handler takes over file descriptors 1
    and 2 and the line on stderr is dropped (it would be written twice). In the foreground
    lines also go to stderr, scrubbed the same way.

    Raises:
        OSError: The file cannot be opened.
    """
    from cmw_vllm.logging import FORMAT

    handler = RotatingLog(path, max_bytes, follow_stdio=background)
    handler.setFormatter(logging.Formatter(FORMAT))
    handler.addFilter(Scrub())
    own = logging.getLogger(OWN)
    if background:
        for old in list(own.handlers):
            if isinstance(old, logging.StreamHandler) and \
                    getattr(old, "stream", None) in (sys.stderr, sys.__stderr__):
                own.removeHandler(old)
    own.addHandler(handler)
    # Everything else (aiohttp, asyncio, ...) reaches the root logger: scrubbed there.
    root = logging.getLogger()
    for old in list(root.handlers):
        root.removeHandler(old)
    root.addHandler(handler)
    if not background:
        stream = logging.StreamHandler()
        stream.setFormatter(logging.Formatter(FORMAT))
        stream.addFilter(Scrub())
        root.addHandler(stream)
    root.setLevel(logging.WARNING)
    for name in ("aiohttp", "asyncio"):
        logging.getLogger(name).propagate = True
    return handler
