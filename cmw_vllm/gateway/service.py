"""Running the gateway: in the foreground (also under systemd), or in the background.

Either way the gateway writes a record among the servers' (task ``gateway``), so
``cmw-vllm status`` shows it and ``cmw-vllm stop NAME`` stops it: SIGTERM makes it drain,
stop the servers it started, and remove its record. Its settings (never its keys) are also
kept after it stopped, like a server's last start, for ``restart`` and ``enable``.

Under systemd (``cmw-vllm enable gateway``, ``Type=notify``) it sends ``READY=1`` once it
listens and ``STOPPING=1`` when its shutdown begins, and keeps ``$NOTIFY_SOCKET`` from the
servers it starts: their supervisors must not speak for the gateway's unit.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import sys
import time
from collections.abc import Mapping
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

from cmw_vllm import paths
from cmw_vllm.errors import ConflictError, EnvironmentProblem, ServerStartError
from cmw_vllm.gateway.settings import DEFAULT_SHUTDOWN_GRACE, GatewaySettings
from cmw_vllm.server_record import (
    ServerRecord,
    log_path,
    pid_path,
    read_record,
    record_path,
)
from cmw_vllm.vocab import GATEWAY_TASK, client_url

if TYPE_CHECKING:
    from cmw_vllm.systemd_unit import UnitFiles

logger = logging.getLogger(__name__)
LIMIT_NOFILE = 65536  # the unit's open-files limit: each client and upstream connection is one
KILL_WAIT_S = 10.0  # ServerManager.stop's wait for the processes after SIGKILL
START_TIMEOUT_S = 120.0  # the unit's TimeoutStartSec: imports, then listening


def base_url(settings: GatewaySettings) -> str:
    """Where clients reach the gateway (loopback when bound to every interface)."""
    return client_url(settings.host, settings.port)


def _check_free(settings: GatewaySettings) -> None:
    """Refuse when a live record has this name, or something holds the port."""
    from cmw_vllm.server_manager import ServerManager, describe_port_holder, port_is_free

    try:
        existing = read_record(settings.name)
    except ValueError:
        existing = None
    if existing is not None:
        status = ServerManager().get_status(settings.name, check_health=False)
        if status.running:
            what = "gateway" if existing.task == GATEWAY_TASK else "server"
            raise ConflictError(f"a {what} named {settings.name!r} is already running "
                                f"(pid {existing.pid}, port {existing.port})",
                                hint=f"cmw-vllm stop {settings.name}, or use --name")
    if not port_is_free(settings.host, settings.port):
        holder = describe_port_holder(settings.host, settings.port) or "another process"
        raise ConflictError(f"port {settings.port} is in use by {holder}",
                            hint="choose another with --port")


def _check_registry() -> None:
    """Refuse to serve without the registry: a broken models file is an error, as for
    ``list`` and ``start``, not a gateway that knows no models (built-ins included).

    Raises:
        ConfigError: The models file is invalid (file, line and column in the message).
    """
    from cmw_vllm.model_registry import all_entries

    all_entries()


def shutdown_budget(environ: Mapping[str, str] | None = None,
                    grace: float = DEFAULT_SHUTDOWN_GRACE) -> float:
    """Seconds a gateway's shutdown may take after SIGTERM.

    Its requests in flight get ``grace`` (its ``shutdown_grace``); then it stops the servers
    it started, all at once, each with its drain, ``stop``'s margin and the wait after
    SIGKILL. The drain is ``CMW_VLLM_DRAIN_TIMEOUT`` when set, else the longest of the
    registry's entries (at least the default). The gateway's record keeps it as its
    ``drain``, so ``stop`` waits that long; ``enable`` adds systemd's slack for
    ``TimeoutStopSec``.
    """
    from cmw_vllm.errors import ConfigError
    from cmw_vllm.server_config import DEFAULT_DRAIN, env_overrides
    from cmw_vllm.settings import stop_timeout

    env = os.environ if environ is None else environ
    drain: float = DEFAULT_DRAIN
    raw = env_overrides(env).get("drain")
    try:
        if raw is not None:
            drain = float(raw)
        else:
            from cmw_vllm.model_registry import all_entries

            drain = max([drain, *(e.drain for e in all_entries().values() if e.drain)])
        margin = stop_timeout()
    except (ValueError, ConfigError):
        margin = 30.0
    return grace + drain + margin + KILL_WAIT_S


@dataclass
class KnownGateway:
    """A gateway's settings, from its record or, after a stop, from its last run.

    Attributes:
        settings: Its settings, without keys.
        keys: How many API keys it ran with.
        record: Its record, while it has one.
    """

    settings: GatewaySettings
    keys: int
    record: ServerRecord | None


def find_gateway(name: str) -> KnownGateway | None:
    """Gateway ``name`` as its record or its last run knows it; None when ``name`` is no
    gateway (a server, or nothing).

    Raises:
        ConfigError: Its kept settings are invalid.
    """
    from cmw_vllm import last_start

    try:
        record = read_record(name)
    except ValueError:
        record = None
    if record is not None:
        data = record.config if record.task == GATEWAY_TASK else None
    else:
        kept = last_start.load_settings(name)
        data = kept if kept is not None and kept.get("task") == GATEWAY_TASK else None
    if data is None:
        return None
    keys = data.get("api_keys")
    return KnownGateway(GatewaySettings.from_public(name, data),
                        keys if isinstance(keys, int) else 0, record)


def keys_at_hand(known: KnownGateway, environ: Mapping[str, str] | None = None
                 ) -> frozenset[str]:
    """The keys to run ``known`` again with: its key file's, plus the environment's.

    Raises:
        ConfigError: It ran with keys and none are at hand (it would come back open), or its
            key file is unusable.
    """
    from cmw_vllm.errors import ConfigError
    from cmw_vllm.gateway.settings import KEYS_ENV, load_api_keys

    keys = load_api_keys(known.settings.api_key_file, dict(os.environ if environ is None
                                                           else environ))
    if known.keys and not keys:
        raise ConfigError(
            f"gateway {known.settings.name!r} ran with {known.keys} API key(s) from the "
            "environment, and none is set here: it would come back without a key",
            hint=f"set {KEYS_ENV}, or run it with --api-key-file",
        )
    return keys


def write_record(settings: GatewaySettings, foreground: bool = True) -> ServerRecord:
    """Record this process as the gateway ``settings.name`` (0600, atomic); keep its
    settings (and its upstream key, 0600) for ``restart`` and ``enable``."""
    import psutil

    from cmw_vllm import last_start

    me = psutil.Process()
    created = me.create_time()
    now = time.time()
    record = ServerRecord(
        name=settings.name, pid=me.pid, create_time=created, supervisor_pid=me.pid,
        supervisor_create_time=created, pgid=me.pid, host=settings.host, port=settings.port,
        model="cmw-vllm gateway", served_model_name="", task=GATEWAY_TASK,
        base_url=base_url(settings), command=me.cmdline(),
        log_path=str(log_path(settings.name)), started_at=now,
        config={**settings.public(),
                "drain": int(shutdown_budget(grace=settings.shutdown_grace))},
        ready_at=now, foreground=foreground,
    )
    for d in (paths.state_dir(), paths.servers_dir(), paths.logs_dir()):
        paths.ensure_dir(d)
    paths.write_private(record_path(settings.name), json.dumps(asdict(record), indent=2) + "\n")
    paths.write_private(pid_path(settings.name), f"{me.pid}\n")
    last_start.save(settings.name, {"task": GATEWAY_TASK, **settings.public()},
                    settings.upstream_key)
    return record


def remove_record(settings: GatewaySettings) -> None:
    """Remove the record, when it is still this process's."""
    with contextlib.suppress(ValueError):
        record = read_record(settings.name)
        if record is not None and record.pid == os.getpid():
            for path in (record_path(settings.name), pid_path(settings.name)):
                with contextlib.suppress(FileNotFoundError):
                    path.unlink()


def _in_background(settings: GatewaySettings) -> bool:
    """Whether stderr is the gateway's log file (``start_background`` made it so)."""
    try:
        return os.path.samestat(os.fstat(2), os.stat(log_path(settings.name)))
    except OSError:
        return False


def _log_to_file(settings: GatewaySettings, background: bool) -> None:
    """Log to the gateway's log file (``cmw-vllm logs NAME``), rotated by size.

    In the background, stderr already is that file: the log takes it over.
    """
    from cmw_vllm.gateway import logfile

    path = log_path(settings.name)
    paths.ensure_dir(paths.logs_dir())
    try:
        logfile.setup(path, settings.max_log_bytes, background)
    except OSError as exc:
        raise EnvironmentProblem(f"cannot write {path}: {exc.strerror or exc}") from exc


def run_foreground(settings: GatewaySettings) -> None:
    """Serve until SIGINT or SIGTERM; then stop the servers this gateway started.

    Raises:
        ConflictError: The name or the port is taken.
        ConfigError: The models file is invalid.
    """
    from aiohttp import web

    from cmw_vllm.gateway.edge import serve
    from cmw_vllm.gateway.proxy import build_app
    from cmw_vllm.supervisor import notify

    _check_free(settings)
    _check_registry()
    foreground = not _in_background(settings)
    _log_to_file(settings, background=not foreground)
    _raise_fd_limit()
    # Ours alone: the supervisors of the servers it starts must not notify for its unit.
    notify_socket = os.environ.pop("NOTIFY_SOCKET", None)
    app = build_app(settings)

    async def on_startup(app: web.Application) -> None:
        write_record(settings, foreground=foreground)

    def on_listening(*_: object) -> None:
        # run_app calls its `print` once, right after the sockets listen.
        url = base_url(settings)
        logger.info("gateway %r listening on %s", settings.name, url)
        logger.info("dashboard: %s/ui/", url)
        notify(f"READY=1\nSTATUS=gateway serving on {url}", notify_socket)

    async def on_shutdown(app: web.Application) -> None:
        notify("STOPPING=1", notify_socket)

    async def on_cleanup(app: web.Application) -> None:
        remove_record(settings)

    app.on_startup.append(on_startup)
    app.on_shutdown.insert(0, on_shutdown)  # before the requests in flight are drained
    app.on_cleanup.append(on_cleanup)
    loop = None
    with contextlib.suppress(ImportError):
        import uvloop

        loop = uvloop.new_event_loop()
    serve(app, settings.host, settings.port, on_listening, loop=loop)


def _raise_fd_limit() -> None:
    """Raise the soft open-files limit to the hard one, as nginx's ``worker_rlimit_nofile``
    does: each connection is a file descriptor, and the usual soft limit is 1024."""
    with contextlib.suppress(ImportError, OSError, ValueError):
        import resource

        soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
        if hard == resource.RLIM_INFINITY:
            hard = max(soft, LIMIT_NOFILE)
        if soft != resource.RLIM_INFINITY and soft < hard:
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))


@dataclass
class BackgroundResult:
    """A gateway started in the background."""

    name: str
    pid: int
    url: str
    log_path: str


def start_background(settings: GatewaySettings, argv: list[str],
                     timeout: float = 60.0, env: dict[str, str] | None = None
                     ) -> BackgroundResult:
    """Run ``cmw-vllm gateway ARGV`` detached, logging to its log file; wait until it serves.

    Args:
        settings: What ARGV says (the name, where it listens).
        argv: The ``gateway`` command's options.
        timeout: Seconds to wait until it answers.
        env: Its environment (default: this one's).

    Raises:
        ConflictError: The name or the port is taken.
        ConfigError: The models file is invalid.
        ServerStartError: It exited before serving (the end of its log attached).
    """
    import subprocess

    from cmw_vllm.health_check import probe_health
    from cmw_vllm.vllm_engine import tail_lines

    _check_free(settings)
    _check_registry()
    for d in (paths.state_dir(), paths.servers_dir(), paths.logs_dir()):
        paths.ensure_dir(d)
    from cmw_vllm.server_record import rotate_log

    log_file = log_path(settings.name)
    rotate_log(log_file)  # refuses a symlink
    flags = os.O_WRONLY | os.O_CREAT | os.O_TRUNC | getattr(os, "O_NOFOLLOW", 0)
    fd = os.open(log_file, flags, 0o600)
    try:
        proc = subprocess.Popen([sys.executable, "-m", "cmw_vllm", "gateway", *argv],
                                stdin=subprocess.DEVNULL, stdout=fd, stderr=subprocess.STDOUT,
                                cwd=str(paths.state_dir()), start_new_session=True,
                                close_fds=True, env=env)
    finally:
        os.close(fd)
    url = base_url(settings)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise ServerStartError(
                f"the gateway exited at once (exit code {proc.returncode}); log: {log_file}",
                log_tail="\n".join(tail_lines(Path(log_file), 15)))
        with contextlib.suppress(ValueError):
            record = read_record(settings.name)
            if record is not None and record.pid == proc.pid \
                    and probe_health(url, 1.0) == 200:
                return BackgroundResult(settings.name, proc.pid, url, str(log_file))
        time.sleep(0.1)
    raise ServerStartError(f"the gateway does not answer after {timeout:g}s; log: {log_file}",
                           log_tail="\n".join(tail_lines(Path(log_file), 15)))


def settings_to_enable(name: str) -> GatewaySettings | None:
    """What ``enable NAME`` runs when NAME is a gateway: its record's or last run's settings;
    for the default name with no server or entry of that name, the default gateway's.

    Returns None when NAME is no gateway (``enable`` then looks for a server).

    Raises:
        ConfigError: The kept settings are invalid, or it ran with keys that are not at hand.
    """
    from cmw_vllm import last_start
    from cmw_vllm.gateway.settings import DEFAULT_NAME

    known = find_gateway(name)
    if known is not None:
        return replace(known.settings, api_keys=keys_at_hand(known))
    if name != DEFAULT_NAME or last_start.load_settings(name) is not None:
        return None
    with contextlib.suppress(ValueError):
        if read_record(name) is not None:
            return None
    from cmw_vllm.model_registry import find_entry

    if find_entry(name) is not None:
        return None
    from cmw_vllm.gateway.settings import load_api_keys

    return GatewaySettings(name=name, api_keys=load_api_keys())


def enable_unit(settings: GatewaySettings, *, system: bool = False) -> UnitFiles:
    """Write the systemd unit that runs gateway ``settings`` in the foreground.

    The unit runs ``cmw-vllm gateway`` with the settings' options; keys come from the 0600
    env file (the environment's ``CMW_VLLM_GATEWAY_API_KEYS``, the upstream ``VLLM_API_KEY``)
    or the key file the options name, never from the unit. ``TimeoutStopSec`` covers
    :func:`shutdown_budget`; ``LimitNOFILE`` allows ``LIMIT_NOFILE`` connections.

    Raises:
        EnvironmentProblem: The unit directory is not writable (system units need root).
    """
    from cmw_vllm import systemd_unit

    env_path = systemd_unit.write_env_file(settings.name, dict(os.environ))
    text = systemd_unit.render(
        description=f"cmw-vllm gateway ({settings.name}, {base_url(settings)})",
        args=["gateway", *settings.cli_args()],
        own_stop_s=shutdown_budget(grace=settings.shutdown_grace),
        start_s=START_TIMEOUT_S, system=system, env_path=env_path, limit_nofile=LIMIT_NOFILE)
    return systemd_unit.install(settings.name, text, system=system, definition=None,
                                env_path=env_path)


def restart(known: KnownGateway, *, drain: float | None = None,
            timeout: float = 60.0) -> BackgroundResult:
    """Stop gateway ``known`` if it runs in the background, and run it again there with the
    same settings (also after a stop).

    Raises:
        ConflictError: It runs in the foreground (a terminal or its systemd unit): restart
            it there.
        ConfigError: It ran with API keys that are not at hand.
        ServerStartError: The new gateway exited before serving.
    """
    from cmw_vllm import last_start
    from cmw_vllm.server_manager import ServerManager
    from cmw_vllm.systemd_unit import enabled_scope, unit_name

    name = known.settings.name
    manager = ServerManager()
    record = known.record
    if record is not None and record.foreground \
            and manager.get_status(name, check_health=False).running:
        scope = enabled_scope(name)
        ctl = "systemctl" if scope == "system" else "systemctl --user"
        raise ConflictError(
            f"gateway {name!r} runs in the foreground (pid {record.pid}); restart it where "
            "it runs",
            hint=f"{ctl} restart {unit_name(name)}" if scope else
            f"Ctrl-C it, or `cmw-vllm stop {name}`, then run `cmw-vllm gateway` again",
        )
    settings = replace(known.settings, api_keys=keys_at_hand(known))
    env = dict(os.environ)
    upstream = last_start.api_key_for_restart(name)
    if upstream:
        env[last_start.API_KEY_VAR] = upstream
    if record is not None:
        manager.stop(name, drain=drain)
    return start_background(settings, settings.cli_args(), timeout=timeout, env=env)


@dataclass
class GatewayCheck:
    """What ``test`` found at a gateway: it answers, and the models it lists."""

    name: str
    url: str
    models: list[dict[str, Any]]
    total_s: float

    @property
    def running(self) -> int:
        """How many of its models have a server that serves now."""
        from cmw_vllm.gateway.pool import READY

        return sum(1 for m in self.models if m.get("state") == READY)

    def to_json(self) -> dict[str, Any]:
        """Stable keys for ``test --json``."""
        return {"ok": True, "task": GATEWAY_TASK, "url": self.url,
                "models": [{"id": m.get("id"), "state": m.get("state")} for m in self.models],
                "total_s": round(self.total_s, 3)}


def check(record: ServerRecord, timeout: float = 10.0,
          environ: Mapping[str, str] | None = None) -> GatewayCheck:
    """``test`` for a gateway: ``/health`` answers 200 and ``/v1/models`` lists its models
    (with one of its keys when it has keys: the environment's or its key file's).

    Raises:
        ServerRequestError: It does not answer, refuses the key, or answers an error.
    """
    import urllib.error
    import urllib.request

    from cmw_vllm.errors import ServerRequestError
    from cmw_vllm.gateway.settings import KEYS_ENV, load_api_keys

    begin = time.monotonic()
    file_name = record.config.get("api_key_file")
    keys = sorted(load_api_keys(file_name if isinstance(file_name, str) else None,
                                dict(os.environ if environ is None else environ)))
    url = record.base_url
    headers = {"Authorization": f"Bearer {keys[0]}"} if keys else {}
    request = urllib.request.Request(url + "/v1/models", headers=headers)
    try:
        with urllib.request.urlopen(request, timeout=timeout) as resp:
            body = json.loads(resp.read())
    except urllib.error.HTTPError as exc:
        hint = f"set {KEYS_ENV} to one of its keys" if exc.code == 401 else \
            f"see `cmw-vllm logs {record.name}`"
        raise ServerRequestError(f"gateway {record.name!r} answered {exc.code} to "
                                 "GET /v1/models", hint=hint, status=exc.code) from None
    except (OSError, ValueError) as exc:
        raise ServerRequestError(f"gateway {record.name!r} at {url} does not answer: {exc}",
                                 hint=f"see `cmw-vllm logs {record.name}`") from None
    models = body.get("data") if isinstance(body, dict) else None
    if not isinstance(models, list):
        raise ServerRequestError(f"gateway {record.name!r} sent no model list")
    return GatewayCheck(record.name, url, models, time.monotonic() - begin)
