"""The package's vocabularies and the small rules every module shares, defined once.

Tasks, dtypes and server states are ``StrEnum``\\ s: members compare equal to their strings,
so records on disk, JSON and pydantic fields keep plain strings. Also here: the server-name
rule, port parsing, byte formatting and "is this a path or a Hugging Face id".

Imports nothing of the package but :mod:`cmw_vllm.errors`, so any module may use it.
"""

from __future__ import annotations

import os
import re
from enum import StrEnum

from cmw_vllm.errors import EXIT_FAILURE, EXIT_OK, EXIT_STARTING, ConfigError


class _Word(StrEnum):
    """A vocabulary word: a ``str`` that also shows as one (``repr`` is the string's)."""

    def __repr__(self) -> str:
        return repr(self.value)


class Task(_Word):
    """What a served model does; decides the vLLM runner and the test request."""

    GENERATE = "generate"
    EMBED = "embed"
    SCORE = "score"
    CLASSIFY = "classify"


TASKS: tuple[str, ...] = tuple(t.value for t in Task)

# The task in the record of what runs among the servers but serves no model of its own
# (never a ``--task`` choice): a gateway (``status`` and ``stop`` know it by this), and
# the Ray node.
GATEWAY_TASK = "gateway"
RAY_TASK = "ray"


class Runner(_Word):
    """vLLM's ``--runner`` values."""

    AUTO = "auto"
    DRAFT = "draft"
    GENERATE = "generate"
    POOLING = "pooling"


class Convert(_Word):
    """vLLM's ``--convert`` values (how a model is adapted to the pooling runner)."""

    AUTO = "auto"
    CLASSIFY = "classify"
    EMBED = "embed"
    NONE = "none"


class Dtype(_Word):
    """vLLM's ``--dtype`` values (``half`` and ``float`` are vLLM's aliases)."""

    AUTO = "auto"
    FLOAT16 = "float16"
    BFLOAT16 = "bfloat16"
    FLOAT32 = "float32"
    HALF = "half"
    FLOAT = "float"


# The dtypes ``start --dtype`` offers (the aliases stay valid in models files).
# Plain strings: click.Choice shows and matches enum members by their NAME (AUTO, not auto).
CLI_DTYPES: tuple[str, ...] = tuple(
    d.value for d in (Dtype.AUTO, Dtype.FLOAT16, Dtype.BFLOAT16, Dtype.FLOAT32)
)


class State(_Word):
    """The state of a managed server, as ``status`` shows it."""

    RUNNING = "running"  # process alive, health not checked
    STARTING = "starting"
    HEALTHY = "healthy"
    UNHEALTHY = "unhealthy"
    JOINED = "joined"  # a follower node in its leader's group (no HTTP of its own)
    EXITED = "exited"
    STALE = "stale"  # the recorded pid now belongs to another process
    INVALID = "invalid"  # the record cannot be read
    DRAINING = "draining"  # a stop began: requests in flight finish (/health still 200)
    RESTARTING = "restarting"  # crashed; the supervisor relaunches it after a backoff
    FAILED = "failed"  # crashed too often; the supervisor gave up


# States in which the server is alive or being kept alive (its process or supervisor lives).
ALIVE_STATES = frozenset({State.RUNNING, State.STARTING, State.HEALTHY, State.UNHEALTHY,
                          State.JOINED, State.DRAINING, State.RESTARTING})


class RestartPolicy(_Word):
    """What the supervisor does when vLLM exits without being asked to (``--restart``)."""

    NO = "no"
    ON_FAILURE = "on-failure"  # restart; give up (state failed) after too many crashes
    ALWAYS = "always"  # restart, never give up


RESTART_POLICIES: tuple[str, ...] = tuple(p.value for p in RestartPolicy)

# The exit code of each state, the same from every command that reports one (``status``,
# ``test``); docs/commands.md's exit-code table documents it. A server with no record at all is
# ``EXIT_NOT_RUNNING`` (3); an exited one is 1, as LSB's "dead and the pid file exists".
STATE_EXIT_CODES = {
    State.HEALTHY: EXIT_OK,
    State.RUNNING: EXIT_OK,
    State.JOINED: EXIT_OK,
    State.STARTING: EXIT_STARTING,
    State.UNHEALTHY: EXIT_FAILURE,
    State.EXITED: EXIT_FAILURE,
    State.STALE: EXIT_FAILURE,
    State.INVALID: EXIT_FAILURE,
    State.DRAINING: EXIT_FAILURE,  # takes no new requests
    State.RESTARTING: EXIT_STARTING,
    State.FAILED: EXIT_FAILURE,
}

# --------------------------------------------------------------------------- names

# Patterns, not compiled ones: re compiles (and caches) on first use, not on every import.
NAME_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$"
NAME_RULE = "use letters, digits, '.', '_' and '-' (at most 64, starting with a letter or digit)"


def is_valid_name(name: str) -> bool:
    """True when ``name`` may name a server or alias (and so a file in the state dir)."""
    return bool(re.match(NAME_PATTERN, name)) and ".." not in name


def validate_name(name: str) -> str:
    """Check that a server name is safe to use as a file name.

    Raises:
        ConfigError: The name has path separators, ``..``, shell characters or is too long.
    """
    if not is_valid_name(name):
        raise ConfigError(f"invalid server name {name!r}: {NAME_RULE}")
    return name


# --------------------------------------------------------------------------- ports

# Every TCP port a setting may name: the pydantic fields, the CLI options and the kept
# settings all check this one range.
PORT_MIN, PORT_MAX = 1, 65535
PORT_RANGE = f"{PORT_MIN}-{PORT_MAX}"


def did_you_mean(name: str, names: list[str]) -> str:
    """``"; did you mean: a, b?"`` with the names in ``names`` close to ``name``, else ``""``."""
    import difflib

    close = difflib.get_close_matches(name, sorted(set(names)), n=3, cutoff=0.6)
    return f"; did you mean: {', '.join(close)}?" if close else ""


def parse_int(value: str | int, option: str) -> int:
    """Read an integer given as text (a CLI option, an env var), e.g. a port.

    Only the type is checked here; ranges (a port's :data:`PORT_RANGE`) are checked with the rest of
    the server's settings.

    Raises:
        ConfigError: Not an integer; the message names ``option``.
    """
    if isinstance(value, int):
        return value
    try:
        return int(value)
    except ValueError:
        raise ConfigError(f"invalid {option}: must be an integer (got {value!r})") from None


def parse_port(value: str | int) -> int:
    """Read ``--port`` given as text (see :func:`parse_int`)."""
    return parse_int(value, "--port")


# Hosts only this machine reaches: binding to another one without an API key gets a warning.
LOOPBACK = frozenset({"127.0.0.1", "localhost", "::1"})


def client_url(host: str, port: int) -> str:
    """The HTTP address clients use for a listener (loopback when bound to all interfaces)."""
    if host in ("0.0.0.0", "::", ""):
        host = "127.0.0.1"
    if ":" in host and not host.startswith("["):
        host = f"[{host}]"
    return f"http://{host}:{port}"


# --------------------------------------------------------------------------- sizes

KiB = 1024
MiB = 1024**2
GiB = 1024**3
# `--gpus auto` (the default: cmw-vllm places the server) and `--gpu-memory-utilization auto`
# (the share sized from the estimate).
AUTO = "auto"


def format_bytes(n: float | None) -> str:
    """Human-readable size in binary units (``1.5 GiB``); ``-`` for None."""
    if n is None:
        return "-"
    value = float(n)
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(value) < 1024 or unit == "TiB":
            return f"{value:.0f} {unit}" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1024
    return f"{value:.1f} TiB"  # pragma: no cover - the loop always returns


def format_gib(n: float) -> str:
    """A size in GiB with two decimals (``33.50 GiB``), as memory figures are compared."""
    return f"{n / GiB:.2f} GiB"


def format_size(n: float) -> str:
    """:func:`format_gib`, or MiB with one decimal below 0.1 GiB (``112.0 MiB``)."""
    return format_gib(n) if abs(n) >= GiB / 10 else f"{n / MiB:.1f} MiB"


# --------------------------------------------------------------------------- models

_HF_ID_MAX = 96
_HF_PART = r"^[A-Za-z0-9](?:[A-Za-z0-9._-]*[A-Za-z0-9])?$"


def looks_like_path(text: str) -> bool:
    """True when ``text`` is written as a path (``./x``, ``../x``, ``/x``, ``~/x``).

    Such a text never names a Hugging Face repository, whether or not the path exists.
    """
    return text.startswith((".", "/", "~")) or os.path.isabs(text)


def is_hf_id(text: str) -> bool:
    """True when ``text`` is a syntactically valid Hugging Face repository id ``org/name``.

    Follows the Hub's rules: letters, digits, ``-``, ``_`` and ``.``; no ``--`` or ``..``;
    parts neither start nor end with ``-`` or ``.``; at most 96 characters.
    """
    if len(text) > _HF_ID_MAX or text.count("/") != 1 or "--" in text or ".." in text:
        return False
    return all(re.match(_HF_PART, part) for part in text.split("/"))
