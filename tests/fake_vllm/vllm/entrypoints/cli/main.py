"""A stand-in for ``vllm.entrypoints.cli.main``: ``vllm serve MODEL [FLAGS]``.

It takes the model as vLLM's ``serve`` does (first argument, or ``--model``) and runs the
stand-in server of :mod:`vllm.entrypoints.openai.api_server`, which holds the behaviours.
"""

from __future__ import annotations

import sys


def main() -> None:
    args = sys.argv[1:]
    if args[:1] != ["serve"]:
        sys.stderr.write("usage: vllm serve MODEL [FLAGS]\n")
        sys.exit(2)
    rest = args[1:]
    if rest and not rest[0].startswith("-"):
        rest = ["--model", rest[0], *rest[1:]]
    from vllm.entrypoints.openai.api_server import main as serve

    serve(rest)
