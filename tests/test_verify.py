"""verify: offline checks of HF cache snapshots and local directories.

The cache layout is built here by hand, the way huggingface_hub writes it (blobs named by
ETag, snapshot links, ``refs/main``, ``trees/<commit>.json``), so these tests need no Hub.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import struct
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner

from cmw_vllm.cli import cli, main
from cmw_vllm.errors import EXIT_FAILURE, EXIT_NOT_FOUND, EXIT_OK
from cmw_vllm.hf_cache import repo_dir as repo_cache_dir
from cmw_vllm.model_verifier import (
    git_blob_sha1_of,
    safetensors_problem,
    verify_model,
)
from tests.fake_hub import FakeRepo, load_repo
from tests.tiny_model import write_safetensors

REPO = "test-org/tiny-verify"
SHARD1 = "model-00001-of-00002.safetensors"
SHARD2 = "model-00002-of-00002.safetensors"


def make_cached_snapshot(repo: FakeRepo, cache_dir: Path, with_tree: bool = True) -> Path:
    """Lay out ``repo`` in an HF hub cache as snapshot_download does; return the snapshot."""
    repo_dir = cache_dir / ("models--" + repo.repo_id.replace("/", "--"))
    snapshot = repo_dir / "snapshots" / repo.commit
    (repo_dir / "blobs").mkdir(parents=True)
    (repo_dir / "refs").mkdir()
    (repo_dir / "refs" / "main").write_text(repo.commit)
    tree: dict[str, dict[str, object]] = {}
    for entry in repo.files.values():
        blob = repo_dir / "blobs" / entry.etag
        shutil.copyfile(entry.source, blob)
        link = snapshot / entry.path
        link.parent.mkdir(parents=True, exist_ok=True)
        link.symlink_to(os.path.relpath(blob, link.parent))
        info: dict[str, object] = {"size": entry.size, "blob_id": entry.blob_id}
        if entry.sha256:
            info.update(lfs_sha256=entry.sha256, lfs_size=entry.size)
        tree[entry.path] = info
    if with_tree:
        (repo_dir / "trees").mkdir()
        (repo_dir / "trees" / f"{repo.commit}.json").write_text(
            json.dumps({"format_version": 1, "files": tree}))
    return snapshot


@pytest.fixture
def cached(sharded_model: Path, tmp_path: Path) -> FakeRepo:
    """The tiny model, as a cached snapshot under this test's HF_HOME."""
    repo = load_repo(REPO, sharded_model)
    make_cached_snapshot(repo, Path(os.environ["HF_HOME"]) / "hub")
    return repo


def blob(name: str) -> Path:
    repo_dir = repo_cache_dir(REPO)
    commit = (repo_dir / "refs" / "main").read_text()
    return (repo_dir / "snapshots" / commit / name).resolve()


def flip_byte(path: Path, offset: int) -> None:
    data = bytearray(path.read_bytes())
    data[offset] ^= 0x01
    path.write_bytes(bytes(data))


def verify_json(*args: str) -> tuple[int, dict[str, Any]]:
    result = CliRunner().invoke(cli, ["verify", *args, "--json"])
    return result.exit_code, json.loads(result.stdout)


def problem_files(report: dict[str, Any]) -> list[str | None]:
    return [p["file"] for p in report["problems"]]


# --------------------------------------------------------------------------------------------
# Cached snapshots


def test_intact_snapshot_is_ok_fast_and_full(cached: FakeRepo) -> None:
    code, report = verify_json(REPO)
    assert code == EXIT_OK, report
    assert report["files_checked"] == len(cached.files)
    assert report["metadata"] == "tree"
    code, report = verify_json(REPO, "--full")
    assert code == EXIT_OK, report
    assert report["files_hashed"] == len(cached.files)


def test_flipped_byte_in_shard_is_named_by_full_only(cached: FakeRepo) -> None:
    flip_byte(blob(SHARD1), cached.files[SHARD1].size - 2)
    code, report = verify_json(REPO)
    assert code == EXIT_OK, "same size and header: fast mode cannot see it"
    code, report = verify_json(REPO, "--full")
    assert code == EXIT_FAILURE
    assert problem_files(report) == [SHARD1]
    problem = report["problems"][0]
    assert problem["kind"] == "hash"
    assert "sha256" in problem["message"]
    assert problem["repairable"] is True


def test_changed_small_file_fails_its_git_sha1(cached: FakeRepo) -> None:
    config = blob("config.json")
    config.write_text(config.read_text().replace("  ", " \t", 1))  # same size, valid JSON
    code, report = verify_json(REPO)
    assert code == EXIT_OK, report
    code, report = verify_json(REPO, "--full")
    assert code == EXIT_FAILURE
    assert [(p["file"], p["kind"]) for p in report["problems"]] == [
        ("config.json", "hash")]
    assert "git sha1" in report["problems"][0]["message"]


def test_truncated_shard_is_named_in_fast_mode(cached: FakeRepo) -> None:
    os.truncate(blob(SHARD2), 4096)
    result = CliRunner().invoke(cli, ["verify", REPO])
    assert result.exit_code == EXIT_FAILURE
    lines = [line for line in result.stdout.splitlines() if SHARD2 in line]
    assert any("truncated" in line for line in lines), result.stdout
    assert any("expected" in line for line in lines), result.stdout
    assert "FAILED" in result.stdout


def test_missing_blob_and_missing_link(cached: FakeRepo) -> None:
    blob("tokenizer.json").unlink()
    snapshot = repo_cache_dir(REPO) / "snapshots" / cached.commit
    (snapshot / "generation_config.json").unlink()
    code, report = verify_json(REPO)
    assert code == EXIT_FAILURE
    messages = {p["file"]: p["message"] for p in report["problems"]}
    assert messages["tokenizer.json"] == "link points to a missing blob"
    assert messages["generation_config.json"] == "missing"


def test_without_tree_listing_blob_names_give_the_hashes(sharded_model: Path) -> None:
    repo = load_repo(REPO, sharded_model)
    make_cached_snapshot(repo, Path(os.environ["HF_HOME"]) / "hub", with_tree=False)
    code, report = verify_json(REPO, "--full")
    assert code == EXIT_OK, report
    assert report["metadata"] == "blobs"
    assert report["files_hashed"] == len(repo.files)
    flip_byte(blob("tokenizer.json"), 50)
    code, report = verify_json(REPO, "--full")
    assert problem_files(report) == ["tokenizer.json"]


def test_not_cached_and_unknown_revision(cached: FakeRepo,
                                         capsys: pytest.CaptureFixture[str]) -> None:
    for args, needle in (
        (["verify", "test-org/never-downloaded"], "is not in the Hugging Face cache"),
        (["verify", REPO, "--revision", "v2"], "revision 'v2'"),
    ):
        capsys.readouterr()
        with pytest.raises(SystemExit) as info:
            main(args)
        err = capsys.readouterr().err
        assert info.value.code == EXIT_NOT_FOUND, err
        assert needle in err
        assert "Traceback" not in err


def test_snapshot_folder_given_as_a_directory_uses_the_cache_metadata(
        cached: FakeRepo) -> None:
    snapshot = repo_cache_dir(REPO) / "snapshots" / cached.commit
    flip_byte(blob(SHARD2), cached.files[SHARD2].size - 10)
    code, report = verify_json(str(snapshot), "--full")
    assert code == EXIT_FAILURE
    assert report["source"] == "cache"
    assert report["repo_id"] == REPO
    assert problem_files(report) == [SHARD2]


def test_revision_can_be_the_commit(cached: FakeRepo) -> None:
    code, report = verify_json(REPO, "--revision", cached.commit)
    assert code == EXIT_OK, report
    assert report["commit"] == cached.commit


# --------------------------------------------------------------------------------------------
# Local directories


@pytest.fixture
def local_copy(sharded_model: Path, tmp_path: Path) -> Path:
    return Path(shutil.copytree(sharded_model, tmp_path / "local-model"))


def test_plain_directory_without_metadata(local_copy: Path) -> None:
    code, report = verify_json(str(local_copy), "--full")
    assert code == EXIT_OK, report
    assert report["source"] == "local"
    assert report["files_hashed"] == 0
    assert report["files_without_hash"] == report["files_checked"]
    result = CliRunner().invoke(cli, ["verify", str(local_copy), "--full"])
    assert result.exit_code == EXIT_OK, result.output
    assert "Verify (full): OK (fast checks only)" in result.output
    assert "Nothing could be hashed: a local folder has no Hub records." in result.output
    result = CliRunner().invoke(cli, ["verify", str(local_copy)])
    assert "Nothing could be hashed" not in result.output


def test_index_naming_a_missing_shard(local_copy: Path) -> None:
    (local_copy / SHARD2).unlink()
    code, report = verify_json(str(local_copy))
    assert code == EXIT_FAILURE
    assert problem_files(report) == [SHARD2]
    assert report["problems"][0]["kind"] == "index"


def test_problems_in_a_plain_directory_are_not_repairable(local_copy: Path) -> None:
    (local_copy / "generation_config.json").write_text("{not json")
    code, report = verify_json(str(local_copy))
    assert code == EXIT_FAILURE
    assert [(p["file"], p["kind"], p["repairable"]) for p in report["problems"]] == [
        ("generation_config.json", "json", False)]


def test_config_without_architecture(local_copy: Path) -> None:
    config = json.loads((local_copy / "config.json").read_text())
    del config["architectures"], config["model_type"]
    (local_copy / "config.json").write_text(json.dumps(config))
    code, report = verify_json(str(local_copy))
    assert code == EXIT_FAILURE
    assert [(p["kind"], p["file"]) for p in report["problems"]] == [
        ("config", "config.json")]


def test_no_tokenizer(local_copy: Path) -> None:
    (local_copy / "tokenizer.json").unlink()
    code, report = verify_json(str(local_copy))
    assert code == EXIT_FAILURE
    assert [p["kind"] for p in report["problems"]] == ["tokenizer"]


def test_revision_with_a_directory_is_a_usage_error(local_copy: Path) -> None:
    from cmw_vllm.errors import UsageError

    with pytest.raises(UsageError):
        verify_model(local_copy, revision="main")


# --------------------------------------------------------------------------------------------
# Safetensors structure


def _write_raw(path: Path, header: dict[str, object], data_len: int) -> int:
    raw = json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(raw)) + raw + b"\0" * data_len)
    return 8 + len(raw) + data_len


@pytest.mark.parametrize(
    ("header", "data_len", "needle"),
    [
        ({"a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]},
          "b": {"dtype": "F32", "shape": [2], "data_offsets": [12, 20]}}, 20, "gap"),
        ({"a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]},
          "b": {"dtype": "F32", "shape": [2], "data_offsets": [4, 12]}}, 12, "overlap"),
        ({"a": {"dtype": "F16", "shape": [3], "data_offsets": [0, 8]}}, 8, "needs 6 bytes"),
        ({"a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}}, 4, "truncated"),
        ({"a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}}, 9, "trailing data"),
        ({"a": {"shape": [2], "data_offsets": [0, 8]}}, 8, "malformed"),
    ],
)
def test_safetensors_structure_problems(tmp_path: Path, header: dict[str, object],
                                        data_len: int, needle: str) -> None:
    path = tmp_path / "x.safetensors"
    size = _write_raw(path, header, data_len)
    problem, _names = safetensors_problem(path, size)
    assert problem is not None
    assert needle in problem


def test_safetensors_header_garbage(tmp_path: Path) -> None:
    path = tmp_path / "x.safetensors"
    path.write_bytes(struct.pack("<Q", 10) + b"not json!!" + b"\0" * 8)
    assert safetensors_problem(path, path.stat().st_size)[0] == "header is not valid JSON"
    path.write_bytes(struct.pack("<Q", 1 << 40))
    assert "does not fit" in str(safetensors_problem(path, path.stat().st_size)[0])


def test_well_formed_safetensors_pass(tmp_path: Path) -> None:
    path = tmp_path / "ok.safetensors"
    write_safetensors(path, {"w": ([2, 3], b"\0" * 12), "b": ([3], b"\0" * 6)}, "bfloat16")
    problem, names = safetensors_problem(path, path.stat().st_size)
    assert problem is None
    assert names == {"w", "b"}


# --------------------------------------------------------------------------------------------
# Hashes and output


def test_git_blob_sha1_matches_git(tmp_path: Path) -> None:
    empty = tmp_path / "empty"
    empty.write_bytes(b"")
    # The id git gives the empty blob (`git hash-object /dev/null`).
    assert git_blob_sha1_of(empty, 0) == "e69de29bb2d1d6434b8b29ae775ad8c2e48c5391"
    hello = tmp_path / "hello"
    hello.write_bytes(b"hello\n")
    assert git_blob_sha1_of(hello, 6) == "ce013625030ba8dba906f756967f9e9ca394464a"


def test_json_keys_match_the_documented_ones(cached: FakeRepo) -> None:
    _code, report = verify_json(REPO)
    help_text = CliRunner().invoke(cli, ["verify", "--help"]).stdout
    documented = re.search(r"JSON keys: (.*?)\[", " ".join(help_text.split()))
    assert documented is not None, help_text
    keys = [k.strip() for k in re.sub(r"\([^)]*\)", "", documented.group(1)).split(",")]
    assert [k for k in keys if k] == list(report)
