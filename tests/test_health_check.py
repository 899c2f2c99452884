"""Health checks, /metrics load and the inference test against stand-in HTTP servers.

The stand-ins run in threads of this process: a healthy vLLM-like server, one answering 503,
and one that accepts connections and never answers (a listening socket nobody accepts on).
"""

from __future__ import annotations

import json
import os
import socket
import stat
import threading
import time
from collections.abc import Callable, Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import pytest

from cmw_vllm import health_check as hc
from cmw_vllm.cli_inference import run_and_render_test
from cmw_vllm.cli_status import LOAD_COLUMNS, load_cells, status_load_columns
from cmw_vllm.errors import InferenceCheckError, ServerRequestError
from cmw_vllm.inference_check import run_check
from cmw_vllm.server_manager import ServerStatus
from cmw_vllm.server_record import ServerRecord
from cmw_vllm.vocab import State

MODEL = "/models/tiny"

# Shaped like vLLM 0.32.0's /metrics (two engines, as with data parallel), plus the corners
# of the text format: escaped label values, histograms, NaN, +Inf, timestamps.
METRICS_TEMPLATE = """\
# HELP python_gc_objects_collected_total Objects collected during gc
# TYPE python_gc_objects_collected_total counter
python_gc_objects_collected_total{{generation="0"}} 14736.0
process_start_time_seconds 1.79562054e+09
# HELP vllm:num_requests_running Number of requests in model execution batches.
# TYPE vllm:num_requests_running gauge
vllm:num_requests_running{{engine="0",model_name="{model}"}} {running0}
vllm:num_requests_running{{engine="1",model_name="{model}"}} {running1}
# HELP vllm:num_requests_waiting Number of requests waiting to be processed.
# TYPE vllm:num_requests_waiting gauge
vllm:num_requests_waiting{{engine="0",model_name="{model}"}} {waiting}
vllm:num_requests_waiting{{engine="1",model_name="{model}"}} 0.0
vllm:num_requests_waiting_by_reason{{engine="0",model_name="{model}",reason="capacity"}} 9.0
# HELP vllm:kv_cache_usage_perc KV-cache usage. 1 means 100 percent usage.
# TYPE vllm:kv_cache_usage_perc gauge
vllm:kv_cache_usage_perc{{engine="0",model_name="{model}"}} {kv0}
vllm:kv_cache_usage_perc{{engine="1",model_name="{model}"}} {kv1}
# HELP vllm:prompt_tokens_total Number of prefill tokens processed.
# TYPE vllm:prompt_tokens_total counter
vllm:prompt_tokens_total{{engine="0",model_name="{model}"}} {prompt0}
vllm:prompt_tokens_total{{engine="1",model_name="{model}"}} {prompt1}
vllm:prompt_tokens_created{{engine="0",model_name="{model}"}} 1.7956205820019505e+09
vllm:prompt_tokens_by_source_total{{engine="0",model_name="{model}",source="local_compute"}} 5.0
# HELP vllm:generation_tokens_total Number of generation tokens processed.
# TYPE vllm:generation_tokens_total counter
vllm:generation_tokens_total{{engine="0",model_name="{model}"}} {gen0} 1795620582001
vllm:generation_tokens_total{{engine="1",model_name="{model}"}} {gen1}
vllm:generation_tokens_total{{engine="0",model_name="other \\"quoted\\", {{model}}"}} 1000.0
vllm:request_prompt_tokens_bucket{{engine="0",le="1.0",model_name="{model}"}} 0.0
vllm:request_prompt_tokens_bucket{{engine="0",le="+Inf",model_name="{model}"}} 1.0
vllm:e2e_request_latency_seconds_sum{{engine="0",model_name="{model}"}} NaN
vllm:spec_decode_draft_acceptance_length{{engine="0",model_name="{model}"}} +Inf
"""


def metrics_text(**values: float) -> str:
    """The template filled with ``values`` (defaults for the rest)."""
    defaults: dict[str, Any] = {
        "model": MODEL, "running0": 2.0, "running1": 1.0, "waiting": 4.0, "kv0": 0.25,
        "kv1": 0.5, "prompt0": 100.0, "prompt1": 20.0, "gen0": 300.0, "gen1": 45.0,
    }
    defaults.update(values)
    return METRICS_TEMPLATE.format(**defaults)


# --------------------------------------------------------------------------- stand-ins


class StandIn:
    """A threaded HTTP server whose routes the test sets; it records every request."""

    def __init__(self) -> None:
        self.routes: dict[tuple[str, str], Callable[[BaseHTTPRequestHandler, bytes], None]] = {}
        self.requests: list[dict[str, Any]] = []
        outer = self

        class Handler(BaseHTTPRequestHandler):
            def _dispatch(self, method: str) -> None:
                length = int(self.headers.get("Content-Length") or 0)
                body = self.rfile.read(length) if length else b""
                outer.requests.append(
                    {"method": method, "path": self.path, "headers": dict(self.headers),
                     "body": body}
                )
                route = outer.routes.get((method, self.path))
                if route is None:
                    send(self, 404, {"detail": "Not Found"})
                    return
                route(self, body)

            def do_GET(self) -> None:  # noqa: N802 (http.server's naming)
                self._dispatch("GET")

            def do_POST(self) -> None:  # noqa: N802
                self._dispatch("POST")

            def log_message(self, *args: Any) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self.thread = threading.Thread(target=self.server.serve_forever,
                                       kwargs={"poll_interval": 0.05}, daemon=True)
        self.thread.start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


def send(handler: BaseHTTPRequestHandler, status: int, body: Any = b"",
         content_type: str = "application/json") -> None:
    """Write one complete response."""
    raw = body if isinstance(body, bytes) else (
        body.encode() if isinstance(body, str) else json.dumps(body).encode())
    handler.send_response(status)
    handler.send_header("Content-Type", content_type)
    handler.send_header("Content-Length", str(len(raw)))
    handler.end_headers()
    handler.wfile.write(raw)


def vllm_like(standin: StandIn, metrics: list[str] | None = None) -> StandIn:
    """Give ``standin`` the read-only routes of a healthy vLLM server serving MODEL."""
    state = {"metrics": metrics or [metrics_text()]}
    standin.routes[("GET", "/health")] = lambda h, b: send(h, 200)
    standin.routes[("GET", "/version")] = lambda h, b: send(h, 200, {"version": "0.32.0"})
    standin.routes[("GET", "/v1/models")] = lambda h, b: send(h, 200, {
        "object": "list",
        "data": [{"id": MODEL, "object": "model", "root": MODEL, "max_model_len": 512}],
    })
    standin.routes[("GET", "/metrics")] = lambda h, b: send(
        h, 200, state["metrics"][0], "text/plain; version=0.0.4")
    return standin


@pytest.fixture
def standin() -> Iterator[StandIn]:
    server = StandIn()
    try:
        yield server
    finally:
        server.close()


@pytest.fixture
def make_standins() -> Iterator[Callable[[], StandIn]]:
    made: list[StandIn] = []

    def make() -> StandIn:
        made.append(StandIn())
        return made[-1]

    try:
        yield make
    finally:
        for server in made:
            server.close()


class Hanging:
    """Accepts TCP connections (the kernel's backlog does) and never answers a byte."""

    def __init__(self) -> None:
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(64)
        self.url = f"http://127.0.0.1:{self.sock.getsockname()[1]}"

    def close(self) -> None:
        self.sock.close()


@pytest.fixture
def make_hanging() -> Iterator[Callable[[], Hanging]]:
    made: list[Hanging] = []

    def make() -> Hanging:
        made.append(Hanging())
        return made[-1]

    try:
        yield make
    finally:
        for h in made:
            h.close()


def free_port_url() -> str:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    return f"http://127.0.0.1:{port}"


def record_for(name: str, url: str, pid: int = 4242) -> ServerRecord:
    port = int(url.rsplit(":", 1)[1])
    return ServerRecord(
        name=name, pid=pid, create_time=1000.0, supervisor_pid=pid - 1,
        supervisor_create_time=999.0, pgid=pid - 1, host="127.0.0.1", port=port,
        model=MODEL, served_model_name=MODEL, task="generate", base_url=url,
        command=["python", "-m", "vllm.entrypoints.openai.api_server"],
        log_path="/dev/null", started_at=1000.0, config={},
    )


# --------------------------------------------------------------------------- readiness


def test_probe_health_returns_the_status(standin: StandIn) -> None:
    standin.routes[("GET", "/health")] = lambda h, b: send(h, 200)
    assert hc.probe_health(standin.url, 2.0) == 200
    standin.routes[("GET", "/health")] = lambda h, b: send(h, 503)
    assert hc.probe_health(standin.url, 2.0) == 503
    assert [r["path"] for r in standin.requests] == ["/health", "/health"]


def test_refused_connection_is_none_for_a_probe_and_an_error_for_a_get() -> None:
    url = free_port_url()
    assert hc.probe_health(url, 1.0) is None
    with pytest.raises(ServerRequestError, match="refused"):
        hc.http_get(url, "/health", 1.0)


def test_hanging_server_costs_one_timeout(make_hanging: Callable[[], Hanging]) -> None:
    hanging = make_hanging()
    begin = time.monotonic()
    assert hc.probe_health(hanging.url, 0.5) is None
    assert time.monotonic() - begin < 1.5
    with pytest.raises(ServerRequestError, match="did not answer within 0.5s"):
        hc.http_get(hanging.url, "/health", 0.5)


def test_probe_has_a_total_deadline_when_health_trickles(standin: StandIn) -> None:
    def trickle(h: BaseHTTPRequestHandler, body: bytes) -> None:
        h.send_response(200)
        h.send_header("Content-Length", "100")
        h.end_headers()
        for _ in range(40):  # one byte every 0.1 s: each read is quick, the whole is not
            h.wfile.write(b"x")
            h.wfile.flush()
            time.sleep(0.1)

    standin.routes[("GET", "/health")] = trickle
    begin = time.monotonic()
    assert hc.probe_health(standin.url, 0.6) is None
    assert time.monotonic() - begin < 2.0


class Closing:
    """Answers every GET with ``body`` and closes the connection after the response.

    As a proxy in front of vLLM often does: HTTP/1.0, or HTTP/1.1 with ``Connection:
    close``. (Python 3.12.3+ closes the socket as soon as such a body is read.)
    """

    def __init__(self, body: bytes, http10: bool) -> None:
        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.0" if http10 else "HTTP/1.1"

            def do_GET(self) -> None:  # noqa: N802
                self.send_response(200)
                self.send_header("Content-Length", str(len(body)))
                if not http10:
                    self.send_header("Connection", "close")
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *args: Any) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        threading.Thread(target=self.server.serve_forever, kwargs={"poll_interval": 0.05},
                         daemon=True).start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


@pytest.mark.parametrize("http10", [True, False], ids=["http1.0", "connection-close"])
def test_a_server_that_closes_after_each_response(http10: bool) -> None:
    text = metrics_text() + "# padding\n" * 20000  # bigger than one read
    server = Closing(text.encode(), http10)
    try:
        resp = hc.http_get(server.url, "/metrics", 2.0)
        assert (resp.status, resp.body) == (200, text.encode())
        assert hc.probe_health(server.url, 2.0) == 200
        snap = hc.scrape_metrics(server.url, timeout=2.0, model_name=MODEL)
        assert snap.requests_running == 3.0
        load = hc.collect_load([record_for("proxied", server.url)], 2.0)["proxied"]
        assert load.ok, load.error
    finally:
        server.close()


def test_deadline_covers_a_body_that_trickles(standin: StandIn) -> None:
    def trickle(h: BaseHTTPRequestHandler, body: bytes) -> None:
        h.send_response(200)
        h.send_header("Content-Length", "1000")
        h.end_headers()
        for _ in range(40):  # one byte every 0.1 s: each read is quick, the whole is not
            h.wfile.write(b"x")
            h.wfile.flush()
            time.sleep(0.1)

    standin.routes[("GET", "/metrics")] = trickle
    begin = time.monotonic()
    with pytest.raises(ServerRequestError, match="did not answer within 0.6s"):
        hc.http_get(standin.url, "/metrics", 0.6)
    assert time.monotonic() - begin < 2.0


# --------------------------------------------------------------------------- metrics


def test_parse_prometheus_reads_labels_values_and_corners() -> None:
    samples = hc.parse_prometheus(metrics_text())
    by_name: dict[str, list[hc.Sample]] = {}
    for s in samples:
        by_name.setdefault(s.name, []).append(s)
    assert by_name["process_start_time_seconds"][0].labels == {}
    running = by_name["vllm:num_requests_running"]
    assert [(s.labels["engine"], s.value) for s in running] == [("0", 2.0), ("1", 1.0)]
    assert running[0].labels["model_name"] == MODEL
    quoted = [s for s in by_name["vllm:generation_tokens_total"]
              if s.labels["model_name"] != MODEL]
    assert quoted[0].labels["model_name"] == 'other "quoted", {model}'
    assert quoted[0].value == 1000.0
    # A trailing timestamp is not the value.
    assert by_name["vllm:generation_tokens_total"][0].value == 300.0
    inf_bucket = [s for s in by_name["vllm:request_prompt_tokens_bucket"]
                  if s.labels["le"] == "+Inf"]
    assert inf_bucket[0].value == 1.0
    assert by_name["vllm:spec_decode_draft_acceptance_length"][0].value == float("inf")
    nan = by_name["vllm:e2e_request_latency_seconds_sum"][0].value
    assert nan != nan


def test_parse_prometheus_skips_garbage_lines() -> None:
    text = 'good 1\nbad{a="unterminated 2\nnovalue\n{x="y"} 3\nalso_good{a="b"} 4.5e1\n'
    assert [(s.name, s.value) for s in hc.parse_prometheus(text)] == [
        ("good", 1.0), ("also_good", 45.0)]


def test_snapshot_sums_engines_and_filters_by_model() -> None:
    samples = hc.parse_prometheus(metrics_text())
    snap = hc.snapshot_from_samples(samples, at=10.0, model_name=MODEL)
    assert snap.requests_running == 3.0
    assert snap.requests_waiting == 4.0  # waiting_by_reason is another metric
    assert snap.kv_cache_usage == 0.5  # the fullest engine
    assert snap.prompt_tokens == 120.0
    assert snap.generation_tokens == 345.0  # the other model's 1000 not counted
    everything = hc.snapshot_from_samples(samples, at=10.0)
    assert everything.generation_tokens == 1345.0


def test_scrape_falls_back_when_the_model_label_differs(standin: StandIn) -> None:
    vllm_like(standin)
    snap = hc.scrape_metrics(standin.url, timeout=2.0, model_name="served-alias")
    assert snap.requests_running == 3.0


def test_scrape_without_vllm_metrics_is_an_error(standin: StandIn) -> None:
    standin.routes[("GET", "/metrics")] = lambda h, b: send(h, 200, "up 1\n", "text/plain")
    with pytest.raises(ServerRequestError, match="no vLLM metrics"):
        hc.scrape_metrics(standin.url, timeout=2.0)


def test_throughput_from_two_scrapes() -> None:
    a = hc.MetricsSnapshot(at=100.0, prompt_tokens=120.0, generation_tokens=345.0)
    b = hc.MetricsSnapshot(at=104.0, prompt_tokens=200.0, generation_tokens=745.0)
    rate = hc.throughput(a, b)
    assert rate is not None
    assert rate.prompt_tokens_per_s == pytest.approx(20.0)
    assert rate.generation_tokens_per_s == pytest.approx(100.0)
    assert rate.interval_s == pytest.approx(4.0)
    # Counters went down: the server restarted in between; no rate rather than a wrong one.
    assert hc.throughput(b, hc.MetricsSnapshot(at=108.0, prompt_tokens=5.0,
                                               generation_tokens=9.0)) is None
    assert hc.throughput(b, a) is None


def test_remembered_scrapes_give_recent_rates() -> None:
    def snap(at: float, gen: float) -> hc.MetricsSnapshot:
        return hc.MetricsSnapshot(at=at, prompt_tokens=gen / 10, generation_tokens=gen)

    base = time.time()
    assert hc.remember_scrape("srv", snap(base, 1000.0), "1:1") is None
    path = hc.metrics_dir() / "srv.json"
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
    rate = hc.remember_scrape("srv", snap(base + 2.0, 1100.0), "1:1")
    assert rate is not None and rate.generation_tokens_per_s == pytest.approx(50.0)
    # Faster than min_interval (status --watch): compared with the last scrape old enough.
    rate = hc.remember_scrape("srv", snap(base + 2.5, 1300.0), "1:1")
    assert rate is not None and rate.interval_s == pytest.approx(2.5)
    assert rate.generation_tokens_per_s == pytest.approx(300.0 / 2.5)
    # Another process under the same name: its predecessor's scrapes are ignored.
    assert hc.remember_scrape("srv", snap(base + 5.0, 10.0), "2:2") is None
    # Restarted without us noticing the identity (counters fell): no rate either.
    assert hc.remember_scrape("srv", snap(base + 7.0, 5.0), "2:2") is None
    rate = hc.remember_scrape("srv", snap(base + 9.0, 25.0), "2:2")
    assert rate is not None and rate.generation_tokens_per_s == pytest.approx(10.0)
    assert len(json.loads(path.read_text())["scrapes"]) <= hc.HISTORY_SIZE


def test_get_load_reads_metrics_and_rates_from_the_stored_scrape(standin: StandIn) -> None:
    pages = [metrics_text(gen0=300.0, prompt0=100.0)]
    vllm_like(standin, pages)
    first = hc.get_load("tiny", standin.url, timeout=2.0, model_name=MODEL, server_id="7:7")
    assert first.ok and first.error is None
    assert (first.requests_running, first.requests_waiting) == (3, 4)
    assert first.kv_cache_usage == 0.5
    assert (first.prompt_tokens_total, first.generation_tokens_total) == (120, 345)
    assert first.generation_tokens_per_s is None  # nothing to compare with yet
    assert (hc.metrics_dir() / "tiny.json").exists()
    time.sleep(hc.MIN_RATE_INTERVAL_S + 0.05)
    pages[0] = metrics_text(gen0=500.0, prompt0=150.0)
    second = hc.get_load("tiny", standin.url, timeout=2.0, model_name=MODEL, server_id="7:7")
    assert second.rate_interval_s is not None and second.rate_interval_s >= 1.0
    assert second.generation_tokens_per_s == pytest.approx(200.0 / second.rate_interval_s)
    assert second.prompt_tokens_per_s == pytest.approx(50.0 / second.rate_interval_s)
    js = second.to_json()
    assert js["requests_running"] == 3 and js["generation_tokens_total"] == 545


def test_collect_load_of_six_servers_with_three_hanging_takes_about_one_timeout(
    make_standins: Callable[[], StandIn], make_hanging: Callable[[], Hanging]
) -> None:
    timeout = 1.0
    records = []
    for i in range(3):
        records.append(record_for(f"ok{i}", vllm_like(make_standins()).url, pid=100 + i))
        records.append(record_for(f"hang{i}", make_hanging().url, pid=200 + i))
    begin = time.monotonic()
    loads = hc.collect_load(records, timeout)
    elapsed = time.monotonic() - begin
    assert list(loads) == [r.name for r in records]
    for i in range(3):
        assert loads[f"ok{i}"].ok and loads[f"ok{i}"].requests_running == 3
        assert not loads[f"hang{i}"].ok
        assert "within" in (loads[f"hang{i}"].error or "")
    # Sequential scrapes would take 3 timeouts; concurrent ones about one.
    assert elapsed < 2.5 * timeout


def test_collect_load_of_nothing_is_empty() -> None:
    assert hc.collect_load([], 1.0) == {}


def test_status_load_columns_only_for_healthy_servers(
    make_standins: Callable[[], StandIn], make_hanging: Callable[[], Hanging]
) -> None:
    good = record_for("good", vllm_like(make_standins()).url, pid=300)
    stuck = record_for("stuck", make_hanging().url, pid=301)
    starting = record_for("starting", free_port_url(), pid=302)
    statuses = [
        ServerStatus(name="good", state="healthy", record=good),
        ServerStatus(name="stuck", state="healthy", record=stuck),
        ServerStatus(name="starting", state="starting", record=starting),
        ServerStatus(name="broken", state="invalid", error="bad record"),
    ]
    columns = status_load_columns(statuses, timeout=0.5)
    assert set(columns) == {"good", "stuck"}
    assert load_cells(columns["good"]) == ["3", "4", "50.0%", "-"]
    assert load_cells(columns["stuck"]) == ["-"] * len(LOAD_COLUMNS)
    assert load_cells(None) == ["-"] * len(LOAD_COLUMNS)


# --------------------------------------------------------------------------- inference test


def sse(h: BaseHTTPRequestHandler, events: list[Any]) -> None:
    """Stream ``events`` as server-sent events, ``[DONE]`` where given as a string."""
    h.send_response(200)
    h.send_header("Content-Type", "text/event-stream")
    h.end_headers()
    for ev in events:
        payload = ev if isinstance(ev, str) else json.dumps(ev)
        h.wfile.write(f"data: {payload}\n\n".encode())
        h.wfile.flush()
        time.sleep(0.01)


def chat_chunk(content: str | None = None, role: str | None = None,
               finish: str | None = None) -> dict[str, Any]:
    delta: dict[str, Any] = {}
    if role:
        delta["role"] = role
    if content is not None:
        delta["content"] = content
    return {"object": "chat.completion.chunk", "model": MODEL,
            "choices": [{"index": 0, "delta": delta, "finish_reason": finish}]}


def test_generate_test_measures_the_stream(standin: StandIn) -> None:
    tokens = [" Hello", "", " wor", "ld", "!"]
    events: list[Any] = [chat_chunk("", role="assistant")]
    events += [chat_chunk(t) for t in tokens[:-1]] + [chat_chunk(tokens[-1], finish="length")]
    events += [{"choices": [], "usage": {"prompt_tokens": 9, "completion_tokens": 5,
                                         "total_tokens": 14}}, "[DONE]"]
    standin.routes[("POST", "/v1/chat/completions")] = lambda h, b: sse(h, events)
    result = run_check(standin.url, MODEL, "generate", prompt="Hi", max_tokens=5,
                      api_key="k", timeout=5.0)
    sent = json.loads(standin.requests[-1]["body"])
    assert sent["stream"] is True and sent["stream_options"] == {"include_usage": True}
    assert sent["max_tokens"] == 5 and sent["messages"][0]["content"] == "Hi"
    assert standin.requests[-1]["headers"]["Authorization"] == "Bearer k"
    assert result.reply == "".join(tokens)
    assert (result.prompt_tokens, result.completion_tokens) == (9, 5)
    assert result.streamed_chunks == 5 and result.finish_reason == "length"
    assert result.ttft_s is not None and 0 < result.ttft_s <= result.total_s
    assert result.tokens_per_s == pytest.approx(5 / result.total_s)
    assert result.decode_tokens_per_s is not None and result.decode_tokens_per_s > 0
    assert result.to_json()["completion_tokens"] == 5


@pytest.mark.parametrize(
    ("events", "message"),
    [
        ([chat_chunk("a"), "[DONE]"], "no usage figures"),
        ([chat_chunk("a")], "without \\[DONE\\]"),
        ([chat_chunk("a"), {"error": {"message": "engine died"}}], "engine died"),
        ([{"choices": [], "usage": {"prompt_tokens": 3, "completion_tokens": 0}}, "[DONE]"],
         "no tokens"),
    ],
)
def test_generate_test_fails_on_a_bad_stream(
    standin: StandIn, events: list[Any], message: str
) -> None:
    standin.routes[("POST", "/v1/chat/completions")] = lambda h, b: sse(h, events)
    with pytest.raises(InferenceCheckError, match=message):
        run_check(standin.url, MODEL, "generate", api_key="", timeout=5.0)


def test_wrong_endpoint_for_the_task_says_so(standin: StandIn) -> None:
    with pytest.raises(InferenceCheckError, match="HTTP 404") as info:
        run_check(standin.url, MODEL, "generate", api_key="", timeout=5.0)
    assert "--task" in (info.value.hint or "")
    standin.routes[("POST", "/v1/embeddings")] = lambda h, b: send(h, 404, {"error": {
        "message": "The model `nope` does not exist.", "type": "NotFoundError", "code": 404}})
    with pytest.raises(InferenceCheckError, match="model `nope` does not exist"):
        run_check(standin.url, "nope", "embed", api_key="", timeout=5.0)


def test_unreachable_server_fails_the_test() -> None:
    with pytest.raises(InferenceCheckError, match="connection refused"):
        run_check(free_port_url(), MODEL, "embed", api_key="", timeout=2.0)


def test_embed_test_checks_every_vector(standin: StandIn) -> None:
    def answer(dims: list[int]) -> Callable[[BaseHTTPRequestHandler, bytes], None]:
        def route(h: BaseHTTPRequestHandler, body: bytes) -> None:
            inputs = json.loads(body)["input"]
            data = [{"index": i, "embedding": [0.1] * dims[i % len(dims)]}
                    for i in range(len(inputs))]
            send(h, 200, {"data": data, "usage": {"prompt_tokens": 21}})
        return route

    standin.routes[("POST", "/v1/embeddings")] = answer([128])
    result = run_check(standin.url, MODEL, "embed", prompt="mine", api_key="", timeout=5.0)
    assert result.dimension == 128 and result.prompt_tokens == 21
    assert result.inputs[0] == "mine" and len(result.inputs) == 3
    standin.routes[("POST", "/v1/embeddings")] = answer([128, 64])
    with pytest.raises(InferenceCheckError, match="different sizes"):
        run_check(standin.url, MODEL, "embed", api_key="", timeout=5.0)


def test_score_test_ranks_and_falls_back_to_score(standin: StandIn) -> None:
    scores = [0.2, 0.9, -0.3]
    standin.routes[("POST", "/score")] = lambda h, b: send(h, 200, {
        "data": [{"index": i, "score": s} for i, s in enumerate(scores)]})
    result = run_check(standin.url, MODEL, "score", api_key="", timeout=5.0)
    assert result.endpoint == "/score"
    assert [d.index for d in result.ranking] == [1, 0, 2]
    standin.routes[("POST", "/rerank")] = lambda h, b: send(h, 200, {"results": [
        {"index": i, "relevance_score": s} for i, s in enumerate(reversed(scores))]})
    result = run_check(standin.url, MODEL, "score", prompt="q", api_key="", timeout=5.0)
    assert result.endpoint == "/rerank" and result.query == "q"
    assert [d.index for d in result.ranking] == [1, 2, 0]


def test_classify_test_reads_the_label(standin: StandIn) -> None:
    standin.routes[("POST", "/classify")] = lambda h, b: send(h, 200, {"data": [
        {"index": 0, "label": "positive", "probs": [0.1, 0.9], "num_classes": 2}]})
    result = run_check(standin.url, MODEL, "classify", api_key="", timeout=5.0)
    assert result.label == "positive" and result.num_classes == 2
    assert json.loads(standin.requests[-1]["body"])["input"] == [result.inputs[0]]


HTML_501 = """<!DOCTYPE html>
<html>
<head><title>501 Not Implemented</title></head>
<body>
<h1>Not Implemented</h1>
<p>The proxy does not implement POST for this path.</p>
</body>
</html>
"""


def test_an_html_error_page_is_shown_as_one_line(
    standin: StandIn, monkeypatch: pytest.MonkeyPatch
) -> None:
    from click.testing import CliRunner

    from cmw_vllm.cli import cli
    from cmw_vllm.server_manager import ServerManager

    standin.routes[("POST", "/v1/chat/completions")] = lambda h, b: send(
        h, 501, HTML_501, "text/html")
    with pytest.raises(InferenceCheckError) as info:
        run_check(standin.url, MODEL, "generate", api_key="", timeout=5.0)
    assert info.value.message.endswith("answered HTTP 501: 501 Not Implemented")
    assert info.value.body == HTML_501

    status = ServerStatus(name="proxied", state=State.HEALTHY,
                          record=record_for("proxied", standin.url))
    monkeypatch.setattr(ServerManager, "get_status", lambda self, name: status)
    result = CliRunner().invoke(cli, ["test", "proxied"])
    assert result.exit_code == 1
    assert "DOCTYPE" not in result.stderr and "<p>" not in result.stderr
    assert "Error: " in result.stderr and "HTTP 501: 501 Not Implemented" in result.stderr
    verbose = CliRunner().invoke(cli, ["-v", "test", "proxied"])
    assert verbose.exit_code == 1
    assert "The proxy does not implement POST for this path." in verbose.stderr


def test_error_text_is_the_json_message_or_the_first_line(standin: StandIn) -> None:
    standin.routes[("POST", "/v1/embeddings")] = lambda h, b: send(
        h, 400, {"error": {"message": "input is\ntoo long", "type": "BadRequestError"}})
    with pytest.raises(InferenceCheckError, match=r"HTTP 400: input is too long$"):
        run_check(standin.url, MODEL, "embed", api_key="", timeout=5.0)
    standin.routes[("POST", "/v1/embeddings")] = lambda h, b: send(
        h, 502, "\nupstream failed\nsecond line\n", "text/plain")
    with pytest.raises(InferenceCheckError, match=r"HTTP 502: upstream failed$"):
        run_check(standin.url, MODEL, "embed", api_key="", timeout=5.0)


def test_run_and_render_test_prints_json_and_raises_on_failure(
    standin: StandIn, capsys: pytest.CaptureFixture[str]
) -> None:
    record = record_for("tiny", standin.url)
    record.task = "classify"
    standin.routes[("POST", "/classify")] = lambda h, b: send(h, 200, {"data": [
        {"index": 0, "label": "LABEL_1", "probs": [0.4, 0.6]}]})
    run_and_render_test(record, as_json=True)
    out = json.loads(capsys.readouterr().out)
    assert out["ok"] is True and out["name"] == "tiny" and out["label"] == "LABEL_1"
    assert out["num_classes"] == 2
    with pytest.raises(InferenceCheckError):
        run_and_render_test(record, task="embed", as_json=True)
    out = json.loads(capsys.readouterr().out)
    assert out["ok"] is False and out["task"] == "embed" and "404" in out["error"]
    run_and_render_test(record)
    assert "LABEL_1 (p=0.600) of 2 classes" in capsys.readouterr().out
    result = run_and_render_test(record, as_json=True, quiet=True)
    assert result.label == "LABEL_1" and capsys.readouterr().out == ""
