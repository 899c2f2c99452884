"""Check cmw-vllm's GPU paths on a real NVIDIA GPU, with a stand-in engine (no vLLM needed).

Run by ``scripts/gpu_check.sh``, which says how. Every step prints a ``PASS``/``FAIL`` line
with what it saw to ``OUT/report.txt``; what the commands printed goes to
``OUT/details.txt``. Without a GPU it runs what needs none and says so (exit 0).
Exit status: 0 when every step passed, 1 otherwise.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
GiB = 1024**3
# How often the timed commands run (gpus, status); the suite's own run of this script sets 1.
REPEAT = int(os.environ.get("GPU_CHECK_REPEAT", "5"))


class Run:
    """The report, the environment of every command, and the steps' verdicts."""

    def __init__(self, out: Path) -> None:
        out.mkdir(parents=True, exist_ok=True)
        self.report = (out / "report.txt").open("w")
        self.details = (out / "details.txt").open("w")
        self.failed: list[str] = []
        self.work = Path(tempfile.mkdtemp(prefix="cmw-gpu-check-"))
        self.env = dict(os.environ, CMW_VLLM_HOME=str(self.work / "home"),
                        HF_HOME=str(self.work / "hf"), HF_HUB_OFFLINE="1",
                        CMW_VLLM_PYTHON=str(HERE / "gpufake" / "python"), NO_COLOR="1",
                        PYTHONUNBUFFERED="1")

    def say(self, line: str) -> None:
        print(line, flush=True)
        self.report.write(line + "\n")
        self.report.flush()

    def check(self, name: str, ok: bool, seen: str) -> bool:
        self.say(f"{'PASS' if ok else 'FAIL'} {name}: {seen}")
        if not ok:
            self.failed.append(name)
        return ok

    def cli(self, *args: str, **env: str) -> tuple[int, str, str, float]:
        """``cmw-vllm ARGS``; returns (exit code, stdout, stderr, seconds)."""
        begin = time.monotonic()
        proc = subprocess.run([sys.executable, "-m", "cmw_vllm", *args], capture_output=True,
                              text=True, env={**self.env, **env}, timeout=300,
                              stdin=subprocess.DEVNULL)
        took = time.monotonic() - begin
        self.details.write(f"$ cmw-vllm {' '.join(args)}   # exit {proc.returncode}, "
                           f"{took:.2f}s\n{proc.stdout}{proc.stderr}\n")
        self.details.flush()
        return proc.returncode, proc.stdout, proc.stderr, took

    def json(self, *args: str) -> Any:
        code, out, err, _took = self.cli(*args, "--json")
        try:
            return json.loads(out)
        except ValueError:
            raise RuntimeError(f"cmw-vllm {' '.join(args)} --json printed no JSON "
                               f"(exit {code}): {err.strip()[-300:]}") from None


def suggestions(hint: str) -> list[str]:
    return re.findall(r"`([^`]+)`", hint)


def flag(text: str, name: str) -> str | None:
    match = re.search(rf"{name} (\S+)", text)
    return match.group(1) if match else None


def gpu_free(run: Run) -> tuple[int, int]:
    gpu = run.json("gpus")["gpus"][0]
    return int(gpu["memory_total"]), int(gpu["memory_free"])


def server(run: Run, name: str) -> dict[str, Any]:
    found = [s for s in run.json("status")["servers"] if s["name"] == name]
    return found[0] if found else {}


def without_gpu(run: Run, m8: Path) -> None:
    code, out, _err, _t = run.cli("estimate", str(m8), "--gpu-memory-gb", "141")
    run.check("estimate 8B on a given 141 GiB GPU", code == 0 and "Fits" in out,
              f"exit {code}")


def gpus_and_setup(run: Run) -> None:
    times = [run.cli("gpus", "--json")[3] for _ in range(REPEAT)]
    data = run.json("gpus")
    run.check("gpus", data["available"] and all(g["memory_total"] for g in data["gpus"]),
              f"{len(data['gpus'])} GPU(s), driver {data['driver_version']}, CUDA "
              f"{data['cuda_version']}; {', '.join(f'{t:.2f}s' for t in times)}")
    begin = time.monotonic()
    setup = run.json("setup")
    took = time.monotonic() - begin
    torch = [c for c in setup["checks"] if c["name"] == "torch"]
    engine = setup["engine"]
    run.check("setup --json: torch sees the GPU (cuda/torch verdict)",
              bool(torch) and torch[0]["status"] == "ok" and engine["cuda_available"] is True,
              f"{torch[0] if torch else 'no torch check'}; torch_cuda {engine['torch_cuda']}, "
              f"{took:.1f}s")


def estimate_8b(run: Run, m8: Path) -> None:
    total, free = gpu_free(run)
    code, out, _err, took = run.cli("estimate", str(m8))
    data = run.json("estimate", str(m8))
    cap = free / total
    utils = [float(u) for s in data["suggestions"]
             if (u := flag(s, "--gpu-memory-utilization"))]
    run.check("estimate 8B on this GPU", code == (0 if data["fits"] else 7)
              and all(u <= cap for u in utils),
              f"exit {code}, fits {data['fits']}, suggestions {data['suggestions']}, "
              f"{took:.2f}s")


def start_6gib(run: Run, tiny: Path) -> None:
    code, _out, err, took = run.cli("start", str(tiny), "--name", "g1", "--port", "19341",
                                    "--auto-port",
                                    "--timeout", "180", GPU_GIB="6")
    if not run.check("start g1 (engine holds 6 GiB)", code == 0,
                     f"exit {code}, {took:.1f}s {err.strip()[-200:]}"):
        return
    held = server(run, "g1").get("gpu_memory_bytes") or 0
    run.check("status shows g1's 6 GiB", 6 * GiB <= held < 8 * GiB,
              f"gpu_memory_bytes {held / GiB:.2f} GiB")
    procs = [p for g in run.json("gpus")["gpus"] for p in g["processes"]
             if p["server"] == "g1"]
    run.check("gpus matches the EngineCore to g1",
              any(p["name"] == "VLLM::EngineCore" for p in procs),
              f"{[(p['pid'], p['name'], p['used_memory']) for p in procs]}")


def hold_gpu(run: Run, leave_free: int) -> subprocess.Popen[str] | None:
    """A foreign process that holds all but ``leave_free`` bytes of GPU 0."""
    _total, free = gpu_free(run)
    take = free - leave_free
    if take < GiB:
        run.check("foreign process holds most of the GPU", False,
                  f"only {free / GiB:.1f} GiB free")
        return None
    code = (f"import torch, time\nx = torch.empty({take}, dtype=torch.uint8, device='cuda')\n"
            "torch.cuda.synchronize()\nprint('ok', flush=True)\ntime.sleep(900)\n")
    proc = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True,
                            start_new_session=True)
    assert proc.stdout is not None
    ready = proc.stdout.readline().strip() == "ok"
    total, free = gpu_free(run)
    run.check("foreign process holds most of the GPU", ready,
              f"took {take / GiB:.1f} GiB; {free / GiB:.1f} of {total / GiB:.1f} GiB free")
    return proc if ready else None


def refusal_and_hint(run: Run, m8: Path) -> None:
    total, free = gpu_free(run)
    cap = free / total
    data = run.json("estimate", str(m8))
    utils = [float(u) for s in data["suggestions"]
             if (u := flag(s, "--gpu-memory-utilization"))]
    run.check("estimate 8B with the GPU held: suggestions fit what is free",
              not data["fits"] and bool(utils) and all(u <= cap for u in utils),
              f"free/total {cap:.3f}; suggestions {data['suggestions']}")
    code, _out, err, took = run.cli("start", str(m8), "--name", "g3", "--port", "19343",
                                    "--auto-port",
                                    GPU_GIB="2")
    found = suggestions(err)
    run.check("start 8B refused before launch, with a hint that fits",
              code == 7 and bool(found) and "try free" not in err,
              f"exit {code} in {took:.2f}s; {err.strip()[-400:]}")
    setting = next((s for s in found if "--gpu-memory-utilization" in s), None)
    if setting is None:
        run.check("start 8B with the suggested setting", False, "no utilization suggested")
        return
    util = float(flag(setting, "--gpu-memory-utilization") or 2)
    code, _out, err, took = run.cli("start", str(m8), "--name", "g3", "--port", "19343",
                                    "--auto-port",
                                    "--timeout", "180", *setting.split(), GPU_GIB="2")
    run.check("start 8B with the suggested setting", code == 0 and util <= cap,
              f"`{setting}` (util {util} <= {cap:.3f}): exit {code}, {took:.1f}s "
              f"{err.strip()[-200:]}")
    run.cli("stop", "g3")


def leftovers(run: Run) -> None:
    record_file = run.work / "home" / "servers" / "g1.json"
    if not record_file.exists():
        run.check("SIGKILL of g1's API server", False, "g1 is not running")
        return
    record = json.loads(record_file.read_text())
    os.kill(int(record["pid"]), signal.SIGKILL)
    deadline = time.monotonic() + 15
    status = server(run, "g1")
    while status.get("state") != "exited" and time.monotonic() < deadline:
        time.sleep(0.3)
        status = server(run, "g1")
    held = status.get("gpu_memory_bytes") or 0
    run.check("status --json after SIGKILL of g1's API server: leftovers' GPU memory",
              status.get("state") == "exited" and held >= 6 * GiB
              and bool(status.get("orphan_pids")),
              f"state {status.get('state')}, gpu_memory_bytes {held / GiB:.2f} GiB, "
              f"orphan_pids {status.get('orphan_pids')}")
    setup = run.json("setup")
    mine = [o for o in setup["orphans"] if o.get("server") == "g1"]
    check = [c for c in setup["checks"] if c["name"] == "leftover vLLM processes"]
    run.check("setup names g1's leftovers",
              bool(mine) and (mine[0]["gpu_memory"] or 0) >= 6 * GiB and bool(check)
              and "cmw-vllm stop g1" in (check[0]["fix"] or ""),
              f"{mine}; {check[0] if check else 'no check'}")
    pids = {o["pid"] for o in mine}
    code, out, _err, took = run.cli("stop", "--all")
    time.sleep(1)
    left = [p for g in run.json("gpus")["gpus"] for p in g["processes"] if p["pid"] in pids]
    run.check("stop --all frees the GPU", code == 0 and not left,
              f"exit {code}, {took:.1f}s; still on the GPU: {left}; {out.strip()[-200:]}")


def pack_two(run: Run, m8: Path) -> None:
    """Two 8B servers with `--gpu-memory-utilization auto` share GPU 0: both healthy, each
    holding about its share, and NVML's total within the GPU."""
    names = ("pk1", "pk2")
    for n, name in enumerate(names):
        code, _out, err, took = run.cli("start", str(m8), "--name", name, "--port",
                                        str(19351 + n), "--auto-port", "--timeout", "180",
                                        "--gpu-memory-utilization", "auto",
                                        "--max-model-len", "4096", "--gpus", "0")
        if not run.check(f"start {name} with --gpu-memory-utilization auto on GPU 0",
                         code == 0, f"exit {code}, {took:.1f}s {err.strip()[-300:]}"):
            return
    servers = [server(run, name) for name in names]
    gpu = run.json("gpus")["gpus"][0]
    shares = [s.get("gpu_memory_utilization") or 0 for s in servers]
    held = [s.get("gpu_memory_bytes") or 0 for s in servers]
    total = int(gpu["memory_total"])
    near = all(abs(h - u * total) < 2 * GiB for h, u in zip(held, shares, strict=True))
    run.check("two auto-sized servers share GPU 0: both healthy, NVML within the GPU",
              all(s.get("state") == "healthy" and s.get("gpus") == [0] for s in servers)
              and 0 < sum(shares) < 1 and near and int(gpu["memory_used"]) <= total,
              f"states {[s.get('state') for s in servers]}, gpus "
              f"{[s.get('gpus') for s in servers]}, shares {shares}, held "
              f"{[round(h / GiB, 2) for h in held]} GiB, NVML used "
              f"{int(gpu['memory_used']) / GiB:.1f} of {total / GiB:.1f} GiB")
    for name in names:
        run.cli("stop", name)


def main() -> int:
    out = Path(sys.argv[sys.argv.index("--out") + 1]) if "--out" in sys.argv else Path(
        "gpu-check-report")
    run = Run(out)
    sys.path.insert(0, str(HERE))
    from mkmodel import make

    tiny, m8 = run.work / "tiny", run.work / "m8"
    make(tiny, "tiny")
    make(m8, "8b")
    foreign = None
    try:
        without_gpu(run, m8)
        data = run.json("gpus")
        if not data["available"]:
            run.say(f"no GPU: {data['reason']}; the checks that need one were not run")
            return 1 if run.failed else 0
        gpus_and_setup(run)
        estimate_8b(run, m8)
        start_6gib(run, tiny)
        foreign = hold_gpu(run, leave_free=30 * GiB)
        if foreign is not None:
            refusal_and_hint(run, m8)
            foreign.kill()
            foreign.wait()
            foreign = None
        leftovers(run)
        pack_two(run, m8)
        times = [run.cli("status", "--json")[3] for _ in range(REPEAT)]
        run.say(f"INFO status --json, no servers: {', '.join(f'{t:.2f}s' for t in times)}")
    except Exception as exc:  # report what broke and still clean up
        run.check("the run itself", False, f"{type(exc).__name__}: {exc}")
    finally:
        if foreign is not None:
            foreign.kill()
        run.cli("stop", "--all")
    run.say(f"{'ALL PASSED' if not run.failed else 'FAILED: ' + ', '.join(run.failed)}")
    return 1 if run.failed else 0


if __name__ == "__main__":
    sys.exit(main())
