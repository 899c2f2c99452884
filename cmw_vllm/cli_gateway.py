"""CLI command ``gateway``: one OpenAI endpoint for every model (see :mod:`cmw_vllm.gateway`)."""

from __future__ import annotations

from typing import TYPE_CHECKING

import click

from cmw_vllm.cli_common import echo_err, echo_json
from cmw_vllm.errors import CmwVllmError, UsageError
from cmw_vllm.gateway.settings import DEFAULT_MAX_BUFFERED_MB, MAX_BUFFERED_ENV
from cmw_vllm.vocab import PORT_MAX, PORT_MIN

if TYPE_CHECKING:
    from cmw_vllm.gateway.service import BackgroundResult


@click.command(context_settings={"help_option_names": ["-h", "--help"]})
@click.option("--host", default="127.0.0.1", show_default=True, help="Address to bind.")
@click.option("--port", type=click.IntRange(PORT_MIN, PORT_MAX), default=4000, show_default=True,
              help="Port to listen on.")
@click.option("--name", default="gateway", show_default=True,
              help="Its name in `status` and `stop`.")
@click.option("--idle-timeout", type=click.FloatRange(min=0), default=600.0,
              show_default=True,
              help="Stop a server the gateway started after this many seconds without "
              "requests (0: never). A models.toml entry's idle_timeout overrides it.")
@click.option("--start-timeout", type=click.FloatRange(min=0, min_open=True), default=600.0,
              show_default=True, help="Seconds a request waits for its model to start (503 "
              "with Retry-After after that).")
@click.option("--queue-limit", type=click.IntRange(min=1), default=512, show_default=True,
              help="Requests that may wait for one model to start (429 beyond).")
@click.option("--max-body-mb", type=click.FloatRange(min=0, min_open=True), default=64.0,
              show_default=True, help="Largest request body in MiB (413 beyond).")
@click.option("--max-buffered-mb", type=click.FloatRange(min=0),
              default=float(DEFAULT_MAX_BUFFERED_MB), show_default=True,
              envvar=MAX_BUFFERED_ENV, show_envvar=True,
              help="MiB of request bodies held in memory, all together, while their models "
              "start (503 with Retry-After beyond; 0: no cap).")
@click.option("--upstream-timeout", type=click.FloatRange(min=0, min_open=True),
              default=600.0, show_default=True,
              help="Seconds a server may send nothing before the request is given up.")
@click.option("--header-timeout", type=click.FloatRange(min=0), default=60.0,
              show_default=True, help="Seconds a connection has to send its request head "
              "(nginx's client_header_timeout; 0: none).")
@click.option("--body-timeout", type=click.FloatRange(min=0), default=60.0, show_default=True,
              help="Seconds a request body may send nothing before a 408 (nginx's "
              "client_body_timeout; 0: none).")
@click.option("--max-client-connections", type=click.IntRange(min=0), default=512,
              show_default=True, help="Connections one client address may hold, at most a "
              "quarter of the open-files limit; more get a 503 (0: no cap; trusted proxies "
              "are exempt).")
@click.option("--trusted-proxy", "trusted_proxies", multiple=True, metavar="ADDR[/BITS]",
              help="A proxy whose X-Forwarded-For is believed (repeatable; default none: "
              "X-Forwarded-For is the peer's address).")
@click.option("--shutdown-grace", type=click.FloatRange(min=0), default=10.0,
              show_default=True, help="Seconds requests in flight get to finish on SIGTERM "
              "before they are cut.")
@click.option("--max-log-mb", type=click.FloatRange(min=0, min_open=True), default=16.0,
              show_default=True, help="Rotate the gateway's log at this size in MiB "
              "(NAME.log.1 ... .5 are kept).")
@click.option("--adopt", is_flag=True,
              help="Also idle-stop and evict servers started by hand (default: never touched).")
@click.option("--api-key-file", type=click.Path(dir_okay=False),
              help="File of gateway API keys, one per line, mode 0600 (or "
              "CMW_VLLM_GATEWAY_API_KEY_FILE; keys also from CMW_VLLM_GATEWAY_API_KEYS).")
@click.option("--admin-key-file", type=click.Path(dir_okay=False),
              help="File of the dashboard's admin key (/ui/ and /api/), mode 0600, separate "
              "from the API keys (or CMW_VLLM_GATEWAY_ADMIN_KEY_FILE).")
@click.option("--allowed-hosts", envvar="CMW_VLLM_GATEWAY_ALLOWED_HOSTS", default="",
              help="Host names to serve besides IP addresses, localhost, this machine's name "
              "and --host (comma-separated; .example.com for subdomains, * for any). Other "
              "names get a 403 (DNS rebinding).")
@click.option("--allowed-origins", envvar="CMW_VLLM_GATEWAY_ALLOWED_ORIGINS", default="",
              help="Web page origins that may use the gateway from a browser, CORS included "
              "(comma-separated scheme://host[:port], * for any; default none: cross-site "
              "browser requests get a 403).")
@click.option("--upstream", "upstreams", multiple=True, metavar="NAME[,NAME...]=URL",
              help="A fixed server and the model names it serves (repeatable). With it, "
              "these are the only servers: none is started, stopped or found among the "
              "records (for Kubernetes, which runs them: `cmw-vllm export k8s --gateway`).")
@click.option("-d", "--background", is_flag=True,
              help="Run detached; `cmw-vllm status` shows it, `cmw-vllm stop NAME` stops it.")
@click.option("--json", "as_json", is_flag=True, help="With --background: print JSON.")
def gateway(host: str, port: int, name: str, idle_timeout: float, start_timeout: float,
            queue_limit: int, max_body_mb: float, max_buffered_mb: float,
            upstream_timeout: float,
            header_timeout: float, body_timeout: float, max_client_connections: int,
            trusted_proxies: tuple[str, ...], shutdown_grace: float, max_log_mb: float,
            adopt: bool, api_key_file: str | None, admin_key_file: str | None,
            allowed_hosts: str, allowed_origins: str, upstreams: tuple[str, ...],
            background: bool, as_json: bool) -> None:
    """Serve every model on one OpenAI-compatible endpoint, starting them on demand.

    A request's `model` picks the server: a running server's name or served name, else a
    registry alias or models.toml entry, which is started (one start however many requests
    wait) and stopped again after --idle-timeout without requests. Servers started by hand
    are used but never stopped (unless --adopt). When a model does not fit, idle servers the
    gateway started are stopped, least recently used first. Unknown models get a 404.

    \b
    Examples:
      cmw-vllm gateway
      cmw-vllm gateway --port 4000 --idle-timeout 300 -d
      CMW_VLLM_GATEWAY_API_KEYS=sk-mine cmw-vllm gateway --host 0.0.0.0
      cmw-vllm gateway --upstream qwen=http://10.0.0.5:8000
      curl localhost:4000/v1/models

    The dashboard is at /ui/ (its control API under /api/, with the admin key).
    """
    import logging
    import os

    from cmw_vllm.gateway.settings import (
        ADMIN_KEY_FILE_ENV,
        KEY_FILE_ENV,
        GatewaySettings,
        load_admin_keys,
        load_api_keys,
        parse_upstream,
    )
    from cmw_vllm.settings import api_key
    from cmw_vllm.vocab import LOOPBACK, validate_name

    validate_name(name)
    if as_json and not background:
        raise UsageError("--json goes with --background")
    from cmw_vllm.gateway.headers import TrustedProxies

    try:
        TrustedProxies(trusted_proxies)
    except ValueError as exc:
        raise UsageError(f"--trusted-proxy: {exc}") from None
    for upstream in upstreams:
        parse_upstream(upstream)  # a malformed one: one line, exit code
    key_file = api_key_file or os.environ.get(KEY_FILE_ENV) or None
    admin_file = admin_key_file or os.environ.get(ADMIN_KEY_FILE_ENV) or None
    api_keys = load_api_keys(api_key_file)
    settings = GatewaySettings(
        host=host, port=port, name=name, idle_timeout=idle_timeout,
        start_timeout=start_timeout, queue_limit=queue_limit,
        max_body_bytes=int(max_body_mb * 1024 * 1024),
        max_buffered_bytes=int(max_buffered_mb * 1024 * 1024), upstream_timeout=upstream_timeout,
        adopt=adopt, api_keys=api_keys, upstream_key=api_key(),
        api_key_file=os.path.abspath(os.path.expanduser(key_file)) if key_file else None,
        header_timeout=header_timeout, body_timeout=body_timeout,
        max_client_connections=max_client_connections,
        trusted_proxies=tuple(p.strip() for p in trusted_proxies),
        shutdown_grace=shutdown_grace, max_log_bytes=int(max_log_mb * 1024 * 1024),
        allowed_hosts=allowed_hosts, allowed_origins=allowed_origins,
        upstreams=tuple(u.strip() for u in upstreams),
        admin_keys=load_admin_keys(admin_file, api_keys=api_keys),
        admin_key_file=os.path.abspath(os.path.expanduser(admin_file)) if admin_file else None,
    )
    from cmw_vllm.gateway.origin import WebGate

    WebGate.from_settings(settings)  # a malformed host or origin: one line, exit code
    if host not in LOOPBACK and not settings.api_keys:
        echo_err(f"Warning: binding to {host} without a gateway API key: anyone who can reach "
                 "this machine can use every model (set CMW_VLLM_GATEWAY_API_KEYS or "
                 "--api-key-file).")
    if background:
        from cmw_vllm.gateway.service import start_background

        render_background(start_background(settings, settings.cli_args()), as_json)
        return
    from cmw_vllm.gateway.service import run_foreground

    gateway_logger = logging.getLogger("cmw_vllm")
    if gateway_logger.level > logging.INFO and not os.environ.get("LOG_LEVEL"):
        gateway_logger.setLevel(logging.INFO)
    run_foreground(settings)


def render_background(result: BackgroundResult, as_json: bool) -> None:
    """Say where a gateway started in the background serves (``gateway -d``, ``restart``)."""
    if as_json:
        echo_json({"name": result.name, "pid": result.pid, "url": result.url,
                   "dashboard": f"{result.url}/ui/", "log": result.log_path})
        return
    click.echo(f"Gateway {result.name!r} is running (pid {result.pid}) on {result.url}/v1")
    click.echo(f"  Dashboard: {result.url}/ui/")
    click.echo(f"  Log:  {result.log_path}")
    click.echo(f"  Stop: cmw-vllm stop {result.name}")


def not_a_model(name: str, command: str) -> None:
    """For ``verify`` and ``estimate``, which take a model: say so when NAME is a gateway.

    Raises:
        UsageError: NAME is a gateway.
    """
    from cmw_vllm.gateway.service import find_gateway

    try:
        known = find_gateway(name)
    except CmwVllmError:
        return
    if known is not None:
        raise UsageError(f"{name!r} is a gateway, not a model: {command} takes a registry "
                         "alias, a Hugging Face id or a model directory",
                         hint="`cmw-vllm list` shows the aliases the gateway serves")


COMMANDS: list[click.Command] = [gateway]
