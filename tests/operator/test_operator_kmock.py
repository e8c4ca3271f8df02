"""The operator end to end: kopf under KopfRunner against the kmock emulator over real HTTP.

GAPS of this stand-in for an API server (kmock, see kmock_support.py): no schema validation of the
CRD, no defaults, no status/spec split, no garbage collection by ownerReferences (the references are
asserted instead: the operator keeps no finalizer and deletes no children on deletion), selectors ignored,
no kubelet or Deployment controller: the test PLAYS THE DEPLOYMENT CONTROLLER by patching each
Deployment's /status (readyReplicas) once it exists. Telemetry comes from a scripted provider that
reports, for each worker Deployment that exists and is Ready, the numbers the test chose; the
Prometheus path is proven in test_telemetry_prometheus.py.
"""

from __future__ import annotations

import asyncio
import os
import sys
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field, replace
from typing import Any

import httpx
import kopf
import pytest
from kopf.testing import KopfRunner

from helios_operator import handlers
from helios_operator.core import names
from helios_operator.core.types import CandidateProfile, HeliosSpec, TelemetrySnapshot, WorkerTelemetry
from tests.support.bodies import hd_body

from .kmock_support import FakeCluster, fake_cluster, free_port  # noqa: F401  (the fixture)
from .profiles import profile

pytestmark = pytest.mark.timeout(60)

NS = "default"
HD = "chat"


@dataclass
class World:
    """What the fake Prometheus reports: per-candidate profiles and per-worker serving counters."""

    cluster: FakeCluster
    profiles: dict[str, CandidateProfile]
    requests: dict[str, float] = field(default_factory=dict)  # worker -> requests_ok
    breach: dict[str, float] = field(default_factory=dict)  # worker -> breach window ratio
    available: bool = True
    calls: int = 0
    deployment_controller: DeploymentController | None = None

    async def __call__(self, namespace: str, name: str, spec: HeliosSpec) -> TelemetrySnapshot:
        self.calls += 1
        if not self.available:
            return TelemetrySnapshot("PrometheusError", "scripted outage")
        items = await asyncio.to_thread(self.cluster.items, FakeCluster.deployment_path(namespace))
        workers = []
        for d in items:
            labels = d["metadata"].get("labels") or {}
            if labels.get(names.LABEL_DEPLOYMENT) != name or not (d.get("status") or {}).get("readyReplicas"):
                continue
            worker, candidate = d["metadata"]["name"], labels[names.LABEL_CANDIDATE]
            prof = self.profiles[candidate]
            role = labels[names.LABEL_ROLE]
            depth = int(labels[names.LABEL_DEPTH]) or prof.model_layers
            workers.append(
                WorkerTelemetry(
                    worker=worker,
                    candidate=candidate,
                    depth=depth,
                    model_layers=prof.model_layers,
                    requests_ok=self.requests.get(worker, prof.profiled_requests if role == "profile" else 0),
                    generated_tokens=1000.0,
                    breach_ratio=self.breach.get(worker, 0.0),
                    window_tokens=100.0,
                    profile=prof if role == names.ROLE_PROFILE else None,
                )
            )
        if not workers:
            return TelemetrySnapshot("Missing", "no ready worker yet")
        return TelemetrySnapshot("Ok", "scripted", tuple(workers))


class DeploymentController:
    """Plays the missing Deployment controller: marks every Deployment's replicas Ready via /status."""

    def __init__(self, cluster: FakeCluster) -> None:
        self.cluster = cluster
        self.never_ready: Callable[[str], bool] = lambda name: False  # a bad image, no GPU free
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self.stop.wait(0.1):
            try:
                for d in self.cluster.items(FakeCluster.deployment_path(NS)):
                    want = d["spec"].get("replicas", 1)
                    if self.never_ready(d["metadata"]["name"]):
                        continue
                    status = d.get("status") or {}
                    if status.get("readyReplicas") != want:
                        path = FakeCluster.deployment_path(NS, d["metadata"]["name"]) + "/status"
                        self.cluster.patch(
                            path,
                            {
                                "status": {
                                    "replicas": want,
                                    "readyReplicas": want,
                                    "observedGeneration": d["metadata"].get("generation"),
                                }
                            },
                        )
            except Exception as err:  # the emulator going away at teardown
                print(f"deployment controller: {err}", file=sys.__stdout__)


@pytest.fixture
def operator_env(
    fake_cluster: FakeCluster,  # noqa: F811
    monkeypatch: pytest.MonkeyPatch,
) -> Iterator[tuple[FakeCluster, World]]:
    monkeypatch.setenv("HELIOS_RESYNC_INTERVAL_S", "0.3")
    monkeypatch.setenv("HELIOS_WORKER_IMAGE", "example.test/helios-worker:test")
    monkeypatch.setenv("HELIOS_METRICS_PORT", str(free_port()))
    monkeypatch.setenv("HELIOS_METRICS_HOST", "127.0.0.1")
    # On, but the emulator has no ServiceMonitor CRD: the operator must create none (nor fail).
    monkeypatch.setenv("HELIOS_SERVICE_MONITORS", "true")
    world = World(
        fake_cluster, {"small": profile("small", layers=8), "big": profile("big", layers=12, tokens_per_second=400.0)}
    )
    monkeypatch.setattr(handlers.controls, "telemetry", world)
    controller = DeploymentController(fake_cluster)
    world.deployment_controller = controller
    controller.thread.start()
    settings = kopf.OperatorSettings()
    settings.watching.reconnect_backoff = 0.1
    settings.batching.idle_timeout = 0.2
    settings.batching.batch_window = 0.05
    settings.scanning.disabled = True
    with KopfRunner(["run", "-A", "--standalone", "-m", "helios_operator.handlers"], settings=settings) as runner:
        yield fake_cluster, world
    controller.stop.set()
    controller.thread.join(5)
    assert runner.exception is None, runner.output
    assert runner.exit_code == 0, runner.output


def _status(cluster: FakeCluster) -> dict[str, Any]:
    return (cluster.get(cluster.hd_path(NS, HD)) or {}).get("status") or {}


def _workers(cluster: FakeCluster) -> dict[str, dict[str, Any]]:
    return {d["metadata"]["name"]: d for d in cluster.items(FakeCluster.deployment_path(NS))}


def _service(cluster: FakeCluster, kind: str = names.SERVICE_STABLE) -> dict[str, Any] | None:
    owned = [
        s
        for s in cluster.items(FakeCluster.service_path(NS))
        if (s["metadata"].get("labels") or {}).get(names.LABEL_DEPLOYMENT) == HD
        and s["metadata"]["labels"].get(names.LABEL_SERVICE) == kind
    ]
    return owned[0] if owned else None


def _serving(cluster: FakeCluster, not_worker: str | None = None) -> dict[str, Any] | None:
    """The status once it serves from an active worker the Service selects and nothing else runs."""
    st = _status(cluster)
    active = st.get("active")
    if st.get("phase") != "Serving" or not active or active["worker"] == not_worker:
        return None
    svc = _service(cluster)
    if svc is None or svc["spec"]["selector"].get(names.LABEL_POOL) != active["worker"]:
        return None
    return st if set(_workers(cluster)) == {active["worker"]} else None


def _owned_by_hd(obj: dict[str, Any], uid: str) -> bool:
    refs = obj["metadata"].get("ownerReferences") or []
    return any(r.get("uid") == uid and r.get("kind") == names.KIND and r.get("controller") for r in refs)


def test_profiles_chooses_serves_adapts_reassesses_switches_and_deletes_cleanly(
    operator_env: tuple[FakeCluster, World],
) -> None:
    cluster, world = operator_env
    created = cluster.create(cluster.hd_path(NS), hd_body(HD, NS))
    uid = created["metadata"]["uid"]

    # Profiling: one full-depth worker per candidate, owned by the HeliosDeployment.
    round1 = {names.profile_worker(HD, 1, "small"), names.profile_worker(HD, 1, "big")}
    cluster.wait_for("profile workers", lambda: round1 <= set(_workers(cluster)) or None)
    for name in round1:
        d = _workers(cluster).get(name)
        if d is not None:  # may already be gone if profiling finished this fast
            assert _owned_by_hd(d, uid)
            assert d["metadata"]["labels"][names.LABEL_ROLE] == names.ROLE_PROFILE

    # Chosen and serving: the Service selects the serve worker; the profile workers are gone.
    st = cluster.wait_for("serving after profiling", lambda: _serving(cluster))
    first = st["active"]
    assert st["decisions"][0]["trigger"] == "profiling" and st["decisions"][0]["applied"] is True
    assert {p["candidate"] for p in st["profiles"]} == {"small", "big"}
    serve = _workers(cluster)[first["worker"]]
    assert _owned_by_hd(serve, uid)
    assert serve["metadata"]["labels"][names.LABEL_ROLE] == names.ROLE_SERVE
    assert _owned_by_hd(_service(cluster) or {"metadata": {}}, uid)
    assert st["replicas"] >= 1 and st["selector"]
    conds = {c["type"]: c for c in st["conditions"]}
    assert conds["MetricsAvailable"]["status"] == "True"
    # The headless metrics Service (every worker) exists and is owned; no ServiceMonitor without its CRD.
    metrics_svc = _service(cluster, names.SERVICE_METRICS)
    assert metrics_svc is not None and _owned_by_hd(metrics_svc, uid)
    assert metrics_svc["spec"]["clusterIP"] == "None"
    # The operator's own metrics are served on HELIOS_METRICS_PORT.
    text = httpx.get(f"http://127.0.0.1:{os.environ['HELIOS_METRICS_PORT']}/metrics", timeout=5).text
    assert 'helios_operator_metrics_available{deployment="chat",namespace="default"} 1.0' in text

    # A breach storm on the active worker: adapt to a deeper depth or another candidate.
    world.breach[first["worker"]] = 0.9
    st = cluster.wait_for("switch after breaches", lambda: _serving(cluster, not_worker=first["worker"]))
    second = st["active"]
    assert any(d["trigger"] == "breach" and d["applied"] for d in st["decisions"])
    assert (second["candidate"], second["depth"]) != (first["candidate"], first["depth"])

    # Reassessment after everyRequests: re-profile beside the active worker, then switch to what
    # the new profiles favour (big now measures far faster and as accurate).
    world.profiles["big"] = replace(
        profile("big", layers=12, tokens_per_second=50_000.0), depth_agreement=(1.0,) * 12, agreement=(1.0,) * 12
    )
    world.requests[second["worker"]] = 60
    st = cluster.wait_for(
        "switch after reassessment",
        lambda: (s := _serving(cluster, not_worker=second["worker"])) and s["active"]["candidate"] == "big" and s,
    )
    assert any(d["trigger"] == "reassessment" for d in st["decisions"])
    assert st["profilingRound"] == 2

    # A spec that cannot work: InvalidSpec condition + Warning Event; the serving worker is untouched.
    serving_before = _workers(cluster)[st["active"]["worker"]]
    cluster.patch(cluster.hd_path(NS, HD), {"spec": {"exit": {"breachWindow": 10, "breachLimit": 50}}})
    cond = cluster.wait_for(
        "InvalidSpec condition",
        lambda: next(
            (
                c
                for c in _status(cluster).get("conditions", [])
                if c["type"] == "Ready" and c["reason"] == "InvalidSpec"
            ),
            None,
        ),
    )
    assert "breachLimit" in cond["message"]
    events = cluster.items(f"/api/v1/namespaces/{NS}/events")
    assert any(e.get("reason") == "InvalidSpec" and e.get("type") == "Warning" for e in events)
    assert _workers(cluster)[st["active"]["worker"]]["spec"] == serving_before["spec"]
    assert set(_workers(cluster)) == {st["active"]["worker"]}

    # Delete: no finalizer, so the object goes at once; its children are left to the API server's
    # garbage collector (kmock has none: tests/cluster proves the collection on a real plane), so
    # here they must still be there, each owned by the deleted object.
    uid = cluster.get(cluster.hd_path(NS, HD))["metadata"]["uid"]
    assert not cluster.get(cluster.hd_path(NS, HD))["metadata"].get("finalizers")
    cluster.delete(cluster.hd_path(NS, HD))
    cluster.wait_for("the HeliosDeployment gone", lambda: cluster.get(cluster.hd_path(NS, HD)) is None)
    for child in [*_workers(cluster).values(), _service(cluster), _service(cluster, names.SERVICE_METRICS)]:
        assert child is not None
        assert [r["uid"] for r in child["metadata"]["ownerReferences"]] == [uid]
    reasons = {e.get("reason") for e in cluster.items(f"/api/v1/namespaces/{NS}/events")}
    assert {"ProfilingStarted", "SwitchStarted", "Switched"} <= reasons


def test_advisory_mode_decides_and_reports_but_never_rolls(operator_env: tuple[FakeCluster, World]) -> None:
    cluster, world = operator_env
    cluster.create(cluster.hd_path(NS), hd_body(HD, NS, mode="advisory"))

    st = cluster.wait_for("an advisory decision", lambda: (s := _status(cluster)).get("decisions") and s)
    decision = st["decisions"][0]
    assert decision["applied"] is False and decision["trigger"] == "profiling"
    # Let several reconciles pass, including a breach storm: still no serve worker, nothing switched.
    for name in list(_workers(cluster)):
        world.breach[name] = 0.95
    calls = world.calls
    cluster.wait_for("more reconciles", lambda: world.calls >= calls + 5)
    st = _status(cluster)
    assert st["phase"] == "Serving" and not st.get("active") and not st.get("target")
    roles = {d["metadata"]["labels"][names.LABEL_ROLE] for d in _workers(cluster).values()}
    assert roles == {names.ROLE_PROFILE}, "advisory mode created a serving worker"
    svc = _service(cluster)
    assert svc is not None and svc["spec"]["selector"][names.LABEL_POOL] == names.profile_pool(HD, 1)
    assert all(not d["applied"] for d in st["decisions"])
