"""Response bodies and server-sent event streams for completions and chat completions.

Each view turns choice results (or live events) into OpenAI's shapes plus the `helios` extension.
"""

from __future__ import annotations

import json
import logging
from collections.abc import AsyncIterator, Callable, Sequence
from typing import Any

from helios_worker.engine.api import Finished, TokenEvent
from helios_worker.server.errors import answer_for, error_body
from helios_worker.server.protocol import (
    AssistantMessage,
    ChatChoice,
    ChatChunkChoice,
    ChatCompletionChunk,
    ChatCompletionResponse,
    ChatDelta,
    ChatLogprobs,
    CompletionChoice,
    CompletionLogprobs,
    CompletionResponse,
    HeliosChoiceInfo,
    TokenLogprob,
    TopLogprob,
    Usage,
)
from helios_worker.server.serving import ChoiceResult, ChoiceStream, choice_info, merge, usage_counts
from helios_worker.server.settings import ServerSettings

log = logging.getLogger("helios.worker.server")
DONE = "data: [DONE]\n\n"


def sse(payload: dict[str, Any]) -> str:
    return f"data: {json.dumps(payload, separators=(',', ':'))}\n\n"


def finish_reason(finished: Finished) -> str:
    return "length" if finished.finish_reason == "length" else "stop"


class _View:
    def __init__(
        self,
        request_id: str,
        created: int,
        settings: ServerSettings,
        n: int,
        token_text: Callable[[int], str] = str,
    ) -> None:
        self.id = request_id
        self.created = created
        self.settings = settings
        self.n = n
        self.token_text = token_text  # a token id as text, for logprobs

    def envelope(self) -> dict[str, Any]:
        """The fields every response and chunk of this request carries."""
        return {
            "id": self.id,
            "created": self.created,
            "model": self.settings.model_name,
            "system_fingerprint": self.settings.system_fingerprint,
        }

    def _top(self, token_id: int, logprob: float) -> TopLogprob:
        text = self.token_text(token_id)
        return TopLogprob(token=text, logprob=logprob, bytes=list(text.encode()))

    def chat_logprobs(self, tokens: Sequence[TokenEvent]) -> ChatLogprobs | None:
        """Logprobs at each token's exit layer; None unless the request asked for them."""
        if not tokens or tokens[0].logprob is None:
            return None
        content = []
        for t in tokens:
            top = [self._top(i, lp) for i, lp in t.top_logprobs]
            chosen = self._top(t.token_id, t.logprob or 0.0)
            content.append(TokenLogprob(**chosen.model_dump(), top_logprobs=top))
        return ChatLogprobs(content=content)

    def completion_logprobs(self, tokens: Sequence[TokenEvent], offset: int = 0) -> CompletionLogprobs | None:
        if not tokens or tokens[0].logprob is None:
            return None
        offsets = []
        for t in tokens:
            offsets.append(offset)
            offset += len(t.text)
        return CompletionLogprobs(
            tokens=[self.token_text(t.token_id) for t in tokens],
            token_logprobs=[t.logprob or 0.0 for t in tokens],
            top_logprobs=[{self.token_text(i): lp for i, lp in t.top_logprobs} for t in tokens],
            text_offset=offsets,
        )

    def info(self, tokens: Sequence[TokenEvent]) -> HeliosChoiceInfo:
        return choice_info(tokens, self.settings.depth, self.settings.candidate)

    def result_info(self, result: ChoiceResult) -> HeliosChoiceInfo:
        return HeliosChoiceInfo(
            exit_layers=result.exit_layers,
            confidences=result.confidences,
            breaches=result.breaches,
            depth=self.settings.depth,
            candidate=self.settings.candidate,
        )

    def usage(self, results: Sequence[ChoiceResult]) -> Usage:
        prompt, completion = usage_counts(results, self.n)
        return Usage(prompt_tokens=prompt, completion_tokens=completion, total_tokens=prompt + completion)

    async def stream(self, streams: Sequence[ChoiceStream], include_usage: bool) -> AsyncIterator[str]:
        """SSE lines: per token a chunk, per choice a finishing chunk, optional usage, then [DONE]."""
        results = {s.index: ChoiceResult(s.index) for s in streams}
        for s in streams:
            opening = self.opening_chunk(s.index)
            if opening is not None:
                yield sse(opening)
        try:
            async for index, event in merge(streams):
                results[index].add(event)
                yield sse(self.event_chunk(index, event))
        except Exception as error:  # headers are sent: the error travels in the stream
            row = answer_for(error)
            log.error("stream %s failed: %s", self.id, type(error).__name__)
            yield sse(error_body("the generation failed", row))
            yield DONE
            return
        if include_usage:
            yield sse(self.usage_chunk(list(results.values())))
        yield DONE

    def opening_chunk(self, index: int) -> dict[str, Any] | None:
        return None

    def event_chunk(self, index: int, event: TokenEvent | Finished) -> dict[str, Any]:
        raise NotImplementedError

    def usage_chunk(self, results: Sequence[ChoiceResult]) -> dict[str, Any]:
        raise NotImplementedError


class CompletionView(_View):
    _offsets: dict[int, int]

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._offsets = {}  # streaming: text emitted so far per choice, for text_offset

    def response(self, results: Sequence[ChoiceResult]) -> dict[str, Any]:
        choices = [
            CompletionChoice(
                index=r.index,
                text=r.text,
                logprobs=self.completion_logprobs(r.tokens),
                finish_reason=r.finish_reason,
                helios=self.result_info(r),
            )
            for r in sorted(results, key=lambda r: r.index)
        ]
        body = CompletionResponse(**self.envelope(), choices=choices, usage=self.usage(results))
        return body.model_dump()

    def _chunk(self, choices: list[CompletionChoice], usage: Usage | None = None) -> dict[str, Any]:
        body = CompletionResponse(**self.envelope(), choices=choices, usage=usage)
        return body.model_dump(exclude={"usage"} if usage is None else set())

    def event_chunk(self, index: int, event: TokenEvent | Finished) -> dict[str, Any]:
        if isinstance(event, Finished):
            choice = CompletionChoice(index=index, text="", finish_reason=finish_reason(event), helios=self.info([]))
        else:
            offset = self._offsets.get(index, 0)
            self._offsets[index] = offset + len(event.text)
            logprobs = self.completion_logprobs([event], offset)
            choice = CompletionChoice(
                index=index, text=event.text, logprobs=logprobs, finish_reason=None, helios=self.info([event])
            )
        return self._chunk([choice])

    def usage_chunk(self, results: Sequence[ChoiceResult]) -> dict[str, Any]:
        return self._chunk([], self.usage(results))


class ChatView(_View):
    def response(self, results: Sequence[ChoiceResult]) -> dict[str, Any]:
        choices = [
            ChatChoice(
                index=r.index,
                message=AssistantMessage(content=r.text),
                logprobs=self.chat_logprobs(r.tokens),
                finish_reason=r.finish_reason,
                helios=self.result_info(r),
            )
            for r in sorted(results, key=lambda r: r.index)
        ]
        body = ChatCompletionResponse(**self.envelope(), choices=choices, usage=self.usage(results))
        return body.model_dump()

    def _chunk(self, choices: list[ChatChunkChoice], usage: Usage | None = None) -> dict[str, Any]:
        body = ChatCompletionChunk(**self.envelope(), choices=choices, usage=usage)
        dumped = body.model_dump(exclude={"usage"} if usage is None else set())
        for choice in dumped["choices"]:  # OpenAI's deltas carry only what changed
            choice["delta"] = {k: v for k, v in choice["delta"].items() if v is not None}
        return dumped

    def opening_chunk(self, index: int) -> dict[str, Any] | None:
        delta = ChatDelta(role="assistant", content="")
        return self._chunk([ChatChunkChoice(index=index, delta=delta, finish_reason=None, helios=self.info([]))])

    def event_chunk(self, index: int, event: TokenEvent | Finished) -> dict[str, Any]:
        if isinstance(event, Finished):
            choice = ChatChunkChoice(
                index=index, delta=ChatDelta(), finish_reason=finish_reason(event), helios=self.info([])
            )
        else:
            choice = ChatChunkChoice(
                index=index,
                delta=ChatDelta(content=event.text),
                logprobs=self.chat_logprobs([event]),
                finish_reason=None,
                helios=self.info([event]),
            )
        return self._chunk([choice])

    def usage_chunk(self, results: Sequence[ChoiceResult]) -> dict[str, Any]:
        return self._chunk([], self.usage(results))
