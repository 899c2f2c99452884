"""Shared fixtures: an isolated state dir per test, the tiny model, and the vLLM engine."""

from __future__ import annotations

import contextlib
import fcntl
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytest

if TYPE_CHECKING:
    from cmw_vllm.server_manager import ServerStatus

from tests.tiny_model import make_tiny_model

REPO_ROOT = Path(__file__).resolve().parent.parent
# Only one real vLLM server at a time on this machine (2 cores), across test processes too.
REAL_VLLM_LOCK = Path(os.environ.get("CMW_VLLM_TEST_LOCK", "/tmp/cmw-vllm-real-vllm.lock"))

_ISOLATED_VARS = (
    "VLLM_API_KEY",
    "HF_TOKEN",
    "HUGGING_FACE_HUB_TOKEN",
    "HF_TOKEN_PATH",
    "HF_HUB_OFFLINE",
    "TRANSFORMERS_OFFLINE",
    "HF_HUB_CACHE",
    "HUGGINGFACE_HUB_CACHE",
    "HF_ENDPOINT",
    "CMW_VLLM_ENV_FILE",
    "CMW_VLLM_HOST",
    "CMW_VLLM_GPU_MEMORY_UTILIZATION",
    "CMW_VLLM_MAX_MODEL_LEN",
    "CMW_VLLM_DTYPE",
    "CMW_VLLM_TENSOR_PARALLEL_SIZE",
    "CMW_VLLM_GPUS",
    "LOG_FILE_ENABLED",
    "LOG_LEVEL",
)


@pytest.fixture(autouse=True)
def isolated_home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    """Point the state dir and the HF cache at the test's temp dir; clear config env vars."""
    home = tmp_path / "cmw-home"
    monkeypatch.setenv("CMW_VLLM_HOME", str(home))
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf-home"))
    monkeypatch.setenv("HF_HUB_DISABLE_TELEMETRY", "1")
    for var in _ISOLATED_VARS:
        monkeypatch.delenv(var, raising=False)
    work = tmp_path / "cwd"
    work.mkdir()
    monkeypatch.chdir(work)  # no stray .env from the developer's checkout
    yield home
    _stop_everything(home)


def _stop_everything(home: Path) -> None:
    """Finalizer: stop every server recorded under this test's state dir, even on failure."""
    if not (home / "servers").is_dir():
        return
    from cmw_vllm.server_manager import ServerManager
    from cmw_vllm.server_record import record_names

    manager = ServerManager()
    for name in record_names():
        try:
            manager.stop(name, timeout=10)
        except Exception as exc:  # keep cleaning the others
            print(f"cleanup: could not stop {name}: {exc}", file=sys.stderr)


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny random-weight Qwen2 model directory that real vLLM serves."""
    return make_tiny_model(tmp_path_factory.mktemp("tiny-model") / "tiny-qwen2")


@pytest.fixture(scope="session")
def sharded_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny model in two safetensors shards with an index file (download, verify)."""
    return make_tiny_model(tmp_path_factory.mktemp("sharded-model") / "tiny-sharded", shards=2)


# Where `.ci/run` installs vLLM: the default when CMW_VLLM_PYTHON is not set.
LOCAL_ENGINE_PYTHON = REPO_ROOT / ".venv-vllm" / "bin" / "python"


def engine_python_or_none() -> str | None:
    """The interpreter with vLLM, found as cmw-vllm finds it; None when there is none."""
    from cmw_vllm.errors import EnvironmentProblem
    from cmw_vllm.vllm_engine import PYTHON_ENV, find_engine_python

    if not os.environ.get(PYTHON_ENV) and LOCAL_ENGINE_PYTHON.exists():
        return str(LOCAL_ENGINE_PYTHON)
    try:
        return find_engine_python()
    except EnvironmentProblem:
        return None


@pytest.fixture(scope="session")
def engine_python() -> str:
    """The vLLM interpreter; skip real-vLLM tests when absent, except in CI where it fails."""
    found = engine_python_or_none()
    if not found:
        if os.environ.get("CI"):
            pytest.fail("CI must provide vLLM (CMW_VLLM_PYTHON or .venv-vllm)")
        pytest.skip("vLLM is not installed (set CMW_VLLM_PYTHON)")
    return found


@pytest.fixture
def real_vllm(engine_python: str, monkeypatch: pytest.MonkeyPatch) -> Iterator[str]:
    """Serialize real-vLLM tests machine-wide and give the engine a small CPU KV cache."""
    monkeypatch.setenv("CMW_VLLM_PYTHON", engine_python)
    monkeypatch.setenv("VLLM_CPU_KVCACHE_SPACE", os.environ.get("VLLM_CPU_KVCACHE_SPACE", "1"))
    REAL_VLLM_LOCK.parent.mkdir(parents=True, exist_ok=True)
    with REAL_VLLM_LOCK.open("a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            yield engine_python
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


@contextlib.contextmanager
def real_gateway(home: Path, env: dict[str, str], *args: str
                 ) -> Iterator[tuple[str, subprocess.Popen[bytes]]]:
    """Run ``cmw-vllm gateway ARGS`` on a free port with ``env`` (its state in ``home``),
    holding the real-vLLM lock, for a module's tests to share; yields its URL and process.

    On the way out: SIGTERM, then ``stop --all`` for whatever it left, then the lock.
    """
    import requests

    port = free_port()
    REAL_VLLM_LOCK.parent.mkdir(parents=True, exist_ok=True)
    with REAL_VLLM_LOCK.open("a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        log = (home / "gateway-test.log").open("wb")
        proc = subprocess.Popen(
            [sys.executable, "-m", "cmw_vllm", "gateway", "--port", str(port), *args],
            env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
            preexec_fn=_default_sigint)
        url = f"http://127.0.0.1:{port}"
        try:
            deadline = time.monotonic() + 60
            while time.monotonic() < deadline:
                assert proc.poll() is None, (home / "gateway-test.log").read_text()
                try:
                    if requests.get(f"{url}/health", timeout=2).status_code == 200:
                        break
                except requests.ConnectionError:
                    time.sleep(0.2)
            yield url, proc
        finally:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(90)
            except subprocess.TimeoutExpired:
                proc.kill()
            subprocess.run([sys.executable, "-m", "cmw_vllm", "stop", "--all"], env=env,
                           capture_output=True, timeout=120, check=False)
            log.close()
            fcntl.flock(lock, fcntl.LOCK_UN)


def python_executable() -> str:
    """The interpreter running the tests (has cmw_vllm installed)."""
    return sys.executable


FAKE_VLLM_DIR = Path(__file__).resolve().parent / "fake_vllm"


@pytest.fixture
def fake_engine(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """Point cmw-vllm at a stand-in vLLM (tests/fake_vllm) that starts in about a second."""
    wrapper = tmp_path / "fake-engine-python"
    wrapper.write_text(
        "#!/bin/sh\n"
        f'PYTHONPATH="{FAKE_VLLM_DIR}${{PYTHONPATH:+:$PYTHONPATH}}" exec "{sys.executable}" "$@"\n'
    )
    wrapper.chmod(0o755)
    monkeypatch.setenv("CMW_VLLM_PYTHON", str(wrapper))
    monkeypatch.setenv("FAKE_VLLM_DELAY", "0.4")
    return wrapper


def free_port() -> int:
    """A TCP port nothing listens on right now."""
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@pytest.fixture
def checkout(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A stand-in source checkout that cmw-vllm runs from (``cmw_vllm.__file__`` points into
    it): a ``pyproject.toml`` and no ``.venv-vllm``, so the real checkout's vLLM is not found.
    """
    import cmw_vllm

    root = tmp_path / "checkout"
    (root / "cmw_vllm").mkdir(parents=True)
    (root / "pyproject.toml").write_text("[project]\nname = 'cmw-vllm'\n")
    monkeypatch.setattr(cmw_vllm, "__file__", str(root / "cmw_vllm" / "__init__.py"))
    return root


@pytest.fixture
def model_dir(tmp_path: Path) -> Path:
    """A directory that passes for a model (a config.json); enough for the stand-in engine."""
    import json

    d = tmp_path / "model"
    d.mkdir()
    (d / "config.json").write_text(json.dumps({"architectures": ["Qwen2ForCausalLM"]}))
    return d


def run_cli(*args: str) -> tuple[int, str, str]:
    """Run ``cmw-vllm ARGS`` in-process; returns (exit code, stdout, stderr)."""
    from click.testing import CliRunner

    from cmw_vllm.cli import cli

    result = CliRunner().invoke(cli, list(args))
    return result.exit_code, result.stdout, result.stderr


def _default_sigint() -> None:
    # bash starts background jobs with SIGINT ignored and children inherit that; Python then
    # installs no KeyboardInterrupt handler. A child that a test signals must not depend on
    # how the suite was started.
    import signal

    signal.signal(signal.SIGINT, signal.SIG_DFL)


def spawn_cli(*args: str, **kwargs: object) -> subprocess.Popen[str]:
    """Start ``cmw-vllm ARGS`` as a child with SIGINT at its default, for Ctrl-C tests.

    Keyword arguments go to :class:`subprocess.Popen` (text mode is on).
    """
    return subprocess.Popen(  # type: ignore[call-overload,no-any-return]
        [sys.executable, "-m", "cmw_vllm", *args], text=True, preexec_fn=_default_sigint,
        **kwargs,
    )


def alive_pids(pids: list[int]) -> list[int]:
    """The pids that still run (zombies waiting for a reaper don't count)."""
    import psutil

    out = []
    for pid in pids:
        try:
            if psutil.Process(pid).status() != psutil.STATUS_ZOMBIE:
                out.append(pid)
        except psutil.NoSuchProcess:
            pass
    return out


def wait_until(predicate: Callable[[], object], timeout: float = 20.0,
               interval: float = 0.05) -> bool:
    """Poll ``predicate`` until it is true or ``timeout`` passes (a deadline, not a sleep).

    Returns:
        Whether it became true (the caller asserts on it).
    """
    import time

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(interval)
    return bool(predicate())


def wait_for_state(name: str, state: str, timeout: float = 10.0) -> ServerStatus:
    """Poll ``ServerManager().get_status(name)`` until it is ``state`` or ``timeout`` passes.

    Returns:
        The last ServerStatus seen (the caller asserts on it).
    """
    from cmw_vllm.server_manager import ServerManager

    seen: list[ServerStatus] = []

    def reached() -> bool:
        seen.append(ServerManager().get_status(name))
        return seen[-1].state == state

    wait_until(reached, timeout, interval=0.1)
    return seen[-1]


def notify_socket(tmp_path: Path) -> tuple[socket.socket, str]:
    """A bound ``$NOTIFY_SOCKET`` receiver (datagrams, 30 s timeout) and its path."""
    path = str(tmp_path / "notify.sock")
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(path)
    sock.settimeout(30)
    return sock, path


@pytest.fixture
def edge_gateway() -> Iterator[Callable[..., Any]]:
    """Gateways in threads with stand-in upstreams added as server ``stub``
    (``tests.gateway_harness.stub_gateway_maker``)."""
    from tests.gateway_harness import stub_gateway_maker

    with stub_gateway_maker() as make:
        yield make


def write_models(home: Path, models: dict[str, dict[str, Any]],
                 adapters: dict[str, dict[str, Any]] | None = None) -> Path:
    """Write ``home/models.toml`` with these ``[models.X]`` (and ``[adapters.X]``) tables."""
    import json

    home.mkdir(parents=True, exist_ok=True)
    lines: list[str] = []
    for kind, tables in (("models", models), ("adapters", adapters or {})):
        for name, fields in tables.items():
            lines.append(f"[{kind}.{name}]")
            lines += [f"{k} = {json.dumps(v)}" for k, v in fields.items()]
    path = home / "models.toml"
    path.write_text("\n".join(lines) + "\n")
    return path


@pytest.fixture
def entries(isolated_home: Path, model_dir: Path) -> list[str]:
    """Two startable entries (a, b) on the stand-in model, in ``models.toml``."""
    write_models(isolated_home, {n: {"model": str(model_dir), "port": free_port()}
                                 for n in ("a", "b")})
    return ["a", "b"]
