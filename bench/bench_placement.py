"""What GPU placement adds to `start`: 8 simulated GPUs, 20 managed servers.

    .venv/bin/python bench/bench_placement.py [--gpus 8] [--servers 20] [--runs 30]

Starts ``--servers`` stand-in servers (tests/fake_vllm, a Llama-8B-shaped model whose
weights take no disk) with ``--gpu-memory-utilization auto`` on a simulated NVML
(tests/nvml_sim: ``--gpus`` GPUs of 141 GiB, half of the pairs on NVLink), then times what a
further start spends on placement, in this process: reading the ledger (NVML, matching GPU
processes to the servers' records, the reservations) and choosing the GPUs (the estimate on
every GPU set), for tensor parallel 1, 2 and 4. It also times the simulated NVML alone
(its scan of the processes stands in for the driver; it is not part of cmw-vllm). Prints
medians and the 90th percentile in milliseconds, wall time and this process's CPU time
(which other work on a shared machine disturbs far less). Figures, not pass/fail; the goal
is under 50 ms added to `start`.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "tests" / "nvml_sim"))
sys.path.insert(0, str(REPO / "tests" / "gpu"))


def free_port() -> int:
    """A TCP port nothing listens on right now."""
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def figures(times: list[tuple[float, float]]) -> str:
    """Median and 90th percentile of (wall, CPU) seconds, in milliseconds."""
    out = []
    for what, values in (("wall", [t[0] for t in times]), ("cpu", [t[1] for t in times])):
        ms = sorted(v * 1000 for v in values)
        p90 = ms[min(len(ms) - 1, int(len(ms) * 0.9))]
        out.append(f"{what} median {statistics.median(ms):5.1f} ms, p90 {p90:5.1f} ms")
    return "; ".join(out)


def timed(fn: Any, runs: int) -> list[tuple[float, float]]:
    """(wall, CPU) seconds of ``runs`` calls of ``fn``."""
    out = []
    for _ in range(runs):
        w0, c0 = time.perf_counter(), time.process_time()
        fn()
        out.append((time.perf_counter() - w0, time.process_time() - c0))
    return out


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--gpus", type=int, default=8)
    parser.add_argument("--servers", type=int, default=20)
    parser.add_argument("--runs", type=int, default=30)
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="cmw-bench-placement-"))
    nvml = work / "nvml.json"
    links = [[a, a + 1, "NVLINK"] for a in range(0, args.gpus - 1, 2)]
    nvml.write_text(json.dumps({"gpus": [{"name": "Sim H100", "total_gib": 141}] * args.gpus,
                                "links": links, "hold_after": 0}))
    wrapper = work / "engine-python"
    wrapper.write_text(f'#!/bin/sh\nPYTHONPATH="{REPO / "tests" / "fake_vllm"}'
                       f'${{PYTHONPATH:+:$PYTHONPATH}}" exec "{sys.executable}" "$@"\n')
    wrapper.chmod(0o755)
    os.environ.update(CMW_VLLM_HOME=str(work / "home"), CMW_FAKE_NVML=str(nvml),
                      CMW_VLLM_PYTHON=str(wrapper), FAKE_VLLM_DELAY="0.1",
                      HF_HOME=str(work / "hf"), HF_HUB_OFFLINE="1")
    os.environ.pop("CUDA_VISIBLE_DEVICES", None)
    logging.basicConfig(level=logging.WARNING)

    import pynvml
    from mkmodel import make

    from cmw_vllm.placement import place, read_ledger
    from cmw_vllm.server_config import ServerConfig
    from cmw_vllm.server_manager import ServerManager

    model = work / "m8b"
    make(model, "8b")
    manager = ServerManager()

    print(f"{args.gpus} simulated GPUs of 141 GiB, {args.servers} servers "
          "(--gpu-memory-utilization auto, --max-model-len 2048)")
    try:
        begin = time.perf_counter()
        for n in range(args.servers):
            config = ServerConfig(name=f"s{n}", model=str(model), port=free_port(),
                                  gpu_memory_utilization="auto", max_model_len=2048)
            manager.start(config, wait=True, timeout=60, auto_port=True)
        took = time.perf_counter() - begin
        ledger = read_ledger()
        assert ledger is not None
        per_gpu = ", ".join(f"{g.index}:{len(g.servers)}" for g in ledger.gpus)
        print(f"started in {took:.1f}s; servers per GPU {per_gpu}")
        def nvml() -> None:
            pynvml.nvmlInit()
            pynvml.nvmlShutdown()

        print(f"{'simulated NVML alone (not cmw-vllm)':34} {figures(timed(nvml, args.runs))}")
        print(f"{'read the ledger (NVML + records)':34} "
              f"{figures(timed(read_ledger, args.runs))}")
        for tp in (1, 2, 4):
            if tp > args.gpus:
                continue
            config = ServerConfig(name="new", model=str(model), tensor_parallel_size=tp,
                                  gpu_memory_utilization="auto", max_model_len=2048)
            placed = place(config, log=False)
            gpus = ",".join(map(str, placed.gpus)) if placed else "-"
            times = timed(lambda config=config: place(config, log=False), args.runs)
            print(f"{f'placement TP {tp} (-> GPU {gpus})':34} {figures(times)}")
    finally:
        manager.stop_all(timeout=10)
    return 0


if __name__ == "__main__":
    sys.exit(main())
