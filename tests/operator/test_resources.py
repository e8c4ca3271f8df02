"""The manifest builders: schema-valid for Kubernetes 1.32, and saying what the design needs."""

from __future__ import annotations

from dataclasses import replace
from typing import Any

import kubernetes_validate
import pytest

from helios_operator.core import manifests, names
from helios_operator.core.types import EnsureWorker, HeliosSpec, SpecError

K8S = "1.32.0"
SPEC = HeliosSpec.from_dict(
    {
        "candidates": [{"name": "small", "model": "pvc://models/llama-1b"}],
        "exit": {"confidenceThreshold": 0.8, "breachWindow": 100, "breachLimit": 50},
        "worker": {
            "image": "ghcr.io/helios-dev/helios-worker:0.1.0",
            "nodeSelector": {"gpu": "h100"},
            "tolerations": [{"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}],
            "env": [{"name": "HF_TOKEN", "valueFrom": {"secretKeyRef": {"name": "hf", "key": "token"}}}],
        },
    }
)
SERVE = EnsureWorker("chat-small-l5", "small", "pvc://models/llama-1b", 5, "serve", "chat-small-l5", 3)
PROFILE = EnsureWorker("chat-p1-small", "small", "/models/llama-1b", 0, "profile", "chat-p1", 1)


def container(d: dict[str, Any]) -> dict[str, Any]:
    c: dict[str, Any] = d["spec"]["template"]["spec"]["containers"][0]
    return c


@pytest.mark.parametrize("action", [SERVE, PROFILE, replace(SERVE, model="hf://meta-llama/Llama-3.2-1B")])
def test_worker_deployment_is_valid_for_kubernetes(action: EnsureWorker) -> None:
    d = manifests.worker_deployment("chat", "ml", SPEC, action, owner_uid="u-1")
    kubernetes_validate.validate(d, K8S, strict=True)


def test_serve_worker_runs_the_chosen_depth_from_the_mounted_claim() -> None:
    d = manifests.worker_deployment("chat", "ml", SPEC, SERVE)
    c = container(d)
    assert c["command"] == ["helios", "worker"]
    assert c["args"] == [
        "--model", "/models/models/llama-1b", "--layers", "5", "--threshold", "0.8",
        "--breach-window", "100", "--max-batch", "64", "--deployment", "chat", "--candidate", "small",
        "--host", "0.0.0.0", "--port", "8000", "--drain-timeout", "30",
    ]  # fmt: skip
    pod = d["spec"]["template"]["spec"]
    claim = {"claimName": "models", "readOnly": True}
    assert {"name": "model-models", "persistentVolumeClaim": claim} in pod["volumes"]
    assert {"name": "model-models", "mountPath": "/models/models", "readOnly": True} in c["volumeMounts"]
    assert d["spec"]["replicas"] == 3


def test_profile_worker_loads_every_layer_and_profiles() -> None:
    args = container(manifests.worker_deployment("chat", "ml", SPEC, PROFILE))["args"]
    assert "--profile" in args and "--layers" not in args
    assert args[args.index("--model") + 1] == "/models/llama-1b"  # a local path is used as is


def test_worker_labels_carry_identity_pool_and_depth() -> None:
    d = manifests.worker_deployment("chat", "ml", SPEC, SERVE)
    want = {
        names.LABEL_APP: names.APP_NAME,
        names.LABEL_MANAGED_BY: names.MANAGER,
        names.LABEL_DEPLOYMENT: "chat",
        names.LABEL_CANDIDATE: "small",
        names.LABEL_DEPTH: "5",
        names.LABEL_ROLE: "serve",
        names.LABEL_WORKER: "chat-small-l5",
        names.LABEL_POOL: "chat-small-l5",
    }
    assert d["metadata"]["labels"] == want == d["spec"]["template"]["metadata"]["labels"]
    selector = d["spec"]["selector"]["matchLabels"]
    assert selector.items() <= want.items()


def test_worker_pod_is_locked_down_probed_and_drained() -> None:
    d = manifests.worker_deployment("chat", "ml", SPEC, SERVE)
    pod, c = d["spec"]["template"]["spec"], container(d)
    sc = c["securityContext"]
    assert sc["runAsNonRoot"] and sc["readOnlyRootFilesystem"] and not sc["allowPrivilegeEscalation"]
    assert sc["capabilities"] == {"drop": ["ALL"]} and sc["seccompProfile"] == {"type": "RuntimeDefault"}
    assert {"name": "tmp", "mountPath": "/tmp"} in c["volumeMounts"]
    startup = c["startupProbe"]
    assert startup["httpGet"]["path"] == "/readyz"
    assert startup["failureThreshold"] * startup["periodSeconds"] >= 600  # slow model loads
    assert c["readinessProbe"]["httpGet"]["path"] == "/readyz"
    assert c["livenessProbe"]["httpGet"]["path"] == "/healthz"
    # The kubelet kills only after preStop and the worker's whole --drain-timeout have passed.
    drain = int(c["args"][c["args"].index("--drain-timeout") + 1])
    assert c["lifecycle"]["preStop"]["sleep"]["seconds"] + drain < pod["terminationGracePeriodSeconds"]
    assert c["resources"] == {"limits": {"nvidia.com/gpu": "1"}}
    # A worker that exits at start (`helios worker: error: ...`) shows that line in lastState.
    assert c["terminationMessagePolicy"] == "FallbackToLogsOnError"
    assert pod["nodeSelector"] == {"gpu": "h100"} and pod["tolerations"][0]["key"] == "nvidia.com/gpu"
    assert c["env"][0]["name"] == "HF_TOKEN"
    ann = d["spec"]["template"]["metadata"]["annotations"]
    assert ann["prometheus.io/scrape"] == "true" and ann["prometheus.io/port"] == "8000"


def test_spec_resources_replace_the_default_gpu() -> None:
    spec = replace(SPEC, worker=replace(SPEC.worker, resources={"limits": {"nvidia.com/gpu": 2, "memory": "64Gi"}}))
    c = container(manifests.worker_deployment("chat", "ml", spec, SERVE))
    assert c["resources"] == {"limits": {"nvidia.com/gpu": "2", "memory": "64Gi"}}  # quantities as strings


def test_owner_reference_makes_the_heliosdeployment_the_controller() -> None:
    d = manifests.worker_deployment("chat", "ml", SPEC, SERVE, owner_uid="u-1")
    assert d["metadata"]["ownerReferences"] == [
        {
            "apiVersion": "helios.dev/v1alpha1",
            "kind": "HeliosDeployment",
            "name": "chat",
            "uid": "u-1",
            "controller": True,
            "blockOwnerDeletion": True,
        }
    ]
    assert "ownerReferences" not in manifests.worker_deployment("chat", "ml", SPEC, SERVE)["metadata"]


def _hf_pod(spec: HeliosSpec = SPEC) -> dict[str, Any]:
    action = replace(SERVE, model="hf://meta-llama/Llama-3.2-1B")
    pod: dict[str, Any] = manifests.worker_deployment("chat", "ml", spec, action)["spec"]["template"]["spec"]
    return pod


def _with_cache(**cache: str) -> HeliosSpec:
    raw = {"candidates": [{"name": "small", "model": "hf://meta-llama/Llama-3.2-1B"}], "worker": {"image": "w:1"}}
    return HeliosSpec.from_dict({**raw, "worker": {"image": "w:1", "modelCache": cache}})


def test_hf_models_are_downloaded_by_an_init_container_into_the_folder_the_worker_reads() -> None:
    pod = _hf_pod()
    (init,) = pod["initContainers"]
    path = "/models/hf/meta-llama--Llama-3.2-1B"
    assert init["command"] == ["python", "-m", "helios_worker.models.fetch"]
    assert init["args"] == ["meta-llama/Llama-3.2-1B", path]
    assert init["image"] == SPEC.worker.image
    c = pod["containers"][0]
    assert c["args"][c["args"].index("--model") + 1] == path
    assert {"name": "hf-models", "mountPath": "/models/hf", "readOnly": True} in c["volumeMounts"]
    assert {"name": "hf-models", "mountPath": "/models/hf"} in init["volumeMounts"]  # only the download writes
    assert init["terminationMessagePolicy"] == "FallbackToLogsOnError"  # its error line reaches the condition


def test_the_download_goes_online_whatever_the_image_says_and_keeps_the_users_hub_settings() -> None:
    (init,) = _hf_pod()["initContainers"]
    env = {e["name"]: e for e in init["env"]}
    # Dockerfile.worker sets HF_HUB_OFFLINE=1 for the worker; the download must not inherit it.
    assert env["HF_HUB_OFFLINE"] == {"name": "HF_HUB_OFFLINE", "value": "0"}
    assert env["HF_TOKEN"]["valueFrom"] == {"secretKeyRef": {"name": "hf", "key": "token"}}  # a gated model's token
    assert env["HF_HOME"]["value"].startswith("/tmp/")  # writable: the root file system is read-only
    worker_env = {e["name"] for e in _hf_pod()["containers"][0]["env"]}
    assert "HF_HUB_OFFLINE" not in worker_env  # the worker keeps the image's offline setting


def test_a_users_hf_hub_offline_or_hf_home_never_reaches_the_download_twice() -> None:
    user = (
        {"name": "HF_HUB_OFFLINE", "value": "1"},
        {"name": "HF_HOME", "value": "/cache"},
        {"name": "X", "value": "y"},
    )
    spec = replace(SPEC, worker=replace(SPEC.worker, env=user))
    (init,) = _hf_pod(spec)["initContainers"]
    names_ = [e["name"] for e in init["env"]]
    assert len(names_) == len(set(names_))
    assert {e["name"]: e.get("value") for e in init["env"]}["HF_HUB_OFFLINE"] == "0"
    assert "X" in names_


def test_without_a_claim_each_pod_downloads_into_an_emptydir_bounded_by_the_size_limit() -> None:
    (volume,) = [v for v in _hf_pod()["volumes"] if v["name"] == "hf-models"]
    assert volume == {"name": "hf-models", "emptyDir": {"sizeLimit": "50Gi"}}
    (volume,) = [v for v in _hf_pod(_with_cache(sizeLimit="8Gi"))["volumes"] if v["name"] == "hf-models"]
    assert volume["emptyDir"] == {"sizeLimit": "8Gi"}


def test_with_a_claim_every_pod_shares_one_download_folder() -> None:
    spec = _with_cache(claimName="hf-cache")
    pods = [
        manifests.worker_deployment("chat", "ml", spec, action)["spec"]["template"]["spec"]
        for action in (replace(SERVE, model="hf://org/m"), replace(PROFILE, model="hf://org/m"))
    ]
    for pod in pods:
        (volume,) = [v for v in pod["volumes"] if v["name"] == "hf-models"]
        assert volume == {"name": "hf-models", "persistentVolumeClaim": {"claimName": "hf-cache"}}
        assert pod["initContainers"][0]["args"] == ["org/m", "/models/hf/org--m"]
        kubernetes_validate.validate(
            {"apiVersion": "v1", "kind": "Pod", "metadata": {"name": "p"}, "spec": pod}, K8S, strict=True
        )


def test_a_claim_and_a_size_limit_together_are_a_spec_error() -> None:
    with pytest.raises(SpecError, match="claimName or sizeLimit"):
        _with_cache(claimName="hf-cache", sizeLimit="8Gi")


@pytest.mark.parametrize("model", ["pvc://", "hf://justname", "s3://bucket/model", "hf://a/b/c"])
def test_unusable_model_sources_are_spec_errors(model: str) -> None:
    with pytest.raises(SpecError, match="model"):
        manifests.worker_deployment("chat", "ml", SPEC, replace(SERVE, model=model))


def test_stable_service_selects_one_pool_on_the_http_port() -> None:
    s = manifests.stable_service("chat", "ml", "chat-small-l5", owner_uid="u-1")
    kubernetes_validate.validate(s, K8S, strict=True)
    assert s["metadata"]["name"] == "chat"
    assert s["spec"]["selector"] == {names.LABEL_DEPLOYMENT: "chat", names.LABEL_POOL: "chat-small-l5"}
    assert s["spec"]["ports"] == [{"name": "http", "port": 8000, "targetPort": "http", "protocol": "TCP"}]


def test_pool_selector_matches_the_service_selector() -> None:
    s = manifests.stable_service("chat", "ml", "chat-p1")
    parsed = dict(kv.split("=") for kv in manifests.pool_selector("chat", "chat-p1").split(","))
    assert parsed == s["spec"]["selector"]


def test_metrics_service_and_monitor_cover_every_worker() -> None:
    svc = manifests.metrics_service("chat", "ml", owner_uid="u-1")
    kubernetes_validate.validate(svc, K8S, strict=True)
    assert svc["spec"]["clusterIP"] == "None"
    assert names.LABEL_POOL not in svc["spec"]["selector"]  # every pool, profiling workers included
    worker_labels = manifests.worker_labels("chat", PROFILE)
    assert svc["spec"]["selector"].items() <= worker_labels.items()
    mon = manifests.service_monitor("chat", "ml", owner_uid="u-1")
    assert (mon["apiVersion"], mon["kind"]) == ("monitoring.coreos.com/v1", "ServiceMonitor")
    assert mon["spec"]["selector"]["matchLabels"].items() <= svc["metadata"]["labels"].items()
    stable = manifests.stable_service("chat", "ml", "p")
    assert not mon["spec"]["selector"]["matchLabels"].items() <= stable["metadata"]["labels"].items()
    endpoint = mon["spec"]["endpoints"][0]
    assert endpoint["port"] == "http"
    # adapters/prometheus.py keys series by `worker` (the pod label helios.dev/worker) and filters by `namespace`.
    relabel = {r["targetLabel"]: r["sourceLabels"] for r in endpoint["relabelings"]}
    assert relabel == {
        "worker": ["__meta_kubernetes_pod_label_helios_dev_worker"],
        "namespace": ["__meta_kubernetes_namespace"],
    }
    assert names.LABEL_WORKER in worker_labels


def test_api_token_secret_becomes_the_workers_helios_api_token() -> None:
    spec = HeliosSpec.from_dict(
        {
            "candidates": [{"name": "small", "model": "/m"}],
            "worker": {"image": "w:1", "apiTokenSecret": {"name": "helios-token", "key": "token"}},
        }
    )
    d = manifests.worker_deployment("chat", "ml", spec, SERVE)
    kubernetes_validate.validate(d, K8S, strict=True)
    env = {e["name"]: e for e in container(d)["env"]}
    assert env["HELIOS_API_TOKEN"] == {
        "name": "HELIOS_API_TOKEN",
        "valueFrom": {"secretKeyRef": {"name": "helios-token", "key": "token"}},
    }
    assert "HELIOS_API_TOKEN" not in {
        e["name"] for e in container(manifests.worker_deployment("chat", "ml", SPEC, SERVE))["env"]
    }


def test_a_spec_without_an_image_leaves_the_default_to_the_operator() -> None:
    spec = HeliosSpec.from_dict({"candidates": [{"name": "small", "model": "/m"}]})
    assert spec.worker.image is None
    with pytest.raises(ValueError, match="worker_image"):
        manifests.worker_deployment("chat", "ml", spec, SERVE)


def test_worker_args_are_accepted_by_the_worker_command_line() -> None:
    """The operator and the worker agree on flags: the real `helios worker` parser reads what we render."""
    import argparse

    from helios_worker.serve import add_worker_arguments, options_from_args

    for action in (SERVE, PROFILE):
        c = container(manifests.worker_deployment("chat", "ml", SPEC, action))
        parser = argparse.ArgumentParser()
        add_worker_arguments(parser)
        options = options_from_args(parser.parse_args(c["args"]), env={})
        assert options.candidate_name == action.candidate
        assert options.profile == (action.role == "profile")
        assert options.host == "0.0.0.0"
