"""The ``test`` command, health checks and load against real vLLM serving the tiny model.

Two servers in all (each start takes about a minute on two CPU cores): the tiny model as a
chat model, and the same weights as an embedding model (``--runner pooling --convert
embed``). Every check on a server happens in the one test function that started it.
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest
import requests
from click.testing import CliRunner

from cmw_vllm import health_check as hc
from cmw_vllm.cli import cli
from cmw_vllm.cli_status import load_cells, status_load_columns
from cmw_vllm.server_config import resolve_server_config
from cmw_vllm.server_manager import ServerManager
from cmw_vllm.server_record import ServerRecord
from tests.conftest import free_port

pytestmark = pytest.mark.vllm

START_TIMEOUT = 600.0


@contextmanager
def running_server(model: Path, name: str, **cli_values: Any) -> Iterator[ServerRecord]:
    """Start ``model`` under ``name`` and stop it (whole process group) afterwards."""
    config = resolve_server_config(
        str(model), cli={"name": name, "port": free_port(), "max_model_len": 512, **cli_values}
    )
    manager = ServerManager()
    try:
        result = manager.start(config, timeout=START_TIMEOUT)
        assert result.ready
        yield result.record
    finally:
        manager.stop(name, timeout=10)


def invoke(*args: str) -> tuple[int, str, str]:
    """Run the CLI in-process; return exit code, stdout and stderr."""
    result = CliRunner().invoke(cli, list(args))
    return result.exit_code, result.stdout, result.stderr


def wait_for_counters(url: str, model: str, prompt: float, generation: float,
                      timeout: float = 10.0) -> hc.MetricsSnapshot:
    """Scrape until the token counters reach the expected values (or the deadline)."""
    deadline = time.monotonic() + timeout
    while True:
        snap = hc.scrape_metrics(url, timeout=5.0, model_name=model)
        if (snap.prompt_tokens or 0) >= prompt and (snap.generation_tokens or 0) >= generation:
            return snap
        if time.monotonic() > deadline:
            return snap
        time.sleep(0.2)


def test_chat_model_passes_the_test_with_the_servers_own_counts(
    real_vllm: str, tiny_model: Path
) -> None:
    with running_server(tiny_model, "tiny") as record:
        model = record.served_model_name

        assert hc.probe_health(record.base_url, 5.0) == 200
        served = json.loads(hc.http_get(record.base_url, "/v1/models", 5.0).body)["data"]
        assert model in [m["id"] for m in served]
        assert {m["max_model_len"] for m in served} == {512}

        before = hc.scrape_metrics(record.base_url, timeout=5.0, model_name=model)
        statuses = ServerManager().list_status()
        first_load = status_load_columns(statuses, timeout=5.0)
        assert first_load["tiny"]["ok"], first_load["tiny"]["error"]
        assert first_load["tiny"]["generation_tokens_total"] == int(before.generation_tokens or 0)

        prompt = "Say hello in one word."
        code, out, err = invoke("test", "tiny", "--prompt", prompt, "--max-tokens", "16",
                                "--json")
        assert code == 0, (out, err)
        report = json.loads(out)
        assert report["ok"] is True and report["task"] == "generate"
        assert 1 <= report["completion_tokens"] <= 16
        assert report["ttft_s"] is not None and 0 < report["ttft_s"] <= report["total_s"]
        assert report["tokens_per_s"] > 0

        # The prompt count is what the server's tokenizer makes of the chat.
        tok = requests.post(f"{record.base_url}/tokenize", timeout=10, json={
            "model": model, "messages": [{"role": "user", "content": prompt}],
            "add_generation_prompt": True,
        }).json()
        assert report["prompt_tokens"] == tok["count"]

        # The server's counters rose by exactly the usage the test reported.
        after = wait_for_counters(
            record.base_url, model,
            (before.prompt_tokens or 0) + report["prompt_tokens"],
            (before.generation_tokens or 0) + report["completion_tokens"],
        )
        assert after.generation_tokens is not None and before.generation_tokens is not None
        assert after.generation_tokens - before.generation_tokens == report["completion_tokens"]
        assert after.prompt_tokens - before.prompt_tokens == report["prompt_tokens"]  # type: ignore[operator]

        # Human output, then status's load columns show the tokens/s since the first scrape.
        code, out, err = invoke("test", "tiny", "--max-tokens", "8")
        assert code == 0, (out, err)
        assert "passed" in out and "First token:" in out and "tokens/s" in out
        time.sleep(hc.MIN_RATE_INTERVAL_S)
        load = status_load_columns(ServerManager().list_status(), timeout=5.0)["tiny"]
        assert load["ok"]
        assert load["generation_tokens_total"] >= int(after.generation_tokens)
        assert load["generation_tokens_per_s"] is not None and load["generation_tokens_per_s"] > 0
        assert load["requests_running"] == 0 and load["requests_waiting"] == 0
        assert load_cells(load)[3] != "-"


def test_embedding_model_passes_the_embed_test(
    real_vllm: str, tiny_model: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("VLLM_API_KEY", "real-test-key")
    hidden = json.loads((tiny_model / "config.json").read_text())["hidden_size"]
    # No task given: it is inferred from the pass-through flags.
    with running_server(tiny_model, "tiny-embed",
                        vllm_args=["--runner", "pooling", "--convert", "embed"]) as record:
        assert record.task == "embed"
        code, out, err = invoke("test", "tiny-embed", "--json")
        assert code == 0, (out, err)
        report = json.loads(out)
        assert report["task"] == "embed" and report["endpoint"] == "/v1/embeddings"
        assert report["inputs"] == 3 and report["dimension"] == hidden
        assert report["prompt_tokens"] > 0

        # An embedding model also ranks documents by similarity.
        code, out, err = invoke("test", "tiny-embed", "--task", "score", "--json")
        assert code == 0, (out, err)
        ranking = json.loads(out)["ranking"]
        scores = [d["score"] for d in ranking]
        assert len(ranking) == 3 and scores == sorted(scores, reverse=True)

        # It has no chat endpoint: the chat test fails, says why, and exits non-zero.
        code, out, err = invoke("test", "tiny-embed", "--task", "generate", "--json")
        assert code == 1 and "Error:" in err
        failed = json.loads(out)
        assert failed["ok"] is False and "404" in failed["error"]

        # The key guards /v1: a wrong one fails the test; /metrics stays open.
        monkeypatch.setenv("VLLM_API_KEY", "wrong-key")
        code, out, err = invoke("test", "tiny-embed")
        assert code == 1
        assert "Error:" in err and "401" in err and "VLLM_API_KEY" in err
        load = hc.get_load("tiny-embed", record.base_url, timeout=5.0,
                           model_name=record.served_model_name)
        assert load.ok and load.prompt_tokens_total is not None
        assert load.prompt_tokens_total >= report["prompt_tokens"]
