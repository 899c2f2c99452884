"""``cmw-vllm gateway --upstream NAME=URL``: fixed servers (what ``export k8s --gateway``
routes to). They are the only servers: nothing is found among the records, started on demand,
idle-stopped or stopped when the gateway shuts down."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import requests
from click.testing import CliRunner

from cmw_vllm.cli import cli
from cmw_vllm.errors import ConfigError
from cmw_vllm.gateway.settings import GatewaySettings, parse_upstream
from cmw_vllm.server_manager import ServerManager
from tests.conftest import free_port
from tests.conftest import run_cli as run
from tests.gateway_harness import GatewayThread


def _chat(url: str, model: str) -> requests.Response:
    return requests.post(f"{url}/v1/chat/completions",
                         json={"model": model, "messages": [{"role": "user", "content": "hi"}]},
                         timeout=60)


def _running() -> list[str]:
    return [s.name for s in ServerManager().list_status(check_health=False) if s.running]


def test_upstreams_are_the_only_servers_and_are_never_managed(
        fake_engine: Path, model_dir: Path, isolated_home: Path) -> None:
    isolated_home.mkdir(parents=True, exist_ok=True)
    (isolated_home / "models.toml").write_text(  # a startable entry: must not be started
        f"[models.other]\nmodel = {json.dumps(str(model_dir))}\nport = {free_port()}\n")
    port = free_port()
    code, _, err = run("start", str(model_dir), "--name", "backend", "--port", str(port))
    assert code == 0, err
    code, _, err = run("start", str(model_dir), "--name", "local", "--port", str(free_port()))
    assert code == 0, err
    settings = GatewaySettings(port=free_port(), idle_timeout=0.01, health_interval=3600.0,
                               adopt=True,
                               upstreams=(f"Org/Chat-7B,chat=http://127.0.0.1:{port}",))
    gw = GatewayThread(settings)
    try:
        gw.call(gw.pool.refresh())  # type: ignore[union-attr]
        listed = requests.get(f"{gw.url}/v1/models", timeout=10).json()["data"]
        assert [m["id"] for m in listed] == ["Org/Chat-7B"]  # not `local`, not `other`
        assert listed[0]["aliases"] == ["chat"]
        for model in ("chat", "Org/Chat-7B"):
            reply = _chat(gw.url, model)
            assert reply.status_code == 200, reply.text
        assert _chat(gw.url, "other").status_code == 404  # no on-demand start
        assert _chat(gw.url, "local").status_code == 404  # records are not read
        assert gw.pool.idle_tick(now=1e12) == []  # type: ignore[union-attr]  # never idle-stopped
    finally:
        gw.close()
    assert sorted(_running()) == ["backend", "local"]  # shutdown stopped nothing


@pytest.mark.parametrize("text", ["chat", "=http://x:1", "a,,b=http://x:1", "a=ftp://x",
                                  "a=http://x:1/v1", "a=http://", "a=x:8000"])
def test_a_malformed_upstream_is_refused(text: str) -> None:
    with pytest.raises(ConfigError, match="invalid --upstream"):
        parse_upstream(text)
    result = CliRunner().invoke(cli, ["gateway", "--upstream", text, "--port",
                                      str(free_port())])
    assert result.exit_code == 2 and "invalid --upstream" in result.stderr
    assert "Traceback" not in result.output


def test_upstreams_survive_the_kept_settings() -> None:
    settings = GatewaySettings(upstreams=("a,b=http://a:8000", "c=https://[::1]:9"))
    assert parse_upstream(settings.upstreams[1]) == ("c", "https://[::1]:9", ("c",))
    kept: dict[str, Any] = json.loads(json.dumps(settings.public()))
    assert GatewaySettings.from_public(settings.name, kept).upstreams == settings.upstreams
    args = settings.cli_args()
    assert args[args.index("--upstream") + 1] == "a,b=http://a:8000"
