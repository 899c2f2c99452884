"""The gateway's options and its API keys.

Keys come from the environment (``CMW_VLLM_GATEWAY_API_KEYS``, comma-separated) or from a
file readable by its owner only (``--api-key-file`` or ``CMW_VLLM_GATEWAY_API_KEY_FILE``,
one key per line), never from the command line where ``ps`` would show them.
"""

from __future__ import annotations

import os
import stat
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

from cmw_vllm.errors import ConfigError
from cmw_vllm.vocab import PORT_MAX, PORT_MIN, PORT_RANGE, validate_name

KEYS_ENV = "CMW_VLLM_GATEWAY_API_KEYS"
KEY_FILE_ENV = "CMW_VLLM_GATEWAY_API_KEY_FILE"
ADMIN_KEY_FILE_ENV = "CMW_VLLM_GATEWAY_ADMIN_KEY_FILE"
MAX_BUFFERED_ENV = "CMW_VLLM_GATEWAY_MAX_BUFFERED_MB"
DEFAULT_MAX_BUFFERED_MB = 512
DEFAULT_PORT = 4000
DEFAULT_NAME = "gateway"
DEFAULT_SHUTDOWN_GRACE = 10.0  # seconds requests in flight get after SIGTERM


@dataclass(frozen=True)
class GatewaySettings:
    """How the gateway behaves.

    Attributes:
        host: Address to bind.
        port: Port to listen on.
        name: Its name among the records (``status``, ``stop NAME``).
        idle_timeout: Seconds without requests (since the last response ended) after which a
            server the gateway started is stopped; 0 never. A models-file entry's
            ``idle_timeout`` overrides it for that model.
        start_timeout: Seconds a request waits for its model to start before a 503.
        queue_limit: Requests that may wait for one model's start; more get a 429.
        max_body_bytes: Largest request body (decoded); larger ones get a 413.
        max_buffered_bytes: Most bytes of request bodies held in memory, all together, while
            their models start; a request past it gets a 503 with Retry-After (0: no cap).
        upstream_timeout: Seconds without a byte from a server before the request is given
            up (504 before the response started).
        health_interval: Seconds between health checks of the servers (and record scans).
        memory_wait: Seconds to wait for memory to come back after stopping a server before
            evicting the next one.
        adopt: Also idle-stop and evict servers started by hand.
        api_keys: Keys a client must present (none: no check).
        upstream_key: The key sent to the servers (``VLLM_API_KEY``).
        max_connections: Connection pool cap towards the servers (0: no cap).
        api_key_file: The file the keys were read from, if any (a path, no secret).
        header_timeout: Seconds a new connection has to send its request head (nginx's
            ``client_header_timeout``); 0 none.
        body_timeout: Seconds a request body may send nothing before a 408 (nginx's
            ``client_body_timeout``: between two reads, not for the whole body); 0 none.
        max_client_connections: Connections one client address may hold (trusted proxies
            exempt; never more than a quarter of the open-files limit); more get a 503 and
            are closed. 0: no cap.
        trusted_proxies: Addresses or networks whose ``X-Forwarded-For`` is kept (the
            peer's address is appended); from others it is replaced by the peer's.
        shutdown_grace: Seconds requests in flight get to finish after SIGTERM before
            they are cut.
        max_log_bytes: Size at which the gateway's log is rotated (``NAME.log.1`` ...).
        allowed_hosts: Host names served besides IP addresses, localhost, the machine's
            name and the bound name (comma-separated; ``.example.com`` for its subdomains,
            ``*`` for any).
        allowed_origins: Web page origins that may use the gateway (comma-separated
            ``scheme://host[:port]``, ``*`` for any; none by default).
        start_backoff: Seconds a model is not started again after a failed start; doubles
            with each failure in a row, up to 5 min (0: no back-off).
        upstreams: Fixed servers, each ``NAME[,NAME...]=URL`` (the model names it serves,
            the first its name); when given, they are the only servers: none is found among
            the records, started, stopped or evicted (what Kubernetes runs is its to manage).
        admin_keys: Keys of the dashboard and its control API (``/ui/``, ``/api/``),
            separate from ``api_keys`` (none: only a keyless loopback gateway serves them,
            to loopback clients).
        admin_key_file: The file the admin keys were read from, if any.
    """

    host: str = "127.0.0.1"
    port: int = DEFAULT_PORT
    name: str = DEFAULT_NAME
    idle_timeout: float = 600.0
    start_timeout: float = 600.0
    queue_limit: int = 512
    max_body_bytes: int = 64 * 1024 * 1024
    max_buffered_bytes: int = DEFAULT_MAX_BUFFERED_MB * 1024 * 1024
    upstream_timeout: float = 600.0
    health_interval: float = 5.0
    memory_wait: float = 5.0
    adopt: bool = False
    api_keys: frozenset[str] = field(default_factory=frozenset, repr=False)
    upstream_key: str | None = field(default=None, repr=False)
    max_connections: int = 0
    api_key_file: str | None = None
    header_timeout: float = 60.0
    body_timeout: float = 60.0
    max_client_connections: int = 512
    trusted_proxies: tuple[str, ...] = ()
    shutdown_grace: float = DEFAULT_SHUTDOWN_GRACE
    max_log_bytes: int = 16 * 1024 * 1024
    allowed_hosts: str = ""
    allowed_origins: str = ""
    start_backoff: float = 5.0
    upstreams: tuple[str, ...] = ()
    admin_keys: frozenset[str] = field(default_factory=frozenset, repr=False)
    admin_key_file: str | None = None

    def public(self) -> dict[str, object]:
        """The settings without secrets (for the record and ``--json``)."""
        return {
            "host": self.host,
            "port": self.port,
            "idle_timeout": self.idle_timeout,
            "start_timeout": self.start_timeout,
            "queue_limit": self.queue_limit,
            "max_body_bytes": self.max_body_bytes,
            "max_buffered_bytes": self.max_buffered_bytes,
            "upstream_timeout": self.upstream_timeout,
            "adopt": self.adopt,
            "api_keys": len(self.api_keys),
            "api_key_file": self.api_key_file,
            "header_timeout": self.header_timeout,
            "body_timeout": self.body_timeout,
            "max_client_connections": self.max_client_connections,
            "trusted_proxies": list(self.trusted_proxies),
            "shutdown_grace": self.shutdown_grace,
            "max_log_bytes": self.max_log_bytes,
            "allowed_hosts": self.allowed_hosts,
            "allowed_origins": self.allowed_origins,
            "upstreams": list(self.upstreams),
            "admin_keys": len(self.admin_keys),
            "admin_key_file": self.admin_key_file,
        }

    @classmethod
    def from_public(cls, name: str, data: dict[str, Any]) -> GatewaySettings:
        """The settings :meth:`public` gave (no keys: the caller loads them).

        Raises:
            ConfigError: ``data`` does not hold gateway settings.
        """
        validate_name(name)
        defaults = {f.name: f.default for f in fields(cls)
                    if f.name not in ("name", "api_keys", "upstream_key", "admin_keys")}
        kept = {k: v for k, v in data.items() if k in defaults}
        for key, value in kept.items():
            if not _same_kind(defaults[key], value):
                raise ConfigError(f"the kept settings of gateway {name!r} are invalid: "
                                  f"{key} is {value!r}")
        for key in ("trusted_proxies", "upstreams"):
            if key in kept:
                kept[key] = tuple(kept[key])
        port = kept.get("port", DEFAULT_PORT)
        if not PORT_MIN <= port <= PORT_MAX:
            raise ConfigError(f"the kept settings of gateway {name!r} are invalid: "
                              f"port {port} is not in {PORT_RANGE}")
        return cls(name=name, **kept)

    def cli_args(self) -> list[str]:
        """The ``cmw-vllm gateway`` options that run a gateway with these settings."""
        args = ["--name", self.name, "--host", self.host, "--port", str(self.port),
                "--idle-timeout", str(self.idle_timeout),
                "--start-timeout", str(self.start_timeout),
                "--queue-limit", str(self.queue_limit),
                "--max-body-mb", str(self.max_body_bytes / (1024 * 1024)),
                "--max-buffered-mb", str(self.max_buffered_bytes / (1024 * 1024)),
                "--upstream-timeout", str(self.upstream_timeout)]
        args += ["--header-timeout", str(self.header_timeout),
                 "--body-timeout", str(self.body_timeout),
                 "--max-client-connections", str(self.max_client_connections),
                 "--shutdown-grace", str(self.shutdown_grace),
                 "--max-log-mb", str(self.max_log_bytes / (1024 * 1024))]
        for proxy in self.trusted_proxies:
            args += ["--trusted-proxy", proxy]
        if self.adopt:
            args.append("--adopt")
        if self.api_key_file:
            args += ["--api-key-file", self.api_key_file]
        if self.allowed_hosts:
            args += ["--allowed-hosts", self.allowed_hosts]
        if self.allowed_origins:
            args += ["--allowed-origins", self.allowed_origins]
        for upstream in self.upstreams:
            args += ["--upstream", upstream]
        if self.admin_key_file:
            args += ["--admin-key-file", self.admin_key_file]
        return args


def parse_upstream(text: str) -> tuple[str, str, tuple[str, ...]]:
    """``NAME[,NAME...]=URL`` (``--upstream``) as (name, base URL, every model name).

    Raises:
        ConfigError: No ``=``, an empty name, or a URL that is not ``http(s)://HOST[:PORT]``.
    """
    import re

    names_text, sep, url = text.partition("=")
    names = tuple(n.strip() for n in names_text.split(","))
    url = url.strip().rstrip("/")
    if not sep or not all(names):
        raise ConfigError(f"invalid --upstream {text!r}: use NAME[,NAME...]=URL, e.g. "
                          "qwen=http://qwen:8000")
    if not re.fullmatch(r"https?://[A-Za-z0-9._-]+(:\d{1,5})?|https?://\[[0-9A-Fa-f:.]+\]"
                        r"(:\d{1,5})?", url):
        raise ConfigError(f"invalid --upstream {text!r}: the URL must be http(s)://HOST[:PORT] "
                          "(no path)")
    return names[0], url, names


def _same_kind(default: object, value: object) -> bool:
    """True when a kept ``value`` has the type of the setting whose default is ``default``."""
    if isinstance(default, bool) or isinstance(value, bool):
        return isinstance(default, bool) and isinstance(value, bool)
    if isinstance(default, float):
        return isinstance(value, (int, float))
    if default is None:  # api_key_file, admin_key_file: a path or nothing
        return value is None or isinstance(value, str)
    if isinstance(default, tuple):  # trusted_proxies: JSON keeps it as a list of strings
        return isinstance(value, (list, tuple)) and all(isinstance(v, str) for v in value)
    return isinstance(value, type(default))


def read_key_file(path: Path) -> frozenset[str]:
    """Keys from a file, one per line (``#`` comments and blank lines skipped).

    Raises:
        ConfigError: The file is missing, unreadable, empty, or readable by others.
    """
    try:
        info = path.stat()
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        reason = exc.strerror if isinstance(exc, OSError) else "not UTF-8 text"
        raise ConfigError(f"cannot read API key file {path}: {reason}") from None
    if os.name != "nt" and info.st_mode & (stat.S_IRWXG | stat.S_IRWXO):
        raise ConfigError(
            f"API key file {path} is readable by others (mode {stat.S_IMODE(info.st_mode):o})",
            hint=f"chmod 600 {path}",
        )
    keys = frozenset(
        line.strip() for line in text.splitlines() if line.strip() and not line.startswith("#")
    )
    if not keys:
        raise ConfigError(f"API key file {path} holds no key")
    return keys


def load_api_keys(key_file: str | None = None, environ: dict[str, str] | None = None
                  ) -> frozenset[str]:
    """The gateway's keys: from ``key_file``, else ``$CMW_VLLM_GATEWAY_API_KEY_FILE``, plus
    ``$CMW_VLLM_GATEWAY_API_KEYS``.

    Raises:
        ConfigError: A key file is unusable, or a key holds whitespace.
    """
    env = os.environ if environ is None else environ
    keys: set[str] = set()
    file_name = key_file or env.get(KEY_FILE_ENV)
    if file_name:
        keys |= read_key_file(Path(file_name).expanduser())
    keys |= {k.strip() for k in (env.get(KEYS_ENV) or "").split(",") if k.strip()}
    for key in keys:
        if any(c.isspace() for c in key) or not key.isprintable():
            raise ConfigError("a gateway API key holds whitespace or control characters")
    return frozenset(keys)


def load_admin_keys(key_file: str | None = None, environ: dict[str, str] | None = None,
                    api_keys: frozenset[str] = frozenset()) -> frozenset[str]:
    """The dashboard's admin keys: from ``key_file``, else
    ``$CMW_VLLM_GATEWAY_ADMIN_KEY_FILE`` (a 0600 file, one key per line); none when neither
    is set.

    Raises:
        ConfigError: The file is unusable, a key holds whitespace, or an admin key is also
            an inference key (``api_keys``): the two must stay separate.
    """
    env = os.environ if environ is None else environ
    file_name = key_file or env.get(ADMIN_KEY_FILE_ENV)
    if not file_name:
        return frozenset()
    keys = read_key_file(Path(file_name).expanduser())
    for key in keys:
        if any(c.isspace() for c in key) or not key.isprintable():
            raise ConfigError("an admin key holds whitespace or control characters")
    if keys & api_keys:
        raise ConfigError(f"admin key file {file_name} holds a gateway API key: the admin key "
                          "must differ from every inference key",
                          hint="put a key of its own in the admin key file")
    return keys
