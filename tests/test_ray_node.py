"""The Ray node's files, on a stand-in ``ray`` (the real cluster: tests/test_ray_real.py)."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from cmw_vllm import ray_node
from tests.conftest import free_port

# Does what `ray start --head --block` does to the disk: session files under --temp-dir,
# one line in its log when up; then blocks until signalled.
FAKE_RAY = """#!/bin/sh
for a in "$@"; do case "$a" in --temp-dir=*) d="${a#--temp-dir=}";; esac; done
if [ -n "$d" ]; then
    mkdir -p "$d/session_1/sockets" && echo "$d" > "$d/ray_current_cluster"
    ln -sfn "$d/session_1" "$d/session_latest"
fi
echo "Ray runtime started."
exec sleep 300
"""


@pytest.fixture
def fake_ray(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    """A stand-in ``ray`` beside the engine's interpreter; any node it ran is stopped after."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    ray = bin_dir / "ray"
    ray.write_text(FAKE_RAY)
    ray.chmod(0o755)
    monkeypatch.setenv("CMW_VLLM_PYTHON", str(bin_dir / "python"))
    yield ray
    ray_node.stop_node(timeout=5)


def test_stopping_the_head_removes_its_session_files(fake_ray: Path) -> None:
    record, already = ray_node.start_node(head=True, node_ip="127.0.0.1", port=free_port(),
                                          timeout=60)
    assert not already and record.role == "ray-head"
    temp = Path(ray_node._temp_dir())
    assert f"--temp-dir={temp}" in record.command
    assert (temp / "ray_current_cluster").is_file()  # the stand-in wrote where it was told
    was_running, _ = ray_node.stop_node(timeout=10)
    assert was_running
    assert not temp.exists()
    assert ray_node.node_status(with_nodes=False).state == "none"


def test_a_temp_dir_that_is_a_link_is_left_alone(tmp_path: Path) -> None:
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    (elsewhere / "keep").write_text("x")
    link = tmp_path / "cmw-ray-link"
    link.symlink_to(elsewhere)
    ray_node._remove_temp_dir(link)
    assert link.is_symlink() and (elsewhere / "keep").read_text() == "x"
