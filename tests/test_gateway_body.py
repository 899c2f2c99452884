"""The gateway's request bodies under attack: a multipart body made to make a regular
expression backtrack, JSON nested too deep or too big to parse on the event loop, gzip
bombs and mislabelled gzip, and the cap on bodies held while a model starts. Attacks are
bounded in size and time and stay on loopback; the engines are the stand-in vLLM."""

from __future__ import annotations

import gzip
import json
import random
import time
import zlib
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest
import requests

from cmw_vllm.errors import GatewayRefusal
from cmw_vllm.gateway.body import (
    MAX_DEPTH,
    json_model,
    multipart_model,
    scan_json_model,
)
from cmw_vllm.gateway.settings import GatewaySettings
from cmw_vllm.server_manager import record_names
from tests.conftest import free_port
from tests.conftest import run_cli as run
from tests.gateway_harness import GatewayThread, gateway_maker

CHAT = "/v1/chat/completions"
FORM = "multipart/form-data; boundary=XyZ"


@pytest.fixture
def entry(isolated_home: Path, model_dir: Path) -> str:
    """One startable models-file entry, ``a``, on the stand-in model."""
    isolated_home.mkdir(parents=True, exist_ok=True)
    (isolated_home / "models.toml").write_text(
        f"[models.a]\nmodel = {json.dumps(str(model_dir))}\nport = {free_port()}\n")
    return "a"


@pytest.fixture
def gateway(fake_engine: Path) -> Iterator[Any]:
    with gateway_maker(health_interval=0.5) as make:
        yield make


def _post(url: str, body: bytes, content_type: str = "application/json", timeout: float = 30,
          **headers: str) -> requests.Response:
    return requests.post(url + CHAT, data=body, timeout=timeout,
                         headers={"Content-Type": content_type, **headers})


def _chat_body(model: str, **extra: Any) -> bytes:
    return json.dumps({"messages": [{"role": "user", "content": "hi"}], **extra,
                       "model": model}).encode()


def _refused(reply: requests.Response, status: int) -> dict[str, Any]:
    assert reply.status_code == status, reply.text[:300]
    assert reply.headers["Content-Type"].startswith("application/json")
    error: dict[str, Any] = reply.json()["error"]
    assert error["message"] and error["code"] == status
    return error


# ------------------------------------------------------------------ multipart (item 1)

def test_multipart_model_is_the_form_field_not_a_file_or_its_content() -> None:
    body = (b"--XyZ\r\nContent-Disposition: form-data; name=\"file\"; filename=\"model\"\r\n"
            b"Content-Type: audio/wav\r\n\r\nname=\"model\"\r\n\r\nevil\r\n"
            b"--XyZ\r\ncontent-disposition: form-data; name=model\r\n\r\nfirst\r\n"
            b"--XyZ\r\nContent-Disposition: form-data; name=\"model\"\r\n\r\nwhisper\r\n"
            b"--XyZ--\r\n")
    assert multipart_model(body, FORM) == "whisper"  # the last, as a form parser keeps it
    assert multipart_model(body, 'multipart/form-data; boundary="XyZ"') == "whisper"
    assert multipart_model(body.replace(b"name=\"model\"\r\n\r\nwhisper", b"name=\"x\"\r\n\r\n"),
                           FORM) == "first"
    assert multipart_model(body, "multipart/form-data; boundary=other") is None
    assert multipart_model(body, "multipart/form-data") is None
    assert multipart_model(b"name=\"model\"\r\n\r\nevil\r\n", FORM) is None


def test_multipart_attack_does_not_freeze_the_gateway(gateway: Any) -> None:
    # The old lookup backtracked over these lines: 224 KB took 11.7 s, 448 KB 49 s.
    attack = b'name="model"\r\n' * 24_000  # 336 KB
    gw = gateway()
    with ThreadPoolExecutor(1) as pool:
        sent = pool.submit(_post, gw.url, attack, FORM, 10)
        slowest = 0.0
        while not sent.done():
            begin = time.monotonic()
            assert requests.get(gw.url + "/health", timeout=5).status_code == 200
            slowest = max(slowest, time.monotonic() - begin)
        reply = sent.result()
    assert slowest < 2.0
    error = _refused(reply, 400)
    assert "names no `model`" in error["message"]


def test_multipart_request_is_routed_by_its_model_field(gateway: Any, entry: str) -> None:
    gw = gateway()
    body = (b"--XyZ\r\nContent-Disposition: form-data; name=\"file\"; filename=\"a.wav\"\r\n"
            b"\r\n" + b"\0" * 300_000 + b"\r\n"  # over the inline size: parsed off the loop
            b"--XyZ\r\nContent-Disposition: form-data; name=\"model\"\r\n\r\na\r\n--XyZ--\r\n")
    reply = _post(gw.url, body, FORM)
    assert reply.status_code == 200, reply.text
    assert reply.json()["seen_body"]["bytes"] == len(body)
    assert gw.metrics.starts == {"a": 1}


# ----------------------------------------------------------------------- JSON (item 6)

def test_json_nesting_and_syntax_limits() -> None:
    inner = MAX_DEPTH - 1  # the top-level object is the first level
    ok = b'{"x": ' + b"[" * inner + b"]" * inner + b', "model": "m"}'
    deep = ok.replace(b"[", b"[[", 1).replace(b"]", b"]]", 1)
    assert json_model(ok) == scan_json_model(ok) == "m"
    for parse in (json_model, scan_json_model):
        with pytest.raises(GatewayRefusal, match="deeper than 128"):
            parse(deep)
        for broken in (b'{"model": "m"', b'{"a": "never ends}', b'{"a": [}', b'{"a": 1} x'):
            with pytest.raises(GatewayRefusal, match="not valid JSON"):
                parse(broken)
    # Strings hide brackets and quotes; nested and value "model"s are not the model.
    tricky = (b'{"model": "first", "m": [{"model": "inner"}], "s": "\\"]}[{", '
              b'"k": "model", "model" : "last"}')
    assert json_model(tricky) == scan_json_model(tricky) == "last"
    image = b'{"m": [{"url": "data:,' + b"QUJD" * 100_000 + b'\\"]"}], "model": "m"}'
    assert scan_json_model(image) == "m"
    assert scan_json_model(b'{"model": null}') is None
    assert not isinstance(scan_json_model(b'{"model": 7}'), str)


def _random_json(rng: random.Random, depth: int) -> Any:
    pick = rng.random()
    if depth > 7 or pick < 0.3:
        return rng.choice([1, -2.5e3, None, True, "model", 'q"u\\o]te}', "\u00e9x", ""])
    keys = ["model", "k", "model", 'm"o', "[", "x y"]
    if pick < 0.65:
        return {rng.choice(keys): _random_json(rng, depth + 1) for _ in range(rng.randint(0, 4))}
    return [_random_json(rng, depth + 1) for _ in range(rng.randint(0, 4))]


def test_the_scan_finds_the_model_json_loads_finds() -> None:
    rng = random.Random(19)
    for _ in range(3000):
        doc = {rng.choice(["model", "a", "b"]): _random_json(rng, 1)
               for _ in range(rng.randint(0, 5))}
        if rng.random() < 0.5:
            doc["model"] = rng.choice(["m1", "mé", 'q"m', None])
        body = json.dumps(doc, ensure_ascii=rng.random() < 0.5,
                          indent=rng.choice([None, 1])).encode()
        want = doc.get("model")
        if want is None or isinstance(want, str):
            assert scan_json_model(body) == json_model(body) == want, body
        else:
            assert not isinstance(scan_json_model(body), str), body


@pytest.mark.parametrize("size", ["small", "big"])
def test_too_deep_json_is_a_400_and_starts_nothing(gateway: Any, entry: str,
                                                   size: str) -> None:
    # 100k levels made the old gateway answer a text/plain 500 (RecursionError).
    padding = "x" * (300_000 if size == "big" else 0)
    body = (b'{"model": "a", "p": "' + padding.encode() + b'", "x": '
            + b"[" * 100_000 + b"]" * 100_000 + b"}")
    gw = gateway()
    error = _refused(_post(gw.url, body), 400)
    assert error["type"] == "invalid_request_error"
    assert "deeper than 128 levels" in error["message"]
    error = _refused(_post(gw.url, b'{"model": "a", "x": [1, 2'), 400)
    assert error["type"] == "invalid_request_error"
    assert gw.metrics.starts == {} and record_names() == []


def _slowest_health_while(gw: GatewayThread, body: bytes) -> tuple[requests.Response, float]:
    """Send ``body`` and probe /health until it is answered: its answer, the slowest probe."""
    with ThreadPoolExecutor(1) as pool:
        sent = pool.submit(_post, gw.url, body, "application/json", 60)
        slowest = 0.0
        while not sent.done():
            begin = time.monotonic()
            assert requests.get(gw.url + "/health", timeout=10).status_code == 200
            slowest = max(slowest, time.monotonic() - begin)
        return sent.result(), slowest


def test_big_json_is_routed_without_stalling_the_gateway(gateway: Any, entry: str) -> None:
    gw = gateway()
    # 24 MB of empty arrays: json.loads on the loop held it about 4 s (the old gateway).
    dense = b'{"a": [' + b"[]," * 8_000_000 + b'[]], "model": "nope"}'
    reply, slowest = _slowest_health_while(gw, dense)
    assert _refused(reply, 404)["message"] == "The model `nope` does not exist."
    assert slowest < 2.0
    # The model comes last, after 6 MB of messages, as the OpenAI SDK orders keys.
    body = _chat_body("a", extra=[{"role": "user", "content": "x"}] * 200_000)
    reply, slowest = _slowest_health_while(gw, body)
    assert reply.status_code == 200, reply.text[:300]
    assert reply.json()["seen_body"]["bytes"] == len(body)
    assert gw.metrics.starts == {"a": 1}


# ----------------------------------------------------------------------- gzip (item 5)

def test_gzip_body_is_forwarded_decoded_with_matching_headers(gateway: Any,
                                                              entry: str) -> None:
    gw = gateway()
    body = _chat_body("a", padding="y" * 5000)
    for coded in (gzip.compress(body), zlib.compress(body), gzip.compress(body[:40])
                  + gzip.compress(body[40:])):
        reply = _post(gw.url, coded, **{"Content-Encoding": "gzip"})
        assert reply.status_code == 200, reply.text
        seen = reply.json()["seen_body"]
        assert seen == {"bytes": len(body), "content_length": str(len(body)),
                        "content_encoding": None}
    error = _refused(_post(gw.url, body, **{"Content-Encoding": "br"}), 415)
    assert error["type"] == "invalid_request_error"
    error = _refused(_post(gw.url, gzip.compress(body)[:-20],
                           **{"Content-Encoding": "gzip"}), 400)
    assert "ends too early" in error["message"]
    assert _refused(_post(gw.url, body, **{"Content-Encoding": "gzip"}), 400)
    assert gw.metrics.starts == {"a": 1}


def _peak_rss(pid: int) -> int:
    """The process's peak resident memory in bytes (VmHWM)."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    raise AssertionError("no VmHWM")


def test_gzip_bomb_stops_at_the_body_limit(fake_engine: Path, isolated_home: Path) -> None:
    if not Path("/proc/self/status").exists():
        pytest.skip("needs /proc")
    packer = zlib.compressobj(9, zlib.DEFLATED, 16 + zlib.MAX_WBITS)
    zeros = b"\0" * (1 << 20)
    bomb = b"".join(packer.compress(zeros) for _ in range(1024)) + packer.flush()
    assert len(bomb) < 2 << 20  # 1 GiB of zeros in about 1 MB
    port = free_port()
    code, out, err = run("gateway", "--port", str(port), "--background", "--json")
    assert code == 0, err
    info = json.loads(out)
    try:
        _post(info["url"], _chat_body("warm-up"))  # imports done before the baseline
        before = _peak_rss(info["pid"])
        reply = _post(info["url"], bomb, **{"Content-Encoding": "gzip"})
        error = _refused(reply, 413)
        assert "limit of 67108864 bytes" in error["message"]  # the default 64 MiB
        # The limit's worth of decoded pieces, not more (the old gateway's grew 260 MiB).
        grown = _peak_rss(info["pid"]) - before
        assert grown < 160 << 20, f"peak RSS grew {grown >> 20} MiB"
    finally:
        code, _, err = run("stop", "gateway")
        assert code == 0, err


# -------------------------------------------------------------- waiting bodies (item 4)

def test_bodies_waiting_for_a_start_have_a_total_cap(gateway: Any, entry: str,
                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("FAKE_VLLM_DELAY", "3")
    gw = gateway(max_buffered_bytes=100_000)
    body = _chat_body("a", padding="z" * 60_000)
    with ThreadPoolExecutor(1) as pool:
        first = pool.submit(_post, gw.url, body)
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline and gw.pool.waiting["a"] < 1:
            time.sleep(0.02)
        assert gw.pool.waiting["a"] == 1  # the first body is held while `a` starts
        second = _post(gw.url, body, timeout=10)
        error = _refused(second, 503)
        assert second.headers["Retry-After"] == "10"
        assert "limit 100000" in error["message"]
        assert _post(gw.url, _chat_body("a"), timeout=30).status_code == 200  # small: fits
        assert first.result().status_code == 200
    assert _post(gw.url, body).status_code == 200  # a is ready: nothing is held
    assert gw.metrics.rejected[("a", "body_buffer_full")] == 1
    assert gw.metrics.starts == {"a": 1}


def test_buffer_cap_setting_round_trips() -> None:
    settings = GatewaySettings(max_buffered_bytes=3 << 20)
    assert "--max-buffered-mb" in settings.cli_args()
    assert GatewaySettings.from_public("gateway", settings.public()).max_buffered_bytes \
        == 3 << 20
