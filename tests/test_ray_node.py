"""The Ray node's files, on a stand-in ``ray`` (the real cluster: tests/test_ray_real.py)."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import pytest

from cmw_vllm import ray_node
from tests.conftest import free_port, run_cli

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


# A Ray driver as Ray 2.60 behaves with an explicit address: refused by a cluster that has
# token authentication unless RAY_AUTH_MODE=token is set (it never turns it on by itself).
# It is also the interpreter of the stand-in `ray` script (cmw-vllm asks Ray with the
# interpreter of its `ray` command), which it runs with sh.
FAKE_DRIVER = """#!/bin/sh
[ "$1" = -c ] || exec /bin/sh "$@"
if [ "$RAY_AUTH_MODE" = token ]; then
    echo '[{"node_ip": "127.0.0.1", "alive": true, "cpus": 1, "gpus": 0}]'
    exit 0
fi
echo "ray.exceptions.AuthenticationError: token authentication is enabled but no token" \
     "was sent" >&2
exit 1
"""


@pytest.fixture
def token_cluster(fake_ray: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """The stand-in ``ray`` runs under FAKE_DRIVER, and a token lies in ~/.ray, as after
    any local ``ray.init()`` of Ray 2.60 (so ``ray start`` turns token auth on)."""
    driver = tmp_path / "bin" / "driver-python"
    driver.write_text(FAKE_DRIVER)
    driver.chmod(0o755)
    fake_ray.write_text(FAKE_RAY.replace("#!/bin/sh", f"#!{driver}", 1)
                        .replace('echo "Ray runtime started."',
                                 'echo "Ray runtime started. mode=$RAY_AUTH_MODE"'))
    home = tmp_path / "user-home"
    (home / ".ray").mkdir(parents=True)
    (home / ".ray" / "auth_token").write_text("secret")
    monkeypatch.setenv("HOME", str(home))
    for var in ("RAY_AUTH_MODE", "RAY_AUTH_TOKEN", "RAY_AUTH_TOKEN_PATH", "RAY_ADDRESS"):
        monkeypatch.delenv(var, raising=False)
    return driver


def test_status_asks_the_cluster_in_the_auth_mode_the_node_started_with(
        token_cluster: Path) -> None:
    code, _, err = run_cli("ray", "start", "--head", "--node-ip-address", "127.0.0.1",
                           "--port", str(free_port()))
    assert code == 0, err
    assert "mode=token" in ray_node.log_file().read_text()  # the node got it explicitly
    code, out, err = run_cli("ray", "status", "--json")
    assert code == 0, err
    status = json.loads(out)
    assert status["error"] is None
    assert [n["node_ip"] for n in status["nodes"]] == ["127.0.0.1"]


def test_a_node_without_a_token_runs_without_auth(fake_ray: Path, tmp_path: Path,
                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HOME", str(tmp_path / "empty-home"))
    for var in ("RAY_AUTH_MODE", "RAY_AUTH_TOKEN", "RAY_AUTH_TOKEN_PATH"):
        monkeypatch.delenv(var, raising=False)
    assert ray_node.auth_mode() == "disabled"
    monkeypatch.setenv("RAY_AUTH_MODE", "Token")  # the user's choice wins
    assert ray_node.auth_mode() == "token"


def test_a_failed_cluster_query_is_not_exit_0(token_cluster: Path,
                                              monkeypatch: pytest.MonkeyPatch) -> None:
    code, _, err = run_cli("ray", "start", "--head", "--node-ip-address", "127.0.0.1",
                           "--port", str(free_port()))
    assert code == 0, err
    # The same cluster asked as Ray 2.60 would be by default: refused.
    monkeypatch.setattr(ray_node, "driver_env", lambda record=None: {}, raising=False)
    code, out, err = run_cli("ray", "status")
    assert code == 8
    assert "running" in out
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("cannot ask the Ray cluster at 127.0.0.1:")
    assert lines[0].endswith("AuthenticationError: token authentication is enabled but no "
                             "token was sent")
    code, out, _ = run_cli("ray", "status", "--json")
    assert code == 8
    assert "AuthenticationError" in json.loads(out)["error"]
