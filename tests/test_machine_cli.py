"""The machine commands through the CLI: disk, estimate, setup; and the engine probe."""

from __future__ import annotations

import contextlib
import json
import os
import re
import subprocess
import sys
import time
import types
from dataclasses import asdict
from pathlib import Path

import psutil
import pytest
from click.testing import CliRunner

from cmw_vllm import engine_probe, paths
from cmw_vllm import memory_check as mc
from cmw_vllm.cli import cli
from cmw_vllm.errors import InsufficientResourcesError, UsageError
from cmw_vllm.server_config import ServerConfig
from cmw_vllm.server_record import ServerRecord
from tests.test_memory_estimate import LLAMA8B, write_big_model

GiB = 1024**3


@pytest.fixture(autouse=True)
def no_gpu(monkeypatch: pytest.MonkeyPatch) -> None:
    """NVML that finds no driver, so results do not depend on this machine's GPUs."""
    mod = types.ModuleType("pynvml")

    class NVMLError(Exception):
        pass

    def init() -> None:
        raise NVMLError("Driver Not Loaded")

    mod.NVMLError = NVMLError  # type: ignore[attr-defined]
    mod.nvmlInit = init  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, "pynvml", mod)


def run(*args: str) -> tuple[int, str]:
    result = CliRunner().invoke(cli, list(args))
    if result.exception and not isinstance(result.exception, SystemExit):
        raise result.exception
    return result.exit_code, result.output


# --------------------------------------------------------------------------- disk


def test_disk_lists_locations_and_cached_models(tmp_path: Path) -> None:
    from cmw_vllm.hf_cache import repo_dir

    blobs = repo_dir("org/tiny") / "blobs"
    blobs.mkdir(parents=True)
    (blobs / "abc").write_bytes(b"w" * 3000)
    code, out = run("disk")
    assert code == 0
    assert "org/tiny" in out and "state" in out and "logs" in out
    code, out = run("disk", "--json", "--local-dir", str(tmp_path / "dl"))
    data = json.loads(out)
    assert [m["repo_id"] for m in data["cached_models"]] == ["org/tiny"]
    assert data["cached_models"][0]["size"] == 3000
    assert data["locations"][0]["label"] == "models (--local-dir)"


# --------------------------------------------------------------------------- estimate


@pytest.fixture
def roomy_ram(monkeypatch: pytest.MonkeyPatch) -> None:
    """RAM as vLLM counts it: 64 GiB, 62 available, whatever this machine has."""
    monkeypatch.setattr(mc, "cpu_memory", lambda: (64 * GiB, 62 * GiB))


def test_estimate_json_for_a_local_model(tiny_model: Path, roomy_ram: None,
                                         monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("VLLM_CPU_KVCACHE_SPACE", "1")
    code, out = run("estimate", str(tiny_model), "--max-model-len", "512", "--json")
    data = json.loads(out)
    assert code == 0 and data["fits"] and data["suggestions"] == []
    assert data["device"] == "cpu" and data["source"] == "local"
    assert data["kv_space"] == GiB
    assert data["kv_cache_tokens"] == data["kv_space"] // data["kv_bytes_per_token"]
    assert data["concurrency"] == data["kv_cache_tokens"] / 512


def test_estimate_human_output_and_exit_code(tmp_path: Path) -> None:
    model = write_big_model(tmp_path / "llama8b", LLAMA8B)
    code, out = run("estimate", str(model), "--gpu-memory-gb", "80")
    assert code == 0, out
    assert "Fits" in out and "yes" in out
    code, out = run("estimate", str(model), "--gpu-memory-gb", "24")
    assert code == 7
    assert "NO" in out and "problem:" in out
    code, out = run("estimate", str(model), "--gpu-memory-gb", "24", "--json")
    longest = json.loads(out)["max_model_len_that_fits"]
    code, out = run("estimate", str(model), "--gpu-memory-gb", "24",
                    "--max-model-len", str(longest))
    assert code == 0, out


def test_estimate_tp_and_kv_dtype_options(tmp_path: Path) -> None:
    model = write_big_model(tmp_path / "llama8b", LLAMA8B)
    base = json.loads(run("estimate", str(model), "--gpu-memory-gb", "80", "--json")[1])
    tp2 = json.loads(run("estimate", str(model), "--gpu-memory-gb", "80", "-tp", "2",
                         "--json")[1])
    fp8 = json.loads(run("estimate", str(model), "--gpu-memory-gb", "80",
                         "--kv-cache-dtype", "fp8", "--json")[1])
    assert tp2["kv_bytes_per_token"] * 2 == base["kv_bytes_per_token"]
    assert tp2["kv_bytes_per_token_total"] == base["kv_bytes_per_token"]
    assert fp8["kv_bytes_per_token"] * 2 == base["kv_bytes_per_token"]
    ctx = json.loads(run("estimate", str(model), "--gpu-memory-gb", "80",
                         "--concurrency-context", "4096", "--json")[1])
    assert ctx["concurrency"] > base["concurrency"]


def test_estimate_unknown_alias_is_a_usage_error() -> None:
    code, out = run("estimate", "no-such-alias-anywhere")
    assert code == UsageError.exit_code
    assert "unknown model" in out


@pytest.mark.parametrize("vllm_args", [
    [],
    ["--kv-cache-dtype", "fp8", "--block-size", "32", "--max-num-batched-tokens", "2048"],
    ["--kv-cache-memory-bytes", "2G"],
])
def test_estimate_is_the_check_start_makes(tmp_path: Path, roomy_ram: None,
                                           monkeypatch: pytest.MonkeyPatch,
                                           vllm_args: list[str]) -> None:
    from cmw_vllm.cli_lifecycle import _build_config

    model = write_big_model(tmp_path / "llama8b", LLAMA8B)
    monkeypatch.setenv("CMW_VLLM_GPU_MEMORY_UTILIZATION", "0.5")
    monkeypatch.setenv("CMW_VLLM_MAX_MODEL_LEN", "4096")
    code, out = run("estimate", str(model), "--json", "--", *vllm_args)
    shown = json.loads(out)
    config = _build_config(str(model), {}, tuple(vllm_args))
    assert shown == mc.check_config(config).to_json()
    assert (shown["gpu_memory_utilization"], shown["max_model_len"]) == (0.5, 4096)
    if "--block-size" in vllm_args:
        assert (shown["block_size"], shown["kv_cache_dtype"]) == (32, "fp8")
    if "--kv-cache-memory-bytes" in vllm_args:
        assert shown["kv_space"] == 2 * 10**9
    assert code == (0 if shown["fits"] else 7)


def test_estimate_never_suggests_an_impossible_setting(tmp_path: Path) -> None:
    model = write_big_model(tmp_path / "llama8b", LLAMA8B)
    code, out = run("estimate", str(model), "--gpu-memory-gb", "1")
    assert code == 7
    assert re.search(r"^Fits +NO$", out, re.M) and "Longest fit" not in out
    assert "Hint: use more or bigger GPUs" in out
    assert not re.search(r"--gpu-memory-utilization (1\.[0-9]|[2-9])", out), out
    code, out = run("estimate", str(model), "--gpu-memory-gb", "24")
    assert code == 7 and "Hint: try `--max-model-len " in out
    suggested = json.loads(run("estimate", str(model), "--gpu-memory-gb", "24",
                               "--json")[1])["suggestions"]
    assert suggested and all(
        run("estimate", str(model), "--gpu-memory-gb", "24", *s.split())[0] == 0
        for s in suggested)


# --------------------------------------------------------------------------- setup


def checks_by_name(data: dict[str, object]) -> dict[str, dict[str, str]]:
    return {c["name"]: c for c in data["checks"]}  # type: ignore[attr-defined,index]


def test_setup_without_vllm_fails_with_a_fix(monkeypatch: pytest.MonkeyPatch,
                                             tmp_path: Path) -> None:
    monkeypatch.setenv("CMW_VLLM_PYTHON", sys.executable)  # has no vLLM
    code, out = run("setup", "--json")
    data = json.loads(out)
    vllm = checks_by_name(data)["vLLM"]
    assert code == 8 and data["ok"] is False
    assert vllm["status"] == "fail" and "not installed" in vllm["detail"]
    assert vllm["fix"]
    code, out = run("setup")
    assert code == 8 and "FAIL" in out and "fix:" in out


def test_setup_with_the_real_engine(engine_python: str, monkeypatch: pytest.MonkeyPatch,
                                   roomy_ram: None) -> None:
    monkeypatch.setenv("CMW_VLLM_PYTHON", engine_python)
    code, out = run("setup", "--json")
    data = json.loads(out)
    assert code == 0, [c for c in data["checks"] if c["status"] == "fail"]
    assert checks_by_name(data)["vLLM"]["status"] == "ok"
    assert data["engine"]["dist"] in ("vllm", "vllm-cpu")
    gpus = checks_by_name(data)["GPUs"]
    if data["engine"]["build"] == "cpu":
        assert gpus["status"] == "ok" and "CPU" in gpus["detail"]
    else:
        assert gpus["status"] == "fail"
    assert "vllm" not in sys.modules and "torch" not in sys.modules


def test_setup_never_prints_the_token(monkeypatch: pytest.MonkeyPatch) -> None:
    secret = "hf_" + "s3cr3t" * 5
    monkeypatch.setenv("HF_TOKEN", secret)
    code, out = run("setup", "--json")
    assert secret not in out
    assert checks_by_name(json.loads(out))["HF token"]["status"] == "ok"
    monkeypatch.delenv("HF_TOKEN")
    assert checks_by_name(json.loads(run("setup", "--json")[1]))["HF token"]["status"] == "warn"


def test_setup_state_dir_not_writable(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    monkeypatch.setenv("CMW_VLLM_HOME", str(blocker / "home"))
    code, out = run("setup", "--json")
    data = json.loads(out)
    state = checks_by_name(data)["state dir"]
    assert code == 8
    assert state["status"] == "fail" and "CMW_VLLM_HOME" in state["fix"]
    # The disk lines of that folder do not say OK either.
    disk = [c for c in data["checks"] if c["name"] in ("disk: state", "disk: logs")]
    assert disk and all(c["status"] == "fail" and "not writable" in c["detail"] for c in disk)


def _titled(title: str, **kw: object) -> subprocess.Popen[bytes]:
    proc = subprocess.Popen(["bash", "-c", f"exec -a {title} sleep 120"],
                            stdin=subprocess.DEVNULL, **kw)  # type: ignore[call-overload]
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        with contextlib.suppress(psutil.Error):
            if psutil.Process(proc.pid).cmdline()[:1] == [title]:
                return proc
        time.sleep(0.02)
    proc.kill()
    raise AssertionError(f"{title} did not start")


def test_setup_lists_leftover_engines_with_the_kill_command() -> None:
    from tests.test_gpu_info import LIVE_SERVER_SCRIPT, true_orphan

    orphan = true_orphan("VLLM::EngineCore")
    managed = _titled("VLLM::Worker", start_new_session=True)
    # A vLLM started by hand and alive: neither its engine nor its worker is a leftover.
    live = subprocess.Popen([sys.executable, "-c", LIVE_SERVER_SCRIPT,
                             "vllm.entrypoints.openai.api_server"], stdout=subprocess.PIPE,
                            stdin=subprocess.DEVNULL, start_new_session=True)
    try:
        assert live.stdout is not None
        live_pids = [int(x) for x in live.stdout.readline().split()]
        created = psutil.Process(managed.pid).create_time()
        record = ServerRecord(
            name="kept", pid=managed.pid, create_time=created, supervisor_pid=managed.pid,
            supervisor_create_time=created, pgid=managed.pid, host="127.0.0.1", port=18998,
            model="m", served_model_name="m", task="generate", base_url="http://x",
            command=["vllm"], log_path="/dev/null", started_at=time.time(), config={})
        paths.servers_dir().mkdir(parents=True, exist_ok=True)
        (paths.servers_dir() / "kept.json").write_text(json.dumps(asdict(record)))
        code, out = run("setup", "--json")
        data = json.loads(out)
        foreign = sorted(o["pid"] for o in data["orphans"] if o["server"] is None)
        assert orphan in foreign
        assert managed.pid not in foreign
        assert not set(live_pids) & set(foreign)
        leftovers = checks_by_name(data)["leftover vLLM processes"]
        assert leftovers["status"] == "warn"
        assert f"kill {' '.join(str(p) for p in foreign)}" in leftovers["fix"]
        named = {int(w) for w in re.findall(r"\d+", leftovers["fix"])}
        assert not named & {*live_pids, live.pid}
        os.kill(orphan, 15)
        deadline = time.monotonic() + 10
        while psutil.pid_exists(orphan) and time.monotonic() < deadline:
            time.sleep(0.02)
        data = json.loads(run("setup", "--json")[1])
        assert orphan not in {o["pid"] for o in data["orphans"]}
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.kill(orphan, 9)
        with contextlib.suppress(ProcessLookupError):
            os.killpg(live.pid, 9)
        for proc in (managed, live):
            if proc.poll() is None:
                proc.kill()
            proc.wait()


# --------------------------------------------------------------------------- engine probe


def fake_python(tmp_path: Path, metadata: dict[str, object], torch: str | None) -> str:
    """An 'interpreter' that answers the probe's two scripts: metadata, and torch (or hangs)."""
    script = tmp_path / "python"
    torch_part = f"echo '{torch}'" if torch is not None else "sleep 30"
    script.write_text(
        "#!/bin/sh\n"
        'case "$2" in\n'
        f"  *'import torch'*) {torch_part} ;;\n"
        f"  *) echo '{json.dumps(metadata)}' ;;\n"
        "esac\n"
    )
    script.chmod(0o755)
    return str(script)


@pytest.mark.parametrize(("dists", "torch", "build"), [
    ({"vllm-cpu": "0.32.0", "torch": "2.13.0+cpu"}, None, "cpu"),
    ({"vllm": "0.32.0+cpu", "torch": "2.13.0+cpu"}, None, "cpu"),
    ({"vllm": "0.32.0", "torch": "2.9.0+cu128"},
     {"torch": "2.9.0+cu128", "cuda": "12.8", "cuda_available": True, "device_count": 2},
     "cuda"),
    ({"vllm": "0.32.0", "torch": "2.9.0+rocm6.4"}, None, "rocm"),
])
def test_probe_classifies_builds(tmp_path: Path, dists: dict[str, str],
                                 torch: dict[str, object] | None, build: str) -> None:
    py = fake_python(tmp_path, {"python_version": "3.12.0", "dists": dists},
                     json.dumps(torch) if torch else None)
    info = engine_probe.probe_engine(py, torch_timeout=0.5)
    assert info.installed and info.build == build
    assert info.version == dists.get("vllm-cpu", dists.get("vllm"))
    if torch:
        assert info.cuda_available is True and info.cuda_device_count == 2
    else:
        assert info.cuda_available is None  # the torch probe was cut off


def test_probe_without_vllm_and_with_a_broken_python(tmp_path: Path) -> None:
    py = fake_python(tmp_path, {"python_version": "3.12.0", "dists": {}}, None)
    info = engine_probe.probe_engine(py)
    assert not info.installed and "not installed" in (info.error or "")
    missing = engine_probe.probe_engine(str(tmp_path / "nope"))
    assert not missing.installed and missing.error


def test_probe_the_real_engine(engine_python: str) -> None:
    info = engine_probe.probe_engine(engine_python)
    site = Path(engine_python).parent.parent / "lib"  # the venv, not the base interpreter
    dist_infos = [p.name for p in site.glob("python*/site-packages/vllm*.dist-info")]
    assert info.installed
    assert any(d.startswith(f"{info.dist.replace('-', '_')}-{info.version}")  # type: ignore[union-attr]
               for d in dist_infos), dist_infos
    assert "vllm" not in sys.modules


def test_setup_judges_cpu_ram_as_start_does(tmp_path: Path, tiny_model: Path,
                                            monkeypatch: pytest.MonkeyPatch) -> None:
    torch = {"torch": "2.13.0+cpu", "cuda": None, "cuda_available": False, "device_count": 0}
    py = fake_python(tmp_path, {"python_version": "3.11.7",
                                "dists": {"vllm-cpu": "0.32.0", "torch": "2.13.0+cpu"}},
                     json.dumps(torch))
    monkeypatch.setenv("CMW_VLLM_PYTHON", py)
    monkeypatch.delenv("VLLM_CPU_KVCACHE_SPACE", raising=False)

    def ram_check() -> tuple[int, dict[str, str], str]:
        code, out = run("setup", "--json")
        ram = [c for c in json.loads(out)["checks"] if c["name"] == "RAM"]
        assert len(ram) == 1  # one number: the memory node's, as vLLM counts it
        return code, ram[0], run("setup")[1]

    # A node of 16 GiB with 11.2 available: vLLM's default asks for 0.92 x 16 and refuses.
    monkeypatch.setattr(mc, "cpu_memory", lambda: (16 * GiB, int(11.2 * GiB)))
    code, ram, human = ram_check()
    assert code == 8 and ram["status"] == "fail"
    assert "11.2 GiB available of 16.0 GiB" in ram["detail"]
    assert "Ready to serve." not in human and "Not ready to serve" in human
    space = re.match(r"export VLLM_CPU_KVCACHE_SPACE=(\d+) ", ram["fix"])
    assert space, ram["fix"]
    # start's hint for a tiny model names what the model can use (no more than setup's
    # figure, which is for any model), and that works too.
    with pytest.raises(InsufficientResourcesError) as err:
        mc.preflight(ServerConfig(name="t", model=str(tiny_model)), gpus=[])
    offered = re.search(r"`VLLM_CPU_KVCACHE_SPACE=(\d+)`", err.value.hint or "")
    assert offered and 1 <= int(offered.group(1)) <= int(space.group(1)), err.value.hint
    monkeypatch.setenv("VLLM_CPU_KVCACHE_SPACE", offered.group(1))
    assert mc.preflight(ServerConfig(name="t", model=str(tiny_model)), gpus=[]).status == "ok"
    monkeypatch.setenv("VLLM_CPU_KVCACHE_SPACE", space.group(1))
    code, ram, human = ram_check()
    assert code == 0 and ram["status"] == "ok" and "Ready to serve." in human
    assert mc.preflight(ServerConfig(name="t", model=str(tiny_model)), gpus=[]).status == "ok"
    monkeypatch.setenv("VLLM_CPU_KVCACHE_SPACE", "12")
    code, ram, _human = ram_check()
    assert code == 8 and ram["fix"].startswith(f"export VLLM_CPU_KVCACHE_SPACE={space.group(1)} ")
    monkeypatch.setenv("VLLM_CPU_KVCACHE_SPACE", "1.5")
    code, ram, _human = ram_check()
    assert code == 8 and ram["status"] == "fail" and "whole number" in ram["detail"]
    # Plenty of RAM: vLLM's default share fits.
    monkeypatch.delenv("VLLM_CPU_KVCACHE_SPACE")
    monkeypatch.setattr(mc, "cpu_memory", lambda: (64 * GiB, 62 * GiB))
    code, ram, _human = ram_check()
    assert code == 0 and ram["status"] == "ok" and "vLLM takes 0.92" in ram["detail"]


def _cuda_machine(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                  torch: dict[str, object] | None) -> None:
    """One fake H200 (driver for CUDA 12.4) and a CUDA build of vLLM whose torch answers
    ``torch`` (None: torch hangs)."""
    from tests.test_gpu_info import FakeGpu, make_fake_nvml

    monkeypatch.setitem(sys.modules, "pynvml",
                        make_fake_nvml([FakeGpu("NVIDIA H200", 140 * GiB, 1 * GiB)]))
    py = fake_python(tmp_path, {"python_version": "3.12.3",
                                "dists": {"vllm": "0.32.0", "torch": "2.9.0+cu128"}},
                     json.dumps(torch) if torch is not None else None)
    monkeypatch.setenv("CMW_VLLM_PYTHON", py)


@pytest.mark.parametrize(("torch", "status", "words"), [
    ({"torch": "2.9.0+cu128", "cuda": "12.4", "cuda_available": True, "device_count": 1},
     "ok", "sees 1 GPU"),
    ({"torch": "2.9.0+cu130", "cuda": "13.0", "cuda_available": False, "device_count": 0,
      "error": "The NVIDIA driver on your system is too old"},
     "fail", "built for CUDA 13.0 but the driver supports CUDA 12.4 at most"),
    ({"torch": "2.9.0+cu124", "cuda": "12.4", "cuda_available": False, "device_count": 0,
      "error": "CUDA initialization: no CUDA-capable device is detected"},
     "fail", "sees no CUDA GPU: CUDA initialization: no CUDA-capable device"),
])
def test_setup_asks_torch_whether_it_sees_the_gpu(tmp_path: Path,
                                                  monkeypatch: pytest.MonkeyPatch,
                                                  torch: dict[str, object], status: str,
                                                  words: str) -> None:
    _cuda_machine(tmp_path, monkeypatch, torch)
    code, out = run("setup", "--json")
    data = json.loads(out)
    check = checks_by_name(data)["torch"]
    assert check["status"] == status and words in check["detail"], check
    assert data["engine"]["cuda_available"] is torch["cuda_available"]
    if status == "fail":
        assert code == 8 and check["fix"]


def test_setup_fails_when_torch_cannot_tell(tmp_path: Path,
                                            monkeypatch: pytest.MonkeyPatch) -> None:
    from cmw_vllm.machine_setup import setup_report

    _cuda_machine(tmp_path, monkeypatch, None)
    report = setup_report(torch_timeout=0.5)
    check = next(c for c in report.checks if c.name == "torch")
    assert check.status == "fail" and "import torch took over 0.5s" in check.detail
    assert not report.ok and report.engine.cuda_available is None


def test_setup_gpu_hint_never_asks_for_more_than_is_free(tmp_path: Path,
                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    torch = {"torch": "2.9.0+cu128", "cuda": "12.8", "cuda_available": True, "device_count": 1}
    _cuda_machine(tmp_path, monkeypatch, torch)
    from tests.test_gpu_info import FakeGpu, make_fake_nvml

    monkeypatch.setitem(sys.modules, "pynvml",
                        make_fake_nvml([FakeGpu("NVIDIA H200", 140 * GiB, 110 * GiB)]))
    gpu = [c for c in json.loads(run("setup", "--json")[1])["checks"]
           if c["name"] == "GPUs" and c["status"] == "warn"]
    assert gpu and "--gpu-memory-utilization 0.21 or lower" in gpu[0]["fix"]
