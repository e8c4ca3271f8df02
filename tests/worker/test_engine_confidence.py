"""Exits on the project's trained tiny early-exit model: easy tokens leave early, hard ones late."""

from __future__ import annotations

from pathlib import Path
from statistics import mean

import pytest

from helios_worker.engine.api import EngineConfig, GenerationRequest, SamplingParams
from helios_worker.engine.blocks import StackModel
from helios_worker.engine.engine import Engine
from helios_worker.models.loading import load_partial
from helios_worker.models.tasks import Kind, eval_examples
from helios_worker.models.tokenizer import encode


@pytest.fixture(scope="module")
def tiny(tiny_model_dir: Path) -> StackModel:
    return load_partial(tiny_model_dir)


def exit_layers(model: StackModel, kind: Kind, **config: object) -> list[int]:
    prompts = [ex.prompt for ex in eval_examples(6) if ex.kind == kind]
    engine = Engine(model, EngineConfig(max_batch=8, max_context=128, **config))  # type: ignore[arg-type]
    try:
        results = engine.generate_batch(
            GenerationRequest(tuple(encode(model.tokenizer, p)), SamplingParams(max_tokens=8)) for p in prompts
        )
    finally:
        engine.stop()
    return [e.exit_layer for events, _ in results for e in events]


def test_easy_prompts_exit_earlier_than_hard_ones(tiny: StackModel) -> None:
    easy, hard = exit_layers(tiny, "easy"), exit_layers(tiny, "hard")
    assert mean(easy) < mean(hard)
    assert min(easy) == 1  # some tokens need a single layer
    assert max(hard) > 2


def test_a_stricter_threshold_exits_later(tiny: StackModel) -> None:
    loose = exit_layers(tiny, "hard", confidence_threshold=0.5)
    strict = exit_layers(tiny, "hard", confidence_threshold=0.99)
    assert mean(loose) < mean(strict)


def test_a_truncated_stack_emits_unconfident_tokens_from_its_last_layer_as_breaches(tiny_model_dir: Path) -> None:
    truncated = load_partial(tiny_model_dir, 2)
    layers = exit_layers(truncated, "hard")
    assert set(layers) == {1, 2}  # nothing beyond the loaded stack; both exits happen
    prompts = [ex.prompt for ex in eval_examples(6) if ex.kind == "hard"]
    engine = Engine(truncated, EngineConfig(max_batch=8, max_context=128, breach_window=1000))
    try:
        results = engine.generate_batch(
            GenerationRequest(tuple(encode(truncated.tokenizer, p)), SamplingParams(max_tokens=8)) for p in prompts
        )
        events = [e for evs, _ in results for e in evs]
        assert any(e.breach for e in events)
        assert all(e.exit_layer == 2 and e.confidence < 0.9 for e in events if e.breach)
        assert all(e.confidence >= 0.9 for e in events if not e.breach)
        assert engine.breach_ratio == pytest.approx(sum(e.breach for e in events) / len(events))  # window holds all
    finally:
        engine.stop()
