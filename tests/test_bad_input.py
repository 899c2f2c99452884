"""Bad input over every command: one clear line on stderr, a documented exit code, no
traceback, and nothing changed on disk."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest
from click.testing import CliRunner

from cmw_vllm.cli import cli

MODEL = "{model}"  # replaced by a local model directory

# (id, argv, extra env, models.toml text or None, exit code, text expected on stderr)
CASES: list[tuple[str, list[str], dict[str, str], str | None, int, str]] = [
    ("unknown-alias", ["start", "qwne"], {}, None, 2, "did you mean"),
    ("port-zero", ["start", MODEL, "--port", "0"], {}, None, 2, "invalid --port"),
    ("port-too-big", ["start", MODEL, "--port", "70000"], {}, None, 2, "invalid --port"),
    ("port-not-int", ["start", MODEL, "--port", "http"], {}, None, 2, "invalid --port"),
    ("util-zero", ["start", MODEL, "--gpu-memory-utilization", "0"], {}, None, 2,
     "invalid --gpu-memory-utilization"),
    ("util-1.5", ["start", MODEL, "--gpu-memory-utilization", "1.5"], {}, None, 2,
     "invalid --gpu-memory-utilization"),
    ("negative-len", ["start", MODEL, "--max-model-len", "-5"], {}, None, 2,
     "invalid --max-model-len"),
    ("zero-len", ["start", MODEL, "--max-model-len", "0"], {}, None, 2,
     "invalid --max-model-len"),
    ("unknown-dtype", ["start", MODEL, "--dtype", "int4"], {}, None, 2, "'int4' is not one of"),
    ("tp-zero", ["start", MODEL, "-tp", "0"], {}, None, 2, "invalid --tensor-parallel-size"),
    ("name-traversal", ["start", MODEL, "--name", "../evil"], {}, None, 2,
     "invalid --name"),
    ("name-slash", ["start", MODEL, "--name", "a/b"], {}, None, 2, "invalid --name"),
    ("name-shell", ["start", MODEL, "--name", "x;rm -rf ~"], {}, None, 2, "invalid --name"),
    ("bad-gpus", ["start", MODEL, "--gpus", "first"], {}, None, 2, "invalid --gpus"),
    ("env-not-pair", ["start", MODEL, "-e", "NOEQUALS"], {}, None, 2, "KEY=VALUE"),
    ("env-secret", ["start", MODEL, "-e", "VLLM_API_KEY=k"], {}, None, 2, "export VLLM_API_KEY"),
    ("bad-host", ["start", MODEL, "--host", "a b"], {}, None, 2, "invalid --host"),
    ("key-on-cmdline", ["start", MODEL, "--", "--api-key", "k"], {}, None, 2,
     "VLLM_API_KEY"),
    ("managed-flag", ["start", MODEL, "--", "--port", "1"], {}, None, 2, "--port is set by"),
    ("timeout-negative", ["start", MODEL, "--timeout", "-1"], {}, None, 2, "--timeout"),
    ("test-no-wait", ["start", MODEL, "--test", "--no-wait"], {}, None, 2, "--test needs"),
    ("missing-dir", ["start", "./no-such-model-dir"], {}, None, 9, "no-such-model-dir"),
    ("bad-hf-id", ["start", "a/b/c"], {}, None, 2, "a/b/c"),
    ("env-util", ["start", MODEL], {"CMW_VLLM_GPU_MEMORY_UTILIZATION": "2"}, None, 2,
     "invalid CMW_VLLM_GPU_MEMORY_UTILIZATION"),
    ("env-len", ["start", MODEL], {"CMW_VLLM_MAX_MODEL_LEN": "lots"}, None, 2,
     "invalid CMW_VLLM_MAX_MODEL_LEN: must be an integer"),
    ("log-level", ["status"], {"LOG_LEVEL": "bogus"}, None, 2, "LOG_LEVEL='bogus'"),
    ("env-timeout", ["start", MODEL], {"CMW_VLLM_START_TIMEOUT": "soon"}, None, 2,
     "CMW_VLLM_START_TIMEOUT"),
    ("stop-nothing", ["stop"], {}, None, 2, "name a server"),
    ("stop-all-and-name", ["stop", "--all", "x"], {}, None, 2, "not both"),
    ("stop-traversal", ["stop", "../x"], {}, None, 2, "invalid server name"),
    ("status-traversal", ["status", "../../etc"], {}, None, 2, "invalid server name"),
    ("status-watch-json", ["status", "--watch", "--json"], {}, None, 2, "don't go together"),
    ("logs-unknown", ["logs", "nosuch"], {}, None, 9, "no log for server 'nosuch'"),
    ("logs-traversal", ["logs", "../x"], {}, None, 2, "invalid server name"),
    ("logs-negative", ["logs", "x", "-n", "-1"], {}, None, 2, "-n"),
    ("restart-unknown", ["restart", "nosuch"], {}, None, 3, "no managed server named"),
    ("models-syntax", ["list"], {}, "[models.x\nmodel = 1\n", 2, "models.toml"),
    ("models-bad-key", ["list"], {}, '[models.x]\nmodel = "a/b"\nport = 9000\nwat = 1\n', 2,
     "wat"),
    ("models-bad-type", ["start", "x"], {}, '[models.x]\nmodel = "a/b"\nport = "high"\n', 2,
     "port"),
    ("download-unknown", ["download", "qwne"], {}, None, 2, "did you mean"),
    ("estimate-unknown", ["estimate", "qwne"], {}, None, 2, "did you mean"),
    ("verify-missing", ["verify", "./no-such-dir"], {}, None, 9, "no-such-dir"),
    ("test-unknown", ["test", "nosuch"], {}, None, 3, "nosuch"),
    ("unknown-option", ["gpus", "--bogus"], {}, None, 2, "No such option"),
]


def _snapshot(root: Path) -> dict[str, str]:
    if not root.exists():
        return {}
    out = {}
    for f in sorted(root.rglob("*")):
        rel = str(f.relative_to(root))
        out[rel] = hashlib.sha256(f.read_bytes()).hexdigest() if f.is_file() else "dir"
    return out


@pytest.mark.parametrize(
    ("argv", "env", "models_toml", "code", "message"),
    [c[1:] for c in CASES],
    ids=[c[0] for c in CASES],
)
def test_bad_input(argv: list[str], env: dict[str, str], models_toml: str | None, code: int,
                   message: str, tmp_path: Path, isolated_home: Path, fake_engine: Path,
                   monkeypatch: pytest.MonkeyPatch) -> None:
    model = tmp_path / "model"
    model.mkdir()
    (model / "config.json").write_text(json.dumps({"architectures": ["Qwen2ForCausalLM"]}))
    if models_toml is not None:
        isolated_home.mkdir(parents=True, exist_ok=True)
        (isolated_home / "models.toml").write_text(models_toml)
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    before = _snapshot(tmp_path)
    args = [a.replace(MODEL, str(model)) for a in argv]
    result = CliRunner().invoke(cli, args)
    assert result.exit_code == code, (result.stdout, result.stderr)
    err_lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert message in result.stderr
    assert "Traceback" not in result.stderr + result.stdout
    assert err_lines and len(err_lines) <= 5, err_lines  # a line or two, not a dump
    assert _snapshot(tmp_path) == before


def test_stop_of_an_unknown_name_with_a_broken_models_file(isolated_home: Path) -> None:
    """Whether the name is an entry is unknown: the error of `list`, not "not running"."""
    isolated_home.mkdir(parents=True, exist_ok=True)
    (isolated_home / "models.toml").write_text("[models.x\nmodel = 1\n")
    listed = CliRunner().invoke(cli, ["list"])
    result = CliRunner().invoke(cli, ["stop", "tinyy"])
    assert result.exit_code == listed.exit_code == 2, (result.stdout, result.stderr)
    assert result.stderr == listed.stderr
    assert "models.toml: invalid TOML" in result.stderr and result.stdout == ""


def test_table_is_big_enough() -> None:
    assert len(CASES) >= 30
    assert len({c[0] for c in CASES}) == len(CASES)


def test_unreadable_env_file(tmp_path: Path, isolated_home: Path) -> None:
    (Path.cwd() / ".env").mkdir()  # a directory where the file should be
    result = CliRunner().invoke(cli, ["status"])
    assert result.exit_code == 2
    assert "cannot read env file" in result.stderr


def test_env_file_never_overrides_the_shell(isolated_home: Path,
                                            monkeypatch: pytest.MonkeyPatch) -> None:
    other = isolated_home.parent / "from-dotenv"
    (Path.cwd() / ".env").write_text(f"CMW_VLLM_HOME={other}\nCMW_VLLM_HOST=10.1.2.3\n")
    monkeypatch.delenv("CMW_VLLM_HOST", raising=False)
    from cmw_vllm.settings import load_env_file

    load_env_file()
    import os

    assert os.environ["CMW_VLLM_HOME"] == str(isolated_home)  # the shell's value stays
    assert os.environ["CMW_VLLM_HOST"] == "10.1.2.3"  # unset in the shell: .env fills it
    monkeypatch.delenv("CMW_VLLM_HOST")


def _env_file_vars(monkeypatch: pytest.MonkeyPatch, *names: str) -> None:
    """Let monkeypatch remove what load_env_file puts into os.environ after the test."""
    for name in names:
        monkeypatch.setenv(name, "placeholder")
        monkeypatch.delenv(name)


def test_bad_values_in_env_file_name_the_file(tmp_path: Path, isolated_home: Path,
                                              fake_engine: Path,
                                              monkeypatch: pytest.MonkeyPatch) -> None:
    env_file = Path.cwd() / ".env"
    _env_file_vars(monkeypatch, "LOG_LEVEL", "CMW_VLLM_GPU_MEMORY_UTILIZATION")
    env_file.write_text("LOG_LEVEL=bogus\n")
    result = CliRunner().invoke(cli, ["status"])
    assert result.exit_code == 2
    assert f"LOG_LEVEL='bogus' (set in {env_file}) is not a log level" in result.stderr
    monkeypatch.delenv("LOG_LEVEL")
    env_file.write_text("CMW_VLLM_GPU_MEMORY_UTILIZATION=2\n")
    model = tmp_path / "model"
    model.mkdir()
    result = CliRunner().invoke(cli, ["start", str(model)])
    assert result.exit_code == 2
    assert (f"invalid CMW_VLLM_GPU_MEMORY_UTILIZATION (set in {env_file}): "
            in result.stderr), result.stderr
    assert not (isolated_home / "servers").exists()  # nothing was launched


def test_empty_values_in_env_file_are_unset(isolated_home: Path,
                                            monkeypatch: pytest.MonkeyPatch) -> None:
    from cmw_vllm.settings import load_env_file

    _env_file_vars(monkeypatch, "HF_ENDPOINT", "VLLM_API_KEY", "CMW_VLLM_STOP_TIMEOUT")
    (Path.cwd() / ".env").write_text("HF_ENDPOINT=\nVLLM_API_KEY=\nCMW_VLLM_STOP_TIMEOUT=7\n")
    load_env_file()
    import os

    assert "HF_ENDPOINT" not in os.environ and "VLLM_API_KEY" not in os.environ
    assert os.environ["CMW_VLLM_STOP_TIMEOUT"] == "7"


def test_env_example_leaves_optional_variables_commented_out() -> None:
    from dotenv import dotenv_values

    example = Path(__file__).resolve().parent.parent / ".env.example"
    values = dotenv_values(example)
    assert values, "the example sets the defaults it documents"
    assert {k: v for k, v in values.items() if not v} == {}
    text = example.read_text()
    for optional in ("HF_HOME", "HF_HUB_OFFLINE", "HF_ENDPOINT", "HF_TOKEN", "VLLM_API_KEY"):
        assert f"# {optional}=" in text, optional  # documented, but commented out


# Every command that has --json, failing: (id, argv, extra env, models.toml text, exit code).
JSON_CASES: list[tuple[str, list[str], dict[str, str], str | None, int]] = [
    ("start", ["start", "./nope", "--json"], {}, None, 9),
    ("stop", ["stop", "../x", "--json"], {}, None, 2),
    ("restart", ["restart", "nosuch", "--json"], {}, None, 3),
    ("status", ["status", "--watch", "--json"], {}, None, 2),
    ("enable", ["enable", "nosuch", "--json"], {}, None, 9),
    ("list", ["list", "--json"], {}, "[models.x\nmodel = 1\n", 2),
    ("download-offline", ["download", "Qwen/Qwen3-0.6B", "--json"],
     {"HF_HUB_OFFLINE": "1"}, None, 8),
    ("verify", ["verify", "./nope", "--json"], {}, None, 9),
    ("gpus", ["gpus", "--json"], {"LOG_LEVEL": "bogus"}, None, 2),
    ("disk", ["disk", "--json", "--bogus"], {}, None, 2),
    ("setup", ["setup", "--json"], {"LOG_LEVEL": "bogus"}, None, 2),
    ("estimate", ["estimate", "qwne", "--json"], {}, None, 2),
    ("test", ["test", "nope", "--json"], {}, None, 3),
    ("gateway", ["gateway", "--json"], {}, None, 2),
    ("ray-start", ["ray", "start", "--json"], {}, None, 2),
    ("ray-status", ["-v", "ray", "status", "--json", "--bogus"], {}, None, 2),
    ("export-k8s", ["export", "k8s", "nosuch", "--json"], {}, None, 2),
    ("export-compose", ["export", "compose", "nope", "--json"], {}, None, 2),
]


@pytest.mark.parametrize(("argv", "env", "models_toml", "code"), [c[1:] for c in JSON_CASES],
                         ids=[c[0] for c in JSON_CASES])
def test_json_errors_are_one_object_on_stdout(
        argv: list[str], env: dict[str, str], models_toml: str | None, code: int,
        isolated_home: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    if models_toml is not None:
        isolated_home.mkdir(parents=True, exist_ok=True)
        (isolated_home / "models.toml").write_text(models_toml)
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    result = CliRunner().invoke(cli, argv)
    assert result.exit_code == code, (result.stdout, result.stderr)
    data = json.loads(result.stdout)  # one object, nothing else
    assert data["exit_code"] == code
    assert data["error"] and data["error"] in result.stderr  # the line on stderr stays
    assert "hint" in data
    assert "Traceback" not in result.stderr + result.stdout


def test_every_command_with_json_has_an_error_case() -> None:
    import click

    ctx = click.Context(cli)

    def with_json(cmd: click.Command, path: str) -> list[str]:
        if isinstance(cmd, click.Group):
            return [n for sub in cmd.list_commands(ctx)
                    for n in with_json(cmd.get_command(ctx, sub), f"{path} {sub}".strip())]
        has = any(isinstance(p, click.Option) and "--json" in p.opts for p in cmd.params)
        return [path] if has else []

    covered = {" ".join(a for a in c[1] if not a.startswith("-") and a not in ("nope", "nosuch",
               "qwne", "../x", "./nope", "Qwen/Qwen3-0.6B")) for c in JSON_CASES}
    assert set(with_json(cli, "")) <= covered


def test_json_error_only_for_json(isolated_home: Path) -> None:
    result = CliRunner().invoke(cli, ["test", "nope"])
    assert result.exit_code == 3 and result.stdout == ""
    # --json as the value of --prompt asks for no JSON
    result = CliRunner().invoke(cli, ["test", "nope", "--prompt", "--json"])
    assert result.exit_code == 3 and result.stdout == ""


def test_a_command_prints_one_object_also_when_it_fails(isolated_home: Path,
                                                        fake_engine: Path) -> None:
    """`test` of a server that is not healthy prints its own failure object, and only it."""
    from cmw_vllm.server_record import RECORD_FORMAT

    servers = isolated_home / "servers"
    servers.mkdir(parents=True, exist_ok=True)
    (servers / "gone.json").write_text(json.dumps({  # a process that is not there: stale
        "format": RECORD_FORMAT, "name": "gone", "pid": 999999, "create_time": 1.0,
        "supervisor_pid": 999999, "supervisor_create_time": 1.0, "pgid": 999999,
        "host": "127.0.0.1", "port": 1, "model": "m", "served_model_name": "m",
        "task": "generate", "base_url": "http://127.0.0.1:1", "command": ["x"],
        "log_path": str(isolated_home / "x.log"), "started_at": 1.0, "config": {}}))
    result = CliRunner().invoke(cli, ["test", "gone", "--json"])
    assert result.exit_code != 0
    data = json.loads(result.stdout)
    assert data["name"] == "gone" and data["ok"] is False
    assert data["exit_code"] == result.exit_code


@pytest.mark.parametrize("command", ["status", "test", "stop"])
def test_a_mistyped_server_name_gets_the_close_names(command: str, isolated_home: Path) -> None:
    servers = isolated_home / "servers"
    servers.mkdir(parents=True)
    for name in ("tiny", "other"):  # records of processes that are gone: stale
        (servers / f"{name}.json").write_text(json.dumps({
            "format": 1, "name": name, "pid": 999999, "create_time": 1.0,
            "supervisor_pid": 999999, "supervisor_create_time": 1.0, "pgid": 999999,
            "host": "127.0.0.1", "port": 1, "model": "m", "served_model_name": "m",
            "task": "generate", "base_url": "http://127.0.0.1:1", "command": ["x"],
            "log_path": str(isolated_home / "x.log"), "started_at": 1.0, "config": {}}))
    result = CliRunner().invoke(cli, [command, "tinyy"])
    assert result.exit_code == 3, (result.stdout, result.stderr)
    assert "'tinyy'; did you mean: tiny?" in result.stderr
    assert "other" not in result.stderr


def test_start_test_json_failure_is_one_object_with_the_exit_code(
        fake_engine: Path, model_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from cmw_vllm import inference_check
    from cmw_vllm.errors import InferenceCheckError
    from tests.conftest import free_port

    def refused(*_: object, **__: object) -> None:
        raise InferenceCheckError("the reply was empty", hint="see the log")

    monkeypatch.setattr(inference_check, "run_check", refused)
    result = CliRunner().invoke(cli, ["start", str(model_dir), "--name", "st", "--port",
                                      str(free_port()), "--test", "--json"])
    assert result.exit_code == 1, result.stderr
    data = json.loads(result.stdout)  # the start's object, and only it
    assert data["name"] == "st" and data["state"] == "healthy"
    assert data["test"] == {"ok": False, "error": "the reply was empty", "hint": "see the log",
                            "exit_code": 1}
    assert "Error: the reply was empty" in result.stderr
