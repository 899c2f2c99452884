"""Benchmark: ``verify --full`` hashing throughput against ``sha256sum`` on the same files.

Builds an HF-cache snapshot of random "LFS" files (blobs named by their sha256) in a temp
dir, reads them once so every run starts from a warm page cache, then times:

- ``sha256sum`` over the files, one process (the usual baseline);
- ``sha256sum`` with one process per core (``xargs -P``);
- cmw-vllm's verifier in full mode, in-process, with 1 thread and with its default threads;
- ``cmw-vllm verify --full`` as a command (adds interpreter start-up).

Usage::

    python bench/bench_verify.py [--size-mb 512] [--files 8] [--repeat 3]
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO_ROOT))

REPO = "bench-org/random-weights"
COMMIT = "0" * 40


def machine_info() -> dict[str, str]:
    """CPU, cores, Python and OpenSSL versions, for the record."""
    cpu = platform.processor() or "?"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    import ssl

    return {
        "cpu": cpu,
        "cores": str(os.cpu_count()),
        "python": platform.python_version(),
        "openssl": ssl.OPENSSL_VERSION,
        "platform": platform.platform(),
    }


def build_snapshot(hub: Path, size_mb: int, files: int) -> list[Path]:
    """Write ``files`` random blobs adding up to ``size_mb`` MiB as a cached snapshot."""
    repo_dir = hub / ("models--" + REPO.replace("/", "--"))
    snapshot = repo_dir / "snapshots" / COMMIT
    (repo_dir / "blobs").mkdir(parents=True)
    snapshot.mkdir(parents=True)
    (repo_dir / "refs").mkdir()
    (repo_dir / "refs" / "main").write_text(COMMIT)
    per_file = size_mb * (1 << 20) // files
    tree: dict[str, dict[str, object]] = {}
    blobs: list[Path] = []
    for i in range(files):
        data = os.urandom(per_file)
        digest = hashlib.sha256(data).hexdigest()
        name = f"shard-{i:03d}.bin"
        blob = repo_dir / "blobs" / digest
        blob.write_bytes(data)
        (snapshot / name).symlink_to(f"../../blobs/{digest}")
        tree[name] = {"size": per_file, "blob_id": "0" * 40, "lfs_sha256": digest,
                      "lfs_size": per_file}
        blobs.append(blob)
    small = {
        "config.json": json.dumps({"architectures": ["BenchForCausalLM"]}).encode(),
        "tokenizer.json": json.dumps({"model": {"vocab": {}}}).encode(),
    }
    for name, data in small.items():
        blob_id = hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()
        (repo_dir / "blobs" / blob_id).write_bytes(data)
        (snapshot / name).symlink_to(f"../../blobs/{blob_id}")
        tree[name] = {"size": len(data), "blob_id": blob_id}
    (repo_dir / "trees").mkdir()
    (repo_dir / "trees" / f"{COMMIT}.json").write_text(
        json.dumps({"format_version": 1, "files": tree}))
    return blobs


def timed(fn: Callable[[], object], repeat: int) -> float:
    """Median wall time of ``repeat`` runs."""
    times = []
    for _ in range(repeat):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size-mb", type=int, default=512)
    parser.add_argument("--files", type=int, default=8)
    parser.add_argument("--repeat", type=int, default=3)
    args = parser.parse_args()

    with tempfile.TemporaryDirectory(prefix="cmw-bench-verify-") as tmp:
        hub = Path(tmp) / "hub"
        blobs = build_snapshot(hub, args.size_mb, args.files)
        total = sum(b.stat().st_size for b in blobs)
        os.environ["HF_HUB_CACHE"] = str(hub)
        os.environ["CMW_VLLM_HOME"] = str(Path(tmp) / "state")

        from cmw_vllm.model_verifier import default_workers, verify_model

        def ours(workers: int) -> Callable[[], object]:
            def run() -> None:
                report = verify_model(REPO, full=True, workers=workers)
                assert report.ok and report.files_hashed == len(blobs) + 2, report.problems
            return run

        def sha256sum() -> None:
            subprocess.run(["sha256sum", *map(str, blobs)], check=True, capture_output=True)

        def sha256sum_parallel() -> None:
            subprocess.run(["xargs", "-0", "-n", "1", "-P", str(os.cpu_count() or 1),
                            "sha256sum"], input=b"\0".join(str(b).encode() for b in blobs),
                           check=True, capture_output=True)

        cli = [sys.executable, "-m", "cmw_vllm", "verify", REPO, "--full", "--json"]

        def ours_cli() -> None:
            subprocess.run(cli, check=True, capture_output=True, env=os.environ.copy())

        sha256sum()  # warm the page cache
        rows = []
        if shutil.which("sha256sum"):
            rows.append(("sha256sum (1 process)", timed(sha256sum, args.repeat)))
            rows.append((f"sha256sum (xargs -P {os.cpu_count()})",
                         timed(sha256sum_parallel, args.repeat)))
        rows.append(("verify_model full, 1 thread", timed(ours(1), args.repeat)))
        workers = default_workers()
        rows.append((f"verify_model full, {workers} threads", timed(ours(workers), args.repeat)))
        rows.append(("cmw-vllm verify --full (CLI)", timed(ours_cli, args.repeat)))

    print("machine:", json.dumps(machine_info()))
    print(f"data: {args.files} files, {total / (1 << 20):.0f} MiB, warm page cache, "
          f"median of {args.repeat}")
    print(f"{'tool':<34} {'seconds':>8} {'MiB/s':>8}")
    for label, seconds in rows:
        print(f"{label:<34} {seconds:8.3f} {total / (1 << 20) / seconds:8.0f}")


if __name__ == "__main__":
    main()
