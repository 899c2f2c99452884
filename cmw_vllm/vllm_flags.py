"""The options ``vllm serve`` 0.32.0 accepts, from the list shipped in ``cmw_vllm/data``.

The file is vLLM's own ``vllm serve --help`` as a table: flag, type, default (aliases as
``alias of --flag: type``). Read only on the paths that need it (never by ``status``).
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from pathlib import Path

SERVE_FLAGS_FILE = Path(__file__).resolve().parent / "data" / "vllm-serve-flags-0.32.0.tsv"


def _takes_value(kind: str) -> bool:
    kind = kind.split(": ", 1)[1] if kind.startswith("alias of ") else kind
    return not (kind.startswith(("flag", "help")) or "nargs=?" in kind)


@functools.cache
def serve_flags() -> dict[str, bool]:
    """Every flag and short alias of ``vllm serve`` -> whether it needs a value after it."""
    flags: dict[str, bool] = {}
    for line in SERVE_FLAGS_FILE.read_text(encoding="utf-8").splitlines():
        name, _, rest = line.partition("\t")
        if name.startswith("-"):
            flags[name] = _takes_value(rest.split("\t", 1)[0])
    return flags


def normalize_flag(token: str) -> str | None:
    """The flag a token names (``--max_model_len=8`` -> ``--max-model-len``), else None."""
    if not token.startswith("-") or token in ("-", "--") or token[1:2].isdigit():
        return None
    flag = token.split("=", 1)[0]
    if flag.startswith("-O") and flag != "-O":  # -O3, -Odecode: vLLM's optimization level
        return "-O"
    # vLLM's parser accepts --max_model_len for --max-model-len.
    return "--" + flag[2:].replace("_", "-") if flag.startswith("--") else flag


def flag_value(args: Sequence[str], flag: str) -> str | None:
    """The value of the last ``flag VALUE`` or ``flag=VALUE`` in ``args``; None if absent."""
    value = None
    for i, arg in enumerate(args):
        if arg == flag and i + 1 < len(args):
            value = args[i + 1]
        elif arg.startswith(flag + "="):
            value = arg.split("=", 1)[1]
    return value
