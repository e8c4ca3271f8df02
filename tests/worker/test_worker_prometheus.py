"""A real Prometheus server scrapes a real worker; PromQL over the exit histogram, breaches and the
breach-window ratio returns exactly what the worker's responses reported."""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from tests.support.prometheus import PrometheusServer, start_prometheus
from tests.support.workers import serve_worker

from helios_worker.serve import WorkerOptions

pytestmark = pytest.mark.prometheus
DEPTH = 3
SEL = '{deployment="prom-test",candidate="tiny",depth="3"}'


@pytest.fixture(scope="module")
def worker_url(tiny_model_dir: Path) -> Iterator[str]:
    options = WorkerOptions(
        model=tiny_model_dir, layers=DEPTH, deployment="prom-test", candidate="tiny", breach_window=10_000
    )
    with serve_worker(options) as url:
        yield url


@pytest.fixture(scope="module")
def served(worker_url: str) -> dict[str, object]:
    """Serve some requests; what their `helios` fields say, summed."""
    layers: Counter[int] = Counter()
    breaches = requests = 0
    for i in range(12):
        body = {"prompt": f"{i}*{i + 3}=", "max_tokens": 12, "temperature": 0}
        choice = httpx.post(f"{worker_url}/v1/completions", json=body, timeout=60).json()["choices"][0]
        layers.update(choice["helios"]["exit_layers"])
        breaches += choice["helios"]["breaches"]
        requests += 1
    return {"layers": layers, "tokens": sum(layers.values()), "breaches": breaches, "requests": requests}


@pytest.fixture(scope="module")
def prometheus(worker_url: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[PrometheusServer]:
    target = worker_url.removeprefix("http://")
    with start_prometheus([target], tmp_path_factory.mktemp("prom")) as server:
        yield server


def test_prometheus_scrapes_the_worker(prometheus: PrometheusServer, served: dict[str, object]) -> None:
    result = prometheus.wait_for(f"helios_generated_tokens_total{SEL}", lambda r: r and float(r[0]["value"][1]) > 0)
    assert result[0]["metric"]["job"] == "helios"
    [target] = prometheus.targets()
    assert target["health"] == "up"


def test_exit_histogram_in_promql_equals_the_served_exit_layers(
    prometheus: PrometheusServer, served: dict[str, object]
) -> None:
    tokens = served["tokens"]
    layers = served["layers"]
    assert isinstance(layers, Counter) and isinstance(tokens, int)
    prometheus.wait_for(f"helios_exit_layer_count{SEL} == {tokens}")
    for le in range(1, DEPTH + 1):
        expected = sum(n for layer, n in layers.items() if layer <= le)
        assert prometheus.query_value(f'helios_exit_layer_bucket{{deployment="prom-test",le="{le}.0"}}') == expected
    mean = sum(layer * n for layer, n in layers.items()) / tokens
    got = prometheus.query_value(f"helios_exit_layer_sum{SEL} / helios_exit_layer_count{SEL}")
    assert got == pytest.approx(mean)
    median = prometheus.query_value(f"histogram_quantile(0.5, sum by (le) (helios_exit_layer_bucket{SEL}))")
    assert median is not None and 0 < median <= DEPTH
    assert prometheus.query_value(f"helios_generated_tokens_total{SEL}") == tokens


def test_breaches_and_window_ratio_in_promql_equal_what_was_served(
    prometheus: PrometheusServer, served: dict[str, object]
) -> None:
    tokens, breaches, requests = served["tokens"], served["breaches"], served["requests"]
    assert isinstance(tokens, int) and isinstance(breaches, int)
    prometheus.wait_for(f"helios_generated_tokens_total{SEL} == {tokens}")
    assert prometheus.query_value(f"helios_confidence_breaches_total{SEL}") == breaches
    # The window (10,000 tokens) holds every token served, so its ratio is breaches / tokens.
    assert prometheus.query_value(f"helios_breach_window_ratio{SEL}") == pytest.approx(breaches / tokens)
    assert prometheus.query_value(f"helios_breach_window_tokens{SEL}") == tokens
    assert prometheus.query_value('helios_requests_total{deployment="prom-test",status="ok"}') == requests
    assert prometheus.query_value('helios_requests_total{deployment="prom-test",status="rejected"}') == 0
    assert prometheus.query_value(f"helios_loaded_layers{SEL}") == DEPTH


def test_restarted_prometheus_keeps_its_data_and_scrapes_again(
    prometheus: PrometheusServer, served: dict[str, object]
) -> None:
    tokens = served["tokens"]
    prometheus.wait_for(f"helios_generated_tokens_total{SEL} == {tokens}")
    prometheus.stop()
    assert not prometheus.running
    with pytest.raises(httpx.HTTPError):
        prometheus.query("up")
    prometheus.restart()
    prometheus.wait_for(f"max_over_time(helios_generated_tokens_total{SEL}[5m]) == {tokens}")
    prometheus.wait_for('up{job="helios"} == 1')
