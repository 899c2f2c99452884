"""Which web pages may reach the gateway: the ``Host`` and ``Origin`` checks.

A browser lets any web page send requests to the gateway on loopback; two attacks follow
(Ollama's CVE-2024-28224 is the first):

- **DNS rebinding**: a page at ``http://evil.example:4000`` makes its name resolve to
  127.0.0.1 and then reads the gateway's answers as its own (same origin). Its requests
  carry ``Host: evil.example:4000``, so only known host names are served: an IP address,
  ``localhost`` (and ``*.localhost``), the machine's host name, the name the gateway is
  bound to, and the names in ``--allowed-hosts`` (``*``: any).
- **Cross-site requests**: any page may POST a ``text/plain`` body (no CORS preflight) and
  so start models, or read answers when the gateway would grant CORS. A request whose
  ``Origin`` is not the gateway's own nor in ``--allowed-origins`` (none by default, ``*``
  any), or that a browser marks ``Sec-Fetch-Site: cross-site``, is refused. Preflights are
  answered for the allowed origins only, and only their requests get CORS headers.

A refusal is a 403 with an OpenAI-style JSON body. Clients that are not browsers send
neither ``Origin`` nor ``Sec-Fetch-Site`` and are not affected.
"""

from __future__ import annotations

import ipaddress
import re
import socket
from dataclasses import dataclass
from typing import Any

from aiohttp import web

from cmw_vllm.errors import ConfigError
from cmw_vllm.gateway.settings import GatewaySettings

ANY = "*"
WILDCARD_BINDS = frozenset({"", "0.0.0.0", "::"})
_ORIGIN = re.compile(r"[a-z][a-z0-9+.-]*://[a-z0-9._~%!$&'()*+,;=:\[\]-]+")
_HOST_NAME = re.compile(r"\.?[a-z0-9_-]+(\.[a-z0-9_-]+)*")
_HEADER_LIST = re.compile(r"[A-Za-z0-9!#$%&'*+.^_`|~-]+(\s*,\s*[A-Za-z0-9!#$%&'*+.^_`|~-]+)*")
PREFLIGHT_HEADERS = "Authorization, Content-Type, X-Api-Key"
PREFLIGHT_MAX_AGE = "600"


def _items(text: str) -> list[str]:
    return [part.strip().lower() for part in text.split(",") if part.strip()]


def split_host(host: str) -> str:
    """The name or address of a ``Host`` header, without port, brackets or final dot."""
    host = host.strip().lower()
    if host.startswith("["):
        return host[1:host.find("]")] if "]" in host else host[1:]
    if host.count(":") == 1:
        host = host.split(":", 1)[0]
    return host.rstrip(".")


def _is_address(host: str) -> bool:
    try:
        ipaddress.ip_address(host)
    except ValueError:
        return False
    return True


@dataclass(frozen=True)
class WebGate:
    """The allowed host names and origins of one gateway.

    Attributes:
        any_host: ``--allowed-hosts *``: every ``Host`` is served.
        names: Host names served (lower case, no port).
        suffixes: Domain suffixes served (``.example.com`` serves its subdomains).
        any_origin: ``--allowed-origins *``: every origin may use the gateway.
        origins: Origins allowed (``scheme://host[:port]``, lower case).
    """

    any_host: bool
    names: frozenset[str]
    suffixes: tuple[str, ...]
    any_origin: bool
    origins: frozenset[str]

    @classmethod
    def from_settings(cls, settings: GatewaySettings) -> WebGate:
        """The gate that ``settings`` ask for.

        Raises:
            ConfigError: An allowed host or origin is malformed.
        """
        hosts = _items(settings.allowed_hosts)
        origins = _items(settings.allowed_origins)
        for host in hosts:
            if host != ANY and not _HOST_NAME.fullmatch(host) and not _is_address(host):
                raise ConfigError(f"allowed host {host!r} is not a host name (no scheme, no "
                                  "port; `.example.com` for its subdomains, `*` for any)")
        for origin in origins:
            if origin not in (ANY, "null") and not _ORIGIN.fullmatch(origin):
                raise ConfigError(f"allowed origin {origin!r} is not an origin "
                                  "(scheme://host[:port], `*` for any)")
        names = {"localhost", "127.0.0.1", "::1", socket.gethostname().lower()}
        bound = split_host(settings.host)
        if bound not in WILDCARD_BINDS:
            names.add(bound)
        names.update(h for h in hosts if h != ANY and not h.startswith("."))
        return cls(any_host=ANY in hosts, names=frozenset(names),
                   suffixes=(".localhost", *(h for h in hosts if h.startswith("."))),
                   any_origin=ANY in origins,
                   origins=frozenset(o.rstrip("/") for o in origins if o != ANY))

    @property
    def open(self) -> bool:
        """True when nothing is checked (any host, any origin)."""
        return self.any_host and self.any_origin

    def host_ok(self, host: str | None) -> bool:
        """Whether a request with this ``Host`` header may be served."""
        if not host or self.any_host:
            return True  # no Host: HTTP/1.0, not a browser
        name = split_host(host)
        return (name in self.names or name.endswith(self.suffixes) or _is_address(name))

    def listed(self, origin: str) -> bool:
        """Whether ``origin`` is an allowed cross-origin caller (CORS is granted to it)."""
        return self.any_origin or origin.lower() in self.origins

    def origin_ok(self, origin: str, host: str | None) -> bool:
        """Whether a request from a page of ``origin`` may be served: the gateway's own
        origin, or an allowed one."""
        if self.listed(origin):
            return True
        own = origin.lower().partition("://")[2]
        return bool(host) and own == (host or "").strip().lower()


GATE_KEY: web.AppKey[WebGate] = web.AppKey("web_gate", WebGate)


def _refuse(message: str) -> web.Response:
    return web.json_response({"error": {"message": message, "type": "PermissionDeniedError",
                                        "param": None, "code": 403}}, status=403)


def _shown(value: str) -> str:
    return repr(value[:100])


def _preflight(request: web.Request, origin: str) -> web.Response:
    asked = request.headers.get("Access-Control-Request-Headers", "").strip()
    allowed = asked if asked and _HEADER_LIST.fullmatch(asked) else PREFLIGHT_HEADERS
    return web.Response(status=204, headers={
        "Access-Control-Allow-Origin": origin,
        "Access-Control-Allow-Methods": "GET, POST",
        "Access-Control-Allow-Headers": allowed,
        "Access-Control-Max-Age": PREFLIGHT_MAX_AGE,
        "Vary": "Origin, Access-Control-Request-Method, Access-Control-Request-Headers",
    })


@web.middleware
async def web_gate_middleware(request: web.Request, handler: Any) -> web.StreamResponse:
    """Refuse requests for unknown host names and cross-site browser requests; answer the
    CORS preflights of allowed origins (before the key check: browsers send no key then)."""
    gate = request.app[GATE_KEY]
    headers = request.headers
    host = headers.get("Host")
    if not gate.host_ok(host):
        return _refuse(f"host {_shown(host or '')} is not served by this gateway (DNS "
                       "rebinding?); allow it with --allowed-hosts")
    origin = headers.get("Origin")
    if origin is not None:
        if not gate.origin_ok(origin, host):
            return _refuse(f"requests from web pages at {_shown(origin)} are not allowed; "
                           "allow the origin with --allowed-origins")
        if request.method == "OPTIONS" and "Access-Control-Request-Method" in headers:
            return _preflight(request, origin)
    elif headers.get("Sec-Fetch-Site") == "cross-site":
        return _refuse("cross-site requests from web pages are not allowed")
    return await handler(request)


async def _cors_headers(request: web.Request, response: web.StreamResponse) -> None:
    origin = request.headers.get("Origin")
    if origin is None or not request.app[GATE_KEY].listed(origin):
        return
    response.headers["Access-Control-Allow-Origin"] = origin
    vary = response.headers.get("Vary")
    response.headers["Vary"] = f"{vary}, Origin" if vary else "Origin"


def install(app: web.Application, settings: GatewaySettings) -> WebGate:
    """Put the gate first among the middlewares of ``app`` (not at all when every host and
    origin is allowed), and the CORS headers on the answers to allowed origins; returns
    the gate.

    Raises:
        ConfigError: An allowed host or origin is malformed.
    """
    gate = WebGate.from_settings(settings)
    app[GATE_KEY] = gate
    if not gate.open:
        app.middlewares.insert(0, web_gate_middleware)
    if gate.any_origin or gate.origins:
        app.on_response_prepare.append(_cors_headers)
    return gate
