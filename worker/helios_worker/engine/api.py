"""The engine's public surface: requests in, token events out, typed errors, telemetry hooks.

The server (and the benchmarks) talk to the engine only through these types.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal, Protocol

ConfidenceMeasure = Literal["max_prob", "margin"]  # max softmax, or top-1 minus top-2 probability
SERVING_CONTEXT = 4096  # default tokens per request: the KV cache reserves it per slot, not the model's limit


@dataclass(frozen=True)
class EngineConfig:
    confidence_threshold: float = 0.9
    confidence_measure: ConfidenceMeasure = "max_prob"
    breach_window: int = 100
    profile: bool = False  # full depth; per token, the first confident layer and per-layer agreement
    early_stop: bool = True  # within the loaded stack, stop a step when every row is confident
    # Exit checkpoints below the last loaded layer L (1-based): None, every layer; (), none, so a step
    # evaluates one exit head per row, at L (the confidence the breach counter reads).
    exit_layers: tuple[int, ...] | None = None
    exit_max_batch: int | None = None  # checkpoints run only in steps of at most this many rows; None: any
    max_batch: int = 64  # rows in the running batch
    max_queue: int = 256  # waiting requests beyond which submit() raises QueueFull
    prefill_tokens: int = 8192  # per step: padded prompt tokens prefilled (in one pass) before its decode
    max_context: int | None = None  # tokens (prompt + generated); None: SERVING_CONTEXT or the model's limit
    kv_budget_bytes: int | None = None  # cap on the KV cache; None: sized from max_batch * max_context
    device: str = "cpu"
    dtype: str = "float32"  # float32 | bfloat16 | float16
    cuda_graphs: bool = True  # on CUDA: capture decode steps per batch-size and context-length bucket
    ignore_eos: bool = False  # benchmarks: every request generates exactly max_tokens


@dataclass(frozen=True)
class SamplingParams:
    max_tokens: int = 16
    temperature: float = 0.0  # 0: greedy
    top_p: float = 1.0
    seed: int | None = None
    stop: tuple[str, ...] = ()
    logprobs: int | None = None  # None: none; k: the emitted token's log-probability and the k most likely


@dataclass(frozen=True)
class GenerationRequest:
    prompt_ids: tuple[int, ...]
    sampling: SamplingParams = field(default_factory=SamplingParams)
    request_id: str = ""


@dataclass(frozen=True)
class TokenEvent:
    """One emitted token with where it exited and how confident it was."""

    token_id: int
    text: str  # the text this token adds (may be "" while a multi-byte character is incomplete)
    exit_layer: int  # 1-based
    confidence: float  # of this token (a sampled one's own), at its exit layer
    breach: bool  # unconfident at the last loaded layer, emitted anyway, while deeper layers exist
    logprob: float | None = None  # at the exit layer, when the request asked for logprobs
    top_logprobs: tuple[tuple[int, float], ...] = ()  # (token id, log-probability), most likely first


FinishReason = Literal["stop", "length", "cancelled", "error"]


@dataclass(frozen=True)
class Finished:
    """The last event of a request."""

    finish_reason: FinishReason
    prompt_tokens: int
    completion_tokens: int
    error: str | None = None


class EngineError(Exception):
    """Base of the errors the server maps to HTTP answers."""


class QueueFull(EngineError):
    """The waiting queue is at max_queue: answer 429 with Retry-After."""

    def __init__(self, retry_after_seconds: float) -> None:
        super().__init__(f"the queue is full; retry after {retry_after_seconds:.0f}s")
        self.retry_after_seconds = retry_after_seconds


class PromptTooLong(EngineError):
    """Prompt plus max_tokens exceed the context: a 400."""


class Draining(EngineError):
    """The worker is shutting down and takes no new requests: a 503."""


class GraphCaptureError(RuntimeError):
    """A CUDA graph of the decode step could not be captured: the worker refuses to start rather than
    decode eagerly at a fraction of the speed it was sized for."""


class EngineObserver(Protocol):
    """Telemetry hooks, called from the engine's loop; implementations must be cheap."""

    def on_step(self, batch_size: int, queue_length: int, seconds: float) -> None: ...

    def on_token(self, exit_layer: int, breach: bool, breach_ratio: float, window_tokens: int) -> None: ...

    def on_profile_token(
        self, first_confident_layer: int, agreeing_layers: tuple[int, ...], agreeing_depths: tuple[int, ...]
    ) -> None:
        """Profiling: layers whose own exit token equals the final one, and depths at which
        early-exit decoding (first confident layer, else the depth) would emit the final token."""

    def on_first_token(self, seconds: float) -> None: ...

    def on_inter_token(self, seconds: float) -> None: ...

    def on_finished(self, finished: Finished, profiled: bool) -> None: ...
