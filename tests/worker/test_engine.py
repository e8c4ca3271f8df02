"""The engine as the server sees it: continuous batching, stops, limits, sampling, errors, telemetry."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import pytest
import torch

from helios_worker.engine.api import (
    Draining,
    EngineConfig,
    Finished,
    GenerationRequest,
    PromptTooLong,
    QueueFull,
    SamplingParams,
    TokenEvent,
)
from helios_worker.engine.engine import Engine
from helios_worker.engine.testing import HFStack, random_model, random_prompts

EOS = 2
EOS_PROMPT = tuple(random_prompts(1, (3, 9, 1, 6))[3])  # greedy decoding of this prompt reaches EOS on the random llama
MIXED = 0.2  # on the random llama, some tokens exit at layer 1 or 2, most breach at 3


@dataclass
class Recorder:
    """An EngineObserver that keeps every call."""

    calls: dict[str, list[tuple[Any, ...]]] = field(default_factory=dict)

    def _keep(self, name: str, *args: Any) -> None:
        self.calls.setdefault(name, []).append(args)

    def on_step(self, batch_size: int, queue_length: int, seconds: float) -> None:
        self._keep("step", batch_size, queue_length, seconds)

    def on_token(self, exit_layer: int, breach: bool, breach_ratio: float, window_tokens: int) -> None:
        self._keep("token", exit_layer, breach, breach_ratio, window_tokens)

    def on_profile_token(
        self, first_confident_layer: int, agreeing_layers: tuple[int, ...], agreeing_depths: tuple[int, ...]
    ) -> None:
        self._keep("profile", first_confident_layer, agreeing_layers, agreeing_depths)

    def on_first_token(self, seconds: float) -> None:
        self._keep("first", seconds)

    def on_inter_token(self, seconds: float) -> None:
        self._keep("inter", seconds)

    def on_finished(self, finished: Finished, profiled: bool) -> None:
        self._keep("finished", finished, profiled)


@pytest.fixture(scope="module")
def llama() -> HFStack:
    return random_model("llama", seed=1)


def make_engine(model: HFStack, observer: Recorder | None = None, **config: Any) -> Iterator[Engine]:
    settings: dict[str, Any] = {"confidence_threshold": MIXED, "max_batch": 4, "max_context": 64, **config}
    engine = Engine(model, EngineConfig(**settings), observer)
    engine.start()
    yield engine
    engine.stop()


@pytest.fixture
def engine(llama: HFStack) -> Iterator[Engine]:
    yield from make_engine(llama)


def request(prompt: tuple[int, ...], max_tokens: int = 12, **sampling: Any) -> GenerationRequest:
    return GenerationRequest(prompt, SamplingParams(max_tokens=max_tokens, **sampling))


def alone(engine: Engine, req: GenerationRequest) -> tuple[list[TokenEvent], Finished]:
    return engine.generate_batch([req])[0]


def ids(events: list[TokenEvent]) -> list[int]:
    return [e.token_id for e in events]


async def test_a_request_joins_the_running_batch_and_all_match_their_solo_runs(engine: Engine) -> None:
    long, short = request((5, 6, 7, 8), 30), request((40, 41), 6, temperature=1.0, seed=3)
    solo_long, solo_short = alone(engine, long), alone(engine, short)
    order: list[str] = []
    got: dict[str, list[TokenEvent]] = {"long": [], "short": []}

    async def consume(name: str, req: GenerationRequest, joined: asyncio.Event | None = None) -> None:
        async for event in engine.generate(req):
            if isinstance(event, Finished):
                order.append(name)
            else:
                got[name].append(event)
                if joined is not None and len(got[name]) == 3:
                    joined.set()

    started = asyncio.Event()
    first = asyncio.create_task(consume("long", long, started))
    await started.wait()
    await consume("short", short)
    await first
    assert order == ["short", "long"]  # the short one ran inside the long one's lifetime
    assert ids(got["long"]) == ids(solo_long[0])
    assert ids(got["short"]) == ids(solo_short[0])
    assert [e.exit_layer for e in got["long"]] == [e.exit_layer for e in solo_long[0]]
    assert {e.exit_layer for e in got["long"]} != {3}  # exits happened, so propagation was exercised


def test_max_tokens_ends_with_length_and_text_is_the_decoded_tokens(engine: Engine, llama: HFStack) -> None:
    events, finished = alone(engine, request((5, 6, 7, 8), 9))
    assert finished == Finished("length", 4, 9)
    assert len(events) == 9
    assert "".join(e.text for e in events) == llama.tokenizer.decode(ids(events), skip_special_tokens=True)


def test_a_stop_sequence_cuts_the_text_and_ends_with_stop(engine: Engine) -> None:
    events, _ = alone(engine, request((9, 10, 11), 20))
    text = "".join(e.text for e in events)
    stop = text[5:7]
    cut = text[: text.index(stop)]
    stopped, finished = alone(engine, request((9, 10, 11), 20, stop=(stop, "never-seen")))
    assert finished.finish_reason == "stop"
    assert "".join(e.text for e in stopped) == cut
    assert ids(stopped) == ids(events)[: len(stopped)]
    assert len(stopped) < len(events)


def test_eos_ends_with_stop_and_adds_no_text(llama: HFStack) -> None:
    for engine in make_engine(llama, confidence_threshold=2.0):
        events, finished = alone(engine, request(EOS_PROMPT, 12))
        assert finished.finish_reason == "stop"
        assert events[-1].token_id == EOS and events[-1].text == ""
        assert finished.completion_tokens == len(events) < 12


def test_seeded_sampling_is_deterministic_and_seeds_differ(engine: Engine) -> None:
    prompt = (20, 21, 22)
    a = ids(alone(engine, request(prompt, 16, temperature=1.0, seed=7))[0])
    b = ids(alone(engine, request(prompt, 16, temperature=1.0, seed=7))[0])
    c = ids(alone(engine, request(prompt, 16, temperature=1.0, seed=8))[0])
    greedy = ids(alone(engine, request(prompt, 16))[0])
    assert a == b
    assert a != c
    assert a != greedy


def test_top_p_near_zero_samples_the_greedy_token(engine: Engine) -> None:
    prompt = (20, 21, 22)
    greedy = ids(alone(engine, request(prompt, 10))[0])
    assert ids(alone(engine, request(prompt, 10, temperature=1.0, top_p=1e-6, seed=1))[0]) == greedy


async def test_prompt_too_long_is_raised_before_any_event(engine: Engine) -> None:
    with pytest.raises(PromptTooLong):
        await anext(engine.generate(request(tuple(range(4, 60)), 10)))
    with pytest.raises(PromptTooLong):
        await anext(engine.generate(request((), 10)))


async def test_queue_full_when_the_waiting_queue_is_at_max_queue(llama: HFStack) -> None:
    engine = Engine(llama, EngineConfig(max_batch=1, max_queue=1, max_context=64))  # not started: nothing drains
    first = engine.generate(request((5, 6), 4))
    task = asyncio.create_task(anext(first))
    await asyncio.sleep(0)
    with pytest.raises(QueueFull) as raised:
        await anext(engine.generate(request((5, 6), 4)))
    assert raised.value.retry_after_seconds > 0
    engine.start()
    assert isinstance(await task, TokenEvent)
    await first.aclose()
    engine.stop()


async def test_draining_refuses_new_requests_and_finishes_in_flight_ones(engine: Engine) -> None:
    stream = engine.generate(request((5, 6, 7), 20))
    first = await anext(stream)
    assert isinstance(first, TokenEvent)
    await asyncio.to_thread(engine.drain, 30.0)
    with pytest.raises(Draining):
        await anext(engine.generate(request((5, 6), 4)))
    rest = [event async for event in stream]
    assert isinstance(rest[-1], Finished) and rest[-1].finish_reason == "length"
    assert len(rest) == 20  # 19 more tokens and the Finished event
    assert engine.running == 0


async def test_leaving_the_stream_cancels_and_frees_the_slot(llama: HFStack) -> None:
    recorder = Recorder()
    for engine in make_engine(llama, recorder, max_batch=1):
        stream = engine.generate(request((5, 6, 7), 40))
        await anext(stream)
        await stream.aclose()
        _, finished = await asyncio.to_thread(alone, engine, request((8, 9), 3))
        assert finished.finish_reason == "length"  # it got the only slot back
        reasons = [f.finish_reason for f, _ in recorder.calls["finished"]]
        assert reasons == ["cancelled", "length"]


def test_every_observer_hook_reports(llama: HFStack) -> None:
    recorder = Recorder()
    for engine in make_engine(llama, recorder, breach_window=5):
        results = engine.generate_batch([request((5, 6, 7), 8), request((9,), 8)])
        breaches = [e.breach for events, _ in results for e in events]
        assert engine.breach_ratio == pytest.approx(recorder.calls["token"][-1][2])
    tokens = recorder.calls["token"]
    assert len(tokens) == 16  # one call per emitted token
    assert sorted(t[1] for t in tokens) == sorted(breaches)
    assert all(t[3] <= 5 for t in tokens) and tokens[-1][3] == 5
    assert all(t[0] in (1, 2, 3) for t in tokens)
    assert len(recorder.calls["first"]) == 2 and len(recorder.calls["inter"]) == 14
    assert all(s >= 0 for (s,) in recorder.calls["first"] + recorder.calls["inter"])
    assert max(b for b, _, _ in recorder.calls["step"]) == 2
    assert [(f.finish_reason, p) for f, p in recorder.calls["finished"]] == [("length", False)] * 2
    assert "profile" not in recorder.calls


def test_profiling_reports_agreement_and_emits_the_full_depth_token(llama: HFStack) -> None:
    recorder = Recorder()
    prompt = (5, 6, 7, 8)
    for engine in make_engine(llama, confidence_threshold=2.0):
        full = ids(alone(engine, request(prompt, 10))[0])
    for engine in make_engine(llama, recorder, profile=True):
        events, _ = alone(engine, request(prompt, 10))
    assert ids(events) == full
    assert all(e.exit_layer == 3 for e in events)
    profiles = recorder.calls["profile"]
    assert len(profiles) == 10
    for first_confident, layers, depths in profiles:
        assert 1 <= first_confident <= 4
        assert 3 in layers  # the last layer always agrees with itself
        # depth d emits the first confident layer's token when that is <= d, else layer d's
        assert depths == tuple(d for d in (1, 2, 3) if min(first_confident, d) in layers)
    assert any(fc <= 3 for fc, _, _ in profiles) and any(fc == 4 for fc, _, _ in profiles)
    assert recorder.calls["finished"][0][1] is True


@pytest.mark.parametrize("static_steps", [False, True], ids=["eager", "static"])
def test_rows_leaving_mid_batch_keep_the_others_tokens(llama: HFStack, static_steps: bool) -> None:
    """The first row leaves first, so the last row moves into its KV slot; static steps also pad 3 rows to 4."""
    reqs = [request((5, 6, 7), 4), request((9, 10, 11, 12, 13), 14), request((30,), 9, temperature=0.8, seed=5)]
    engine = Engine(llama, EngineConfig(confidence_threshold=MIXED, max_batch=4, max_context=64))
    try:
        solo = [alone(engine, r) for r in reqs]
    finally:
        engine.stop()
    engine = Engine(
        llama, EngineConfig(confidence_threshold=MIXED, max_batch=4, max_context=64), static_steps=static_steps
    )
    try:
        together = engine.generate_batch(reqs)
        assert engine.cache.free_slots == 4
    finally:
        engine.stop()
    for (events, finished), (solo_events, solo_finished) in zip(together, solo, strict=True):
        assert ids(events) == ids(solo_events)
        assert [e.exit_layer for e in events] == [e.exit_layer for e in solo_events]
        assert finished == solo_finished


@dataclass
class FailingExits(HFStack):
    """The random llama whose exit head fails while `failing` is set (a stand-in for a device error)."""

    failing: bool = False

    def exit_logits(self, hidden: torch.Tensor, layer: int | None = None) -> torch.Tensor:
        if self.failing:
            raise RuntimeError("exit head failed")
        return super().exit_logits(hidden, layer)


def test_a_failing_step_ends_its_requests_with_an_error_and_the_engine_serves_on(llama: HFStack) -> None:
    model = FailingExits(llama.hf_model, llama.tokenizer, failing=True)
    recorder = Recorder()
    for engine in make_engine(model, recorder):
        ((events, finished),) = engine.generate_batch([request((5, 6), 4)])
        assert events == [] and finished.finish_reason == "error"
        assert finished.error is not None and "exit head failed" in finished.error
        model.failing = False
        _, finished = alone(engine, request((5, 6), 4))
        assert finished.finish_reason == "length"
        assert engine.cache.free_slots == 4
    assert [f.finish_reason for f, _ in recorder.calls["finished"]] == ["error", "length"]
