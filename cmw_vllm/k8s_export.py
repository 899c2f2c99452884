"""Kubernetes and Docker Compose manifests for a server, built from its ServerConfig.

``cmw-vllm export k8s`` and ``export compose`` resolve the same settings as ``start``
(:mod:`cmw_vllm.server_config`) and hand them here. Everything is a pure function that
returns plain dicts (one per Kubernetes object); :func:`to_yaml` renders them and
:func:`check_manifests` refuses a set that would deploy wrong (what schema validators miss).

What the manifests hold, and why (docs/kubernetes.md says it for users):

- one node: a Deployment (``Recreate``: a rolling update would need twice the GPUs), a
  Service, a PersistentVolumeClaim for the Hugging Face cache (or a claim or host path the
  user names); the container runs ``vllm serve`` in exec form, so SIGTERM reaches vLLM's API
  server, which drains for ``--shutdown-timeout`` (the server's drain);
- the grace period covers the preStop pause (endpoints are updated before vLLM stops
  taking requests), the drain and a margin for the teardown;
- a startupProbe on ``/health`` allows :data:`STARTUP_SECONDS` of loading (vLLM answers
  nothing before the model is loaded; a liveness probe alone kills a loading server);
- several nodes: a LeaderWorkerSet with vLLM's own multi-node engine (``mp``): every pod
  runs the same flags with its rank from LWS's variables; workers are ``--headless`` and
  get no ports and no probes; a Service for the leaders.
"""

from __future__ import annotations

import logging
import math
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from cmw_vllm.errors import ConfigError, UsageError

if TYPE_CHECKING:
    from cmw_vllm.server_config import ServerConfig

logger = logging.getLogger(__name__)

PINNED_VLLM = "0.32.0"  # the vLLM version the flag list and registry are made for
IMAGE_REPO = "vllm/vllm-openai"
DEFAULT_STORAGE = "pvc-size:100Gi"
HF_HOME = "/root/.cache/huggingface"
HF_SECRET = ("hf-token", "token")  # (Secret, key) of the optional Hugging Face token
API_KEY_SECRET = ("vllm-api-key", "key")  # (Secret, key) of the optional vLLM API key
GATEWAY_SECRET = ("cmw-vllm-gateway", "keys")  # the gateway's client keys
PRESTOP_SECONDS = 15  # endpoints stop sending traffic before vLLM stops taking it
MARGIN_SECONDS = 15  # vLLM's teardown after the drain (workers, engine core)
STARTUP_SECONDS = 1800  # loading allowed before the startupProbe gives up (at least 600)
MIN_STARTUP_SECONDS = 600
GPU_RESOURCE = "nvidia.com/gpu"
MANAGED_BY = "cmw-vllm"
LWS_API = "leaderworkerset.x-k8s.io/v1"
GATEWAY_PORT = 4000
GATEWAY_NAME = "cmw-vllm-gateway"

# LWS's variables (injected into every container of a group) in vLLM's multi-node flags.
LWS_FLAGS = {"--nnodes": "$(LWS_GROUP_SIZE)", "--node-rank": "$(LWS_WORKER_INDEX)",
             "--master-addr": "$(LWS_LEADER_ADDRESS)"}

# Kubernetes' name rules (k8s.io/apimachinery/pkg/util/validation).
DNS1123_LABEL = r"[a-z0-9]([-a-z0-9]*[a-z0-9])?"
DNS1035_LABEL = r"[a-z]([-a-z0-9]*[a-z0-9])?"
DNS1123_SUBDOMAIN = rf"{DNS1123_LABEL}(\.{DNS1123_LABEL})*"
LABEL_VALUE = r"(([A-Za-z0-9][-A-Za-z0-9_.]*)?[A-Za-z0-9])?"
PORT_NAME = r"[a-z0-9]([-a-z0-9]*[a-z0-9])?"  # IANA_SVC_NAME, at most 15, one letter at least
QUANTITY = r"[+-]?(\d+(\.\d*)?|\.\d+)(Ki|Mi|Gi|Ti|Pi|Ei|[numkMGTPE]|[eE][+-]?\d+)?"


@dataclass(frozen=True)
class Storage:
    """Where the Hugging Face cache lives: ``pvc`` (a claim that exists), ``pvc-size`` (a
    claim this export creates, of that size) or ``hostpath`` (a directory of the node)."""

    kind: str
    value: str

    def volume(self, claim_name: str) -> dict[str, Any]:
        """The pod's volume for the cache (``claim_name``: the claim ``pvc-size`` creates)."""
        if self.kind == "hostpath":
            return {"name": "hf-cache", "hostPath": {"path": self.value,
                                                     "type": "DirectoryOrCreate"}}
        claim = self.value if self.kind == "pvc" else claim_name
        return {"name": "hf-cache", "persistentVolumeClaim": {"claimName": claim}}


@dataclass(frozen=True)
class ExportOptions:
    """What ``export`` adds to the server's settings."""

    image: str
    namespace: str | None = None
    storage: Storage = field(default_factory=lambda: parse_storage(DEFAULT_STORAGE))
    replicas: int = 1
    gateway: bool = False
    gateway_image: str = "cmw-vllm:latest"
    version: str | None = None  # the vLLM version the image runs, for the labels


def parse_storage(text: str) -> Storage:
    """``pvc:NAME``, ``pvc-size:SIZE`` or ``hostpath:DIR`` as a :class:`Storage`.

    Raises:
        UsageError: Another form, a claim name that is no Kubernetes name, a size that is
            no quantity, a relative directory.
    """
    kind, sep, value = text.partition(":")
    kind = kind.strip().lower()
    value = value.strip()
    if not sep or not value or kind not in ("pvc", "pvc-size", "hostpath"):
        raise UsageError(f"invalid --storage {text!r}: use pvc:NAME, pvc-size:SIZE (e.g. "
                         "100Gi) or hostpath:DIR")
    if kind == "pvc" and not _full(DNS1123_SUBDOMAIN, value, 253):
        raise UsageError(f"invalid --storage {text!r}: {value!r} is not a Kubernetes name "
                         "(lower-case letters, digits, '-' and '.')")
    if kind == "pvc-size" and (not _full(QUANTITY, value) or quantity_value(value) <= 0):
        raise UsageError(f"invalid --storage {text!r}: {value!r} is not a size such as 100Gi")
    if kind == "hostpath" and not value.startswith("/"):
        raise UsageError(f"invalid --storage {text!r}: the directory must be absolute")
    return Storage(kind, value)


def image_for(version: str | None) -> str:
    """vLLM's image for ``version`` (a local build label such as ``+cpu`` is dropped); the
    pinned version when None."""
    base = (version or PINNED_VLLM).split("+", 1)[0]
    return f"{IMAGE_REPO}:v{base}"


def installed_vllm_version() -> str | None:
    """The version of the vLLM that ``start`` would run here; None when none is found."""
    from cmw_vllm.engine_probe import probe_engine

    info = probe_engine(torch_timeout=None)
    if not info.installed or not info.version:
        logger.info("no vLLM found here (%s)", info.error)
        return None
    return info.version


def _full(pattern: str, text: str, max_len: int = 63) -> bool:
    return len(text) <= max_len and re.fullmatch(pattern, text) is not None


def kube_name(name: str, explicit: bool) -> str:
    """The objects' name for server ``name``: a DNS-1035 label (a Service's rule, the
    strictest that applies).

    A name the user gave (``--name``) must already be one; one that was derived (an alias,
    a model id) has its other characters turned into ``-``.

    Raises:
        ConfigError: ``explicit`` and ``name`` cannot be a Kubernetes name.
    """
    if _full(DNS1035_LABEL, name):
        return name
    derived = re.sub(r"[^a-z0-9-]+", "-", name.lower()).strip("-")
    derived = re.sub(r"^[^a-z]+", "", derived)[:63].rstrip("-")
    if explicit or not derived:
        hint = f"try --name {derived}" if derived else "give --name with a letter first"
        raise ConfigError(
            f"{name!r} cannot name Kubernetes objects: use lower-case letters, digits and "
            "'-', starting with a letter (at most 63)", hint=hint)
    return derived


# --------------------------------------------------------------------------- flags


def serve_args(config: ServerConfig, *, worker: bool = False) -> list[str]:
    """``vllm serve``'s arguments (model first) for a pod, from the flags ``start`` uses.

    The host is every interface (the Service and the probes reach the pod's address). Over
    several nodes, the node count, rank and leader address are LWS's variables, and a
    worker is headless.
    """
    dist = config.distributed
    update: dict[str, Any] = {"host": "0.0.0.0"}
    if dist is not None and dist.nnodes > 1:
        update["distributed"] = dist.model_copy(update={
            "node_rank": 1 if worker else 0, "master_addr": LWS_FLAGS["--master-addr"]})
    args = config.model_copy(update=update).vllm_cli_args()
    if dist is not None and dist.nnodes > 1:
        for i, arg in enumerate(args[:-1]):
            if arg in ("--nnodes", "--node-rank"):
                args[i + 1] = LWS_FLAGS[arg]
    return [config.model, *(str(a) for a in args)]  # str: the task's words are StrEnums


def unknown_flags(args: list[str]) -> list[str]:
    """The flags among ``args`` that vLLM's list (the version cmw-vllm ships it for) lacks."""
    from cmw_vllm.vllm_flags import normalize_flag, serve_flags

    known = serve_flags()
    return [a.split("=", 1)[0] for a in args
            if normalize_flag(a) is not None and normalize_flag(a) not in known]


def flag_int(args: list[str], *flags: str, default: int = 1) -> int | None:
    """The integer value of the last of ``flags`` in ``args``; ``default`` when absent, None
    when its value is no integer (an LWS variable)."""
    value: str | None = None
    for i, arg in enumerate(args):
        name, sep, rest = arg.partition("=")
        if name in flags:
            value = rest if sep else (args[i + 1] if i + 1 < len(args) else None)
    if value is None:
        return default
    try:
        return int(value)
    except ValueError:
        return None


# --------------------------------------------------------------------------- pieces


def labels_for(name: str, component: str) -> dict[str, str]:
    """The labels of every object of server ``name`` (the selector: name and instance)."""
    return {"app.kubernetes.io/name": name, "app.kubernetes.io/instance": name,
            "app.kubernetes.io/component": component,
            "app.kubernetes.io/managed-by": MANAGED_BY}


def _selector(labels: Mapping[str, str]) -> dict[str, str]:
    return {k: labels[k] for k in ("app.kubernetes.io/name", "app.kubernetes.io/instance")}


def _metadata(name: str, labels: Mapping[str, str], options: ExportOptions,
              annotations: Mapping[str, str] | None = None) -> dict[str, Any]:
    meta: dict[str, Any] = {"name": name}
    if options.namespace:
        meta["namespace"] = options.namespace
    meta["labels"] = dict(labels)
    if annotations:
        meta["annotations"] = dict(annotations)
    return meta


def _secret_env(var: str, secret: tuple[str, str]) -> dict[str, Any]:
    return {"name": var, "valueFrom": {"secretKeyRef": {"name": secret[0], "key": secret[1],
                                                        "optional": True}}}


def grace_seconds(drain: int) -> int:
    """``terminationGracePeriodSeconds`` for a drain: preStop + drain + margin."""
    return PRESTOP_SECONDS + drain + MARGIN_SECONDS


def _pre_stop() -> dict[str, Any]:
    # exec rather than the sleep action: that is alpha (off) on 1.29; the image has sleep.
    return {"preStop": {"exec": {"command": ["/bin/sleep", str(PRESTOP_SECONDS)]}}}


def _probes(port_name: str = "http") -> dict[str, Any]:
    get = {"path": "/health", "port": port_name}
    return {
        "startupProbe": {"httpGet": get, "periodSeconds": 10,
                         "failureThreshold": STARTUP_SECONDS // 10, "timeoutSeconds": 5},
        "readinessProbe": {"httpGet": get, "periodSeconds": 5, "failureThreshold": 3,
                           "timeoutSeconds": 5},
        "livenessProbe": {"httpGet": get, "periodSeconds": 10, "failureThreshold": 6,
                          "timeoutSeconds": 5},
    }


def _env(config: ServerConfig, pod_ip: bool) -> list[dict[str, Any]]:
    env: list[dict[str, Any]] = [{"name": "HF_HOME", "value": HF_HOME}]
    for key, value in sorted(config.env.items()):
        if key not in ("CUDA_VISIBLE_DEVICES", "HF_HOME", "VLLM_HOST_IP"):
            env.append({"name": key, "value": value})
    if pod_ip:
        env.append({"name": "VLLM_HOST_IP",
                    "valueFrom": {"fieldRef": {"fieldPath": "status.podIP"}}})
    env.append(_secret_env("HF_TOKEN", HF_SECRET))
    env.append(_secret_env("VLLM_API_KEY", API_KEY_SECRET))
    return env


def _shm_size(gpus: int) -> str:
    return "20Gi" if gpus > 1 else "2Gi"


def _vllm_pod_spec(config: ServerConfig, options: ExportOptions, claim_name: str, *,
                   worker: bool = False, multinode: bool = False,
                   claim_template: bool = False) -> dict[str, Any]:
    """The pod spec of one vLLM pod (a Deployment's, an LWS leader's or worker's)."""
    gpus = config.local_device_count()
    container: dict[str, Any] = {
        "name": "vllm",
        "image": options.image,
        "command": ["vllm", "serve"],
        "args": serve_args(config, worker=worker),
        "env": _env(config, pod_ip=multinode),
    }
    if not worker:
        container["ports"] = [{"name": "http", "containerPort": config.port,
                               "protocol": "TCP"}]
        container.update(_probes())
    container["resources"] = {"limits": {GPU_RESOURCE: str(gpus)},
                              "requests": {GPU_RESOURCE: str(gpus)}}
    container["volumeMounts"] = [{"name": "dshm", "mountPath": "/dev/shm"},
                                 {"name": "hf-cache", "mountPath": HF_HOME}]
    container["lifecycle"] = _pre_stop()
    volumes = [{"name": "dshm", "emptyDir": {"medium": "Memory",
                                             "sizeLimit": _shm_size(gpus)}}]
    if not claim_template:
        volumes.append(options.storage.volume(claim_name))
    return {"terminationGracePeriodSeconds": grace_seconds(config.drain),
            "containers": [container], "volumes": volumes}


def _pvc(name: str, size: str, labels: Mapping[str, str], options: ExportOptions,
         ) -> dict[str, Any]:
    return {"apiVersion": "v1", "kind": "PersistentVolumeClaim",
            "metadata": _metadata(name, labels, options),
            "spec": {"accessModes": ["ReadWriteOnce"],
                     "resources": {"requests": {"storage": size}}}}


def _service(name: str, labels: Mapping[str, str], selector: Mapping[str, str], port: int,
             options: ExportOptions) -> dict[str, Any]:
    return {"apiVersion": "v1", "kind": "Service",
            "metadata": _metadata(name, labels, options),
            "spec": {"type": "ClusterIP", "selector": dict(selector),
                     "ports": [{"name": "http", "port": port, "targetPort": "http",
                                "protocol": "TCP"}]}}


def _annotations(config: ServerConfig) -> dict[str, str]:
    return {"cmw-vllm/model": config.model, "cmw-vllm/drain-seconds": str(config.drain)}


# --------------------------------------------------------------------------- objects


def server_manifests(config: ServerConfig, name: str, options: ExportOptions
                     ) -> list[dict[str, Any]]:
    """The objects that run server ``config`` as ``name``: a Deployment (one node) or a
    LeaderWorkerSet (``--nnodes`` above 1), its Service, and the cache's claim."""
    dist = config.distributed
    if dist is not None and dist.nnodes > 1:
        return _lws_manifests(config, name, options)
    labels = labels_for(name, "server")
    if options.version:
        labels["app.kubernetes.io/version"] = options.version.split("+", 1)[0]
    claim = f"{name}-hf-cache"
    out: list[dict[str, Any]] = []
    if options.storage.kind == "pvc-size":
        out.append(_pvc(claim, options.storage.value, labels, options))
    out.append({
        "apiVersion": "apps/v1", "kind": "Deployment",
        "metadata": _metadata(name, labels, options, _annotations(config)),
        "spec": {
            "replicas": options.replicas,
            "strategy": {"type": "Recreate"},
            "selector": {"matchLabels": _selector(labels)},
            "template": {"metadata": {"labels": dict(labels)},
                         "spec": _vllm_pod_spec(config, options, claim)},
        },
    })
    out.append(_service(name, labels, _selector(labels), config.port, options))
    return out


def _lws_manifests(config: ServerConfig, name: str, options: ExportOptions
                   ) -> list[dict[str, Any]]:
    dist = config.distributed
    assert dist is not None
    labels = labels_for(name, "server")
    if options.version:
        labels["app.kubernetes.io/version"] = options.version.split("+", 1)[0]
    leader_labels = {**labels, "role": "leader"}
    worker_labels = {**labels, "role": "worker"}
    claim = f"{name}-hf-cache"
    per_pod = options.storage.kind == "pvc-size"  # one claim per pod: RWO on each node
    template: dict[str, Any] = {
        "size": dist.nnodes,
        "restartPolicy": "RecreateGroupOnPodRestart",
        "leaderTemplate": {
            "metadata": {"labels": leader_labels},
            "spec": _vllm_pod_spec(config, options, claim, multinode=True,
                                   claim_template=per_pod)},
        "workerTemplate": {
            "metadata": {"labels": worker_labels},
            "spec": _vllm_pod_spec(config, options, claim, worker=True, multinode=True,
                                   claim_template=per_pod)},
    }
    if per_pod:
        template["volumeClaimTemplates"] = [{
            "metadata": {"name": "hf-cache"},
            "spec": {"accessModes": ["ReadWriteOnce"],
                     "resources": {"requests": {"storage": options.storage.value}}}}]
    lws = {
        "apiVersion": LWS_API, "kind": "LeaderWorkerSet",
        "metadata": _metadata(name, labels, options, _annotations(config)),
        "spec": {"replicas": options.replicas, "startupPolicy": "LeaderCreated",
                 "leaderWorkerTemplate": template},
    }
    return [lws, _service(name, labels, _selector(leader_labels) | {"role": "leader"},
                          config.port, options)]


def gateway_manifests(backends: list[tuple[str, ServerConfig]], options: ExportOptions
                      ) -> list[dict[str, Any]]:
    """A Deployment of ``cmw-vllm gateway`` routing to ``backends`` ((object name, config))
    through their Services, and its Service.

    The gateway gets them as ``--upstream``: it starts, stops and evicts nothing (Kubernetes
    runs the servers). Its shutdown grace is the longest drain, so a request in flight
    through it finishes as one sent to the server would.
    """
    name = GATEWAY_NAME
    labels = labels_for(name, "gateway")
    drain = max((config.drain for _, config in backends), default=0)
    hosts = [name, ".svc", ".cluster.local"]
    if options.namespace:
        hosts.insert(1, f"{name}.{options.namespace}")
    args = ["gateway", "--host", "0.0.0.0", "--port", str(GATEWAY_PORT),
            "--shutdown-grace", str(drain), "--allowed-hosts", ",".join(hosts)]
    for svc, config in backends:
        args += ["--upstream", f"{','.join(config.served_names())}=http://{svc}:{config.port}"]
    get = {"path": "/health", "port": "http"}
    container = {
        "name": "gateway",
        "image": options.gateway_image,
        "command": ["cmw-vllm"],
        "args": args,
        "env": [_secret_env("CMW_VLLM_GATEWAY_API_KEYS", GATEWAY_SECRET),
                _secret_env("VLLM_API_KEY", API_KEY_SECRET)],
        "ports": [{"name": "http", "containerPort": GATEWAY_PORT, "protocol": "TCP"}],
        "readinessProbe": {"httpGet": get, "periodSeconds": 5},
        "livenessProbe": {"httpGet": get, "periodSeconds": 10, "failureThreshold": 6},
        "lifecycle": _pre_stop(),
    }
    return [
        {"apiVersion": "apps/v1", "kind": "Deployment",
         "metadata": _metadata(name, labels, options),
         "spec": {"replicas": 1, "selector": {"matchLabels": _selector(labels)},
                  "template": {"metadata": {"labels": dict(labels)},
                               "spec": {"terminationGracePeriodSeconds":
                                        grace_seconds(drain),
                                        "containers": [container]}}}},
        _service(name, labels, _selector(labels), GATEWAY_PORT, options),
    ]


def k8s_manifests(config: ServerConfig, name: str, options: ExportOptions
                  ) -> list[dict[str, Any]]:
    """Every object of ``export k8s``, checked (see :func:`check_manifests`).

    Raises:
        ConfigError: A check fails (the message names the object and the rule).
    """
    docs = server_manifests(config, name, options)
    if options.gateway:
        docs += gateway_manifests([(name, config)], options)
    check_manifests(docs)
    return docs


# --------------------------------------------------------------------------- compose


def compose_document(config: ServerConfig, name: str, options: ExportOptions
                     ) -> dict[str, Any]:
    """A Docker Compose file that runs the server with the same drain and health checks.

    Raises:
        UsageError: Several nodes (Compose runs on one machine).
    """
    if config.distributed is not None and config.distributed.nnodes > 1:
        raise UsageError("export compose runs one machine; --nnodes needs `export k8s`",
                         hint="several nodes are exported as a LeaderWorkerSet")
    gpus = config.local_device_count()
    # No value: taken from the environment of `docker compose` when set there, else unset.
    env: dict[str, str | None] = {"HF_HOME": HF_HOME, "HF_TOKEN": None, "VLLM_API_KEY": None}
    env.update({k: v for k, v in sorted(config.env.items())
                if k not in ("CUDA_VISIBLE_DEVICES", "HF_HOME")})
    service: dict[str, Any] = {
        "image": options.image,
        "entrypoint": ["vllm", "serve"],
        "command": serve_args(config),
        "ports": [f"{config.port}:{config.port}"],
        "environment": env,
        "ipc": "host",
        "volumes": ([f"{options.storage.value}:{HF_HOME}"] if options.storage.kind == "hostpath"
                    else [f"hf-cache:{HF_HOME}"]),
        "healthcheck": {
            "test": ["CMD", "python3", "-c",
                     "import urllib.request,sys; sys.exit(0 if urllib.request.urlopen("
                     f"'http://127.0.0.1:{config.port}/health', timeout=5).status == 200 "
                     "else 1)"],
            "interval": "10s", "timeout": "5s", "retries": 3,
            "start_period": f"{STARTUP_SECONDS}s"},
        "stop_signal": "SIGTERM",
        "stop_grace_period": f"{config.drain + MARGIN_SECONDS}s",
        "restart": "unless-stopped",
        "deploy": {"resources": {"reservations": {"devices": [
            {"driver": "nvidia", "count": gpus, "capabilities": ["gpu"]}]}}},
    }
    doc: dict[str, Any] = {"name": name, "services": {name: service}}
    if options.storage.kind != "hostpath":
        doc["volumes"] = ({"hf-cache": {"external": True, "name": options.storage.value}}
                          if options.storage.kind == "pvc" else {"hf-cache": {}})
    return doc


# --------------------------------------------------------------------------- checks


def quantity_value(text: str) -> float:
    """A Kubernetes quantity as a number (``2Gi`` -> 2147483648).

    Raises:
        ValueError: Not a quantity.
    """
    match = re.fullmatch(QUANTITY, text)
    if match is None:
        raise ValueError(f"{text!r} is not a quantity")
    number = float(match.group(1).lstrip("+") if text[0] != "-" else "-" + match.group(1))
    suffix = match.group(3) or ""
    binary = {"Ki": 1, "Mi": 2, "Gi": 3, "Ti": 4, "Pi": 5, "Ei": 6}
    decimal = {"n": -3, "u": -2, "m": -1, "k": 1, "M": 2, "G": 3, "T": 4, "P": 5, "E": 6}
    if suffix in binary:
        return number * 1024 ** binary[suffix]
    if suffix in decimal:
        return number * 1000 ** decimal[suffix]
    if suffix:
        return number * 10 ** int(suffix[1:])
    return number


def _pod_templates(doc: Mapping[str, Any]) -> list[tuple[str, dict[str, Any], int]]:
    """(where, pod template, nodes per group) of a workload."""
    kind = doc.get("kind")
    spec = doc.get("spec") or {}
    if kind == "Deployment":
        return [("template", spec.get("template") or {}, 1)]
    if kind == "LeaderWorkerSet":
        lwt = spec.get("leaderWorkerTemplate") or {}
        size = int(lwt.get("size") or 1)
        out = [("workerTemplate", lwt.get("workerTemplate") or {}, size)]
        if lwt.get("leaderTemplate"):
            out.insert(0, ("leaderTemplate", lwt["leaderTemplate"], size))
        return out
    return []


def check_manifests(docs: list[dict[str, Any]]) -> None:
    """The rules schema validators miss; raise on the first that fails.

    Names are DNS-1123 (a Service's DNS-1035), label values and port names well formed;
    every selector matches its pods' labels, and every Service selects some pod of the set;
    quantities parse; a vLLM container asks for TP x PP (x DP) / nodes GPUs; the grace
    period covers the preStop pause, ``--shutdown-timeout`` and a margin; the startupProbe
    allows at least 10 minutes.

    Raises:
        ConfigError: ``invalid manifest: <kind>/<name>: <what>``.
    """
    problems = manifest_problems(docs)
    if problems:
        raise ConfigError(f"invalid manifest: {problems[0]}",
                          hint=f"{len(problems)} problem(s) in all" if len(problems) > 1
                          else None)


def manifest_problems(docs: list[dict[str, Any]]) -> list[str]:
    """Every rule of :func:`check_manifests` that ``docs`` break, as ``kind/name: what``."""
    problems: list[str] = []
    pod_labels: list[dict[str, str]] = []
    seen: set[tuple[Any, ...]] = set()
    for doc in docs:
        meta = doc.get("metadata") or {}
        name = str(meta.get("name", ""))
        where = f"{doc.get('kind')}/{name}"
        key = (doc.get("kind"), meta.get("namespace"), name)
        if key in seen:
            problems.append(f"{where}: two objects of this kind have this name")
        seen.add(key)

        def bad(what: str, where: str = where) -> None:
            problems.append(f"{where}: {what}")

        if doc.get("kind") == "Service":
            if not _full(DNS1035_LABEL, name):
                bad("a Service's name must be a DNS-1035 label (lower-case letters, digits, "
                    "'-', starting with a letter, at most 63)")
        elif not _full(DNS1123_SUBDOMAIN, name, 253):
            bad("the name must be a DNS-1123 subdomain (lower-case letters, digits, '-', '.')")
        if meta.get("namespace") is not None and not _full(DNS1123_LABEL, meta["namespace"]):
            bad(f"namespace {meta['namespace']!r} is not a DNS-1123 label")
        _check_labels(meta.get("labels") or {}, bad)
        for part, template, nodes in _pod_templates(doc):
            labels = (template.get("metadata") or {}).get("labels") or {}
            _check_labels(labels, bad)
            pod_labels.append(labels)
            _check_pod(template.get("spec") or {}, nodes, part, bad)
        if doc.get("kind") == "Deployment":
            wanted = ((doc.get("spec") or {}).get("selector") or {}).get("matchLabels") or {}
            labels = ((doc["spec"].get("template") or {}).get("metadata") or {}).get(
                "labels") or {}
            if not wanted or any(labels.get(k) != v for k, v in wanted.items()):
                bad("spec.selector.matchLabels does not match the pod template's labels")
        if doc.get("kind") == "PersistentVolumeClaim":
            size = ((doc.get("spec") or {}).get("resources") or {}).get("requests", {}).get(
                "storage")
            _check_quantity(size, "spec.resources.requests.storage", bad)
    for doc in docs:
        if doc.get("kind") != "Service":
            continue
        selector = (doc.get("spec") or {}).get("selector") or {}
        where = f"Service/{(doc.get('metadata') or {}).get('name')}"
        if not selector or not any(all(labels.get(k) == v for k, v in selector.items())
                                   for labels in pod_labels):
            problems.append(f"{where}: the selector matches no pod template of this export")
        for port in (doc.get("spec") or {}).get("ports") or []:
            if not _full(PORT_NAME, str(port.get("name", "http")), 15):
                problems.append(f"{where}: port name {port.get('name')!r} is not valid")
    return problems


def _check_labels(labels: Mapping[str, Any], bad: Any) -> None:
    for key, value in labels.items():
        prefix, _, short = str(key).rpartition("/")
        if (prefix and not _full(DNS1123_SUBDOMAIN, prefix, 253)) or not _full(
                r"[A-Za-z0-9]([-A-Za-z0-9_.]*[A-Za-z0-9])?", short):
            bad(f"label key {key!r} is not valid")
        if not isinstance(value, str) or not _full(LABEL_VALUE, value):
            bad(f"label {key}={value!r}: a value is at most 63 letters, digits, '-', '_', "
                "'.', starting and ending with a letter or digit")


def _check_quantity(value: Any, where: str, bad: Any) -> None:
    if not isinstance(value, str) or not _full(QUANTITY, value, 64):
        bad(f"{where}: {value!r} is not a Kubernetes quantity (e.g. 2Gi, 500m)")


def _check_pod(spec: Mapping[str, Any], nodes: int, part: str, bad: Any) -> None:
    grace = spec.get("terminationGracePeriodSeconds", 30)
    for volume in spec.get("volumes") or []:
        if not _full(DNS1123_LABEL, str(volume.get("name", ""))):
            bad(f"{part}: volume name {volume.get('name')!r} is not a DNS-1123 label")
        size = (volume.get("emptyDir") or {}).get("sizeLimit")
        if size is not None:
            _check_quantity(size, f"{part}: volume {volume.get('name')} sizeLimit", bad)
    for container in spec.get("containers") or []:
        cname = str(container.get("name", ""))
        where = f"{part}: container {cname}"
        if not _full(DNS1123_LABEL, cname):
            bad(f"{where}: the name is not a DNS-1123 label")
        if not container.get("image"):
            bad(f"{where}: no image")
        for port in container.get("ports") or []:
            if "name" in port and not _full(PORT_NAME, str(port["name"]), 15):
                bad(f"{where}: port name {port['name']!r} is not valid")
        resources = container.get("resources") or {}
        for section in ("limits", "requests"):
            for resource, value in (resources.get(section) or {}).items():
                _check_quantity(value, f"{where}: {section}.{resource}", bad)
        args = [str(a) for a in container.get("args") or []]
        is_vllm = list(container.get("command") or [])[:2] == ["vllm", "serve"]
        if is_vllm:
            _check_vllm_container(container, args, nodes, grace, where, bad)
        pre_stop = _pre_stop_seconds(container)
        if pre_stop > grace:
            bad(f"{where}: the preStop pause ({pre_stop}s) is longer than the grace period "
                f"({grace}s)")


def _pre_stop_seconds(container: Mapping[str, Any]) -> int:
    pre = (container.get("lifecycle") or {}).get("preStop") or {}
    if "sleep" in pre:
        return int(pre["sleep"].get("seconds", 0))
    command = (pre.get("exec") or {}).get("command") or []
    if len(command) == 2 and str(command[0]).endswith("sleep"):
        try:
            return math.ceil(float(command[1]))
        except ValueError:
            return 0
    return 0


def _check_vllm_container(container: Mapping[str, Any], args: list[str], nodes: int,
                          grace: int, where: str, bad: Any) -> None:
    tp = flag_int(args, "--tensor-parallel-size", "-tp")
    pp = flag_int(args, "--pipeline-parallel-size", "-pp")
    dp = flag_int(args, "--data-parallel-size", "-dp")
    if tp is None or pp is None or dp is None:
        bad(f"{where}: the parallel sizes must be numbers")
        return
    world = tp * pp * (dp if nodes == 1 else 1)
    limits = (container.get("resources") or {}).get("limits") or {}
    gpus = limits.get(GPU_RESOURCE)
    if world % nodes:
        bad(f"{where}: TP x PP ({world}) does not split over {nodes} nodes")
    elif gpus is None or not str(gpus).isdigit() or int(gpus) != world // nodes:
        bad(f"{where}: {GPU_RESOURCE} is {gpus!r}, but TP x PP"
            f"{' x DP' if nodes == 1 else ' / nodes'} is {world // nodes}")
    drain = flag_int(args, "--shutdown-timeout", default=0)
    pre_stop = _pre_stop_seconds(container)
    if drain is None or grace < pre_stop + drain + MARGIN_SECONDS:
        bad(f"{where}: terminationGracePeriodSeconds {grace} is shorter than the preStop "
            f"pause ({pre_stop}s) + --shutdown-timeout ({drain}s) + {MARGIN_SECONDS}s")
    if "--headless" not in args:
        startup = container.get("startupProbe") or {}
        allowed = (int(startup.get("initialDelaySeconds", 0))
                   + int(startup.get("periodSeconds", 10))
                   * int(startup.get("failureThreshold", 3)))
        if not startup or allowed < MIN_STARTUP_SECONDS:
            bad(f"{where}: the startupProbe allows {allowed if startup else 0}s of loading, "
                f"less than {MIN_STARTUP_SECONDS}s (a loading vLLM answers nothing)")
        if flag_int(args, "--port", default=8000) not in [
                p.get("containerPort") for p in container.get("ports") or []]:
            bad(f"{where}: vLLM's --port is not a container port")


# --------------------------------------------------------------------------- YAML


def to_yaml(docs: list[dict[str, Any]], header: str | None = None) -> str:
    """``docs`` as one YAML stream (``---`` between documents), keys in the order given."""
    import yaml

    class _Dumper(yaml.SafeDumper):
        def increase_indent(self, flow: bool = False, indentless: bool = False) -> Any:
            return super().increase_indent(flow, False)  # lists indented under their key

        def ignore_aliases(self, data: Any) -> bool:
            return True  # no &id001 anchors: each probe spells its own httpGet

    _Dumper.add_multi_representer(str, lambda dumper, data: dumper.represent_str(str(data)))
    body = "---\n".join(yaml.dump(doc, Dumper=_Dumper, sort_keys=False,
                                  default_flow_style=False, width=100, allow_unicode=True)
                        for doc in docs)
    if header:
        body = "".join(f"# {line}\n".replace("# \n", "#\n") for line in header.splitlines()
                       ) + body
    return body
