"""Exits on the project's trained tiny early-exit model: easy tokens leave early, hard ones late."""

from __future__ import annotations

from pathlib import Path
from statistics import mean

import pytest

from helios_worker.engine.api import EngineConfig, GenerationRequest, SamplingParams
from helios_worker.engine.blocks import StackModel
from helios_worker.engine.scheduler import Engine
from helios_worker.engine.testing import load_stack
from helios_worker.models.tasks import Kind, eval_examples
from helios_worker.models.tokenizer import encode


@pytest.fixture(scope="module")
def tiny(tiny_model_dir: Path) -> StackModel:
    return load_stack(tiny_model_dir)


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
