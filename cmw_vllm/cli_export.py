"""CLI command ``export``: a server as Kubernetes manifests (``k8s``) or a Compose file.

The settings are resolved exactly as ``start`` resolves them (its options, models.toml, the
registry); :mod:`cmw_vllm.k8s_export` builds and checks the objects.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import click

from cmw_vllm.cli_common import echo_err, echo_json
from cmw_vllm.cli_lifecycle import _build_config, _parse_env, _StartCommand, start
from cmw_vllm.errors import UsageError
from cmw_vllm.vocab import parse_port

# start's options that say what a server is (the others say how this machine runs it).
_SHARED = ("name", "port", "tensor_parallel_size", "gpu_memory_utilization", "max_model_len",
           "dtype", "served_model_name", "env_pairs", "task", "drain", "nnodes",
           "master_port", "data_parallel_size")


def _start_options(func: Callable[..., Any]) -> Callable[..., Any]:
    """Give ``func`` the options of ``start`` named in :data:`_SHARED` (the same objects:
    the same parsing, help and checks)."""
    params = [p for p in start.params if p.name in _SHARED]
    func.__click_params__ = [*getattr(func, "__click_params__", []),  # type: ignore[attr-defined]
                             *reversed(params)]
    return func


def _export_options(func: Callable[..., Any]) -> Callable[..., Any]:
    for decorator in reversed([
        click.option("--image", help="The vLLM image (default: vllm/vllm-openai at the "
                     "version of the vLLM installed here, else v0.32.0)."),
        click.option("--storage", default="pvc-size:100Gi", show_default=True,
                     metavar="pvc:NAME|pvc-size:SIZE|hostpath:DIR",
                     help="Where the Hugging Face cache lives: a claim that exists, a claim "
                     "to create, or a directory of the node."),
        click.option("-o", "--output", "output", type=click.Path(dir_okay=False),
                     help="Write to FILE instead of stdout."),
        click.option("--json", "as_json", is_flag=True,
                     help="Print {objects, image, notes} as JSON instead of YAML."),
    ]):
        func = decorator(func)
    return func


def _resolve(target: str, params: dict[str, Any], vllm_args: tuple[str, ...]) -> Any:
    """(config, object name) for ``target`` with ``start``'s options in ``params``."""
    from cmw_vllm.k8s_export import LWS_FLAGS, kube_name
    from cmw_vllm.vocab import looks_like_path

    nnodes = params.get("nnodes") or 1
    distributed: dict[str, Any] = {}
    if nnodes > 1:
        if params.get("data_parallel_size"):
            raise UsageError("data parallel over several nodes is not exported: use "
                             "--replicas for more model copies")
        distributed = {"nnodes": nnodes, "master_addr": LWS_FLAGS["--master-addr"]}
        if params.get("master_port"):
            distributed["master_port"] = params["master_port"]
    elif params.get("data_parallel_size"):
        distributed = {"data_parallel_size": params["data_parallel_size"]}
    elif params.get("master_port"):
        raise UsageError("--master-port goes with --nnodes above 1")
    options = {
        "name": params.get("name"),
        "port": None if params.get("port") is None else parse_port(params["port"]),
        "tensor_parallel_size": params.get("tensor_parallel_size"),
        "gpu_memory_utilization": params.get("gpu_memory_utilization"),
        "max_model_len": params.get("max_model_len"),
        "dtype": params.get("dtype"),
        "served_model_name": params.get("served_model_name"),
        "task": params.get("task"),
        "env": _parse_env(params.get("env_pairs") or ()),
        "distributed": distributed or None,
        "drain": params.get("drain"),
    }
    config = _build_config(target, options, vllm_args)
    if looks_like_path(config.model) or config.model.startswith("/"):
        raise UsageError(f"{config.model} is a directory of this machine, which the "
                         "cluster's pods do not see",
                         hint="export a Hugging Face id or a registry alias; the pods "
                         "download it into the cache (--storage)")
    return config, kube_name(config.name, explicit=params.get("name") is not None)


def _flag_notes(config: Any) -> list[str]:
    from cmw_vllm.k8s_export import PINNED_VLLM, serve_args, unknown_flags

    unknown = unknown_flags(serve_args(config)[1:])
    if not unknown:
        return []
    return [f"vLLM {PINNED_VLLM} has no {', '.join(unknown)}: the pods fail to start unless "
            "the image's vLLM has it"]


def _export_settings(image: str | None, storage: str, replicas: int, namespace: str | None,
                     gateway: bool = False, gateway_image: str | None = None
                     ) -> tuple[Any, list[str]]:
    from cmw_vllm import k8s_export

    notes: list[str] = []
    version = None
    if image is None:
        version = k8s_export.installed_vllm_version()
        if version is None:
            notes.append(f"no vLLM found here: the image is pinned to v"
                         f"{k8s_export.PINNED_VLLM} (--image to choose)")
        image = k8s_export.image_for(version)
    if gateway:
        from cmw_vllm import __version__

        gateway_image = gateway_image or f"cmw-vllm:{__version__}"
        notes.append(f"the gateway runs image {gateway_image}: an image with cmw-vllm "
                     "installed (--gateway-image to name yours)")
    options = k8s_export.ExportOptions(
        image=image, namespace=namespace, storage=k8s_export.parse_storage(storage),
        replicas=replicas, gateway=gateway,
        gateway_image=gateway_image or "cmw-vllm:latest", version=version)
    return options, notes


def _emit(text: str, output: str | None) -> None:
    if output is None:
        click.echo(text, nl=False)
        return
    from pathlib import Path

    try:
        Path(output).write_text(text, encoding="utf-8")
    except OSError as exc:
        from cmw_vllm.errors import EnvironmentProblem

        raise EnvironmentProblem(f"cannot write {output}: {exc.strerror or exc}") from None
    echo_err(f"Wrote {output}")


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
def export() -> None:
    """Write a server as Kubernetes manifests or a Docker Compose file.

    \b
    Examples:
      cmw-vllm export k8s qwen > qwen.yaml
      cmw-vllm export k8s qwen -tp 8 --nnodes 2
      cmw-vllm export compose qwen -o compose.yaml
    """


@export.command(name="k8s", cls=_StartCommand)
@click.argument("target", metavar="NAME|MODEL")
@click.argument("vllm_args", nargs=-1, type=click.UNPROCESSED, metavar="[-- VLLM_FLAGS...]")
@_start_options
@click.option("--namespace", help="The objects' namespace (default: none, kubectl's).")
@click.option("--replicas", type=click.IntRange(min=1), default=1, show_default=True,
              help="Model copies (pods, or LeaderWorkerSet groups).")
@click.option("--gateway", is_flag=True,
              help="Also a `cmw-vllm gateway` Deployment routing to the server's Service.")
@click.option("--gateway-image", help="The gateway's image (one with cmw-vllm installed).")
@_export_options
def export_k8s(target: str, vllm_args: tuple[str, ...], namespace: str | None, replicas: int,
               gateway: bool, gateway_image: str | None, image: str | None, storage: str,
               output: str | None, as_json: bool, **params: Any) -> None:
    """Print Kubernetes manifests that run NAME|MODEL as `cmw-vllm start` would.

    The same options, models.toml entry and registry settings as `start` give the vLLM
    flags; vLLM runs in exec form with --host 0.0.0.0 and --shutdown-timeout = --drain.
    One node: a Deployment (Recreate), a Service and a claim for the Hugging Face cache.
    --nnodes N: a LeaderWorkerSet (leaderworkerset.x-k8s.io/v1, vLLM's mp backend, workers
    headless) and a Service for the leader. Each pod gets nvidia.com/gpu = TP x PP / nodes,
    /dev/shm in memory, a startupProbe that allows 30 minutes of loading, a preStop pause
    and a grace period of pause + drain + margin; HF_TOKEN and VLLM_API_KEY come from the
    optional Secrets hf-token (key token) and vllm-api-key (key key). The manifests are
    checked before they are printed (names, selectors, quantities, GPUs, grace period).

    \b
    JSON: {objects, image, notes}

    \b
    Examples:
      cmw-vllm export k8s qwen > qwen.yaml
      cmw-vllm export k8s qwen -tp 8 --nnodes 2 --storage pvc:models
      cmw-vllm export k8s Qwen/Qwen3-0.6B --name small --gateway -o small.yaml
    """
    from cmw_vllm import k8s_export

    config, name = _resolve(target, params, vllm_args)
    options, notes = _export_settings(image, storage, replicas, namespace, gateway,
                                      gateway_image)
    if replicas > 1 and options.storage.kind == "pvc-size" and (
            config.distributed is None or config.distributed.nnodes == 1):
        raise UsageError("--replicas above 1 cannot share one ReadWriteOnce claim",
                         hint="use --storage pvc:NAME (a ReadWriteMany claim) or "
                         "hostpath:DIR")
    docs = k8s_export.k8s_manifests(config, name, options)
    notes += _flag_notes(config)
    if config.distributed is not None and config.distributed.nnodes > 1:
        notes.append("needs the LeaderWorkerSet controller (LWS) in the cluster")
    if as_json:
        echo_json({"objects": docs, "image": options.image, "notes": notes})
        return
    for note in notes:
        echo_err(f"Note: {note}")
    header = (f"Made by `cmw-vllm export k8s` for {config.model} ({name}).\n"
              f"Apply: kubectl apply -f FILE; HF token (gated models): kubectl create "
              f"secret generic {k8s_export.HF_SECRET[0]} --from-literal="
              f"{k8s_export.HF_SECRET[1]}=hf_...")
    _emit(k8s_export.to_yaml(docs, header), output)


@export.command(name="compose", cls=_StartCommand)
@click.argument("target", metavar="NAME|MODEL")
@click.argument("vllm_args", nargs=-1, type=click.UNPROCESSED, metavar="[-- VLLM_FLAGS...]")
@_start_options
@_export_options
def export_compose(target: str, vllm_args: tuple[str, ...], image: str | None, storage: str,
                   output: str | None, as_json: bool, **params: Any) -> None:
    """Print a Docker Compose file that runs NAME|MODEL as `cmw-vllm start` would.

    The same vLLM flags, drain (stop_grace_period covers --shutdown-timeout) and health
    check (/health, 30 minutes of start period) as `export k8s`; the GPUs are reserved with
    the NVIDIA driver. --storage pvc:NAME names an external volume, pvc-size a named volume,
    hostpath:DIR a bind mount. HF_TOKEN and VLLM_API_KEY come from the environment of
    `docker compose up`.

    \b
    JSON: {objects, image, notes} (one object: the Compose file)

    \b
    Examples:
      cmw-vllm export compose qwen -o compose.yaml
    """
    from cmw_vllm import k8s_export

    config, name = _resolve(target, params, vllm_args)
    options, notes = _export_settings(image, storage, 1, None)
    doc = k8s_export.compose_document(config, name, options)
    notes += _flag_notes(config)
    if as_json:
        echo_json({"objects": [doc], "image": options.image, "notes": notes})
        return
    for note in notes:
        echo_err(f"Note: {note}")
    header = (f"Made by `cmw-vllm export compose` for {config.model} ({name}).\n"
              "Run: docker compose -f FILE up -d")
    _emit(k8s_export.to_yaml([doc], header), output)


COMMANDS: list[click.Command] = [export]
