"""1,000 concurrent streaming requests against one worker process on loopback: every one either
completes (its stream ends with [DONE]) or is refused with 429 and Retry-After; none hang, none are
lost; the queue and batch stay within their limits and the KV cache within its budget."""

from __future__ import annotations

import asyncio
import resource
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from tests.reliability.conftest import metric_value, openai_error, rss_bytes, sse_payloads
from tests.support.workers import WorkerProcess, worker_process

pytestmark = pytest.mark.timeout(180)

REQUESTS = 1_000
MAX_BATCH = 16
MAX_QUEUE = 64
MAX_CONTEXT = 64
MAX_TOKENS = 4
BOUND = 120.0  # seconds the whole burst may take before it counts as a hang


@pytest.fixture(scope="module")
def worker(chatty_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[WorkerProcess]:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    wanted = min(hard, 8 * REQUESTS) if hard != resource.RLIM_INFINITY else 8 * REQUESTS
    if soft < wanted:  # 1,000 sockets on each side; the worker inherits the limit
        resource.setrlimit(resource.RLIMIT_NOFILE, (wanted, hard))
    args = ["--model", str(chatty_model_dir), "--max-batch", str(MAX_BATCH), "--max-queue", str(MAX_QUEUE),
            "--max-context", str(MAX_CONTEXT), "--log-level", "warning"]  # fmt: skip
    try:
        with worker_process(args, tmp_path_factory.mktemp("load")) as w:
            yield w
    finally:
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))


async def one_stream(client: httpx.AsyncClient, index: int) -> tuple[str, float]:
    """("done", 0) for a stream that ended with [DONE]; ("429", retry_after) for a refusal."""
    body = {"prompt": f"{index % 10}+{index % 7}=", "max_tokens": MAX_TOKENS, "temperature": 0, "stream": True}
    async with client.stream("POST", "/v1/completions", json=body) as response:
        if response.status_code == 429:
            openai_error(429, await response.aread())
            return "429", float(response.headers["retry-after"])
        assert response.status_code == 200, (response.status_code, await response.aread())
        lines = [line async for line in response.aiter_lines()]
    payloads = sse_payloads(lines)
    assert payloads[-1] == "[DONE]", payloads[-3:]
    assert payloads[-2]["choices"][0]["finish_reason"] in ("stop", "length")
    tokens = sum(len(p["choices"][0]["helios"]["exit_layers"]) for p in payloads[:-1])
    assert 1 <= tokens <= MAX_TOKENS
    return "done", 0.0


async def test_a_thousand_concurrent_streams_complete_or_get_429(worker: WorkerProcess) -> None:
    url = worker.base_url
    pid = worker.process.pid
    budget = MAX_BATCH * MAX_CONTEXT * metric_value(httpx.get(f"{url}/metrics").text, "helios_kv_bytes_per_token")
    rss_before = rss_bytes(pid)
    peaks = {"rss": rss_before, "queue": 0.0, "kv": 0.0}
    limits = httpx.Limits(max_connections=REQUESTS, max_keepalive_connections=0)
    timeout = httpx.Timeout(BOUND, connect=30.0, pool=30.0)
    stop = asyncio.Event()

    async def watch(client: httpx.AsyncClient) -> None:
        while not stop.is_set():
            peaks["rss"] = max(peaks["rss"], rss_bytes(pid))
            text = (await client.get(f"{url}/metrics")).text
            peaks["queue"] = max(peaks["queue"], metric_value(text, "helios_queue_length"))
            peaks["kv"] = max(peaks["kv"], metric_value(text, "helios_kv_cache_bytes"))
            await asyncio.sleep(0.1)

    async with (
        httpx.AsyncClient(base_url=url, limits=limits, timeout=timeout) as client,
        httpx.AsyncClient(timeout=30.0) as monitor,
    ):
        watcher = asyncio.create_task(watch(monitor))
        started = time.monotonic()
        outcomes = await asyncio.wait_for(
            asyncio.gather(*(one_stream(client, i) for i in range(REQUESTS)), return_exceptions=True), BOUND
        )
        seconds = time.monotonic() - started
        stop.set()
        await watcher

    errors = [o for o in outcomes if isinstance(o, BaseException)]
    assert not errors, f"{len(errors)} requests failed, e.g. {errors[0]!r}"
    kinds = [o[0] for o in outcomes if not isinstance(o, BaseException)]
    done, refused = kinds.count("done"), kinds.count("429")
    print(
        f"\n{REQUESTS} concurrent streams in {seconds:.1f}s: {done} completed, {refused} got 429; "
        f"peak queue {peaks['queue']:.0f}, KV {peaks['kv'] / 2**20:.2f} MiB of {budget / 2**20:.2f} MiB, "
        f"RSS {rss_before / 2**20:.0f} -> peak {peaks['rss'] / 2**20:.0f} MiB"
    )
    assert done + refused == REQUESTS
    assert done > 0 and refused > 0  # the limits were reached, and work was still served
    assert all(o[1] >= 1 for o in outcomes if not isinstance(o, BaseException) and o[0] == "429")
    assert 0 < peaks["kv"] <= budget
    assert peaks["queue"] <= MAX_QUEUE
    text = httpx.get(f"{url}/metrics").text
    assert metric_value(text, "helios_requests_total", status="rejected") == refused
    assert metric_value(text, "helios_requests_total", status="ok") == done
    assert metric_value(text, "helios_queue_length") == 0
    assert worker.process.poll() is None and "Traceback" not in worker.log()
