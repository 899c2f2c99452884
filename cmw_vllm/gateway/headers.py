"""Which request and response headers cross the gateway, as a reverse proxy should pass them.

- Hop-by-hop headers (RFC 9110 7.6.1) and every header the ``Connection`` header names are
  dropped both ways, as nginx and Envoy do.
- ``X-Forwarded-For`` carries the address the gateway itself sees: a client's own
  ``X-Forwarded-For`` (and ``Forwarded``, ``X-Real-IP``, ``X-Forwarded-Proto``/``-Host``)
  is kept only when the peer is a trusted proxy (``trusted_proxies``, empty by default),
  and the peer is then appended (nginx ``real_ip`` + ``$proxy_add_x_forwarded_for``, Envoy
  ``xff_num_trusted_hops``). vLLM's uvicorn trusts ``X-Forwarded-For`` from loopback, so a
  client's claim would otherwise become the address vLLM logs.
- The client's credentials never reach a server; the gateway's upstream key does.
- Header values that are not UTF-8 (obs-text such as ``\\xff``) are refused with a 400:
  aiohttp's client cannot send them unchanged.
"""

from __future__ import annotations

import hmac
import ipaddress
from collections.abc import Iterable, Mapping
from typing import Any

from cmw_vllm.errors import GatewayRefusal as Refusal

HOP_BY_HOP = frozenset({
    "connection", "proxy-connection", "keep-alive", "proxy-authenticate",
    "proxy-authorization", "te", "trailer", "transfer-encoding", "upgrade",
})
# Also not forwarded: the client's credentials, and what aiohttp computes itself; the body
# goes on decoded (gateway.body), so without its Content-Encoding.
DROP_REQUEST = HOP_BY_HOP | {"host", "content-length", "authorization", "x-api-key", "expect",
                             "content-encoding"}
DROP_RESPONSE = HOP_BY_HOP | {"content-length", "server", "date"}
# Claims about the client that only a trusted proxy may make.
FORWARDING = frozenset({"x-forwarded-for", "forwarded", "x-real-ip", "x-forwarded-proto",
                        "x-forwarded-host"})


class TrustedProxies:
    """Addresses and networks whose forwarding headers are believed.

    Args:
        specs: Addresses or CIDR networks (``10.0.0.0/8``, ``::1``).

    Raises:
        ValueError: A spec is neither.
    """

    def __init__(self, specs: Iterable[str]) -> None:
        self.networks = tuple(ipaddress.ip_network(s.strip(), strict=False)
                              for s in specs if s.strip())

    def __bool__(self) -> bool:
        return bool(self.networks)

    def contains(self, addr: str) -> bool:
        """Whether ``addr`` is one of the trusted proxies."""
        if not self.networks:
            return False
        try:
            ip = ipaddress.ip_address(addr)
        except ValueError:
            return False
        return any(ip in net for net in self.networks)


def presented_key(headers: Mapping[str, str]) -> str:
    """The key a request presents: ``Authorization: Bearer KEY`` or ``x-api-key: KEY``."""
    given = headers.get("Authorization", "")
    token = given[7:].strip() if given[:7].lower() == "bearer " else ""
    return token or headers.get("x-api-key", "").strip()


def key_matches(token: str, keys: frozenset[str]) -> bool:
    """Whether ``token`` is one of ``keys``, compared in constant time."""
    # Header bytes that are not UTF-8 arrive as surrogates: compare them as the bytes they were.
    encoded = token.encode("utf-8", "surrogateescape")
    return any(hmac.compare_digest(encoded, key.encode()) for key in keys)


def key_ok(headers: Mapping[str, str], keys: frozenset[str]) -> bool:
    """Whether a request with ``headers`` presents one of ``keys``."""
    token = presented_key(headers)
    return bool(token) and key_matches(token, keys)


def connection_tokens(headers: Mapping[str, str] | Any) -> set[str]:
    """The header names a ``Connection`` header lists (lower case)."""
    values = headers.getall("Connection", ()) if hasattr(headers, "getall") else \
        [headers.get("Connection", "")]
    return {t.strip().lower() for v in values for t in v.split(",") if t.strip()}


def forward_headers(headers: Any, peer: str, upstream_key: str | None,
                    trusted: TrustedProxies) -> list[tuple[str, str]]:
    """The headers to send upstream for a request with ``headers`` from ``peer``.

    Raises:
        Refusal: A header value is not UTF-8 (400).
    """
    drop = DROP_REQUEST
    if "Connection" in headers:
        drop = drop | connection_tokens(headers)
    believed = trusted.contains(peer)
    if not believed:
        drop = drop | FORWARDING
    out = []
    prior: list[str] = []
    for name, value in headers.items():
        lower = name.lower()
        if lower in drop:
            continue
        if not value.isascii():
            _check_utf8(name, value)
        if lower == "x-forwarded-for":
            prior.append(value)
            continue
        out.append((name, value))
    chain = ", ".join([*prior, peer] if peer else prior)
    if chain:
        out.append(("X-Forwarded-For", chain))
    if upstream_key:
        out.append(("Authorization", f"Bearer {upstream_key}"))
    return out


def _check_utf8(name: str, value: str) -> None:
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        raise Refusal(400, f"request header {name[:64]!r} is not valid UTF-8",
                      "BadRequestError") from None


def reply_headers(headers: Any) -> dict[str, str]:
    """The headers of a server's answer that go back to the client.

    Raises:
        Refusal: A value holds a CR or LF (a 502: relayed, it would split the answer).
    """
    drop = DROP_RESPONSE
    if "Connection" in headers:
        drop = drop | connection_tokens(headers)
    kept = {k: v for k, v in headers.items() if k.lower() not in drop}
    for value in kept.values():
        if "\n" in value or "\r" in value:
            raise Refusal(502, "the server's answer has a header with a line break",
                          "BadGatewayError")
    return kept
