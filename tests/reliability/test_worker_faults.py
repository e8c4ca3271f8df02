"""A worker process killed (SIGKILL) mid-request: a client talking to it directly sees a bounded,
detectable failure (a cut stream or a dropped connection, never a hang and never a false [DONE]);
a client behind the local router gets a clean JSON error (an SSE error event mid-stream, a 503 when
no worker is left)."""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from tests.reliability.conftest import assert_openai_error, openai_error, sse_payloads
from tests.support.servers import wait_until
from tests.support.workers import WorkerProcess, worker_process

from helios_local.router import Router

pytestmark = pytest.mark.timeout(120)

LONG = {"prompt": "x", "max_tokens": 3000, "temperature": 0, "stream": True}
BOUND = 10.0  # seconds a client may take to learn that its worker died


@pytest.fixture
def worker(chatty_model_dir: Path, tmp_path: Path) -> Iterator[WorkerProcess]:
    args = ["--model", str(chatty_model_dir), "--max-batch", "1", "--max-context", "4096"]
    with worker_process(args, tmp_path) as w:
        yield w


def queue_length(base_url: str) -> float:
    for line in httpx.get(f"{base_url}/metrics", timeout=5).text.splitlines():
        if line.startswith("helios_queue_length{"):
            return float(line.rsplit(" ", 1)[1])
    raise AssertionError("no helios_queue_length")


async def test_sigkill_mid_stream_ends_the_client_stream_with_an_error_not_a_hang(worker: WorkerProcess) -> None:
    url = worker.base_url
    timeout = httpx.Timeout(BOUND, connect=5.0)
    async with httpx.AsyncClient(timeout=timeout) as client:
        # Two streams: one generating (max-batch 1), one queued behind it with no response yet.
        async def waiting() -> BaseException | httpx.Response:
            try:
                return await client.post(f"{url}/v1/completions", json={**LONG, "stream": False})
            except httpx.HTTPError as error:
                return error

        lines: list[str] = []
        async with client.stream("POST", f"{url}/v1/completions", json=LONG) as response:
            assert response.status_code == 200
            chunks = response.aiter_lines()
            while len([x for x in lines if x]) < 3:
                lines.append(await anext(chunks))
            queued = asyncio.create_task(waiting())
            await asyncio.to_thread(wait_until, lambda: queue_length(url) == 1, 10.0)
            worker.process.kill()
            killed = time.monotonic()
            with pytest.raises((httpx.RemoteProtocolError, httpx.ReadError)):
                async for line in chunks:
                    lines.append(line)
            cut_after = time.monotonic() - killed
        outcome = await asyncio.wait_for(queued, BOUND)
        queued_after = time.monotonic() - killed

    print(f"\nafter SIGKILL: stream cut in {cut_after:.2f}s, queued request failed in {queued_after:.2f}s")
    payloads = sse_payloads(lines)
    assert "[DONE]" not in payloads  # a cut stream never looks finished
    assert all(p["choices"][0]["finish_reason"] is None for p in payloads)
    assert cut_after < BOUND
    assert isinstance(outcome, httpx.RemoteProtocolError | httpx.ReadError), outcome
    assert queued_after < BOUND
    assert worker.process.wait(5) == -9


async def test_sigkill_behind_the_router_gives_clean_json_errors(worker: WorkerProcess) -> None:
    url = worker.base_url
    async with Router(retry_seconds=2.0) as router, httpx.AsyncClient(timeout=BOUND) as client:
        router.set_pool("p", [url])
        router.point("p")
        ok = await client.post(f"{router.url}/v1/completions", json={"prompt": "x", "max_tokens": 2})
        assert ok.status_code == 200, ok.text

        async def waiting() -> httpx.Response:
            return await client.post(f"{router.url}/v1/completions", json={**LONG, "stream": False})

        lines: list[str] = []
        async with client.stream("POST", f"{router.url}/v1/completions", json=LONG) as response:
            assert response.status_code == 200
            chunks = response.aiter_lines()
            while len([x for x in lines if x]) < 3:
                lines.append(await anext(chunks))
            queued = asyncio.create_task(waiting())
            await asyncio.to_thread(wait_until, lambda: queue_length(url) == 1, 10.0)
            worker.process.kill()
            killed = time.monotonic()
            async for line in chunks:  # the router ends the stream cleanly: no exception here
                lines.append(line)
            stream_after = time.monotonic() - killed
        late = await asyncio.wait_for(queued, BOUND)
        queued_after = time.monotonic() - killed
        after = await client.post(f"{router.url}/v1/completions", json={"prompt": "x", "max_tokens": 2})

    print(f"\nbehind the router: stream ended in {stream_after:.2f}s, queued request answered in {queued_after:.2f}s")
    payloads = sse_payloads(lines)
    assert "[DONE]" not in payloads
    last = payloads[-1]
    assert set(last) == {"error"} and openai_error(502, json.dumps(last))["code"] == "bad_gateway"
    assert stream_after < BOUND
    # The queued request was taken by the dead worker; with no other worker it is answered 503 once
    # the router's retry window (2 s) is over.
    for response in (late, after):
        assert response.status_code in (502, 503), response.text
        error = assert_openai_error(response, 502, 503)
        assert error["code"] in ("bad_gateway", "no_ready_worker")
    assert queued_after < BOUND
    assert router.stats.failed >= 3
