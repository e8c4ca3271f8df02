"""The worker's HTTP API fuzzed: from its own OpenAPI schema (schemathesis, valid and invalid cases),
with arbitrary JSON and raw bytes (hypothesis), and with 10,000 bad requests over keep-alive while
the worker's resident memory is watched. Every answer is a 200 or a 4xx in OpenAI's error shape;
never a 5xx, never a dead worker, no memory growth."""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import schemathesis
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from schemathesis.checks import not_a_server_error
from schemathesis.generation import GenerationMode
from tests.reliability.conftest import assert_openai_error, openai_error, rss_bytes
from tests.support.workers import WorkerProcess, serve_worker, worker_process

from helios_worker.serve import WorkerOptions

pytestmark = pytest.mark.timeout(150)

CONTEXT = 48
GENERATION = ("/v1/completions", "/v1/chat/completions")
FUZZ = settings(
    max_examples=60,
    deadline=None,
    database=None,
    derandomize=True,  # the same cases on every run: a failure here is reproducible
    suppress_health_check=list(HealthCheck),
)


@pytest.fixture(scope="module")
def base_url(chatty_model_dir: Path) -> Iterator[str]:
    options = WorkerOptions(model=chatty_model_dir, candidate="fuzz", max_batch=8, max_context=CONTEXT)
    with serve_worker(options) as url:
        yield url


@pytest.fixture(scope="module")
def client(base_url: str) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=base_url, timeout=30.0) as c:
        yield c


def check_answer(response: httpx.Response) -> None:
    """200, or a 4xx JSON body in OpenAI's error shape."""
    if response.status_code == 200:
        return
    assert_openai_error(response, *range(400, 500))


def fuzz_operation(operation: Any, mode: Any, base_url: str, statuses: set[int]) -> None:
    """Run schemathesis' cases for one operation; every answer is a 200 or an OpenAI-shaped 4xx."""

    @FUZZ
    @given(case=operation.as_strategy(generation_mode=mode))
    def run(case: Any) -> None:
        response = case.call(base_url=base_url, timeout=30)
        case.validate_response(response, checks=[not_a_server_error])
        statuses.add(response.status_code)
        if response.status_code != 200:
            openai_error(response.status_code, response.content)

    run()


@pytest.mark.parametrize("mode", [GenerationMode.POSITIVE, GenerationMode.NEGATIVE], ids=["valid", "invalid"])
def test_schema_driven_cases_never_get_a_server_error(base_url: str, client: httpx.Client, mode: Any) -> None:
    schema = schemathesis.openapi.from_url(f"{base_url}/openapi.json")
    operations = [result.ok() for result in schema.get_all_operations()]
    paths = {op.path for op in operations}
    assert set(GENERATION) <= paths, paths
    if mode == GenerationMode.NEGATIVE:  # only a body can be invalid: the other routes take no input
        operations = [op for op in operations if op.method.upper() == "POST"]
    seen: dict[str, set[int]] = {}
    for operation in operations:
        fuzz_operation(operation, mode, base_url, seen.setdefault(operation.path, set()))
    print(f"\nschemathesis {mode.value}: statuses by path {seen}")
    for path in GENERATION:  # invalid bodies were refused; valid ones were at least sometimes served
        wanted = seen[path] & {200} if mode == GenerationMode.POSITIVE else seen[path] - {200}
        assert wanted, (path, seen)
    assert client.get("/healthz").status_code == 200


@pytest.mark.parametrize(("temperature", "top_p"), [(5e-324, 1.0), (1.0, 5e-324), (1e-40, 1e-40), (2.0, 1e-45)])
def test_extreme_but_valid_sampling_values_are_served(client: httpx.Client, temperature: float, top_p: float) -> None:
    """Found by the schema fuzzing: a top_p that rounds to 0 in float32, or a temperature that makes
    logits / T overflow, failed the request with a 500; both limits mean greedy decoding."""
    for path, prompt in (("/v1/completions", {"prompt": "1+1="}), ("/v1/chat/completions", CHAT)):
        body = {**prompt, "max_tokens": 3, "temperature": temperature, "top_p": top_p}
        response = client.post(path, json=body)
        assert response.status_code == 200, response.text


CHAT = {"messages": [{"role": "user", "content": "1+1="}]}
JSON_VALUES = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=40),
    lambda children: st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=12), children, max_size=4),
    max_leaves=20,
)
FIELDS = st.sampled_from(
    ["prompt", "messages", "max_tokens", "temperature", "top_p", "n", "stream", "stop", "seed", "logit_bias",
     "stream_options", "max_completion_tokens", "echo", "best_of", "suffix", "logprobs", "model", "user"]
)  # fmt: skip
# Bodies near the real ones: known field names with arbitrary values, so validation goes deep.
NEAR_BODIES = st.dictionaries(FIELDS | st.text(max_size=12), JSON_VALUES, max_size=6)


@FUZZ
@given(path=st.sampled_from(GENERATION), body=JSON_VALUES | NEAR_BODIES)
def test_arbitrary_json_bodies_get_200_or_an_openai_4xx(client: httpx.Client, path: str, body: Any) -> None:
    check_answer(client.post(path, content=json.dumps(body), headers={"content-type": "application/json"}))


@FUZZ
@given(
    path=st.sampled_from(GENERATION),
    body=st.binary(max_size=300),
    content_type=st.sampled_from(["application/json", "text/plain", "application/octet-stream", ""]),
)
def test_raw_bytes_get_an_openai_4xx(client: httpx.Client, path: str, body: bytes, content_type: str) -> None:
    response = client.post(path, content=body, headers={"content-type": content_type} if content_type else {})
    check_answer(response)


# --- 10,000 bad requests, memory watched ----------------------------------------------------------

BAD = [
    ("POST", "/v1/completions", b"{not json"),
    ("POST", "/v1/completions", b'{"prompt": "x", "max_tokens": -1}'),
    ("POST", "/v1/completions", b'{"prompt": "x", "temprature": 0}'),
    ("POST", "/v1/completions", b'{"prompt": "' + b"y" * 400 + b'", "max_tokens": 4}'),
    ("POST", "/v1/completions", b'{"prompt": [1, 2, 99999999]}'),
    ("POST", "/v1/chat/completions", b'{"messages": []}'),
    ("POST", "/v1/chat/completions", b'{"messages": [{"role": "robot", "content": "hi"}]}'),
    ("POST", "/v1/chat/completions", b'{"messages": [{"role": "user", "content": "' + b"z" * 400 + b'"}]}'),
    ("GET", "/v1/completions", b""),
    ("POST", "/v1/nowhere", b"{}"),
]
LEAK_REQUESTS = 10_000
WARMUP_REQUESTS = 1_000
CONNECTIONS = 4
LEAK_BOUND = 20 * 2**20


async def exchange(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, request: bytes) -> tuple[int, bytes]:
    """One request on a keep-alive connection; (status, body). Raw sockets: the client stays cheap,
    so the 2 cores go to the worker."""
    writer.write(request)
    head = await reader.readuntil(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    status = int(lines[0].split(" ", 2)[1])
    headers = dict(line.split(": ", 1) for line in lines[1:] if line)
    length = int(next(v for k, v in headers.items() if k.lower() == "content-length"))
    assert "close" not in {v.lower() for k, v in headers.items() if k.lower() == "connection"}
    return status, await reader.readexactly(length)


def raw_request(method: str, path: str, body: bytes, host: str) -> bytes:
    head = f"{method} {path} HTTP/1.1\r\nHost: {host}\r\nContent-Type: application/json\r\n"
    return (head + f"Content-Length: {len(body)}\r\n\r\n").encode() + body


async def send_all(base_url: str, count: int) -> dict[int, int]:
    """`count` bad requests over CONNECTIONS keep-alive connections; answers by status, each body checked."""
    host, port = base_url.removeprefix("http://").split(":")
    requests = [raw_request(method, path, body, host) for method, path, body in BAD]
    statuses: dict[int, int] = {}

    async def lane(lane_index: int) -> None:
        reader, writer = await asyncio.open_connection(host, int(port))
        try:
            for i in range(lane_index, count, CONNECTIONS):
                status, body = await exchange(reader, writer, requests[i % len(requests)])
                openai_error(status, body)
                statuses[status] = statuses.get(status, 0) + 1
        finally:
            writer.close()
            await writer.wait_closed()

    await asyncio.wait_for(asyncio.gather(*(lane(i) for i in range(CONNECTIONS))), timeout=120)
    return statuses


@pytest.fixture(scope="module")
def worker(chatty_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[WorkerProcess]:
    args = ["--model", str(chatty_model_dir), "--max-context", str(CONTEXT), "--log-level", "warning"]
    with worker_process(args, tmp_path_factory.mktemp("leak")) as w:
        yield w


async def test_ten_thousand_bad_requests_leak_no_memory(worker: WorkerProcess) -> None:
    pid = worker.process.pid
    await send_all(worker.base_url, WARMUP_REQUESTS)
    before = rss_bytes(pid)
    started = time.monotonic()
    statuses = await send_all(worker.base_url, LEAK_REQUESTS)
    seconds = time.monotonic() - started
    growth = rss_bytes(pid) - before
    print(f"\n{LEAK_REQUESTS} bad requests in {seconds:.1f}s; RSS {before / 2**20:.1f} MiB, {growth / 2**20:+.2f} MiB")
    assert sum(statuses.values()) == LEAK_REQUESTS
    assert set(statuses) <= {400, 404, 405}, statuses
    assert growth < LEAK_BOUND, f"RSS grew by {growth / 2**20:.1f} MiB over {LEAK_REQUESTS} bad requests"
    assert worker.process.poll() is None
    assert "Traceback" not in worker.log()
    assert httpx.get(f"{worker.base_url}/readyz").status_code == 200
