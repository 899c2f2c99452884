"""Benchmark: ``cmw-vllm download`` against ``hf download`` from the same local fake Hub.

Serves a model directory (the tiny model plus random safetensors shards, a few hundred MB)
with ``tests/fake_hub.py`` on localhost, then times, each into a fresh cache:

- ``hf download REPO`` (huggingface_hub's own CLI);
- ``cmw-vllm download REPO`` (plan + disk check + download + fast verify);

and the second, no-op run of each on the complete cache. Both clients run as subprocesses;
the server runs in this process. Localhost bandwidth, so this measures overhead, not the
network.

Usage::

    python bench/bench_download.py [--size-mb 256] [--shards 4] [--repeat 3]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import struct
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO_ROOT))

from bench.bench_verify import machine_info  # noqa: E402
from tests.fake_hub import FakeHub  # noqa: E402
from tests.tiny_model import make_tiny_model  # noqa: E402

REPO = "bench-org/tiny-plus-shards"


def add_random_shards(model: Path, size_mb: int, shards: int) -> None:
    """Extra valid safetensors files of random bytes (one U8 tensor each)."""
    per = size_mb * (1 << 20) // shards
    for i in range(shards):
        header = json.dumps({f"extra.{i}": {"dtype": "U8", "shape": [per],
                                            "data_offsets": [0, per]}}).encode()
        header += b" " * (-len(header) % 8)
        with (model / f"extra-{i:05d}.safetensors").open("wb") as fh:
            fh.write(struct.pack("<Q", len(header)) + header)
            fh.write(os.urandom(per))


def run(cmd: list[str], env: dict[str, str]) -> float:
    start = time.perf_counter()
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
    elapsed = time.perf_counter() - start
    if proc.returncode != 0:
        raise SystemExit(f"{' '.join(cmd)} failed ({proc.returncode}):\n{proc.stderr[-2000:]}")
    return elapsed


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size-mb", type=int, default=256)
    parser.add_argument("--shards", type=int, default=4)
    parser.add_argument("--repeat", type=int, default=3)
    args = parser.parse_args()

    hf = shutil.which("hf", path=str(Path(sys.executable).parent)) or shutil.which("hf")
    if hf is None:
        raise SystemExit("the `hf` CLI (huggingface_hub) is not installed")
    with tempfile.TemporaryDirectory(prefix="cmw-bench-download-") as tmp:
        model = make_tiny_model(Path(tmp) / "model")
        add_random_shards(model, args.size_mb, args.shards)
        total = sum(p.stat().st_size for p in model.iterdir() if p.is_file())
        with FakeHub() as hub:
            hub.add_repo(REPO, model)
            results: dict[str, list[float]] = {}
            for i in range(args.repeat):
                for label, base in (("hf download", [hf, "download", REPO]),
                                    ("cmw-vllm download",
                                     [sys.executable, "-m", "cmw_vllm", "download", REPO])):
                    home = Path(tmp) / f"home-{label.split()[0]}-{i}"
                    env = {**os.environ, "HF_ENDPOINT": hub.url, "HF_HOME": str(home),
                           "HF_HUB_DISABLE_XET": "1", "HF_HUB_DISABLE_TELEMETRY": "1",
                           "HF_HUB_DISABLE_PROGRESS_BARS": "1",
                           "CMW_VLLM_HOME": str(home / "cmw")}
                    results.setdefault(f"{label} (fresh)", []).append(run(base, env))
                    results.setdefault(f"{label} (again, complete)", []).append(run(base, env))
                    shutil.rmtree(home)

    print("machine:", json.dumps(machine_info()))
    print(f"data: {total / (1 << 20):.0f} MiB in {args.shards + 6} files from a local fake Hub "
          f"(http.server), median of {args.repeat}")
    print(f"{'run':<36} {'seconds':>8} {'MiB/s':>8}")
    for label, times in results.items():
        median = statistics.median(times)
        rate = f"{total / (1 << 20) / median:8.0f}" if "fresh" in label else f"{'-':>8}"
        print(f"{label:<36} {median:8.3f} {rate}")


if __name__ == "__main__":
    main()
