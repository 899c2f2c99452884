"""Start back-off per model, and what a failed start may tell a client.

A model whose start fails is not launched again on the next request: each attempt costs a
launch (a log rotation, memory, GPU time) and first evicts idle servers. After a failure the
model's starts are refused for a while (5 s, doubling after each failure in a row up to
5 min, like a restart back-off); the refusal is a 503 with ``Retry-After`` and the last
failure's diagnosis. A success clears it.

Diagnoses name files (the server's log, the model's directory): the gateway's log keeps
them, a client gets them with the paths cut out (:func:`hide_paths`).
"""

from __future__ import annotations

import math
import re
import time
from dataclasses import dataclass

FIRST_DELAY = 5.0
MAX_DELAY = 300.0

# An absolute or home-relative path: starts a word (not inside a URL, "a/b" or "8/16") and
# runs to whitespace, a quote, a bracket or a comma.
_PATH = re.compile(r"(?<![\w:/.~\-])~?/[^\s'\"`()\[\]{},;<>]*")


def hide_paths(text: str | None) -> str | None:
    """``text`` with every file-system path replaced by ``<path>``."""
    if not text:
        return text
    return _PATH.sub("<path>", text)


@dataclass
class Failure:
    """The last failed start of one model."""

    message: str
    hint: str | None
    failures: int
    until: float  # time.monotonic() before which no new start is made

    def retry_after(self, now: float) -> int:
        """Whole seconds until the next start may be tried (at least 1)."""
        return max(1, math.ceil(self.until - now))


class StartBackoff:
    """When each model may be started again after failed starts.

    Args:
        first: Seconds of the first back-off (0: none).
        cap: The longest back-off.
    """

    def __init__(self, first: float = FIRST_DELAY, cap: float = MAX_DELAY) -> None:
        self.first = first
        self.cap = cap
        self._failed: dict[str, Failure] = {}

    def blocked(self, name: str, now: float | None = None) -> Failure | None:
        """The failure that keeps ``name`` from starting now, or None."""
        failure = self._failed.get(name)
        now = time.monotonic() if now is None else now
        if failure is None or now >= failure.until:
            return None
        return failure

    def failed(self, name: str, message: str, hint: str | None,
               now: float | None = None) -> Failure:
        """Record a failed start of ``name``; returns it (with its back-off)."""
        now = time.monotonic() if now is None else now
        before = self._failed.get(name)
        count = before.failures + 1 if before is not None else 1
        delay = min(self.cap, self.first * 2 ** (count - 1)) if self.first > 0 else 0.0
        failure = Failure(message, hint, count, now + delay)
        self._failed[name] = failure
        return failure

    def succeeded(self, name: str) -> None:
        """``name`` started: its next failure backs off from the start again."""
        self._failed.pop(name, None)
