"""download: against a local fake Hub (tests/fake_hub.py) serving the tiny model.

The CLI runs in-process (CliRunner, or ``cli.main`` for exit-code mapping) where the
environment can be set per test, and in a subprocess where the point is what a user sees
(exit codes, one-line errors, no traceback) or where signals are involved.
"""

from __future__ import annotations

import errno
import json
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from click.testing import CliRunner

from cmw_vllm import model_downloader
from cmw_vllm.cli import cli, main
from cmw_vllm.errors import (
    EXIT_ENVIRONMENT,
    EXIT_FAILURE,
    EXIT_INSUFFICIENT,
    EXIT_INTERRUPTED,
    EXIT_NOT_FOUND,
    EXIT_OK,
)
from cmw_vllm.hf_cache import filter_names, select_files
from cmw_vllm.hf_cache import repo_dir as repo_cache_dir
from tests.conftest import spawn_cli
from tests.fake_hub import FakeHub, FakeRepo
from tests.tiny_model import make_tiny_model

REPO = "test-org/tiny-sharded"
GATED = "test-org/tiny-gated"
GOOD_TOKEN = "hf_granted_token"
OTHER_TOKEN = "hf_token_without_access"


@pytest.fixture
def hub(sharded_model: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[FakeHub]:
    """A running fake Hub with a public and a gated copy of the tiny model, as HF_ENDPOINT."""
    with FakeHub() as server:
        server.add_repo(REPO, sharded_model)
        server.add_repo(GATED, sharded_model, gated=True)
        server.grant(GOOD_TOKEN, GATED)
        server.grant(OTHER_TOKEN)
        monkeypatch.setenv("HF_ENDPOINT", server.url)
        monkeypatch.setenv("HF_HUB_DISABLE_XET", "1")
        monkeypatch.setenv("HF_HUB_DISABLE_PROGRESS_BARS", "1")
        yield server


def run_main(args: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, str, str]:
    """Run ``cli.main`` in-process: (exit code, stdout, stderr)."""
    capsys.readouterr()
    with pytest.raises(SystemExit) as info:
        main(args)
    out, err = capsys.readouterr()
    code = info.value.code
    return (code if isinstance(code, int) else 0), out, err


def run_subprocess(*args: str, env: dict[str, str] | None = None,
                   timeout: float = 60) -> subprocess.CompletedProcess[str]:
    """Run ``python -m cmw_vllm ARGS`` with the test's environment (plus ``env``)."""
    full_env = {**os.environ, **(env or {})}
    return subprocess.run([sys.executable, "-m", "cmw_vllm", *args], env=full_env,
                          capture_output=True, text=True, timeout=timeout)


def snapshot_of(repo: FakeRepo) -> Path:
    return repo_cache_dir(repo.repo_id) / "snapshots" / repo.commit


def blob_of(repo: FakeRepo, name: str) -> Path:
    return (snapshot_of(repo) / name).resolve()


def assert_one_line_error(proc: subprocess.CompletedProcess[str], code: int, *needles: str) -> None:
    assert proc.returncode == code, proc.stderr
    assert "Traceback" not in proc.stderr
    error_lines = [line for line in proc.stderr.splitlines() if line.startswith("Error: ")]
    assert len(error_lines) == 1, proc.stderr
    for needle in needles:
        assert needle in proc.stderr, proc.stderr


# --------------------------------------------------------------------------------------------
# Happy path


def test_download_then_verify_ok(hub: FakeHub) -> None:
    repo = hub.repos[REPO]
    runner = CliRunner()
    result = runner.invoke(cli, ["download", REPO])
    assert result.exit_code == EXIT_OK, result.output
    assert "Verify (fast): OK" in result.output
    for name in repo.files:
        assert (snapshot_of(repo) / name).is_file(), name
    assert (repo_cache_dir(REPO) / "refs" / "main").read_text() == repo.commit

    result = runner.invoke(cli, ["verify", REPO, "--full", "--json"])
    assert result.exit_code == EXIT_OK, result.output
    report = json.loads(result.stdout)
    assert report["ok"] is True
    assert report["commit"] == repo.commit
    assert report["files_hashed"] == len(repo.files)
    assert report["bytes_hashed"] == sum(f.size for f in repo.files.values())


def test_second_run_on_complete_snapshot_fetches_nothing(hub: FakeHub) -> None:
    runner = CliRunner()
    assert runner.invoke(cli, ["download", REPO]).exit_code == EXIT_OK
    hub.requests.clear()
    result = runner.invoke(cli, ["download", REPO, "--json"])
    assert result.exit_code == EXIT_OK, result.output
    data = json.loads(result.stdout)
    assert data["already_complete"] is True
    assert data["bytes_downloaded"] == 0
    assert not [r for r in hub.requests if "/resolve/" in r], hub.requests


def test_download_json_reports_plan_and_verify(hub: FakeHub) -> None:
    repo = hub.repos[REPO]
    result = CliRunner().invoke(cli, ["download", REPO, "--json"])
    assert result.exit_code == EXIT_OK, result.output
    data = json.loads(result.stdout)
    help_text = " ".join(CliRunner().invoke(cli, ["download", "--help"]).stdout.split())
    for key in [*data, *data["plan"]]:
        assert key in help_text, key
    assert data["plan"]["bytes_to_fetch"] == sum(f.size for f in repo.files.values())
    assert data["bytes_downloaded"] == data["plan"]["bytes_to_fetch"]
    assert data["verify"]["ok"] is True
    assert Path(data["path"]) == snapshot_of(repo)


def test_default_selection_skips_duplicate_weights(hub: FakeHub, tmp_path: Path,
                                                   sharded_model: Path) -> None:
    source = tmp_path / "dup-src"
    make_tiny_model(source)
    extras = {
        "pytorch_model.bin": b"\0" * 64,
        "model.onnx": b"\0" * 64,
        "flax_model.msgpack": b"\0" * 64,
        "original/model.safetensors": (source / "model.safetensors").read_bytes(),
        "README.md": b"# tiny\n",
        "merges.txt": b"#version: 0.2\n",
    }
    hub.add_repo("test-org/with-duplicates", source, extra_files=extras)
    result = CliRunner().invoke(cli, ["download", "test-org/with-duplicates"])
    assert result.exit_code == EXIT_OK, result.output
    snap = snapshot_of(hub.repos["test-org/with-duplicates"])
    assert (snap / "model.safetensors").is_file()
    assert (snap / "merges.txt").is_file()
    for skipped in ("pytorch_model.bin", "model.onnx", "flax_model.msgpack",
                    "original/model.safetensors", "README.md"):
        assert not (snap / skipped).exists(), skipped


def test_select_files_takes_torch_weights_only_without_safetensors() -> None:
    names = ["config.json", "pytorch_model.bin", "tokenizer.json", "README.md"]
    allow, ignore = select_files(names)
    assert filter_names(names, allow, ignore) == ["config.json", "pytorch_model.bin",
                                                  "tokenizer.json"]
    names.append("model.safetensors")
    allow, ignore = select_files(names)
    assert "pytorch_model.bin" not in filter_names(names, allow, ignore)


def test_exclude_leaves_files_out_and_verify_accepts_it(hub: FakeHub) -> None:
    repo = hub.repos[REPO]
    result = CliRunner().invoke(cli, ["download", REPO, "--exclude", "generation_config.json"])
    assert result.exit_code == EXIT_OK, result.output
    assert not (snapshot_of(repo) / "generation_config.json").exists()
    assert (snapshot_of(repo) / "config.json").is_file()
    assert CliRunner().invoke(cli, ["verify", REPO]).exit_code == EXIT_OK


def test_include_replaces_default_selection_and_verify_checks_only_that(hub: FakeHub,
                                                                        tmp_path: Path) -> None:
    repo = hub.repos[REPO]
    runner = CliRunner()
    result = runner.invoke(cli, ["download", REPO, "--include", "*.json"])
    # Only JSON files, as asked: no "no weight files", no missing shards of the index.
    assert result.exit_code == EXIT_OK, result.output
    assert "Verify (fast): OK" in result.output
    assert "only the files --include/--exclude chose" in result.output
    assert not list(snapshot_of(repo).glob("*.safetensors"))
    assert (snapshot_of(repo) / "model.safetensors.index.json").is_file()
    assert runner.invoke(cli, ["verify", REPO]).exit_code == EXIT_OK
    local = tmp_path / "json-only"
    result = runner.invoke(cli, ["download", REPO, "--include", "*.json", "--local-dir",
                                 str(local)])
    assert result.exit_code == EXIT_OK, result.output
    assert runner.invoke(cli, ["verify", str(local)]).exit_code == EXIT_OK

    # What was selected is still checked.
    config = snapshot_of(repo) / "config.json"
    target = config.resolve()
    target.chmod(0o644)
    target.write_text("{not json")
    result = runner.invoke(cli, ["verify", REPO])
    assert result.exit_code == EXIT_FAILURE, result.output
    assert "config.json: does not parse as JSON" in result.output


def test_local_dir_download_verify_and_repair(hub: FakeHub, tmp_path: Path) -> None:
    target = tmp_path / "models" / "tiny"
    runner = CliRunner()
    result = runner.invoke(cli, ["download", REPO, "--local-dir", str(target)])
    assert result.exit_code == EXIT_OK, result.output
    assert (target / "model.safetensors.index.json").is_file()
    assert not repo_cache_dir(REPO).joinpath("snapshots").exists()

    result = runner.invoke(cli, ["verify", str(target), "--full", "--json"])
    report = json.loads(result.stdout)
    assert result.exit_code == EXIT_OK, result.output
    assert report["source"] == "local"
    assert report["files_hashed"] == len(hub.repos[REPO].files)

    victim = target / "tokenizer_config.json"
    data = bytearray(victim.read_bytes())
    data[10] ^= 0x20
    victim.write_bytes(bytes(data))
    result = runner.invoke(cli, ["verify", str(target), "--full", "--json"])
    assert result.exit_code == EXIT_FAILURE
    assert [p["file"] for p in json.loads(result.stdout)["problems"]] == ["tokenizer_config.json"]
    result = runner.invoke(cli, ["verify", str(target), "--full"])
    assert f"cmw-vllm download {REPO} --local-dir {target} --repair" in result.stdout

    result = runner.invoke(cli, ["download", REPO, "--local-dir", str(target), "--repair"])
    assert result.exit_code == EXIT_OK, result.output
    assert runner.invoke(cli, ["verify", str(target), "--full"]).exit_code == EXIT_OK


# --------------------------------------------------------------------------------------------
# Repair


def test_truncated_shard_is_named_and_repair_fixes_it(hub: FakeHub) -> None:
    repo = hub.repos[REPO]
    runner = CliRunner()
    assert runner.invoke(cli, ["download", REPO]).exit_code == EXIT_OK
    shard = "model-00002-of-00002.safetensors"
    blob = blob_of(repo, shard)
    os.truncate(blob, repo.files[shard].size // 2)

    result = runner.invoke(cli, ["verify", REPO])
    assert result.exit_code == EXIT_FAILURE
    assert shard in result.output
    assert "truncated" in result.output
    assert f"cmw-vllm download {REPO} --repair" in result.output

    hub.requests.clear()
    result = runner.invoke(cli, ["download", REPO, "--repair"])
    assert result.exit_code == EXIT_OK, result.output
    fetched = [r for r in hub.requests if r.startswith("GET") and "/resolve/" in r]
    assert fetched == [f"GET /{REPO}/resolve/{repo.commit}/{shard}"]
    assert blob.stat().st_size == repo.files[shard].size
    assert runner.invoke(cli, ["verify", REPO, "--full"]).exit_code == EXIT_OK


def test_repair_refetches_a_flipped_byte(hub: FakeHub) -> None:
    repo = hub.repos[REPO]
    runner = CliRunner()
    assert runner.invoke(cli, ["download", REPO]).exit_code == EXIT_OK
    shard = "model-00001-of-00002.safetensors"
    blob = blob_of(repo, shard)
    data = bytearray(blob.read_bytes())
    data[-3] ^= 0x01
    blob.write_bytes(bytes(data))
    # Same size, same header: only hashing sees it.
    assert runner.invoke(cli, ["verify", REPO]).exit_code == EXIT_OK

    result = runner.invoke(cli, ["download", REPO, "--repair", "--json"])
    assert result.exit_code == EXIT_OK, result.output
    assert json.loads(result.stdout)["plan"]["repair"] == [shard]
    assert runner.invoke(cli, ["verify", REPO, "--full"]).exit_code == EXIT_OK


def test_repair_with_nothing_wrong_fetches_nothing(hub: FakeHub) -> None:
    runner = CliRunner()
    assert runner.invoke(cli, ["download", REPO]).exit_code == EXIT_OK
    hub.requests.clear()
    result = runner.invoke(cli, ["download", REPO, "--repair", "--json"])
    assert result.exit_code == EXIT_OK, result.output
    assert json.loads(result.stdout)["already_complete"] is True
    assert not [r for r in hub.requests if "/resolve/" in r]


# --------------------------------------------------------------------------------------------
# Errors: one line, the right exit code, never a traceback


def test_repo_not_found(hub: FakeHub) -> None:
    proc = run_subprocess("download", "test-org/does-not-exist")
    assert_one_line_error(proc, EXIT_NOT_FOUND, "test-org/does-not-exist", "not found")


def test_revision_not_found(hub: FakeHub) -> None:
    proc = run_subprocess("download", REPO, "--revision", "no-such-branch")
    assert_one_line_error(proc, EXIT_NOT_FOUND, "revision 'no-such-branch' not found")


def test_gated_without_token(hub: FakeHub) -> None:
    proc = run_subprocess("download", GATED)
    assert_one_line_error(proc, EXIT_ENVIRONMENT, "gated", "no Hugging Face token", "HF_TOKEN=")


def test_gated_with_invalid_token(hub: FakeHub) -> None:
    proc = run_subprocess("download", GATED, env={"HF_TOKEN": "hf_not_a_real_token"})
    assert_one_line_error(proc, EXIT_ENVIRONMENT, "rejected your token", "HF_TOKEN")


def test_gated_with_token_lacking_access(hub: FakeHub) -> None:
    proc = run_subprocess("download", GATED, env={"HF_TOKEN": OTHER_TOKEN})
    assert_one_line_error(proc, EXIT_ENVIRONMENT, "has no access", "accept its terms")


def test_gated_with_granted_token_downloads(hub: FakeHub) -> None:
    proc = run_subprocess("download", GATED, env={"HF_TOKEN": GOOD_TOKEN})
    assert proc.returncode == EXIT_OK, proc.stderr
    assert "Verify (fast): OK" in proc.stdout


def test_offline_and_not_cached(hub: FakeHub) -> None:
    proc = run_subprocess("download", REPO, env={"HF_HUB_OFFLINE": "1"})
    assert_one_line_error(proc, EXIT_ENVIRONMENT, "HF_HUB_OFFLINE", "not in the cache")
    assert hub.requests == []


def test_offline_with_complete_cache_succeeds(hub: FakeHub) -> None:
    assert CliRunner().invoke(cli, ["download", REPO]).exit_code == EXIT_OK
    hub.requests.clear()
    proc = run_subprocess("download", REPO, env={"HF_HUB_OFFLINE": "1"})
    assert proc.returncode == EXIT_OK, proc.stderr
    assert "HF_HUB_OFFLINE is set" in proc.stdout
    assert hub.requests == []


def test_offline_with_incomplete_cache(hub: FakeHub) -> None:
    repo = hub.repos[REPO]
    assert CliRunner().invoke(cli, ["download", REPO]).exit_code == EXIT_OK
    (snapshot_of(repo) / "tokenizer.json").unlink()
    proc = run_subprocess("download", REPO, env={"HF_HUB_OFFLINE": "1"})
    assert_one_line_error(proc, EXIT_ENVIRONMENT, "is incomplete", "tokenizer.json")


def _closed_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def test_hub_unreachable() -> None:
    url = f"http://127.0.0.1:{_closed_port()}"
    proc = run_subprocess("download", REPO, env={"HF_ENDPOINT": url})
    assert_one_line_error(proc, EXIT_ENVIRONMENT, "cannot reach the Hugging Face Hub", url)


def test_hub_down(hub: FakeHub) -> None:
    hub.fail_status = 503
    proc = run_subprocess("download", REPO)
    assert_one_line_error(proc, EXIT_ENVIRONMENT, "HTTP 503")


def test_not_enough_disk_space_refuses_with_both_numbers(
    hub: FakeHub, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setattr(model_downloader, "free_space", lambda path: 1000)
    needed = sum(f.size for f in hub.repos[REPO].files.values())
    code, _out, err = run_main(["download", REPO], capsys)
    assert code == EXIT_INSUFFICIENT, err
    assert f"({needed} bytes)" in err
    assert "(1000 bytes)" in err
    assert "--force" in err
    assert not [r for r in hub.requests if "/resolve/" in r]

    code, out, err = run_main(["download", REPO, "--force"], capsys)
    assert code == EXIT_OK, err
    assert "Verify (fast): OK" in out


def test_disk_full_during_download(
    hub: FakeHub, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    import huggingface_hub

    def full(*_args: object, **_kwargs: object) -> str:
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(huggingface_hub, "snapshot_download", full)
    code, _out, err = run_main(["download", REPO], capsys)
    assert code == EXIT_INSUFFICIENT, err
    assert "disk full" in err
    assert "Traceback" not in err


def test_local_directory_is_not_downloaded(tmp_path: Path,
                                           capsys: pytest.CaptureFixture[str]) -> None:
    code, _out, err = run_main(["download", str(tmp_path)], capsys)
    assert code != EXIT_OK
    assert "nothing to download" in err


# --------------------------------------------------------------------------------------------
# Ctrl-C


def test_ctrl_c_leaves_cache_consistent_and_next_run_completes(hub: FakeHub) -> None:
    repo = hub.repos[REPO]
    hub.bytes_per_second = 100_000
    proc = spawn_cli("download", REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    blobs = repo_cache_dir(REPO) / "blobs"
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline and not list(blobs.glob("*.incomplete")):
        time.sleep(0.05)
    assert list(blobs.glob("*.incomplete")), "the download never started"
    proc.send_signal(signal.SIGINT)
    _out, err = proc.communicate(timeout=60)
    assert proc.returncode == EXIT_INTERRUPTED, err
    assert "Interrupted." in err
    assert "Traceback" not in err

    assert not list(blobs.glob("*.incomplete"))
    by_etag = {f.etag: f for f in repo.files.values()}
    for blob in blobs.iterdir():
        assert blob.stat().st_size == by_etag[blob.name].size, blob.name
    assert len(list(blobs.iterdir())) < len(repo.files)

    hub.bytes_per_second = None
    result = CliRunner().invoke(cli, ["download", REPO])
    assert result.exit_code == EXIT_OK, result.output
    assert CliRunner().invoke(cli, ["verify", REPO, "--full"]).exit_code == EXIT_OK


NESTED_CTRL_C = """
import os, signal, threading
from cmw_vllm.model_downloader import _cancel_on_sigint

class NestingEvent(threading.Event):
    # A second Ctrl-C lands while the first handler's set() holds the event's lock: the
    # interpreter runs the handler again right after os.kill returns, inside the lock.
    def set(self):
        with self._cond:
            if not getattr(self, "nested", False):
                self.nested = True
                os.kill(os.getpid(), signal.SIGINT)
            self._flag = True
            self._cond.notify_all()

event = NestingEvent()
try:
    with _cancel_on_sigint(event):
        os.kill(os.getpid(), signal.SIGINT)
        threading.Event().wait(30)
except KeyboardInterrupt:
    print("interrupted, event set:", event.is_set())
"""


def test_a_second_ctrl_c_inside_the_first_handler_does_not_hang() -> None:
    # A handler that Python re-enters inside Event.set() would wait forever for its lock.
    proc = subprocess.run([sys.executable, "-c", NESTED_CTRL_C], capture_output=True,
                          text=True, timeout=20,
                          preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    assert proc.stdout.strip() == "interrupted, event set: True", proc.stderr


# --------------------------------------------------------------------------------------------
# Real vLLM serves what was downloaded, with the Hub switched off


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.mark.vllm
def test_real_vllm_serves_downloaded_snapshot(real_vllm: str, tiny_model: Path,
                                              monkeypatch: pytest.MonkeyPatch) -> None:
    import requests

    with FakeHub() as server:
        server.add_repo("test-org/tiny-served", tiny_model)
        download = run_subprocess("download", "test-org/tiny-served", "--json",
                                  env={"HF_ENDPOINT": server.url, "HF_HUB_DISABLE_XET": "1"})
    assert download.returncode == EXIT_OK, download.stderr
    snapshot = json.loads(download.stdout)["path"]

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    port = _free_port()
    start = run_subprocess("start", snapshot, "--name", "downloaded", "--port", str(port),
                           "--max-model-len", "512", "--timeout", "300", "--json",
                           timeout=360)
    try:
        assert start.returncode == EXIT_OK, start.stdout + start.stderr
        models = requests.get(f"http://127.0.0.1:{port}/v1/models", timeout=10).json()
        served = models["data"][0]["id"]
        reply = requests.post(f"http://127.0.0.1:{port}/v1/completions",
                              json={"model": served, "prompt": "Hello", "max_tokens": 4},
                              timeout=60)
        assert reply.status_code == 200, reply.text
        assert reply.json()["choices"][0]["text"] is not None
    finally:
        run_subprocess("stop", "downloaded", timeout=120)


def test_alias_from_the_user_models_file(hub: FakeHub, isolated_home: Path) -> None:
    repo = hub.repos[REPO]
    isolated_home.mkdir(parents=True, exist_ok=True)
    (isolated_home / "models.toml").write_text(
        f'[models.tiny-test]\nmodel = "{REPO}"\nport = 8123\n', encoding="utf-8")
    runner = CliRunner()
    result = runner.invoke(cli, ["download", "tiny-test"])
    assert result.exit_code == EXIT_OK, result.output
    assert (snapshot_of(repo) / "config.json").is_file()
    result = runner.invoke(cli, ["verify", "tiny-test", "--json"])
    assert result.exit_code == EXIT_OK, result.output
    assert json.loads(result.stdout)["repo_id"] == REPO


PROBE = """
import sys
from cmw_vllm.cli import main
try:
    main([sys.argv[1], "--help"])
except SystemExit:
    pass
print(" ".join(sorted(sys.modules)))
"""


def test_cli_help_does_not_import_huggingface_hub() -> None:
    for command in ("download", "verify"):
        proc = subprocess.run([sys.executable, "-c", PROBE, command], capture_output=True,
                              text=True, timeout=60)
        assert proc.returncode == EXIT_OK, proc.stderr
        loaded = proc.stdout.splitlines()[-1].split()
        assert "cmw_vllm.cli_models" in loaded
        assert not [m for m in loaded if m.startswith(("huggingface_hub", "rich", "httpx"))]
