"""The operator under faults: Prometheus stopped, slow or talking garbage; a worker killed mid-request.

Real parts: a real Prometheus (Debian's 2.42, a loopback process) scraping a real prometheus_client
exporter of the contract metrics (tests/operator/metrics_support.py: the numbers the test chose);
real loopback HTTP servers that answer too slowly or with garbage; PrometheusTelemetry's own HTTP
client with its timeout. The step each snapshot feeds is the real pure step (reconcile.step), over a
HeliosDeployment serving `tiny` at 4 of 6 layers whose worker reports a breach storm, so any
snapshot the operator wrongly trusted would start a switch.
"""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import replace
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
import yaml
from tests.operator.metrics_support import ContractExporter
from tests.operator.profiles import profile
from tests.support import prometheus as prometheus_support
from tests.support.prometheus import PrometheusServer

from helios_operator.adapters.prometheus import PrometheusTelemetry
from helios_operator.core import reconcile
from helios_operator.core.types import (
    Candidate,
    EmitEvent,
    HeliosSpec,
    Observed,
    ObservedWorker,
    Placement,
    Status,
    StepInput,
    StepResult,
    TelemetrySnapshot,
    WorkerTelemetry,
)

NS = "default"
HD = "chat"
ACTIVE = "chat-tiny-l4"
SPEC = HeliosSpec(candidates=(Candidate("tiny", "/models/tiny", 6),))
SERVING = Status(
    phase="Serving",
    active=Placement("tiny", 4, ACTIVE, "2026-01-01T00:00:00Z"),
    profiles=(profile("tiny", layers=6),),
)
WORKER = ObservedWorker(ACTIVE, "tiny", 4, "serve", ACTIVE, 1, 1, 0.0)


def _step(
    snapshot: TelemetrySnapshot, worker: ObservedWorker = WORKER, status: Status = SERVING, spec: HeliosSpec = SPEC
) -> StepResult:
    return reconcile.step(StepInput(HD, 1, spec, status, Observed((worker,), ACTIVE), snapshot, time.time()))


def _untouched(result: StepResult) -> None:
    """The active deployment stays as it is: still serving the same worker, no action but Events, no decision."""
    assert result.status.phase == "Serving" and result.status.active == SERVING.active
    assert result.status.target is None
    assert [a for a in result.actions if not isinstance(a, EmitEvent)] == []
    assert result.status.decisions == SERVING.decisions


def _metrics_condition(result: StepResult) -> tuple[str, str, str]:
    c = result.status.condition("MetricsAvailable")
    assert c is not None
    return c.status, c.reason, c.message


# ---------------------------------------------------------------------------------------------
# Prometheus faults


@contextmanager
def _bad_prometheus(*, delay_s: float = 0.0, body: bytes = b"") -> Iterator[str]:
    """A loopback HTTP server that answers every query after `delay_s` with `body` (HTTP 200)."""

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            time.sleep(delay_s)
            try:
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.end_headers()
                self.wfile.write(body)
            except OSError:
                pass  # the client gave up (its timeout)

        def log_message(self, *_: object) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    server.daemon_threads = True
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_port}"
    finally:
        server.shutdown()
        server.server_close()


@pytest.mark.timeout(30)
@pytest.mark.parametrize(
    ("fault", "delay_s", "body", "says"),
    [
        ("slow", 3.0, b'{"status":"success","data":{"resultType":"vector","result":[]}}', "Timeout"),
        ("garbage", 0.0, b"<html>502 Bad Gateway</html>", "prometheus"),
        ("wrong shape", 0.0, b'{"status":"success","data":{"resultType":"matrix","result":"x"}}', "prometheus"),
    ],
)
def test_a_slow_or_garbled_prometheus_leaves_the_active_deployment_as_it_is(
    fault: str, delay_s: float, body: bytes, says: str
) -> None:
    with _bad_prometheus(delay_s=delay_s, body=body) as url:
        telemetry = PrometheusTelemetry(url, timeout_s=0.5, stale_after_s=60)
        started = time.monotonic()
        snapshot = asyncio.run(telemetry(NS, HD, SPEC))
        took = time.monotonic() - started
    assert snapshot.reason == "PrometheusError", (fault, snapshot)
    assert says.lower() in snapshot.message.lower(), snapshot.message
    assert took < 2.5, f"the query timeout (0.5 s) did not bound the {fault} call: {took:.1f}s"
    result = _step(snapshot)
    _untouched(result)
    status, reason, message = _metrics_condition(result)
    assert (status, reason) == ("False", "PrometheusError") and message == snapshot.message


def _prometheus(tmp_path: Path, host: str) -> PrometheusServer:
    """Scrapes the exporter as the chart's ServiceMonitor would label it: worker and namespace."""
    prom = PrometheusServer([host], tmp_path / "prom", "1s")
    config = yaml.safe_load(prom.config_path.read_text())
    config["scrape_configs"][0]["static_configs"] = [{"targets": [host], "labels": {"worker": ACTIVE, "namespace": NS}}]
    prom.config_path.write_text(yaml.safe_dump(config))
    prom.start()
    return prom


async def _until_ok(telemetry: PrometheusTelemetry, timeout: float = 20.0) -> tuple[TelemetrySnapshot, float]:
    started = time.monotonic()
    while True:
        snapshot = await telemetry(NS, HD, SPEC)
        if snapshot.available or time.monotonic() - started > timeout:
            return snapshot, time.monotonic() - started
        await asyncio.sleep(0.25)


@pytest.mark.prometheus
@pytest.mark.timeout(90)
async def test_prometheus_stopped_and_restarted_metrics_available_false_then_recovers_by_itself(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    exporter = ContractExporter(HD, "tiny", 4, profile=False)
    exporter.serve(tokens=10_000, requests=40, breach_ratio=0.9, window_tokens=100)  # a breach storm
    prom = _prometheus(tmp_path, exporter.start().removeprefix("http://"))
    telemetry = PrometheusTelemetry(prom.url, timeout_s=1.0, stale_after_s=60)
    try:
        healthy, _ = await _until_ok(telemetry)
        assert healthy.available, healthy.message
        acting = _step(healthy)  # the storm is seen: the operator would act on it (here: a decision)
        assert len(acting.status.decisions) == 1 and acting.status.decisions[0].trigger == "breach"

        prom.stop()
        outage = await telemetry(NS, HD, SPEC)
        assert outage.reason == "PrometheusError"
        during = _step(outage)
        _untouched(during)
        status, reason, message = _metrics_condition(during)
        assert (status, reason) == ("False", "PrometheusError") and prom.url.split("//")[1] in message

        port = prom.port
        monkeypatch.setattr(prometheus_support, "free_port", lambda: port)  # back at the same address
        prom.start()
        back, took = await _until_ok(telemetry)
        print(f"\nPrometheus restarted: telemetry Ok again after {took:.1f}s")
        assert back.available, back.message
        after = _step(back, status=during.status)
        assert _metrics_condition(after)[:2] == ("True", "MetricsOk")
        assert after.status.decisions[-1].trigger == "breach"  # it acts again, with no one's help
    finally:
        prom.stop()
        exporter.stop()


# ---------------------------------------------------------------------------------------------
# A worker killed mid-request


def _storm(ratio: float = 0.9, window: float = 60.0) -> TelemetrySnapshot:
    """The dead worker's last scrape: counters cut mid-request, a half-filled window of breaches."""
    w = WorkerTelemetry(ACTIVE, "tiny", 4, 6, 37.0, 2_000.0, ratio, window)
    return TelemetrySnapshot("Ok", "last scrape before the kill", (w,))


@pytest.mark.timeout(10)
def test_a_killed_worker_marks_the_deployment_degraded_and_no_decision_comes_from_its_partial_telemetry() -> None:
    # The kubelet restarts the killed container: not Ready, lastState says it was killed (137).
    killed = replace(WORKER, ready_replicas=0, failure="pod chat-tiny-l4-x: container worker exited with code 137")
    full_window = replace(_storm(window=100.0).workers[0])
    for snapshot in (_storm(), TelemetrySnapshot("Ok", "", (full_window,))):
        result = _step(snapshot, worker=killed)
        _untouched(result)
        degraded = result.status.condition("Degraded")
        assert degraded is not None and (degraded.status, degraded.reason) == ("True", "WorkerFailed")
        assert ACTIVE in degraded.message and "137" in degraded.message
    # Its telemetry vanished (Prometheus dropped the target): MetricsAvailable=False, still Degraded.
    gone = _step(TelemetrySnapshot("Missing", "no helios series"), worker=replace(WORKER, ready_replicas=0))
    _untouched(gone)
    degraded = gone.status.condition("Degraded")
    assert degraded is not None and (degraded.status, degraded.reason) == ("True", "ReplicasUnavailable")
    assert _metrics_condition(gone)[:2] == ("False", "MetricsMissing")
    # One of two replicas killed: the surviving pod's numbers are partial too; wait for both.
    two = replace(WORKER, replicas=2, ready_replicas=1)
    _untouched(_step(TelemetrySnapshot("Ok", "", (full_window,)), worker=two, spec=replace(SPEC, replicas=2)))
    # Control: the same telemetry from a whole, Ready worker does lead to a decision.
    assert _step(TelemetrySnapshot("Ok", "", (full_window,))).status.decisions[-1].trigger == "breach"
