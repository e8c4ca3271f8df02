"""A running request's state and how one emitted token advances it: text, stops, limits. No torch."""

from __future__ import annotations

import random
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from helios_worker.engine.api import Finished, FinishReason, GenerationRequest, TokenEvent
from helios_worker.engine.stops import IncrementalDetokenizer, StopMatcher, TextDecoder

Event = TokenEvent | Finished
Sink = Callable[[Event], None]


@dataclass
class Row:
    """One request from submission to its Finished event."""

    request: GenerationRequest
    sink: Sink
    detokenizer: IncrementalDetokenizer
    stops: StopMatcher
    arrived: float = field(default_factory=time.perf_counter)
    slot: int = -1
    position: int = 0  # cache position the next fed token is written at
    generated: int = 0
    last_emitted: float = 0.0
    rng: random.Random | None = None  # a sampled request's uniforms
    cancelled: threading.Event = field(default_factory=threading.Event)
    done: bool = False

    @classmethod
    def create(cls, request: GenerationRequest, sink: Sink, tokenizer: TextDecoder) -> Row:
        detokenizer = IncrementalDetokenizer(tokenizer, request.prompt_ids)
        return cls(request, sink, detokenizer, StopMatcher(request.sampling.stop))

    def advance(self, token: int, is_eos: bool) -> tuple[str, FinishReason | None]:
        """The text this token adds and, if the request ends here, why."""
        self.generated += 1
        text, stopped = self.stops.push("" if is_eos else self.detokenizer.push(token))
        if stopped:
            return text, "stop"
        reason: FinishReason | None = None
        if is_eos:
            reason = "stop"
        elif self.generated >= self.request.sampling.max_tokens:
            reason = "length"
        if reason is not None:
            tail, stopped = self.stops.push(self.detokenizer.flush())
            text += tail if stopped else tail + self.stops.flush()
            reason = "stop" if stopped else reason
        return text, reason

    def finished(self, reason: FinishReason, error: str | None = None) -> Finished:
        self.done = True
        return Finished(reason, len(self.request.prompt_ids), self.generated, error)
