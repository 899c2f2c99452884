"""Server configuration: the validated settings of one vLLM server, and how they resolve.

Precedence, highest first: CLI flag > env var (``CMW_VLLM_*``) > user models file entry >
built-in registry entry > defaults. :func:`resolve_server_config` is the one pure function
that applies it.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from typing import Annotated, Any

from pydantic import (
    AfterValidator,
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    field_validator,
    model_validator,
)

from cmw_vllm import multinode
from cmw_vllm.errors import ConfigError
from cmw_vllm.settings import SERVER_ENV_VARS
from cmw_vllm.vllm_flags import flag_value
from cmw_vllm.vocab import (
    AUTO,
    NAME_RULE,
    PORT_MAX,
    PORT_MIN,
    Convert,
    Dtype,
    RestartPolicy,
    Runner,
    Task,
    client_url,
    is_valid_name,
    parse_int,
)

DEFAULT_HOST = "127.0.0.1"
DEFAULT_PORT = 8000
# Seconds in-flight requests get to finish on stop (vLLM's --shutdown-timeout); see docs/serving.md.
DEFAULT_DRAIN = 30

# Flags that cmw-vllm sets itself from ServerConfig fields; extra args must not repeat them.
MANAGED_FLAGS = {
    "--model",
    "--host",
    "--port",
    "--tensor-parallel-size",
    "-tp",
    "--gpu-memory-utilization",
    "--max-model-len",
    "--dtype",
    "--api-key",
    "--served-model-name",
    "--shutdown-timeout",
    *multinode.MANAGED_FLAGS,
}

# Option names shown in errors, per field.
OPTION_NAMES = {
    "name": "--name",
    "model": "MODEL",
    "host": "--host",
    "port": "--port",
    "tensor_parallel_size": "--tensor-parallel-size",
    "gpu_memory_utilization": "--gpu-memory-utilization",
    "max_model_len": "--max-model-len",
    "dtype": "--dtype",
    "gpus": "--gpus",
    "task": "--task",
    "vllm_args": "extra vLLM flags",
    "env": "env",
    "served_model_name": "--served-model-name",
    "drain": "--drain",
    "restart": "--restart",
    "distributed": "multi-node option",
    "lora": "adapters",
}


# vLLM 0.32.0's choices of --max-lora-rank.
LORA_RANKS = (1, 8, 16, 32, 64, 128, 256, 320, 512)
# Flags derived from the declared adapters (:class:`LoraSettings`), not given by hand with them.
LORA_FLAGS = ("--enable-lora", "--lora-modules", "--max-lora-rank", "--max-loras")
LOOPBACK_HOSTS = ("127.0.0.1", "localhost", "::1")


def lora_rank_slot(rank: int) -> int:
    """The smallest ``--max-lora-rank`` choice that holds ``rank``.

    Raises:
        ValueError: ``rank`` is over vLLM's largest choice.
    """
    for choice in LORA_RANKS:
        if choice >= rank:
            return choice
    raise ValueError(f"LoRA rank {rank} is over vLLM's maximum of {LORA_RANKS[-1]}")


def is_loopback(host: str) -> bool:
    """True for an address only this machine reaches (127.0.0.0/8, ::1, localhost)."""
    return host in LOOPBACK_HOSTS or host.startswith("127.")


class LoraSettings(BaseModel):
    """The LoRA adapters a server serves from its start.

    Attributes:
        modules: Adapter name -> directory (or Hub id), loaded at start (``--lora-modules``).
        max_rank: ``--max-lora-rank`` (one of :data:`LORA_RANKS`).
        max_loras: ``--max-loras``: adapters served at once.
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    modules: dict[str, str] = Field(default_factory=dict)
    max_rank: int = 16
    max_loras: int = Field(1, ge=1, le=256)

    @field_validator("max_rank")
    @classmethod
    def _check_rank(cls, value: int) -> int:
        if value not in LORA_RANKS:
            raise ValueError(f"must be one of {', '.join(map(str, LORA_RANKS))}")
        return value

    def cli_args(self) -> list[str]:
        """The ``vllm serve`` flags."""
        args = ["--enable-lora", "--max-lora-rank", str(self.max_rank),
                "--max-loras", str(self.max_loras)]
        if self.modules:
            args += ["--lora-modules", *(f"{n}={p}" for n, p in self.modules.items())]
        return args


def name_from_model(model: str) -> str:
    """Derive a server name from a model id or path (``Qwen/Qwen3-0.6B`` -> ``qwen3-0.6b``)."""
    base = model.rstrip("/").replace("\\", "/").rsplit("/", 1)[-1].lower()
    base = re.sub(r"[^a-z0-9._-]+", "-", base).strip(".-_") or "server"
    base = re.sub(r"\.{2,}", ".", base)
    return base[:64]


def _checked_name(value: str) -> str:
    if not is_valid_name(value):
        raise ValueError(NAME_RULE)
    return value


Name = Annotated[str, AfterValidator(_checked_name)]
"""A server's, an alias's or an adapter's name: it names files in the state dir."""


class ServerConfig(BaseModel):
    """Everything needed to launch one vLLM server."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    name: Name
    model: str = Field(min_length=1)
    served_model_name: str | None = None
    host: str = DEFAULT_HOST
    port: int = Field(DEFAULT_PORT, ge=PORT_MIN, le=PORT_MAX)
    tensor_parallel_size: int = Field(1, ge=1, le=64)
    # A fraction of each GPU's total, or ``auto`` (sized from the estimate at placement).
    gpu_memory_utilization: float | str | None = None
    max_model_len: int | None = Field(None, ge=1)
    dtype: Dtype = Dtype.AUTO
    # GPU indices or UUIDs; None (``auto``) lets the placement choose.
    gpus: str | None = None
    task: Task = Task.GENERATE
    vllm_args: list[str] = Field(default_factory=list)
    env: dict[str, str] = Field(default_factory=dict)
    distributed: multinode.Distributed | None = None
    drain: int = Field(DEFAULT_DRAIN, ge=0, le=86400)
    restart: RestartPolicy = RestartPolicy.NO
    lora: LoraSettings | None = None

    @field_validator("host")
    @classmethod
    def _check_host(cls, value: str) -> str:
        if not value or any(c.isspace() for c in value) or "/" in value:
            raise ValueError("must be a host name or IP address")
        return value

    @field_validator("gpu_memory_utilization", mode="before")
    @classmethod
    def _check_utilization(cls, value: Any) -> float | str | None:
        if value is None or value == "":
            return None
        if isinstance(value, str) and value.strip().lower() == AUTO:
            return AUTO
        if isinstance(value, bool):
            raise ValueError("must be a number in (0, 1] or auto")
        try:
            share = float(value)
        except (TypeError, ValueError):
            raise ValueError("must be a number in (0, 1] or auto") from None
        if not 0 < share <= 1:
            raise ValueError("must be a number in (0, 1] or auto")
        return share

    @field_validator("gpus")
    @classmethod
    def _check_gpus(cls, value: str | None) -> str | None:
        if value is None or value == "" or value.strip().lower() == AUTO:
            return None
        parts = [p.strip() for p in value.split(",")]
        for part in parts:
            if not (part.isdigit() or re.fullmatch(r"(GPU|MIG)-[0-9A-Za-z/-]+", part)):
                raise ValueError("must be comma-separated GPU indices or UUIDs, e.g. 0,1")
        return ",".join(parts)

    @field_validator("vllm_args")
    @classmethod
    def _check_args(cls, value: list[str]) -> list[str]:
        for arg in value:
            flag = arg.split("=", 1)[0]
            if flag in MANAGED_FLAGS:
                if flag == "--api-key":
                    raise ValueError("pass the API key in VLLM_API_KEY, not on the command line")
                if flag == "--shutdown-timeout":
                    raise ValueError("--shutdown-timeout is set by cmw-vllm; use --drain")
                raise ValueError(f"{flag} is set by cmw-vllm; use its own option instead")
        return value

    @model_validator(mode="after")
    def _check_lora(self) -> ServerConfig:
        if self.lora is not None:
            given = [a.split("=", 1)[0] for a in self.vllm_args
                     if a.split("=", 1)[0] in LORA_FLAGS]
            if given:
                raise ValueError(f"{given[0]} comes from the declared adapters "
                                 "([adapters.NAME] in models.toml); do not give it too")
        return self

    @property
    def runtime_lora(self) -> bool:
        """Adapters may be loaded while it runs: LoRA is on and it listens on loopback only
        (the load endpoint is never exposed to clients; the gateway reaches it)."""
        return self.lora is not None and is_loopback(self.host)

    @model_validator(mode="after")
    def _check_distributed(self) -> ServerConfig:
        if self.distributed is not None:
            try:
                multinode.check_world(self.distributed, self.tensor_parallel_size,
                                      self.vllm_args)
            except ConfigError as exc:
                raise ValueError(exc.message) from None
        return self

    @property
    def role(self) -> str:
        """``single``, ``leader`` (serves the API for several nodes) or ``follower``."""
        return self.distributed.role if self.distributed is not None else multinode.SINGLE

    def local_device_count(self) -> int:
        """How many GPUs this node's part of the server uses."""
        return multinode.local_device_count(self.distributed, self.tensor_parallel_size,
                                            self.vllm_args)

    def base_url(self) -> str:
        """The HTTP address clients use (loopback when bound to all interfaces)."""
        return client_url(self.host, self.port)

    def served_name(self) -> str:
        """The model name clients put in requests (the first name vLLM answers to)."""
        return self.served_model_name or self.model

    def served_names(self) -> list[str]:
        """Every name vLLM answers to: the user's ``--served-model-name``, else the model id
        and the server's name (so ``"model": "qwen"`` works for ``start ... --name qwen``).
        """
        if self.served_model_name:
            return [self.served_model_name]
        return [self.model] if self.name == self.model else [self.model, self.name]

    def vllm_cli_args(self) -> list[str]:
        """The ``vllm serve`` flags for this config (the model and key are not included)."""
        if self.role == multinode.FOLLOWER:  # headless: no HTTP server
            args = []
        else:
            args = ["--host", self.host, "--port", str(self.port)]
        args += ["--served-model-name", *self.served_names()]
        if self.tensor_parallel_size != 1:
            args += ["--tensor-parallel-size", str(self.tensor_parallel_size)]
        if isinstance(self.gpu_memory_utilization, float):
            args += ["--gpu-memory-utilization", f"{self.gpu_memory_utilization:g}"]
        if self.max_model_len is not None:
            args += ["--max-model-len", str(self.max_model_len)]
        if self.dtype != Dtype.AUTO:
            args += ["--dtype", self.dtype]
        if self.drain:
            args += ["--shutdown-timeout", str(self.drain)]
        if self.distributed is not None:
            args += self.distributed.cli_args()
        if self.lora is not None:
            args += self.lora.cli_args()
        return args + self._task_args() + list(self.vllm_args)

    def _task_args(self) -> list[str]:
        """Pooling flags implied by ``task`` when the entry or user did not give them."""
        if self.task == Task.GENERATE or any(
            a.split("=", 1)[0] == "--runner" for a in self.vllm_args
        ):
            return []
        if self.task == Task.EMBED:
            return ["--runner", Runner.POOLING, "--convert", Convert.EMBED]
        return ["--runner", Runner.POOLING]


def implied_task(args: Sequence[str], current: str | None = None) -> Task | None:
    """The task that vLLM flags passed through imply, or None when they imply none.

    ``--convert embed`` / ``--convert classify`` name the task; ``--runner generate`` (or
    ``draft``) means generate; ``--runner pooling`` alone keeps a pooling task already
    chosen (embed, score, classify) and otherwise means embed, vLLM's usual pooling task.

    Args:
        args: The vLLM flags given after ``--``.
        current: The task the registry entry or the environment chose, if any.
    """
    convert = flag_value(args, "--convert")
    if convert in (Convert.EMBED, Convert.CLASSIFY):
        return Task(convert)
    runner = flag_value(args, "--runner")
    if runner in (Runner.GENERATE, Runner.DRAFT):
        return Task.GENERATE
    if runner == Runner.POOLING:
        return Task(current) if current in (Task.EMBED, Task.SCORE, Task.CLASSIFY) else Task.EMBED
    return None


def format_validation_error(
    exc: ValidationError, source: str | None = None, names: Mapping[str, str] | None = None
) -> str:
    """Turn a pydantic error into one readable line naming the option.

    Args:
        exc: The error.
        source: The file the values came from (the option is then its dotted key).
        names: Field -> what to call it instead of its option (an env var, say).
    """
    err = exc.errors()[0]
    loc = [str(p) for p in err.get("loc", ())]
    field = loc[0] if loc else "settings"
    option = OPTION_NAMES.get(field, field) if source is None else ".".join(loc) or field
    if names and field in names:
        option = names[field]
    elif source is None and field == "distributed" and len(loc) > 1:
        option = multinode.OPTION_NAMES.get(loc[1], loc[1])
    msg = err.get("msg", "invalid value")
    msg = msg.removeprefix("Value error, ")
    got = err.get("input")
    where = f" in {source}" if source else ""
    if isinstance(got, (str, int, float)) and not isinstance(got, bool):
        return f"invalid {option}{where}: {msg} (got {got!r})"
    return f"invalid {option}{where}: {msg}"


def build_config(values: Mapping[str, Any]) -> ServerConfig:
    """Validate ``values`` into a ServerConfig.

    Raises:
        ConfigError: One line naming the first invalid option.
    """
    try:
        return ServerConfig(**values)
    except ValidationError as exc:
        raise ConfigError(format_validation_error(exc)) from None


def env_overrides(environ: Mapping[str, str]) -> dict[str, Any]:
    """Read the ``CMW_VLLM_*`` variables that map onto ServerConfig fields."""
    out: dict[str, Any] = {}
    for field, var in SERVER_ENV_VARS.items():
        raw = environ.get(var)
        if raw in (None, ""):
            continue
        out[field] = raw
    return out


def resolve_server_config(
    model: str,
    *,
    entry_settings: Mapping[str, Any] | None = None,
    environ: Mapping[str, str] | None = None,
    cli: Mapping[str, Any] | None = None,
) -> ServerConfig:
    """Apply the documented precedence and validate the result.

    Args:
        model: Hugging Face id or local path to serve.
        entry_settings: ServerConfig fields from the registry or models file entry
            (``name``, ``port``, ``vllm_args``, ...), already merged user-over-built-in.
        environ: Environment to read ``CMW_VLLM_*`` from (pass ``os.environ``).
        cli: Options given on the command line; None values mean "not given".
            ``vllm_args`` given here are appended to the entry's.

    Returns:
        The validated config. Without ``--task``, pass-through ``--runner``/``--convert``
        flags decide the task (see :func:`implied_task`).

    Raises:
        ConfigError: A value is invalid; the message names the option.
    """
    from cmw_vllm.settings import source_of

    values: dict[str, Any] = {"model": model}
    from_env = env_overrides(environ or {})
    for layer in (entry_settings or {}, from_env):
        values.update({k: v for k, v in layer.items() if v is not None and k != "vllm_args"})
    vllm_args = list((entry_settings or {}).get("vllm_args") or [])
    for key, value in (cli or {}).items():
        if value is None:
            continue
        from_env.pop(key, None)
        if key == "vllm_args":
            vllm_args += list(value)
        elif key == "env":
            values["env"] = {**values.get("env", {}), **value}
        else:
            values[key] = value
    values["vllm_args"] = vllm_args
    if (cli or {}).get("task") is None:
        implied = implied_task((cli or {}).get("vllm_args") or [], values.get("task"))
        if implied is not None:
            values["task"] = implied
    if not values.get("name"):
        values["name"] = name_from_model(model)
    # A bad value from the environment is named by its variable (and .env file, if any).
    names = {f: SERVER_ENV_VARS[f] + source_of(SERVER_ENV_VARS[f]) for f in from_env}
    for key in ("port", "tensor_parallel_size", "max_model_len", "drain"):
        if isinstance(values.get(key), str):
            values[key] = parse_int(values[key], names.get(key, OPTION_NAMES[key]))
    try:
        return ServerConfig(**values)
    except ValidationError as exc:
        raise ConfigError(format_validation_error(exc, names=names)) from None
