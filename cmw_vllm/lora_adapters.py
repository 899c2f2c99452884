"""LoRA adapters of a base model: where their files are, whether they fit, the settings a
base starts with.

Adapters are declared in ``models.toml`` (``[adapters.NAME]``, read by
:mod:`cmw_vllm.model_registry`); their files are checked by
:mod:`cmw_vllm.model_verifier`. Everything is checked before a launch: a missing or
mismatched adapter is refused with one line and nothing starts.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import TYPE_CHECKING, Any

from cmw_vllm.errors import ConfigError, NotFoundError, UsageError

if TYPE_CHECKING:
    from cmw_vllm.model_registry import AdapterEntry, ModelEntry
    from cmw_vllm.model_verifier import AdapterInfo
    from cmw_vllm.server_config import LoraSettings

logger = logging.getLogger(__name__)


def adapter_dir(adapter: AdapterEntry) -> Path | None:
    """The adapter's directory on disk (its own, or the cached Hub snapshot), or None."""
    from cmw_vllm.hf_cache import snapshot_dir

    if adapter.is_local:
        path = Path(adapter.local_source())
        return path if path.is_dir() else None
    return snapshot_dir(adapter.source, adapter.revision, needs="adapter_config.json")


def base_dir(entry: ModelEntry) -> Path | None:
    """The base model's directory on disk, or None when it is not there yet."""
    from cmw_vllm.hf_cache import snapshot_dir
    from cmw_vllm.vocab import looks_like_path

    if looks_like_path(entry.model):
        path = Path(entry.model).expanduser().resolve()
        return path if path.is_dir() else None
    return snapshot_dir(entry.model, needs="config.json")


def check_adapter(adapter: AdapterEntry, entry: ModelEntry) -> AdapterInfo:
    """Read ``adapter``'s files and check them against its base model ``entry``.

    Returns:
        What the adapter's files say (rank, target modules).

    Raises:
        NotFoundError: The adapter is not on disk (with the command that fetches it).
        UsageError: Its files are not a LoRA adapter, or it does not fit the base model.
    """
    from cmw_vllm.model_verifier import adapter_mismatch, read_adapter

    path = adapter_dir(adapter)
    if path is None:
        hint = (f"run: cmw-vllm download {adapter.name}" if not adapter.is_local
                else "fix its source in models.toml")
        raise NotFoundError(f"adapter {adapter.name!r}: {adapter.source} is not on disk",
                            hint=hint)
    try:
        info = read_adapter(path)
    except (NotFoundError, UsageError) as exc:
        raise UsageError(f"adapter {adapter.name!r}: {exc.message}") from None
    base = base_dir(entry)
    if base is not None:
        why = adapter_mismatch(info, base)
        if why is not None:
            raise UsageError(f"adapter {adapter.name!r} does not fit its base "
                             f"{entry.alias!r}: {why}")
    return info


def lora_settings(entry: ModelEntry, adapters: list[AdapterEntry]) -> LoraSettings | None:
    """The LoRA settings ``entry`` starts with: every declared adapter checked, the rank and
    slots sized from them, the first ``max_loras`` of them loaded at start.

    Args:
        entry: The base model's registry entry.
        adapters: Its declared adapters (:func:`cmw_vllm.model_registry.adapters_for`).

    Returns:
        None when it has no adapters.

    Raises:
        NotFoundError: An adapter is not on disk.
        UsageError: An adapter does not fit the base model, or its rank is over vLLM's.
    """
    from cmw_vllm.server_config import LoraSettings, lora_rank_slot

    if not adapters:
        return None
    infos = [(adapter, check_adapter(adapter, entry)) for adapter in adapters]
    top = max(info.rank for _a, info in infos)
    try:
        rank = lora_rank_slot(top)
    except ValueError as exc:
        raise UsageError(f"adapters of {entry.alias!r}: {exc}") from None
    slots = entry.max_loras or len(adapters)
    modules = {adapter.name: str(info.path) for adapter, info in infos[:slots]}
    return LoraSettings(modules=modules, max_rank=rank, max_loras=slots)


def settings_for_alias(alias: str) -> LoraSettings | None:
    """:func:`lora_settings` of the registry entry ``alias`` (None: no entry, no adapters).

    Raises:
        ConfigError: The models file is invalid.
        NotFoundError, UsageError: As :func:`lora_settings`.
    """
    from cmw_vllm.model_registry import adapters_for, all_adapters, all_entries, find_entry

    entries = all_entries()
    entry = find_entry(alias, entries)
    if entry is None or entry.alias.lower() != alias.lower():
        return None
    return lora_settings(entry, adapters_for(entry.alias, all_adapters(entries)))


def refreshed(config_lora: LoraSettings | None, alias: str) -> LoraSettings | None:
    """The LoRA settings a restart of server ``alias`` uses: those of the adapters declared
    now (so adapters loaded while it ran answer again), else the ones it ran with.

    Raises:
        NotFoundError, UsageError: A declared adapter is missing or does not fit.
    """
    if config_lora is None:
        return None
    try:
        now = settings_for_alias(alias)
    except ConfigError as exc:
        logger.warning("models file unreadable; restarting with the adapters it ran with: %s",
                       exc.message)
        return config_lora
    if now is None:
        return config_lora
    # Keep the slots it ran with if more: adapters loaded at run time may fill them.
    slots = max(now.max_loras, config_lora.max_loras)
    return now.model_copy(update={"max_loras": slots})


def with_adapters(entry: ModelEntry | None, settings: dict[str, Any]) -> dict[str, Any]:
    """``settings`` (a registry entry's ServerConfig values) with the LoRA settings of the
    entry's declared adapters added, checked before anything launches.

    Raises:
        ConfigError: The models file is invalid.
        NotFoundError, UsageError: As :func:`lora_settings`.
    """
    if entry is None:
        return settings
    from cmw_vllm.model_registry import adapters_for, all_adapters

    lora = lora_settings(entry, adapters_for(entry.alias, all_adapters()))
    return settings if lora is None else {**settings, "lora": lora}


# --------------------------------------------------------------------------------------------
# A running server's adapters (vLLM's /v1/models, /v1/load_lora_adapter, /v1/unload_lora_adapter)


def loaded_adapters(base_url: str, api_key: str | None, timeout: float) -> list[str]:
    """The adapters a running server serves now (``/v1/models`` entries with a parent).

    Raises:
        ServerRequestError: The server did not answer, or answered something else than a list.
    """
    import json

    from cmw_vllm.errors import ServerRequestError
    from cmw_vllm.health_check import auth_headers, http_get

    resp = http_get(base_url, "/v1/models", timeout, auth_headers(api_key))
    try:
        data = json.loads(resp.body)["data"] if resp.status == 200 else None
    except (ValueError, KeyError, TypeError):
        data = None
    if not isinstance(data, list):
        raise ServerRequestError(f"{base_url}/v1/models answered {resp.status}, not a list")
    return [str(m["id"]) for m in data if isinstance(m, dict) and m.get("parent")]


def _post(base_url: str, path: str, body: dict[str, Any], api_key: str | None,
          timeout: float) -> None:
    import http.client
    import json
    from urllib.parse import urlsplit

    from cmw_vllm.errors import ServerRequestError

    parts = urlsplit(base_url)
    conn = http.client.HTTPConnection(parts.hostname or "127.0.0.1", parts.port or 80,
                                      timeout=timeout)
    headers = {"Content-Type": "application/json"}
    if api_key:
        headers["Authorization"] = f"Bearer {api_key}"
    try:
        conn.request("POST", path, body=json.dumps(body).encode(), headers=headers)
        resp = conn.getresponse()
        text = resp.read(65536).decode("utf-8", "replace")
    except (OSError, http.client.HTTPException) as exc:
        raise ServerRequestError(f"{base_url}{path}: {type(exc).__name__}: {exc}") from None
    finally:
        conn.close()
    if resp.status != 200:
        try:
            message = json.loads(text)["error"]["message"]
        except (ValueError, KeyError, TypeError):
            message = " ".join(text.split())[:200]
        raise ServerRequestError(f"{path} answered {resp.status}: {message}")


def load_adapter(base_url: str, name: str, path: str, api_key: str | None,
                 timeout: float = 120.0) -> None:
    """Load adapter ``name`` from ``path`` into a running server (runtime loading on).

    Raises:
        ServerRequestError: The server refused or did not answer.
    """
    logger.info("loading adapter %s into %s", name, base_url)
    _post(base_url, "/v1/load_lora_adapter", {"lora_name": name, "lora_path": path},
          api_key, timeout)


def unload_adapter(base_url: str, name: str, api_key: str | None,
                   timeout: float = 30.0) -> None:
    """Unload adapter ``name`` from a running server.

    Raises:
        ServerRequestError: The server refused or did not answer.
    """
    logger.info("unloading adapter %s from %s", name, base_url)
    _post(base_url, "/v1/unload_lora_adapter", {"lora_name": name}, api_key, timeout)
