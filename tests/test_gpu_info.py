"""GPU report against a fake ``pynvml`` module, with real processes to match to servers."""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
import sys
import time
import types
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from types import SimpleNamespace

import psutil
import pytest
from click.testing import CliRunner

from cmw_vllm import gpu_info, paths
from cmw_vllm.cli import cli
from cmw_vllm.server_record import ServerRecord

GiB = 1024**3


class FakeNVMLError(Exception):
    """Stands in for ``pynvml.NVMLError``."""


@dataclass
class FakeGpu:
    name: str | bytes
    total: int
    used: int
    procs: list[tuple[int, int | None]] = field(default_factory=list)
    power_mw: int | None = 250_000
    fail: set[str] = field(default_factory=set)


def make_fake_nvml(gpus: list[FakeGpu], *, init_error: str | None = None) -> types.ModuleType:
    """A module with the NVML calls gpu_info makes, answering from ``gpus``."""
    mod = types.ModuleType("pynvml")
    mod.NVMLError = FakeNVMLError  # type: ignore[attr-defined]
    mod.NVML_TEMPERATURE_GPU = 0  # type: ignore[attr-defined]
    mod.calls = []  # type: ignore[attr-defined]

    def init() -> None:
        if init_error:
            raise FakeNVMLError(init_error)
        mod.calls.append("init")  # type: ignore[attr-defined]

    def check(i: int, what: str) -> FakeGpu:
        gpu = gpus[i]
        if what in gpu.fail:
            raise FakeNVMLError("Not Supported")
        return gpu

    mod.nvmlInit = init  # type: ignore[attr-defined]
    mod.nvmlShutdown = lambda: mod.calls.append("shutdown")  # type: ignore[attr-defined]
    mod.nvmlSystemGetDriverVersion = lambda: "550.54.15"  # type: ignore[attr-defined]
    mod.nvmlSystemGetCudaDriverVersion = lambda: 12040  # type: ignore[attr-defined]
    mod.nvmlDeviceGetCount = lambda: len(gpus)  # type: ignore[attr-defined]
    mod.nvmlDeviceGetHandleByIndex = lambda i: i  # type: ignore[attr-defined]
    mod.nvmlDeviceGetName = lambda h: check(h, "name").name  # type: ignore[attr-defined]
    mod.nvmlDeviceGetUUID = lambda h: f"GPU-fake-{h}"  # type: ignore[attr-defined]
    mod.nvmlDeviceGetMemoryInfo = lambda h: SimpleNamespace(  # type: ignore[attr-defined]
        total=gpus[h].total, used=gpus[h].used, free=gpus[h].total - gpus[h].used)
    mod.nvmlDeviceGetUtilizationRates = lambda h: SimpleNamespace(  # type: ignore[attr-defined]
        gpu=10 * (h + 1), memory=5 * (h + 1))
    mod.nvmlDeviceGetTemperature = lambda h, s: 40 + h  # type: ignore[attr-defined]

    def power(h: int) -> int:
        gpu = check(h, "power")
        if gpu.power_mw is None:
            raise FakeNVMLError("Not Supported")
        return gpu.power_mw

    mod.nvmlDeviceGetPowerUsage = power  # type: ignore[attr-defined]
    mod.nvmlDeviceGetEnforcedPowerLimit = lambda h: 700_000  # type: ignore[attr-defined]

    def compute(h: int) -> list[SimpleNamespace]:
        gpu = check(h, "processes")
        return [SimpleNamespace(pid=p, usedGpuMemory=m) for p, m in gpu.procs]

    mod.nvmlDeviceGetComputeRunningProcesses = compute  # type: ignore[attr-defined]
    mod.nvmlDeviceGetGraphicsRunningProcesses = lambda h: []  # type: ignore[attr-defined]
    return mod


@pytest.fixture
def spawn() -> Iterator[list[subprocess.Popen[bytes]]]:
    """Start throwaway processes; every one is killed at the end."""
    procs: list[subprocess.Popen[bytes]] = []
    yield procs
    for proc in procs:
        if proc.poll() is None:
            proc.kill()
        proc.wait()


def start(procs: list[subprocess.Popen[bytes]], args: list[str],
          **kw: object) -> subprocess.Popen[bytes]:
    proc = subprocess.Popen(args, stdin=subprocess.DEVNULL, **kw)  # type: ignore[call-overload]
    procs.append(proc)
    return proc


def titled(title: str) -> list[str]:
    """A command whose process shows ``title`` as its name (like vLLM's setproctitle)."""
    return ["bash", "-c", f"exec -a {title} sleep 120"]


def wait_title(pid: int, title: str) -> None:
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        try:
            if psutil.Process(pid).cmdline()[:1] == [title]:
                return
        except psutil.Error:
            pass
        time.sleep(0.02)
    raise AssertionError(f"pid {pid} never showed title {title}")


def make_record(name: str, api: subprocess.Popen[bytes]) -> ServerRecord:
    created = psutil.Process(api.pid).create_time()
    return ServerRecord(
        name=name, pid=api.pid, create_time=created, supervisor_pid=api.pid,
        supervisor_create_time=created, pgid=os.getpgid(api.pid), host="127.0.0.1",
        port=18999, model="org/m", served_model_name="org/m", task="generate",
        base_url="http://127.0.0.1:18999", command=["vllm"], log_path="/dev/null",
        started_at=time.time(), config={},
    )


def save_record(record: ServerRecord) -> None:
    paths.servers_dir().mkdir(parents=True, exist_ok=True)
    (paths.servers_dir() / f"{record.name}.json").write_text(json.dumps(asdict(record)))


API_SCRIPT = """
import subprocess, time
worker = subprocess.Popen(["bash", "-c", "exec -a VLLM::Worker sleep 120"],
                          start_new_session=True)
# The engine is started through a shell that exits at once, so its parent is not this
# process but it stays in this process group: an orphaned EngineCore.
shell = subprocess.Popen(["bash", "-c", "exec -a VLLM::EngineCore sleep 120 & echo $!"],
                         stdout=subprocess.PIPE)
engine = int(shell.stdout.readline())
shell.wait()
print(worker.pid, engine, flush=True)
time.sleep(120)
"""


# An API server started by hand: EngineCore its child, a worker the engine's child.
LIVE_SERVER_SCRIPT = """
import subprocess, sys, time
engine = subprocess.Popen(["bash", "-c", "exec -a VLLM::EngineCore bash -c "
                           "'exec -a VLLM::Worker sleep 120 & echo $!; wait'"],
                          stdout=subprocess.PIPE)
print(engine.pid, int(engine.stdout.readline()), flush=True)
time.sleep(120)
"""


def true_orphan(title: str) -> int:
    """A titled process whose parent exited (re-parented to pid 1 or a subreaper)."""
    shell = subprocess.run(["bash", "-c", f"(exec -a {title} sleep 120 <&- >&- 2>&- & echo $!)"],
                           capture_output=True, text=True, check=True, start_new_session=True)
    return int(shell.stdout.split()[-1])


@pytest.fixture
def server_tree(spawn: list[subprocess.Popen[bytes]]) -> Iterator[SimpleNamespace]:
    """A managed server's processes as vLLM leaves them, plus strangers.

    - ``api``: the API server, leader of its own process group;
    - ``engine``: an EngineCore in the api's group whose parent is not the api (orphaned);
    - ``worker``: a child of the api that moved to its own session (found by ancestry);
    - ``foreign``: an unrelated process; ``orphan``: a VLLM::EngineCore of no server, whose
      parent is gone (re-parented);
    - ``live``: a vLLM API server started by hand (no record), with its ``live_engine`` and
      ``live_worker``, all alive;
    - ``gone``: a pid that no longer exists.
    """
    api = start(spawn, [sys.executable, "-c", API_SCRIPT], stdout=subprocess.PIPE,
                start_new_session=True)
    assert api.stdout is not None
    worker_pid, engine_pid = (int(x) for x in api.stdout.readline().split())
    foreign = start(spawn, ["sleep", "120"])
    orphan = true_orphan("VLLM::EngineCore")
    # A server started by hand, alive: its engine and worker are no leftovers.
    live = start(spawn, [sys.executable, "-c", LIVE_SERVER_SCRIPT,
                         "vllm.entrypoints.openai.api_server"], stdout=subprocess.PIPE,
                 start_new_session=True)
    assert live.stdout is not None
    live_engine, live_worker = (int(x) for x in live.stdout.readline().split())
    for pid, title in ((engine_pid, "VLLM::EngineCore"), (orphan, "VLLM::EngineCore"),
                       (worker_pid, "VLLM::Worker"), (live_engine, "VLLM::EngineCore"),
                       (live_worker, "VLLM::Worker")):
        wait_title(pid, title)
    gone = subprocess.Popen(["true"])
    gone.wait()
    yield SimpleNamespace(api=api, engine=engine_pid, worker=worker_pid,
                          foreign=foreign.pid, orphan=orphan, gone=gone.pid,
                          live=live.pid, live_engine=live_engine, live_worker=live_worker,
                          record=make_record("alpha", api))
    # The engine and worker live outside what ``spawn`` cleans up.
    with contextlib.suppress(ProcessLookupError):
        os.killpg(api.pid, 9)
    for pid in (worker_pid, orphan):
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, 9)
    with contextlib.suppress(ProcessLookupError):
        os.killpg(live.pid, 9)


@pytest.fixture
def fake_gpus(server_tree: SimpleNamespace) -> list[FakeGpu]:
    t = server_tree
    return [
        FakeGpu("NVIDIA H100 80GB HBM3", 80 * GiB, 70 * GiB,
                procs=[(t.engine, 30 * GiB), (t.worker, 20 * GiB), (t.foreign, 5 * GiB),
                       (t.orphan, 7 * GiB), (t.live_engine, 9 * GiB)]),
        FakeGpu(b"NVIDIA A10", 24 * GiB, 3 * GiB, procs=[(t.worker, 2 * GiB), (t.gone, None)],
                power_mw=None),
        FakeGpu("NVIDIA L4", 24 * GiB, 0, fail={"processes"}),
    ]


def install(monkeypatch: pytest.MonkeyPatch, module: types.ModuleType | None) -> None:
    monkeypatch.setitem(sys.modules, "pynvml", module)  # type: ignore[arg-type]


def test_report_matches_processes_to_servers(
    monkeypatch: pytest.MonkeyPatch, server_tree: SimpleNamespace, fake_gpus: list[FakeGpu]
) -> None:
    fake = make_fake_nvml(fake_gpus)
    install(monkeypatch, fake)
    t = server_tree
    report = gpu_info.query_gpus([t.record])
    assert report.available
    assert fake.calls == ["init", "shutdown"]  # type: ignore[attr-defined]
    assert report.driver_version == "550.54.15"
    assert report.cuda_version == "12.4"
    assert [g.index for g in report.gpus] == [0, 1, 2]
    owners = {(g.index, p.pid): p.server for g, p in report.processes()}
    assert owners[(0, t.engine)] == "alpha"  # same process group, parent is not the api
    assert owners[(0, t.worker)] == "alpha"  # own session, descends from the api
    assert owners[(1, t.worker)] == "alpha"
    assert owners[(0, t.foreign)] is None
    assert owners[(0, t.orphan)] is None
    assert owners[(1, t.gone)] is None
    for gpu, fake_gpu in zip(report.gpus, fake_gpus, strict=True):
        assert gpu.memory_total == fake_gpu.total
        assert gpu.memory_free == fake_gpu.total - fake_gpu.used
    assert report.gpus[1].name == "NVIDIA A10"  # bytes from older bindings are decoded
    assert report.gpus[1].power_w is None
    assert report.gpus[0].power_w == fake_gpus[0].power_mw / 1000  # type: ignore[operator]
    assert report.gpus[2].processes == []
    assert any("processes" in e for e in report.gpus[2].errors)
    names = {p.pid: p.name for _g, p in report.processes()}
    assert names[t.engine] == "VLLM::EngineCore"
    # The API server dies (SIGKILL): its EngineCore still belongs to it by process group.
    t.api.kill()
    t.api.wait()
    after = gpu_info.query_gpus([t.record])
    owners_after = {p.pid: p.server for _g, p in after.processes()}
    assert owners_after[t.engine] == "alpha"
    assert owners_after[t.foreign] is None


def test_server_gpu_memory_sums_the_servers_processes(
    monkeypatch: pytest.MonkeyPatch, server_tree: SimpleNamespace, fake_gpus: list[FakeGpu]
) -> None:
    install(monkeypatch, make_fake_nvml(fake_gpus))
    t = server_tree
    owned = {t.engine, t.worker}
    expected = sum(m for g in fake_gpus for p, m in g.procs if p in owned and m)
    assert gpu_info.server_gpu_memory([t.record]) == {"alpha": expected}


def test_orphans_are_vllm_processes_of_no_server(
    monkeypatch: pytest.MonkeyPatch, server_tree: SimpleNamespace, fake_gpus: list[FakeGpu]
) -> None:
    install(monkeypatch, make_fake_nvml(fake_gpus))
    t = server_tree
    orphans = gpu_info.orphan_vllm_processes(records=[t.record])
    assert [(o.pid, o.name, o.gpu_memory, o.gpus) for o in orphans] == [
        (t.orphan, "VLLM::EngineCore", 7 * GiB, [0])]


def test_orphans_without_gpu_are_found_by_title(
    monkeypatch: pytest.MonkeyPatch, server_tree: SimpleNamespace
) -> None:
    install(monkeypatch, make_fake_nvml([], init_error="Driver Not Loaded"))
    t = server_tree
    pids = {o.pid for o in gpu_info.orphan_vllm_processes(records=[t.record])}
    assert t.orphan in pids
    assert t.engine not in pids and t.worker not in pids
    # Without the record, the server's API server is still alive: its engine and worker are
    # not leftovers either, and neither are those of the server started by hand.
    loose = {o.pid for o in gpu_info.orphan_vllm_processes(records=[])}
    assert t.orphan in loose
    assert not {t.engine, t.worker, t.live_engine, t.live_worker} & loose


def test_orphans_of_other_users_are_not_listed(
    monkeypatch: pytest.MonkeyPatch, server_tree: SimpleNamespace
) -> None:
    install(monkeypatch, make_fake_nvml([], init_error="Driver Not Loaded"))
    t = server_tree
    assert t.orphan in {o.pid for o in gpu_info.orphan_vllm_processes(records=[])}
    monkeypatch.setattr(os, "getuid", lambda: os.geteuid() + 4242)  # as another user sees it
    assert gpu_info.orphan_vllm_processes(records=[]) == []


def test_a_live_server_in_a_container_as_pid_1_is_no_reaper() -> None:
    class Proc:
        def __init__(self, pid: int, name: str, cmdline: list[str]) -> None:
            self.pid, self._name, self._cmdline = pid, name, cmdline

        def name(self) -> str:
            return self._name

        def cmdline(self) -> list[str]:
            return self._cmdline

    assert gpu_info._is_reaper(Proc(1, "tini", ["tini", "--", "sh"]))
    assert gpu_info._is_reaper(Proc(812, "systemd", ["/lib/systemd/systemd", "--user"]))
    assert not gpu_info._is_reaper(Proc(1, "python3", ["python3", "-m", "vllm", "serve"]))
    assert not gpu_info._is_reaper(Proc(812, "python3", ["python3", "job.py"]))


@pytest.mark.parametrize("error", ["Driver Not Loaded", "NVML Shared Library Not Found"])
def test_no_driver_is_a_normal_answer(monkeypatch: pytest.MonkeyPatch, error: str) -> None:
    install(monkeypatch, make_fake_nvml([], init_error=error))
    report = gpu_info.query_gpus([])
    assert not report.available
    assert report.reason is not None and report.reason.startswith(gpu_info.NO_GPU)
    assert error in report.reason
    assert gpu_info.server_gpu_memory([]) == {}


def test_no_gpu_and_no_bindings(monkeypatch: pytest.MonkeyPatch) -> None:
    install(monkeypatch, make_fake_nvml([]))
    assert gpu_info.query_gpus([]).reason == gpu_info.NO_GPU
    install(monkeypatch, None)  # ``import pynvml`` raises ImportError
    report = gpu_info.query_gpus([])
    assert not report.available and "not installed" in (report.reason or "")


def test_gpus_command(monkeypatch: pytest.MonkeyPatch, server_tree: SimpleNamespace,
                      fake_gpus: list[FakeGpu]) -> None:
    install(monkeypatch, make_fake_nvml(fake_gpus))
    save_record(server_tree.record)
    runner = CliRunner()
    human = runner.invoke(cli, ["gpus"])
    assert human.exit_code == 0, human.output
    assert "NVIDIA H100 80GB HBM3" in human.output
    assert "alpha" in human.output and "foreign" in human.output
    as_json = runner.invoke(cli, ["gpus", "--json"])
    data = json.loads(as_json.output)
    assert data["available"] is True
    procs = {p["pid"]: p for g in data["gpus"] for p in g["processes"]}
    assert procs[server_tree.engine]["server"] == "alpha"
    assert procs[server_tree.foreign]["foreign"] is True


def test_gpus_command_without_gpu(monkeypatch: pytest.MonkeyPatch) -> None:
    install(monkeypatch, make_fake_nvml([], init_error="Driver Not Loaded"))
    result = CliRunner().invoke(cli, ["gpus"])
    assert result.exit_code == 0
    assert "no NVIDIA GPU found" in result.output
    data = json.loads(CliRunner().invoke(cli, ["gpus", "--json"]).output)
    assert data["available"] is False and data["gpus"] == []


def test_real_nvml_here_never_raises() -> None:
    """Whatever this machine has (driver or not), the report is an answer."""
    report = gpu_info.query_gpus([])
    if report.available:
        assert all(g.memory_total for g in report.gpus)
    else:
        assert report.reason and report.reason.startswith(gpu_info.NO_GPU)


def test_import_does_not_load_nvml() -> None:
    code = ("import sys, cmw_vllm.gpu_info, cmw_vllm.memory_check, cmw_vllm.disk_space, "
            "cmw_vllm.engine_probe; "
            "print([m for m in ('pynvml', 'huggingface_hub', 'vllm', 'torch') "
            "if m in sys.modules])")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True, cwd=Path(__file__).resolve().parent.parent)
    assert out.stdout.strip() == "[]"


def test_a_reused_group_id_is_not_the_servers(server_tree: SimpleNamespace) -> None:
    t = server_tree
    # The same group id recorded for a server that started after these processes: the
    # group id must have been reused, so they are not that server's.
    later = ServerRecord(**{**asdict(t.record), "name": "later",
                            "supervisor_create_time": time.time() + 60, "pid": 1})
    assert gpu_info.owner_of(t.engine, [later]) is None
    assert gpu_info.owner_of(t.engine, [t.record]) == "alpha"
    # A record whose pid was reused by another process (different create time).
    reused = ServerRecord(**{**asdict(t.record), "name": "reused", "pgid": -1,
                             "create_time": t.record.create_time - 1000})
    assert gpu_info.owner_of(t.worker, [reused]) is None
    assert gpu_info.owner_of(t.worker, [t.record]) == "alpha"


def test_leftovers_of_an_exited_server_show_their_gpu_memory(
    monkeypatch: pytest.MonkeyPatch, fake_engine: Path, model_dir: Path
) -> None:
    """SIGKILL of the API server leaves its EngineCore holding GPU memory: `status` shows
    the memory, `setup` names the leftover and `stop` ends it."""
    from cmw_vllm.server_manager import group_members
    from cmw_vllm.server_record import read_record
    from tests.conftest import alive_pids, free_port, run_cli, wait_for_state

    code, _out, err = run_cli("start", str(model_dir), "--name", "left", "--port",
                              str(free_port()))
    assert code == 0, err
    record = read_record("left")
    assert record is not None
    engines = [p.pid for p in group_members(record)
               if p.cmdline()[:1] == ["VLLM::EngineCore"]]
    assert len(engines) == 1
    install(monkeypatch, make_fake_nvml([FakeGpu("NVIDIA H200", 140 * GiB, 7 * GiB,
                                                 procs=[(engines[0], 6 * GiB)])]))
    try:
        data = json.loads(run_cli("status", "--json")[1])
        assert data["servers"][0]["gpu_memory_bytes"] == 6 * GiB
        setup = json.loads(run_cli("setup", "--json")[1])
        assert engines[0] not in {o["pid"] for o in setup["orphans"]}  # a running server's

        os.kill(record.pid, 9)
        assert wait_for_state("left", "exited").state == "exited"
        data = json.loads(run_cli("status", "--json")[1])["servers"][0]
        assert (data["state"], data["gpu_memory_bytes"]) == ("exited", 6 * GiB)
        assert data["orphan_pids"] == engines
        human = run_cli("status")[1]
        assert "6.0 GiB" in human

        setup = json.loads(run_cli("setup", "--json")[1])
        leftover = [o for o in setup["orphans"] if o["pid"] == engines[0]]
        assert leftover == [{"pid": engines[0], "name": "VLLM::EngineCore",
                             "gpu_memory": 6 * GiB, "gpus": [0], "server": "left"}]
        check = next(c for c in setup["checks"] if c["name"] == "leftover vLLM processes")
        assert check["status"] == "warn" and "exited server 'left'" in check["detail"]
        assert "cmw-vllm stop left" in check["fix"]
    finally:
        assert run_cli("stop", "left")[0] == 0
    assert not alive_pids(engines)
