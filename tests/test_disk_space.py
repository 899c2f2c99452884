"""Disk space: sizes of cached models, space on each location."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

from cmw_vllm import disk_space, paths
from cmw_vllm.hf_cache import hub_cache_dir


def make_cached_repo(cache: Path, repo_id: str, blobs: dict[str, bytes],
                     snapshots: dict[str, dict[str, str]]) -> Path:
    """A repo laid out as huggingface_hub does: blobs, snapshot symlinks, refs."""
    repo = cache / ("models--" + repo_id.replace("/", "--"))
    (repo / "blobs").mkdir(parents=True)
    for blob, data in blobs.items():
        (repo / "blobs" / blob).write_bytes(data)
    for commit, files in snapshots.items():
        snap = repo / "snapshots" / commit
        snap.mkdir(parents=True)
        for name, blob in files.items():
            (snap / name).symlink_to(os.path.relpath(repo / "blobs" / blob, snap))
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(next(iter(snapshots)))
    return repo


def test_cached_models_sizes_count_blobs_once() -> None:
    cache = hub_cache_dir()
    blobs_a = {"b1": b"x" * 1000, "b2": b"y" * 250}
    make_cached_repo(cache, "org/alpha", blobs_a,
                     {"c1": {"model.safetensors": "b1", "config.json": "b2"},
                      "c2": {"model.safetensors": "b1"}})
    blobs_b = {"b3": b"z" * 5000}
    make_cached_repo(cache, "org/beta", blobs_b, {"c3": {"model.safetensors": "b3"}})
    (cache / "datasets--org--data" / "blobs").mkdir(parents=True)
    (cache / "datasets--org--data" / "blobs" / "d").write_bytes(b"d" * 99999)

    models = disk_space.cached_models()
    assert [m.repo_id for m in models] == ["org/beta", "org/alpha"]  # largest first
    sizes = {m.repo_id: m.size for m in models}
    assert sizes["org/alpha"] == sum(len(v) for v in blobs_a.values())
    assert sizes["org/beta"] == sum(len(v) for v in blobs_b.values())
    assert {m.repo_id: m.revisions for m in models} == {"org/alpha": 2, "org/beta": 1}


def test_empty_or_missing_cache() -> None:
    assert not hub_cache_dir().exists()
    report = disk_space.disk_report()
    assert report.cached_models == [] and report.cached_total == 0


def test_measure_uses_nearest_existing_parent(tmp_path: Path) -> None:
    target = tmp_path / "not" / "yet" / "there"
    loc = disk_space.measure("x", target)
    assert not loc.exists
    assert loc.measured_at == str(tmp_path)
    assert loc.total == shutil.disk_usage(tmp_path).total
    assert loc.free is not None and 0 <= loc.free <= loc.total
    assert loc.writable is True


def test_report_lists_local_dir_state_and_logs(tmp_path: Path) -> None:
    local = tmp_path / "models"
    local.mkdir()
    report = disk_space.disk_report(local)
    by_label = {loc.label: loc for loc in report.locations}
    assert by_label["models (--local-dir)"].path == str(local)
    assert by_label["models (HF cache)"].path == str(hub_cache_dir())
    assert by_label["state"].path == str(paths.state_dir())
    assert by_label["logs"].path == str(paths.logs_dir())
    data = report.to_json()
    assert set(data) == {"hf_cache", "locations", "cached_models", "cached_total"}
    assert set(data["locations"][0]) == {"label", "path", "exists", "measured_at", "total",
                                         "used", "free", "writable", "error"}


def test_a_file_in_the_way_is_reported_not_raised(tmp_path: Path) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("not a directory")
    loc = disk_space.measure("x", blocker / "sub")
    assert loc.measured_at == str(blocker)
    assert loc.writable is False
