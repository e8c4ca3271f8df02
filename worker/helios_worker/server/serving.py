"""The data plane between the routes and the engine: prompts in, per-choice token streams out.

Knows the engine only through `ServingEngine` and the tokenizer only through `PromptEncoder`,
so it needs no torch and no HTTP.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

from helios_worker.engine.api import Finished, GenerationRequest, SamplingParams, TokenEvent
from helios_worker.server.errors import EngineFailed, InvalidRequest
from helios_worker.server.protocol import ChatMessage, HeliosChoiceInfo

Event = TokenEvent | Finished


class ServingEngine(Protocol):
    """What the server needs of the engine (engine.scheduler.Engine provides it)."""

    def generate(self, request: GenerationRequest) -> AsyncIterator[Event]: ...

    @property
    def queue_length(self) -> int: ...

    @property
    def running(self) -> int: ...


class PromptEncoder:
    """Text and chat messages to token ids, over a Hugging Face tokenizer."""

    def __init__(self, tokenizer: Any) -> None:
        self._tokenizer = tokenizer
        self.vocab_size = len(tokenizer)

    def encode(self, text: str) -> list[int]:
        return list(self._tokenizer(text, add_special_tokens=True)["input_ids"])

    def token_text(self, token_id: int) -> str:
        """One token as text, as logprobs name it."""
        return str(self._tokenizer.decode([token_id]))

    def check_ids(self, ids: Sequence[int]) -> list[int]:
        bad = [i for i in ids if not 0 <= i < self.vocab_size]
        if bad:
            raise InvalidRequest(f"token id {bad[0]} is outside the vocabulary (0..{self.vocab_size - 1})", "prompt")
        return list(ids)

    def chat_prompt(self, messages: Sequence[ChatMessage]) -> list[int]:
        """The model's chat template where it has one, else a plain `role: content` transcript."""
        plain = [{"role": m.role, "content": m.content} for m in messages]
        if getattr(self._tokenizer, "chat_template", None):
            text = self._tokenizer.apply_chat_template(plain, tokenize=False, add_generation_prompt=True)
            return list(self._tokenizer(text, add_special_tokens=False)["input_ids"])
        return self.encode(transcript(messages))


def transcript(messages: Sequence[ChatMessage]) -> str:
    """The fallback chat format for models without a template."""
    return "".join(f"{m.role}: {m.content}\n" for m in messages) + "assistant: "


@dataclass
class ChoiceResult:
    """One choice's tokens, accumulated from its events."""

    index: int
    text: str = ""
    exit_layers: list[int] = field(default_factory=list)
    confidences: list[float] = field(default_factory=list)
    breaches: int = 0
    finished: Finished | None = None
    tokens: list[TokenEvent] = field(default_factory=list)

    def add(self, event: Event) -> None:
        if isinstance(event, Finished):
            if event.finish_reason == "error":
                raise EngineFailed(event.error or "the engine failed this request")
            self.finished = event
            return
        self.text += event.text
        self.tokens.append(event)
        self.exit_layers.append(event.exit_layer)
        self.confidences.append(round(event.confidence, 6))
        self.breaches += int(event.breach)

    @property
    def finish_reason(self) -> str | None:
        if self.finished is None:
            return None
        return "length" if self.finished.finish_reason == "length" else "stop"


def choice_info(tokens: Sequence[TokenEvent], depth: int, candidate: str) -> HeliosChoiceInfo:
    """The extension field for these tokens."""
    return HeliosChoiceInfo(
        exit_layers=[t.exit_layer for t in tokens],
        confidences=[round(t.confidence, 6) for t in tokens],
        breaches=sum(t.breach for t in tokens),
        depth=depth,
        candidate=candidate,
    )


def usage_counts(results: Sequence[ChoiceResult], choices_per_prompt: int) -> tuple[int, int]:
    """(prompt tokens, completion tokens); each prompt counts once however many choices it has."""
    prompt = sum(r.finished.prompt_tokens for r in results if r.finished and r.index % choices_per_prompt == 0)
    completion = sum(r.finished.completion_tokens for r in results if r.finished)
    return prompt, completion


class ChoiceStream:
    """One engine generation whose first event has already arrived (so admission errors came first)."""

    def __init__(self, index: int, events: AsyncIterator[Event], first: Event) -> None:
        self.index = index
        self._events = events
        self._first: Event | None = first

    async def __aiter__(self) -> AsyncIterator[Event]:
        if self._first is not None:
            first, self._first = self._first, None
            yield first
        async for event in self._events:
            yield event

    async def close(self) -> None:
        closer = getattr(self._events, "aclose", None)
        if closer is not None:
            with contextlib.suppress(Exception):
                await closer()


async def open_streams(
    engine: ServingEngine, prompts: Sequence[list[int]], n: int, sampling: SamplingParams, request_id: str
) -> list[ChoiceStream]:
    """Submit every choice and wait for each one's first event; on any rejection, cancel them all and raise."""
    iterators: list[AsyncIterator[Event]] = []
    for p, ids in enumerate(prompts):
        for i in range(n):
            params = sampling
            if sampling.seed is not None and n > 1:  # distinct but reproducible samples per choice
                params = SamplingParams(**{**sampling.__dict__, "seed": sampling.seed + i})
            request = GenerationRequest(tuple(ids), params, f"{request_id}-{p * n + i}")
            iterators.append(aiter(engine.generate(request)))
    firsts = await asyncio.gather(*(anext(it) for it in iterators), return_exceptions=True)
    streams = [
        ChoiceStream(i, it, first)
        for i, (it, first) in enumerate(zip(iterators, firsts, strict=True))
        if not isinstance(first, BaseException)
    ]
    for first in firsts:
        if isinstance(first, BaseException):
            await asyncio.gather(*(s.close() for s in streams))
            raise first
    return streams


async def collect(streams: Sequence[ChoiceStream]) -> list[ChoiceResult]:
    """Run every choice to its end."""

    async def one(stream: ChoiceStream) -> ChoiceResult:
        result = ChoiceResult(stream.index)
        async for event in stream:
            result.add(event)
        return result

    try:
        return list(await asyncio.gather(*(one(s) for s in streams)))
    finally:
        await asyncio.gather(*(s.close() for s in streams))


async def merge(streams: Sequence[ChoiceStream]) -> AsyncIterator[tuple[int, Event]]:
    """Events of all choices as they come, tagged with the choice index; closing it cancels them all."""
    queue: asyncio.Queue[tuple[int, Event] | tuple[int, BaseException] | None] = asyncio.Queue()

    async def pump(stream: ChoiceStream) -> None:
        try:
            async for event in stream:
                await queue.put((stream.index, event))
        except Exception as error:  # surfaced to the consumer, which answers it in-stream
            await queue.put((stream.index, error))
        finally:
            await queue.put(None)

    tasks = [asyncio.create_task(pump(s)) for s in streams]
    remaining = len(tasks)
    try:
        while remaining:
            item = await queue.get()
            if item is None:
                remaining -= 1
                continue
            index, payload = item
            if isinstance(payload, BaseException):
                raise payload
            yield index, payload
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        await asyncio.gather(*(s.close() for s in streams))
