"""The telemetry contract: every metric name, label key and bucket layout, in one place.

The worker emits these and the operator queries them; dashboards and alerts depend on the names.
This module imports nothing heavy (no torch, no framework) so the operator image can use it.
"""

from __future__ import annotations

from dataclasses import dataclass

PREFIX = "helios_"

# Label keys on every worker series.
LABEL_DEPLOYMENT = "deployment"
LABEL_CANDIDATE = "candidate"
LABEL_DEPTH = "depth"
BASE_LABELS: tuple[str, ...] = (LABEL_DEPLOYMENT, LABEL_CANDIDATE, LABEL_DEPTH)
# Extra label keys on some series.
LABEL_LAYER = "layer"
LABEL_STATUS = "status"

# Request outcomes for helios_requests_total{status}.
STATUS_OK = "ok"
STATUS_CLIENT_ERROR = "client_error"
STATUS_REJECTED = "rejected"  # queue full (429) or draining (503)
STATUS_ERROR = "error"
REQUEST_STATUSES: tuple[str, ...] = (STATUS_OK, STATUS_CLIENT_ERROR, STATUS_REJECTED, STATUS_ERROR)

# Latency buckets (seconds): CPU test models sit at the low end, 70B-class models at the high end.
LATENCY_BUCKETS: tuple[float, ...] = (
    0.001,
    0.0025,
    0.005,
    0.01,
    0.025,
    0.05,
    0.075,
    0.1,
    0.25,
    0.5,
    1.0,
    2.5,
    5.0,
    10.0,
    30.0,
)
BATCH_BUCKETS: tuple[float, ...] = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512)
MAX_LAYER_BUCKET = 128


def layer_buckets(model_layers: int) -> tuple[float, ...]:
    """One bucket per layer (1..N+1): `le="l"` counts tokens that exited at or before layer l.

    N+1 is the "never confident" value of helios_first_confident_layer.
    """
    top = min(model_layers + 1, MAX_LAYER_BUCKET)
    return tuple(float(layer) for layer in range(1, top + 1))


@dataclass(frozen=True)
class Metric:
    """A metric's name (without the `_total`/`_bucket` suffixes Prometheus adds), type and help."""

    name: str
    kind: str  # counter | gauge | histogram
    help: str
    extra_labels: tuple[str, ...] = ()

    @property
    def series(self) -> str:
        """The name as it appears in PromQL (counters get `_total`)."""
        return f"{self.name}_total" if self.kind == "counter" else self.name


def _m(name: str, kind: str, help: str, extra: tuple[str, ...] = ()) -> Metric:
    return Metric(PREFIX + name, kind, help, extra)


EXIT_LAYER = _m("exit_layer", "histogram", "Layer (1-based) each emitted token exited at.")
FIRST_CONFIDENT_LAYER = _m(
    "first_confident_layer",
    "histogram",
    "Profiling: first layer whose exit confidence passed the threshold (depth+1 when none did).",
)
LAYER_AGREEMENT = _m(
    "layer_agreement",
    "counter",
    "Profiling: tokens whose exit token at `layer` equals the final layer's token.",
    (LABEL_LAYER,),
)
DEPTH_AGREEMENT = _m(
    "depth_agreement",
    "counter",
    "Profiling: tokens that early-exit decoding truncated at depth `layer` (exit at the first confident"
    " layer, else at `layer`) would emit equal to the final layer's token: the accuracy of depth `layer`.",
    (LABEL_LAYER,),
)
PROFILED_TOKENS = _m("profiled_tokens", "counter", "Profiling: tokens generated at full depth.")
PROFILED_REQUESTS = _m("profiled_requests", "counter", "Profiling: requests completed at full depth.")
CONFIDENCE_BREACHES = _m(
    "confidence_breaches", "counter", "Tokens still unconfident at the last loaded layer, emitted anyway."
)
BREACH_WINDOW_RATIO = _m(
    "breach_window_ratio", "gauge", "Breaches among the last breachWindow emitted tokens, as a ratio."
)
BREACH_WINDOW_TOKENS = _m("breach_window_tokens", "gauge", "Tokens currently in the breach window.")
GENERATED_TOKENS = _m("generated_tokens", "counter", "Tokens emitted.")
REQUESTS = _m("requests", "counter", "Requests finished, by outcome.", (LABEL_STATUS,))
TIME_TO_FIRST_TOKEN = _m("time_to_first_token_seconds", "histogram", "Arrival to first emitted token.")
INTER_TOKEN_LATENCY = _m("inter_token_latency_seconds", "histogram", "Time between emitted tokens.")
BATCH_SIZE = _m("batch_size", "histogram", "Rows in each decode step of the running batch.")
RUNNING_BATCH = _m("running_batch", "gauge", "Rows in the running batch now.")
QUEUE_LENGTH = _m("queue_length", "gauge", "Requests waiting to join the batch.")
LOADED_LAYERS = _m("loaded_layers", "gauge", "Decoder layers resident (L).")
MODEL_LAYERS = _m("model_layers", "gauge", "Decoder layers the model has (N).")
RESIDENT_WEIGHT_BYTES = _m("resident_weight_bytes", "gauge", "Bytes of weights resident.")
LAYER_WEIGHT_BYTES = _m("layer_weight_bytes", "gauge", "Bytes of weights of one decoder layer.")
KV_CACHE_BYTES = _m("kv_cache_bytes", "gauge", "Bytes of KV cache allocated.")
KV_BYTES_PER_TOKEN = _m("kv_bytes_per_token", "gauge", "KV cache bytes one token takes over the loaded layers.")
GPU_MEMORY_USED_BYTES = _m("gpu_memory_used_bytes", "gauge", "GPU memory in use on the worker's device (NVML).")
ENERGY_JOULES = _m("energy_joules", "counter", "GPU energy in joules, where NVML reports it.")
DECODE_SECONDS = _m("decode_seconds", "counter", "Wall time spent in decode steps.")
# exits: trained | adapters (exits inside the stack on) | off (a checkpoint without trained exits
# serves the tokens of its last loaded layer) | untrained (exits forced on with --exits on).
WORKER_INFO = _m(
    "worker_info",
    "gauge",
    "Always 1; labels carry the worker's identity, where it serves and whether its exits are on.",
    ("model", "profile", "device", "dtype", "exits"),
)

ALL_METRICS: tuple[Metric, ...] = (
    EXIT_LAYER,
    FIRST_CONFIDENT_LAYER,
    LAYER_AGREEMENT,
    DEPTH_AGREEMENT,
    PROFILED_TOKENS,
    PROFILED_REQUESTS,
    CONFIDENCE_BREACHES,
    BREACH_WINDOW_RATIO,
    BREACH_WINDOW_TOKENS,
    GENERATED_TOKENS,
    REQUESTS,
    TIME_TO_FIRST_TOKEN,
    INTER_TOKEN_LATENCY,
    BATCH_SIZE,
    RUNNING_BATCH,
    QUEUE_LENGTH,
    LOADED_LAYERS,
    MODEL_LAYERS,
    RESIDENT_WEIGHT_BYTES,
    LAYER_WEIGHT_BYTES,
    KV_CACHE_BYTES,
    KV_BYTES_PER_TOKEN,
    GPU_MEMORY_USED_BYTES,
    ENERGY_JOULES,
    DECODE_SECONDS,
    WORKER_INFO,
)

# The response extension field that carries each token's exit layer (documented in README).
RESPONSE_EXTENSION_FIELD = "helios"
