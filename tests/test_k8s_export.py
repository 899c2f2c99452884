"""``cmw-vllm export k8s`` and ``export compose``: the manifests are valid (kubernetes-validate,
strict, for 1.29 and the newest version it knows; the LeaderWorkerSet's pod templates as
PodTemplates, its top level against the LWS v1 fields), carry what a drain-correct vLLM
deployment needs, use the flags ``start`` would use, and bad input is one line."""

from __future__ import annotations

import copy
import json
import sys
from pathlib import Path
from typing import Any

import jsonschema
import kubernetes_validate
import pytest
import yaml
from click.testing import CliRunner

from cmw_vllm import k8s_export
from cmw_vllm.cli import cli

VERSIONS = ["1.29", kubernetes_validate.latest_version()]
MODELS_TOML = """
[models.chat]
model = "Org/Chat-7B"
port = 8100
max_model_len = 4096
gpu_memory_utilization = 0.8
drain = 90
extra_args = ["--enable-prefix-caching"]
"""

# The LeaderWorkerSet v1 API's top level (kubernetes-sigs/lws api/leaderworkerset/v1/
# leaderworkerset_types.go); the pod templates are validated as PodTemplates instead.
_OBJECT_META = {"type": "object", "required": ["name"],
                "properties": {"name": {"type": "string"}, "namespace": {"type": "string"},
                               "labels": {"type": "object"},
                               "annotations": {"type": "object"}},
                "additionalProperties": False}
_POD_TEMPLATE = {"type": "object", "required": ["spec"],
                 "properties": {"metadata": {"type": "object"}, "spec": {"type": "object"}},
                 "additionalProperties": False}
LWS_SCHEMA = {
    "type": "object",
    "required": ["apiVersion", "kind", "metadata", "spec"],
    "additionalProperties": False,
    "properties": {
        "apiVersion": {"const": "leaderworkerset.x-k8s.io/v1"},
        "kind": {"const": "LeaderWorkerSet"},
        "metadata": _OBJECT_META,
        "spec": {
            "type": "object", "required": ["leaderWorkerTemplate"],
            "additionalProperties": False,
            "properties": {
                "replicas": {"type": "integer", "minimum": 0},
                "startupPolicy": {"enum": ["LeaderCreated", "LeaderReady"]},
                "rolloutStrategy": {"type": "object"},
                "networkConfig": {"type": "object", "properties": {
                    "subdomainPolicy": {"enum": ["Shared", "UniquePerReplica"]}}},
                "leaderWorkerTemplate": {
                    "type": "object", "required": ["workerTemplate"],
                    "additionalProperties": False,
                    "properties": {
                        "size": {"type": "integer", "minimum": 1},
                        "restartPolicy": {"enum": ["Default", "RecreateGroupOnPodRestart",
                                                   "RecreateGroupAfterStart", "None"]},
                        "leaderTemplate": _POD_TEMPLATE,
                        "workerTemplate": _POD_TEMPLATE,
                        "volumeClaimTemplates": {"type": "array", "items": {
                            "type": "object", "required": ["metadata", "spec"]}},
                        "subGroupPolicy": {"type": "object"},
                    },
                },
            },
        },
    },
}


@pytest.fixture(autouse=True)
def engine_with_version(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> str:
    """An interpreter whose installed vLLM is 0.41.2+cpu (its metadata only)."""
    site = tmp_path / "engine-site"
    info = site / "vllm-0.41.2+cpu.dist-info"
    info.mkdir(parents=True)
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: vllm\nVersion: 0.41.2+cpu\n")
    wrapper = tmp_path / "engine-python"
    wrapper.write_text(f'#!/bin/sh\nPYTHONPATH="{site}" exec "{sys.executable}" "$@"\n')
    wrapper.chmod(0o755)
    monkeypatch.setenv("CMW_VLLM_PYTHON", str(wrapper))
    return "0.41.2"


@pytest.fixture
def models_file(isolated_home: Path) -> Path:
    isolated_home.mkdir(parents=True, exist_ok=True)
    path = isolated_home / "models.toml"
    path.write_text(MODELS_TOML)
    return path


def export(*args: str) -> tuple[list[dict[str, Any]], str]:
    """Run ``cmw-vllm export ARGS``; (the YAML documents, stderr)."""
    result = CliRunner().invoke(cli, ["export", *args])
    assert result.exit_code == 0, result.output
    return [d for d in yaml.safe_load_all(result.stdout) if d is not None], result.stderr


def fails(*args: str) -> tuple[int, str]:
    result = CliRunner().invoke(cli, ["export", *args])
    assert result.exit_code != 0 and result.stdout == "", result.output
    assert "Traceback" not in result.output
    lines = result.stderr.splitlines()
    assert lines[0].startswith("Error: ") and all(x.startswith("Hint: ") for x in lines[1:])
    return result.exit_code, lines[0]


def kinds(docs: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    return {d["kind"]: d for d in docs}


def validate_k8s(docs: list[dict[str, Any]]) -> None:
    """kubernetes-validate (strict) for each version; an LWS as its parts."""
    for doc in docs:
        if doc["kind"] == "LeaderWorkerSet":
            jsonschema.validate(doc, LWS_SCHEMA)
            lwt = doc["spec"]["leaderWorkerTemplate"]
            for part in ("leaderTemplate", "workerTemplate"):
                wrapped = {"apiVersion": "v1", "kind": "PodTemplate",
                           "metadata": {"name": f"{doc['metadata']['name']}-{part.lower()}"},
                           "template": lwt[part]}
                for version in VERSIONS:
                    kubernetes_validate.validate(wrapped, version, strict=True)
            for claim in lwt.get("volumeClaimTemplates", []):
                wrapped = {"apiVersion": "v1", "kind": "PersistentVolumeClaim", **claim}
                for version in VERSIONS:
                    kubernetes_validate.validate(wrapped, version, strict=True)
            continue
        for version in VERSIONS:
            kubernetes_validate.validate(doc, version, strict=True)


def vllm_container(pod_template: dict[str, Any]) -> dict[str, Any]:
    (container,) = pod_template["spec"]["containers"]
    return container


def flag(args: list[str], name: str) -> str:
    return args[args.index(name) + 1]


# ------------------------------------------------------------------------------ validators


def test_the_validators_catch_what_they_should() -> None:
    docs = k8s_export.k8s_manifests(*_config("Org/Chat-7B"), _options())
    broken = copy.deepcopy(docs)
    deployment = kinds(broken)["Deployment"]
    vllm_container(deployment["spec"]["template"])["imagePullPolicyy"] = "Always"
    with pytest.raises(kubernetes_validate.ValidationError):
        validate_k8s(broken)
    lws = kinds(k8s_export.k8s_manifests(*_config("Org/Chat-7B", tp=2, nnodes=2),
                                         _options()))["LeaderWorkerSet"]
    bad_top = copy.deepcopy(lws)
    bad_top["spec"]["leaderWorkerTemplate"]["restartPolicy"] = "Always"
    with pytest.raises(jsonschema.ValidationError):
        validate_k8s([bad_top])
    bad_pod = copy.deepcopy(lws)
    vllm_container(bad_pod["spec"]["leaderWorkerTemplate"]["workerTemplate"])["cmd"] = ["x"]
    with pytest.raises(kubernetes_validate.ValidationError):
        validate_k8s([bad_pod])


# ------------------------------------------------------------------------------ one node


def test_one_node_is_a_drain_correct_deployment(models_file: Path) -> None:
    docs, stderr = export("k8s", "chat")
    validate_k8s(docs)
    assert [d["kind"] for d in docs] == ["PersistentVolumeClaim", "Deployment", "Service"]
    objects = kinds(docs)
    deployment = objects["Deployment"]
    assert deployment["spec"]["strategy"] == {"type": "Recreate"}
    pod = deployment["spec"]["template"]["spec"]
    container = vllm_container(deployment["spec"]["template"])
    assert container["image"] == "vllm/vllm-openai:v0.41.2"  # the vLLM installed here
    assert container["command"] == ["vllm", "serve"]  # exec form: SIGTERM reaches vLLM
    args = container["args"]
    assert args[0] == "Org/Chat-7B"
    assert flag(args, "--host") == "0.0.0.0" and flag(args, "--port") == "8100"
    assert flag(args, "--shutdown-timeout") == "90"  # the entry's drain
    pre_stop = int(container["lifecycle"]["preStop"]["exec"]["command"][1])
    assert pod["terminationGracePeriodSeconds"] >= 90 + pre_stop + 10
    startup = container["startupProbe"]
    assert startup["httpGet"]["path"] == "/health"
    assert startup["periodSeconds"] * startup["failureThreshold"] >= 600
    assert container["readinessProbe"]["httpGet"]["path"] == "/health"
    assert container["livenessProbe"]["httpGet"]["path"] == "/health"
    assert container["resources"]["limits"] == {"nvidia.com/gpu": "1"}
    assert {"name": "dshm", "mountPath": "/dev/shm"} in container["volumeMounts"]
    shm = next(v for v in pod["volumes"] if v["name"] == "dshm")
    assert shm["emptyDir"]["medium"] == "Memory"
    token = next(e for e in container["env"] if e["name"] == "HF_TOKEN")
    assert token == {"name": "HF_TOKEN", "valueFrom": {"secretKeyRef": {
        "name": "hf-token", "key": "token", "optional": True}}}
    assert all("value" not in e for e in container["env"]
               if e["name"] in ("HF_TOKEN", "VLLM_API_KEY"))
    cache = next(v for v in pod["volumes"] if v["name"] == "hf-cache")
    assert cache["persistentVolumeClaim"]["claimName"] == objects["PersistentVolumeClaim"][
        "metadata"]["name"]
    labels = deployment["metadata"]["labels"]
    assert labels["app.kubernetes.io/managed-by"] == "cmw-vllm"
    assert labels["app.kubernetes.io/name"] == "chat"
    service = objects["Service"]
    assert service["spec"]["selector"].items() <= deployment["spec"]["template"]["metadata"][
        "labels"].items()
    assert service["spec"]["ports"][0]["targetPort"] == "http"
    assert "Note" not in stderr


def test_the_flags_are_the_ones_start_uses(models_file: Path) -> None:
    from cmw_vllm.cli_lifecycle import _build_config

    docs, _ = export("k8s", "chat", "-tp", "2", "--max-model-len", "2048", "--task", "embed",
                     "-e", "VLLM_LOGGING_LEVEL=DEBUG", "--", "--enforce-eager")
    container = vllm_container(kinds(docs)["Deployment"]["spec"]["template"])
    config = _build_config("chat", {"tensor_parallel_size": 2, "max_model_len": 2048,
                                    "task": "embed"}, ("--enforce-eager",))
    expected = config.vllm_cli_args()
    expected[expected.index("--host") + 1] = "0.0.0.0"
    assert container["args"] == [config.model, *expected]
    assert "--runner" in expected and "--enforce-eager" in expected  # the task, the flag
    assert container["resources"]["limits"] == {"nvidia.com/gpu": "2"}
    assert {"name": "VLLM_LOGGING_LEVEL", "value": "DEBUG"} in container["env"]
    shm = kinds(docs)["Deployment"]["spec"]["template"]["spec"]["volumes"][0]
    assert shm["emptyDir"]["sizeLimit"] == "20Gi"  # tensor parallel: more shared memory
    validate_k8s(docs)


def test_storage_namespace_and_replicas(models_file: Path) -> None:
    docs, _ = export("k8s", "chat", "--storage", "pvc:models", "--namespace", "ai",
                     "--replicas", "2")
    validate_k8s(docs)
    assert [d["kind"] for d in docs] == ["Deployment", "Service"]  # the claim exists
    assert all(d["metadata"]["namespace"] == "ai" for d in docs)
    deployment = kinds(docs)["Deployment"]
    assert deployment["spec"]["replicas"] == 2
    volumes = deployment["spec"]["template"]["spec"]["volumes"]
    assert {"name": "hf-cache", "persistentVolumeClaim": {"claimName": "models"}} in volumes
    docs, _ = export("k8s", "chat", "--storage", "hostpath:/data/hf")
    volumes = kinds(docs)["Deployment"]["spec"]["template"]["spec"]["volumes"]
    assert volumes[1]["hostPath"]["path"] == "/data/hf"
    validate_k8s(docs)


def test_a_derived_name_becomes_a_kubernetes_name() -> None:
    docs, _ = export("k8s", "qwen3-0.6b")  # the registry alias has a dot
    validate_k8s(docs)
    assert {d["metadata"]["name"] for d in docs} == {"qwen3-0-6b", "qwen3-0-6b-hf-cache"}
    args = vllm_container(kinds(docs)["Deployment"]["spec"]["template"])["args"]
    assert "qwen3-0.6b" in args[args.index("--served-model-name"):]  # clients' name kept


def test_without_vllm_the_image_is_pinned_with_a_note(monkeypatch: pytest.MonkeyPatch,
                                                     tmp_path: Path) -> None:
    monkeypatch.setenv("CMW_VLLM_PYTHON", sys.executable)  # has no vLLM
    docs, stderr = export("k8s", "Org/Chat-7B")
    container = vllm_container(kinds(docs)["Deployment"]["spec"]["template"])
    assert container["image"] == f"vllm/vllm-openai:v{k8s_export.PINNED_VLLM}"
    assert "Note: no vLLM found here" in stderr
    docs, stderr = export("k8s", "Org/Chat-7B", "--image", "reg.example/vllm:v1")
    assert vllm_container(kinds(docs)["Deployment"]["spec"]["template"])["image"] == (
        "reg.example/vllm:v1")
    assert stderr == ""


def test_output_file_and_json(models_file: Path, tmp_path: Path) -> None:
    out = tmp_path / "chat.yaml"
    result = CliRunner().invoke(cli, ["export", "k8s", "chat", "-o", str(out)])
    assert result.exit_code == 0, result.output
    assert result.stdout == "" and f"Wrote {out}" in result.stderr
    text = out.read_text()
    assert text.startswith("# Made by `cmw-vllm export k8s`")
    docs = list(yaml.safe_load_all(text))
    result = CliRunner().invoke(cli, ["export", "k8s", "chat", "--json"])
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)["objects"] == docs


# ------------------------------------------------------------------------------ several nodes


def test_nnodes_is_a_leader_worker_set_with_the_mp_backend(models_file: Path) -> None:
    docs, stderr = export("k8s", "chat", "-tp", "8", "--nnodes", "2", "--", "-pp", "2")
    validate_k8s(docs)
    assert "LeaderWorkerSet controller" in stderr
    objects = kinds(docs)
    lws = objects["LeaderWorkerSet"]
    assert lws["apiVersion"] == "leaderworkerset.x-k8s.io/v1"
    lwt = lws["spec"]["leaderWorkerTemplate"]
    assert lwt["size"] == 2
    assert lws["spec"]["startupPolicy"] == "LeaderCreated"  # workers before the leader is ready
    leader = vllm_container(lwt["leaderTemplate"])
    worker = vllm_container(lwt["workerTemplate"])
    for container in (leader, worker):
        args = container["args"]
        assert flag(args, "--nnodes") == "$(LWS_GROUP_SIZE)"
        assert flag(args, "--node-rank") == "$(LWS_WORKER_INDEX)"
        assert flag(args, "--master-addr") == "$(LWS_LEADER_ADDRESS)"
        assert flag(args, "--distributed-executor-backend") == "mp"
        assert container["resources"]["limits"] == {"nvidia.com/gpu": "8"}  # 8 x 2 / 2
        assert {"name": "VLLM_HOST_IP",
                "valueFrom": {"fieldRef": {"fieldPath": "status.podIP"}}} in container["env"]
    assert "--headless" in worker["args"] and "--headless" not in leader["args"]
    assert "--port" not in worker["args"]
    assert not {"ports", "startupProbe", "readinessProbe", "livenessProbe"} & set(worker)
    assert {"ports", "startupProbe", "readinessProbe", "livenessProbe"} <= set(leader)
    # Both share the model flags: the same arguments but for the HTTP and headless ones.
    shared = [a for a in leader["args"] if a not in ("--host", "0.0.0.0", "--port", "8100")]
    assert shared == [a for a in worker["args"] if a != "--headless"]
    assert lwt["volumeClaimTemplates"][0]["metadata"]["name"] == "hf-cache"  # one per node
    service = objects["Service"]
    assert service["spec"]["selector"]["role"] == "leader"
    assert service["spec"]["selector"].items() <= lwt["leaderTemplate"]["metadata"][
        "labels"].items()


def test_nnodes_with_a_shared_claim(models_file: Path) -> None:
    docs, _ = export("k8s", "chat", "-tp", "4", "--nnodes", "4", "--storage", "pvc:models")
    validate_k8s(docs)
    lwt = kinds(docs)["LeaderWorkerSet"]["spec"]["leaderWorkerTemplate"]
    assert "volumeClaimTemplates" not in lwt
    for part in ("leaderTemplate", "workerTemplate"):
        assert {"name": "hf-cache", "persistentVolumeClaim": {"claimName": "models"}} in lwt[
            part]["spec"]["volumes"]
        assert vllm_container(lwt[part])["resources"]["limits"]["nvidia.com/gpu"] == "1"


# ------------------------------------------------------------------------------ gateway


def test_gateway_routes_to_the_service_and_runs_with_these_arguments(models_file: Path
                                                                     ) -> None:
    from cmw_vllm.gateway.settings import parse_upstream

    docs, stderr = export("k8s", "chat", "--gateway", "--namespace", "ai")
    validate_k8s(docs)
    assert "Note: the gateway runs image cmw-vllm:" in stderr
    gateway = next(d for d in docs if d["kind"] == "Deployment"
                   and d["metadata"]["name"] == "cmw-vllm-gateway")
    container = vllm_container(gateway["spec"]["template"])
    args = container["args"]
    assert container["command"] == ["cmw-vllm"] and args[0] == "gateway"
    # `cmw-vllm gateway` itself accepts them.
    command = cli.get_command(None, "gateway")  # type: ignore[arg-type]
    ctx = command.make_context("gateway", list(args[1:]))
    assert ctx.params["host"] == "0.0.0.0"
    assert ctx.params["shutdown_grace"] == 90  # the server's drain
    (upstream,) = ctx.params["upstreams"]
    name, url, names = parse_upstream(upstream)
    server = next(d for d in docs if d["kind"] == "Service" and d["metadata"]["name"] == "chat")
    assert url == f"http://chat:{server['spec']['ports'][0]['port']}"  # the server's Service
    assert names == ("Org/Chat-7B", "chat")  # what vLLM answers to
    grace = gateway["spec"]["template"]["spec"]["terminationGracePeriodSeconds"]
    assert grace >= 90 + 15
    assert "cmw-vllm-gateway.ai" in ctx.params["allowed_hosts"].split(",")
    assert {e["name"] for e in container["env"]} == {"CMW_VLLM_GATEWAY_API_KEYS",
                                                    "VLLM_API_KEY"}
    assert all("secretKeyRef" in e["valueFrom"] for e in container["env"])


def test_data_parallel_on_one_node_and_a_gateway_before_several_nodes(models_file: Path
                                                                     ) -> None:
    docs, _ = export("k8s", "chat", "-tp", "2", "-dp", "2")
    container = vllm_container(kinds(docs)["Deployment"]["spec"]["template"])
    assert flag(container["args"], "--data-parallel-size") == "2"
    assert container["resources"]["limits"] == {"nvidia.com/gpu": "4"}  # TP x DP
    docs, _ = export("k8s", "chat", "-tp", "2", "--nnodes", "2", "--replicas", "3",
                     "--gateway")
    validate_k8s(docs)
    assert kinds(docs)["LeaderWorkerSet"]["spec"]["replicas"] == 3
    gateway = next(d for d in docs if d["metadata"]["name"] == "cmw-vllm-gateway"
                   and d["kind"] == "Deployment")
    args = vllm_container(gateway["spec"]["template"])["args"]
    assert flag(args, "--upstream").endswith("=http://chat:8100")  # the leaders' Service


def test_a_server_named_like_the_gateway_is_refused() -> None:
    code, line = fails("k8s", "Org/Chat-7B", "--name", "cmw-vllm-gateway", "--gateway")
    assert code == 2 and "two objects of this kind have this name" in line


# ------------------------------------------------------------------------------ bad input


@pytest.mark.parametrize("args,says", [
    (["k8s", "nosuchmodel"], "unknown model 'nosuchmodel'"),
    (["k8s", "Org/Chat-7B", "-tp", "3", "--nnodes", "2"], "must be a multiple of --nnodes"),
    (["k8s", "Org/Chat-7B", "--name", "Chat_Small"], "cannot name Kubernetes objects"),
    (["k8s", "Org/Chat-7B", "--name", "9lives"], "cannot name Kubernetes objects"),
    (["k8s", "Org/Chat-7B", "--storage", "s3:bucket"], "invalid --storage"),
    (["k8s", "Org/Chat-7B", "--storage", "pvc-size:lots"], "is not a size"),
    (["k8s", "Org/Chat-7B", "--storage", "hostpath:data"], "must be absolute"),
    (["k8s", "Org/Chat-7B", "--namespace", "AI Team"], "namespace 'AI Team'"),
    (["k8s", "Org/Chat-7B", "--replicas", "2"], "cannot share one ReadWriteOnce"),
    (["k8s", "Org/Chat-7B", "--nnodes", "2", "-tp", "2", "-dp", "2"], "data parallel"),
    (["k8s", "Org/Chat-7B", "--enforce-eager"], "is a vLLM flag"),
    (["compose", "Org/Chat-7B", "-tp", "2", "--nnodes", "2"], "runs one machine"),
])
def test_bad_input_is_one_line(args: list[str], says: str) -> None:
    code, line = fails(*args)
    assert code == 2 and says in line, line


def test_a_local_directory_is_refused(model_dir: Path) -> None:
    code, line = fails("k8s", str(model_dir))
    assert code == 2 and "do not see" in line


def test_a_flag_vllm_does_not_know_gets_a_note() -> None:
    _, stderr = export("k8s", "Org/Chat-7B", "--", "--enable-turbo", "--enforce-eager")
    assert "Note: vLLM 0.32.0 has no --enable-turbo:" in stderr
    assert "--enforce-eager" not in stderr
    _, stderr = export("compose", "Org/Chat-7B", "--", "--enable-turbo")
    assert "has no --enable-turbo" in stderr


def test_json_errors_are_one_object() -> None:
    result = CliRunner().invoke(cli, ["export", "k8s", "nosuchmodel", "--json"])
    assert result.exit_code == 2
    error = json.loads(result.stdout)
    assert "unknown model" in error["error"] and error["exit_code"] == 2


def test_a_misplaced_vllm_flag_gets_the_export_command_line() -> None:
    result = CliRunner().invoke(cli, ["export", "k8s", "Org/Chat-7B", "--enforce-eager"])
    assert "Hint: cmw-vllm export k8s Org/Chat-7B -- --enforce-eager" in result.stderr


# ------------------------------------------------------------------------------ checks


def _config(model: str, tp: int = 1, nnodes: int = 1, drain: int = 30) -> tuple[Any, str]:
    from cmw_vllm.server_config import build_config

    values: dict[str, Any] = {"name": "m", "model": model, "tensor_parallel_size": tp,
                              "drain": drain}
    if nnodes > 1:
        values["distributed"] = {"nnodes": nnodes, "master_addr": "$(LWS_LEADER_ADDRESS)"}
    return build_config(values), "m"


def _options(**kw: Any) -> k8s_export.ExportOptions:
    return k8s_export.ExportOptions(image="vllm/vllm-openai:v0.32.0", **kw)


def _break(docs: list[dict[str, Any]], kind: str, change: Any) -> list[dict[str, Any]]:
    docs = copy.deepcopy(docs)
    change(kinds(docs)[kind])
    return docs


def _pod(doc: dict[str, Any]) -> dict[str, Any]:
    return doc["spec"]["template"]["spec"]


def _container(doc: dict[str, Any]) -> dict[str, Any]:
    return _pod(doc)["containers"][0]


BREAKS = {
    "the name must be a DNS-1123": ("Deployment",
                                    lambda d: d["metadata"].update(name="Chat_7B")),
    "DNS-1035": ("Service", lambda d: d["metadata"].update(name="7b")),
    "matchLabels does not match": ("Deployment", lambda d: d["spec"]["selector"][
        "matchLabels"].update({"app.kubernetes.io/name": "other"})),
    "matches no pod template": ("Service", lambda d: d["spec"]["selector"].update(
        {"app.kubernetes.io/instance": "other"})),
    "sizeLimit: '2 Gigs' is not a Kubernetes quantity": ("Deployment", lambda d: _pod(d)[
        "volumes"][0]["emptyDir"].update(sizeLimit="2 Gigs")),
    "storage: '100 GB' is not": ("PersistentVolumeClaim", lambda d: d["spec"]["resources"][
        "requests"].update(storage="100 GB")),
    "nvidia.com/gpu is '2', but TP x PP x DP is 1": ("Deployment", lambda d: _container(d)[
        "resources"]["limits"].update({"nvidia.com/gpu": "2"})),
    "terminationGracePeriodSeconds 30 is shorter": ("Deployment", lambda d: _pod(d).update(
        terminationGracePeriodSeconds=30)),
    "the startupProbe allows 100s": ("Deployment", lambda d: _container(d)[
        "startupProbe"].update(failureThreshold=10)),
    "label app.kubernetes.io/name='a/b'": ("Deployment", lambda d: d["metadata"]["labels"]
                                           .update({"app.kubernetes.io/name": "a/b"})),
    "no image": ("Deployment", lambda d: _container(d).update(image="")),
}


@pytest.mark.parametrize("problem", list(BREAKS))
def test_the_semantic_checks_catch_what_validators_miss(problem: str) -> None:
    docs = k8s_export.k8s_manifests(*_config("Org/Chat-7B"), _options())
    assert k8s_export.manifest_problems(docs) == []
    kind, change = BREAKS[problem]
    broken = _break(docs, kind, change)
    problems = k8s_export.manifest_problems(broken)
    assert any(problem in p for p in problems), problems
    with pytest.raises(k8s_export.ConfigError, match="invalid manifest"):
        k8s_export.check_manifests(broken)


def test_the_gpu_check_reads_the_flags_and_the_group_size() -> None:
    docs = k8s_export.k8s_manifests(*_config("Org/Chat-7B", tp=4, nnodes=2), _options())
    assert k8s_export.manifest_problems(docs) == []
    lws = kinds(docs)["LeaderWorkerSet"]
    lws["spec"]["leaderWorkerTemplate"]["size"] = 4
    problems = k8s_export.manifest_problems(docs)
    assert any("TP x PP / nodes is 1" in p for p in problems), problems


def test_a_long_drain_gets_a_long_grace_period() -> None:
    docs = k8s_export.k8s_manifests(*_config("Org/Chat-7B", drain=600), _options())
    assert _pod(kinds(docs)["Deployment"])["terminationGracePeriodSeconds"] == 630
    docs = k8s_export.k8s_manifests(*_config("Org/Chat-7B", drain=0), _options())
    container = _container(kinds(docs)["Deployment"])
    assert "--shutdown-timeout" not in container["args"]  # 0: abort in-flight requests
    assert k8s_export.manifest_problems(docs) == []


# ------------------------------------------------------------------------------ pieces


def test_quantities() -> None:
    assert k8s_export.quantity_value("2Gi") == 2 * 1024**3
    assert k8s_export.quantity_value("500m") == 0.5
    assert k8s_export.quantity_value("1e3") == 1000
    assert k8s_export.quantity_value("100G") == 100e9
    for bad in ("2 Gigs", "Gi", "1.2.3", "10gb", ""):
        with pytest.raises(ValueError):
            k8s_export.quantity_value(bad)


def test_image_for_drops_local_build_labels() -> None:
    assert k8s_export.image_for("0.33.1+cpu") == "vllm/vllm-openai:v0.33.1"
    assert k8s_export.image_for(None) == f"vllm/vllm-openai:v{k8s_export.PINNED_VLLM}"


def test_the_yaml_round_trips_and_quotes_what_would_change_type() -> None:
    docs = [{"a": "8000", "b": "on", "c": "0.9", "d": ["yes", "null", "~", "#x", "a: b"],
             "e": 3, "f": True, "g": None, "h": "$(LWS_GROUP_SIZE)", "i": "",
             "j": {"k": "multi\nline"}}, {"x": [{"y": 1}]}]
    text = k8s_export.to_yaml(docs, header="one\n\ntwo")
    assert text.startswith("# one\n#\n# two\n")
    assert list(yaml.safe_load_all(text)) == docs
    assert "&id" not in k8s_export.to_yaml([{"a": docs[1], "b": docs[1]}])  # no anchors


# ------------------------------------------------------------------------------ compose


def test_compose_has_the_same_flags_drain_and_health(models_file: Path) -> None:
    (doc,), _ = export("compose", "chat")
    service = doc["services"]["chat"]
    k8s_docs, _ = export("k8s", "chat")
    assert service["command"] == vllm_container(kinds(k8s_docs)["Deployment"]["spec"][
        "template"])["args"]
    assert service["entrypoint"] == ["vllm", "serve"]
    assert service["image"] == "vllm/vllm-openai:v0.41.2"
    assert int(service["stop_grace_period"].rstrip("s")) > 90  # the drain, plus a margin
    assert "/health" in " ".join(service["healthcheck"]["test"])
    assert int(service["healthcheck"]["start_period"].rstrip("s")) >= 600
    assert service["ports"] == ["8100:8100"]
    assert service["deploy"]["resources"]["reservations"]["devices"][0]["count"] == 1
    assert service["environment"]["HF_TOKEN"] is None  # from the shell, never in the file
    assert doc["volumes"] == {"hf-cache": {}}
    (doc,), _ = export("compose", "chat", "--storage", "hostpath:/srv/hf")
    assert doc["services"]["chat"]["volumes"] == ["/srv/hf:/root/.cache/huggingface"]
    assert "volumes" not in doc
