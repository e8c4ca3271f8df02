"""The real SmolLM2-135M-Instruct, imported from its wheel and served through real uvicorn.

Its exits were never trained, so the worker serves it safe by default: exits inside the stack off,
every token from the last loaded layer, said at start-up, on /v1/models and in helios_worker_info.
Served at full depth through the partial loader, it gives the model's own greedy answers.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families
from tests.support.workers import serve_worker

from helios_worker.models.loading import load_partial
from helios_worker.serve import WorkerOptions

LAYERS = 30
QUESTION = "What is the capital of France?"


@pytest.fixture(scope="module")
def served(smollm2_dir: Path) -> Iterator[tuple[str, str]]:
    """(base URL, the worker's start-up log)."""
    records: list[str] = []
    handler = logging.Handler()
    handler.emit = lambda record: records.append(record.getMessage())  # type: ignore[method-assign]
    logger = logging.getLogger("helios.worker")
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    try:
        options = WorkerOptions(model=smollm2_dir, candidate="smollm2", max_context=256, max_batch=2)
        with serve_worker(options) as url:
            yield url, "\n".join(records)
    finally:
        logger.removeHandler(handler)


def _chat(url: str, messages: list[dict[str, str]], max_tokens: int = 12) -> dict[str, Any]:
    body = {"model": "smollm2", "messages": messages, "max_tokens": max_tokens, "temperature": 0}
    response = httpx.post(f"{url}/v1/chat/completions", json=body, timeout=120)
    assert response.status_code == 200, response.text
    answer: dict[str, Any] = response.json()
    return answer


def test_vanilla_smollm2_answers_the_capital_of_france_at_full_depth(served: tuple[str, str]) -> None:
    url, _ = served
    answer = _chat(url, [{"role": "user", "content": QUESTION}])
    choice = answer["choices"][0]
    assert "Paris" in choice["message"]["content"], choice
    assert set(choice["helios"]["exit_layers"]) == {LAYERS}  # never an untrained exit inside the stack


def test_completions_continue_real_text_with_the_models_own_tokens(served: tuple[str, str]) -> None:
    url, _ = served
    body = {"prompt": "The capital of France is", "max_tokens": 3, "temperature": 0}
    response = httpx.post(f"{url}/v1/completions", json=body, timeout=120)
    assert response.status_code == 200, response.text
    choice = response.json()["choices"][0]
    assert choice["text"].strip().startswith("Paris"), choice
    assert set(choice["helios"]["exit_layers"]) == {LAYERS}


def test_the_worker_says_its_exits_are_off_at_start_up_on_models_and_in_worker_info(served: tuple[str, str]) -> None:
    url, startup = served
    assert "exits inside the stack: off (the checkpoint's exits are untrained)" in startup
    card = httpx.get(f"{url}/v1/models").json()["data"][0]
    assert card["helios"]["exits"] == "off"
    families = text_string_to_metric_families(httpx.get(f"{url}/metrics").text)
    info = [s.labels for f in families for s in f.samples if s.name == "helios_worker_info"]
    assert [labels["exits"] for labels in info] == ["off"]


def test_chat_uses_the_models_own_template_with_the_system_message(served: tuple[str, str], smollm2_dir: Path) -> None:
    url, _ = served
    messages = [
        {"role": "system", "content": "You are a geography tutor. Answer with the city name only."},
        {"role": "user", "content": QUESTION},
    ]
    tokenizer = load_partial(smollm2_dir, 1).tokenizer
    templated = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    assert templated.startswith("<|im_start|>system\nYou are a geography tutor.")  # not the default system prompt
    expected = len(tokenizer(templated, add_special_tokens=False)["input_ids"])
    answer = _chat(url, messages, max_tokens=10)
    assert answer["usage"]["prompt_tokens"] == expected
    assert "Paris" in answer["choices"][0]["message"]["content"]


def test_the_worker_serves_the_wheel_directly_through_the_cached_import(smollm2_wheel: Path, smollm2_dir: Path) -> None:
    options = WorkerOptions(model=smollm2_wheel, max_context=128, max_batch=1)
    with serve_worker(options) as url:
        card = httpx.get(f"{url}/v1/models").json()["data"][0]
        assert card["id"] == smollm2_wheel.stem and card["helios"]["exits"] == "off"
        body = {"prompt": "The capital of France is", "max_tokens": 2, "temperature": 0}
        text = httpx.post(f"{url}/v1/completions", json=body, timeout=120).json()["choices"][0]["text"]
        assert text.strip().startswith("Paris")
