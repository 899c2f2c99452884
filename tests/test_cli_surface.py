"""The CLI's surface: every command is registered, fast paths import little."""

from __future__ import annotations

import importlib
import json
import subprocess
import sys

import pytest
from click.testing import CliRunner

from cmw_vllm.cli import LAZY_COMMANDS, cli


def test_lazy_command_table_matches_the_modules() -> None:
    found = {}
    for module_name in sorted(set(LAZY_COMMANDS.values())):
        module = importlib.import_module(f"cmw_vllm.{module_name}")
        for command in module.COMMANDS:
            found[command.name] = module_name
    assert found == LAZY_COMMANDS


@pytest.mark.parametrize("command", sorted(LAZY_COMMANDS))
def test_every_command_has_help_with_examples(command: str) -> None:
    result = CliRunner().invoke(cli, [command, "--help"])
    assert result.exit_code == 0, result.output
    assert "Examples:" in result.output


def test_unknown_command_is_a_usage_error() -> None:
    result = CliRunner().invoke(cli, ["statu"])
    assert result.exit_code == 2
    assert "No such command 'statu'" in result.stderr
    assert "'status'" in result.stderr.split("Did you mean")[1]


HEAVY = ["huggingface_hub", "rich", "pynvml", "requests", "pydantic", "vllm", "torch",
         "httpx", "httpx2", "filelock", "dotenv", "psutil"]


def _imported_by(args: list[str], env_extra: dict[str, str], tmp_path) -> set[str]:
    code = (
        "import sys, runpy\n"
        f"sys.argv = ['cmw-vllm', *{args!r}]\n"
        "try:\n"
        "    runpy.run_module('cmw_vllm', run_name='__main__')\n"
        "except SystemExit:\n"
        "    pass\n"
        "import json\n"
        "print(json.dumps(sorted({m.split('.')[0] for m in sys.modules})))\n"
    )
    import os

    env = {**os.environ, **env_extra}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         env=env, cwd=tmp_path, check=False).stdout
    return set(json.loads(out.strip().splitlines()[-1]))


def test_status_without_servers_imports_nothing_heavy(tmp_path, isolated_home) -> None:
    modules = _imported_by(["status", "--json"], {}, tmp_path)
    assert "click" in modules  # the probe itself works
    assert not modules & set(HEAVY), modules & set(HEAVY)


def test_version_imports_nothing_heavy(tmp_path, isolated_home) -> None:
    modules = _imported_by(["--version"], {}, tmp_path)
    assert not modules & set(HEAVY), modules & set(HEAVY)
