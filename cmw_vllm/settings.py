"""Environment configuration: env vars, optionally from a ``.env`` file.

The shell's environment always wins over ``.env`` (python-dotenv with ``override=False``).
An empty value counts as unset: a ``.env`` line ``HF_HOME=`` sets nothing, and empty
Hugging Face / vLLM variables never reach vLLM (:func:`engine_environ`).
python-dotenv is imported only when a ``.env`` file exists, which keeps ``status`` fast.
Every variable is listed in ``.env.example``.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path

from cmw_vllm.errors import ConfigError

ENV_FILE_VAR = "CMW_VLLM_ENV_FILE"

# Variables that map onto ServerConfig fields (precedence: CLI > env > models file > defaults).
SERVER_ENV_VARS = {
    "host": "CMW_VLLM_HOST",
    "gpu_memory_utilization": "CMW_VLLM_GPU_MEMORY_UTILIZATION",
    "max_model_len": "CMW_VLLM_MAX_MODEL_LEN",
    "dtype": "CMW_VLLM_DTYPE",
    "tensor_parallel_size": "CMW_VLLM_TENSOR_PARALLEL_SIZE",
    "gpus": "CMW_VLLM_GPUS",
    "drain": "CMW_VLLM_DRAIN_TIMEOUT",
    "restart": "CMW_VLLM_RESTART",
}

# Variables set from an env file -> (that file, the value), so that an error can name where
# a value came from.
_from_file: dict[str, tuple[Path, str]] = {}

LOG_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL")

# Variables whose empty value means "unset" to cmw-vllm. vLLM and huggingface_hub read some
# of them differently (``HF_HOME=''`` is a relative folder), so empty ones are not passed on.
# The variables that shape vLLM, the Hub and cmw-vllm: set but empty, they count as unset;
# a start keeps them for `restart` (last_start); a systemd unit passes them on.
ENGINE_ENV_PREFIXES = ("VLLM_", "CMW_VLLM_", "HF_", "HUGGING_FACE_")
# The gateway's own variables (its API keys, its key file): a server it starts must not see
# them, whoever the server lets read its environment (/proc/PID/environ, a crash dump).
NEVER_TO_ENGINE_PREFIXES = ("CMW_VLLM_GATEWAY_",)


def load_env_file(path: str | os.PathLike[str] | None = None) -> Path | None:
    """Load ``.env`` into ``os.environ`` without overriding variables already set.

    Args:
        path: The file to read; default ``$CMW_VLLM_ENV_FILE`` or ``./.env``.

    Returns:
        The file that was read, or None when there was none.

    Raises:
        ConfigError: The file exists but cannot be read or parsed.
    """
    explicit = path or os.environ.get(ENV_FILE_VAR)
    env_path = Path(explicit) if explicit else Path.cwd() / ".env"
    if not env_path.exists():
        if explicit:
            raise ConfigError(f"env file {env_path} does not exist")
        return None
    try:
        text = env_path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        reason = exc.strerror if isinstance(exc, OSError) else "not UTF-8 text"
        raise ConfigError(f"cannot read env file {env_path}: {reason}") from exc
    import io

    from dotenv import dotenv_values

    for key, value in dotenv_values(stream=io.StringIO(text)).items():
        if value and key not in os.environ:  # empty counts as unset: nothing to set
            os.environ[key] = value
            _from_file[key] = (env_path, value)
    return env_path


def source_of(name: str) -> str:
    """Where variable ``name`` was set, for error messages: `` in /path/.env`` or ``""``."""
    path, value = _from_file.get(name, (None, None))
    if path is None or os.environ.get(name) != value:
        return ""
    return f" (set in {path})"


def engine_environ(base: Mapping[str, str]) -> dict[str, str]:
    """``base`` without the empty variables that mean "unset" and without the gateway's
    variables (its keys): the environment for vLLM."""
    return {
        key: value
        for key, value in base.items()
        if (value != "" or not key.startswith(ENGINE_ENV_PREFIXES))
        and not key.upper().startswith(NEVER_TO_ENGINE_PREFIXES)
    }


def env(name: str, default: str | None = None) -> str | None:
    """Return an env var, treating an empty value as unset."""
    value = os.environ.get(name)
    return value if value not in (None, "") else default


def env_float(name: str, default: float) -> float:
    """Return an env var as a float.

    Raises:
        ConfigError: The value is not a number.
    """
    raw = env(name)
    if raw is None:
        return default
    try:
        return float(raw)
    except ValueError:
        raise ConfigError(f"{name}={raw!r}{source_of(name)} is not a number") from None


def env_bool(name: str, default: bool = False) -> bool:
    """Return an env var as a boolean (1/true/yes/on vs 0/false/no/off)."""
    raw = env(name)
    if raw is None:
        return default
    lowered = raw.strip().lower()
    if lowered in {"1", "true", "yes", "on"}:
        return True
    if lowered in {"0", "false", "no", "off"}:
        return False
    raise ConfigError(
        f"{name}={raw!r}{source_of(name)} is not a boolean (use 1/0, true/false)"
    )


def log_level() -> str:
    """cmw-vllm's own log level (``LOG_LEVEL``, default WARNING).

    Raises:
        ConfigError: Not one of DEBUG, INFO, WARNING, ERROR, CRITICAL.
    """
    raw = env("LOG_LEVEL")
    if raw is None:
        return "WARNING"
    level = raw.strip().upper()
    if level not in LOG_LEVELS:
        raise ConfigError(
            f"LOG_LEVEL={raw!r}{source_of('LOG_LEVEL')} is not a log level "
            f"(use {', '.join(LOG_LEVELS)})"
        )
    return level


def api_key() -> str | None:
    """The API key vLLM is started with and health checks send (``VLLM_API_KEY``)."""
    return env("VLLM_API_KEY")


def start_timeout() -> float:
    """Seconds ``start`` waits for readiness (``CMW_VLLM_START_TIMEOUT``, default 1800)."""
    return env_float("CMW_VLLM_START_TIMEOUT", 1800.0)


def stop_timeout() -> float:
    """Seconds ``stop`` waits after SIGTERM before SIGKILL (``CMW_VLLM_STOP_TIMEOUT``)."""
    return env_float("CMW_VLLM_STOP_TIMEOUT", 30.0)


def health_timeout() -> float:
    """Seconds one health request may take (``CMW_VLLM_HEALTH_TIMEOUT``, default 2)."""
    return env_float("CMW_VLLM_HEALTH_TIMEOUT", 2.0)


PLACEMENT_POLICIES = ("pack", "spread")


def placement_policy() -> str:
    """How ``--gpus auto`` chooses among GPUs that fit (``CMW_VLLM_PLACEMENT``): ``pack``
    (the fullest GPU that fits first, the default) or ``spread`` (the emptiest first).

    Raises:
        ConfigError: Another value.
    """
    raw = (env("CMW_VLLM_PLACEMENT") or "pack").strip().lower()
    if raw not in PLACEMENT_POLICIES:
        raise ConfigError(
            f"invalid CMW_VLLM_PLACEMENT{source_of('CMW_VLLM_PLACEMENT')}: must be pack or "
            f"spread (got {raw!r})")
    return raw
