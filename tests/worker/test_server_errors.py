"""Every class of bad input gets a 4xx in OpenAI's error shape (never a 500, never a dead worker);
a full queue gets 429 with Retry-After; a bearer token guards /v1 but not the probes or /metrics."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from tests.support.workers import serve_worker

from helios_worker.serve import WorkerOptions

JSON = {"content-type": "application/json"}
CONTEXT = 64


@pytest.fixture(scope="module")
def base_url(tiny_model_dir: Path) -> Iterator[str]:
    options = WorkerOptions(model=tiny_model_dir, layers=2, candidate="tiny", max_context=CONTEXT)
    with serve_worker(options) as url:
        yield url


def requests_total(base_url: str, status: str) -> float:
    for line in httpx.get(f"{base_url}/metrics").text.splitlines():
        if line.startswith("helios_requests_total{") and f'status="{status}"' in line:
            return float(line.rsplit(" ", 1)[1])
    raise AssertionError(f"no helios_requests_total{{status={status!r}}}")


def assert_openai_error(response: httpx.Response, status: int, code: str | None = None) -> dict[str, object]:
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert isinstance(error["message"], str) and error["message"]
    if code is not None:
        assert error["code"] == code
    return error  # type: ignore[no-any-return]


BAD_BODIES = [
    pytest.param("/v1/completions", "{not json", None, "invalid_request", id="bad-json"),
    pytest.param("/v1/completions", '["a list"]', None, "invalid_request", id="not-an-object"),
    pytest.param("/v1/completions", '{"prompt": "x", "max_tokens": -1}', "max_tokens", "invalid_request", id="neg"),
    pytest.param("/v1/completions", '{"prompt": "x", "temprature": 0}', "temprature", "invalid_request", id="unknown"),
    pytest.param("/v1/completions", '{"prompt": 7}', "prompt", "invalid_request", id="wrong-type"),
    pytest.param("/v1/completions", '{"max_tokens": 3}', "prompt", "invalid_request", id="missing-prompt"),
    pytest.param("/v1/completions", '{"prompt": [99999]}', "prompt", "invalid_request", id="token-out-of-vocab"),
    pytest.param("/v1/completions", '{"prompt": "x", "top_p": 5}', "top_p", "invalid_request", id="out-of-range"),
    pytest.param("/v1/completions", f'{{"prompt": "{"y" * CONTEXT}"}}', None, "context_length_exceeded", id="ctx"),
    pytest.param("/v1/completions", '{"prompt": "x", "max_tokens": 1000}', None, "context_length_exceeded", id="mt"),
    pytest.param("/v1/chat/completions", '{"messages": []}', "messages", "invalid_request", id="no-messages"),
    pytest.param("/v1/chat/completions", '{"messages": [{"role": "user"}]}', None, "invalid_request", id="no-content"),
]


@pytest.mark.parametrize(("path", "body", "param", "code"), BAD_BODIES)
def test_bad_requests_get_a_400_in_openai_shape(
    base_url: str, path: str, body: str, param: str | None, code: str
) -> None:
    before = requests_total(base_url, "client_error")
    error = assert_openai_error(httpx.post(f"{base_url}{path}", content=body, headers=JSON), 400, code)
    if param is not None:
        assert str(error["param"]).startswith(param)
    assert requests_total(base_url, "client_error") == before + 1
    assert httpx.post(f"{base_url}/v1/completions", json={"prompt": "1+1=", "max_tokens": 2}).status_code == 200


def test_error_messages_never_echo_the_prompt(base_url: str) -> None:
    secret = "s3cret-prompt-text"
    r = httpx.post(f"{base_url}/v1/completions", json={"prompt": secret, "max_tokens": 1000})
    assert r.status_code == 400 and secret not in r.text
    r = httpx.post(f"{base_url}/v1/completions", json={"prompt": [secret, 5]})
    assert r.status_code == 400 and secret not in r.text
    assert secret not in httpx.get(f"{base_url}/metrics").text


def test_unknown_routes_and_methods_answer_in_openai_shape(base_url: str) -> None:
    assert_openai_error(httpx.get(f"{base_url}/v1/nothing"), 404, "not_found")
    assert_openai_error(httpx.get(f"{base_url}/v1/completions"), 405, "method_not_allowed")
    assert httpx.get(f"{base_url}/healthz").status_code == 200


@pytest.fixture(scope="module")
def tiny_queue_url(tiny_model_dir: Path) -> Iterator[str]:
    options = WorkerOptions(model=tiny_model_dir, layers=2, candidate="tiny", max_batch=1, max_queue=1)
    with serve_worker(options) as url:
        yield url


async def test_a_full_queue_answers_429_with_retry_after(tiny_queue_url: str) -> None:
    async with httpx.AsyncClient(base_url=tiny_queue_url, timeout=120) as client:
        body = {"prompt": "1+2=", "max_tokens": 40, "temperature": 0}
        responses = await asyncio.gather(*(client.post("/v1/completions", json=body) for _ in range(8)))
    codes = sorted(r.status_code for r in responses)
    assert codes.count(200) >= 1, codes
    rejected = [r for r in responses if r.status_code == 429]
    assert rejected, codes
    assert set(codes) <= {200, 429}
    for r in rejected:
        assert_openai_error(r, 429, "queue_full")
        assert int(r.headers["retry-after"]) >= 1
    assert requests_total(tiny_queue_url, "rejected") == len(rejected)


@pytest.fixture(scope="module")
def guarded_url(tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    token_file = tmp_path_factory.mktemp("token") / "token"
    token_file.write_text("let-me-in\n")
    options = WorkerOptions(model=tiny_model_dir, layers=2, candidate="tiny", api_token_file=token_file)
    with serve_worker(options) as url:
        yield url


def test_the_api_token_guards_v1_and_leaves_probes_open(guarded_url: str) -> None:
    body = {"prompt": "1+1=", "max_tokens": 2}
    assert_openai_error(httpx.post(f"{guarded_url}/v1/completions", json=body), 401, "invalid_api_key")
    wrong = {"Authorization": "Bearer nope"}
    assert_openai_error(httpx.post(f"{guarded_url}/v1/completions", json=body, headers=wrong), 401)
    assert_openai_error(httpx.get(f"{guarded_url}/v1/models"), 401)
    right = {"Authorization": "Bearer let-me-in"}
    assert httpx.post(f"{guarded_url}/v1/completions", json=body, headers=right).status_code == 200
    assert httpx.get(f"{guarded_url}/v1/models", headers=right).status_code == 200
    for probe in ("/healthz", "/readyz", "/metrics"):
        assert httpx.get(f"{guarded_url}{probe}").status_code == 200
