"""Request validation and the error table, without a server: the pure half of the HTTP contract."""

from __future__ import annotations

import pytest
from pydantic import ValidationError

from helios_worker import contract
from helios_worker.engine.api import Draining, EngineError, PromptTooLong, QueueFull
from helios_worker.server.errors import (
    ERROR_TABLE,
    EngineFailed,
    InvalidRequest,
    NotReady,
    Unauthorized,
    answer_for,
    error_body,
    retry_after_seconds,
)
from helios_worker.server.protocol import ChatCompletionRequest, CompletionRequest, HeliosChoiceInfo


@pytest.mark.parametrize(
    "body",
    [
        {"prompt": "hi", "max_tokens": -1},
        {"prompt": "hi", "max_tokens": 0},
        {"prompt": "hi", "temperature": -0.5},
        {"prompt": "hi", "top_p": 0},
        {"prompt": "hi", "n": 0},
        {"prompt": "hi", "unknown_field": 1},
        {"prompt": "hi", "echo": True},
        {"prompt": "hi", "logprobs": 6},
        {"prompt": "hi", "presence_penalty": 1.0},
        {"prompt": "hi", "stop": ["a", "b", "c", "d", "e"]},
        {"prompt": []},
        {"prompt": [-1, 2]},
        {"prompt": ["a"] * 5, "n": 4},
        {},
    ],
)
def test_out_of_range_or_unknown_completion_fields_are_rejected(body: dict[str, object]) -> None:
    with pytest.raises(ValidationError):
        CompletionRequest.model_validate(body)


def test_completion_prompt_forms() -> None:
    assert CompletionRequest(prompt="ab").prompts() == ["ab"]
    assert CompletionRequest(prompt=["ab", "cd"]).prompts() == ["ab", "cd"]
    assert CompletionRequest(prompt=[5, 6]).prompts() == [[5, 6]]
    assert CompletionRequest(prompt=[[5], [6, 7]]).prompts() == [[5], [6, 7]]
    assert CompletionRequest(prompt="x", stop="\n").stop_sequences() == ("\n",)


def test_chat_requests_need_messages_and_prefer_max_completion_tokens() -> None:
    with pytest.raises(ValidationError):
        ChatCompletionRequest.model_validate({"messages": []})
    with pytest.raises(ValidationError):
        ChatCompletionRequest.model_validate({"messages": [{"role": "wizard", "content": "x"}]})
    chat = ChatCompletionRequest.model_validate(
        {"messages": [{"role": "user", "content": "x"}], "max_tokens": 3, "max_completion_tokens": 5}
    )
    assert chat.token_limit() == 5


def test_the_extension_field_is_named_by_the_contract() -> None:
    from helios_worker.server.protocol import CompletionChoice

    info = HeliosChoiceInfo(exit_layers=[1], confidences=[0.5], breaches=0, depth=2, candidate="c")
    dumped = CompletionChoice(index=0, text="a", finish_reason="stop", helios=info).model_dump()
    assert dumped[contract.RESPONSE_EXTENSION_FIELD]["exit_layers"] == [1]


@pytest.mark.parametrize(
    ("error", "status", "outcome"),
    [
        (InvalidRequest("x"), 400, contract.STATUS_CLIENT_ERROR),
        (PromptTooLong("x"), 400, contract.STATUS_CLIENT_ERROR),
        (Unauthorized("x"), 401, contract.STATUS_CLIENT_ERROR),
        (QueueFull(2.0), 429, contract.STATUS_REJECTED),
        (Draining("x"), 503, contract.STATUS_REJECTED),
        (NotReady("x"), 503, contract.STATUS_REJECTED),
        (EngineFailed("x"), 500, contract.STATUS_ERROR),
        (EngineError("unlisted engine error"), 500, contract.STATUS_ERROR),
        (RuntimeError("bug"), 500, contract.STATUS_ERROR),
    ],
)
def test_error_table_maps_each_type_to_one_answer(error: Exception, status: int, outcome: str) -> None:
    row = answer_for(error)
    assert (row.status_code, row.outcome) == (status, outcome)
    body = error_body("message", row, "prompt")
    assert body == {"error": {"message": "message", "type": row.type, "param": "prompt", "code": row.code}}


def test_only_queue_full_carries_retry_after_and_every_table_row_is_4xx_or_5xx() -> None:
    assert retry_after_seconds(QueueFull(0.2)) == 1
    assert retry_after_seconds(QueueFull(3.4)) == 3
    assert retry_after_seconds(Draining("x")) is None
    assert all(400 <= row.status_code < 600 for row in ERROR_TABLE.values())
