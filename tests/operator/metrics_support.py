"""A stand-in worker for telemetry tests: a real prometheus_client HTTP exporter of the contract metrics.

It serves exactly the names, labels and buckets of helios_worker.contract, filled with values the
test chose, so the operator's arithmetic (agreement, first-confident shares, tokens/s) can be checked
against known answers. The real worker processes are used where the test says so.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from wsgiref.simple_server import WSGIServer

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, start_http_server

from helios_worker import contract as c


@dataclass(frozen=True)
class FakeProfile:
    """What one worker measured; agreement/depth_agreement/first_confident are token counts."""

    model_layers: int
    tokens: int
    requests: int
    agreement: Sequence[int]  # per layer 1..N
    depth_agreement: Sequence[int]  # per layer 1..N
    first_confident: Sequence[int]  # tokens first confident at layer 1..N+1
    decode_seconds: float
    layer_weight_bytes: float = 1000.0
    fixed_weight_bytes: float = 5000.0
    kv_bytes_per_token: float = 64.0  # over the loaded layers
    energy_joules: float | None = None


class ContractExporter:
    """A registry with every contract metric, served on a free loopback port."""

    def __init__(self, deployment: str, candidate: str, depth: int, *, profile: bool) -> None:
        self.registry = CollectorRegistry()
        self.base = {c.LABEL_DEPLOYMENT: deployment, c.LABEL_CANDIDATE: candidate, c.LABEL_DEPTH: str(depth)}
        self.depth = depth
        self.profile = profile
        self.metrics: dict[str, Counter | Gauge | Histogram] = {}
        for m in c.ALL_METRICS:
            labels = [*c.BASE_LABELS, *m.extra_labels]
            if m.kind == "counter":
                self.metrics[m.name] = Counter(m.name, m.help, labels, registry=self.registry)
            elif m.kind == "gauge":
                self.metrics[m.name] = Gauge(m.name, m.help, labels, registry=self.registry)
            else:
                buckets = c.layer_buckets(depth) if "layer" in m.name else c.LATENCY_BUCKETS
                self.metrics[m.name] = Histogram(m.name, m.help, labels, buckets=buckets, registry=self.registry)
        self.gauge(
            c.WORKER_INFO,
            1,
            model="/models/x",
            profile="true" if profile else "false",
            device="cpu",
            dtype="float32",
            exits="trained",
        )
        self.gauge(c.LOADED_LAYERS, depth)
        self._server: WSGIServer | None = None

    def counter(self, metric: c.Metric, amount: float, **extra: str) -> None:
        m = self.metrics[metric.name]
        assert isinstance(m, Counter)
        m.labels(**self.base, **extra).inc(amount)

    def gauge(self, metric: c.Metric, value: float, **extra: str) -> None:
        m = self.metrics[metric.name]
        assert isinstance(m, Gauge)
        m.labels(**self.base, **extra).set(value)

    def observe(self, metric: c.Metric, value: float, times: int = 1) -> None:
        m = self.metrics[metric.name]
        assert isinstance(m, Histogram)
        for _ in range(times):
            m.labels(**self.base).observe(value)

    def serve(self, tokens: int, requests: int, breach_ratio: float = 0.0, window_tokens: float = 100.0) -> None:
        self.counter(c.GENERATED_TOKENS, tokens)
        self.counter(c.REQUESTS, requests, status=c.STATUS_OK)
        self.counter(c.REQUESTS, 1, status=c.STATUS_ERROR)
        self.gauge(c.BREACH_WINDOW_RATIO, breach_ratio)
        self.gauge(c.BREACH_WINDOW_TOKENS, window_tokens)

    def set_profile(self, p: FakeProfile) -> None:
        self.gauge(c.MODEL_LAYERS, p.model_layers)
        self.counter(c.PROFILED_TOKENS, p.tokens)
        self.counter(c.PROFILED_REQUESTS, p.requests)
        for layer, n in enumerate(p.agreement, start=1):
            self.counter(c.LAYER_AGREEMENT, n, layer=str(layer))
        for layer, n in enumerate(p.depth_agreement, start=1):
            self.counter(c.DEPTH_AGREEMENT, n, layer=str(layer))
        for layer, n in enumerate(p.first_confident, start=1):
            self.observe(c.FIRST_CONFIDENT_LAYER, layer, n)
        self.counter(c.DECODE_SECONDS, p.decode_seconds)
        self.gauge(c.LAYER_WEIGHT_BYTES, p.layer_weight_bytes)
        self.gauge(c.RESIDENT_WEIGHT_BYTES, p.fixed_weight_bytes + self.depth * p.layer_weight_bytes)
        self.gauge(c.KV_BYTES_PER_TOKEN, p.kv_bytes_per_token)
        if p.energy_joules is not None:
            self.counter(c.ENERGY_JOULES, p.energy_joules)

    def start(self) -> str:
        self._server, _ = start_http_server(0, addr="127.0.0.1", registry=self.registry)
        return f"http://127.0.0.1:{self._server.server_port}"

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None
