"""The project's own plane with its test kubelet: real scheduling, real controllers, pods as processes.

What is real here: the API server (authn by client certificate, Node authorisation, NodeRestriction),
etcd, the scheduler (it places pods by the capacity the test kubelet reports, `nvidia.com/gpu`
too), the controller-manager (Deployments, ReplicaSets, EndpointSlices, node lifecycle). What stands
in: the kubelet and container runtime (tests/support/kubelet.py: pods run as local processes on
their own loopback address). So a Deployment's pods here are scheduled, started, probed, counted
Ready and put into EndpointSlices by the same code as on any cluster.
"""

from __future__ import annotations

import json
import textwrap
import time
from collections.abc import Callable, Iterator
from typing import Any

import httpx
import pytest
from e2e_support import Kubectl, wait_for
from plane import Plane
from tests.support.kubelet import ApiCredentials, TestKubelet

pytestmark = [pytest.mark.own_plane, pytest.mark.timeout(600)]
GROUP = {"helios.dev/test-group": "plane-kubelet"}


@pytest.fixture(scope="module")
def space(kube_factory: Callable[[str], Kubectl]) -> Kubectl:
    """A namespace of this module's own (the session's namespace is the e2e suite's)."""
    return kube_factory("helios-nodes")


# A tiny web server with a readiness endpoint, a preStop target and a crash switch.
SERVER = textwrap.dedent(
    """
    import http.server, os, signal, sys, time
    marker = os.environ.get("MARKER", "")
    class H(http.server.BaseHTTPRequestHandler):
        def do_GET(self):
            if self.path == "/prestop" and marker:
                open(marker, "a").write("prestop\\n")
            body = os.environ.get("HOSTNAME", "").encode()
            self.send_response(200 if self.path != "/crash" else 500)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)
        def log_message(self, *a):
            pass
    def term(*_):
        if marker:
            open(marker, "a").write("sigterm\\n")
        sys.exit(0)
    signal.signal(signal.SIGTERM, term)
    http.server.ThreadingHTTPServer((sys.argv[1], int(sys.argv[2])), H).serve_forever()
    """
)


def server_pod(name: str, **extra: Any) -> dict[str, Any]:
    container: dict[str, Any] = {
        "name": "web",
        "image": "python:3.11",
        "command": ["python3", "-c", SERVER],
        "args": ["0.0.0.0", "8080"],
        "ports": [{"name": "http", "containerPort": 8080}],
        "readinessProbe": {"httpGet": {"path": "/", "port": "http"}, "periodSeconds": 1},
        "resources": {"requests": {"cpu": "100m", "memory": "64Mi"}},
    }
    container.update(extra)
    # Only this module's nodes (the session's e2e node, still up, cannot run this image).
    return {"containers": [container], "terminationGracePeriodSeconds": 5, "nodeSelector": GROUP}


@pytest.fixture(scope="module")
def kubelets(plane: Plane, tmp_path_factory: pytest.TempPathFactory) -> Iterator[list[TestKubelet]]:
    """Two test nodes: one with two GPUs, one with none."""
    started = []
    for name, capacity in (("node-gpu", {"nvidia.com/gpu": "2"}), ("node-cpu", {"cpu": "4"})):
        scratch = tmp_path_factory.mktemp(name)
        creds = ApiCredentials.from_kubeconfig(plane.node_kubeconfig(name), scratch / "creds")
        kubelet = TestKubelet(
            creds,
            name,
            capacity=capacity,
            images={"python": None},
            labels=GROUP,
            workdir=scratch / "pods",
            pod_prefix=plane.pod_prefix,
            pid_file=plane.state / "kubelet.pids",
        )
        kubelet.start()
        started.append(kubelet)
    yield started
    for kubelet in started:
        kubelet.stop()


def pods(space: Kubectl, selector: str) -> list[dict[str, Any]]:
    return list(space.ns_json("get", "pods", "-l", selector)["items"])


def deployment(space: Kubectl, name: str, replicas: int, pod_spec: dict[str, Any]) -> None:
    labels = {"app": name}
    space.apply(
        [
            {
                "apiVersion": "apps/v1",
                "kind": "Deployment",
                "metadata": {"name": name, "namespace": space.namespace},
                "spec": {
                    "replicas": replicas,
                    "selector": {"matchLabels": labels},
                    "template": {"metadata": {"labels": labels}, "spec": pod_spec},
                },
            },
            {
                "apiVersion": "v1",
                "kind": "Service",
                "metadata": {"name": name, "namespace": space.namespace},
                "spec": {"selector": labels, "ports": [{"name": "http", "port": 80, "targetPort": "http"}]},
            },
        ]
    )


def test_the_control_plane_is_the_real_one_at_the_release_it_was_built_from(space: Kubectl) -> None:
    version = json.loads(space.ok("version", "-o", "json"))
    assert version["serverVersion"]["gitVersion"] == "v1.37.2"
    assert version["clientVersion"]["gitVersion"] == "v1.37.2"
    assert space.ok("get", "--raw", "/readyz") == "ok"
    # RBAC is on: an unknown ServiceAccount may do nothing.
    denied = space.run("auth", "can-i", "list", "pods", "--as=system:serviceaccount:default:nobody")
    assert denied.stdout.strip() == "no"


def test_test_nodes_register_and_the_node_lifecycle_controller_keeps_them_ready(
    space: Kubectl, kubelets: list[TestKubelet]
) -> None:
    def ready_without_taints() -> dict[str, Any] | None:
        node = space.json("get", "node", "node-gpu")
        ready = {c["type"]: c["status"] for c in node["status"]["conditions"]}.get("Ready")
        return node if ready == "True" and not node["spec"].get("taints") else None

    # The real node-lifecycle controller removes the not-ready taint once it sees Ready.
    node = wait_for("node-gpu Ready and untainted", ready_without_taints, timeout=60, interval=1)
    assert node["status"]["allocatable"]["nvidia.com/gpu"] == "2"
    lease = space.json("get", "lease", "-n", "kube-node-lease", "node-gpu")
    assert lease["spec"]["holderIdentity"] == "node-gpu"
    # NodeRestriction: a node may not touch another node.
    other = kubelets[1]
    r = other._api.patch(
        "/api/v1/nodes/node-gpu",
        content=json.dumps({"metadata": {"labels": {"stolen": "yes"}}}),
        headers={"Content-Type": "application/merge-patch+json"},
    )
    assert r.status_code == 403, r.text


def test_a_deployment_runs_ready_pods_that_endpoint_slices_list_and_that_answer_on_their_pod_ip(
    plane: Plane, space: Kubectl, kubelets: list[TestKubelet]
) -> None:
    if not plane.routable_pods:
        pytest.skip(
            "pods have loopback addresses here (no CAP_NET_ADMIN to route 10.244.0.0/16): "
            "the API server refuses them in EndpointSlices"
        )
    deployment(space, "web", 2, server_pod("web"))
    space.ns("rollout", "status", "deployment/web", "--timeout=90s", timeout=100)
    running = pods(space, "app=web")
    ips = sorted(p["status"]["podIP"] for p in running)
    assert len(set(ips)) == 2 and all(ip.startswith(plane.pod_prefix + ".") for ip in ips)
    for p in running:
        answer = httpx.get(f"http://{p['status']['podIP']}:8080/", timeout=5)
        assert answer.text == p["metadata"]["name"]  # the pod's own process, on its own address

    def slice_ips() -> list[str] | None:
        slices = space.ns_json("get", "endpointslices", "-l", "kubernetes.io/service-name=web")["items"]
        ready = sorted(
            a
            for s in slices
            for e in s.get("endpoints") or ()
            if (e.get("conditions") or {}).get("ready")
            for a in e["addresses"]
        )
        return ready if ready == ips else None

    wait_for("the EndpointSlice controller to list both pods", slice_ips, timeout=60, interval=1)


def test_a_pod_asking_for_more_gpus_than_any_node_has_stays_pending_and_one_that_fits_lands_on_the_gpu_node(
    space: Kubectl, kubelets: list[TestKubelet]
) -> None:
    gpus = {"limits": {"nvidia.com/gpu": "1"}, "requests": {"nvidia.com/gpu": "1"}}
    deployment(space, "gpu-one", 1, server_pod("gpu-one", resources=gpus))
    deployment(space, "gpu-three", 1, server_pod("gpu-three", resources={"limits": {"nvidia.com/gpu": "3"}}))
    space.ns("rollout", "status", "deployment/gpu-one", "--timeout=90s", timeout=100)
    assert [p["spec"]["nodeName"] for p in pods(space, "app=gpu-one")] == ["node-gpu"]

    def unschedulable() -> str | None:
        (pod,) = pods(space, "app=gpu-three")
        cond = {c["type"]: c for c in pod["status"].get("conditions") or ()}.get("PodScheduled")
        return cond["message"] if cond and cond.get("reason") == "Unschedulable" else None

    message = wait_for("the scheduler to refuse 3 GPUs", unschedulable, timeout=60, interval=1)
    assert "nvidia.com/gpu" in message


def test_an_image_the_node_cannot_run_waits_in_image_pull_back_off(space: Kubectl, kubelets: list[TestKubelet]) -> None:
    spec = server_pod("nope")
    spec["containers"][0]["image"] = "registry.invalid/not-here:1"
    deployment(space, "nope", 1, spec)

    def waiting() -> str | None:
        items = pods(space, "app=nope")
        statuses = items[0]["status"].get("containerStatuses") if items else None
        reason = statuses[0]["state"].get("waiting", {}).get("reason") if statuses else None
        return reason if reason == "ImagePullBackOff" else None

    wait_for("ImagePullBackOff", waiting, timeout=60, interval=1)
    (pod,) = pods(space, "app=nope")
    assert pod["status"]["phase"] == "Pending"
    assert {c["type"]: c["status"] for c in pod["status"]["conditions"]}["Ready"] == "False"


def test_a_crashing_container_is_restarted_with_its_exit_code_and_message_reported(
    space: Kubectl, kubelets: list[TestKubelet]
) -> None:
    crash = {
        "command": ["python3", "-c", "import sys; print('helios worker: error: no model'); sys.exit(3)"],
        "args": [],
        "terminationMessagePolicy": "FallbackToLogsOnError",
        "readinessProbe": None,
    }
    spec = server_pod("crash", **crash)
    del spec["containers"][0]["readinessProbe"]
    deployment(space, "crash", 1, spec)

    def restarted() -> dict[str, Any] | None:
        items = pods(space, "app=crash")
        statuses = items[0]["status"].get("containerStatuses") if items else None
        return statuses[0] if statuses and statuses[0]["restartCount"] >= 2 else None

    status = wait_for("two restarts", restarted, timeout=90, interval=1)
    last = status["lastState"]["terminated"]
    assert last["exitCode"] == 3 and last["reason"] == "Error"
    assert "helios worker: error: no model" in last["message"]


def test_deleting_a_pod_runs_pre_stop_then_sigterm_and_the_replica_set_replaces_it(
    space: Kubectl, kubelets: list[TestKubelet], tmp_path_factory: pytest.TempPathFactory
) -> None:
    marker = tmp_path_factory.mktemp("marker") / "events"
    spec = server_pod(
        "stop",
        env=[{"name": "MARKER", "value": str(marker)}],
        lifecycle={"preStop": {"httpGet": {"path": "/prestop", "port": "http"}}},
    )
    deployment(space, "stop", 1, spec)
    space.ns("rollout", "status", "deployment/stop", "--timeout=90s", timeout=100)
    (first,) = pods(space, "app=stop")
    started = time.monotonic()
    space.ns("delete", "pod", first["metadata"]["name"], "--wait=true", "--timeout=60s", timeout=70)
    assert time.monotonic() - started < 30, "the process stopped on SIGTERM, well inside its grace period"
    assert marker.read_text().splitlines() == ["prestop", "sigterm"]
    space.ns("rollout", "status", "deployment/stop", "--timeout=90s", timeout=100)
    (second,) = pods(space, "app=stop")
    assert second["metadata"]["uid"] != first["metadata"]["uid"]


# One init step: appends "NAME failed" (exit 5) the first time when told to fail once, else "NAME done".
INIT_STEP = textwrap.dedent(
    """
    import os, sys, time
    events, name, mode = sys.argv[1], sys.argv[2], sys.argv[3]
    tried = os.path.exists(events) and any(line.startswith(name + " ") for line in open(events))
    time.sleep(2)
    if mode == "fail-always" or (mode == "fail-once" and not tried):
        open(events, "a").write(name + " failed\\n")
        print("init: error: " + name + " could not finish", flush=True)
        sys.exit(5)
    open(events, "a").write(name + " done\\n")
    """
)
# The container: says what the init containers left in the pod's emptyDir, then stays up.
SHOW_EVENTS = "import sys, time; print(open(sys.argv[1]).read(), flush=True); time.sleep(3600)"


def init_pod(space: Kubectl, name: str, restart: str, steps: list[tuple[str, str]]) -> None:
    def container(step: str, mode: str) -> dict[str, Any]:
        return {
            "name": step,
            "image": "python:3.11",
            "command": ["python3", "-c", INIT_STEP],
            "args": ["/work/events", step, mode],
            "volumeMounts": [{"name": "work", "mountPath": "/work"}],
            "terminationMessagePolicy": "FallbackToLogsOnError",
        }

    main = {
        "name": "app",
        "image": "python:3.11",
        "command": ["python3", "-c", SHOW_EVENTS],
        "args": ["/work/events"],
        "volumeMounts": [{"name": "work", "mountPath": "/work"}],
    }
    pod_spec = {
        "restartPolicy": restart,
        "initContainers": [container(step, mode) for step, mode in steps],
        "containers": [main],
        "volumes": [{"name": "work", "emptyDir": {}}],
        "terminationGracePeriodSeconds": 2,
        "nodeSelector": GROUP,
    }
    meta = {"name": name, "namespace": space.namespace}
    space.apply([{"apiVersion": "v1", "kind": "Pod", "metadata": meta, "spec": pod_spec}])


def conditions(pod: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {c["type"]: c for c in pod["status"].get("conditions") or ()}


def test_init_containers_run_one_after_another_to_completion_before_the_containers_and_a_failed_one_restarts(
    space: Kubectl, kubelets: list[TestKubelet]
) -> None:
    init_pod(space, "inits", "Always", [("fetch", "ok"), ("flaky", "fail-once")])

    def initializing() -> dict[str, Any] | None:
        pod = space.ns_json("get", "pod", "inits")
        inits = pod["status"].get("initContainerStatuses") or []
        running = [s["name"] for s in inits if "running" in s["state"]]
        return pod if running == ["fetch"] else None

    pod = wait_for("the first init container running", initializing, timeout=60, interval=0.5)
    assert pod["status"]["phase"] == "Pending"
    initialized = conditions(pod)["Initialized"]
    assert initialized["status"] == "False" and initialized["reason"] == "ContainersNotInitialized"
    assert initialized["message"] == "containers with incomplete status: [fetch flaky]"
    (app,) = pod["status"]["containerStatuses"]
    assert app["state"] == {"waiting": {"reason": "PodInitializing"}}

    space.ns("wait", "--for=condition=Ready", "pod/inits", "--timeout=90s", timeout=100)
    pod = space.ns_json("get", "pod", "inits")
    assert conditions(pod)["Initialized"]["status"] == "True"
    fetch, flaky = pod["status"]["initContainerStatuses"]
    assert fetch["state"]["terminated"]["reason"] == "Completed" and fetch["restartCount"] == 0
    assert flaky["state"]["terminated"]["exitCode"] == 0 and flaky["restartCount"] == 1
    assert flaky["lastState"]["terminated"]["exitCode"] == 5
    assert "init: error: flaky could not finish" in flaky["lastState"]["terminated"]["message"]
    assert all(s["ready"] for s in (fetch, flaky))  # as the kubelet reports an init container that is done
    node = next(k for k in kubelets if k.node == pod["spec"]["nodeName"])

    def events_shown() -> list[str] | None:
        lines = node.log_of(space.namespace, "inits").split()
        return lines or None

    # In order, in the pod's own emptyDir, and the container started only after the last of them.
    shown = wait_for("the container's output", events_shown, timeout=30, interval=0.5)
    assert shown == ["fetch", "done", "flaky", "failed", "flaky", "done"]


def test_an_init_container_that_fails_under_restart_policy_never_fails_the_pod_and_nothing_else_runs(
    space: Kubectl, kubelets: list[TestKubelet]
) -> None:
    init_pod(space, "init-fails", "Never", [("broken", "fail-always"), ("after", "ok")])

    def failed() -> dict[str, Any] | None:
        pod = space.ns_json("get", "pod", "init-fails")
        return pod if pod["status"].get("phase") == "Failed" else None

    pod = wait_for("the pod Failed", failed, timeout=60, interval=0.5)
    broken, after = pod["status"]["initContainerStatuses"]
    assert broken["state"]["terminated"]["exitCode"] == 5 and broken["restartCount"] == 0
    assert "init: error: broken could not finish" in broken["state"]["terminated"]["message"]
    assert after["state"] == {"waiting": {"reason": "PodInitializing"}}  # never started
    (app,) = pod["status"]["containerStatuses"]
    assert app["state"] == {"waiting": {"reason": "PodInitializing"}}
    initialized = conditions(pod)["Initialized"]
    assert initialized["status"] == "False" and "[broken after]" in initialized["message"]
    time.sleep(3)  # nothing restarts it
    again = space.ns_json("get", "pod", "init-fails")
    assert again["status"]["initContainerStatuses"][0]["restartCount"] == 0
    assert again["status"]["phase"] == "Failed"
