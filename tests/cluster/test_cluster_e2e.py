"""HELIOS end to end on a real cluster: the CRD and its CEL rules on a real API server, the Helm chart
and both images, the trained tiny example profiled on live traffic and served, the scale subresource,
a forced switch under traffic with no failed request, and garbage collection by ownerReferences.

Runs on every target (conftest.py says why it skips where none is): on the project's own plane the
operator and worker pods run through the test kubelet (`helios operator`, `helios worker` with the
pods' own args, models from a hostPath volume) and Prometheus is a local process that discovers the
workers through kubernetes_sd_configs against that API server; on a cluster of HELIOS_E2E=1 the
images run (how to set one up with kind or k3d is in docs/cluster-testing.md).
The tests run in file order and build on each other's state (one namespace, one release, one
HeliosDeployment), as a person would.
"""

from __future__ import annotations

import copy
import importlib
import json
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml
from e2e_support import RELEASE, REPO, E2EConfig, Kubectl, Traffic, operator_logs, wait_for, worker_scrape_job
from tests.support.kubelet import TestKubelet

from helios_operator.core import names

pytestmark = [pytest.mark.cluster, pytest.mark.timeout(1800)]

sys.path.insert(0, str(REPO / "tests" / "crd"))  # the catalogue, as tests/crd imports it
bad_objects = importlib.import_module("bad_objects")

EXAMPLE = REPO / "examples" / "helios-trained-tiny.yaml"
HD = yaml.safe_load(EXAMPLE.read_text())["metadata"]["name"]
REJECTED = ("is invalid", "Invalid value", "Required value", "Unsupported value", "unknown field", "Duplicate value")


def heliosdeployment(namespace: str, name: str, spec: dict[str, Any]) -> dict[str, Any]:
    return {"apiVersion": names.API_VERSION, "kind": names.KIND, "metadata": {"name": name, "namespace": namespace},
            "spec": spec}  # fmt: skip


def first_difference(good: Any, bad: Any, path: tuple[str, ...] = ()) -> tuple[str, ...]:
    """The path of the first field where `bad` differs from `good` (descending into what is new)."""
    if isinstance(bad, dict):
        base = good if isinstance(good, dict) else {}
        for key in [*bad, *(k for k in base if k not in bad)]:  # the mistake's own order first
            if key not in bad:
                return (*path, key)
            if base.get(key) != bad[key]:
                return first_difference(base.get(key), bad[key], (*path, key))
    if isinstance(bad, list) and isinstance(good, list) and len(good) == len(bad):
        for i, (g, b) in enumerate(zip(good, bad, strict=True)):
            if g != b:
                return first_difference(g, b, (*path, str(i)))
    return path


def example(kube: Kubectl, claim: str) -> dict[str, Any]:
    """The shipped example, in the test namespace, its models on the model claim, asking for a
    quarter CPU per worker so that profiling, scaling and a switch fit on a laptop's kind node."""
    hd: dict[str, Any] = yaml.safe_load(EXAMPLE.read_text())
    hd["metadata"]["namespace"] = kube.namespace
    for c in hd["spec"]["candidates"]:
        c["model"] = f"pvc://{claim}/{Path(c['model']).name}"  # /models/helios-tiny -> pvc://claim/helios-tiny
    hd["spec"]["worker"]["resources"]["requests"]["cpu"] = "250m"
    # Reassess only when a test asks for it: the tiny models answer fast, and 60 requests of the
    # warm-up traffic would start a new profiling round every few seconds on this plane.
    hd["spec"]["reassessment"]["everyRequests"] = 100000
    return hd


def status(kube: Kubectl) -> dict[str, Any]:
    st: dict[str, Any] = kube.ns_json("get", "hd", HD).get("status") or {}
    return st


def children(kube: Kubectl) -> list[dict[str, Any]]:
    """The Deployments and Services labelled as the HeliosDeployment's."""
    selector = f"{names.LABEL_DEPLOYMENT}={HD}"
    return list(kube.ns_json("get", "deployments,services", "-l", selector)["items"])


def worker_deployments(kube: Kubectl) -> dict[str, dict[str, Any]]:
    items = kube.ns_json("get", "deployments", "-l", f"{names.LABEL_DEPLOYMENT}={HD}")["items"]
    return {d["metadata"]["name"]: d for d in items}


def serving(kube: Kubectl, not_candidate: str | None = None) -> dict[str, Any] | None:
    """status, once Serving from an active worker the stable Service selects and nothing else runs."""
    st = status(kube)
    active = st.get("active")
    if st.get("phase") != "Serving" or not active or active["candidate"] == not_candidate:
        return None
    selector = kube.ns_json("get", "service", HD)["spec"]["selector"]
    if selector.get(names.LABEL_POOL) != active["worker"] or set(worker_deployments(kube)) != {active["worker"]}:
        return None
    return st


@pytest.fixture(scope="module")
def tiny(
    kube: Kubectl,
    e2e: E2EConfig,
    operator_release: str,
    model_claim: str,
    api_proxy: str,
    ops_node: TestKubelet | None,
) -> dict[str, Any]:
    """The example applied with kubectl; its status once profiling on live traffic chose and it serves."""
    kube.apply([example(kube, model_claim)])
    url = f"{api_proxy}/api/v1/namespaces/{kube.namespace}/services/{HD}:{names.WORKER_PORT_NAME}/proxy/v1/completions"
    # Profiling needs live traffic through the Service (requestsPerCandidate per candidate). Requests
    # fail until the Service exists and selects a Ready pool: not counted here.
    with Traffic(url) as warmup:
        try:
            st = wait_for("the example to serve", lambda: serving(kube), timeout=e2e.timeout_s, interval=3)
        except AssertionError as err:
            raise AssertionError(f"{err}\nrequests: {warmup.outcomes}\n{operator_logs(kube, ops_node)}") from err
    assert warmup.ok >= 2 * 3, f"profiling finished on fewer requests than 3 per candidate: {warmup.outcomes}"
    return {"status": st, "url": url}


def test_the_crd_is_established_with_its_short_name_scale_subresource_and_printer_columns(crd: dict[str, Any]) -> None:
    conditions = {c["type"]: c["status"] for c in crd["status"]["conditions"]}
    assert conditions.get("Established") == "True" and conditions.get("NamesAccepted") == "True", conditions
    assert crd["status"]["acceptedNames"]["shortNames"] == [names.SHORT_NAME]
    version = next(v for v in crd["spec"]["versions"] if v["name"] == names.VERSION)
    assert version["subresources"]["scale"]["specReplicasPath"] == ".spec.replicas"
    assert [c["name"] for c in version["additionalPrinterColumns"]][:3] == ["Phase", "Candidate", "Depth"]


def test_the_scrape_job_relabels_workers_as_the_operators_service_monitor_declares() -> None:
    """The suite's Prometheus (kubernetes_sd_configs) and the ServiceMonitor the operator creates
    where the Prometheus Operator runs must give the series the same `worker` and `namespace`."""
    from helios_operator.core import manifests as resources

    monitor = resources.service_monitor(HD, "ns")["spec"]["endpoints"][0]
    job = worker_scrape_job("ns")
    ours = {r["target_label"]: r["source_labels"] for r in job["relabel_configs"] if "target_label" in r}
    theirs = {r["targetLabel"]: r["sourceLabels"] for r in monitor["relabelings"] if "targetLabel" in r}
    assert theirs and all(ours.get(label) == sources for label, sources in theirs.items()), (ours, theirs)
    kept = [r for r in job["relabel_configs"] if r.get("action") == "keep" and "port_name" in r["source_labels"][0]]
    assert [r["regex"] for r in kept] == [monitor["port"]] == [names.WORKER_PORT_NAME]


def test_the_api_server_accepts_the_good_spec_and_every_example(kube: Kubectl, crd: dict[str, Any]) -> None:
    kube.apply([heliosdeployment(kube.namespace, "good", bad_objects.GOOD_SPEC)], "--dry-run=server")
    for path in sorted((REPO / "examples").glob("*.yaml")):
        obj = yaml.safe_load(path.read_text())
        obj["metadata"]["namespace"] = kube.namespace
        kube.apply([obj], "--dry-run=server")


@pytest.mark.parametrize("bad", bad_objects.CATALOGUE, ids=[b.mistake for b in bad_objects.CATALOGUE])
def test_the_api_server_rejects_the_bad_object(kube: Kubectl, crd: dict[str, Any], bad: Any) -> None:
    """CEL mistakes must come back with the rule's own message (that proves the rules on a real API
    server); schema mistakes come back in the API server's words, which differ from jsonschema's,
    so they must name the field at fault."""
    obj = heliosdeployment(kube.namespace, "bad", bad.spec)
    done = kube.run("apply", "--dry-run=server", "-f", "-", stdin=yaml.safe_dump(obj))
    message = done.stderr
    assert done.returncode != 0, f"the API server accepted {bad.mistake!r}: {done.stdout}"
    assert any(marker in message for marker in REJECTED), message
    if bad.layer == "cel":
        assert bad.expect in message, f"expected the CEL message {bad.expect!r}, got: {message}"
    else:
        field = [p for p in first_difference(bad_objects.GOOD_SPEC, bad.spec) if not p.isdigit()]
        leaf = field[-1] if field else "spec"
        assert leaf in message, f"expected the field {leaf!r} named in: {message}"


def test_the_chart_installs_an_operator_that_runs_from_the_image(
    kube: Kubectl, e2e: E2EConfig, operator_release: str
) -> None:
    deployment = kube.ns_json("get", "deployment", operator_release)
    assert deployment["status"].get("readyReplicas") == 1
    container = deployment["spec"]["template"]["spec"]["containers"][0]
    assert container["image"] == e2e.operator_image
    env = {e["name"]: e.get("value") for e in container.get("env", [])}
    assert env.get("HELIOS_WORKER_IMAGE") == e2e.worker_image
    assert env.get("HELIOS_NAMESPACES") == kube.namespace


def test_the_tiny_example_profiles_on_live_traffic_and_serves(kube: Kubectl, tiny: dict[str, Any]) -> None:
    st = tiny["status"]
    assert st["decisions"][0]["trigger"] == "profiling" and st["decisions"][0]["applied"] is True
    assert {p["candidate"] for p in st["profiles"]} == {"tiny", "small"}
    conditions = {c["type"]: c["status"] for c in st["conditions"]}
    assert conditions.get("MetricsAvailable") == "True", st["conditions"]
    worker = worker_deployments(kube)[st["active"]["worker"]]
    assert worker["metadata"]["labels"][names.LABEL_ROLE] == names.ROLE_SERVE
    args = worker["spec"]["template"]["spec"]["containers"][0]["args"]
    assert "--layers" in args and args[args.index("--layers") + 1] == str(st["active"]["depth"])

    # The CRD's printer columns, as `kubectl get hd` prints them (kmock cannot show these).
    header, row = kube.ns("get", "hd", HD).strip().splitlines()[:2]
    assert header.split()[:6] == ["NAME", "PHASE", "CANDIDATE", "DEPTH", "REPLICAS", "READY"]
    assert row.split()[:6] == [HD, "Serving", st["active"]["candidate"], str(st["active"]["depth"]), "1", "1"]


def test_kubectl_scale_moves_the_active_worker_through_the_scale_subresource(
    kube: Kubectl, e2e: E2EConfig, tiny: dict[str, Any]
) -> None:
    worker = status(kube)["active"]["worker"]
    kube.ns("scale", f"hd/{HD}", "--replicas=2")
    wait_for("the Deployment at 2", lambda: kube.ns_json("get", "deployment", worker)["spec"]["replicas"] == 2, 60)
    kube.ns("rollout", "status", f"deployment/{worker}", f"--timeout={int(e2e.timeout_s)}s", timeout=e2e.timeout_s)
    st = wait_for("status.readyReplicas 2", lambda: (s := status(kube)).get("readyReplicas") == 2 and s, timeout=60)
    assert st["active"]["worker"] == worker, "scaling must not switch workers"
    scale = json.loads(kube.ok("get", "--raw", f"/apis/{names.API_VERSION}/namespaces/{kube.namespace}/"
                                              f"{names.PLURAL}/{HD}/scale"))  # fmt: skip
    assert scale["status"]["replicas"] == 2 and scale["status"]["selector"], scale
    pods = kube.ns_json("get", "pods", "-l", scale["status"]["selector"])["items"]
    assert len([p for p in pods if p["status"].get("phase") == "Running"]) == 2, "the HPA's selector finds 2 pods"
    # The real disruption controller counts the serving pods under the budget: a drain takes one at a time.
    budget = wait_for(
        "the PodDisruptionBudget counting both serving pods",
        lambda: (
            (b := (kube.ns_json("get", "pdb", f"{HD}-serving").get("status") or {})).get("currentHealthy") == 2 and b
        ),
        timeout=60,
    )
    assert (budget["expectedPods"], budget["disruptionsAllowed"]) == (2, 1), budget


def test_after_every_requests_it_reassesses_on_live_traffic_and_serves_again(
    kube: Kubectl, e2e: E2EConfig, tiny: dict[str, Any]
) -> None:
    """Reassessment: after `everyRequests` served requests HELIOS re-profiles every candidate on live
    traffic beside the serving worker and decides again (trigger `reassessment`)."""
    before = len(status(kube).get("decisions") or [])
    kube.ns("patch", "hd", HD, "--type=merge", "-p", json.dumps({"spec": {"reassessment": {"everyRequests": 10}}}))
    with Traffic(tiny["url"]) as traffic:

        def reassessed() -> dict[str, Any] | None:
            st = status(kube)
            decisions = (st.get("decisions") or [])[before:]
            return st if any(d["trigger"] == "reassessment" for d in decisions) else None

        st = wait_for("a reassessment decision", reassessed, timeout=e2e.timeout_s, interval=2)
        kube.ns(
            "patch", "hd", HD, "--type=merge", "-p", json.dumps({"spec": {"reassessment": {"everyRequests": 100000}}})
        )
        wait_for("serving again", lambda: serving(kube), timeout=e2e.timeout_s, interval=3)
    assert traffic.failures == [], f"{len(traffic.failures)} failed of {traffic.outcomes}: {traffic.failures[:5]}"
    assert {p["candidate"] for p in st["profiles"]} == {"tiny", "small"}


@pytest.mark.own_plane
def test_an_inference_pool_of_the_real_crd_selects_the_active_workers_pods(kube: Kubectl, tiny: dict[str, Any]) -> None:
    """The Gateway API Inference Extension's own InferencePool CRD (v1, from its Go module): the
    operator's object passes its schema and CEL rules on the real API server. No gateway or
    endpoint picker runs here: the object is what a gateway would read."""
    from plane import crds

    kube.ok("apply", "-f", str(crds() / "inferencepools.yaml"))
    crd = "crd/inferencepools.inference.networking.k8s.io"
    kube.ok("wait", "--for=condition=Established", crd, "--timeout=60s", timeout=90)
    picker = {"endpointPicker": {"name": "tiny-epp", "port": 9002}}
    kube.ns("patch", "hd", HD, "--type=merge", "-p", json.dumps({"spec": {"inferencePool": picker}}))
    active = status(kube)["active"]["worker"]

    def pool() -> dict[str, Any] | None:
        found = kube.ns_json("get", "inferencepools")["items"]
        return found[0] if found else None

    obj = wait_for("the InferencePool", pool, timeout=120, interval=2)  # an absent CRD is looked for every 30 s
    assert obj["metadata"]["name"] == HD
    assert obj["spec"]["selector"]["matchLabels"] == {names.LABEL_DEPLOYMENT: HD, names.LABEL_POOL: active}
    assert obj["spec"]["targetPorts"] == [{"number": names.WORKER_PORT}]
    assert obj["spec"]["endpointPickerRef"] == {"kind": "Service", "group": "", "name": "tiny-epp",
                                                "port": {"number": 9002}, "failureMode": "FailClose"}  # fmt: skip
    assert [r["kind"] for r in obj["metadata"]["ownerReferences"]] == [names.KIND]


def inference_pool_selects(kube: Kubectl) -> str | None:
    """The pool the InferencePool selects, where one exists (the test above made it)."""
    found = kube.ns_json("get", "inferencepools")["items"] if _served(kube, "inferencepools") else []
    return str(found[0]["spec"]["selector"]["matchLabels"][names.LABEL_POOL]) if found else None


def _served(kube: Kubectl, resource: str) -> bool:
    return resource in kube.ok("api-resources", "-o", "name")


def kill_operator(kube: Kubectl) -> str:
    """Delete the operator's pod, as a node failure or an eviction would; its ReplicaSet makes another,
    which takes the leader Lease and resumes from the HeliosDeployment's status."""
    (name,) = operator_pods(kube)
    kube.ns("delete", "pod", name, "--wait=false")
    return name


def test_a_forced_switch_under_traffic_fails_no_request_with_the_operator_killed_midway(
    kube: Kubectl, e2e: E2EConfig, tiny: dict[str, Any]
) -> None:
    """Removing the active candidate from the spec forces a re-profile beside it and a switch to the
    other candidate: new worker Ready, Service moved, old worker drained. The operator is killed while
    it re-profiles, and again mid-switch where the test sees the phase; requests flow all along."""
    before = status(kube)["active"]
    hd = kube.ns_json("get", "hd", HD)
    others = [c for c in hd["spec"]["candidates"] if c["name"] != before["candidate"]]
    killed: list[tuple[str, str]] = []
    with Traffic(tiny["url"]) as traffic:
        wait_for("traffic to flow", lambda: traffic.ok >= 5, timeout=120, interval=1)
        patch = {"spec": {"candidates": copy.deepcopy(others)}}
        kube.ns("patch", "hd", HD, "--type=merge", "-p", json.dumps(patch))
        wait_for("re-profiling beside the active worker", lambda: status(kube).get("phase") == "Reassessing", 120, 1)
        killed.append(("Reassessing", kill_operator(kube)))
        phase = wait_for(
            "the switch, or its end",
            lambda: (p := status(kube).get("phase")) in ("Switching", "Serving") and p,
            timeout=e2e.timeout_s,
            interval=1,
        )
        if phase == "Switching":
            wait_for("the new operator acting", lambda: len(operator_pods(kube)) == 1, timeout=120, interval=1)
            killed.append(("Switching", kill_operator(kube)))
        st = wait_for(
            f"a switch away from {before['candidate']}",
            lambda: serving(kube, not_candidate=before["candidate"]),
            timeout=e2e.timeout_s,
            interval=3,
        )
        wait_for("traffic on the new worker", lambda: traffic.ok >= 5, timeout=60, interval=1)
        served = traffic.ok
        wait_for("more traffic after the switch", lambda: traffic.ok >= served + 5, timeout=120, interval=1)
    assert st["active"]["candidate"] == others[0]["name"]
    assert killed[0][0] == "Reassessing" and all(name not in operator_pods(kube) for _, name in killed), killed
    assert before["worker"] not in worker_deployments(kube)
    if inference_pool_selects(kube) is not None:  # it follows the switch, as the stable Service does
        wait_for(
            "the InferencePool on the new worker", lambda: inference_pool_selects(kube) == st["active"]["worker"], 60
        )
    assert traffic.failures == [], f"{len(traffic.failures)} failed of {traffic.outcomes}: {traffic.failures[:5]}"
    reasons = {e["reason"] for e in kube.ns_json("get", "events", "--field-selector", f"involvedObject.name={HD}")
               ["items"]}  # fmt: skip
    assert {"CandidateRemoved", "SwitchStarted", "Switched"} <= reasons, reasons


def operator_pods(kube: Kubectl) -> list[str]:
    pods = kube.ns_json("get", "pods", "-l", f"app.kubernetes.io/instance={RELEASE}")["items"]
    return [str(p["metadata"]["name"]) for p in pods if not p["metadata"].get("deletionTimestamp")]


def test_deleting_the_heliosdeployment_garbage_collects_its_children(
    kube: Kubectl, e2e: E2EConfig, tiny: dict[str, Any], operator_release: str
) -> None:
    """With the operator stopped, nothing holds the deletion (the operator keeps no finalizer) and only
    the API server's garbage collector can remove the children: this proves their ownerReferences."""
    uid = kube.ns_json("get", "hd", HD)["metadata"]["uid"]
    owned = children(kube)
    assert {o["kind"] for o in owned} == {"Deployment", "Service"}
    for obj in owned:
        refs = obj["metadata"].get("ownerReferences") or []
        assert [(r["kind"], r["uid"], r.get("controller")) for r in refs] == [(names.KIND, uid, True)], obj["metadata"]

    kube.ns("scale", f"deployment/{operator_release}", "--replicas=0")
    wait_for(
        "the operator stopped",
        lambda: not kube.ns_json("get", "pods", "-l", f"app.kubernetes.io/instance={RELEASE}")["items"],
        timeout=120,
    )
    try:
        assert not kube.ns_json("get", "hd", HD)["metadata"].get("finalizers"), "the operator keeps no finalizer"
        kube.ns("delete", "hd", HD, "--wait=false")
        wait_for("the HeliosDeployment gone", lambda: kube.ns_json("get", "hd")["items"] == [], timeout=60)
        wait_for("its children garbage-collected", lambda: children(kube) == [], timeout=e2e.timeout_s)
    finally:
        kube.ns("scale", f"deployment/{operator_release}", "--replicas=1")
