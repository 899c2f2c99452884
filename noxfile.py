"""The fast suite on every supported Python this machine has (``bash .ci/run`` calls it).

    .venv/bin/python -m nox                 # every supported version found here
    .venv/bin/python -m nox -s fast-3.13    # one of them
    .venv/bin/python -m nox -- -k status    # arguments after -- go to pytest

The supported versions are the ``Programming Language :: Python :: 3.X`` classifiers of
pyproject.toml. A version this machine lacks is skipped with a message, not failed. The
real-vLLM tests run once, from .ci/run, on the project's own environment.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import re
import shutil
import subprocess
import tomllib
from pathlib import Path

import nox

ROOT = Path(__file__).resolve().parent


def supported_pythons() -> list[str]:
    """``3.X`` versions declared in pyproject.toml's classifiers."""
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    found = (re.fullmatch(r"Programming Language :: Python :: (3\.\d+)", c)
             for c in project.get("classifiers", []))
    return [m.group(1) for m in found if m]


def _activate_pyenv(versions: list[str]) -> None:
    """Make pyenv's ``python3.X`` shims work for every installed supported version.

    A shim runs only a version that is active; otherwise it fails ("pyenv: python3.13:
    command not found") where nox expects a missing interpreter, and the session errors
    instead of being skipped.
    """
    if os.environ.get("PYENV_VERSION") or not shutil.which("pyenv"):
        return
    root = subprocess.run(["pyenv", "root"], capture_output=True, text=True, check=False)
    installed = Path(root.stdout.strip(), "versions")
    if root.returncode != 0 or not installed.is_dir():
        return
    names = [p.name for p in installed.iterdir() if re.fullmatch(r"\d+\.\d+\.\d+", p.name)]
    chosen = []
    for version in versions:
        matches = [n for n in names if n.startswith(version + ".")]
        if matches:
            chosen.append(max(matches, key=lambda n: tuple(map(int, n.split(".")))))
    if chosen:
        os.environ["PYENV_VERSION"] = ":".join(chosen)


PYTHONS = supported_pythons()
_activate_pyenv(PYTHONS)

nox.options.sessions = ["fast"]
nox.options.reuse_existing_virtualenvs = True
# nox turns a missing interpreter into an error when CI is set; here it is a skip.
nox.options.error_on_missing_interpreters = False


@contextlib.contextmanager
def _one_install_at_a_time():
    """Hold a lock while pip builds the editable install: ``.ci/run`` runs the versions side
    by side, and each build writes the same ``*.egg-info`` in the checkout."""
    lock_dir = ROOT / ".nox"
    lock_dir.mkdir(exist_ok=True)
    with (lock_dir / "install.lock").open("a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


@nox.session(python=PYTHONS)
def fast(session: nox.Session) -> None:
    """The tests that need no real vLLM: stand-in engine, fake Hub, fake NVML."""
    with _one_install_at_a_time():
        session.install("-q", "-e", ".[test]", "--config-settings", "editable_mode=compat")
    session.run("python", "-m", "pytest", "-m", "not vllm", "-q", "-p", "no:cacheprovider",
                *session.posargs)
