"""The test matrix: which Pythons noxfile.py runs, and its way round pyenv's shims."""

from __future__ import annotations

import functools
import importlib.util
import os
import re
import tomllib
from pathlib import Path

import pytest

from tests.conftest import REPO_ROOT


@pytest.fixture
def noxfile(monkeypatch: pytest.MonkeyPatch):
    """noxfile.py as a module; what its import does to PYENV_VERSION is undone after."""
    monkeypatch.setenv("PYENV_VERSION", os.environ.get("PYENV_VERSION", "system"))
    return _load()


@functools.cache
def _load():
    spec = importlib.util.spec_from_file_location("noxfile_under_test", REPO_ROOT / "noxfile.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_matrix_is_the_declared_versions_from_requires_python_up(noxfile) -> None:
    project = tomllib.loads((REPO_ROOT / "pyproject.toml").read_text())["project"]
    versions = noxfile.supported_pythons()
    assert versions == ["3.11", "3.12", "3.13"]
    assert project["requires-python"] == f">={versions[0]}"
    assert noxfile.nox.options.error_on_missing_interpreters is False  # missing: skipped


def test_pyenv_shims_are_activated_for_the_newest_patch_of_each_version(
    noxfile, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    root = tmp_path / "pyenv"
    for version in ("3.11.2", "3.11.7", "3.12.1", "3.9.18", "3.13.0", "3.13.0t", "pypy3.10"):
        (root / "versions" / version).mkdir(parents=True)
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    fake = bin_dir / "pyenv"
    fake.write_text(f"#!/bin/sh\necho {root}\n")
    fake.chmod(0o755)
    monkeypatch.setenv("PATH", f"{bin_dir}{os.pathsep}{os.environ['PATH']}")
    monkeypatch.delenv("PYENV_VERSION", raising=False)
    noxfile._activate_pyenv(["3.11", "3.12", "3.13"])
    assert os.environ["PYENV_VERSION"] == "3.11.7:3.12.1:3.13.0"
    monkeypatch.setenv("PYENV_VERSION", "3.12.1")  # the user's own choice is kept
    noxfile._activate_pyenv(["3.11", "3.12", "3.13"])
    assert os.environ["PYENV_VERSION"] == "3.12.1"
    monkeypatch.delenv("PYENV_VERSION")
    noxfile._activate_pyenv(["3.14"])  # not installed: nothing to activate
    assert "PYENV_VERSION" not in os.environ


def test_ci_runs_the_matrix_and_the_real_vllm_tests_once() -> None:
    script = (REPO_ROOT / ".ci" / "run").read_text()
    runs = [line for line in script.splitlines() if re.search(r"-m (nox|pytest)", line)]
    assert any("-m nox" in line for line in runs)
    assert any("-m pytest" in line and "-m vllm" in line for line in runs)
    # the fast suite is not run a second time outside nox
    assert not any("not vllm" in line for line in runs)
