"""The chart, installed with the real helm CLI on the project's own plane; the operator it deploys
runs as the chart's ServiceAccount, so the chart's RBAC is enforced by a real API server.

How the operator runs: `helm install` creates its Deployment; the real controller-manager makes the
ReplicaSet and pod, the real scheduler binds it to a test node, and the test kubelet
(tests/support/kubelet.py) runs the pod's container as `helios operator` with the pod's own args and
env, holding a token of the pod's ServiceAccount (a TokenRequest bound to the pod, as a kubelet
asks for it). Every request the operator makes is therefore judged by RBAC for that account, and
the API server's audit log records it: a test compares those verbs with the chart's rules.

Stand-ins: the worker pods run `helios worker` against models that are not there, so they fail
at start (the operator reports Degraded=WorkerFailed): this module proves the API contract (RBAC,
ownerReferences, garbage collection, conditional status writes, the objects beside the workers),
not serving. The ServiceMonitor CRD is a stand-in of the Prometheus Operator's
(tests/cluster/servicemonitor-crd.yaml: its names, not its schema); no Prometheus Operator runs.
"""

from __future__ import annotations

import json
import subprocess
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml
from e2e_support import REPO, Kubectl, wait_for
from plane import Plane
from tests.support.kubelet import TestKubelet

from helios_operator.core import names

pytestmark = [pytest.mark.own_plane, pytest.mark.timeout(900)]


@pytest.fixture(scope="module")
def space(kube_factory: Callable[[str], Kubectl]) -> Kubectl:
    """A namespace of this module's own (the session's namespace is the e2e suite's)."""
    return kube_factory("helios-rbac")


RELEASE = "helios"
OPERATOR = "helios-operator"  # fullnameOverride: the Deployment and the ServiceAccount
HD = "contract-hd"
RULES_FILE = REPO / "charts" / "helios" / "files" / "rbac.yaml"
GROUP = {"helios.dev/test-group": "operator-rbac"}  # only this module's node runs its pods
Triple = tuple[str, str, str]

# Granted, yet no request of this flow makes them; each with why it is granted.
NOT_REQUESTED: dict[Triple, str] = {
    ("helios.dev", "heliosdeployments/finalizers", "update"): (
        "no request: OwnerReferencesPermissionEnforcement checks it when a child with blockOwnerDeletion is "
        "created (test_children_carry_owner_references_that_the_admission_plugin_allowed)"
    ),
    ("apps", "deployments", "delete"): "a drained worker is deleted after a switch (no switch here: workers fail)",
    ("apps", "deployments", "patch"): "the serving worker is scaled or updated (none serves here: workers fail)",
    ("", "services", "patch"): "the stable Service moves to another pool in a switch (no switch here)",
    **{
        ("inference.networking.k8s.io", "inferencepools", verb): "no spec.inferencePool here (test_cluster_e2e.py)"
        for verb in ("get", "create", "patch")
    },
    ("", "events", "list"): "read only while a worker pod waits for its volumes (Multi-Attach); none waits here",
    ("policy", "poddisruptionbudgets", "patch"): (
        "an edited budget is patched back (tests/operator/test_operator_rbac.py); none is edited here"
    ),
    ("monitoring.coreos.com", "servicemonitors", "patch"): (
        "an edited ServiceMonitor is patched back (tests/operator/test_operator_rbac.py); none is edited here"
    ),
}
MONITOR_LABELS = {"release": "kube-prometheus-stack"}  # what kube-prometheus-stack's Prometheus selects


def helm(plane: Plane, *args: str, timeout: float = 300) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [plane.helm, *args], capture_output=True, text=True, timeout=timeout, check=False, env=plane.env()
    )


@pytest.fixture(scope="module")
def node(plane: Plane, tmp_path_factory: pytest.TempPathFactory) -> Iterator[TestKubelet]:
    """A node that can run the operator and worker images (as `helios operator` / the pod's command)."""
    scratch = tmp_path_factory.mktemp("node-ops")
    images = {"helios-operator": ["helios", "operator"], "helios-worker": None}
    kubelet = plane.test_node("node-ops", scratch, images, labels=GROUP)
    with kubelet:
        yield kubelet


@pytest.fixture(scope="module")
def monitor_crd(space: Kubectl) -> Iterator[None]:
    """The ServiceMonitor API served before the chart is installed (serviceMonitor.enabled: auto)."""
    space.ok("apply", "-f", str(Path(__file__).with_name("servicemonitor-crd.yaml")))
    crd = "crd/servicemonitors.monitoring.coreos.com"
    space.ok("wait", "--for=condition=Established", crd, "--timeout=60s", timeout=90)
    yield
    space.ok("delete", crd, "--ignore-not-found", "--wait=false")


@pytest.fixture(scope="module")
def release(plane: Plane, space: Kubectl, crd: dict[str, Any], monitor_crd: None, node: TestKubelet) -> Iterator[str]:
    """`helm install` of charts/helios watching the test namespace; waits for the operator Ready."""
    values = {
        "serviceMonitor": {"labels": MONITOR_LABELS},  # enabled: auto, the default
        "fullnameOverride": OPERATOR,
        "image": {"repository": "helios-operator", "tag": "test"},
        "watchNamespaces": [space.namespace],
        "nodeSelector": GROUP,
        "operator": {
            "workerImage": "helios-worker:test",
            "prometheusUrl": "http://127.0.0.1:9",  # none: the operator reports MetricsAvailable=False
            "logLevel": "debug",
            # No network namespace on a test node: tell the metrics server its pod IP, as any program
            # that binds 0.0.0.0 by default must be told here (the Downward API, as on a cluster).
            "extraEnv": [{"name": "HELIOS_METRICS_HOST", "valueFrom": {"fieldRef": {"fieldPath": "status.podIP"}}}],
        },
    }
    values_file = plane.state / "helios-values.yaml"
    values_file.write_text(yaml.safe_dump(values))
    done = helm(
        plane,
        "install", RELEASE, str(REPO / "charts" / "helios"),
        "--namespace", space.namespace, "-f", str(values_file), "--wait", "--timeout", "180s",
    )  # fmt: skip
    assert done.returncode == 0, f"helm install failed: {done.stderr}\n{node.describe()}"
    yield OPERATOR
    helm(plane, "uninstall", RELEASE, "--namespace", space.namespace, "--wait", "--timeout", "60s")


def operator_user(space: Kubectl) -> str:
    return f"system:serviceaccount:{space.namespace}:{OPERATOR}"


def triples(rules: list[dict[str, Any]]) -> set[Triple]:
    return {(g, r, v) for rule in rules for g in rule["apiGroups"] for r in rule["resources"] for v in rule["verbs"]}


def operator_requests(plane: Plane, space: Kubectl) -> list[dict[str, Any]]:
    user = operator_user(space)
    return [e for e in plane.audit_events() if e["user"].get("username") == user and "objectRef" in e]


def children(space: Kubectl) -> list[dict[str, Any]]:
    return list(space.ns_json("get", "deployments,services", "-l", f"{names.LABEL_DEPLOYMENT}={HD}")["items"])


def test_helm_installs_the_chart_and_its_operator_runs_as_the_charts_service_account(
    plane: Plane, space: Kubectl, release: str, node: TestKubelet
) -> None:
    (pod,) = space.ns_json("get", "pods", "-l", f"app.kubernetes.io/instance={RELEASE}")["items"]
    assert pod["spec"]["serviceAccountName"] == OPERATOR and pod["spec"]["nodeName"] == "node-ops"
    assert pod["status"]["phase"] == "Running"
    listing = helm(plane, "list", "--namespace", space.namespace, "-o", "json")
    assert [(r["name"], r["status"]) for r in json.loads(listing.stdout)] == [(RELEASE, "deployed")]
    # kopf's first requests (namespaces, CRDs, its watches) come from the ServiceAccount.
    wait_for("the operator's requests in the audit log", lambda: operator_requests(plane, space), timeout=60)


@pytest.fixture(scope="module")
def hd(space: Kubectl, release: str) -> dict[str, Any]:
    spec = {
        "candidates": [
            {"name": "small", "model": "/models/helios-tiny", "layers": 6},
            {"name": "large", "model": "/models/helios-small", "layers": 8},
        ],
        "worker": {"resources": {"requests": {"cpu": "100m"}}, "nodeSelector": GROUP},
    }
    obj = {"apiVersion": names.API_VERSION, "kind": names.KIND,
           "metadata": {"name": HD, "namespace": space.namespace}, "spec": spec}  # fmt: skip
    space.apply([obj])
    return space.ns_json("get", "hd", HD)


def test_children_carry_owner_references_that_the_admission_plugin_allowed(
    space: Kubectl, hd: dict[str, Any], node: TestKubelet
) -> None:
    """The plane runs OwnerReferencesPermissionEnforcement: a child with blockOwnerDeletion is created
    only by a user who may update the owner's finalizers, so these children prove that grant."""
    uid = hd["metadata"]["uid"]
    try:
        owned = wait_for(
            "the profiling workers and the Services",
            lambda: (c := children(space)) and {o["kind"] for o in c} == {"Deployment", "Service"} and c,
            timeout=120,
            interval=1,
        )
    except TimeoutError as err:  # say what the operator met (a 403 from the admission plugin, say)
        conditions = (space.ns_json("get", "hd", HD).get("status") or {}).get("conditions")
        raise AssertionError(f"{err}\nstatus conditions: {conditions}") from err
    for obj in owned:
        refs = obj["metadata"]["ownerReferences"]
        assert [(r["kind"], r["uid"], r["controller"], r["blockOwnerDeletion"]) for r in refs] == [
            (names.KIND, uid, True, True)
        ], obj["metadata"]
    assert not space.ns_json("get", "hd", HD)["metadata"].get("finalizers"), "the operator keeps no finalizer"


def test_the_operator_reports_the_failing_workers_through_the_status_subresource(
    space: Kubectl, hd: dict[str, Any], node: TestKubelet
) -> None:
    def degraded() -> dict[str, Any] | None:
        st = space.ns_json("get", "hd", HD).get("status") or {}
        cond = {c["type"]: c for c in st.get("conditions") or ()}.get("Degraded")
        return cond if cond and cond["status"] == "True" and cond["reason"] == "WorkerFailed" else None

    cond = wait_for("Degraded=WorkerFailed", degraded, timeout=180, interval=2)
    assert "helios worker" in cond["message"] or "model" in cond["message"].lower(), cond


def test_the_audit_log_shows_no_refused_request_and_no_unused_rule(
    plane: Plane, space: Kubectl, hd: dict[str, Any], node: TestKubelet
) -> None:
    """Every request the operator's ServiceAccount made was allowed, and every rule of the chart was
    used by one (or is listed in NOT_REQUESTED with why)."""

    def status_written() -> bool:
        return any(e["objectRef"].get("subresource") == "status" for e in operator_requests(plane, space))

    wait_for("status writes in the audit log", status_written, timeout=120)
    events = operator_requests(plane, space)
    refused = sorted({(e["verb"], e["requestURI"]) for e in events if e["responseStatus"]["code"] == 403})
    assert refused == [], f"the chart's RBAC refused: {refused}"
    used = set()
    for e in events:
        ref = e["objectRef"]
        resource = ref["resource"] + (f"/{ref['subresource']}" if ref.get("subresource") else "")
        used.add((ref.get("apiGroup", ""), resource, e["verb"]))
    rules = yaml.safe_load(RULES_FILE.read_text())
    granted = triples(
        rules["namespaced"]
        + rules["serviceMonitor"]  # auto, with the CRD served
        + rules["cluster"]
        + rules["namespaceScanning"]
        + rules["leaderElection"]
    )
    assert used <= granted, f"requests no rule grants: {sorted(used - granted)}"
    unused = granted - used - set(NOT_REQUESTED)
    assert unused == set(), f"rules no request used: {sorted(unused)}"


def test_with_the_servicemonitor_api_served_the_chart_and_the_operator_make_monitors_prometheus_selects(
    space: Kubectl, hd: dict[str, Any], release: str
) -> None:
    """serviceMonitor.enabled: auto saw the API at install (the chart's own ServiceMonitor) and the
    operator found the CRD (the workers'); both carry serviceMonitor.labels."""
    own = space.ns_json("get", "servicemonitors", release)
    assert own["metadata"]["labels"].items() >= MONITOR_LABELS.items()
    name = f"{HD}-workers"
    workers = wait_for(
        "the workers' ServiceMonitor",
        lambda: next(
            (m for m in space.ns_json("get", "servicemonitors")["items"] if m["metadata"]["name"] == name), None
        ),
        timeout=60,
        interval=1,
    )
    assert workers["metadata"]["labels"].items() >= {**MONITOR_LABELS, names.LABEL_DEPLOYMENT: HD}.items()
    assert [r["uid"] for r in workers["metadata"]["ownerReferences"]] == [hd["metadata"]["uid"]]
    assert workers["spec"]["selector"]["matchLabels"][names.LABEL_SERVICE] == names.SERVICE_METRICS


def test_a_disruption_budget_covers_the_serving_pods_and_the_disruption_controller_reads_it(
    space: Kubectl, hd: dict[str, Any]
) -> None:
    name = f"{HD}-serving"

    def observed() -> dict[str, Any] | None:
        found = [b for b in space.ns_json("get", "pdb")["items"] if b["metadata"]["name"] == name]
        return found[0] if found and (found[0].get("status") or {}).get("observedGeneration") else None

    budget = wait_for("the PodDisruptionBudget, observed by the controller-manager", observed, timeout=90, interval=1)
    assert budget["spec"]["maxUnavailable"] == 1
    assert budget["spec"]["selector"]["matchLabels"] == {names.LABEL_DEPLOYMENT: HD, names.LABEL_ROLE: names.ROLE_SERVE}
    serving = space.ns_json("get", "pods", "-l", f"{names.LABEL_DEPLOYMENT}={HD},{names.LABEL_ROLE}={names.ROLE_SERVE}")
    assert budget["status"]["expectedPods"] == len(serving["items"])


def test_a_quota_that_refuses_the_workers_pods_is_reported_as_quota_exceeded(space: Kubectl, release: str) -> None:
    """The real ReplicaSet controller is refused by the real quota admission; the operator reads the
    Deployment's ReplicaFailure and says so (no pod exists to say more)."""
    quota = {"apiVersion": "v1", "kind": "ResourceQuota", "metadata": {"name": "no-gpus", "namespace": space.namespace},
             "spec": {"hard": {"requests.nvidia.com/gpu": "0"}}}  # fmt: skip
    other = "quota-hd"
    obj = {"apiVersion": names.API_VERSION, "kind": names.KIND,
           "metadata": {"name": other, "namespace": space.namespace},
           "spec": {"candidates": [{"name": "small", "model": "/models/helios-tiny"}],
                    "worker": {"nodeSelector": GROUP}}}  # fmt: skip
    space.apply([quota])
    try:
        space.apply([obj])

        def degraded() -> dict[str, Any] | None:
            st = space.ns_json("get", "hd", other).get("status") or {}
            cond = {c["type"]: c for c in st.get("conditions") or ()}.get("Degraded")
            return cond if cond and cond["reason"] == "QuotaExceeded" else None

        cond = wait_for("Degraded=QuotaExceeded", degraded, timeout=120, interval=2)
        assert cond["status"] == "True" and "exceeded quota: no-gpus" in cond["message"], cond
    finally:
        space.ns("delete", "hd", other, "--ignore-not-found", "--wait=false")
        space.ns("delete", "resourcequota", "no-gpus", "--ignore-not-found")


def test_a_status_write_that_loses_a_resource_version_race_is_refused_and_retried_from_the_fresh_object(
    plane: Plane, space: Kubectl, hd: dict[str, Any]
) -> None:
    """The operator's platform, as the admin, against the real server: a write conditioned on an old
    resourceVersion gets 409 Conflict instead of overwriting the newer status."""
    from kubernetes import client, config

    from helios_operator.adapters.kubernetes import KubeApi, KubeApiError, KubernetesPlatform
    from helios_operator.core.types import Owner

    client_config = client.Configuration()
    config.load_kube_config(config_file=str(plane.kubeconfig), client_configuration=client_config)  # type: ignore[no-untyped-call]
    platform = KubernetesPlatform(KubeApi(client_config))
    stale = space.ns_json("get", "hd", HD)
    owner = Owner(namespace=space.namespace, name=HD, uid=stale["metadata"]["uid"])
    old_version = stale["metadata"]["resourceVersion"]
    space.ns("patch", "hd", HD, "--type=merge", "-p", json.dumps({"spec": {"replicas": 2}}))  # another writer
    with pytest.raises(KubeApiError) as refused:
        platform.patch_status(owner, {**(stale.get("status") or {}), "phase": "Serving"}, old_version)
    assert refused.value.status == 409
    assert (space.ns_json("get", "hd", HD).get("status") or {}).get("phase") != "Serving"
    fresh = platform.get_owner(owner)
    assert fresh is not None and fresh["metadata"]["resourceVersion"] != old_version
    platform.patch_status(owner, fresh.get("status") or {}, fresh["metadata"]["resourceVersion"])


def test_of_two_operator_replicas_one_leads_and_the_other_takes_over_when_it_goes(
    space: Kubectl, hd: dict[str, Any], release: str, node: TestKubelet
) -> None:
    """leaderElection (on by default): the second replica waits for the Lease, and acts only once
    the first is gone (its Lease released at shutdown)."""
    lease = f"{release}-leader"
    first = space.ns_json("get", "lease", lease)["spec"]["holderIdentity"]
    space.ns("scale", f"deployment/{release}", "--replicas=2")

    def operator_pods() -> list[dict[str, Any]]:
        return list(space.ns_json("get", "pods", "-l", f"app.kubernetes.io/instance={RELEASE}")["items"])

    def second_waiting() -> str | None:
        others = [p for p in operator_pods() if not first.startswith(p["metadata"]["name"] + "_")]
        if len(others) != 1 or others[0]["status"].get("phase") != "Running":
            return None
        name = str(others[0]["metadata"]["name"])
        return name if "waiting for the lease" in node.log_of(space.namespace, name) else None

    second = wait_for("the second replica waiting for the lease", second_waiting, timeout=120, interval=1)
    assert space.ns_json("get", "lease", lease)["spec"]["holderIdentity"] == first
    space.ns("delete", "pod", first.rsplit("_", 1)[0], "--wait=true", "--timeout=90s", timeout=100)

    def taken_over() -> str | None:
        holder = str(space.ns_json("get", "lease", lease)["spec"].get("holderIdentity") or "")
        return holder if holder and holder != first else None

    # The waiting replica, or the ReplicaSet's replacement of the first if it is quicker.
    holder = wait_for("another replica leading", taken_over, timeout=60, interval=1)
    pod = holder.rsplit("_", 1)[0]
    # The Lease is written a moment before the process logs that it leads: wait for the line.
    wait_for(
        "the new leader's log saying it leads",
        lambda: "leading: holding the lease" in node.log_of(space.namespace, pod),
        timeout=30,
        interval=0.5,
    )
    waited = space.ns_json("get", "pod", second)["status"]["containerStatuses"][0]
    assert waited["restartCount"] == 0, "a replica waiting for the lease still answers its liveness probe"
    space.ns("scale", f"deployment/{release}", "--replicas=1")


def test_with_the_operator_stopped_deletion_is_not_blocked_and_garbage_collection_removes_the_children(
    space: Kubectl, hd: dict[str, Any], release: str, node: TestKubelet
) -> None:
    assert children(space), "the children exist before the deletion"
    space.ns("scale", f"deployment/{release}", "--replicas=0")
    wait_for(
        "the operator pod gone",
        lambda: not space.ns_json("get", "pods", "-l", f"app.kubernetes.io/instance={RELEASE}")["items"],
        timeout=120,
        interval=1,
    )
    try:
        space.ns("delete", "hd", HD, "--wait=true", "--timeout=30s", timeout=40)  # no finalizer to wait for
        wait_for("the children garbage-collected", lambda: children(space) == [], timeout=120, interval=1)
        pods = space.ns_json("get", "pods", "-l", f"{names.LABEL_DEPLOYMENT}={HD}")["items"]
        wait_for(
            "the worker pods gone",
            lambda: not space.ns_json("get", "pods", "-l", f"{names.LABEL_DEPLOYMENT}={HD}")["items"],
            timeout=120,
            interval=1,
        )
        del pods
    finally:
        space.ns("scale", f"deployment/{release}", "--replicas=1")
