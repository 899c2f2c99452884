"""Time to healthy: tensor parallel 2 over two "machines" vs tensor parallel 1 on one.

    CMW_VLLM_PYTHON=.venv-vllm/bin/python .venv/bin/python bench/bench_multinode.py [--runs N]

Needs root (two network namespaces joined by a veth pair, see tests/netns.py) and the CPU
build of vLLM; serves the tiny random model of tests/tiny_model.py. Each run starts the
server with `cmw-vllm start` inside the namespaces and reads `ready_after_s` (launch ->
first 200 of /health) from its JSON, then stops it. TP=1 runs in namespace A alone; TP=2
puts rank 0 in A and the headless rank 1 in B. Runs alternate. Figures, not pass/fail.
"""

from __future__ import annotations

import argparse
import fcntl
import json
import os
import statistics
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from bench.bench_cli import machine  # noqa: E402
from tests.netns import NetnsPair, unavailable_reason  # noqa: E402
from tests.tiny_model import make_tiny_model  # noqa: E402

CLI = [sys.executable, "-m", "cmw_vllm"]
LOCK = Path(os.environ.get("CMW_VLLM_TEST_LOCK", "/tmp/cmw-vllm-real-vllm.lock"))


def side_env(home: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("CMW_VLLM_HOME", "HF_"))}
    env.update(CMW_VLLM_HOME=str(home / "cmw"), HF_HOME=str(home / "hf"), HF_HUB_OFFLINE="1")
    env.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
    return env


def start(net: NetnsPair, ns: str, env: dict[str, str], args: list[str]) -> dict:
    proc = net.run(ns, [*CLI, "start", *args, "--json"], env, timeout=900)
    if proc.returncode != 0:
        raise SystemExit(f"start failed ({proc.returncode}): {proc.stderr[-2000:]}")
    return json.loads(proc.stdout)


def stop(net: NetnsPair, ns: str, env: dict[str, str], name: str) -> None:
    net.run(ns, [*CLI, "stop", name], env, timeout=120)


def one_node(net: NetnsPair, root: Path, model: Path, port: int) -> float:
    env = side_env(root / "a")
    out = start(net, net.a, env, [str(model), "--name", "one", "--port", str(port)])
    stop(net, net.a, env, "one")
    return float(out["ready_after_s"])


def two_nodes(net: NetnsPair, root: Path, model: Path, port: int) -> float:
    env_a, env_b = side_env(root / "a"), side_env(root / "b")
    common = ["-tp", "2", "--nnodes", "2", "--master-addr", net.addr_a,
              "--master-port", str(port + 1)]
    start(net, net.b, env_b, [str(model), "--name", "fol", "--node-rank", "1", *common,
                              "--no-wait"])
    try:
        out = start(net, net.a, env_a, [str(model), "--name", "lead", "--node-rank", "0",
                                        "--port", str(port), *common])
    finally:
        stop(net, net.a, env_a, "lead")
        stop(net, net.b, env_b, "fol")
    return float(out["ready_after_s"])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=1, help="runs of each layout")
    parser.add_argument("--port", type=int, default=19880)
    args = parser.parse_args()
    reason = unavailable_reason()
    if reason:
        raise SystemExit(f"skipped: {reason}")
    print(machine())
    with tempfile.TemporaryDirectory(prefix="cmwmn-bench-") as tmp, LOCK.open("a") as lock:
        root = Path(tmp)
        model = make_tiny_model(root / "tiny-qwen2")
        fcntl.flock(lock, fcntl.LOCK_EX)
        net = NetnsPair().create()
        try:
            one: list[float] = []
            two: list[float] = []
            for _ in range(args.runs):
                one.append(one_node(net, root, model, args.port))
                two.append(two_nodes(net, root, model, args.port))
        finally:
            net.destroy()
    print(f"time to healthy, TP=1 on one node:    median {statistics.median(one):6.1f} s  "
          f"runs {[round(x, 1) for x in one]}")
    print(f"time to healthy, TP=2 over two nodes: median {statistics.median(two):6.1f} s  "
          f"runs {[round(x, 1) for x in two]}")


if __name__ == "__main__":
    main()
