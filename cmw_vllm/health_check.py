"""Talking to a running vLLM server over HTTP: liveness, readiness, models, load.

:func:`probe_health` uses the standard library only (it runs in ``start``'s readiness loop
and in ``status``, which must stay fast); richer calls import requests where needed.
"""

from __future__ import annotations


def probe_health(base_url: str, timeout: float = 2.0) -> int | None:
    """GET ``/health`` once.

    Args:
        base_url: ``http://host:port`` of the server.
        timeout: Seconds for connect and read together (bounded: a server that accepts
            connections and never answers costs at most this).

    Returns:
        The HTTP status code, or None when nothing answered (refused, reset, timeout).
    """
    import http.client
    from urllib.parse import urlsplit

    parts = urlsplit(base_url)
    conn = http.client.HTTPConnection(parts.hostname or "127.0.0.1", parts.port or 80,
                                      timeout=timeout)
    try:
        conn.request("GET", "/health")
        return conn.getresponse().status
    except (OSError, http.client.HTTPException):
        return None
    finally:
        conn.close()
