"""The operator's RBAC: written once (charts/helios/files/rbac.yaml), least privilege, scoped by watchNamespaces."""

from __future__ import annotations

from typing import Any

import pytest
import yaml
from chart_render import CHART, NAMESPACE, RELEASE, VALUE_SETS, manifests, one

RULES_FILE = CHART / "files" / "rbac.yaml"

# What the operator calls (kopf --standalone plus the kubernetes client), as (apiGroup, resource, verb).
# (tests/operator/test_operator_rbac.py compares them with the calls a whole life cycle really makes)
EXPECTED_NAMESPACED = {
    *(("helios.dev", "heliosdeployments", v) for v in ("get", "list", "watch", "patch")),
    ("helios.dev", "heliosdeployments/status", "patch"),
    ("helios.dev", "heliosdeployments/finalizers", "update"),  # blockOwnerDeletion on the children
    *(("apps", "deployments", v) for v in ("get", "list", "create", "patch", "delete")),
    *(("", "services", v) for v in ("get", "list", "create", "patch")),  # deleted by garbage collection
    ("", "pods", "list"),
    *(("", "events", v) for v in ("create", "list")),  # list: FailedAttachVolume (Multi-Attach)
    *(("policy", "poddisruptionbudgets", v) for v in ("get", "create", "patch")),
    *(("inference.networking.k8s.io", "inferencepools", v) for v in ("get", "create", "patch")),
}
EXPECTED_SERVICE_MONITOR = {("monitoring.coreos.com", "servicemonitors", v) for v in ("get", "create", "patch")}
EXPECTED_CLUSTER = {("apiextensions.k8s.io", "customresourcedefinitions", v) for v in ("get", "list", "watch")} | {
    ("", "nodes", "list")  # the GPU supply
}
# kopf scans namespaces only when it is not cluster-wide (namespaced mode)
EXPECTED_NAMESPACE_SCANNING = {("", "namespaces", v) for v in ("list", "watch")}
# the operator's own Lease (leader election), in the release namespace only
EXPECTED_LEADER = {("coordination.k8s.io", "leases", v) for v in ("get", "create", "update")}


def _triples(rules: list[dict[str, Any]]) -> set[tuple[str, str, str]]:
    return {(g, r, v) for rule in rules for g in rule["apiGroups"] for r in rule["resources"] for v in rule["verbs"]}


def _file() -> dict[str, list[dict[str, Any]]]:
    data: dict[str, list[dict[str, Any]]] = yaml.safe_load(RULES_FILE.read_text())
    return data


def test_the_rules_file_grants_exactly_what_the_operator_calls() -> None:
    rules = _file()
    assert set(rules) == {"namespaced", "serviceMonitor", "cluster", "namespaceScanning", "leaderElection"}
    assert _triples(rules["leaderElection"]) == EXPECTED_LEADER
    assert _triples(rules["namespaced"]) == EXPECTED_NAMESPACED
    assert _triples(rules["serviceMonitor"]) == EXPECTED_SERVICE_MONITOR
    assert _triples(rules["cluster"]) == EXPECTED_CLUSTER
    assert _triples(rules["namespaceScanning"]) == EXPECTED_NAMESPACE_SCANNING


@pytest.mark.parametrize("value_set", sorted(VALUE_SETS))
def test_no_wildcards_secrets_pod_access_peering_or_escalation_anywhere(value_set: str) -> None:
    for doc in manifests(value_set):
        if doc["kind"] not in ("ClusterRole", "Role"):
            continue
        for group, resource, verb in _triples(doc["rules"]):
            assert "*" not in (group, resource, verb)
            assert resource not in {"secrets", "pods/exec", "pods/log", "kopfpeerings", "clusterkopfpeerings"}
            # leases only in the Role of the release namespace (the operator's own Lease)
            assert resource != "leases" or (doc["kind"], doc["metadata"]["name"]) == ("Role", f"{RELEASE}-leader")
            assert resource != "pods" or verb == "list"  # pods are only read, to report workers that fail
            assert verb not in {"escalate", "bind", "impersonate", "deletecollection"}


def test_all_namespaces_mode_uses_cluster_roles_rendered_from_the_file() -> None:
    docs = manifests("defaults")
    rules = _file()
    namespaced = _triples(rules["namespaced"]) | _triples(rules["serviceMonitor"])  # serviceMonitor.enabled: auto
    assert _triples(one(docs, "ClusterRole", RELEASE)["rules"]) == namespaced
    # cluster-wide, kopf watches every namespace's objects with one request: no namespace scanning
    assert _triples(one(docs, "ClusterRole", f"{RELEASE}-cluster")["rules"]) == _triples(rules["cluster"])
    # the only Role: the leader-election Lease in the release namespace
    roles = [d for d in docs if d["kind"] in ("Role", "RoleBinding")]
    assert [(d["kind"], d["metadata"]["name"]) for d in roles] == [
        ("Role", f"{RELEASE}-leader"),
        ("RoleBinding", f"{RELEASE}-leader"),
    ]
    assert _triples(roles[0]["rules"]) == EXPECTED_LEADER


def test_service_monitor_rights_come_unless_service_monitors_are_off() -> None:
    """auto (the default) grants them: the operator creates ServiceMonitors wherever the CRD appears."""
    off = manifests("monitors-off")
    assert not EXPECTED_SERVICE_MONITOR & _triples(one(off, "ClusterRole", RELEASE)["rules"])
    assert _triples(one(manifests("monitoring"), "ClusterRole", RELEASE)["rules"]) >= EXPECTED_SERVICE_MONITOR
    assert _triples(one(manifests("defaults"), "ClusterRole", RELEASE)["rules"]) >= EXPECTED_SERVICE_MONITOR


def test_namespaced_mode_grants_a_role_per_watched_namespace_and_no_cluster_wide_write() -> None:
    docs = manifests("namespaced")
    roles = [d for d in docs if d["kind"] == "Role" and d["metadata"]["name"] != f"{RELEASE}-leader"]
    assert sorted(r["metadata"]["namespace"] for r in roles) == ["team-a", "team-b"]
    for role in roles:
        assert _triples(role["rules"]) == EXPECTED_NAMESPACED | EXPECTED_SERVICE_MONITOR
    (cluster_role,) = [d for d in docs if d["kind"] == "ClusterRole"]
    # kopf lists and watches namespaces to learn which of the named ones exist; nothing writable
    assert _triples(cluster_role["rules"]) == EXPECTED_CLUSTER | EXPECTED_NAMESPACE_SCANNING


@pytest.mark.parametrize("value_set", ["defaults", "monitoring", "namespaced"])
def test_every_binding_binds_the_operators_account_to_a_rendered_role(value_set: str) -> None:
    docs = manifests(value_set)
    account = one(docs, "ServiceAccount")["metadata"]["name"]
    assert one(docs, "Deployment")["spec"]["template"]["spec"]["serviceAccountName"] == account
    roles = {
        (d["kind"], d["metadata"]["name"], d["metadata"].get("namespace"))
        for d in docs
        if d["kind"] in ("Role", "ClusterRole")
    }
    bindings = [d for d in docs if d["kind"] in ("RoleBinding", "ClusterRoleBinding")]
    assert bindings
    for binding in bindings:
        assert binding["subjects"] == [{"kind": "ServiceAccount", "name": account, "namespace": NAMESPACE}]
        ref = binding["roleRef"]
        namespace = binding["metadata"].get("namespace") if ref["kind"] == "Role" else None
        assert (ref["kind"], ref["name"], namespace) in roles
