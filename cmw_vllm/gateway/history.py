"""How long a model's earlier starts took, and how far a start in progress has come.

The gateway keeps the last few start durations of each model (``start-times.json`` in the
state dir, 0600) and estimates a start's progress from them: elapsed time over the median of
the earlier starts, never 100 % before the server answers. A model never started before has
a phase (read from vLLM's log) but no estimate.
"""

from __future__ import annotations

import contextlib
import json
import logging
import statistics
import time
from dataclasses import dataclass
from typing import Any

from cmw_vllm import paths
from cmw_vllm.errors import CmwVllmError

logger = logging.getLogger(__name__)

KEPT = 5  # durations kept per model
FILE_NAME = "start-times.json"
MAX_ESTIMATE = 0.99  # a start is never shown done before its server answers


@dataclass
class StartProgress:
    """One start in progress.

    Attributes:
        began: ``time.monotonic()`` when it began.
        expected: Seconds earlier starts of the model took (median), None when unknown.
        phase: The latest phase (``loading weights``...), from the server's log.
    """

    began: float
    expected: float | None = None
    phase: str = "preparing"

    def seen(self, phase: str, _elapsed: float) -> None:
        """``ServerManager.start``'s progress callback (called from a worker thread)."""
        self.phase = phase

    def fraction(self, now: float | None = None) -> float | None:
        """Estimated share done (0..0.99), None without earlier starts."""
        if not self.expected:
            return None
        now = time.monotonic() if now is None else now
        return round(min(MAX_ESTIMATE, max(0.0, (now - self.began) / self.expected)), 3)

    def to_json(self, now: float | None = None) -> dict[str, Any]:
        """``phase``, ``progress`` (0..1 or None), ``elapsed_s``, ``expected_s``."""
        now = time.monotonic() if now is None else now
        return {"phase": self.phase, "progress": self.fraction(now),
                "elapsed_s": round(now - self.began, 1),
                "expected_s": round(self.expected, 1) if self.expected else None}


class StartHistory:
    """The last :data:`KEPT` start durations of each model, kept on disk."""

    def __init__(self) -> None:
        self._times: dict[str, list[float]] | None = None

    @staticmethod
    def path() -> Any:
        """Where the durations are kept."""
        return paths.state_dir() / FILE_NAME

    def _load(self) -> dict[str, list[float]]:
        if self._times is None:
            self._times = {}
            with contextlib.suppress(OSError, ValueError):
                data = json.loads(self.path().read_text(encoding="utf-8"))
                if isinstance(data, dict):
                    self._times = {
                        str(k): [float(x) for x in v if isinstance(x, (int, float)) and x > 0]
                        for k, v in data.items() if isinstance(v, list)}
        return self._times

    def expected(self, name: str) -> float | None:
        """Median seconds of ``name``'s earlier starts, None when it never started."""
        times = self._load().get(name)
        return statistics.median(times) if times else None

    def add(self, name: str, seconds: float) -> None:
        """Keep one more duration of ``name`` (blocking: the file is written)."""
        times = self._load()
        times[name] = [*times.get(name, []), round(seconds, 2)][-KEPT:]
        try:
            paths.ensure_dir(paths.state_dir())
            paths.write_private(self.path(), json.dumps(times, indent=1) + "\n")
        except (OSError, CmwVllmError) as exc:
            logger.warning("cannot keep start times in %s: %s", self.path(), exc)
