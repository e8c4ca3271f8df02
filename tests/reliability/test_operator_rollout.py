"""A switch whose new worker never becomes Ready, and a worker that cannot start, under the real operator.

kopf runs the operator (KopfRunner) against the kmock emulator over real HTTP; the test plays the
Deployment controller and, for the new worker, the kubelet: the new Deployment never gets Ready
(a bad image, no GPU free) and its pod reports what a worker that fails at start leaves behind
(CrashLoopBackOff, lastState.terminated.message = the worker's `helios worker: error: ...` line).

GAPS (kmock, see kmock_support.py): no kubelet, scheduler or Deployment controller (the test writes
the Deployment status and the Pod itself), no schema validation, no garbage collection, selectors
ignored (the operator filters pods by label itself). Telemetry is scripted (tests/operator's World).
"""

from __future__ import annotations

import sys
import time
from typing import Any

import pytest
from tests.operator.kmock_support import FakeCluster, fake_cluster  # noqa: F401  (the fixture)
from tests.operator.test_operator_kmock import (  # noqa: F401  (operator_env is a fixture)
    HD,
    NS,
    World,
    _service,
    _serving,
    _status,
    _workers,
    operator_env,
)
from tests.support.bodies import hd_body

from helios_operator.core import names

pytestmark = pytest.mark.timeout(60)

ERROR_LINE = "helios worker: error: --layers 40: the model at /models/big has 12 layers"


def _crashing_pod(worker: str, candidate: str) -> dict[str, Any]:
    terminated = {"exitCode": 2, "reason": "Error", "message": f"Traceback is not printed\n{ERROR_LINE}\n"}
    return {
        "metadata": {
            "name": f"{worker}-7d9f-x1",
            "namespace": NS,
            "labels": {names.LABEL_DEPLOYMENT: HD, names.LABEL_WORKER: worker, names.LABEL_CANDIDATE: candidate},
        },
        "status": {
            "phase": "Running",
            "containerStatuses": [
                {
                    "name": "worker",
                    "ready": False,
                    "restartCount": 3,
                    "state": {"waiting": {"reason": "CrashLoopBackOff", "message": "back-off 40s restarting"}},
                    "lastState": {"terminated": terminated},
                }
            ],
        },
    }


def _condition(cluster: FakeCluster, type_: str) -> dict[str, Any] | None:
    return next((c for c in _status(cluster).get("conditions", []) if c["type"] == type_), None)


def test_a_new_worker_that_never_gets_ready_is_rolled_back_with_its_error_and_no_downtime(
    operator_env: tuple[FakeCluster, World],  # noqa: F811
) -> None:
    cluster, world = operator_env
    assert world.deployment_controller is not None
    cluster.create(cluster.hd_path(NS), hd_body(HD, NS, rollout={"readyTimeoutSeconds": 3}))
    first = cluster.wait_for("serving", lambda: _serving(cluster))["active"]
    world.deployment_controller.never_ready = lambda name: name != first["worker"]

    world.breach[first["worker"]] = 0.9  # the policy picks a new (candidate, depth): it never gets Ready
    target = cluster.wait_for("a switch", lambda: _status(cluster).get("target"))
    started = time.monotonic()
    cluster.create(f"/api/v1/namespaces/{NS}/pods", _crashing_pod(target["worker"], target["candidate"]))

    def service_on_a_ready_worker() -> None:
        svc = _service(cluster)
        assert svc is not None and svc["spec"]["selector"][names.LABEL_POOL] == first["worker"]
        assert (_workers(cluster)[first["worker"]].get("status") or {}).get("readyReplicas", 0) >= 1

    def degraded() -> dict[str, Any] | None:
        service_on_a_ready_worker()
        c = _condition(cluster, "Degraded")
        return c if c and c["reason"] == "WorkerFailed" else None

    failed = cluster.wait_for("Degraded=WorkerFailed", degraded)
    assert failed["status"] == "True"
    assert f"worker {target['worker']} ({target['candidate']} at {target['depth']} layers)" in failed["message"]
    assert ERROR_LINE in failed["message"] and "exited with code 2" in failed["message"]
    events = cluster.items(f"/api/v1/namespaces/{NS}/events")
    assert [e["type"] for e in events if e.get("reason") == "WorkerFailed"] == ["Warning"]

    def rolled_back() -> dict[str, Any] | None:
        service_on_a_ready_worker()
        st = _status(cluster)
        last = (st.get("decisions") or [{}])[-1]
        return st if last.get("trigger") == "rollback" and st.get("phase") == "Serving" else None

    st = cluster.wait_for("the rollback", rolled_back)
    took = time.monotonic() - started
    print(f"\nnever-Ready target rolled back {took:.1f}s after it was created (timeout 3s)", file=sys.__stdout__)
    assert st["active"] == first and not st.get("target")
    reason = st["decisions"][-1]["reason"]
    assert "was not Ready within 3s" in reason and ERROR_LINE in reason and "keeps serving" in reason
    cluster.wait_for("the target deleted", lambda: set(_workers(cluster)) == {first["worker"]})
    service_on_a_ready_worker()
    events = cluster.items(f"/api/v1/namespaces/{NS}/events")
    assert any(e.get("reason") == "RolledBack" and e["type"] == "Warning" for e in events)
    # No retry storm: after the rollback the breach does not start the same switch again.
    calls = world.calls
    cluster.wait_for("more reconciles", lambda: world.calls >= calls + 5)
    st = _status(cluster)
    assert st["phase"] == "Serving" and not st.get("target") and set(_workers(cluster)) == {first["worker"]}
