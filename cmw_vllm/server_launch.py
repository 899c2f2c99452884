"""Launching one vLLM server: its command and environment, its log, the supervised spawn.

Used by :class:`cmw_vllm.server_manager.ServerManager`, which owns the record and the lock.
"""

from __future__ import annotations

import logging
import os
import sys
import time
from collections.abc import Collection, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

from cmw_vllm import paths
from cmw_vllm.errors import EnvironmentProblem, ServerNotRunningError, ServerStartError

if TYPE_CHECKING:
    import subprocess

    import psutil

    from cmw_vllm.server_config import ServerConfig

logger = logging.getLogger(__name__)
IS_WINDOWS = os.name == "nt"


def engine_command(config: ServerConfig, api_key: str | None, *, python: str | None = None,
                   environ: Mapping[str, str] | None = None
                   ) -> tuple[list[str], dict[str, str]]:
    """vLLM's command line and environment for ``config`` (the key only in the environment).

    Args:
        config: The server.
        api_key: The key vLLM requires from clients, or None.
        python: The interpreter with vLLM (default: found by
            :func:`cmw_vllm.vllm_engine.find_engine_python`).
        environ: The environment to start from (default ``os.environ``).

    Raises:
        EnvironmentProblem: No interpreter with vLLM.
    """
    from cmw_vllm.settings import engine_environ
    from cmw_vllm.vllm_engine import build_command, check_engine_python, find_engine_python

    python = python or find_engine_python()
    check_engine_python(python)
    command = build_command(python, config.model, config.vllm_cli_args())
    env = engine_environ(os.environ if environ is None else environ)
    env.pop("VLLM_API_KEY", None)
    if api_key:
        env["VLLM_API_KEY"] = api_key
    env.update(config.env)
    if config.runtime_lora:
        env["VLLM_ALLOW_RUNTIME_LORA_UPDATING"] = "True"
    else:
        env.pop("VLLM_ALLOW_RUNTIME_LORA_UPDATING", None)  # never on an exposed server
    if config.gpus is not None:
        env["CUDA_VISIBLE_DEVICES"] = config.gpus
        # --gpus and the placement speak NVML's indices, which CUDA's match in this order.
        env.setdefault("CUDA_DEVICE_ORDER", "PCI_BUS_ID")
    env.setdefault("PYTHONUNBUFFERED", "1")
    return command, env


def open_fresh_log(log_file: Path) -> Path:
    """Rotate earlier logs (``NAME.log.1`` is the previous run's) and create an empty,
    private ``NAME.log``.

    Raises:
        EnvironmentProblem: The log is a planted symlink or cannot be written.
    """
    from cmw_vllm.server_record import open_log, rotate_log

    rotate_log(log_file)
    os.close(open_log(log_file))
    return log_file


def spawn(name: str, command: list[str], env: dict[str, str], log_file: Path
          ) -> tuple[psutil.Process, psutil.Process]:
    """Start the supervisor in a new session with vLLM under it, output to ``log_file``.

    The supervisor (:mod:`cmw_vllm.supervisor`) starts vLLM in a session of its own.

    Returns:
        (the supervisor, vLLM's API server process).

    Raises:
        EnvironmentProblem: The log cannot be opened.
        ServerStartError: vLLM did not appear under the supervisor within 10 s.
    """
    import subprocess

    import psutil

    from cmw_vllm.process_group import SUPERVISOR_MODULE
    from cmw_vllm.vllm_engine import tail_lines

    flags = os.O_WRONLY | os.O_APPEND | getattr(os, "O_NOFOLLOW", 0)
    try:
        log_fd = os.open(log_file, flags)
    except OSError as exc:
        raise EnvironmentProblem(f"cannot write {log_file}: {exc.strerror or exc}") from exc
    supervisor_cmd = [sys.executable, "-m", SUPERVISOR_MODULE, "--name", name, "--",
                      *command]
    popen_kwargs: dict[str, Any] = {}
    if IS_WINDOWS:
        popen_kwargs["creationflags"] = getattr(subprocess, "CREATE_NEW_PROCESS_GROUP", 0)
    else:
        popen_kwargs["start_new_session"] = True
    logger.info("launching %s", " ".join(command))
    try:
        sup = subprocess.Popen(
            supervisor_cmd,
            stdin=subprocess.DEVNULL,
            stdout=log_fd,
            stderr=subprocess.STDOUT,
            env=env,
            cwd=str(paths.state_dir()),
            close_fds=True,
            **popen_kwargs,
        )
    finally:
        os.close(log_fd)
    sup_proc = psutil.Process(sup.pid)
    deadline = time.monotonic() + 10.0
    while time.monotonic() < deadline:
        try:
            children = sup_proc.children()
        except psutil.NoSuchProcess:
            children = []
        if children and _has_exec(children[0], command):
            return sup_proc, children[0]
        if sup.poll() is not None:
            break
        time.sleep(0.01)
    sup.poll()
    raise ServerStartError(
        f"could not launch vLLM for {name!r}",
        log_tail="\n".join(tail_lines(log_file, 20)),
    )


def _has_exec(child: psutil.Process, command: list[str]) -> bool:
    """True once the supervisor's child runs ``command`` (or is gone).

    Between fork and exec the child still shows the supervisor's command line, and a record
    written then would not match its process later (``is_ours``): the start would count the
    server as gone and kill it.
    """
    import psutil

    from cmw_vllm.process_group import command_matches

    try:
        return command_matches(child.cmdline(), command) or not child.is_running()
    except (psutil.NoSuchProcess, psutil.ZombieProcess):
        return True
    except psutil.AccessDenied:
        return False


def spawn_here(command: list[str], env: dict[str, str]
               ) -> tuple[psutil.Process, psutil.Process, subprocess.Popen[bytes]]:
    """Start vLLM as a child of this process (foreground), its output on a pipe.

    From the spawn on, a stop signal to this process is held for the supervisor (see
    :func:`cmw_vllm.supervisor.hold_stop_signals`), so none is lost while the record is
    written.

    Returns:
        (this process, vLLM's API server process, its ``Popen``).
    """
    import psutil

    from cmw_vllm.supervisor import hold_stop_signals, release_held_signals, spawn_vllm

    logger.info("launching %s", " ".join(command))
    hold_stop_signals()  # until the caller supervises: see ServerManager.start
    try:
        popen = spawn_vllm(command, None, env)
    except OSError as exc:
        release_held_signals()
        raise ServerStartError(f"cannot run {command[0]}: {exc.strerror or exc}") from exc
    return psutil.Process(), psutil.Process(popen.pid), popen


def differing_settings(running: Mapping[str, Any], config: ServerConfig,
                       fields: Collection[str]) -> list[str]:
    """The ``fields`` of ``config`` whose value differs from the ``running`` settings, each as
    ``--option asked (running: value)``."""
    from cmw_vllm.server_config import OPTION_NAMES
    from cmw_vllm.vocab import AUTO

    asked = config.model_dump(mode="json")
    out = []
    for key in sorted(fields):
        if asked.get(key) == AUTO or (key == "gpus" and asked.get(key) is None):
            continue  # `auto` was resolved at the start: whatever it chose matches
        if key in asked and running.get(key) != asked[key]:
            option = OPTION_NAMES.get(key, key)
            out.append(f"{option} {_shown(asked[key])} (running: {_shown(running.get(key))})")
    return out


def _shown(value: Any) -> str:
    """A setting as the user would type it."""
    if value is None:
        return "(default)"
    if isinstance(value, list):
        return " ".join(map(str, value)) or "(none)"
    if isinstance(value, dict):
        return ",".join(f"{k}={v}" for k, v in value.items()) or "(none)"
    return str(value)


def check_known_name(name: str, server_names: Collection[str]) -> None:
    """Make sure ``name`` is a server or a registry entry, so a typo is not "not running".

    Raises:
        ServerNotRunningError: Neither (with the closest names).
        ConfigError: The models file is invalid, so whether ``name`` is an entry is unknown
            (the error of ``list`` and ``start``).
    """
    import difflib

    from cmw_vllm import last_start
    from cmw_vllm.model_registry import all_entries, find_entry, suggest

    if last_start.settings_path(name).exists():
        return
    entries = all_entries()
    if find_entry(name, entries) is not None:
        return
    servers = sorted(set(server_names) | set(last_start.names()))
    close = difflib.get_close_matches(name, servers, n=3, cutoff=0.6)
    close += [alias for alias in suggest(name, entries) if alias not in close]
    did_you_mean = f"; did you mean: {', '.join(close[:4])}?" if close else ""
    raise ServerNotRunningError(
        f"no server or registry entry named {name!r}{did_you_mean}",
        hint="`cmw-vllm status` lists the servers, `cmw-vllm list` the registry",
    )
