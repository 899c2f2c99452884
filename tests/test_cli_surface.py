"""The CLI's surface: every command is registered, fast paths import little."""

from __future__ import annotations

import importlib
import json
import re
import subprocess
import sys

import click
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
         "httpx", "httpx2", "filelock", "dotenv", "psutil", "aiohttp"]


def _imported_by(args: list[str], env_extra: dict[str, str], tmp_path) -> set[str]:
    """Every module (dotted names) a fresh ``cmw-vllm ARGS`` has imported when it ends."""
    code = (
        "import sys, runpy\n"
        f"sys.argv = ['cmw-vllm', *{args!r}]\n"
        "try:\n"
        "    runpy.run_module('cmw_vllm', run_name='__main__')\n"
        "except SystemExit:\n"
        "    pass\n"
        "import json\n"
        "print(json.dumps(sorted(sys.modules)))\n"
    )
    import os

    env = {**os.environ, **env_extra}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         env=env, cwd=tmp_path, check=False).stdout
    return set(json.loads(out.strip().splitlines()[-1]))


def _top_level(modules: set[str]) -> set[str]:
    return {m.split(".")[0] for m in modules}


def test_status_without_servers_imports_nothing_heavy(tmp_path, isolated_home) -> None:
    modules = _top_level(_imported_by(["status", "--json"], {}, tmp_path))
    assert "click" in modules  # the probe itself works
    assert not modules & set(HEAVY), modules & set(HEAVY)


def test_version_imports_nothing_heavy(tmp_path, isolated_home) -> None:
    modules = _top_level(_imported_by(["--version"], {}, tmp_path))
    assert not modules & set(HEAVY), modules & set(HEAVY)


# What `status --json` loads of the package: the command's module and the read side of the
# state (record, processes, state), not start/stop (server_manager, cli_lifecycle) nor
# start's options (cli_multinode). Each module costs its load time on every call, so a new
# one here is a choice: make it here, in the open.
STATUS_MODULES = {
    "cmw_vllm", "cmw_vllm.cli", "cmw_vllm.cli_common", "cmw_vllm.cli_status",
    "cmw_vllm.errors", "cmw_vllm.logging", "cmw_vllm.paths", "cmw_vllm.process_group",
    "cmw_vllm.server_record", "cmw_vllm.server_status", "cmw_vllm.settings", "cmw_vllm.vocab",
}
# Standard-library modules status has no use for, each a measurable part of its start-up
# (signal alone builds three enums when imported).
STATUS_NEVER = {"signal", "subprocess", "socket", "concurrent.futures", "asyncio", "http.client",
                "urllib.request", "tomllib", "shlex"}


def test_status_loads_only_its_own_part_of_the_package(tmp_path, isolated_home) -> None:
    modules = _imported_by(["status", "--json"], {}, tmp_path)
    ours = {m for m in modules if m == "cmw_vllm" or m.startswith("cmw_vllm.")}
    assert ours == STATUS_MODULES, (sorted(ours - STATUS_MODULES),
                                    sorted(STATUS_MODULES - ours))
    assert not modules & STATUS_NEVER, sorted(modules & STATUS_NEVER)


def test_version_loads_only_the_entry_point(tmp_path, isolated_home) -> None:
    modules = _imported_by(["--version"], {}, tmp_path)
    ours = {m for m in modules if m == "cmw_vllm" or m.startswith("cmw_vllm.")}
    assert ours == {"cmw_vllm", "cmw_vllm.cli", "cmw_vllm.errors"}, sorted(ours)


# --------------------------------------------------------------------------------------------
# --help texts: every option explained, JSON keys listed, examples that work


def _help(*command: str) -> str:
    result = CliRunner().invoke(cli, [*command, "--help"], terminal_width=100)
    assert result.exit_code == 0, result.output
    return result.output


@pytest.mark.parametrize("command", sorted(LAZY_COMMANDS))
def test_every_option_has_help_and_a_named_value(command: str) -> None:
    cmd = cli.get_command(None, command)  # type: ignore[arg-type]
    assert cmd is not None
    for param in cmd.params:
        if isinstance(param, click.Option) and not param.hidden:
            assert param.help, f"{command} {param.opts}: no help text"
    assert " TEXT" not in _help(command).split("--port")[-1][:12]


def _example_lines(command: str) -> list[list[str]]:
    """The `cmw-vllm ...` examples of a command's --help, split like a shell would."""
    from tests.shell_examples import cmw_vllm_commands

    text = _help(command).split("Examples:")[1].split("\n\n")[0]
    return [words for line in text.splitlines() for _, words in cmw_vllm_commands(line)]


@pytest.mark.parametrize("command", sorted(LAZY_COMMANDS))
def test_help_examples_parse_and_name_real_aliases(command: str) -> None:
    from cmw_vllm.model_registry import all_entries

    aliases = set(all_entries())
    examples = _example_lines(command)
    assert examples
    for words in examples:
        sub = cli.get_command(None, words[0])  # type: ignore[arg-type]
        assert sub is not None, words
        ctx = sub.make_context(words[0], list(words[1:]), resilient_parsing=False)
        target = next(iter(ctx.params.get("target", ctx.params.get("model", ()))
                           and [ctx.params.get("target") or ctx.params.get("model")]), None)
        if isinstance(target, str) and "/" not in target and not target.startswith("."):
            assert target in aliases, f"{words}: {target!r} is no registry alias"


def _json_section(command: str) -> set[str]:
    text = _help(command)
    section = text[text.index("JSON"):].split("\n\n")[0]
    return set(re.findall(r"[a-z_]+", section))


def _keys(data: object) -> set[str]:
    if isinstance(data, dict):
        return set(data) | {k for v in data.values() for k in _keys(v)}
    if isinstance(data, list):
        return {k for v in data for k in _keys(v)}
    return set()


def test_json_keys_are_listed_in_help_and_shapes_agree(fake_engine, model_dir) -> None:
    from tests.conftest import free_port, run_cli

    port = str(free_port())
    outputs = {}
    code, out, err = run_cli("start", str(model_dir), "--name", "js", "--port", port, "--json")
    assert code == 0, err
    outputs["start"] = json.loads(out)
    code, out, _ = run_cli("status", "--json")
    outputs["status"] = json.loads(out)
    code, out, _ = run_cli("test", "js", "--json")  # pass or fail: its keys are what counts
    assert code in (0, 1), out
    outputs["test"] = json.loads(out)
    code, out, _ = run_cli("restart", "js", "--json")
    outputs["restart"] = json.loads(out)
    code, out, _ = run_cli("list", "--json")
    outputs["list"] = json.loads(out)
    code, out, _ = run_cli("stop", "js", "--json")
    assert code == 0
    outputs["stop"] = json.loads(out)
    for command, data in outputs.items():
        assert isinstance(data, dict), f"{command} --json must print one object"
        keys = _keys(data)
        if command == "list":
            keys -= {k for m in data["models"] for k in ("running",)}  # listed in prose
        missing = keys - _json_section(command)
        assert not missing, f"`{command} --help` does not list {sorted(missing)}"
    # Several servers: under "servers"; one server: that server's object, status's names.
    assert [s["name"] for s in outputs["stop"]["servers"]] == ["js"]
    assert outputs["status"]["servers"][0]["name"] == "js"
    for command in ("start", "restart", "test"):
        assert outputs[command]["name"] == "js"
    shared = {"name", "state", "model", "pid", "port", "url", "log"}
    assert shared <= set(outputs["start"]) and shared <= set(outputs["status"]["servers"][0])


# --------------------------------------------------------------------------------------------
# typos and vLLM flags given without `--`


def test_vllm_flag_before_the_separator_says_to_put_it_after() -> None:
    result = CliRunner().invoke(cli, ["start", "./tiny", "--enforce-eager"])
    assert result.exit_code == 2
    assert "--force" not in result.stderr
    assert "--enforce-eager is a vLLM flag" in result.stderr
    assert "cmw-vllm start ./tiny -- --enforce-eager" in result.stderr
    result = CliRunner().invoke(cli, ["start", "--kv-cache-dtype", "fp8", "./tiny", "--port",
                                      "8000", "--max_num_seqs=4", "--", "--seed", "1"])
    assert result.exit_code == 2
    assert ("cmw-vllm start ./tiny --port 8000 -- --kv-cache-dtype fp8 --max_num_seqs=4 "
            "--seed 1") in result.stderr


@pytest.mark.parametrize("typo", ["--forc", "--forse", "--enforce", "--fore"])
def test_a_typo_never_suggests_force(typo: str) -> None:
    for command in (["start", "./tiny"], ["download", "x"]):
        result = CliRunner().invoke(cli, [*command, typo])
        assert result.exit_code == 2
        assert "No such option" in result.stderr
        assert "'--force'" not in result.stderr


def test_vllm_flag_list_ships_with_the_package() -> None:
    from cmw_vllm.vllm_flags import normalize_flag, serve_flags

    flags = serve_flags()
    assert len(flags) > 400
    assert flags["--enforce-eager"] is False and flags["--max-num-seqs"] is True
    assert flags["-tp"] is True
    assert normalize_flag("--max_num_seqs=4") == "--max-num-seqs"
    assert normalize_flag("-O3") == "-O" and normalize_flag("-1") is None


def _items(data: dict, key: str) -> set[str]:
    return {k for item in data.get(key) or [] for k in item}


def test_json_keys_of_the_machine_and_model_commands_are_listed_in_help(
    tiny_model, fake_engine, monkeypatch: pytest.MonkeyPatch
) -> None:
    from tests.conftest import run_cli
    from tests.test_gpu_info import FakeGpu, make_fake_nvml

    gib = 1024**3
    monkeypatch.setitem(sys.modules, "pynvml", make_fake_nvml(
        [FakeGpu("NVIDIA H100", 80 * gib, 30 * gib, procs=[(1, 20 * gib)])]))
    monkeypatch.setenv("VLLM_CPU_KVCACHE_SPACE", "1")
    cases = {
        "disk": (["disk", "--json"],
                 lambda d: set(d) | _items(d, "locations") | _items(d, "cached_models")),
        "gpus": (["gpus", "--json"],
                 lambda d: set(d) | _items(d, "gpus")
                 | {k for g in d["gpus"] for k in _items(g, "processes")}),
        "setup": (["setup", "--json"],
                  lambda d: set(d) | _items(d, "checks") | _items(d, "orphans")),
        "estimate": (["estimate", str(tiny_model), "--json"], set),
        "verify": (["verify", str(tiny_model), "--json"],
                   lambda d: set(d) | _items(d, "problems")),
    }
    for command, (args, keys_of) in cases.items():
        code, out, err = run_cli(*args)
        assert out.strip(), f"{command}: {err}"
        missing = keys_of(json.loads(out)) - _json_section(command)
        assert not missing, f"`{command} --help` does not list {sorted(missing)}"
