"""The chart's RBAC against the calls the operator really makes: every call allowed, every rule used.

The operator (kopf under KopfRunner plus the KubernetesPlatform) runs a whole life cycle against the
kmock emulator with the Prometheus Operator's CRD installed and HELIOS_SERVICE_MONITORS on; the
emulator records every request (group, resource, verb) with its User-Agent, so kopf's own calls
and the platform's are both seen, and the test's own client is left out. The rules come from the
chart rendered by the real Helm engine (helm_python) with serviceMonitor.enabled.

GAPS (kmock, see kmock_support.py): it authorises nothing itself, so this proves the rule set
matches the calls, not that an API server enforces it; selectors are ignored (irrelevant to RBAC).
kopf's CRD scanning is disabled in the harness (its list/watch of CRDs is allow-listed below).
"""

from __future__ import annotations

import sys
from pathlib import Path

import helm_python as helm
import pytest
import yaml

from helios_operator.core import names
from tests.support.bodies import hd_body

from .kmock_support import FakeCluster, fake_cluster  # noqa: F401  (the fixture)
from .test_operator_kmock import HD, NS, World, _serving, _workers, operator_env  # noqa: F401

pytestmark = pytest.mark.timeout(60)

CHART = Path(__file__).resolve().parents[2] / "charts" / "helios"
Triple = tuple[str, str, str]

# Rules the flow here cannot exercise, each with the reason it is granted.
NOT_EXERCISED: dict[Triple, str] = {
    ("apiextensions.k8s.io", "customresourcedefinitions", "list"): "kopf scans CRDs (scanning is off in the harness)",
    ("apiextensions.k8s.io", "customresourcedefinitions", "watch"): "kopf scans CRDs (scanning is off in the harness)",
    **{
        ("coordination.k8s.io", "leases", verb): (
            "leader election (HELIOS_LEADER_ELECTION_LEASE) is off in the harness; the real plane proves it "
            "(tests/cluster/test_operator_on_plane.py)"
        )
        for verb in ("get", "create", "update")
    },
    **{
        ("inference.networking.k8s.io", "inferencepools", verb): (
            "no spec.inferencePool in the harness; the cluster suite creates one against the real CRD"
            " (tests/cluster/test_cluster_e2e.py)"
        )
        for verb in ("get", "create", "patch")
    },
    ("", "events", "list"): (
        "read only while a worker pod waits for its volumes (Multi-Attach); no pod waits in the harness"
        " (tests/operator/test_kubernetes_pods.py reads such an Event)"
    ),
    ("helios.dev", "heliosdeployments/finalizers", "update"): (
        "no call: OwnerReferencesPermissionEnforcement checks it when a child with blockOwnerDeletion is "
        "created (tests/cluster/test_operator_on_plane.py proves it on a real API server)"
    ),
}


def _rendered_rules() -> set[Triple]:
    chart = helm.Chart.load(str(CHART))
    values = {"serviceMonitor": {"enabled": True}}
    rendered: dict[str, str] = chart.render(values, name="helios", namespace="helios-system", is_install=True)
    triples: set[Triple] = set()
    for path, text in rendered.items():
        if not path.endswith(".yaml"):
            continue
        for doc in yaml.safe_load_all(text):
            if doc and doc["kind"] in ("ClusterRole", "Role"):
                for rule in doc["rules"]:
                    triples |= {(g, r, v) for g in rule["apiGroups"] for r in rule["resources"] for v in rule["verbs"]}
    return triples


def _install_service_monitor_crd(cluster: FakeCluster) -> None:
    import kmock

    cluster.emulator.resources["monitoring.coreos.com/v1/servicemonitors"] = kmock.ResourceInfo(
        verbs={"get", "list", "watch", "create", "patch", "delete"},
        kind="ServiceMonitor",
        singular="servicemonitor",
        namespaced=True,
    )
    crd = {"metadata": {"name": "servicemonitors.monitoring.coreos.com"}, "spec": {"group": "monitoring.coreos.com"}}
    cluster.create("/apis/apiextensions.k8s.io/v1/customresourcedefinitions", crd)


@pytest.fixture
def monitors_on(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HELIOS_SERVICE_MONITORS", "true")


def test_the_charts_rules_allow_every_call_the_operator_makes_and_hold_nothing_unused(
    monitors_on: None,
    operator_env: tuple[FakeCluster, World],  # noqa: F811
) -> None:
    cluster, _ = operator_env
    _install_service_monitor_crd(cluster)
    uid = cluster.create(cluster.hd_path(NS), hd_body(HD, NS))["metadata"]["uid"]
    st = cluster.wait_for("serving", lambda: _serving(cluster))
    monitors = cluster.items(f"/apis/monitoring.coreos.com/v1/namespaces/{NS}/servicemonitors")
    assert [m["metadata"]["ownerReferences"][0]["uid"] for m in monitors] == [uid]
    # Objects the operator owns are brought back when edited (the update path: patch).
    monitor = f"/apis/monitoring.coreos.com/v1/namespaces/{NS}/servicemonitors/{monitors[0]['metadata']['name']}"
    budget = f"/apis/policy/v1/namespaces/{NS}/poddisruptionbudgets/{HD}-serving"
    cluster.patch(monitor, {"spec": {"endpoints": [{"port": "other"}]}})
    cluster.patch(budget, {"spec": {"maxUnavailable": 3}})
    cluster.wait_for(
        "edited ServiceMonitor and PodDisruptionBudget restored",
        lambda: (
            (cluster.get(monitor) or {})["spec"]["endpoints"][0]["port"] == names.WORKER_PORT_NAME
            and (cluster.get(budget) or {})["spec"]["maxUnavailable"] == 1
        ),
    )
    cluster.patch(cluster.hd_path(NS, HD), {"spec": {"replicas": 2}})  # the scale path: a Deployment patch
    cluster.wait_for("scaled", lambda: _workers(cluster)[st["active"]["worker"]]["spec"]["replicas"] == 2)
    cluster.delete(cluster.hd_path(NS, HD))
    cluster.wait_for("deleted", lambda: cluster.get(cluster.hd_path(NS, HD)) is None)  # no finalizer

    calls = [c for c in cluster.emulator.calls if not c.agent.startswith("python-httpx")]
    agents = {c.agent.split("/")[0] for c in calls}
    assert {"kopf", names.MANAGER} <= agents, agents
    made = {(c.group, c.resource, c.verb) for c in calls}
    rules = _rendered_rules()
    print(
        f"\n{len(calls)} API calls, {len(made)} distinct (group, resource, verb); {len(rules)} rules",
        file=sys.__stdout__,
    )
    assert made - rules == set(), f"calls the chart does not allow: {sorted(made - rules)}"
    unused = rules - made - set(NOT_EXERCISED)
    assert unused == set(), f"rules no call uses: {sorted(unused)}"
    assert set(NOT_EXERCISED) <= rules
