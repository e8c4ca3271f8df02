"""The operator's own Prometheus metrics; the chart's PrometheusRule alerts on the first two.

They live in their own registry so the operator's /metrics carries only these (plus process
metrics where the caller adds them), and tests can read them without global state leaking.
"""

from __future__ import annotations

import contextlib
from wsgiref.simple_server import WSGIServer

from prometheus_client import CollectorRegistry, Counter, Gauge, start_http_server

from helios_operator.core.types import Status, TelemetrySnapshot

REGISTRY = CollectorRegistry(auto_describe=True)

ROLLOUT_IN_PROGRESS = Gauge(
    "helios_operator_rollout_in_progress",
    "1 while a HeliosDeployment is switching workers (alert when it stays 1 too long).",
    ["namespace", "deployment"],
    registry=REGISTRY,
)
METRICS_AVAILABLE = Gauge(
    "helios_operator_metrics_available",
    "1 when the operator could read the workers' telemetry on its last reconcile, else 0.",
    ["namespace", "deployment"],
    registry=REGISTRY,
)
RECONCILE_TOTAL = Counter(
    "helios_operator_reconcile_total",
    "Reconciles, by result: ok | spec_error | platform_error | error.",
    ["result"],
    registry=REGISTRY,
)
RECONCILE_RESULTS = ("ok", "spec_error", "platform_error", "error")
for _result in RECONCILE_RESULTS:
    RECONCILE_TOTAL.labels(_result)  # export zeros so rate() works from the first scrape


def record_reconcile(
    namespace: str, name: str, status: Status | None, telemetry: TelemetrySnapshot | None, result: str
) -> None:
    RECONCILE_TOTAL.labels(result).inc()
    if status is not None:
        ROLLOUT_IN_PROGRESS.labels(namespace, name).set(1 if status.phase == "Switching" else 0)
    if telemetry is not None:
        METRICS_AVAILABLE.labels(namespace, name).set(1 if telemetry.available else 0)


def forget(namespace: str, name: str) -> None:
    """Drop a deleted HeliosDeployment's series so alerts do not fire on ghosts."""
    for gauge in (ROLLOUT_IN_PROGRESS, METRICS_AVAILABLE):
        with contextlib.suppress(KeyError):
            gauge.remove(namespace, name)


def serve(port: int, addr: str) -> WSGIServer | None:
    """Serve REGISTRY on http://addr:port/metrics in a daemon thread; port 0: not served (None)."""
    if port == 0:
        return None
    server, _thread = start_http_server(port, addr=addr, registry=REGISTRY)
    return server
