"""The shared vocabularies and rules (vocab.py), and the task implied by vLLM flags."""

from __future__ import annotations

import json

import pytest

from cmw_vllm.errors import ConfigError
from cmw_vllm.server_config import implied_task, resolve_server_config
from cmw_vllm.vocab import (
    GiB,
    State,
    Task,
    client_url,
    format_bytes,
    format_gib,
    format_size,
    is_hf_id,
    looks_like_path,
    parse_port,
    validate_name,
)


def test_words_are_their_strings() -> None:
    assert Task.EMBED == "embed" and f"{State.HEALTHY}" == "healthy"
    assert f"{Task.SCORE!r}" == "'score'"  # messages read as before
    assert json.dumps({"state": State.EXITED}) == '{"state": "exited"}'


@pytest.mark.parametrize("name", ["qwen", "Qwen3-0.6B", "a_b.c-d", "x" * 64])
def test_valid_names(name: str) -> None:
    assert validate_name(name) == name


@pytest.mark.parametrize("name", ["", "../etc", "a..b", "-x", ".x", "a/b", "a b", "x" * 65])
def test_invalid_names(name: str) -> None:
    with pytest.raises(ConfigError, match="invalid server name"):
        validate_name(name)


def test_ports_are_parsed_with_the_option_named() -> None:
    assert parse_port("8010") == 8010
    with pytest.raises(ConfigError, match=r"invalid --port: must be an integer \(got 'x'\)"):
        parse_port("x")


def test_byte_formats() -> None:
    assert [format_bytes(n) for n in (None, 512, 1536, 3 * GiB)] == ["-", "512 B", "1.5 KiB",
                                                                     "3.0 GiB"]
    assert format_gib(33.5 * GiB) == "33.50 GiB"
    assert format_size(50 * 1024**2) == "50.0 MiB" and format_size(GiB) == "1.00 GiB"


@pytest.mark.parametrize(("text", "path", "hub"), [
    ("./tiny", True, False), ("/models/x", True, False), ("~/m", True, False),
    ("Qwen/Qwen3-0.6B", False, True), ("qwen", False, False), ("a--b/c", False, False),
])
def test_path_or_hub_id(text: str, path: bool, hub: bool) -> None:
    assert (looks_like_path(text), is_hf_id(text)) == (path, hub)


@pytest.mark.parametrize(("args", "current", "task"), [
    (["--runner", "pooling", "--convert", "embed"], None, "embed"),
    (["--convert=classify"], None, "classify"),
    (["--runner", "pooling"], "score", "score"),
    (["--runner", "pooling"], "generate", "embed"),
    (["--runner", "generate"], "embed", "generate"),
    (["--enforce-eager"], "score", None),
])
def test_task_implied_by_vllm_flags(args: list[str], current: str | None,
                                    task: str | None) -> None:
    assert implied_task(args, current) == task


def test_resolve_infers_the_task_unless_given() -> None:
    flags = ["--runner", "pooling", "--convert", "embed"]
    assert resolve_server_config("/m", cli={"vllm_args": flags}).task == "embed"
    assert resolve_server_config("/m", cli={"vllm_args": flags, "task": "score"}).task == "score"
    # A registry entry's own flags already agree with its task: they are not re-read.
    entry = {"task": "score", "vllm_args": ["--runner", "pooling"]}
    assert resolve_server_config("/m", entry_settings=entry).task == "score"


@pytest.mark.parametrize(("host", "url"), [
    ("0.0.0.0", "http://127.0.0.1:8000"),
    ("::", "http://127.0.0.1:8000"),
    ("", "http://127.0.0.1:8000"),
    ("10.0.0.5", "http://10.0.0.5:8000"),
    ("::1", "http://[::1]:8000"),
    ("[fe80::1]", "http://[fe80::1]:8000"),
])
def test_client_url_of_servers_and_gateways(host: str, url: str) -> None:
    from cmw_vllm.gateway.service import base_url
    from cmw_vllm.gateway.settings import GatewaySettings
    from cmw_vllm.server_config import ServerConfig

    assert client_url(host, 8000) == url
    assert base_url(GatewaySettings(host=host, port=8000)) == url
    if host:  # a server's settings refuse an empty host
        assert ServerConfig(name="m", model="m", host=host, port=8000).base_url() == url
