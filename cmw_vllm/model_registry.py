"""The model registry: built-in entries, the user's models file, and what a name means.

A name on the command line (``start``, ``download``, ``verify``) is one of:

- a registry alias (``qwen``, case-insensitive), giving that entry's tuned settings;
- a Hugging Face id (``org/name``), with the entry whose ``model`` it is, if any;
- a local directory (``./my-model``, ``/data/llama``), served as it is.

The built-in entries, tuned for vLLM 0.32.0 on one GPU, are data: ``cmw_vllm/data/registry.toml``,
in the same schema as the user's ``<state dir>/models.toml``, which adds or overrides entries
(see :func:`load_user_entries`). Both go through one loader and one validation.
Precedence for the settings of a server is documented in :mod:`cmw_vllm.server_config`.
"""

from __future__ import annotations

import difflib
import functools
import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import (
    AfterValidator,
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    field_validator,
    model_validator,
)

from cmw_vllm import paths
from cmw_vllm.errors import ConfigError, NotFoundError, UsageError
from cmw_vllm.server_config import MANAGED_FLAGS, Name
from cmw_vllm.vllm_flags import serve_flags
from cmw_vllm.vocab import (
    PORT_MAX,
    PORT_MIN,
    Convert,
    Dtype,
    RestartPolicy,
    Runner,
    Task,
    is_hf_id,
    looks_like_path,
)

VLLM_VERSION = "0.32.0"
BUILTIN_SOURCE = "built-in"
BUILTIN_FILE = Path(__file__).parent / "data" / "registry.toml"


def _words(text: str) -> frozenset[str]:
    return frozenset(text.split())


# Parser names registered in vLLM 0.32.0; a test keeps these in step with vLLM's own list
# (tests/data/parsers-0.32.0.txt).
TOOL_CALL_PARSERS = _words(
    """
apertus cohere_command3 cohere_command4 deepseek_v3 deepseek_v31 deepseek_v32 deepseek_v4
deepseek_v41 dots ernie45 functiongemma gemma4 gigachat3 glm45 glm47 granite granite-20b-fc
granite4 hermes hf hunyuan_a13b hy_v3 hy_v4 inkling internlm jamba k2_horizon kimi_k2
kimi_k3 lfm2 ling3 llama3_json llama4_json llama4_pythonic longcat mimo minicpm5 minimax_m2
minimax_m3 mistral muse_glimmer olmo3 openai phi4_mini_json plamo3 poolside_v1 pythonic
qwen3_coder qwen3_json qwen3_xml seed_oss step3 step3p5 xlam
"""
)
REASONING_PARSERS = _words(
    """
cohere_command3 cohere_command4 deepseek_r1 deepseek_v3 deepseek_v4 deepseek_v41 ernie45
gemma4 glm45 glm47 granite granite_thinking_parser hf holo2 hunyuan_a13b hy_v3 hy_v4 inkling
k2_horizon kimi_k2 kimi_k3 ling3 mimo minicpmv minimax_m2 minimax_m2_append_think minimax_m3
mistral muse_glimmer nemotron_v3 olmo3 openai_gptoss plamo3 poolside_v1 qwen3 seed_oss step3
step3p5
"""
)

# Flags an entry sets through its own keys; repeating them in extra_args would be ambiguous.
_FIELD_FLAGS = {
    "--tool-call-parser": "tool_call_parser",
    "--reasoning-parser": "reasoning_parser",
    "--enable-auto-tool-choice": "enable_auto_tool_choice",
    "--no-enable-auto-tool-choice": "enable_auto_tool_choice",
    "--runner": "runner",
    "--convert": "convert",
    "--hf-overrides": "hf_overrides",
    "--trust-remote-code": "trust_remote_code",
    "--no-trust-remote-code": "trust_remote_code",
}
# ServerConfig fields that travel outside vllm_args, by the flag a user might try instead.
_CONFIG_FLAGS = {
    "--max-model-len": "max_model_len",
    "--gpu-memory-utilization": "gpu_memory_utilization",
    "--dtype": "dtype",
    "--tensor-parallel-size": "tensor_parallel_size",
    "-tp": "tensor_parallel_size",
    "--port": "port",
    "--model": "model",
}

def _flag_of(token: str) -> str | None:
    """The option a command-line token names (``--x=1`` -> ``--x``), or None for a value."""
    if not token.startswith("-") or re.fullmatch(r"-\d.*", token) or token == "-":
        return None
    flag = token.split("=", 1)[0]
    # vLLM's parser accepts --max_model_len for --max-model-len.
    return flag[:2] + flag[2:].replace("_", "-") if flag.startswith("--") else flag


def check_extra_args(args: list[str]) -> list[str]:
    """Check extra ``vllm serve`` arguments against the flags vLLM 0.32.0 accepts.

    Args:
        args: Tokens as they would appear on the command line (``["--max-num-seqs", "64"]``).

    Returns:
        ``args`` unchanged.

    Raises:
        ValueError: A flag is unknown, set by cmw-vllm itself, or has its own entry key.
    """
    for token in args:
        flag = _flag_of(token)
        if flag is None:
            continue
        if flag == "--task":
            raise ValueError(
                "--task no longer exists in vLLM; set task, and runner/convert for pooling models"
            )
        if flag in _FIELD_FLAGS:
            raise ValueError(f"{flag} has its own key: set {_FIELD_FLAGS[flag]} instead")
        if flag in _CONFIG_FLAGS:
            raise ValueError(f"{flag} has its own key: set {_CONFIG_FLAGS[flag]} instead")
        if flag in MANAGED_FLAGS:
            raise ValueError(f"{flag} is set by cmw-vllm and cannot be given here")
        if flag in ("-h", "--help"):
            raise ValueError(f"{flag} would make vLLM print its help and exit")
        # Every option vllm serve accepts, from the list shipped with the package, so a typo
        # or a removed flag (--task) in a models file fails here, not minutes into a start.
        known = serve_flags()
        if flag not in known:
            close = difflib.get_close_matches(flag, list(known), n=1, cutoff=0.8)
            hint = f"; did you mean {close[0]}?" if close else ""
            raise ValueError(f"unknown vLLM {VLLM_VERSION} flag {flag}{hint}")
    return args


def _checked_source(value: str) -> str:
    if not (looks_like_path(value) or is_hf_id(value)):
        raise ValueError("must be a Hugging Face id (org/name) or an absolute/./~ path")
    return value


ModelSource = Annotated[str, AfterValidator(_checked_source)]
"""Where a model or an adapter comes from: a Hugging Face id or a local path."""


class ModelEntry(BaseModel):
    """One registry entry: a model and the vLLM settings it is served with.

    Attributes:
        alias: Short name, also the default server name (``qwen``).
        model: Hugging Face id (``Qwen/Qwen3-0.6B``) or a local directory.
        task: What the server is for: generate, embed, score (rerank) or classify.
        port: Default HTTP port, unique across the registry.
        description: One line for ``list``.
        size_gb: Approximate download size of the weights in GB (10^9 bytes).
        max_model_len: Context length to serve (``--max-model-len``).
        gpu_memory_utilization: This server's fraction of the GPU's total memory, or
            ``auto`` (sized from the estimate, so that small models share a GPU).
        gpus: GPU indices or UUIDs (``0,1``), or ``auto`` (the default: placed where it
            fits).
        dtype: Weight dtype (``--dtype``); None leaves vLLM's ``auto``.
        tensor_parallel_size: GPUs per server; None means one.
        tool_call_parser: vLLM tool-call parser name.
        reasoning_parser: vLLM reasoning parser name.
        enable_auto_tool_choice: Let the model decide when to call tools (needs a parser).
        runner: ``--runner``; pooling tasks get ``pooling`` when unset.
        convert: ``--convert`` (embed/classify adapters for pooling).
        hf_overrides: JSON object passed as ``--hf-overrides``.
        trust_remote_code: Run the repository's own Python code (``--trust-remote-code``).
        extra_args: Further ``vllm serve`` flags, checked against vLLM 0.32.0's list.
        restart: Restart policy after a crash (``start --restart``): no, on-failure, always.
        drain: Seconds ``stop`` lets requests in flight finish (``start --drain``).
        idle_timeout: Seconds the gateway lets a server it started sit idle before stopping
            it (0 never); None uses the gateway's ``--idle-timeout``.
        preload: The gateway starts the model when it starts, not on the first request.
        pin: The gateway never idle-stops nor evicts the model's server.
        max_loras: LoRA adapters served at once (``--max-loras``) when the entry has
            adapters; None gives one slot per declared adapter.
        source: ``built-in`` or the models file the entry (or its override) came from.
    """

    model_config = ConfigDict(extra="forbid", strict=True, frozen=True)

    alias: Name
    model: ModelSource = Field(min_length=1)
    # Vocabulary words arrive as strings from TOML: only they are read leniently.
    task: Task = Field(Task.GENERATE, strict=False)
    port: int = Field(ge=PORT_MIN, le=PORT_MAX)
    description: str = ""
    size_gb: float | None = Field(None, gt=0)
    max_model_len: int | None = Field(None, ge=1)
    gpu_memory_utilization: Annotated[float, Field(gt=0, le=1)] | Literal["auto"] | None = None
    gpus: str | None = None
    dtype: Dtype | None = Field(None, strict=False)
    tensor_parallel_size: int | None = Field(None, ge=1, le=64)
    tool_call_parser: str | None = None
    reasoning_parser: str | None = None
    enable_auto_tool_choice: bool = False
    runner: Runner | None = Field(None, strict=False)
    convert: Convert | None = Field(None, strict=False)
    hf_overrides: dict[str, Any] | None = None
    trust_remote_code: bool = False
    extra_args: list[str] = Field(default_factory=list)
    restart: RestartPolicy | None = Field(None, strict=False)
    drain: int | None = Field(None, ge=0, le=86400)
    idle_timeout: float | None = Field(None, ge=0)
    preload: bool = False
    pin: bool = False
    max_loras: int | None = Field(None, ge=1, le=256)
    source: str = BUILTIN_SOURCE

    @field_validator("tool_call_parser")
    @classmethod
    def _check_tool_parser(cls, value: str | None) -> str | None:
        if value is not None and value not in TOOL_CALL_PARSERS:
            raise ValueError(_unknown_name("tool-call parser", value, TOOL_CALL_PARSERS))
        return value

    @field_validator("reasoning_parser")
    @classmethod
    def _check_reasoning_parser(cls, value: str | None) -> str | None:
        if value is not None and value not in REASONING_PARSERS:
            raise ValueError(_unknown_name("reasoning parser", value, REASONING_PARSERS))
        return value

    @field_validator("extra_args")
    @classmethod
    def _check_extra_args(cls, value: list[str]) -> list[str]:
        return check_extra_args(value)

    @model_validator(mode="after")
    def _check_consistency(self) -> ModelEntry:
        if self.enable_auto_tool_choice and not self.tool_call_parser:
            # vLLM refuses to start with --enable-auto-tool-choice alone.
            raise ValueError("enable_auto_tool_choice needs tool_call_parser")
        if self.task == Task.GENERATE:
            if self.runner == Runner.POOLING or self.convert in (Convert.EMBED, Convert.CLASSIFY):
                raise ValueError(
                    f"task 'generate' cannot use runner {self.runner!r} / convert "
                    f"{self.convert!r}; set task to embed, score or classify"
                )
        elif self.runner not in (None, Runner.POOLING):
            raise ValueError(f"task {self.task!r} needs runner 'pooling' (got {self.runner!r})")
        return self

    def vllm_args(self) -> list[str]:
        """Every ``vllm serve`` flag this entry adds beyond the ServerConfig fields.

        The model, host, port, context length, dtype, memory share and tensor parallel size
        are not included: they travel as ServerConfig fields (see :meth:`server_settings`).
        """
        args: list[str] = []
        runner = self.runner or (Runner.POOLING if self.task != Task.GENERATE else None)
        if runner:
            args += ["--runner", runner]
        if self.convert:
            args += ["--convert", self.convert]
        if self.trust_remote_code:
            args.append("--trust-remote-code")
        if self.hf_overrides:
            args += ["--hf-overrides", json.dumps(self.hf_overrides, separators=(",", ":"))]
        if self.tool_call_parser:
            if self.enable_auto_tool_choice:
                args.append("--enable-auto-tool-choice")
            args += ["--tool-call-parser", self.tool_call_parser]
        if self.reasoning_parser:
            args += ["--reasoning-parser", self.reasoning_parser]
        return args + list(self.extra_args)

    def server_settings(self) -> dict[str, Any]:
        """ServerConfig field values for :func:`~cmw_vllm.server_config.resolve_server_config`.

        Returns:
            ``name`` (the alias), ``port``, ``task``, ``vllm_args`` and whichever of
            ``max_model_len``, ``gpu_memory_utilization``, ``gpus``, ``dtype``,
            ``tensor_parallel_size``, ``restart`` and ``drain`` the entry sets (unset ones are
            left out).
        """
        settings: dict[str, Any] = {
            "name": self.alias,
            "port": self.port,
            "task": self.task,
            "max_model_len": self.max_model_len,
            "gpu_memory_utilization": self.gpu_memory_utilization,
            "gpus": self.gpus,
            "dtype": self.dtype,
            "tensor_parallel_size": self.tensor_parallel_size,
            "restart": self.restart,
            "drain": self.drain,
            "vllm_args": self.vllm_args(),
        }
        return {key: value for key, value in settings.items() if value is not None}


def _unknown_name(kind: str, value: str, known: frozenset[str]) -> str:
    close = difflib.get_close_matches(value, sorted(known), n=3, cutoff=0.6)
    hint = f"; did you mean: {', '.join(close)}?" if close else ""
    return f"unknown vLLM {VLLM_VERSION} {kind} {value!r}{hint}"


class AdapterEntry(BaseModel):
    """One ``[adapters.NAME]`` table: a LoRA adapter served on a base model.

    Attributes:
        name: What clients put in ``"model"`` (the table's name).
        base: The alias of the registry entry it adapts (resolved case-insensitively).
        source: Hugging Face id (``org/name``) or a local directory.
        revision: Branch, tag or commit of a Hub source; None is ``main``.
        file: The models file the table came from.
    """

    model_config = ConfigDict(extra="forbid", strict=True, frozen=True)

    name: Name
    base: str = Field(min_length=1)
    source: ModelSource = Field(min_length=1)
    revision: str | None = Field(None, min_length=1)
    file: str = ""

    @model_validator(mode="after")
    def _check_revision(self) -> AdapterEntry:
        if self.revision is not None and looks_like_path(self.source):
            raise ValueError("revision applies to a Hugging Face source, not a directory")
        return self

    @property
    def is_local(self) -> bool:
        """True when the source is a local directory."""
        return looks_like_path(self.source)

    def local_source(self) -> str:
        """The source as vLLM should get it: an absolute directory, or the Hub id."""
        if self.is_local:
            return str(Path(self.source).expanduser().resolve())
        return self.source


# Keys of an [adapters.NAME] table the file may not set.
_ADAPTER_NOT_IN_FILE = ("name", "file")


# ---------------------------------------------------------------------------------------------
# Models files: the built-in one shipped in the package, and the user's


def _table_lines(text: str, alias: str, kind: str = "models"
                 ) -> tuple[int | None, dict[str, int]]:
    """Find where ``[KIND.ALIAS]`` starts and on which line each of its keys is set.

    tomllib reports no positions for valid documents, so errors about a key's value locate it
    with this small scan (best effort: inline tables and dotted keys only get the table line).
    """
    header_re = re.compile(r"^\s*\[\s*([^\[\]]+?)\s*\]\s*(?:#.*)?$")
    key_re = re.compile(r"""^\s*["']?([A-Za-z0-9_-]+)["']?\s*=""")
    target = f"{kind}.{alias}"
    start: int | None = None
    keys: dict[str, int] = {}
    inside = False
    for number, line in enumerate(text.splitlines(), start=1):
        header = header_re.match(line)
        if header:
            name = re.sub(r"""\s*\.\s*""", ".", header.group(1)).replace('"', "").replace("'", "")
            inside = name == target
            if inside:
                start = number
            continue
        if inside:
            key = key_re.match(line)
            if key:
                keys.setdefault(key.group(1), number)
        elif start is None and re.search(rf"""(^|[\s."']){re.escape(alias)}["']?\s*[.=]""", line):
            start = number
    return start, keys


def _describe_error(err: dict[str, Any], alias: str, is_new: bool) -> tuple[str | None, str]:
    """The key an error is about and a readable message."""
    loc = [str(part) for part in err.get("loc", ())]
    key = loc[0] if loc else None
    kind = err.get("type", "")
    msg = str(err.get("msg", "invalid value")).removeprefix("Value error, ")
    if kind == "extra_forbidden":
        allowed = ", ".join(name for name in ModelEntry.model_fields if name not in _NOT_IN_FILE)
        msg = f"unknown key (allowed: {allowed})"
    elif kind == "missing":
        msg = (
            f"required: '{alias}' is not a built-in alias, so the table must set it"
            if is_new
            else "required"
        )
    else:
        got = err.get("input")
        if isinstance(got, (str, int, float, bool)) and repr(got) not in msg:
            msg = f"{msg} (got {got!r})"
    where = ".".join([f"models.{alias}", *loc])
    return key, f"{where}: {msg}"


_NOT_IN_FILE = ("alias", "source")


def _file_error(file: Path, line: int | None, message: str) -> ConfigError:
    where = f"{file}, line {line}" if line else str(file)
    return ConfigError(f"{where}: {message}")


def load_user_entries(path: Path | None = None) -> list[ModelEntry]:
    """Read the user's models file: new entries and overrides of built-in ones.

    The file is TOML with one table per alias, like the built-in registry
    (``cmw_vllm/data/registry.toml``)::

        [models.my-llama]
        model = "meta-llama/Llama-3.1-8B-Instruct"
        task = "generate"
        port = 8200
        max_model_len = 16384
        tool_call_parser = "llama3_json"

    A table whose alias is built in overrides just the keys it sets; a new alias needs at
    least ``model`` and ``port``.

    Args:
        path: The file; default :func:`cmw_vllm.paths.user_models_file`.

    Returns:
        The complete, validated entries the file defines (merged over built-ins), in file
        order; empty when the file does not exist.

    Raises:
        ConfigError: The file cannot be read, is not valid TOML (the message has the line),
            or an entry is invalid (the message names the file, line and key).
    """
    file = Path(path) if path is not None else paths.user_models_file()
    try:
        raw = file.read_bytes()
    except (FileNotFoundError, NotADirectoryError):
        return []  # no file (or no state dir yet: creating it is start's business)
    except OSError as exc:
        raise ConfigError(f"cannot read models file {file}: {exc.strerror or exc}") from exc
    builtins = {entry.alias.lower(): entry for entry in builtin_entries()}
    return _parse_models_file(file, raw, str(file), builtins)


@functools.cache
def _builtin_entries() -> tuple[ModelEntry, ...]:
    return tuple(_parse_models_file(BUILTIN_FILE, BUILTIN_FILE.read_bytes(), BUILTIN_SOURCE, {}))


def builtin_entries() -> list[ModelEntry]:
    """The entries shipped with cmw-vllm, in display order (read once, on first use)."""
    return list(_builtin_entries())


def _parse_models_file(file: Path, raw: bytes, source: str,
                       bases: dict[str, ModelEntry]) -> list[ModelEntry]:
    """Parse and validate a models file; ``bases`` are the entries its tables override."""
    import tomllib

    try:
        text = raw.decode("utf-8")
        data = tomllib.loads(text)
    except UnicodeDecodeError:
        raise ConfigError(f"{file}: not UTF-8 text") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{file}: invalid TOML: {exc}") from None

    unknown = sorted(set(data) - {"models", "adapters"})
    if unknown:
        raise ConfigError(
            f"{file}: unknown top-level key {unknown[0]!r}; put entries in [models.ALIAS] "
            "tables and LoRA adapters in [adapters.NAME] tables"
        )
    models = data.get("models", {})
    if not isinstance(models, dict):
        raise ConfigError(f"{file}: 'models' must be a table of [models.ALIAS] tables")
    entries: list[ModelEntry] = []
    seen: dict[str, str] = {}
    for alias, table in models.items():
        if alias.lower() in seen:
            start, _lines = _table_lines(text, alias)
            raise _file_error(
                file, start, f"alias '{alias}' is defined twice (also as '{seen[alias.lower()]}')"
            )
        seen[alias.lower()] = alias
        entries.append(_entry_from_table(file, text, alias, table, source,
                                         bases.get(alias.lower())))
    return entries


def _entry_from_table(file: Path, text: str, alias: str, table: object, source: str,
                      base: ModelEntry | None) -> ModelEntry:
    """One validated entry from a ``[models.ALIAS]`` table, merged over ``base``."""

    def error_at(key: str | None, message: str) -> ConfigError:
        start, key_lines = _table_lines(text, alias)  # only on error: it scans the file
        return _file_error(file, key_lines.get(key, start) if key else start, message)

    if not isinstance(table, dict):
        raise error_at(None, f"models.{alias} must be a table ([models.{alias}])")
    for key in _NOT_IN_FILE:
        if key in table:
            hint = "the alias is the table name" if key == "alias" else "set by cmw-vllm"
            raise error_at(key, f"models.{alias}.{key}: cannot be set here ({hint})")
    values: dict[str, Any] = base.model_dump() if base else {}
    values.update(table)
    values["alias"] = base.alias if base else alias
    values["source"] = source
    try:
        return ModelEntry(**values)
    except ValidationError as exc:
        key, message = _describe_error(exc.errors()[0], alias, base is None)
        raise error_at(key, message) from None


def all_entries() -> dict[str, ModelEntry]:
    """Every entry by alias: the built-ins, overridden and extended by the user's file.

    Entries may share a default port (a user's entry often stands in for a built-in one);
    ``start`` refuses a port that a running server holds.

    Raises:
        ConfigError: The models file is invalid.
    """
    entries = {entry.alias: entry for entry in builtin_entries()}
    for entry in load_user_entries():
        entries[entry.alias] = entry
    return entries


def _parse_adapters(file: Path, raw: bytes, entries: dict[str, ModelEntry]
                    ) -> list[AdapterEntry]:
    """The ``[adapters.NAME]`` tables of a models file, each checked against ``entries``."""
    import tomllib

    try:
        text = raw.decode("utf-8")
        data = tomllib.loads(text)
    except (UnicodeDecodeError, tomllib.TOMLDecodeError):
        return []  # the models tables' parse reports it
    tables = data.get("adapters", {})
    if not isinstance(tables, dict):
        raise ConfigError(f"{file}: 'adapters' must be a table of [adapters.NAME] tables")
    aliases = {alias.lower(): alias for alias in entries}
    out: list[AdapterEntry] = []
    seen: set[str] = set()
    for name, table in tables.items():
        def error_at(key: str | None, message: str, name: str = name) -> ConfigError:
            start, key_lines = _table_lines(text, name, "adapters")
            return _file_error(file, key_lines.get(key, start) if key else start, message)

        where = f"adapters.{name}"
        if not isinstance(table, dict):
            raise error_at(None, f"{where} must be a table ([{where}])")
        for key in _ADAPTER_NOT_IN_FILE:
            if key in table:
                raise error_at(key, f"{where}.{key}: cannot be set here (set by cmw-vllm)")
        try:
            adapter = AdapterEntry(name=name, file=str(file), **table)
        except ValidationError as exc:
            err = exc.errors()[0]
            loc = [str(part) for part in err.get("loc", ())]
            msg = str(err.get("msg", "invalid value")).removeprefix("Value error, ")
            if err.get("type") == "extra_forbidden":
                allowed = ", ".join(k for k in AdapterEntry.model_fields
                                    if k not in _ADAPTER_NOT_IN_FILE)
                msg = f"unknown key (allowed: {allowed})"
            key = loc[0] if loc else None
            raise error_at(key, ".".join([where, *loc]) + f": {msg}") from None
        if name.lower() in seen:
            raise error_at(None, f"adapter '{name}' is defined twice")
        seen.add(name.lower())
        if name.lower() in aliases:
            raise error_at(None, f"{where}: '{name}' is already a model alias; give the adapter "
                           "a name of its own")
        base = aliases.get(adapter.base.lower())
        if base is None:
            close = difflib.get_close_matches(adapter.base, list(entries), n=3, cutoff=0.6)
            hint = f"; did you mean: {', '.join(close)}?" if close else ""
            raise error_at("base", f"{where}.base: unknown model alias {adapter.base!r}{hint}")
        if entries[base].task != Task.GENERATE:
            raise error_at("base", f"{where}.base: {base!r} is not a generate model; LoRA "
                           "adapters need one")
        out.append(adapter.model_copy(update={"base": base}))
    return out


def all_adapters(entries: dict[str, ModelEntry] | None = None) -> dict[str, AdapterEntry]:
    """Every LoRA adapter the user's models file declares, by name (file order).

    Args:
        entries: The registry the bases are looked up in; default :func:`all_entries`.

    Raises:
        ConfigError: The models file is invalid, or an adapter names an unknown base.
    """
    file = paths.user_models_file()
    try:
        raw = file.read_bytes()
    except (FileNotFoundError, NotADirectoryError):
        return {}
    except OSError as exc:
        raise ConfigError(f"cannot read models file {file}: {exc.strerror or exc}") from exc
    entries = all_entries() if entries is None else entries
    return {a.name: a for a in _parse_adapters(file, raw, entries)}


def find_adapter(name: str, adapters: dict[str, AdapterEntry] | None = None
                 ) -> AdapterEntry | None:
    """The adapter named ``name`` (case-insensitive), or None."""
    adapters = all_adapters() if adapters is None else adapters
    lowered = name.strip().lower()
    for adapter in adapters.values():
        if adapter.name.lower() == lowered:
            return adapter
    return None


def adapters_for(alias: str, adapters: dict[str, AdapterEntry] | None = None
                 ) -> list[AdapterEntry]:
    """The adapters declared on the entry ``alias``, in file order."""
    adapters = all_adapters() if adapters is None else adapters
    return [a for a in adapters.values() if a.base.lower() == alias.lower()]


def find_entry(name: str, entries: dict[str, ModelEntry] | None = None) -> ModelEntry | None:
    """The entry for an alias (case-insensitive) or a Hugging Face id, or None.

    Args:
        name: Alias or model id.
        entries: The registry to search; default :func:`all_entries`.
    """
    entries = all_entries() if entries is None else entries
    lowered = name.strip().lower()
    for entry in entries.values():
        if entry.alias.lower() == lowered:
            return entry
    for entry in entries.values():
        if entry.model == name.strip():
            return entry
    for entry in entries.values():
        if entry.model.lower() == lowered:
            return entry
    return None


def suggest(name: str, entries: dict[str, ModelEntry]) -> list[str]:
    """Aliases that look like ``name`` (by alias, or by the model's repository name)."""
    lowered = name.lower()
    candidates: dict[str, str] = {}
    for entry in entries.values():
        candidates.setdefault(entry.alias.lower(), entry.alias)
        candidates.setdefault(entry.model.rsplit("/", 1)[-1].lower(), entry.alias)
    matches = difflib.get_close_matches(lowered, list(candidates), n=6, cutoff=0.4)
    out: list[str] = []
    for match in matches:
        alias = candidates[match]
        if alias not in out:
            out.append(alias)
    return out[:4]


@dataclass
class ResolvedTarget:
    """What a model argument on the command line refers to.

    Attributes:
        alias: The registry alias, when an entry applies.
        model: Hugging Face id, or the absolute path of a local directory.
        is_local: True for a local directory.
        entry: The registry entry, if any.
        settings: ServerConfig values from the entry (``entry_settings`` for
            :func:`~cmw_vllm.server_config.resolve_server_config`); empty without an entry.
    """

    alias: str | None
    model: str
    is_local: bool
    entry: ModelEntry | None
    settings: dict[str, Any] = field(default_factory=dict)


def resolve_target(target: str) -> ResolvedTarget:
    """Work out what ``target`` names: an alias, a Hugging Face id, or a local directory.

    A bare word that is an alias means the alias even if a directory of that name exists in
    the current directory (write ``./qwen`` for the directory). Otherwise an existing
    directory wins over a Hugging Face id of the same spelling, as in vLLM.

    Raises:
        UsageError: Unknown alias (with the closest names), or an invalid id.
        NotFoundError: A path (``./x``, ``/x``, ``~/x``) that does not exist.
        ConfigError: The models file is invalid.
    """
    text = target.strip()
    if not text:
        raise UsageError("empty model name")
    entries = all_entries()
    if not looks_like_path(text):
        entry = find_entry(text, entries)
        if entry is not None and entry.alias.lower() == text.lower():
            return _from_entry(entry)
    path = Path(text).expanduser()
    if path.is_dir():
        return ResolvedTarget(alias=None, model=str(path.resolve()), is_local=True, entry=None)
    if looks_like_path(text):
        if path.exists():
            raise UsageError(f"{text} is not a directory; give the model's directory")
        raise NotFoundError(f"no such directory: {text}")
    if "/" in text:
        if not is_hf_id(text):
            raise UsageError(
                f"'{text}' is not a valid Hugging Face id (org/name: letters, digits, '-', "
                "'_', '.') nor an existing directory"
            )
        entry = find_entry(text, entries)
        if entry is not None:
            return _from_entry(entry)
        return ResolvedTarget(alias=None, model=text, is_local=False, entry=None)
    close = suggest(text, entries)
    did_you_mean = f"; did you mean: {', '.join(close)}?" if close else ""
    raise UsageError(
        f"unknown model '{text}'{did_you_mean}",
        hint="run 'cmw-vllm list' for the aliases, or give a Hugging Face id (org/name) "
        "or a local directory",
    )


def _from_entry(entry: ModelEntry) -> ResolvedTarget:
    is_local = looks_like_path(entry.model)
    # vLLM neither expands ~ nor shares our working directory: hand it an absolute path.
    model = str(Path(entry.model).expanduser().resolve()) if is_local else entry.model
    return ResolvedTarget(
        alias=entry.alias,
        model=model,
        is_local=is_local,
        entry=entry,
        settings=entry.server_settings(),
    )


def is_downloaded(model: str) -> bool:
    """True when ``model`` is a local directory, or the HF cache holds a snapshot of it.

    This is a quick presence check; ``verify`` checks that the files are complete.
    """
    if looks_like_path(model):
        return Path(model).expanduser().is_dir()
    from cmw_vllm.hf_cache import is_cached

    return is_cached(model)
