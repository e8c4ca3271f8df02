"""The real `kubectl` binary drives the real operator, against the kmock emulator: a smoke test of
the commands a platform engineer types (apply, get, patch, delete) on the shipped example.

GAPS of this stand-in for an API server (kmock; see tests/operator/kmock_support.py and TESTING.md
item 6), each proven instead by the cluster suite (tests/cluster, docs/cluster-testing.md):
- no OpenAPI endpoint, so `kubectl apply` needs `--validate=false`: the CRD's schema and CEL rules
  are NOT checked here (tests/crd checks them offline; the cluster suite on a real API server);
- no server-side printing: the CRD's printer columns (Phase, Candidate, Depth, ...) are NOT proven
  here, so every assertion reads `-o json`;
- no scale subresource semantics: `kubectl scale hd/...` is not exercised; `spec.replicas` is patched;
- core/v1 discovery says groupVersion "/v1", so `kubectl get services|pods` fails ("the server doesn't
  have a resource type"): Services are read with `kubectl get --raw`;
- label selectors are ignored (`-l` returns everything), so the test filters on labels itself;
- no Deployment controller or kubelet: the test PLAYS THE DEPLOYMENT CONTROLLER by patching each
  Deployment's /status to its desired replicas; telemetry comes from a scripted provider (profiles
  the test chose), not Prometheus;
- no garbage collection by ownerReferences: the children go because the operator deletes them
  (the references are asserted; the cluster suite proves the collection).
"""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import subprocess
import sys
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import kopf
import pytest
import yaml
from kopf.testing import KopfRunner

from helios_operator import handlers
from helios_operator.core import names
from helios_operator.core.types import HeliosSpec, TelemetrySnapshot, WorkerTelemetry
from tests.operator.kmock_support import FakeCluster, fake_cluster  # noqa: F401  (the fixture)
from tests.operator.profiles import profile

pytestmark = [
    pytest.mark.timeout(60),
    pytest.mark.skipif(shutil.which("kubectl") is None, reason="needs the kubectl binary on PATH"),
]

EXAMPLE = Path(__file__).resolve().parents[2] / "examples" / "helios-trained-tiny.yaml"
MANIFEST = yaml.safe_load(EXAMPLE.read_text())
NS = MANIFEST["metadata"]["namespace"]
HD = MANIFEST["metadata"]["name"]
# Shaped like `helios train --preset tiny|small`: 6 and 10 layers.
PROFILES = {"tiny": profile("tiny", layers=6), "small": profile("small", layers=10, tokens_per_second=600.0)}


def kubectl(cluster: FakeCluster, *args: str, timeout: float = 15.0) -> str:
    """Run the real kubectl against the emulator; fail with its stderr when it fails."""
    env = {**os.environ, "KUBECONFIG": str(cluster.kubeconfig), "KUBECACHEDIR": str(cluster.kubeconfig.parent / "kc")}
    done = subprocess.run(["kubectl", *args], capture_output=True, text=True, timeout=timeout, env=env, check=False)
    assert done.returncode == 0, f"kubectl {' '.join(args)} failed ({done.returncode}): {done.stderr}"
    return done.stdout


def kubectl_json(cluster: FakeCluster, *args: str) -> dict[str, Any]:
    out: dict[str, Any] = json.loads(kubectl(cluster, *args, "-o", "json"))
    return out


class ScriptedTelemetry:
    """Reports, for each Ready worker Deployment of the HeliosDeployment, the profile of its candidate."""

    def __init__(self, cluster: FakeCluster) -> None:
        self.cluster = cluster

    async def __call__(self, namespace: str, name: str, spec: HeliosSpec) -> TelemetrySnapshot:
        items = await asyncio.to_thread(self.cluster.items, FakeCluster.deployment_path(namespace))
        workers = []
        for d in items:
            labels = d["metadata"].get("labels") or {}
            if labels.get(names.LABEL_DEPLOYMENT) != name or not (d.get("status") or {}).get("readyReplicas"):
                continue
            prof = PROFILES[labels[names.LABEL_CANDIDATE]]
            profiling = labels[names.LABEL_ROLE] == names.ROLE_PROFILE
            workers.append(
                WorkerTelemetry(
                    worker=d["metadata"]["name"],
                    candidate=prof.candidate,
                    depth=int(labels[names.LABEL_DEPTH]) or prof.model_layers,
                    model_layers=prof.model_layers,
                    requests_ok=prof.profiled_requests if profiling else 0,
                    generated_tokens=1000.0,
                    breach_ratio=0.0,
                    window_tokens=100.0,
                    profile=prof if profiling else None,
                )
            )
        if not workers:
            return TelemetrySnapshot("Missing", "no ready worker yet")
        return TelemetrySnapshot("Ok", "scripted", tuple(workers))


def play_deployment_controller(cluster: FakeCluster, stop: threading.Event, opened: threading.Event) -> None:
    """What kube-controller-manager and the kubelet would do: every Deployment's replicas become Ready,
    once the test has opened the gate (so that it sees the Profiling phase for certain)."""
    opened.wait()
    while not stop.wait(0.1):
        try:
            for d in cluster.items(FakeCluster.deployment_path(NS)):
                want = d["spec"].get("replicas", 1)
                if (d.get("status") or {}).get("readyReplicas") != want:
                    cluster.patch(
                        FakeCluster.deployment_path(NS, d["metadata"]["name"]) + "/status",
                        {"status": {"replicas": want, "readyReplicas": want, "availableReplicas": want}},
                    )
        except Exception as err:  # the emulator going away at teardown
            print(f"deployment controller: {err}", file=sys.__stdout__)


@dataclass
class Operator:
    cluster: FakeCluster
    workers_may_get_ready: threading.Event


@pytest.fixture
def operator(fake_cluster: FakeCluster, monkeypatch: pytest.MonkeyPatch) -> Iterator[Operator]:  # noqa: F811
    monkeypatch.setenv("HELIOS_RESYNC_INTERVAL_S", "0.3")
    monkeypatch.setenv("HELIOS_METRICS_PORT", "0")  # no fixed port: other suites may run beside this one
    monkeypatch.setenv("HELIOS_WORKER_IMAGE", "example.test/helios-worker:test")
    monkeypatch.setattr(handlers.controls, "telemetry", ScriptedTelemetry(fake_cluster))
    stop, gate = threading.Event(), threading.Event()
    controller = threading.Thread(target=play_deployment_controller, args=(fake_cluster, stop, gate), daemon=True)
    controller.start()
    settings = kopf.OperatorSettings()
    settings.watching.reconnect_backoff = 0.1
    settings.batching.idle_timeout = 0.2
    settings.batching.batch_window = 0.05
    settings.scanning.disabled = True
    with KopfRunner(["run", "-A", "--standalone", "-m", "helios_operator.handlers"], settings=settings) as runner:
        yield Operator(fake_cluster, gate)
    stop.set()
    gate.set()
    controller.join(5)
    assert runner.exception is None, runner.output
    assert runner.exit_code == 0, runner.output


def _hd(cluster: FakeCluster) -> dict[str, Any] | None:
    items = kubectl_json(cluster, "get", "hd", "-n", NS)["items"]
    return next((i for i in items if i["metadata"]["name"] == HD), None)


def _phase(cluster: FakeCluster) -> str:
    return str(((_hd(cluster) or {}).get("status") or {}).get("phase", ""))


def _workers(cluster: FakeCluster) -> dict[str, dict[str, Any]]:
    """The HeliosDeployment's worker Deployments (filtered here: kmock ignores `-l`)."""
    items = kubectl_json(cluster, "get", "deployments", "-n", NS, "-l", f"{names.LABEL_DEPLOYMENT}={HD}")["items"]
    mine = [d for d in items if (d["metadata"].get("labels") or {}).get(names.LABEL_DEPLOYMENT) == HD]
    return {d["metadata"]["name"]: d for d in mine}


def test_kubectl_applies_the_tiny_example_watches_it_serve_scales_it_and_deletes_it(operator: Operator) -> None:
    cluster = operator.cluster
    out = kubectl(cluster, "apply", "--validate=false", "-f", str(EXAMPLE))
    assert f"{names.SINGULAR}.{names.GROUP}/{HD} created" in out

    # Profiling: `kubectl get hd -o json` shows the phase, and one full-depth worker per candidate.
    cluster.wait_for("`kubectl get hd` to show phase Profiling", lambda: _phase(cluster) == "Profiling")
    workers = cluster.wait_for(
        "two profiling workers listed by kubectl", lambda: len(w := _workers(cluster)) == 2 and w
    )
    assert {d["metadata"]["labels"][names.LABEL_ROLE] for d in workers.values()} == {names.ROLE_PROFILE}
    assert {d["metadata"]["labels"][names.LABEL_CANDIDATE] for d in workers.values()} == {"tiny", "small"}
    assert all(d["metadata"]["labels"][names.LABEL_DEPTH] == "0" for d in workers.values())  # full depth
    assert _phase(cluster) == "Profiling", "no worker is Ready yet, so profiling cannot have finished"

    # Serving, once the played Deployment controller made them Ready and the scripted profiles are in.
    operator.workers_may_get_ready.set()

    def serving() -> dict[str, Any] | None:
        hd = _hd(cluster) or {}
        st = hd.get("status") or {}
        return hd if st.get("phase") == "Serving" and st.get("active") and st.get("readyReplicas") == 1 else None

    hd = cluster.wait_for("`kubectl get hd` to show phase Serving", serving, timeout=20)
    active = hd["status"]["active"]
    assert active["candidate"] in PROFILES and 1 <= active["depth"] <= PROFILES[active["candidate"]].model_layers
    assert hd["status"]["decisions"][0]["trigger"] == "profiling"
    uid = hd["metadata"]["uid"]

    # `kubectl get deployments` lists the serving worker with its helios.dev labels and owner.
    worker = cluster.wait_for("only the serving worker left", lambda: (w := _workers(cluster)) and len(w) == 1 and w)
    serve = worker[active["worker"]]
    labels = serve["metadata"]["labels"]
    assert labels[names.LABEL_ROLE] == names.ROLE_SERVE
    assert (labels[names.LABEL_CANDIDATE], labels[names.LABEL_DEPTH]) == (active["candidate"], str(active["depth"]))
    assert serve["spec"]["replicas"] == 1
    refs = serve["metadata"]["ownerReferences"]
    assert [(r["kind"], r["uid"], r["controller"]) for r in refs] == [(names.KIND, uid, True)]
    table = kubectl(cluster, "get", "deployments", "-n", NS, "--show-labels")
    assert active["worker"] in table and f"{names.LABEL_ROLE}={names.ROLE_SERVE}" in table
    # core/v1 by --raw: kmock's discovery names the core group "/v1", so `kubectl get services` fails
    service = json.loads(kubectl(cluster, "get", "--raw", f"/api/v1/namespaces/{NS}/services/{HD}"))
    assert service["spec"]["selector"][names.LABEL_POOL] == active["worker"]

    # `kubectl patch hd` with two replicas: the active worker follows; status reports both Ready.
    kubectl(cluster, "patch", "hd", HD, "-n", NS, "--type=merge", "-p", '{"spec":{"replicas":2}}')
    cluster.wait_for(
        "the active worker at 2 replicas",
        lambda: _workers(cluster).get(active["worker"], {}).get("spec", {}).get("replicas") == 2,
    )
    st = cluster.wait_for(
        "status.readyReplicas == 2",
        lambda: (s := (_hd(cluster) or {}).get("status") or {}).get("readyReplicas") == 2 and s,
    )
    assert st["replicas"] == 2 and st["active"]["worker"] == active["worker"], "scaling must not switch workers"

    # `kubectl delete hd` returns once the operator has removed its children and its finalizer.
    out = kubectl(cluster, "delete", "hd", HD, "-n", NS, "--timeout=20s", timeout=25)
    assert f'"{HD}" deleted' in out
    assert _hd(cluster) is None
    assert _workers(cluster) == {}
    services = json.loads(kubectl(cluster, "get", "--raw", f"/api/v1/namespaces/{NS}/services"))["items"]
    assert all((s["metadata"].get("labels") or {}).get(names.LABEL_DEPLOYMENT) != HD for s in services)
