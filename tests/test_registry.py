"""The model registry: built-in entries against vLLM 0.32.0, the models file, name resolution
and ``list``."""

from __future__ import annotations

import json
import re
import subprocess
import sys
import types
from pathlib import Path

import pytest
from click.testing import CliRunner

from cmw_vllm import model_registry, vllm_flags
from cmw_vllm.errors import ConfigError, NotFoundError, UsageError
from cmw_vllm.model_registry import (
    ModelEntry,
    all_entries,
    builtin_entries,
    find_entry,
    is_downloaded,
    load_user_entries,
    resolve_target,
)
from cmw_vllm.paths import user_models_file
from cmw_vllm.server_config import resolve_server_config
from cmw_vllm.vocab import validate_name

# vLLM 0.32.0's own lists, as `vllm serve --help` and its parser registries give them.
DATA = Path(__file__).parent / "data"
PARSERS_TXT = DATA / "parsers-0.32.0.txt"
BUILTINS = builtin_entries()


def _tsv_flags() -> set[str]:
    """The flags of vLLM 0.32.0's ``vllm serve --help``, as the package ships them."""
    lines = vllm_flags.SERVE_FLAGS_FILE.read_text(encoding="utf-8").splitlines()
    return {line.split("\t", 1)[0] for line in lines if line.strip()}


def _parsers(kind: str) -> set[str]:
    for line in PARSERS_TXT.read_text(encoding="utf-8").splitlines():
        if line.startswith(f"{kind}:"):
            return set(line.split(":", 1)[1].strip().split(","))
    raise AssertionError(f"{kind} missing from {PARSERS_TXT}")


def _flags_in(args: list[str]) -> list[str]:
    """The option names in a command line (values such as JSON or numbers skipped)."""
    return [a.split("=", 1)[0] for a in args if a.startswith("-") and not a[1:2].isdigit()]


def _write_models(text: str) -> Path:
    path = user_models_file()
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text, encoding="utf-8")
    return path


# --------------------------------------------------------------------------------------------
# Built-in entries against vLLM 0.32.0


@pytest.mark.parametrize("entry", BUILTINS, ids=lambda e: e.alias)
def test_every_launch_flag_exists_in_vllm(entry: ModelEntry) -> None:
    config = resolve_server_config(entry.model, entry_settings=entry.server_settings())
    flags = _flags_in(config.vllm_cli_args())
    unknown = sorted(set(flags) - _tsv_flags())
    assert flags and not unknown, f"{entry.alias} passes flags vLLM 0.32.0 lacks: {unknown}"


@pytest.mark.parametrize("entry", BUILTINS, ids=lambda e: e.alias)
def test_entry_resolves_to_a_valid_server_config(entry: ModelEntry) -> None:
    config = resolve_server_config(entry.model, entry_settings=entry.server_settings())
    assert config.name == entry.alias
    assert config.model == entry.model
    assert config.port == entry.port
    assert config.task == entry.task
    assert config.max_model_len == entry.max_model_len
    assert config.gpu_memory_utilization == entry.gpu_memory_utilization
    assert config.vllm_args == entry.vllm_args()


@pytest.mark.parametrize("entry", BUILTINS, ids=lambda e: e.alias)
def test_alias_is_a_valid_server_name(entry: ModelEntry) -> None:
    assert validate_name(entry.alias) == entry.alias


@pytest.mark.parametrize("entry", BUILTINS, ids=lambda e: e.alias)
def test_pooling_tasks_run_the_pooling_runner(entry: ModelEntry) -> None:
    args = entry.vllm_args()
    pooling = "--runner" in args and args[args.index("--runner") + 1] == "pooling"
    assert pooling == (entry.task != "generate")


@pytest.mark.parametrize(
    ("alias", "kind", "name"),
    [
        (e.alias, kind, name)
        for e in BUILTINS
        for kind, name in (
            ("TOOL_CALL_PARSERS", e.tool_call_parser),
            ("REASONING_PARSERS", e.reasoning_parser),
        )
        if name
    ],
)
def test_parser_names_are_registered_in_vllm(alias: str, kind: str, name: str) -> None:
    assert name in _parsers(kind), f"{alias}: {name} is not a vLLM 0.32.0 {kind} entry"


def test_auto_tool_choice_only_with_a_tool_parser() -> None:
    with_auto = [e for e in BUILTINS if "--enable-auto-tool-choice" in e.vllm_args()]
    assert with_auto
    for entry in with_auto:
        assert "--tool-call-parser" in entry.vllm_args(), entry.alias
    with pytest.raises(ValueError, match="needs tool_call_parser"):
        ModelEntry(alias="x", model="org/x", port=9999, enable_auto_tool_choice=True)


def test_ports_and_aliases_are_unique() -> None:
    ports = [e.port for e in BUILTINS]
    aliases = [e.alias.lower() for e in BUILTINS]
    assert len(set(ports)) == len(ports)
    assert len(set(aliases)) == len(aliases)


def test_registry_keeps_the_original_models_and_a_cpu_model() -> None:
    # The models issue 3 requires (the original tool's set plus a CPU-sized one).
    required = {
        "Qwen/Qwen3-30B-A3B-Instruct-2507",
        "openai/gpt-oss-20b",
        "mistralai/Ministral-3-14B-Instruct-2512",
        "ai-sage/GigaChat3-10B-A1.8B-bf16",
        "cerebras/Qwen3-Coder-REAP-25B-A3B",
        "Qwen/Qwen3-Embedding-0.6B",
        "Qwen/Qwen3-Embedding-4B",
        "Qwen/Qwen3-Embedding-8B",
        "Qwen/Qwen3-Reranker-0.6B",
        "BAAI/bge-reranker-v2-m3",
        "DiTy/cross-encoder-russian-msmarco",
        "Qwen/Qwen3Guard-Gen-0.6B",
        "Qwen/Qwen3-0.6B",
    }
    assert required <= {e.model for e in BUILTINS}
    assert find_entry("qwen").model == "Qwen/Qwen3-30B-A3B-Instruct-2507"


def test_every_entry_has_description_and_size() -> None:
    for entry in BUILTINS:
        assert entry.description.strip(), entry.alias
        assert entry.size_gb is not None and entry.size_gb > 0, entry.alias


def test_known_names_match_the_vllm_lists() -> None:
    assert _parsers("TOOL_CALL_PARSERS") == model_registry.TOOL_CALL_PARSERS
    assert _parsers("REASONING_PARSERS") == model_registry.REASONING_PARSERS


def test_qwen3_reranker_gets_the_sequence_classification_overrides() -> None:
    args = find_entry("qwen3-reranker-0.6b").vllm_args()
    overrides = json.loads(args[args.index("--hf-overrides") + 1])
    assert overrides["architectures"] == ["Qwen3ForSequenceClassification"]
    assert overrides["classifier_from_token"] == ["no", "yes"]
    assert overrides["is_original_qwen3_reranker"] is True


# --------------------------------------------------------------------------------------------
# Entry validation


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--task", "embed"], "--task no longer exists"),
        (["--max-num-seq", "8"], "did you mean --max-num-seqs"),
        (["--tool-call-parser", "hermes"], "set tool_call_parser instead"),
        (["--max-model-len=4096"], "set max_model_len instead"),
        (["--api-key", "k"], "set by cmw-vllm"),
        (["--help"], "print its help"),
    ],
)
def test_extra_args_are_checked(args: list[str], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        ModelEntry(alias="x", model="org/x", port=9999, extra_args=args)


def test_extra_args_accept_vllm_flags_with_values() -> None:
    entry = ModelEntry(
        alias="x",
        model="org/x",
        port=9999,
        extra_args=["--max_num_seqs", "8", "--enable-prefix-caching", "--seed=-1"],
    )
    assert entry.vllm_args()[-4:] == ["--max_num_seqs", "8", "--enable-prefix-caching", "--seed=-1"]


def test_generate_task_cannot_use_the_pooling_runner() -> None:
    with pytest.raises(ValueError, match="task 'generate'"):
        ModelEntry(alias="x", model="org/x", port=9999, runner="pooling")
    with pytest.raises(ValueError, match="needs runner 'pooling'"):
        ModelEntry(alias="x", model="org/x", port=9999, task="embed", runner="generate")


# --------------------------------------------------------------------------------------------
# The user's models file


def test_no_models_file_means_builtins_only() -> None:
    assert load_user_entries() == []
    assert list(all_entries()) == [e.alias for e in BUILTINS]


def test_models_file_overrides_builtin_fieldwise() -> None:
    path = _write_models("[models.QWEN]\nport = 9000\nmax_model_len = 8192\n")
    builtin = find_entry("qwen", {e.alias: e for e in BUILTINS})
    entry = all_entries()["qwen"]
    assert (entry.port, entry.max_model_len) == (9000, 8192)
    assert entry.model == builtin.model
    assert entry.vllm_args() == builtin.vllm_args()
    assert entry.source == str(path)


def test_models_file_adds_an_entry() -> None:
    path = _write_models(
        "[models.my-llama]\n"
        'model = "meta-llama/Llama-3.1-8B-Instruct"\n'
        'task = "generate"\n'
        "port = 8200\n"
        "max_model_len = 16384\n"
        'tool_call_parser = "llama3_json"\n'
        "enable_auto_tool_choice = true\n"
        'extra_args = ["--max-num-seqs", "16"]\n'
    )
    entry = find_entry("My-Llama")
    assert entry is not None and entry.source == str(path)
    assert find_entry("meta-llama/Llama-3.1-8B-Instruct") == entry
    config = resolve_server_config(entry.model, entry_settings=entry.server_settings())
    assert config.name == "my-llama"
    assert config.port == 8200
    assert config.vllm_args == [
        "--enable-auto-tool-choice",
        "--tool-call-parser",
        "llama3_json",
        "--max-num-seqs",
        "16",
    ]
    assert list(all_entries())[-1] == "my-llama"


def test_models_file_syntax_error_names_file_and_line() -> None:
    path = _write_models('[models.a]\nmodel = "org/a"\nport = = 1\n')
    with pytest.raises(ConfigError) as exc:
        all_entries()
    assert str(path) in exc.value.message
    assert "line 3" in exc.value.message


@pytest.mark.parametrize(
    ("body", "line", "words"),
    [
        ('colour = "red"', 3, ["models.qwen.colour", "unknown key"]),
        ('port = "8100"', 3, ["models.qwen.port", "integer", "'8100'"]),
        ('tool_call_parser = "hermess"', 3, ["hermess", "did you mean: hermes"]),
        ('extra_args = ["--task", "embed"]', 3, ["models.qwen.extra_args", "--task"]),
        ("gpu_memory_utilization = 1.5", 3, ["gpu_memory_utilization", "1.5"]),
        ('alias = "other"', 3, ["models.qwen.alias", "table name"]),
    ],
)
def test_models_file_bad_value_names_file_line_and_key(
    body: str, line: int, words: list[str]
) -> None:
    path = _write_models(f"# overrides\n[models.qwen]\n{body}\n")
    with pytest.raises(ConfigError) as exc:
        load_user_entries()
    message = exc.value.message
    assert message.startswith(f"{path}, line {line}: "), message
    for word in words:
        assert word in message


def test_models_file_new_alias_needs_model_and_port() -> None:
    _write_models('[models.mine]\ntask = "embed"\n')
    with pytest.raises(ConfigError, match="'mine' is not a built-in alias"):
        load_user_entries()


def test_models_file_may_reuse_a_builtin_port(running: dict[str, list[str]]) -> None:
    from cmw_vllm.cli import cli

    _write_models('[models.mine]\nmodel = "org/mine"\nport = 8000\n'
                  '[models.other]\nmodel = "org/other"\nport = 8000\n')
    entries = all_entries()
    assert entries["mine"].port == entries["qwen"].port == entries["other"].port == 8000
    result = CliRunner().invoke(cli, ["list", "--json"])
    assert result.exit_code == 0, result.output
    ports = {r["alias"]: r["port"] for r in json.loads(result.output)["models"]}
    assert ports["mine"] == ports["qwen"] == 8000


def test_two_servers_on_one_port_are_refused_at_start(fake_engine: Path,
                                                      model_dir: Path) -> None:
    from tests.conftest import free_port
    from tests.conftest import run_cli as run

    port = free_port()
    _write_models(f'[models.one]\nmodel = "{model_dir}"\nport = {port}\n'
                  f'[models.two]\nmodel = "{model_dir}"\nport = {port}\n')
    code, _out, err = run("start", "one")
    assert code == 0, err
    code, _out, err = run("start", "two")
    assert code == 6
    assert f"port {port} is in use by cmw-vllm server 'one'" in err


def _readme_toml_examples() -> list[str]:
    root = Path(__file__).parent.parent
    pages = [root / "README.md", *sorted((root / "docs").glob("*.md"))]
    text = "\n".join(page.read_text(encoding="utf-8") for page in pages)
    return re.findall(r"^```toml\n(.*?)^```", text, flags=re.M | re.S)


def test_readme_models_file_examples_load(running: dict[str, list[str]]) -> None:
    from cmw_vllm.cli import cli

    examples = _readme_toml_examples()
    assert examples, "README.md and docs/ show no models.toml example"
    for example in examples:
        path = _write_models(example)
        entries = load_user_entries(path)
        assert all(e.source == str(path) for e in entries)
        result = CliRunner().invoke(cli, ["list", "--json"])
        assert result.exit_code == 0, result.output
        listed = {r["alias"] for r in json.loads(result.output)["models"]}
        assert {e.alias for e in entries} <= listed
        adapters = re.findall(r"^\[adapters\.([\w.-]+)\]", example, flags=re.M)
        assert entries or adapters, example
        assert set(adapters) <= {a["name"] for a in json.loads(result.output)["adapters"]}


def test_models_file_unknown_top_level_key() -> None:
    _write_models('[model.x]\nmodel = "org/x"\n')
    with pytest.raises(ConfigError, match="unknown top-level key 'model'"):
        load_user_entries()


# --------------------------------------------------------------------------------------------
# resolve_target


def test_resolve_alias_case_insensitive() -> None:
    target = resolve_target("QWEN3-0.6B")
    entry = find_entry("qwen3-0.6b")
    assert (target.alias, target.model, target.is_local) == ("qwen3-0.6b", entry.model, False)
    assert target.settings == entry.server_settings()


def test_resolve_hf_id_of_a_registry_model() -> None:
    target = resolve_target("qwen/qwen3-embedding-0.6b")
    assert target.alias == "qwen3-embedding-0.6b"
    assert target.model == "Qwen/Qwen3-Embedding-0.6B"
    assert target.settings["vllm_args"][:2] == ["--runner", "pooling"]


def test_resolve_unknown_hf_id_has_no_entry() -> None:
    target = resolve_target("meta-llama/Llama-3.1-8B-Instruct")
    assert target.model == "meta-llama/Llama-3.1-8B-Instruct"
    assert target.entry is None and target.alias is None and target.settings == {}


@pytest.mark.parametrize("bad", ["a/b/c", "org/-name", "org/na--me", "org/" + "x" * 100])
def test_resolve_rejects_invalid_hf_ids(bad: str) -> None:
    with pytest.raises(UsageError, match="not a valid Hugging Face id"):
        resolve_target(bad)


def test_resolve_local_directory(tmp_path: Path) -> None:
    model_dir = tmp_path / "cwd" / "my-model"
    model_dir.mkdir()
    for spelling in ("./my-model", str(model_dir), "my-model"):
        target = resolve_target(spelling)
        assert target.is_local and target.entry is None and target.settings == {}
        assert target.model == str(model_dir.resolve())


def test_alias_wins_over_same_named_directory_unless_written_as_path(tmp_path: Path) -> None:
    (tmp_path / "cwd" / "qwen").mkdir()
    assert resolve_target("qwen").alias == "qwen"
    assert resolve_target("./qwen").is_local


def test_resolve_missing_path_and_file(tmp_path: Path) -> None:
    with pytest.raises(NotFoundError, match="no such directory"):
        resolve_target("./nope")
    (tmp_path / "cwd" / "weights.bin").write_bytes(b"x")
    with pytest.raises(UsageError, match="not a directory"):
        resolve_target("./weights.bin")


def test_unknown_name_suggests_close_aliases() -> None:
    with pytest.raises(UsageError) as exc:
        resolve_target("qwne")
    message = exc.value.message
    assert message.startswith("unknown model 'qwne'; did you mean: ")
    suggestions = message.split("did you mean: ", 1)[1].rstrip("?").split(", ")
    assert suggestions[0] == "qwen"
    assert all(find_entry(s) is not None for s in suggestions)
    assert exc.value.hint and "cmw-vllm list" in exc.value.hint


def test_unknown_name_without_close_match_has_no_suggestion() -> None:
    with pytest.raises(UsageError) as exc:
        resolve_target("zzzzzzzz")
    assert exc.value.message == "unknown model 'zzzzzzzz'"


def test_resolve_uses_models_file_entries() -> None:
    _write_models('[models.mine]\nmodel = "org/mine"\nport = 8300\ntask = "embed"\n')
    target = resolve_target("mine")
    assert target.settings["port"] == 8300
    assert target.settings["vllm_args"] == ["--runner", "pooling"]


# --------------------------------------------------------------------------------------------
# The Hugging Face cache


def _fake_snapshot(hub: Path, model: str, with_file: bool = True) -> None:
    snapshot = hub / f"models--{model.replace('/', '--')}" / "snapshots" / "0123abcd"
    snapshot.mkdir(parents=True)
    if with_file:
        (snapshot / "config.json").write_text("{}")


def test_is_downloaded_reads_the_hf_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    hub = tmp_path / "hf-home" / "hub"  # HF_HOME points at tmp_path/hf-home (conftest)
    _fake_snapshot(hub, "org/full")
    _fake_snapshot(hub, "org/empty", with_file=False)
    assert is_downloaded("org/full")
    assert not is_downloaded("org/empty")
    assert not is_downloaded("org/absent")
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "elsewhere"))
    assert not is_downloaded("org/full")


# --------------------------------------------------------------------------------------------
# cmw-vllm list


@pytest.fixture
def running(monkeypatch: pytest.MonkeyPatch) -> dict[str, list[str]]:
    """Stand in for the server manager: which managed servers serve which model."""
    servers: dict[str, list[str]] = {}
    fake = types.ModuleType("cmw_vllm.server_manager")
    fake.running_models = lambda: servers  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, "cmw_vllm.server_manager", fake)
    return servers


def test_list_json(tmp_path: Path, running: dict[str, list[str]]) -> None:
    from cmw_vllm.cli import cli

    _fake_snapshot(tmp_path / "hf-home" / "hub", "Qwen/Qwen3-0.6B")
    running["Qwen/Qwen3-0.6B"] = ["qwen3-0.6b", "chat-b"]
    path = _write_models('[models.mine]\nmodel = "org/mine"\nport = 8300\n')

    result = CliRunner().invoke(cli, ["list", "--json"])

    assert result.exit_code == 0, result.output
    rows = json.loads(result.output)["models"]
    assert [r["alias"] for r in rows] == [*(e.alias for e in BUILTINS), "mine"]
    keys = ["alias", "model", "task", "port", "size_gb", "downloaded", "running", "source"]
    assert all(list(r)[: len(keys)] == keys for r in rows)
    by_alias = {r["alias"]: r for r in rows}
    assert by_alias["qwen3-0.6b"]["downloaded"] is True
    assert by_alias["qwen3-0.6b"]["running"] == ["chat-b", "qwen3-0.6b"]
    assert by_alias["qwen"]["downloaded"] is False and by_alias["qwen"]["running"] == []
    assert by_alias["mine"]["source"] == str(path)
    assert by_alias["qwen3-embedding-0.6b"]["task"] == "embed"


def test_list_table_when_not_a_terminal(running: dict[str, list[str]]) -> None:
    from cmw_vllm.cli import cli

    running["openai/gpt-oss-20b"] = ["gpt-oss-20b"]
    result = CliRunner().invoke(cli, ["list"])

    assert result.exit_code == 0, result.output
    lines = result.output.splitlines()
    assert lines[0].split() == ["ALIAS", "MODEL", "TASK", "PORT", "SIZE", "DOWNLOADED", "RUNNING"]
    row = next(line.split() for line in lines if line.startswith("gpt-oss-20b "))
    assert row[1] == "openai/gpt-oss-20b" and row[-1] == "gpt-oss-20b"
    assert len(lines) == 1 + len(BUILTINS)


def test_list_with_broken_models_file_exits_2(
    running: dict[str, list[str]], capsys: pytest.CaptureFixture[str]
) -> None:
    from cmw_vllm.cli import main

    _write_models("[models.qwen]\nport = [\n")
    with pytest.raises(SystemExit) as exc:
        main(["list"])
    assert exc.value.code == 2
    assert "models.toml: invalid TOML" in capsys.readouterr().err


def test_registry_core_imports_no_cli_or_hub_modules() -> None:
    code = (
        "import sys, cmw_vllm.model_registry as m; m.all_entries(); m.is_downloaded('a/b'); "
        "print(sorted(x for x in ('click', 'rich', 'huggingface_hub', 'requests') "
        "if x in sys.modules))"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True
    ).stdout
    assert out.strip() == "[]"


_PARSE_WITH_VLLM = """
import json, sys
from vllm.entrypoints.launchers.cli_args import make_arg_parser
from vllm.utils.argparse_utils import FlexibleArgumentParser

parser = make_arg_parser(FlexibleArgumentParser())
keys = ("model", "port", "max_model_len", "runner", "convert", "hf_overrides",
        "tool_call_parser", "reasoning_parser", "enable_auto_tool_choice")
out = {}
for alias, argv in json.load(sys.stdin).items():
    ns = vars(parser.parse_args(argv))
    out[alias] = {key: ns[key] for key in keys}
print(json.dumps(out))
"""


@pytest.mark.vllm
def test_vllm_own_parser_accepts_every_entry(engine_python: str) -> None:
    argvs, configs = {}, {}
    for entry in BUILTINS:
        config = resolve_server_config(entry.model, entry_settings=entry.server_settings())
        configs[entry.alias] = config
        argvs[entry.alias] = ["--model", config.model, *config.vllm_cli_args()]
    proc = subprocess.run(
        [engine_python, "-c", _PARSE_WITH_VLLM],
        input=json.dumps(argvs),
        capture_output=True,
        text=True,
        timeout=240,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    parsed = json.loads(proc.stdout.strip().splitlines()[-1])
    for entry in BUILTINS:
        got = parsed[entry.alias]
        assert got["model"] == entry.model
        assert got["port"] == entry.port
        assert got["max_model_len"] == entry.max_model_len
        assert got["runner"] == ("pooling" if entry.task != "generate" else "auto")
        assert got["convert"] == (entry.convert or "auto")
        assert (got["hf_overrides"] or None) == entry.hf_overrides
        assert got["tool_call_parser"] == entry.tool_call_parser
        assert (got["reasoning_parser"] or None) == entry.reasoning_parser
        assert got["enable_auto_tool_choice"] == entry.enable_auto_tool_choice


def test_models_file_entry_with_a_local_path(tmp_path: Path) -> None:
    model_dir = tmp_path / "cwd" / "weights"
    model_dir.mkdir()
    _write_models('[models.local]\nmodel = "./weights"\nport = 8400\n')
    target = resolve_target("local")
    assert target.is_local and target.alias == "local"
    assert target.model == str(model_dir.resolve())
    assert is_downloaded("./weights") and not is_downloaded("./missing")


def test_served_names_default_to_model_and_name_unless_set() -> None:
    config = resolve_server_config("org/m", cli={"name": "small"})
    args = config.vllm_cli_args()
    at = args.index("--served-model-name")
    assert args[at + 1:at + 3] == ["org/m", "small"]
    assert config.served_name() == "org/m"
    own = resolve_server_config("org/m", cli={"name": "small", "served_model_name": "mine"})
    args = own.vllm_cli_args()
    at = args.index("--served-model-name")
    assert args[at + 1] == "mine" and "small" not in args
    assert own.served_names() == ["mine"]


def test_builtin_registry_is_read_on_first_use_only() -> None:
    code = (
        "import sys, cmw_vllm.model_registry as m; before = 'tomllib' in sys.modules; "
        "n = len(m.builtin_entries()); print(before, 'tomllib' in sys.modules, n)"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True
    ).stdout
    assert out.split() == ["False", "True", str(len(BUILTINS))]
    assert model_registry.BUILTIN_FILE.name == "registry.toml"
    assert all(e.source == "built-in" for e in BUILTINS)
