"""The worker's Prometheus metrics, built from the contract on a registry of its own.

`WorkerMetrics` is the engine's observer (the `EngineObserver` hooks) plus what the server and the
loader report: request outcomes, model sizes, live queue state. It imports no torch: GPU readings come
through a `GpuMeter` that the caller opens only where CUDA is present. Labels carry identity only,
never prompts or tokens.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from helios_worker import contract
from helios_worker.engine.api import Finished


@dataclass(frozen=True)
class WorkerIdentity:
    """Who this worker is: the label values of every series it emits."""

    deployment: str
    candidate: str
    depth: int
    model: str
    profile: bool = False
    device: str = "cpu"  # what it really serves on, after `auto` is resolved
    dtype: str = "float32"
    exits: str = "trained"  # the worker_info label: trained | adapters | off | untrained

    @property
    def base_labels(self) -> dict[str, str]:
        return {
            contract.LABEL_DEPLOYMENT: self.deployment,
            contract.LABEL_CANDIDATE: self.candidate,
            contract.LABEL_DEPTH: str(self.depth),
        }


@dataclass(frozen=True)
class ModelSizes:
    """Gauges the loader knows once the model is resident."""

    loaded_layers: int
    model_layers: int
    resident_weight_bytes: int
    layer_weight_bytes: int
    kv_cache_bytes: int
    kv_bytes_per_token: int


class GpuMeter(Protocol):
    """Device readings; None when the device cannot tell."""

    def energy_joules(self) -> float | None: ...

    def memory_used_bytes(self) -> int | None: ...


def finish_status(finished: Finished) -> str:
    """The requests_total{status} value of a request the engine finished."""
    if finished.finish_reason == "error":
        return contract.STATUS_ERROR
    if finished.finish_reason == "cancelled":
        return contract.STATUS_CLIENT_ERROR  # the client went away
    return contract.STATUS_OK


def _label_names(metric: contract.Metric) -> list[str]:
    return [*contract.BASE_LABELS, *metric.extra_labels]


def _short(metric: contract.Metric) -> str:
    """prometheus_client adds `_total` to counters itself."""
    return metric.name.removesuffix("_total")


class WorkerMetrics:
    """Every contract metric of one worker, pre-labelled, on `self.registry`."""

    def __init__(
        self,
        identity: WorkerIdentity,
        model_layers: int,
        registry: CollectorRegistry | None = None,
        gpu: GpuMeter | None = None,
    ) -> None:
        self.identity = identity
        self.registry = registry if registry is not None else CollectorRegistry(auto_describe=True)
        base = identity.base_labels
        self._base = base
        layers = contract.layer_buckets(model_layers)

        def histogram(metric: contract.Metric, buckets: Sequence[float]) -> Any:
            h = Histogram(metric.name, metric.help, _label_names(metric), registry=self.registry, buckets=buckets)
            return h.labels(**base)

        def counter(metric: contract.Metric) -> Any:
            return Counter(_short(metric), metric.help, _label_names(metric), registry=self.registry)

        def gauge(metric: contract.Metric) -> Any:
            return Gauge(metric.name, metric.help, _label_names(metric), registry=self.registry)

        self.exit_layer = histogram(contract.EXIT_LAYER, layers)
        self.breaches = counter(contract.CONFIDENCE_BREACHES).labels(**base)
        self.breach_ratio = gauge(contract.BREACH_WINDOW_RATIO).labels(**base)
        self.breach_window_tokens = gauge(contract.BREACH_WINDOW_TOKENS).labels(**base)
        self.generated_tokens = counter(contract.GENERATED_TOKENS).labels(**base)
        requests = counter(contract.REQUESTS)
        self.requests = {status: requests.labels(**base, status=status) for status in contract.REQUEST_STATUSES}
        self.ttft = histogram(contract.TIME_TO_FIRST_TOKEN, contract.LATENCY_BUCKETS)
        self.inter_token = histogram(contract.INTER_TOKEN_LATENCY, contract.LATENCY_BUCKETS)
        self.batch_size = histogram(contract.BATCH_SIZE, contract.BATCH_BUCKETS)
        self.running_batch = gauge(contract.RUNNING_BATCH).labels(**base)
        self.queue_length = gauge(contract.QUEUE_LENGTH).labels(**base)
        self.decode_seconds = counter(contract.DECODE_SECONDS).labels(**base)
        self._sizes = {
            m.name: gauge(m).labels(**base)
            for m in (
                contract.LOADED_LAYERS,
                contract.MODEL_LAYERS,
                contract.RESIDENT_WEIGHT_BYTES,
                contract.LAYER_WEIGHT_BYTES,
                contract.KV_CACHE_BYTES,
                contract.KV_BYTES_PER_TOKEN,
            )
        }
        self._sizes[contract.MODEL_LAYERS.name].set(model_layers)
        self._sizes[contract.LOADED_LAYERS.name].set(identity.depth)
        info = gauge(contract.WORKER_INFO)
        info.labels(
            **base,
            model=identity.model,
            profile=str(identity.profile).lower(),
            device=identity.device,
            dtype=identity.dtype,
            exits=identity.exits,
        ).set(1)

        self.profiling = identity.profile
        if identity.profile:  # profiling series exist only on a profiling worker
            self.first_confident = histogram(contract.FIRST_CONFIDENT_LAYER, layers)
            agreement = counter(contract.LAYER_AGREEMENT)
            depth_agreement = counter(contract.DEPTH_AGREEMENT)
            self.layer_agreement = {
                layer: agreement.labels(**base, layer=str(layer)) for layer in range(1, identity.depth + 1)
            }
            self.depth_agreement = {
                layer: depth_agreement.labels(**base, layer=str(layer)) for layer in range(1, identity.depth + 1)
            }
            self.profiled_tokens = counter(contract.PROFILED_TOKENS).labels(**base)
            self.profiled_requests = counter(contract.PROFILED_REQUESTS).labels(**base)
        if gpu is not None:
            self.registry.register(_GpuCollector(gpu, base))

    # --- what the loader and the server report -------------------------------------------------

    def set_model_sizes(self, sizes: ModelSizes) -> None:
        values = {
            contract.LOADED_LAYERS.name: sizes.loaded_layers,
            contract.MODEL_LAYERS.name: sizes.model_layers,
            contract.RESIDENT_WEIGHT_BYTES.name: sizes.resident_weight_bytes,
            contract.LAYER_WEIGHT_BYTES.name: sizes.layer_weight_bytes,
            contract.KV_CACHE_BYTES.name: sizes.kv_cache_bytes,
            contract.KV_BYTES_PER_TOKEN.name: sizes.kv_bytes_per_token,
        }
        for name, value in values.items():
            self._sizes[name].set(value)

    def bind_live_state(self, queue_length: Callable[[], int], running: Callable[[], int]) -> None:
        """Read queue and batch occupancy at scrape time, so an idle worker reports 0, not its last step."""
        self.queue_length.set_function(lambda: float(queue_length()))
        self.running_batch.set_function(lambda: float(running()))

    def record_request(self, status: str) -> None:
        """A request the engine never saw (rejected or malformed); the engine's own go through on_finished."""
        self.requests[status].inc()

    # --- EngineObserver ------------------------------------------------------------------------

    def on_step(self, batch_size: int, queue_length: int, seconds: float) -> None:
        self.batch_size.observe(batch_size)
        self.decode_seconds.inc(max(seconds, 0.0))

    def on_token(self, exit_layer: int, breach: bool, breach_ratio: float, window_tokens: int) -> None:
        self.exit_layer.observe(exit_layer)
        self.generated_tokens.inc()
        if breach:
            self.breaches.inc()
        self.breach_ratio.set(breach_ratio)
        self.breach_window_tokens.set(window_tokens)

    def on_profile_token(
        self, first_confident_layer: int, agreeing_layers: tuple[int, ...], agreeing_depths: tuple[int, ...]
    ) -> None:
        if not self.profiling:
            return
        self.first_confident.observe(first_confident_layer)
        self.profiled_tokens.inc()
        for layer in agreeing_layers:
            child = self.layer_agreement.get(layer)
            if child is not None:
                child.inc()
        for depth in agreeing_depths:
            child = self.depth_agreement.get(depth)
            if child is not None:
                child.inc()

    def on_first_token(self, seconds: float) -> None:
        self.ttft.observe(seconds)

    def on_inter_token(self, seconds: float) -> None:
        self.inter_token.observe(seconds)

    def on_finished(self, finished: Finished, profiled: bool) -> None:
        self.requests[finish_status(finished)].inc()
        if profiled and self.profiling:
            self.profiled_requests.inc()


class _GpuCollector(Collector):
    """GPU series at scrape time; absent, not zero, when the device gives no reading."""

    def __init__(self, gpu: GpuMeter, base: dict[str, str]) -> None:
        self._gpu = gpu
        self._names = list(base)
        self._values = list(base.values())
        self._energy_start = gpu.energy_joules()

    def collect(self) -> Iterator[Metric]:
        energy = self._gpu.energy_joules()
        if energy is not None and self._energy_start is not None:
            energy_metric = contract.ENERGY_JOULES
            family = CounterMetricFamily(_short(energy_metric), energy_metric.help, labels=self._names)
            family.add_metric(self._values, max(energy - self._energy_start, 0.0))
            yield family
        memory = self._gpu.memory_used_bytes()
        if memory is not None:
            gauge = GaugeMetricFamily(
                contract.GPU_MEMORY_USED_BYTES.name, contract.GPU_MEMORY_USED_BYTES.help, labels=self._names
            )
            gauge.add_metric(self._values, float(memory))
            yield gauge

    def describe(self) -> Iterator[Metric]:
        return iter(())


class NvmlMeter:
    """Energy and memory of one GPU through NVML (nvidia-ml-py)."""

    def __init__(self, nvml: Any, handle: Any) -> None:
        self._nvml = nvml
        self._handle = handle

    @classmethod
    def open(cls, device_index: int = 0) -> NvmlMeter | None:
        """None where NVML is missing or has no such device: the GPU series are then absent."""
        try:
            import pynvml

            pynvml.nvmlInit()
            return cls(pynvml, pynvml.nvmlDeviceGetHandleByIndex(device_index))
        except Exception:  # no driver, no library, no device: all mean "cannot tell"
            return None

    def energy_joules(self) -> float | None:
        try:
            return float(self._nvml.nvmlDeviceGetTotalEnergyConsumption(self._handle)) / 1000.0  # mJ
        except Exception:  # older GPUs do not report energy
            return None

    def memory_used_bytes(self) -> int | None:
        try:
            return int(self._nvml.nvmlDeviceGetMemoryInfo(self._handle).used)
        except Exception:
            return None
