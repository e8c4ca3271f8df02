"""The official `openai` client against the real worker (real uvicorn, the trained tiny model), and
every body validated by the client's own pydantic types of OpenAI's published schema.

The SDK's types give fields the schema requires but allows to be null (message.refusal,
choice.logprobs) a default, so their presence on the wire is asserted on the raw JSON as well.
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from tests.support.workers import serve_worker

from helios_worker.serve import WorkerOptions

openai = pytest.importorskip("openai", reason="the dev extra installs the official openai client")
from openai.types import Completion  # noqa: E402
from openai.types.chat import ChatCompletion, ChatCompletionChunk  # noqa: E402

DEPTH = 4
FINGERPRINT = f"helios-tiny-depth{DEPTH}"


@pytest.fixture(scope="module")
def base_url(tiny_model_dir: Path) -> Iterator[str]:
    options = WorkerOptions(model=tiny_model_dir, layers=DEPTH, candidate="tiny", max_batch=8)
    with serve_worker(options) as url:
        yield url


@pytest.fixture
def client(base_url: str) -> Any:
    return openai.OpenAI(base_url=f"{base_url}/v1", api_key="unused", max_retries=0)


def _events(text: str) -> list[dict[str, Any]]:
    blocks = [b.removeprefix("data: ") for b in text.strip().split("\n\n")]
    assert blocks[-1] == "[DONE]"
    return [json.loads(b) for b in blocks[:-1]]


def test_chat_completion_through_the_official_client_names_candidate_and_depth(client: Any) -> None:
    answer = client.chat.completions.create(
        model="tiny", messages=[{"role": "user", "content": "copy abc"}], max_completion_tokens=4, temperature=0
    )
    assert isinstance(answer, ChatCompletion)
    assert answer.system_fingerprint == FINGERPRINT
    assert answer.choices[0].message.role == "assistant"
    assert answer.choices[0].message.refusal is None
    assert answer.usage is not None and answer.usage.completion_tokens == len(answer.choices[0].helios["exit_layers"])


def test_streamed_chat_chunks_through_the_official_client_each_carry_the_fingerprint(client: Any) -> None:
    stream = client.chat.completions.create(
        model="tiny",
        messages=[{"role": "user", "content": "copy abc"}],
        max_tokens=4,
        temperature=0,
        stream=True,
        stream_options={"include_usage": True},
    )
    chunks = list(stream)
    assert chunks and all(isinstance(c, ChatCompletionChunk) for c in chunks)
    assert {c.system_fingerprint for c in chunks} == {FINGERPRINT}
    assert chunks[-1].usage is not None and chunks[-1].choices == []
    assert chunks[0].choices[0].delta.role == "assistant"


def test_completion_through_the_official_client(client: Any) -> None:
    answer = client.completions.create(model="tiny", prompt="12+7=", max_tokens=3, temperature=0)
    assert isinstance(answer, Completion)
    assert answer.system_fingerprint == FINGERPRINT
    assert answer.choices[0].finish_reason in ("stop", "length")


def test_raw_bodies_validate_against_the_schema_types_and_carry_its_nullable_required_fields(base_url: str) -> None:
    chat = {"messages": [{"role": "user", "content": "copy abc"}], "max_tokens": 3, "temperature": 0}
    body = httpx.post(f"{base_url}/v1/chat/completions", json=chat).json()
    ChatCompletion.model_validate(body)
    message = body["choices"][0]["message"]
    assert "refusal" in message and message["refusal"] is None
    assert "logprobs" in body["choices"][0]
    streamed = httpx.post(f"{base_url}/v1/chat/completions", json={**chat, "stream": True}).text
    for chunk in _events(streamed):
        ChatCompletionChunk.model_validate(chunk)
        assert chunk["system_fingerprint"] == FINGERPRINT
    completion = {"prompt": "12+7=", "max_tokens": 3, "temperature": 0}
    Completion.model_validate(httpx.post(f"{base_url}/v1/completions", json=completion).json())
    # OpenAI streams legacy completions with finish_reason null until the last chunk, which the SDK's
    # Completion type (written for whole responses) does not allow: validate the finishing chunks.
    chunks = _events(httpx.post(f"{base_url}/v1/completions", json={**completion, "stream": True}).text)
    assert all(c["choices"][0]["finish_reason"] is None for c in chunks[:-1])
    Completion.model_validate(chunks[-1])


def test_chat_logprobs_through_the_official_client_are_the_exit_layers_distribution(client: Any) -> None:
    answer = client.chat.completions.create(
        model="tiny",
        messages=[{"role": "user", "content": "copy abc"}],
        max_tokens=4,
        temperature=0,
        logprobs=True,
        top_logprobs=3,
    )
    content = answer.choices[0].logprobs.content
    confidences = answer.choices[0].helios["confidences"]
    assert len(content) == len(confidences) >= 1
    for token, confidence in zip(content, confidences, strict=True):
        assert len(token.top_logprobs) == 3
        assert token.top_logprobs[0].logprob >= token.top_logprobs[1].logprob >= token.top_logprobs[2].logprob
        # Greedy: the emitted token is the exit layer's most likely one, whose probability is the confidence.
        assert token.logprob == pytest.approx(token.top_logprobs[0].logprob)
        assert math.exp(token.logprob) == pytest.approx(confidence, abs=1e-4)
        assert bytes(token.bytes).decode() == token.token


def test_completion_logprobs_streamed_and_whole_agree(base_url: str) -> None:
    body = {"prompt": "12+7=", "max_tokens": 3, "temperature": 0, "logprobs": 2}
    whole = httpx.post(f"{base_url}/v1/completions", json=body).json()
    Completion.model_validate(whole)
    logprobs = whole["choices"][0]["logprobs"]
    assert len(logprobs["tokens"]) == len(logprobs["token_logprobs"]) == len(logprobs["top_logprobs"]) == 3
    assert all(len(top) <= 2 for top in logprobs["top_logprobs"])
    assert logprobs["text_offset"][0] == 0
    chunks = _events(httpx.post(f"{base_url}/v1/completions", json={**body, "stream": True}).text)
    streamed = [c["choices"][0]["logprobs"] for c in chunks if c["choices"][0]["logprobs"] is not None]
    assert [s["token_logprobs"][0] for s in streamed] == pytest.approx(logprobs["token_logprobs"])
    assert [s["text_offset"][0] for s in streamed] == logprobs["text_offset"]


def test_logprobs_are_null_unless_asked_and_top_logprobs_need_logprobs(base_url: str) -> None:
    chat = {"messages": [{"role": "user", "content": "copy abc"}], "max_tokens": 2, "temperature": 0}
    assert httpx.post(f"{base_url}/v1/chat/completions", json=chat).json()["choices"][0]["logprobs"] is None
    refused = httpx.post(f"{base_url}/v1/chat/completions", json={**chat, "top_logprobs": 2})
    assert refused.status_code == 400 and "top_logprobs requires logprobs" in refused.text
