"""The Helm chart, rendered by the real Helm v4 engine (helm_python) over several value sets; every built-in
object checked by kubernetes-validate against Kubernetes 1.32's schemas (strict)."""

from __future__ import annotations

import argparse
import json
import re
from typing import Any

import helm_python as helm
import jsonschema
import kubernetes_validate
import pytest
import yaml
from chart_render import CHART, NAMESPACE, RELEASE, ROOT, VALUE_SETS, kinds, manifests, notes, one, render

from helios_operator.settings import Settings, settings_from_namespace

CRD_KINDS = {"ServiceMonitor", "PrometheusRule"}  # Prometheus Operator kinds: checked in test_chart_monitoring


def test_helm_lint_strict_reports_no_warnings_or_errors() -> None:
    for values in VALUE_SETS.values():
        report = helm.lint(str(CHART), values, strict=True, namespace=NAMESPACE)
        assert report["errors"] == []
        assert [m for m in report["messages"] if m["severity"] >= 2] == []


def test_the_charts_crd_is_identical_to_crds_dir() -> None:
    ours = (ROOT / "crds" / "heliosdeployments.helios.dev.yaml").read_bytes()
    assert (CHART / "crds" / "heliosdeployments.helios.dev.yaml").read_bytes() == ours
    chart = helm.Chart.load(str(CHART))
    assert [c["name"] for c in chart.crds] == ["crds/heliosdeployments.helios.dev.yaml"]


@pytest.mark.parametrize("value_set", sorted(VALUE_SETS))
def test_every_rendered_object_is_valid_kubernetes_1_32(value_set: str) -> None:
    docs = manifests(value_set)
    assert docs
    for doc in docs:
        if doc["kind"] in CRD_KINDS:
            continue
        kubernetes_validate.validate(doc, "1.32.0", strict=True)


@pytest.mark.parametrize("value_set", sorted(VALUE_SETS))
def test_every_namespaced_object_lands_in_the_release_or_a_watched_namespace(value_set: str) -> None:
    watched = VALUE_SETS[value_set].get("watchNamespaces", [])
    for doc in manifests(value_set):
        if doc["kind"].startswith("Cluster"):
            assert "namespace" not in doc["metadata"]
        elif doc["kind"] in ("Role", "RoleBinding") and doc["metadata"]["name"].endswith("-leader"):
            assert doc["metadata"]["namespace"] == NAMESPACE  # the operator's own Lease
        elif doc["kind"] in ("Role", "RoleBinding"):
            assert doc["metadata"]["namespace"] in watched
        else:
            assert doc["metadata"]["namespace"] == NAMESPACE, doc["kind"]


def test_defaults_render_the_operator_its_account_rbac_service_and_dashboard_but_no_prometheus_objects() -> None:
    assert kinds(manifests("defaults")) == sorted(
        [
            "ClusterRole",
            "ClusterRole",
            "ClusterRoleBinding",
            "ClusterRoleBinding",
            "ConfigMap",
            "Deployment",
            "Role",  # the leader-election Lease
            "RoleBinding",
            "Service",
            "ServiceAccount",
        ]
    )
    assert kinds(manifests("monitoring")).count("ServiceMonitor") == 1
    assert kinds(manifests("monitoring")).count("PrometheusRule") == 1


def _container(value_set: str) -> dict[str, Any]:
    deployment = one(manifests(value_set), "Deployment")
    (container,) = deployment["spec"]["template"]["spec"]["containers"]
    return dict(container)


def _env(value_set: str) -> dict[str, Any]:
    return {e["name"]: e.get("value", e.get("valueFrom")) for e in _container(value_set)["env"]}


def test_operator_runs_kopf_standalone_with_a_liveness_endpoint() -> None:
    container = _container("defaults")
    assert "command" not in container  # the image's ENTRYPOINT is `helios operator`
    assert container["args"] == ["--standalone", "--liveness=http://0.0.0.0:8080/healthz"]
    assert container["livenessProbe"]["httpGet"] == {"path": "/healthz", "port": "health"}
    assert container["image"] == "ghcr.io/helios-dev/helios-operator:0.1.0"
    deployment = one(manifests("defaults"), "Deployment")
    assert deployment["spec"]["replicas"] == 1
    assert deployment["spec"]["strategy"] == {"type": "Recreate"}


def test_watch_namespaces_reach_helios_namespaces() -> None:
    assert _env("namespaced")["HELIOS_NAMESPACES"] == "team-a,team-b"
    assert _env("defaults")["HELIOS_NAMESPACES"] == ""


def _operator_settings(value_set: str) -> tuple[argparse.Namespace, Settings]:
    """What `helios operator` makes of the rendered args and HELIOS_* variables (its own parser and Settings)."""
    from helios_operator.main import add_operator_arguments

    parser = argparse.ArgumentParser(prog="helios operator", exit_on_error=False)
    add_operator_arguments(parser)
    ns = parser.parse_args(_container(value_set)["args"])
    env = {k: v for k, v in _env(value_set).items() if isinstance(v, str)}
    return ns, settings_from_namespace(ns, env)


@pytest.mark.parametrize("value_set", sorted(VALUE_SETS))
def test_the_operator_accepts_the_rendered_args_and_environment(value_set: str) -> None:
    ns, settings = _operator_settings(value_set)
    assert ns.standalone is True
    assert ns.liveness == "http://0.0.0.0:8080/healthz"
    assert settings.namespaces == tuple(VALUE_SETS[value_set].get("watchNamespaces", ()))
    values = helm.Chart.load(str(CHART)).merge_values(VALUE_SETS[value_set])["operator"]
    assert settings.prometheus_url == values["prometheusUrl"]
    assert settings.worker_image == values["workerImage"]
    assert settings.log_level == values["logLevel"].upper()
    assert settings.metrics_port == values["metricsPort"]
    monitors = helm.Chart.load(str(CHART)).merge_values(VALUE_SETS[value_set])["serviceMonitor"]
    assert settings.service_monitors is (monitors["enabled"] is not False)  # auto: wherever the CRD is
    assert settings.monitor_labels == monitors["labels"]


@pytest.mark.parametrize("value_set", sorted(VALUE_SETS))
def test_every_helios_variable_the_chart_sets_is_a_setting_the_operator_reads(value_set: str) -> None:
    from dataclasses import fields

    from helios_operator.settings import env_name

    read = {env_name(f.name) for f in fields(Settings)}
    assert {k for k in _env(value_set) if k.startswith("HELIOS_")} <= read


def values_metrics_port() -> int:
    port: int = helm.Chart.load(str(CHART)).merge_values({})["operator"]["metricsPort"]
    return port


def test_chart_defaults_equal_the_operators_own_defaults() -> None:
    _, settings = _operator_settings("defaults")
    assert settings.prometheus_url == Settings().prometheus_url
    assert settings.worker_image == Settings().worker_image
    assert settings.metrics_port == Settings().metrics_port == values_metrics_port()
    assert settings.service_monitors is Settings().service_monitors is True
    assert settings.service_monitor_labels == Settings().service_monitor_labels == ()
    assert settings.log_level == Settings().log_level


def test_operator_settings_reach_the_helios_environment() -> None:
    env = _env("defaults")
    assert env["HELIOS_PROMETHEUS_URL"] == "http://prometheus-operated.monitoring:9090"
    assert env["HELIOS_LOG_LEVEL"] == "info"
    assert env["HELIOS_METRICS_PORT"] == "8081"
    assert env["HELIOS_SERVICE_MONITORS"] == "true"  # auto
    assert _env("monitors-off")["HELIOS_SERVICE_MONITORS"] == "false"
    assert _env("monitoring")["HELIOS_SERVICE_MONITORS"] == "true"
    assert _env("monitoring")["HELIOS_SERVICE_MONITOR_LABELS"] == "release=kube-prometheus-stack"
    custom = _env("custom")
    assert custom["HELIOS_PROMETHEUS_URL"] == "https://prom.example.com"
    assert custom["HELIOS_WORKER_IMAGE"] == "registry.example.com/ml/w:1.2.3"
    assert custom["HELIOS_LOG_LEVEL"] == "debug"
    assert custom["HTTPS_PROXY"] == "http://proxy:3128"


def test_the_default_worker_image_is_model_py_default() -> None:
    assert _env("defaults")["HELIOS_WORKER_IMAGE"] == Settings().worker_image


def test_custom_image_resources_and_scheduling_are_applied() -> None:
    container = _container("custom")
    assert container["image"] == "registry.example.com/ml/helios-operator:1.2.3"
    assert container["imagePullPolicy"] == "Always"
    assert container["resources"] == VALUE_SETS["custom"]["resources"]
    pod = one(manifests("custom"), "Deployment")["spec"]["template"]
    assert pod["spec"]["nodeSelector"] == {"kubernetes.io/os": "linux"}
    assert pod["spec"]["tolerations"] == VALUE_SETS["custom"]["tolerations"]
    assert pod["spec"]["imagePullSecrets"] == [{"name": "registry-creds"}]
    assert pod["spec"]["priorityClassName"] == "system-cluster-critical"
    assert pod["metadata"]["annotations"]["team"] == "ml-platform"
    assert "ConfigMap" not in kinds(manifests("custom"))


@pytest.mark.parametrize("value_set", sorted(VALUE_SETS))
def test_pod_runs_non_root_read_only_without_privileges(value_set: str) -> None:
    pod = one(manifests(value_set), "Deployment")["spec"]["template"]["spec"]
    assert pod["securityContext"]["runAsNonRoot"] is True
    assert pod["securityContext"]["runAsUser"] == 65532
    assert pod["securityContext"]["seccompProfile"] == {"type": "RuntimeDefault"}
    for container in pod["containers"]:
        sc = container["securityContext"]
        assert sc["allowPrivilegeEscalation"] is False
        assert sc["readOnlyRootFilesystem"] is True
        assert sc["capabilities"] == {"drop": ["ALL"]}
    mounts = {m["mountPath"] for c in pod["containers"] for m in c.get("volumeMounts", [])}
    assert "/tmp" in mounts  # writable scratch despite the read-only root


def test_metrics_service_selects_the_operator_pod_and_port() -> None:
    docs = manifests("defaults")
    service = one(docs, "Service")
    pod = one(docs, "Deployment")["spec"]["template"]
    assert service["spec"]["selector"].items() <= pod["metadata"]["labels"].items()
    ports = {p["name"]: p["containerPort"] for p in pod["spec"]["containers"][0]["ports"]}
    assert service["spec"]["ports"] == [
        {"name": "metrics", "port": ports["metrics"], "targetPort": "metrics", "protocol": "TCP"}
    ]


def test_existing_service_account_is_used_and_nothing_rbac_is_rendered() -> None:
    docs = manifests("existing-account")
    assert not {"ServiceAccount", "ClusterRole", "Role"} & set(kinds(docs))
    assert one(docs, "Deployment")["spec"]["template"]["spec"]["serviceAccountName"] == "ops"


@pytest.mark.parametrize(
    ("values", "message"),
    [
        ({"replicaCount": 4}, "/replicaCount"),
        ({"operator": {"logLevel": "loud"}}, "/operator/logLevel"),
        ({"operator": {"prometheusUrl": "prometheus:9090"}}, "/operator/prometheusUrl"),
        ({"operator": {"metricsPort": 70000}}, "/operator/metricsPort"),
        ({"watchNamespaces": ["Team_A"]}, "/watchNamespaces/0"),
        ({"watchNamespaces": "team-a"}, "/watchNamespaces"),
        ({"image": {"pullPolicy": "Sometimes"}}, "/image/pullPolicy"),
        ({"serviceMonitor": {"enabled": "yes"}}, "/serviceMonitor/enabled"),
        ({"serviceMonitor": {"interval": "30 seconds"}}, "/serviceMonitor/interval"),
        ({"prometheusRule": {"breachRatio": {"threshold": 1.5}}}, "/prometheusRule/breachRatio/threshold"),
        ({"prometheusRule": {"rolloutStuck": {"for": "soon"}}}, "/prometheusRule/rolloutStuck/for"),
        ({"imageTypo": {"tag": "x"}}, "imageTypo"),
        ({"operator": {"workerimage": "x"}}, "workerimage"),
    ],
)
def test_values_schema_rejects_bad_values_with_the_offending_key(values: dict[str, Any], message: str) -> None:
    with pytest.raises(helm.HelmValuesError, match=re.escape(message)):
        render(values)


def test_values_schema_accepts_every_value_set_and_the_defaults() -> None:
    chart = helm.Chart.load(str(CHART))
    for values in VALUE_SETS.values():
        chart.validate_schema(chart.merge_values(values))
    schema = json.loads((CHART / "values.schema.json").read_text())
    assert schema["$schema"] == "http://json-schema.org/draft-07/schema#"
    jsonschema.Draft7Validator.check_schema(schema)
    # additionalProperties is false wherever values.yaml has a fixed shape, so a typo cannot pass silently
    jsonschema.Draft7Validator(schema).validate(yaml.safe_load((CHART / "values.yaml").read_text()))
    assert schema["additionalProperties"] is False
    assert schema["properties"]["operator"]["additionalProperties"] is False


def test_notes_tell_what_is_watched_and_how_to_check() -> None:
    text = notes("defaults")
    assert "all namespaces" in text
    assert f"deployment/{RELEASE}" in text
    assert "kubectl get hd" in text
    assert "team-a, team-b" in notes("namespaced")
    assert "ServiceMonitors are on" in notes("monitoring")
