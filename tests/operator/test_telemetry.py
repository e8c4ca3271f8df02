"""Telemetry without Prometheus: direct scrapes of real HTTP exporters, and the error paths.

The exporters are prometheus_client servers publishing the contract's metrics with values the test
chose (tests/operator/metrics_support.py), so every derived number has a known answer. The real
Prometheus binary and real workers are in test_telemetry_prometheus.py.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from helios_operator.adapters.prometheus import (
    PrometheusTelemetry,
    Sample,
    build_snapshot,
    query_prometheus,
    scrape_workers,
)
from helios_operator.core.types import HeliosSpec
from helios_worker import contract as c

from .metrics_support import ContractExporter, FakeProfile

PROFILE = FakeProfile(
    model_layers=4,
    tokens=200,
    requests=5,
    agreement=(100, 150, 190, 200),
    depth_agreement=(120, 170, 196, 200),
    first_confident=(40, 60, 50, 30, 20),  # layer 5 = N+1: never confident
    decode_seconds=4.0,
    layer_weight_bytes=1000.0,
    fixed_weight_bytes=5000.0,
    kv_bytes_per_token=256.0,
    energy_joules=50.0,
)


@pytest.fixture
def exporters() -> Iterator[list[ContractExporter]]:
    made: list[ContractExporter] = []
    yield made
    for e in made:
        e.stop()


def _profiling_exporter(made: list[ContractExporter], candidate: str = "small") -> ContractExporter:
    e = ContractExporter("demo", candidate, 4, profile=True)
    e.set_profile(PROFILE)
    e.serve(tokens=200, requests=5, breach_ratio=0.1, window_tokens=100)
    made.append(e)
    return e


def test_scrape_builds_the_candidate_profile_from_the_profiling_metrics(exporters: list[ContractExporter]) -> None:
    url = _profiling_exporter(exporters).start()
    snap = scrape_workers({url: "demo-small-4-p1"})
    assert snap.reason == "Ok", snap.message
    w = snap.worker("demo-small-4-p1")
    assert w is not None
    assert (w.candidate, w.depth, w.model_layers) == ("small", 4, 4)
    assert w.requests_ok == 5  # the one error request is not counted
    assert w.generated_tokens == 200
    assert w.breach_ratio == pytest.approx(0.1)
    p = w.profile
    assert p is not None
    assert p.profiled_tokens == 200 and p.profiled_requests == 5
    assert p.agreement == pytest.approx((0.5, 0.75, 0.95, 1.0))
    assert p.depth_agreement == pytest.approx((0.6, 0.85, 0.98, 1.0))
    assert p.first_confident == pytest.approx((0.2, 0.3, 0.25, 0.15, 0.1))
    assert p.tokens_per_second == pytest.approx(50.0)  # 200 tokens / 4 s
    assert p.layer_weight_bytes == 1000.0
    assert p.fixed_weight_bytes == pytest.approx(5000.0)  # resident - 4 layers
    assert p.kv_bytes_per_token_per_layer == pytest.approx(64.0)
    assert p.joules_per_token == pytest.approx(0.25)
    assert p.exits == "trained"  # helios_worker_info{exits}: the profile says what the worker's exits were
    assert type(p).from_dict(p.to_dict()) == p  # and status carries it


def test_replicas_of_one_worker_are_summed_and_the_worst_breach_ratio_wins(
    exporters: list[ContractExporter],
) -> None:
    a = ContractExporter("demo", "big", 6, profile=False)
    a.serve(tokens=300, requests=10, breach_ratio=0.2, window_tokens=100)
    b = ContractExporter("demo", "big", 6, profile=False)
    b.serve(tokens=100, requests=4, breach_ratio=0.7, window_tokens=40)
    exporters.extend([a, b])
    snap = scrape_workers({a.start(): "demo-big-6", b.start() + "/metrics": "demo-big-6"})
    assert snap.reason == "Ok", snap.message
    w = snap.worker("demo-big-6")
    assert w is not None
    assert (w.requests_ok, w.generated_tokens) == (14, 400)
    assert (w.breach_ratio, w.window_tokens) == (pytest.approx(0.7), 40)
    assert w.profile is None  # a serving worker reports no profile
    assert len(snap.workers) == 1


def test_two_workers_are_told_apart_by_the_endpoint_mapping(exporters: list[ContractExporter]) -> None:
    small = _profiling_exporter(exporters, "small")
    big = ContractExporter("demo", "big", 6, profile=False)
    big.serve(tokens=10, requests=1)
    exporters.append(big)
    snap = scrape_workers({small.start(): "w-small", big.start(): "w-big"})
    assert sorted(w.worker for w in snap.workers) == ["w-big", "w-small"]
    assert snap.worker("w-big").candidate == "big"  # type: ignore[union-attr]


def test_energy_is_absent_where_nvml_reports_none(exporters: list[ContractExporter]) -> None:
    e = ContractExporter("demo", "small", 4, profile=True)
    e.set_profile(FakeProfile(4, 10, 1, (5, 5, 5, 10), (5, 5, 5, 10), (1, 1, 1, 1, 6), 1.0))
    e.serve(tokens=10, requests=1)
    exporters.append(e)
    snap = scrape_workers({e.start(): "w"})
    assert snap.workers[0].profile is not None
    assert snap.workers[0].profile.joules_per_token is None


class _BadServer:
    """A loopback HTTP server that answers badly: garbage, errors, or too slowly."""

    def __init__(self, status: int, body: bytes, delay: float = 0.0, content_type: str = "text/plain") -> None:
        outer = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                time.sleep(outer.delay)
                self.send_response(outer.status)
                self.send_header("Content-Type", content_type)
                self.send_header("Content-Length", str(len(outer.body)))
                self.end_headers()
                self.wfile.write(outer.body)

            def log_message(self, *args: object) -> None:
                pass

        self.status, self.body, self.delay = status, body, delay
        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)
        self.thread.start()
        self.url = f"http://127.0.0.1:{self.httpd.server_port}"

    def close(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.mark.parametrize(
    ("status", "body", "delay"),
    [
        (200, b"helios_generated_tokens_total{worker=\n garbage {{{", 0.0),
        (500, b"internal error", 0.0),
        (200, b"helios_generated_tokens_total 1\n", 0.6),  # slower than the timeout
    ],
    ids=["garbage", "http-500", "timeout"],
)
def test_an_unreadable_worker_endpoint_is_a_prometheus_error(status: int, body: bytes, delay: float) -> None:
    server = _BadServer(status, body, delay)
    try:
        snap = scrape_workers({server.url: "w"}, timeout_s=0.2)
    finally:
        server.close()
    assert snap.reason == "PrometheusError"
    assert not snap.available and snap.workers == ()
    assert server.url in snap.message


def test_an_unreachable_worker_is_a_prometheus_error() -> None:
    server = _BadServer(200, b"")
    server.close()  # nothing listens on that port now
    snap = scrape_workers({server.url: "w"}, timeout_s=0.2)
    assert snap.reason == "PrometheusError"


@pytest.mark.parametrize(
    ("status", "body", "delay", "content_type"),
    [
        (200, b"<html>not prometheus</html>", 0.0, "text/html"),
        (502, b"bad gateway", 0.0, "text/plain"),
        (400, b'{"status":"error","errorType":"bad_data","error":"parse error"}', 0.0, "application/json"),
        (200, b'{"status":"success","data":{"resultType":"matrix","result":[]}}', 0.0, "application/json"),
        (200, b'{"status":"success","data":{"resultType":"vector","result":[]}}', 0.6, "application/json"),
    ],
    ids=["html", "http-502", "query-error", "wrong-result-type", "timeout"],
)
async def test_a_misbehaving_prometheus_is_a_prometheus_error_not_a_crash(
    status: int, body: bytes, delay: float, content_type: str
) -> None:
    server = _BadServer(status, body, delay, content_type)
    try:
        snap = await query_prometheus(server.url, "demo", namespace="ns", timeout_s=0.2)
    finally:
        server.close()
    assert snap.reason == "PrometheusError", snap
    assert server.url in snap.message


async def test_prometheus_without_series_is_missing() -> None:
    body = b'{"status":"success","data":{"resultType":"vector","result":[]}}'
    server = _BadServer(200, body, 0.0, "application/json")
    try:
        snap = await query_prometheus(server.url, "demo", timeout_s=1.0)
        spec = HeliosSpec.from_dict({"candidates": [{"name": "a", "model": "/m"}], "prometheus": {"url": server.url}})
        told = await PrometheusTelemetry("http://unused:9090", monitor_labels=(("release", "kps"),))(
            "team", "demo", spec
        )
    finally:
        server.close()
    assert snap.reason == "Missing"
    # What `kubectl describe hd` then says: which ServiceMonitor to select, by which labels, or the plain path.
    assert told.reason == "Missing" and told.message.startswith(snap.message)
    assert "ServiceMonitor team/demo-workers (labels" in told.message and "release=kps" in told.message
    assert "prometheus.io/scrape" in told.message


def _sample(name: str, value: float, ts: float, **labels: str) -> Sample:
    base = {"worker": "w", c.LABEL_CANDIDATE: "small", c.LABEL_DEPTH: "4", **labels}
    return Sample(name, base, value, ts)


def test_samples_older_than_stale_after_make_a_stale_snapshot() -> None:
    now = 10_000.0
    samples = [_sample(c.GENERATED_TOKENS.series, 5, now - 300)]
    assert build_snapshot(samples, now=now, stale_after_s=120, source="t").reason == "Stale"
    assert build_snapshot(samples, now=now, stale_after_s=600, source="t").reason == "Ok"


def test_a_stale_worker_is_left_out_while_fresh_ones_are_reported() -> None:
    now = 10_000.0
    samples = [
        _sample(c.GENERATED_TOKENS.series, 5, now - 300, worker="old"),
        _sample(c.GENERATED_TOKENS.series, 5, now - 1, worker="new"),
    ]
    snap = build_snapshot(samples, now=now, stale_after_s=120, source="t")
    assert snap.reason == "Ok"
    assert [w.worker for w in snap.workers] == ["new"]
    assert "old" in snap.message


def test_series_without_the_worker_label_are_missing_with_a_relabelling_hint() -> None:
    s = Sample(c.GENERATED_TOKENS.series, {c.LABEL_DEPTH: "4"}, 1.0, 0.0)
    snap = build_snapshot([s], now=1.0, stale_after_s=60, source="t")
    assert snap.reason == "Missing"
    assert "helios.dev/worker" in snap.message
    assert build_snapshot([], now=1.0, stale_after_s=60, source="t").reason == "Missing"


def test_nan_samples_are_ignored() -> None:
    samples = [
        _sample(c.GENERATED_TOKENS.series, 7, 1.0),
        _sample(c.BREACH_WINDOW_RATIO.series, float("nan"), 1.0),
    ]
    snap = build_snapshot(samples, now=1.0, stale_after_s=60, source="t")
    assert snap.workers[0].breach_ratio == 0.0
    assert snap.workers[0].generated_tokens == 7
