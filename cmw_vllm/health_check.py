"""Talking to a running vLLM server over HTTP: health and load.

Everything here uses the standard library's ``http.client``: these calls run in ``start``'s
readiness loop and in ``status`` (and ``status --watch``), which must stay fast and must not
import requests. Every request has a total deadline (connect, send and the whole body), so a
server that accepts connections and never answers costs at most ``timeout`` seconds.

Load comes from ``/metrics`` (Prometheus text). Throughput needs two scrapes; the last few
scrapes of each server are kept in ``<state dir>/metrics/NAME.json`` so that one scrape per
``status`` call is enough to show recent tokens per second.
"""

from __future__ import annotations

import json
import logging
import math
import time
from collections.abc import Iterable, Mapping
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from cmw_vllm.errors import CmwVllmError, ServerRequestError

if TYPE_CHECKING:
    from cmw_vllm.server_record import ServerRecord

logger = logging.getLogger(__name__)

# Metric names (vLLM 0.32.0); the older cache gauge is read when the current one is absent.
M_RUNNING = "vllm:num_requests_running"
M_WAITING = "vllm:num_requests_waiting"
M_KV_USAGE = "vllm:kv_cache_usage_perc"
M_KV_USAGE_OLD = "vllm:gpu_cache_usage_perc"
M_PROMPT_TOKENS = "vllm:prompt_tokens_total"
M_GENERATION_TOKENS = "vllm:generation_tokens_total"

# Stored scrapes: how many per server, how old the oldest may be, and the shortest interval
# a rate is computed over (shorter intervals are dominated by batching noise).
HISTORY_SIZE = 8
HISTORY_MAX_AGE_S = 600.0
MIN_RATE_INTERVAL_S = 1.0
_MAX_BODY = 16 * 1024 * 1024


# --------------------------------------------------------------------------- HTTP


@dataclass
class HttpResponse:
    """A complete response to one GET."""

    status: int
    body: bytes
    elapsed_s: float


def auth_headers(api_key: str | None) -> dict[str, str]:
    """``Authorization: Bearer KEY`` when ``api_key`` is set, else nothing."""
    return {"Authorization": f"Bearer {api_key}"} if api_key else {}


def http_get(
    base_url: str,
    path: str,
    timeout: float,
    headers: Mapping[str, str] | None = None,
) -> HttpResponse:
    """GET ``base_url + path`` within ``timeout`` seconds in all (connect, send, whole body).

    Args:
        base_url: ``http://host:port`` of the server.
        path: Request path, e.g. ``/metrics``.
        timeout: Total seconds the request may take.
        headers: Extra request headers.

    Returns:
        The status, the body and the time taken (any status, 4xx/5xx included).

    Raises:
        ServerRequestError: Nothing answered (refused, reset) or the deadline passed.
    """
    import http.client
    from urllib.parse import urlsplit

    parts = urlsplit(base_url)
    if parts.scheme == "https":
        conn: http.client.HTTPConnection = http.client.HTTPSConnection(
            parts.hostname or "127.0.0.1", parts.port or 443, timeout=timeout
        )
    else:
        conn = http.client.HTTPConnection(
            parts.hostname or "127.0.0.1", parts.port or 80, timeout=timeout
        )
    prefix = parts.path.rstrip("/")
    begin = time.monotonic()
    deadline = begin + timeout

    def remaining() -> float:
        left = deadline - time.monotonic()
        if left <= 0:
            raise TimeoutError("deadline passed")
        return left

    try:
        conn.request("GET", prefix + path, headers=dict(headers or {}))
        # Keep our own reference: the connection drops it when the response will close.
        sock = conn.sock
        if sock is not None:
            sock.settimeout(remaining())
        resp = conn.getresponse()
        chunks: list[bytes] = []
        size = 0
        # A response that ends the connection (HTTP/1.0, ``Connection: close``) closes the
        # socket once its body is read: touch the socket only while it is open.
        while not resp.isclosed():
            left = remaining()
            if sock is not None and sock.fileno() != -1:
                sock.settimeout(left)
            chunk = resp.read1(65536)
            if not chunk:
                break
            chunks.append(chunk)
            size += len(chunk)
            if size > _MAX_BODY:
                raise ServerRequestError(f"{base_url}{path}: response larger than 16 MiB")
        return HttpResponse(resp.status, b"".join(chunks), time.monotonic() - begin)
    except TimeoutError:
        raise ServerRequestError(
            f"{base_url}{path} did not answer within {timeout:g}s",
            hint="the server may be overloaded or stuck; see its log",
        ) from None
    except ConnectionRefusedError:
        raise ServerRequestError(f"nothing listens at {base_url} (connection refused)") from None
    except (OSError, http.client.HTTPException) as exc:
        raise ServerRequestError(f"{base_url}{path}: {type(exc).__name__}: {exc}") from None
    finally:
        conn.close()


def probe_health(base_url: str, timeout: float = 2.0) -> int | None:
    """GET ``/health`` once, within ``timeout`` seconds in all (see :func:`http_get`).

    Args:
        base_url: ``http://host:port`` of the server.
        timeout: Total seconds: a server that accepts connections and never answers, or
            answers a byte at a time, costs at most this.

    Returns:
        The HTTP status code, or None when nothing answered (refused, reset, timeout).
    """
    try:
        return http_get(base_url, "/health", timeout).status
    except ServerRequestError:
        return None


# --------------------------------------------------------------------------- metrics


@dataclass(frozen=True)
class Sample:
    """One Prometheus sample: ``name{labels} value``."""

    name: str
    labels: dict[str, str]
    value: float


def _parse_labels(text: str, pos: int) -> tuple[dict[str, str], int]:
    """Parse ``{a="x",b="y"}`` starting at ``text[pos] == "{"``; return labels and end."""
    labels: dict[str, str] = {}
    i = pos + 1
    n = len(text)
    while i < n:
        while i < n and text[i] in " ,":
            i += 1
        if i < n and text[i] == "}":
            return labels, i + 1
        eq = text.index("=", i)
        key = text[i:eq].strip()
        i = eq + 1
        while i < n and text[i] == " ":
            i += 1
        if i >= n or text[i] != '"':
            raise ValueError("label value is not quoted")
        i += 1
        value: list[str] = []
        while i < n and text[i] != '"':
            if text[i] == "\\" and i + 1 < n:
                nxt = text[i + 1]
                value.append("\n" if nxt == "n" else nxt)
                i += 2
            else:
                value.append(text[i])
                i += 1
        if i >= n:
            raise ValueError("unterminated label value")
        labels[key] = "".join(value)
        i += 1
    raise ValueError("unterminated label set")


def parse_prometheus(text: str) -> list[Sample]:
    """Parse the Prometheus text exposition format (what ``/metrics`` returns).

    Comments, ``# HELP``/``# TYPE`` lines and malformed lines are skipped; label values may
    hold escaped quotes, backslashes, newlines, commas and braces; ``NaN`` and ``+Inf`` are
    read as floats; a trailing timestamp is ignored.
    """
    samples: list[Sample] = []
    for raw in text.splitlines():
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        try:
            brace = line.find("{")
            space = line.find(" ")
            if brace != -1 and (space == -1 or brace < space):
                name = line[:brace]
                labels, end = _parse_labels(line, brace)
                rest = line[end:].split()
            else:
                name, labels = line[:space], {}
                rest = line[space:].split()
            if not name or not rest:
                continue
            samples.append(Sample(name, labels, float(rest[0])))
        except ValueError:
            logger.debug("skipping unparsable metrics line: %r", raw[:200])
    return samples


def metric_values(samples: Iterable[Sample], name: str, **labels: str) -> list[float]:
    """Values of every sample called ``name`` whose labels include ``labels``."""
    return [
        s.value
        for s in samples
        if s.name == name and all(s.labels.get(k) == v for k, v in labels.items())
    ]


def _finite(values: list[float]) -> list[float]:
    return [v for v in values if math.isfinite(v)]


@dataclass
class MetricsSnapshot:
    """The load figures of one ``/metrics`` scrape, summed over engines (data parallel).

    Attributes:
        at: Wall-clock time of the scrape (``time.time()``).
        requests_running: Requests in the running batch.
        requests_waiting: Requests queued.
        kv_cache_usage: Fraction (0..1) of the KV cache in use (the fullest engine's).
        prompt_tokens: Prompt tokens processed since the server started (counter).
        generation_tokens: Tokens generated since the server started (counter).
    """

    at: float
    requests_running: float | None = None
    requests_waiting: float | None = None
    kv_cache_usage: float | None = None
    prompt_tokens: float | None = None
    generation_tokens: float | None = None


def snapshot_from_samples(samples: list[Sample], at: float,
                          model_name: str | None = None) -> MetricsSnapshot:
    """Reduce parsed samples to a :class:`MetricsSnapshot`.

    Args:
        samples: Parsed ``/metrics`` samples.
        at: Wall-clock time of the scrape.
        model_name: Count only samples labelled ``model_name=`` this (None: all).
    """
    flt = {"model_name": model_name} if model_name else {}

    def total(name: str) -> float | None:
        values = _finite(metric_values(samples, name, **flt))
        return sum(values) if values else None

    kv = _finite(metric_values(samples, M_KV_USAGE, **flt)) or _finite(
        metric_values(samples, M_KV_USAGE_OLD, **flt)
    )
    return MetricsSnapshot(
        at=at,
        requests_running=total(M_RUNNING),
        requests_waiting=total(M_WAITING),
        kv_cache_usage=max(kv) if kv else None,
        prompt_tokens=total(M_PROMPT_TOKENS),
        generation_tokens=total(M_GENERATION_TOKENS),
    )


def scrape_metrics(
    base_url: str, *, timeout: float = 2.0, model_name: str | None = None
) -> MetricsSnapshot:
    """Scrape ``/metrics`` once (vLLM serves it without the API key).

    Raises:
        ServerRequestError: No answer, an error status, or no vLLM metrics in the body.
    """
    at = time.time()
    resp = http_get(base_url, "/metrics", timeout)
    if resp.status != 200:
        raise ServerRequestError(f"{base_url}/metrics answered HTTP {resp.status}",
                                 status=resp.status)
    samples = parse_prometheus(resp.body.decode("utf-8", errors="replace"))
    snap = snapshot_from_samples(samples, at, model_name)
    if snap.generation_tokens is None and snap.requests_running is None and model_name:
        snap = snapshot_from_samples(samples, at)  # served under another label: take all
    if snap.generation_tokens is None and snap.requests_running is None:
        raise ServerRequestError(f"{base_url}/metrics has no vLLM metrics")
    return snap


@dataclass
class Throughput:
    """Token rates between two scrapes."""

    prompt_tokens_per_s: float | None
    generation_tokens_per_s: float | None
    interval_s: float


def throughput(earlier: MetricsSnapshot, later: MetricsSnapshot) -> Throughput | None:
    """Prompt and generation tokens per second between two scrapes of one server.

    Returns:
        The rates, or None when the interval is not positive or a counter went down (the
        server restarted in between, so the difference means nothing).
    """
    interval = later.at - earlier.at
    if interval <= 0 or _went_down(earlier, later):
        return None

    def rate(a: float | None, b: float | None) -> float | None:
        return None if a is None or b is None else (b - a) / interval

    return Throughput(
        prompt_tokens_per_s=rate(earlier.prompt_tokens, later.prompt_tokens),
        generation_tokens_per_s=rate(earlier.generation_tokens, later.generation_tokens),
        interval_s=interval,
    )


# --------------------------------------------------------------------------- stored scrapes


def metrics_dir() -> Path:
    """Where the last scrapes of each server are kept."""
    from cmw_vllm import paths

    return paths.state_dir() / "metrics"


def _history_path(name: str) -> Path:
    return metrics_dir() / f"{name}.json"


def load_history(name: str, server_id: str | None = None) -> list[MetricsSnapshot]:
    """The stored scrapes of server ``name``, oldest first (empty when none or unreadable).

    Args:
        name: Server name.
        server_id: Identity of the running server process; scrapes stored for another
            process (an earlier run of the same name) are ignored.
    """
    try:
        data = json.loads(_history_path(name).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return []
    if not isinstance(data, dict) or (server_id is not None and data.get("server") != server_id):
        return []
    out = []
    for item in data.get("scrapes") or []:
        if not isinstance(item, dict) or not isinstance(item.get("at"), (int, float)):
            continue
        fields: dict[str, Any] = {k: item.get(k) for k in MetricsSnapshot.__dataclass_fields__}
        if all(v is None or isinstance(v, (int, float)) for v in fields.values()):
            out.append(MetricsSnapshot(**fields))
    return sorted(out, key=lambda s: s.at)


def save_history(name: str, scrapes: list[MetricsSnapshot], server_id: str | None = None) -> None:
    """Store ``scrapes`` of server ``name`` atomically (temp file + ``os.replace``), mode 0600.

    Raises:
        EnvironmentProblem: The state dir or the file cannot be written.
    """
    from cmw_vllm import paths

    directory = paths.ensure_dir(metrics_dir())
    path = directory / f"{name}.json"
    text = json.dumps({"server": server_id, "scrapes": [asdict(s) for s in scrapes]}) + "\n"
    paths.write_private(path, text)


def remember_scrape(
    name: str,
    snap: MetricsSnapshot,
    server_id: str | None = None,
    *,
    min_interval: float = MIN_RATE_INTERVAL_S,
    max_age: float = HISTORY_MAX_AGE_S,
    store: bool = True,
) -> Throughput | None:
    """Rate since the newest stored scrape at least ``min_interval`` older, then store ``snap``.

    Keeping a few scrapes (not just one) lets ``status --watch`` refresh faster than
    ``min_interval`` and still show a rate, while single ``status`` calls minutes apart show
    the average since the previous call (up to ``max_age``).

    Args:
        name: Server name (the file name).
        snap: The scrape just taken.
        server_id: Identity of the running process (e.g. ``"pid:create_time"``).
        min_interval: Shortest interval a rate is computed over.
        max_age: Stored scrapes older than this are dropped.
        store: Write the updated history (False: read only).

    Returns:
        The rates, or None when there is no usable earlier scrape.
    """
    history = [
        s for s in load_history(name, server_id)
        if snap.at - max_age <= s.at < snap.at
        and not _went_down(s, snap)  # the server restarted: older scrapes are meaningless
    ]
    rate = None
    for earlier in reversed(history):
        if snap.at - earlier.at >= min_interval:
            rate = throughput(earlier, snap)
            break
    if store:
        try:
            save_history(name, [*history, snap][-HISTORY_SIZE:], server_id)
        except CmwVllmError as exc:
            logger.debug("not storing metrics of %s: %s", name, exc.message)
    return rate


def _went_down(earlier: MetricsSnapshot, later: MetricsSnapshot) -> bool:
    for a, b in ((earlier.prompt_tokens, later.prompt_tokens),
                 (earlier.generation_tokens, later.generation_tokens)):
        if a is not None and b is not None and b < a:
            return True
    return False


# --------------------------------------------------------------------------- load


@dataclass
class LoadInfo:
    """The current load of one server.

    Attributes:
        name: Server name.
        base_url: Server address.
        ok: ``/metrics`` was scraped.
        error: Why not, when ``ok`` is False.
        requests_running: Requests in the running batch.
        requests_waiting: Requests queued.
        kv_cache_usage: Fraction (0..1) of the KV cache in use.
        prompt_tokens_total: Prompt tokens processed since start.
        generation_tokens_total: Tokens generated since start.
        prompt_tokens_per_s: Recent prompt throughput (None: no earlier scrape to compare).
        generation_tokens_per_s: Recent generation throughput.
        rate_interval_s: Seconds the rates are averaged over.
        scraped_at: Wall-clock time of the scrape.
    """

    name: str
    base_url: str
    ok: bool = False
    error: str | None = None
    requests_running: int | None = None
    requests_waiting: int | None = None
    kv_cache_usage: float | None = None
    prompt_tokens_total: int | None = None
    generation_tokens_total: int | None = None
    prompt_tokens_per_s: float | None = None
    generation_tokens_per_s: float | None = None
    rate_interval_s: float | None = None
    scraped_at: float | None = None

    def to_json(self) -> dict[str, Any]:
        """Stable JSON shape (rates rounded to 0.1 token/s, KV usage to 0.1 %)."""

        def r(value: float | None, digits: int) -> float | None:
            return round(value, digits) if value is not None else None

        return {
            "ok": self.ok,
            "error": self.error,
            "requests_running": self.requests_running,
            "requests_waiting": self.requests_waiting,
            "kv_cache_usage": r(self.kv_cache_usage, 4),
            "prompt_tokens_total": self.prompt_tokens_total,
            "generation_tokens_total": self.generation_tokens_total,
            "prompt_tokens_per_s": r(self.prompt_tokens_per_s, 1),
            "generation_tokens_per_s": r(self.generation_tokens_per_s, 1),
            "rate_interval_s": r(self.rate_interval_s, 1),
        }


def _as_int(value: float | None) -> int | None:
    return int(value) if value is not None else None


def server_identity(record: ServerRecord) -> str:
    """A string that changes when the server behind a name is restarted."""
    return f"{record.pid}:{record.create_time}"


def get_load(
    name: str,
    base_url: str,
    *,
    timeout: float = 2.0,
    model_name: str | None = None,
    server_id: str | None = None,
    store: bool = True,
) -> LoadInfo:
    """Scrape one server's ``/metrics`` and work out its recent throughput.

    Never raises for a server that does not answer: the result carries the error.

    Args:
        name: Server name (where its scrapes are stored).
        base_url: ``http://host:port`` of the server.
        timeout: Total seconds for the scrape.
        model_name: Served model name to select samples by (others are ignored).
        server_id: Identity of the running process (see :func:`server_identity`).
        store: Keep this scrape for the next call's rate.
    """
    info = LoadInfo(name=name, base_url=base_url)
    try:
        snap = scrape_metrics(base_url, timeout=timeout, model_name=model_name)
    except ServerRequestError as exc:
        info.error = exc.message
        return info
    info.ok = True
    info.scraped_at = snap.at
    info.requests_running = _as_int(snap.requests_running)
    info.requests_waiting = _as_int(snap.requests_waiting)
    info.kv_cache_usage = snap.kv_cache_usage
    info.prompt_tokens_total = _as_int(snap.prompt_tokens)
    info.generation_tokens_total = _as_int(snap.generation_tokens)
    rate = remember_scrape(name, snap, server_id, store=store)
    if rate is not None:
        info.prompt_tokens_per_s = rate.prompt_tokens_per_s
        info.generation_tokens_per_s = rate.generation_tokens_per_s
        info.rate_interval_s = rate.interval_s
    return info


def collect_load(
    records: Iterable[ServerRecord], timeout: float, *, store: bool = True
) -> dict[str, LoadInfo]:
    """Get the load of several servers concurrently.

    Every server is scraped in its own thread and the whole call returns within about
    ``timeout`` seconds, however many servers accept connections and never answer: those
    come back with ``ok=False`` and an error.

    Args:
        records: Records of the servers (name, base_url, served_model_name, pid).
        timeout: Total seconds for each scrape, and so for the whole call.
        store: Keep each scrape for the next call's rate.

    Returns:
        Server name -> its load, in the order given.
    """
    from concurrent.futures import ThreadPoolExecutor
    from concurrent.futures import wait as wait_futures

    records = list(records)
    if not records:
        return {}

    def one(rec: ServerRecord) -> LoadInfo:
        return get_load(rec.name, rec.base_url, timeout=timeout,
                        model_name=rec.served_model_name, server_id=server_identity(rec),
                        store=store)

    pool = ThreadPoolExecutor(max_workers=min(32, len(records)),
                              thread_name_prefix="cmw-vllm-load")
    try:
        futures = [pool.submit(one, rec) for rec in records]
        # Each scrape has its own total deadline; the margin only covers thread start-up.
        wait_futures(futures, timeout=timeout + 1.0)
        out: dict[str, LoadInfo] = {}
        for rec, fut in zip(records, futures, strict=True):
            if fut.done() and fut.exception() is None:
                out[rec.name] = fut.result()
            else:
                reason = (f"{type(fut.exception()).__name__}: {fut.exception()}"
                          if fut.done() else f"no answer within {timeout:g}s")
                out[rec.name] = LoadInfo(name=rec.name, base_url=rec.base_url, error=reason)
        return out
    finally:
        pool.shutdown(wait=False, cancel_futures=True)
