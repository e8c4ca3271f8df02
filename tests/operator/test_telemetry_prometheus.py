"""A real Prometheus server scraping real worker processes on loopback.

The workers are the project's own trained tiny model served by helios_worker in profile mode; the
scrape config attaches the `worker` and `namespace` labels the chart's PodMonitor relabels in from
pod labels. The operator's PromQL must return the same exit distributions the workers export, and
a Prometheus stopped mid-test must yield MetricsAvailable=False and no roll.
"""

from __future__ import annotations

from pathlib import Path

import httpx
import pytest
import yaml

from helios_operator.adapters.prometheus import query_prometheus, scrape_workers
from helios_operator.core import reconcile
from helios_operator.core.types import (
    Candidate,
    HeliosSpec,
    Observed,
    ObservedWorker,
    Placement,
    Status,
    StepInput,
)
from helios_worker.serve import WorkerOptions
from tests.support.prometheus import PrometheusServer
from tests.support.workers import serve_worker

from .metrics_support import ContractExporter
from .test_telemetry import PROFILE

pytestmark = [pytest.mark.prometheus, pytest.mark.slow, pytest.mark.timeout(240)]

NS = "default"
HD = "chat"


def _prometheus(tmp_path: Path, targets: dict[str, str]) -> PrometheusServer:
    """The real Prometheus scraping host:port targets, each labelled with its worker (PodMonitor-style)."""
    prom = PrometheusServer(list(targets), tmp_path / "prom", "1s")
    config = yaml.safe_load(prom.config_path.read_text())
    config["scrape_configs"][0]["static_configs"] = [
        {"targets": [host], "labels": {"worker": worker, "namespace": NS}} for host, worker in targets.items()
    ]
    prom.config_path.write_text(yaml.safe_dump(config))
    prom.start()
    return prom


async def test_prometheus_path_computes_profiles_from_contract_series_and_reports_its_outage(tmp_path: Path) -> None:
    """Stand-in target with known numbers: a prometheus_client exporter of the contract metrics."""
    exporter = ContractExporter(HD, "small", 4, profile=True)
    exporter.set_profile(PROFILE)
    exporter.serve(tokens=200, requests=5, breach_ratio=0.1, window_tokens=100)
    host = exporter.start().removeprefix("http://")
    prom = _prometheus(tmp_path, {host: "chat-p1-small"})
    try:
        prom.wait_for('helios_generated_tokens_total{worker="chat-p1-small"}')
        snap = await query_prometheus(prom.url, HD, namespace=NS, timeout_s=5)
        assert snap.reason == "Ok", snap.message
        w = snap.worker("chat-p1-small")
        assert w is not None and w.profile is not None
        assert (w.candidate, w.depth, w.requests_ok) == ("small", 4, 5)
        assert w.profile.agreement == pytest.approx((0.5, 0.75, 0.95, 1.0))
        assert w.profile.first_confident == pytest.approx((0.2, 0.3, 0.25, 0.15, 0.1))
        assert w.profile.tokens_per_second == pytest.approx(50.0)
        assert (await query_prometheus(prom.url, "another", namespace=NS)).reason == "Missing"
        # Stale: the newest sample is older than stale_after_s (here: any sample is).
        assert (await query_prometheus(prom.url, HD, namespace=NS, stale_after_s=1e-6)).reason == "Stale"
        await _stopping_prometheus_blocks_rolls(prom)
    finally:
        prom.stop()
        exporter.stop()


def _complete(base_url: str, n: int) -> None:
    for i in range(n):
        r = httpx.post(f"{base_url}/v1/completions", json={"prompt": f"count {i} 1 2 3", "max_tokens": 8}, timeout=60)
        assert r.status_code == 200, r.text


async def test_prometheus_returns_the_workers_real_exit_distributions_and_an_outage_blocks_rolls(
    tiny_model_dir: Path, tmp_path: Path
) -> None:
    full = WorkerOptions(model=tiny_model_dir, profile=True, port=0, deployment=HD, candidate="tiny")
    with serve_worker(full) as url_a:
        _complete(url_a, 3)
        prom = _prometheus(tmp_path, {url_a.removeprefix("http://"): "chat-p1-tiny"})
        try:
            prom.wait_for(
                'helios_profiled_requests_total{worker="chat-p1-tiny"}', lambda r: r and float(r[0]["value"][1]) >= 3
            )
            via_prometheus = await query_prometheus(prom.url, HD, namespace=NS, timeout_s=5)
            direct = scrape_workers({url_a: "chat-p1-tiny"})
            assert via_prometheus.reason == "Ok", via_prometheus.message
            p_prom = via_prometheus.worker("chat-p1-tiny")
            p_direct = direct.worker("chat-p1-tiny")
            assert p_prom is not None and p_direct is not None
            assert p_prom.profile is not None and p_direct.profile is not None
            # Same counters, read two ways: the exit distributions agree exactly.
            assert p_prom.profile.profiled_tokens == p_direct.profile.profiled_tokens > 0
            assert p_prom.profile.agreement == pytest.approx(p_direct.profile.agreement)
            assert p_prom.profile.depth_agreement == pytest.approx(p_direct.profile.depth_agreement)
            assert p_prom.profile.first_confident == pytest.approx(p_direct.profile.first_confident)
            assert sum(p_prom.profile.first_confident) == pytest.approx(1.0)
            assert p_prom.profile.agreement[-1] == pytest.approx(1.0)  # the last layer agrees with itself
            assert p_prom.model_layers == len(p_prom.profile.agreement)
            # Another namespace's HeliosDeployment sees nothing of it.
            assert (await query_prometheus(prom.url, HD, namespace="other")).reason == "Missing"

            # Prometheus goes away mid-run: PrometheusError, MetricsAvailable=False, and the step
            # keeps serving from what it has instead of rolling.
            await _stopping_prometheus_blocks_rolls(prom)
        finally:
            prom.stop()


async def _stopping_prometheus_blocks_rolls(prom: PrometheusServer) -> None:
    """Prometheus goes away: PrometheusError, MetricsAvailable=False, and the step keeps serving."""
    prom.stop()
    outage = await query_prometheus(prom.url, HD, namespace=NS, timeout_s=1)
    assert outage.reason == "PrometheusError"
    result = reconcile.step(_serving_input(outage))
    metrics = result.status.condition("MetricsAvailable")
    assert metrics is not None and metrics.status == "False" and metrics.reason == "PrometheusError"
    assert result.status.phase == "Serving" and result.status.target is None
    assert [type(a).__name__ for a in result.actions if type(a).__name__ != "EmitEvent"] == []


def _serving_input(telemetry: object) -> StepInput:
    """A HeliosDeployment serving `tiny` at 4 of 6 layers, everything Ready."""
    from helios_operator.core.types import TelemetrySnapshot

    assert isinstance(telemetry, TelemetrySnapshot)
    spec = HeliosSpec(candidates=(Candidate("tiny", "/models/tiny", 6),))
    worker = ObservedWorker("chat-tiny-l4", "tiny", 4, "serve", "chat-tiny-l4", 1, 1, 0.0)
    status = Status(phase="Serving", active=Placement("tiny", 4, "chat-tiny-l4", "2026-01-01T00:00:00Z"))
    return StepInput(HD, 1, spec, status, Observed((worker,), "chat-tiny-l4"), telemetry, 1_000.0)
