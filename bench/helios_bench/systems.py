"""The configurations under test behind one surface: a batch of prompts in, completions out; or a
request schedule played at a fixed rate, per-request timings out.

`EngineSystem` is HELIOS's engine (HELIOS at its chosen depth, or the static baseline at full depth
with exits off); `GenerateSystem` is plain transformers `model.generate` on the same weights.
"""

from __future__ import annotations

import asyncio
import itertools
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from helios_worker.engine.api import (
    EngineConfig,
    EngineObserver,
    Finished,
    GenerationRequest,
    SamplingParams,
    TokenEvent,
)
from helios_worker.engine.engine import Engine

NO_EXIT_THRESHOLD = 2.0  # above 1: never confident, every token runs the whole loaded stack

Prompt = tuple[int, ...]


@dataclass
class Completion:
    token_ids: list[int]
    text: str
    exit_layers: list[int] = field(default_factory=list)  # empty for plain generate


@dataclass(frozen=True)
class Timing:
    """One request of a rate run: time to first token from its arrival, and gaps between its tokens."""

    ttft_s: float
    gaps_s: tuple[float, ...]
    tokens: int


def _timing(arrived: float, token_times: Sequence[float]) -> Timing:
    if not token_times:
        return Timing(float("nan"), (), 0)
    gaps = tuple(b - a for a, b in itertools.pairwise(token_times))
    return Timing(token_times[0] - arrived, gaps, len(token_times))


class EngineSystem:
    """The HELIOS engine over a (partially) loaded model."""

    def __init__(
        self,
        model: Any,
        *,
        threshold: float,
        early_stop: bool,
        breach_window: int,
        max_batch: int,
        max_context: int,
        kv_budget_bytes: int | None,
        device: str,
        dtype: str,
        observer: EngineObserver | None = None,
        profile: bool = False,
        ignore_eos: bool = False,
    ) -> None:
        self.model = model
        self.config = EngineConfig(
            confidence_threshold=threshold,
            breach_window=breach_window,
            profile=profile,
            early_stop=early_stop,
            max_batch=max_batch,
            max_queue=max(256, 4 * max_batch),
            max_context=max_context,
            kv_budget_bytes=kv_budget_bytes,
            device=device,
            dtype=dtype,
            ignore_eos=ignore_eos,  # decode-speed runs: every row generates exactly max_tokens
        )
        self.engine = Engine(model, self.config, observer)
        self.engine.warmup()

    @property
    def slots(self) -> int:
        """Rows the engine's KV cache holds at once."""
        return int(self.engine.cache.plan.slots)

    @property
    def kv_cache_bytes(self) -> int:
        return int(self.engine.cache.plan.bytes)

    @property
    def breach_ratio(self) -> float:
        return float(self.engine.breach_ratio)

    def run_batch(self, prompts: Sequence[Prompt], max_new_tokens: int) -> list[Completion]:
        requests = [
            GenerationRequest(prompt_ids=p, sampling=SamplingParams(max_tokens=max_new_tokens), request_id=str(i))
            for i, p in enumerate(prompts)
        ]
        out: list[Completion] = []
        for events, finished in self.engine.generate_batch(requests):
            if finished.finish_reason == "error":
                raise RuntimeError(f"the engine failed a request: {finished.error}")
            text = "".join(e.text for e in events)
            out.append(Completion([e.token_id for e in events], text, [e.exit_layer for e in events]))
        return out

    def serve(self, arrivals: Sequence[float], prompts: Sequence[Prompt], max_new_tokens: int) -> list[Timing]:
        """Play requests arriving at `arrivals` (seconds from now) through the async API, as a server does."""
        self.engine.start()
        return asyncio.run(self._play(arrivals, prompts, max_new_tokens))

    async def _play(self, arrivals: Sequence[float], prompts: Sequence[Prompt], max_new_tokens: int) -> list[Timing]:
        t0 = time.perf_counter()

        async def one(arrival: float, prompt: Prompt) -> Timing:
            delay = t0 + arrival - time.perf_counter()
            if delay > 0:
                await asyncio.sleep(delay)
            request = GenerationRequest(prompt_ids=prompt, sampling=SamplingParams(max_tokens=max_new_tokens))
            times: list[float] = []
            async for event in self.engine.generate(request):
                if isinstance(event, TokenEvent):
                    times.append(time.perf_counter())
                elif isinstance(event, Finished) and event.finish_reason == "error":
                    raise RuntimeError(f"the engine failed a request: {event.error}")
            return _timing(t0 + arrival, times)

        return list(await asyncio.gather(*(one(a, p) for a, p in zip(arrivals, prompts, strict=True))))

    def close(self) -> None:
        self.engine.stop()


def _step_clock() -> Any:
    from transformers.generation.streamers import BaseStreamer

    class StepClock(BaseStreamer):
        """Times each decoding step of `generate` (its first put() is the prompt)."""

        def __init__(self) -> None:
            self.times: list[float] = []
            self._prompt_seen = False

        def put(self, value: torch.Tensor) -> None:
            if not self._prompt_seen:
                self._prompt_seen = True
                return
            self.times.append(time.perf_counter())

        def end(self) -> None:
            pass

    return StepClock()


class GenerateSystem:
    """Plain `model.generate` (greedy) on the same model, left-padded batches, as a user would call it.

    For the rate run it is served the simplest way: whenever idle, one `generate` call over every
    request that has arrived (up to `max_batch`).
    """

    def __init__(
        self,
        hf_model: Any,
        tokenizer: Any,
        device: str,
        eos_ids: Sequence[int],
        max_batch: int,
        ignore_eos: bool = False,
    ) -> None:
        self.model, self.tokenizer, self.device = hf_model, tokenizer, device
        self.ignore_eos = ignore_eos
        self.eos_ids = list(eos_ids)
        self.pad_id = int(tokenizer.pad_token_id if tokenizer.pad_token_id is not None else self.eos_ids[0])
        self.max_batch = max_batch

    def _generate(self, prompts: Sequence[Prompt], max_new_tokens: int, streamer: Any = None) -> list[Completion]:
        width = max(len(p) for p in prompts)
        ids = torch.full((len(prompts), width), self.pad_id, dtype=torch.long)
        mask = torch.zeros((len(prompts), width), dtype=torch.long)
        for i, p in enumerate(prompts):
            ids[i, width - len(p) :] = torch.tensor(p, dtype=torch.long)
            mask[i, width - len(p) :] = 1
        with torch.inference_mode():
            out = self.model.generate(
                input_ids=ids.to(self.device),
                attention_mask=mask.to(self.device),
                max_new_tokens=max_new_tokens,
                do_sample=False,
                pad_token_id=self.pad_id,
                eos_token_id=self.eos_ids,
                min_new_tokens=max_new_tokens if self.ignore_eos else None,
                streamer=streamer,
            )
        completions: list[Completion] = []
        for row in out[:, width:].tolist():
            tokens: list[int] = []
            for t in row:
                tokens.append(int(t))
                if t in self.eos_ids and not self.ignore_eos:  # the engine counts the EOS token too
                    break
            text = self.tokenizer.decode([t for t in tokens if t not in self.eos_ids], skip_special_tokens=True)
            completions.append(Completion(tokens, text))
        return completions

    def run_batch(self, prompts: Sequence[Prompt], max_new_tokens: int) -> list[Completion]:
        out: list[Completion] = []
        for start in range(0, len(prompts), self.max_batch):
            out += self._generate(prompts[start : start + self.max_batch], max_new_tokens)
        return out

    def serve(self, arrivals: Sequence[float], prompts: Sequence[Prompt], max_new_tokens: int) -> list[Timing]:
        t0 = time.perf_counter()
        timings: list[Timing | None] = [None] * len(prompts)
        order = sorted(range(len(prompts)), key=lambda i: arrivals[i])
        next_up = 0
        while next_up < len(order):
            now = time.perf_counter() - t0
            first = order[next_up]
            if arrivals[first] > now:
                time.sleep(arrivals[first] - now)
                continue
            batch = [i for i in order[next_up:] if arrivals[i] <= now][: self.max_batch]
            clock = _step_clock()
            completions = self._generate([prompts[i] for i in batch], max_new_tokens, streamer=clock)
            for i, completion in zip(batch, completions, strict=True):
                timings[i] = _timing(t0 + arrivals[i], clock.times[: len(completion.token_ids)])
            next_up += len(batch)
        return [t for t in timings if t is not None]

    def close(self) -> None:
        pass
