"""Telemetry: the workers' series -> a typed TelemetrySnapshot, through Prometheus or a direct scrape.

Both paths produce the same flat list of `Sample`s, keyed by the `worker` label (the worker
Deployment's name), and one pure function, `build_snapshot`, turns them into a snapshot:

- In Kubernetes the ServiceMonitor (resources.service_monitor) relabels the pod label
  `helios.dev/worker` into `worker` and keeps `namespace`; `query_prometheus` asks its HTTP API (with a timeout).
- For local runs `scrape_workers` reads each worker's /metrics itself and attaches `worker`.

Nothing here ever raises for bad telemetry: no series -> reason Missing, samples older than
`stale_after_s` -> Stale, HTTP errors / timeouts / garbage -> PrometheusError. The policy never
rolls on a snapshot that is not Ok.
"""

from __future__ import annotations

import math
import re
import time
from collections import defaultdict
from collections.abc import Awaitable, Callable, Iterable, Mapping
from dataclasses import dataclass, replace
from typing import Any

import httpx
from prometheus_client.parser import text_string_to_metric_families

from helios_operator.core import manifests, names
from helios_operator.core.types import CandidateProfile, HeliosSpec, TelemetrySnapshot, WorkerTelemetry
from helios_worker import contract as c

WORKER_LABEL = names.SERIES_WORKER  # attached by Prometheus relabelling (or by scrape_workers)
NAMESPACE_LABEL = names.SERIES_NAMESPACE  # attached by Prometheus for Kubernetes targets

# (namespace, HeliosDeployment name, spec) -> snapshot: what the controller calls each reconcile.
TelemetryProvider = Callable[[str, str, HeliosSpec], Awaitable[TelemetrySnapshot]]

_BUCKET = c.FIRST_CONFIDENT_LAYER.name + "_bucket"
_COUNT = c.FIRST_CONFIDENT_LAYER.name + "_count"
# Every series the snapshot reads; queried by exactly these names.
QUERIED_SERIES: tuple[str, ...] = (
    c.GENERATED_TOKENS.series,
    c.REQUESTS.series,
    c.BREACH_WINDOW_RATIO.series,
    c.BREACH_WINDOW_TOKENS.series,
    c.MODEL_LAYERS.series,
    c.LOADED_LAYERS.series,
    c.PROFILED_TOKENS.series,
    c.PROFILED_REQUESTS.series,
    c.LAYER_AGREEMENT.series,
    c.DEPTH_AGREEMENT.series,
    _BUCKET,
    _COUNT,
    c.DECODE_SECONDS.series,
    c.ENERGY_JOULES.series,
    c.RESIDENT_WEIGHT_BYTES.series,
    c.LAYER_WEIGHT_BYTES.series,
    c.KV_BYTES_PER_TOKEN.series,
    c.WORKER_INFO.series,
)


@dataclass(frozen=True)
class Sample:
    name: str
    labels: Mapping[str, str]
    value: float
    timestamp: float  # epoch seconds of the newest scrape behind this value


class TelemetryError(Exception):
    """Prometheus (or a worker's /metrics) could not be read; becomes reason PrometheusError."""


# ---------------------------------------------------------------------------------------------
# Samples -> snapshot (pure)


def build_snapshot(samples: Iterable[Sample], *, now: float, stale_after_s: float, source: str) -> TelemetrySnapshot:
    by_worker: dict[str, list[Sample]] = defaultdict(list)
    unlabelled = 0
    for s in samples:
        if math.isnan(s.value):
            continue
        worker = s.labels.get(WORKER_LABEL)
        if worker:
            by_worker[worker].append(s)
        else:
            unlabelled += 1
    if not by_worker:
        if unlabelled:
            return TelemetrySnapshot(
                "Missing",
                f"{unlabelled} helios series from {source} carry no `{WORKER_LABEL}` label; relabel the pod label"
                f" helios.dev/worker into `{WORKER_LABEL}` (the ServiceMonitor the operator creates does)",
            )
        return TelemetrySnapshot("Missing", f"no helios series in {source}")
    fresh: list[WorkerTelemetry] = []
    stale: list[str] = []
    for worker, series in sorted(by_worker.items()):
        newest = max(s.timestamp for s in series)
        if now - newest > stale_after_s:
            stale.append(f"{worker} ({now - newest:.0f}s old)")
            continue
        telemetry = _worker_telemetry(worker, series)
        if telemetry is not None:
            fresh.append(telemetry)
    if not fresh:
        if stale:
            return TelemetrySnapshot(
                "Stale", f"newest samples in {source} are older than {stale_after_s:.0f}s: {', '.join(stale)}"
            )
        return TelemetrySnapshot("Missing", f"no worker in {source} reports {c.GENERATED_TOKENS.series}")
    message = f"{len(fresh)} worker(s) from {source}" + (f"; stale: {', '.join(stale)}" if stale else "")
    return TelemetrySnapshot("Ok", message, tuple(fresh))


class _Series:
    """One worker's samples, aggregated over its pods."""

    def __init__(self, samples: list[Sample]) -> None:
        self.samples = samples

    def _matching(self, name: str, **labels: str) -> list[Sample]:
        return [s for s in self.samples if s.name == name and all(s.labels.get(k) == v for k, v in labels.items())]

    def has(self, name: str) -> bool:
        return any(s.name == name for s in self.samples)

    def sum(self, name: str, **labels: str) -> float:
        return sum(s.value for s in self._matching(name, **labels))

    def max(self, name: str, default: float = 0.0) -> float:
        values = [s.value for s in self._matching(name)]
        return max(values) if values else default

    def min(self, name: str, default: float = 0.0) -> float:
        values = [s.value for s in self._matching(name)]
        return min(values) if values else default

    def sum_by(self, name: str, label: str) -> dict[str, float]:
        out: dict[str, float] = defaultdict(float)
        for s in self._matching(name):
            if label in s.labels:
                out[s.labels[label]] += s.value
        return out

    def label(self, key: str) -> str | None:
        return next((s.labels[key] for s in self.samples if s.labels.get(key)), None)


def _worker_telemetry(worker: str, samples: list[Sample]) -> WorkerTelemetry | None:
    series = _Series(samples)
    if not series.has(c.GENERATED_TOKENS.series):
        return None
    candidate = series.label(c.LABEL_CANDIDATE) or ""
    try:
        depth = int(float(series.label(c.LABEL_DEPTH) or series.max(c.LOADED_LAYERS.series)))
    except ValueError:
        return None
    model_layers = int(series.max(c.MODEL_LAYERS.series, default=depth))
    generated = series.sum(c.GENERATED_TOKENS.series)
    profile = _profile(candidate, depth, model_layers, generated, series) if _is_profiling(series) else None
    return WorkerTelemetry(
        worker=worker,
        candidate=candidate,
        depth=depth,
        model_layers=model_layers,
        requests_ok=series.sum(c.REQUESTS.series, **{c.LABEL_STATUS: c.STATUS_OK}),
        generated_tokens=generated,
        breach_ratio=series.max(c.BREACH_WINDOW_RATIO.series),
        window_tokens=series.min(c.BREACH_WINDOW_TOKENS.series),
        profile=profile,
    )


def _is_profiling(series: _Series) -> bool:
    flag = series.label("profile")  # helios_worker_info{profile=...}
    if flag is not None:
        return flag.lower() in ("true", "1", "yes")
    return series.sum(c.PROFILED_TOKENS.series) > 0


def _profile(candidate: str, depth: int, model_layers: int, generated: float, series: _Series) -> CandidateProfile:
    n = model_layers
    tokens = series.sum(c.PROFILED_TOKENS.series)

    def shares(per_layer: Mapping[str, float]) -> tuple[float, ...]:
        by_layer = {int(float(k)): v for k, v in per_layer.items()}
        return tuple((by_layer.get(layer, 0.0) / tokens) if tokens > 0 else 0.0 for layer in range(1, n + 1))

    agreement = shares(series.sum_by(c.LAYER_AGREEMENT.series, c.LABEL_LAYER))
    depth_agreement = (
        shares(series.sum_by(c.DEPTH_AGREEMENT.series, c.LABEL_LAYER))
        if series.has(c.DEPTH_AGREEMENT.series)
        else agreement
    )
    decode_s = series.sum(c.DECODE_SECONDS.series)
    loaded = series.max(c.LOADED_LAYERS.series, default=float(depth)) or float(depth) or 1.0
    layer_bytes = series.max(c.LAYER_WEIGHT_BYTES.series)
    resident = series.max(c.RESIDENT_WEIGHT_BYTES.series)
    energy = series.sum(c.ENERGY_JOULES.series) if series.has(c.ENERGY_JOULES.series) else None
    return CandidateProfile(
        candidate=candidate,
        model_layers=n,
        profiled_tokens=int(tokens),
        profiled_requests=int(series.sum(c.PROFILED_REQUESTS.series)),
        agreement=agreement,
        depth_agreement=depth_agreement,
        first_confident=_first_confident(series, n),
        tokens_per_second=generated / decode_s if decode_s > 0 else 0.0,
        fixed_weight_bytes=max(resident - loaded * layer_bytes, 0.0),
        layer_weight_bytes=layer_bytes,
        kv_bytes_per_token_per_layer=series.max(c.KV_BYTES_PER_TOKEN.series) / loaded,
        joules_per_token=(energy / generated) if energy is not None and generated > 0 else None,
        exits=series.label("exits") or "",  # helios_worker_info{exits=...}: what the worker's exits are
    )


def _first_confident(series: _Series, n: int) -> tuple[float, ...]:
    """Share of tokens first confident at layer l = 1..N+1, from the cumulative `le` buckets."""
    cumulative: dict[float, float] = {}
    for le, value in series.sum_by(_BUCKET, "le").items():
        cumulative[float(le)] = value  # float("+Inf") works
    total = cumulative.get(math.inf) or series.sum(_COUNT)
    if total <= 0:
        return tuple(0.0 for _ in range(n + 1))
    out: list[float] = []
    previous = 0.0
    for layer in range(1, n + 2):
        at = cumulative.get(float(layer), previous)
        out.append(max(at - previous, 0.0) / total)
        previous = at
    return tuple(out)


# ---------------------------------------------------------------------------------------------
# Prometheus' HTTP API


def _quote(value: str) -> str:
    return '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'


def series_selector(deployment: str, namespace: str | None = None, names: tuple[str, ...] = QUERIED_SERIES) -> str:
    """The PromQL selector of the series the snapshot reads, for one HeliosDeployment."""
    pattern = "|".join(re.escape(n) for n in names)
    matchers = [f"__name__=~{_quote(pattern)}", f"{c.LABEL_DEPLOYMENT}={_quote(deployment)}"]
    if namespace is not None:
        matchers.append(f"{NAMESPACE_LABEL}={_quote(namespace)}")
    return "{" + ",".join(matchers) + "}"


def _parse_vector(payload: Any) -> list[tuple[dict[str, str], float]]:
    """Prometheus' `/api/v1/query` answer -> [(labels, value)]; TelemetryError on anything else."""
    if not isinstance(payload, dict) or payload.get("status") != "success":
        error = payload.get("error") if isinstance(payload, dict) else None
        raise TelemetryError(f"query failed: {error or str(payload)[:200]}")
    data = payload.get("data")
    if not isinstance(data, dict) or data.get("resultType") != "vector" or not isinstance(data.get("result"), list):
        raise TelemetryError(f"expected an instant vector, got {str(data)[:200]}")
    out: list[tuple[dict[str, str], float]] = []
    for item in data["result"]:
        try:
            labels = {str(k): str(v) for k, v in item["metric"].items()}
            out.append((labels, float(item["value"][1])))
        except (KeyError, IndexError, TypeError, ValueError) as err:
            raise TelemetryError(f"malformed sample {str(item)[:200]}: {err}") from err
    return out


async def _query(client: httpx.AsyncClient, base_url: str, promql: str) -> list[tuple[dict[str, str], float]]:
    response = await client.get(base_url.rstrip("/") + "/api/v1/query", params={"query": promql})
    is_json = response.headers.get("content-type", "").startswith("application/json")
    if response.status_code >= 400 and not is_json:  # Prometheus explains bad queries in JSON
        raise TelemetryError(f"HTTP {response.status_code}: {response.text[:200]}")
    try:
        payload = response.json()
    except ValueError as err:
        raise TelemetryError(f"not JSON: {response.text[:200]!r}") from err
    return _parse_vector(payload)


async def query_prometheus(
    prometheus_url: str,
    deployment: str,
    *,
    namespace: str | None = None,
    timeout_s: float = 5.0,
    stale_after_s: float = 120.0,
    now: float | None = None,
) -> TelemetrySnapshot:
    """One HeliosDeployment's workers, through Prometheus' HTTP API (two instant queries)."""
    selector = series_selector(deployment, namespace)
    source = f"Prometheus at {prometheus_url}"
    try:
        async with httpx.AsyncClient(timeout=timeout_s) as client:
            values = await _query(client, prometheus_url, selector)
            # timestamp() drops the name, so it must see one metric: every worker exports this one.
            heartbeat = series_selector(deployment, namespace, (c.GENERATED_TOKENS.series,))
            newest = await _query(client, prometheus_url, f"max by ({WORKER_LABEL}) (timestamp({heartbeat}))")
    except TelemetryError as err:
        return TelemetrySnapshot("PrometheusError", f"{source}: {err}")
    except httpx.HTTPError as err:
        return TelemetrySnapshot("PrometheusError", f"{source}: {type(err).__name__}: {err}")
    newest_by_worker = {labels.get(WORKER_LABEL, ""): ts for labels, ts in newest}
    clock = time.time() if now is None else now
    samples = [
        Sample(labels["__name__"], labels, value, newest_by_worker.get(labels.get(WORKER_LABEL, ""), clock))
        for labels, value in values
    ]
    return build_snapshot(samples, now=clock, stale_after_s=stale_after_s, source=source)


@dataclass(frozen=True)
class PrometheusTelemetry:
    """The operator's TelemetryProvider: spec.prometheus.url, else the operator-wide default."""

    default_url: str
    timeout_s: float = 5.0
    stale_after_s: float = 120.0
    filter_namespace: bool = True  # Kubernetes targets carry `namespace`; static local targets may not
    monitor_labels: tuple[tuple[str, str], ...] = ()  # on the operator's ServiceMonitors, named in the hint

    async def __call__(self, namespace: str, name: str, spec: HeliosSpec) -> TelemetrySnapshot:
        snapshot = await query_prometheus(
            spec.prometheus_url or self.default_url,
            name,
            namespace=namespace if self.filter_namespace else None,
            timeout_s=self.timeout_s,
            stale_after_s=self.stale_after_s,
        )
        if snapshot.reason != "Missing":
            return snapshot
        hint = manifests.scrape_hint(name, namespace, dict(self.monitor_labels))
        return replace(snapshot, message=f"{snapshot.message}. {hint}")


# ---------------------------------------------------------------------------------------------
# Direct scrape of the workers' /metrics (local runs)


def parse_exposition(text: str, worker: str, timestamp: float) -> list[Sample]:
    """Prometheus text format -> samples labelled with `worker`; TelemetryError on garbage."""
    out: list[Sample] = []
    try:
        for family in text_string_to_metric_families(text):
            for s in family.samples:
                if not s.name.startswith(c.PREFIX) or s.name not in QUERIED_SERIES:
                    continue
                labels = {**s.labels, WORKER_LABEL: worker, "__name__": s.name}
                out.append(Sample(s.name, labels, float(s.value), timestamp))
    except (ValueError, TypeError, IndexError) as err:
        raise TelemetryError(f"unparseable metrics: {err}") from err
    return out


def _metrics_url(endpoint: str) -> str:
    return endpoint if endpoint.rstrip("/").endswith("/metrics") else endpoint.rstrip("/") + "/metrics"


def scrape_workers(
    endpoints: Mapping[str, str], *, timeout_s: float = 2.0, stale_after_s: float = 120.0, now: float | None = None
) -> TelemetrySnapshot:
    """Read each endpoint's /metrics directly. `endpoints` maps a base URL (or a /metrics URL) to the
    worker Deployment's name it belongs to; several endpoints (replicas) may share one name.

    Any endpoint that cannot be read makes the whole snapshot PrometheusError: a partial view could
    make a worker look idle and the policy must not roll on it.
    """
    clock = time.time() if now is None else now
    samples: list[Sample] = []
    source = f"{len(endpoints)} scraped endpoint(s)"
    with httpx.Client(timeout=timeout_s) as client:
        for endpoint, worker in endpoints.items():
            url = _metrics_url(endpoint)
            try:
                response = client.get(url)
                response.raise_for_status()
                samples.extend(parse_exposition(response.text, worker, clock))
            except (httpx.HTTPError, TelemetryError) as err:
                return TelemetrySnapshot("PrometheusError", f"{url} (worker {worker}): {type(err).__name__}: {err}")
    return build_snapshot(samples, now=clock, stale_after_s=stale_after_s, source=source)
