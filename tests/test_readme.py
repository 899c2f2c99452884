"""Every example in README.md and docs/*.md is run or checked, so they cannot drift from
the program; every relative link in them leads to a file and heading that exist.

Code blocks are found automatically (indented and fenced); a new example is picked up
without touching this file. What each kind of example gets:

- ``cmw-vllm ...`` commands are parsed by the real command (options, choices, arguments),
  and then, in page order (README.md first, then docs/*.md by name):
  - **run** against the stand-in engine (tests/fake_vllm) in a temp state dir: everything
    that needs no real model (``status``, ``stop``, ``restart``, ``logs``, ``list``,
    ``gpus``, ``disk``, ``setup``, ``start ./DIR``, ``--help``). Servers an example names
    are started first on the stand-in, ports are swapped for free ones (the machine is
    shared; defaults too), ``--watch`` and ``-f`` get Ctrl-C after a second (exit 130).
  - **dry-checked** where a real model is needed: ``start`` of a registry alias or Hub id
    (the built-in models need a GPU and a Hub download). The alias must exist and the
    ``vllm serve`` command line it resolves to must use only flags vLLM 0.32 knows.
  - **parsed only** for ``download``, ``verify`` and ``estimate`` of a Hub model (they need
    the Hub); local directories are run.
- ``bash FILE`` must name a file of the repository that bash can parse (``demo.sh`` and
  ``.ci/run`` install vLLM from PyPI for minutes, so they are not run here);
  ``python bench/...`` scripts must exist and answer ``--help``; ``pip install`` is skipped
  (it would change the test environment). Other programs are left alone.
- File examples: a ```` ```toml ```` block is a ``models.toml``; it must load and its
  aliases appear in ``cmw-vllm list``. ``ini``/``systemd`` blocks must parse as unit files,
  ``json`` as JSON, ``dotenv`` as ``KEY=value`` lines; ``text``/``console`` blocks are
  output and not run. A fenced block in another language fails until this file learns how
  to check it.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest
from click.testing import CliRunner

from cmw_vllm.cli import cli
from tests.conftest import REPO_ROOT, free_port, spawn_cli
from tests.shell_examples import cmw_vllm_commands, simple_commands

README = REPO_ROOT / "README.md"
DOCS_DIR = REPO_ROOT / "docs"
PAGES = [README, *sorted(DOCS_DIR.glob("*.md"))]  # the README and the pages it links to
DEMO = REPO_ROOT / "scripts" / "demo.sh"
DEMO_MODEL_DIR = re.search(r'MODEL_DIR="\$\{MODEL_DIR:-\$PWD/([^}]+)\}"',
                           DEMO.read_text(encoding="utf-8")).group(1)  # type: ignore[union-attr]


@dataclass
class Block:
    """One code block of the README or a docs page."""

    file: str  # the page, relative to the repository root
    line: int  # 1-based line of its first line
    lang: str | None  # the fence's language; None for an indented block
    text: str


def code_blocks(text: str, file: str = "README.md") -> list[Block]:
    """Fenced blocks (with their language) and indented blocks (4 spaces after a blank)."""
    blocks: list[Block] = []
    lines = text.splitlines()
    i = 0
    while i < len(lines):
        line = lines[i]
        fence = re.match(r"^\s*```(\w*)", line)
        if fence:
            end = i + 1
            while end < len(lines) and not lines[end].lstrip().startswith("```"):
                end += 1
            blocks.append(Block(file, i + 2, fence.group(1) or "", "\n".join(lines[i + 1:end])))
            i = end + 1
            continue
        if line.startswith("    ") and line.strip() and (i == 0 or not lines[i - 1].strip()):
            end = i
            while end < len(lines) and (lines[end].startswith("    ") or not lines[end].strip()):
                end += 1
            body = [x[4:] for x in lines[i:end]]
            blocks.append(Block(file, i + 1, None, "\n".join(body).rstrip()))
            i = end
            continue
        i += 1
    return blocks


def shell_lines(block: Block) -> list[tuple[int, str]]:
    """The block's command lines (continuations joined), each with its line in the page."""
    out: list[tuple[int, str]] = []
    pending = ""
    start = block.line
    for offset, line in enumerate(block.text.splitlines()):
        if not pending:
            start = block.line + offset
        if line.rstrip().endswith("\\"):
            pending += line.rstrip()[:-1] + " "
            continue
        full = (pending + line).strip()
        pending = ""
        if full and not full.startswith("#"):
            out.append((start, full))
    return out


BLOCKS = [block for page in PAGES for block in
          code_blocks(page.read_text(encoding="utf-8"), page.relative_to(REPO_ROOT).as_posix())]
SHELL_BLOCKS = [b for b in BLOCKS if b.lang in (None, "", "sh", "bash", "shell")]
OUTPUT_LANGS = ("text", "console", "output")  # what a command prints: nothing to run
FILE_BLOCKS = [b for b in BLOCKS if b not in SHELL_BLOCKS and b.lang not in OUTPUT_LANGS]


@dataclass
class Example:
    """One ``cmw-vllm`` command of the README or a docs page."""

    where: str  # page:line
    env: dict[str, str]
    args: list[str]

    @property
    def id(self) -> str:
        return f"{self.where}: cmw-vllm {shlex.join(self.args)}"[:80]


EXAMPLES = [Example(f"{b.file}:{line}", env, args) for b in SHELL_BLOCKS
            for line, text in shell_lines(b) for env, args in cmw_vllm_commands(text)]


def _without_env(words: list[str]) -> list[str]:
    while words and re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*=.*", words[0]):
        words = words[1:]
    return words


OTHER_COMMANDS = [(f"{b.file}:{line}", _without_env(words)) for b in SHELL_BLOCKS
                  for line, text in shell_lines(b) for words in simple_commands(text)
                  if _without_env(words)[:1] != ["cmw-vllm"]]


def test_the_readme_has_examples_to_check() -> None:
    assert len(EXAMPLES) >= 10, [e.id for e in EXAMPLES]
    commands = {e.args[0] for e in EXAMPLES if e.args}
    assert {"start", "status"} <= commands
    assert FILE_BLOCKS, "the models.toml example is gone?"


# --------------------------------------------------------------------------------------------
# cmw-vllm commands


def _context(args: list[str]):
    command = cli.get_command(None, args[0])  # type: ignore[arg-type]
    assert command is not None, f"no command {args[0]!r}"
    return command, command.make_context(args[0], list(args[1:]))


def _is_local(target: str) -> bool:
    return target.startswith((".", "/", "~"))


def _mode(args: list[str]) -> tuple[str, str]:
    """(run | dry | parse, why) for one example."""
    if "--help" in args or "-h" in args:
        return "run", "help"
    command = args[0]
    _, ctx = _context(args)
    target = ctx.params.get("target") or ctx.params.get("model") or ctx.params.get("name")
    if command == "start" and not _is_local(str(target)):
        return "dry", "the registry's models need a GPU and a Hub download"
    if command in ("download", "verify", "estimate") and not _is_local(str(target)):
        return "parse", "needs the Hugging Face Hub"
    if command == "ray":
        return "parse", "needs Ray and other machines (tests/test_ray_real.py runs it)"
    return "run", "the stand-in engine does it"


def _server_names(args: list[str]) -> list[str]:
    """Servers an example expects to exist (they are started on the stand-in first)."""
    if args[0] not in ("status", "stop", "restart", "logs", "test"):
        return []
    _, ctx = _context(args)
    names = ctx.params.get("names") or ([ctx.params["name"]] if ctx.params.get("name") else [])
    return list(names) or ["example"]  # `status`, `stop --all`: some server to show


def _swap_ports(args: list[str]) -> list[str]:
    """Free ports for the README's (the machine is shared), also where a default applies."""
    split = args.index("--") if "--" in args else len(args)
    out = list(args[:split])
    for i, word in enumerate(out[:-1]):
        if word == "--port":
            out[i + 1] = str(free_port())
    if out[0] in ("start", "gateway") and "--port" not in out and "--help" not in out:
        out += ["--port", str(free_port())]
    return out + list(args[split:])


@pytest.fixture
def stand_in(fake_engine: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """The current directory with ./my-model and .cache/tiny-model (where scripts/demo.sh
    makes its model), stub models, and a small CPU KV cache; systemd units (``enable``) go
    to temp dirs, never to the user's."""
    monkeypatch.setenv("VLLM_CPU_KVCACHE_SPACE", "1")
    monkeypatch.setenv("XDG_CONFIG_HOME", str(Path.cwd() / "config"))
    monkeypatch.setenv("CMW_VLLM_SYSTEM_UNIT_DIR", str(Path.cwd() / "system-units"))
    for model in (Path.cwd() / DEMO_MODEL_DIR, Path.cwd() / "my-model"):
        model.mkdir(parents=True)
        (model / "config.json").write_text(json.dumps({"architectures": ["Qwen2ForCausalLM"]}))
    return model


def _ensure_running(name: str, model: Path) -> None:
    from cmw_vllm.server_manager import ServerManager
    from cmw_vllm.server_record import record_names

    if name in record_names() and ServerManager().get_status(name).running:
        return
    if name == "gateway":  # the gateway's default name: `stop gateway` stops a gateway
        args = ["gateway", "-d", "--port", str(free_port())]
    else:
        args = ["start", str(model), "--name", name, "--port", str(free_port())]
    result = CliRunner().invoke(cli, args)
    assert result.exit_code == 0, result.output


def _run_until_ctrl_c(args: list[str]) -> tuple[int, str]:
    import signal
    import time

    proc = spawn_cli(*args, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    time.sleep(1.5)
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=20)
    return proc.returncode, out + err


def _dry_start(args: list[str], env: dict[str, str], monkeypatch: pytest.MonkeyPatch) -> None:
    from cmw_vllm.cli_lifecycle import _build_config
    from cmw_vllm.model_registry import all_entries
    from cmw_vllm.vllm_flags import normalize_flag, serve_flags

    for key, value in env.items():
        monkeypatch.setenv(key, value)
    _, ctx = _context(args)
    params = dict(ctx.params)
    target = params.pop("target")
    if "/" not in target:
        assert target in all_entries(), f"{target!r} is no registry alias"
    options = {k: params.get(k) for k in ("name", "host", "tensor_parallel_size",
                                          "gpu_memory_utilization", "max_model_len", "dtype",
                                          "gpus", "served_model_name", "task")}
    options["port"] = int(params["port"]) if params.get("port") else None
    config = _build_config(target, options, tuple(params.get("vllm_args") or ()))
    unknown = [t for t in config.vllm_cli_args()
               if normalize_flag(t) and normalize_flag(t) not in serve_flags()]
    assert not unknown, f"vLLM 0.32 has no {unknown}"


@pytest.mark.parametrize("example", EXAMPLES, ids=lambda e: e.id)
def test_readme_command(example: Example, stand_in: Path,
                        monkeypatch: pytest.MonkeyPatch) -> None:
    args = example.args
    assert args, f"{example.where}: `cmw-vllm` without a command"
    if "--help" not in args and "-h" not in args:
        _context(args)  # parses: options, choices and arguments all exist
    mode, why = _mode(args)
    if mode == "parse":
        return  # parsed above; running needs the Hub
    if mode == "dry":
        _dry_start(args, example.env, monkeypatch)
        return
    for name in _server_names(args):
        _ensure_running(name, stand_in)
    if args[0] == "disable":  # each example runs alone: enable what it disables
        enabled = CliRunner().invoke(cli, ["enable", args[1]])
        assert enabled.exit_code == 0, enabled.output
    args = _swap_ports(args)
    if "--watch" in args or "-w" in args or (args[0] == "logs" and ("-f" in args
                                                                    or "--follow" in args)):
        code, output = _run_until_ctrl_c(args)
        assert code == 130, output
        assert "Traceback" not in output
        return
    result = CliRunner().invoke(cli, args, env=example.env or None)
    assert result.exit_code == 0, f"{example.where} ({why}): {result.output}"
    assert "Traceback" not in result.output
    if "--json" in args:
        json.loads(result.stdout)


# --------------------------------------------------------------------------------------------
# other commands and file examples


@pytest.mark.parametrize("where,words", OTHER_COMMANDS,
                         ids=[f"{where}: {shlex.join(w)}"[:70] for where, w in OTHER_COMMANDS])
def test_readme_other_command(where: str, words: list[str]) -> None:
    program = words[0]
    if program == "bash":
        script = REPO_ROOT / words[1]
        assert script.is_file(), f"{where}: no {words[1]}"
        assert subprocess.run(["bash", "-n", str(script)], check=False).returncode == 0
    elif program.endswith(("python", "python3")) and len(words) > 1 and words[1].endswith(".py"):
        script = REPO_ROOT / words[1]
        assert script.is_file(), f"{where}: no {words[1]}"
        done = subprocess.run([sys.executable, str(script), "--help"], capture_output=True,
                              text=True, timeout=60, check=False)
        assert done.returncode == 0, done.stderr
        for flag in (w.split("=")[0] for w in words[2:] if w.startswith("--")):
            assert flag in done.stdout, f"{where}: {words[1]} has no {flag}"
    else:  # pip install and other programs: not ours to run here
        pytest.skip(f"{program}: not a command of this repository")


@pytest.mark.parametrize("block", FILE_BLOCKS, ids=lambda b: f"{b.file}:{b.line}: {b.lang}")
def test_readme_file_example(block: Block, isolated_home: Path) -> None:
    check_file_example(block, isolated_home)


def test_file_example_checks_catch_broken_files(isolated_home: Path) -> None:
    import configparser

    check_file_example(Block("x.md", 1, "ini", "[Service]\nExecStart=x\nEnvironment=A=1\n"
                                       "Environment=B=2"), isolated_home)
    with pytest.raises(configparser.Error):
        check_file_example(Block("x.md", 1, "ini", "ExecStart=x"), isolated_home)
    with pytest.raises(json.JSONDecodeError):
        check_file_example(Block("x.md", 1, "json", "{'a': 1}"), isolated_home)
    with pytest.raises(AssertionError):
        check_file_example(Block("x.md", 1, "dotenv", "HF_HOME = /x"), isolated_home)
    with pytest.raises(AssertionError):  # an alias that does not load
        check_file_example(Block("x.md", 1, "toml", "[models.x]\nport = 'no'"), isolated_home)
    with pytest.raises(pytest.fail.Exception):
        check_file_example(Block("x.md", 1, "yaml", "a: 1"), isolated_home)


def check_file_example(block: Block, isolated_home: Path) -> None:
    """Parse one file example by its language (see the module docstring)."""
    if block.lang in ("ini", "systemd"):  # a unit file: sections of key=value lines
        import configparser

        parser = configparser.ConfigParser(strict=False, interpolation=None)
        parser.read_string(block.text)
        assert parser.sections(), f"{block.file} line {block.line}: no [section]"
        return
    if block.lang == "json":
        json.loads(block.text)
        return
    if block.lang in ("dotenv", "env"):
        for line in block.text.splitlines():
            assert not line.strip() or line.lstrip().startswith("#") or re.fullmatch(
                r"\s*(export\s+)?[A-Za-z_][A-Za-z0-9_]*=.*", line), line
        return
    if block.lang != "toml":
        pytest.fail(f"{block.file} line {block.line}: no check for ```{block.lang} blocks yet; "
                    "add one to tests/test_readme.py (test_readme_file_example)")
    import tomllib

    data = tomllib.loads(block.text)
    aliases, adapters = set(data.get("models", {})), set(data.get("adapters", {}))
    assert aliases or adapters
    isolated_home.mkdir(parents=True, exist_ok=True)
    (isolated_home / "models.toml").write_text(block.text)
    result = CliRunner().invoke(cli, ["list", "--json"])
    assert result.exit_code == 0, result.output
    listed = json.loads(result.stdout)
    assert aliases <= {m["alias"] for m in listed["models"]}
    assert adapters <= {a["name"] for a in listed["adapters"]}


def test_readme_status_json_keys_are_the_real_ones(fake_engine: Path, model_dir: Path) -> None:
    text = (DOCS_DIR / "commands.md").read_text(encoding="utf-8")
    start = text.index("`status --json` prints")
    documented = set(re.findall(r"[a-z_]+", text[start:text.index("\n\n", start)]))
    result = CliRunner().invoke(cli, ["start", str(model_dir), "--name", "keys", "--port",
                                      str(free_port())])
    assert result.exit_code == 0, result.output
    server = json.loads(CliRunner().invoke(cli, ["status", "--json"]).stdout)["servers"][0]
    keys = set(server) | set(server.get("load") or {})
    assert keys <= documented, f"docs/commands.md lacks {sorted(keys - documented)}"


def test_readme_names_the_tasks_that_test_and_start_accept() -> None:
    from cmw_vllm.vocab import TASKS

    text = README.read_text(encoding="utf-8")
    row = next(line for line in text.splitlines() if line.startswith("| `test NAME"))
    assert set(re.findall(r"`(\w+)`", row)) >= set(TASKS), row
    for page in PAGES:
        for task in re.findall(r"--task[ =]([a-z]\w*)", page.read_text(encoding="utf-8")):
            assert task in TASKS, f"{page.name}: --task {task} is not one of {TASKS}"  # not T


# --------------------------------------------------------------------------------------------
# links between the pages, and what the pages must list

LINK = re.compile(r"(?<!!)\[[^\]\n]*\]\(([^)\s]+)\)")


def heading_anchors(text: str) -> set[str]:
    """The anchors GitHub gives a page's headings (code blocks left out)."""
    anchors: set[str] = set()
    in_fence = False
    for line in text.splitlines():
        if line.lstrip().startswith("```"):
            in_fence = not in_fence
            continue
        heading = None if in_fence else re.match(r"^#{1,6}\s+(.*?)\s*$", line)
        if heading:
            anchors.add(re.sub(r"[^\w\- ]", "", heading.group(1).lower()).replace(" ", "-"))
    return anchors


def broken_links(page: Path, text: str) -> list[str]:
    """Relative links of ``text`` (the page at ``page``) whose file or heading is missing."""
    prose = re.sub(r"^\s*```.*?^\s*```", "", text, flags=re.M | re.S)  # fenced blocks
    prose = "\n".join(x for x in prose.splitlines() if not x.startswith("    "))  # indented
    prose = re.sub(r"`[^`\n]*`", "", prose)  # code spans
    broken = []
    for target in LINK.findall(prose):
        if re.match(r"[a-z]+:", target):  # https:, mailto:: not checked here
            continue
        path, _, anchor = target.partition("#")
        file = (page.parent / path).resolve() if path else page
        if not file.exists():
            broken.append(f"{target}: no file {path}")
        elif anchor and file.suffix == ".md" and anchor not in heading_anchors(
                file.read_text(encoding="utf-8")):
            broken.append(f"{target}: no heading #{anchor} in {file.name}")
    return broken


@pytest.mark.parametrize("page", PAGES, ids=lambda p: p.relative_to(REPO_ROOT).as_posix())
def test_relative_links_lead_somewhere(page: Path) -> None:
    assert broken_links(page, page.read_text(encoding="utf-8")) == []


def test_link_check_catches_a_missing_file_or_heading() -> None:
    text = ("[ok](docs/serving.md#restart-policies) [self](#quick-start) `[code](nope.md)`\n"
            "[gone](docs/nope.md) [no heading](docs/serving.md#nope) [web](https://x.org/a)\n")
    assert broken_links(README, text) == ["docs/nope.md: no file docs/nope.md",
                                          "docs/serving.md#nope: no heading #nope in serving.md"]


def test_every_page_is_linked_from_the_readme() -> None:
    text = README.read_text(encoding="utf-8")
    for page in PAGES[1:]:
        assert f"](docs/{page.name})" in text, f"README.md does not link to docs/{page.name}"


def test_docs_list_every_key_a_models_file_may_set() -> None:
    from cmw_vllm.model_registry import (
        _ADAPTER_NOT_IN_FILE,
        _NOT_IN_FILE,
        AdapterEntry,
        ModelEntry,
    )

    text = (DOCS_DIR / "models.md").read_text(encoding="utf-8")
    models_part, _sep, adapters_part = text.partition("| adapter key |")
    for part, model, not_in_file in ((models_part, ModelEntry, _NOT_IN_FILE),
                                     (adapters_part, AdapterEntry, _ADAPTER_NOT_IN_FILE)):
        documented = set(re.findall(r"^\| `(\w+)` \|", part, flags=re.M))
        allowed = set(model.model_fields) - set(not_in_file)
        assert documented == allowed, (f"docs/models.md lacks {sorted(allowed - documented)}, "
                                       f"lists unknown {sorted(documented - allowed)}")


# --------------------------------------------------------------------------------------------
# after the demo: the README's next commands


def test_the_readme_serves_the_demo_model_as_the_demo_does() -> None:
    demo = DEMO.read_text(encoding="utf-8")
    text = README.read_text(encoding="utf-8")
    assert "source .venv/bin/activate" in text and "`.venv/bin/cmw-vllm`" in text
    starts = [e.args for e in EXAMPLES if e.where.startswith("README.md:")
              and e.args[:2] == ["start", DEMO_MODEL_DIR]]
    assert starts, f"README.md does not start the demo's model ({DEMO_MODEL_DIR})"
    port = re.search(r'PORT="\$\{PORT:-(\d+)\}"', demo).group(1)  # type: ignore[union-attr]
    demo_start = next(line for line in demo.splitlines() if line.startswith("$CMW start "))
    for args in starts:  # the demo's name, port and context, so the demo's words apply
        assert args[args.index("--port") + 1] == port, args
        for option in ("--name", "--max-model-len"):
            value = args[args.index(option) + 1]
            assert re.search(rf"{option} {value}(\s|$)", demo_start), (option, value, demo_start)


def _stub(path: Path, body: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(f"#!/bin/sh\n{body}\n")
    path.chmod(0o755)


def _run_demo(root: Path, cpu_build: bool, env: dict[str, str] | None = None) -> str:
    """scripts/demo.sh in a copy of the checkout whose installer, cmw-vllm, curl and vLLM
    interpreter are stand-ins (the real ones take minutes and a download)."""
    (root / "scripts").mkdir(parents=True, exist_ok=True)
    (root / "scripts" / "demo.sh").write_text(DEMO.read_text(encoding="utf-8"))
    _stub(root / "scripts" / "install.sh", "exit 0")
    _stub(root / ".venv" / "bin" / "cmw-vllm", 'echo "cmw-vllm $*" >> calls')
    _stub(root / ".venv-vllm" / "bin" / "python", f"exit {0 if cpu_build else 1}")
    _stub(root / "bin" / "curl", "exit 0")
    model = root / ".cache" / "tiny-model"
    model.mkdir(parents=True, exist_ok=True)
    (model / "config.json").write_text("{}")
    base = {k: v for k, v in os.environ.items()
            if k not in ("CMW_VLLM_PYTHON", "VLLM_CPU_KVCACHE_SPACE", "MODEL_DIR", "PORT")}
    base["PATH"] = f"{root / 'bin'}:{base.get('PATH', '/usr/bin:/bin')}"
    done = subprocess.run(["bash", str(root / "scripts" / "demo.sh")], cwd=root, text=True,
                          capture_output=True, timeout=60, env={**base, **(env or {})},
                          check=False)
    assert done.returncode == 0, done.stderr
    return done.stdout


def test_the_demo_keeps_the_cpu_kv_cache_in_dotenv_for_the_next_commands(
        tmp_path: Path) -> None:
    from dotenv import dotenv_values

    out = _run_demo(tmp_path, cpu_build=True)
    assert "Wrote VLLM_CPU_KVCACHE_SPACE=1 to ./.env" in out
    assert dotenv_values(tmp_path / ".env") == {"VLLM_CPU_KVCACHE_SPACE": "1"}
    assert "cmw-vllm start .cache/tiny-model --name tiny" not in out  # absolute in the hint
    assert f"cmw-vllm start {tmp_path}/.cache/tiny-model --name tiny" in out
    _run_demo(tmp_path, cpu_build=True, env={"VLLM_CPU_KVCACHE_SPACE": "4"})
    assert dotenv_values(tmp_path / ".env") == {"VLLM_CPU_KVCACHE_SPACE": "1"}  # kept, once


def test_the_demo_leaves_dotenv_alone_on_the_gpu_build_and_keeps_what_is_there(
        tmp_path: Path) -> None:
    from dotenv import dotenv_values

    _run_demo(tmp_path / "gpu", cpu_build=False)
    assert not (tmp_path / "gpu" / ".env").exists()
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / ".env").write_text("HF_HOME=/data/hf\nexport VLLM_CPU_KVCACHE_SPACE=8")
    _run_demo(mine, cpu_build=True)
    assert dotenv_values(mine / ".env") == {"HF_HOME": "/data/hf", "VLLM_CPU_KVCACHE_SPACE": "8"}
    _run_demo(tmp_path / "shell", cpu_build=True, env={"VLLM_CPU_KVCACHE_SPACE": "3"})
    assert dotenv_values(tmp_path / "shell" / ".env") == {"VLLM_CPU_KVCACHE_SPACE": "3"}
