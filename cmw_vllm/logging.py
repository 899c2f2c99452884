"""Logging set-up for the CLI: an event stream on stderr, optionally a file.

``LOG_LEVEL`` sets the level (default WARNING, ``-v`` gives DEBUG). ``LOG_FILE_ENABLED=1``
also appends to ``LOG_FILE_PATH`` (default ``<state dir>/logs/cmw-vllm.log``).
"""

from __future__ import annotations

import logging
import os

from cmw_vllm import paths
from cmw_vllm.settings import env, env_bool, log_level

FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"


def setup_logging(verbose: bool = False) -> None:
    """Configure the ``cmw_vllm`` logger from the environment.

    Args:
        verbose: Log at DEBUG regardless of ``LOG_LEVEL``.

    Raises:
        ConfigError: ``LOG_LEVEL`` or ``LOG_FILE_ENABLED`` is not a valid value.
    """
    level_name = log_level()  # checked even with -v: a typo should not wait for a later run
    level = logging.DEBUG if verbose else logging.getLevelName(level_name)
    logger = logging.getLogger("cmw_vllm")
    logger.setLevel(level)
    logger.handlers.clear()
    stream = logging.StreamHandler()
    stream.setFormatter(logging.Formatter(FORMAT))
    logger.addHandler(stream)
    logger.propagate = False
    if env_bool("LOG_FILE_ENABLED", False):
        file_path = env("LOG_FILE_PATH") or str(paths.logs_dir() / "cmw-vllm.log")
        try:
            paths.ensure_dir(paths.logs_dir())
            fd = os.open(file_path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
            os.close(fd)
            handler = logging.FileHandler(file_path, encoding="utf-8")
        except OSError as exc:
            logger.warning("file logging disabled: cannot open %s: %s", file_path, exc)
        else:
            handler.setFormatter(logging.Formatter(FORMAT))
            logger.addHandler(handler)
