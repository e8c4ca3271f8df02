"""The local stand-in for the stable Service, against real uvicorn workers in subprocesses."""

from __future__ import annotations

import asyncio
import json
import signal
import socket
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import httpx
import pytest

from helios_local.router import Router

FAKE_WORKER = Path(__file__).with_name("fake_worker.py")
pytestmark = pytest.mark.timeout(120)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class FakeWorker:
    def __init__(self, candidate: str) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.proc = subprocess.Popen(
            [sys.executable, str(FAKE_WORKER), "--port", str(self.port), "--candidate", candidate],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )

    def wait_ready(self, timeout: float = 30.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            assert self.proc.poll() is None, "the fake worker exited during start-up"
            try:
                if httpx.get(self.url + "/readyz", timeout=1.0).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.1)
        raise AssertionError("the fake worker never became ready")

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait(timeout=10)


@pytest.fixture(scope="module")
def workers() -> Iterator[dict[str, FakeWorker]]:
    started = {name: FakeWorker(name) for name in ("a1", "a2", "b1")}
    try:
        for w in started.values():
            w.wait_ready()
        yield started
    finally:
        for w in started.values():
            w.stop()


@pytest.fixture
async def router(workers: dict[str, FakeWorker]) -> AsyncIterator[Router]:
    r = Router(retry_seconds=1.0)
    await r.start()
    r.set_pool("a", [workers["a1"].url, workers["a2"].url])
    r.set_pool("b", [workers["b1"].url])
    r.point("a")
    try:
        yield r
    finally:
        await r.close()


async def complete(client: httpx.AsyncClient, base: str, **body: object) -> httpx.Response:
    return await client.post(base + "/v1/completions", json={"prompt": "hi", "max_tokens": 3, **body})


async def test_requests_go_round_robin_over_the_active_pool(router: Router) -> None:
    async with httpx.AsyncClient(timeout=10) as client:
        answers = [await complete(client, router.url) for _ in range(6)]
    assert [r.status_code for r in answers] == [200] * 6
    served_by = [r.json()["worker"]["candidate"] for r in answers]
    assert sorted(set(served_by)) == ["a1", "a2"]
    assert served_by.count("a1") == served_by.count("a2") == 3
    assert answers[0].json()["echo"] == "hi"  # the body travels intact


async def test_sse_streams_arrive_incrementally_through_the_router(router: Router) -> None:
    started = time.monotonic()
    arrivals: list[float] = []
    events: list[str] = []
    async with httpx.AsyncClient(timeout=10) as client:
        req = client.build_request(
            "POST", router.url + "/v1/completions", json={"stream": True, "max_tokens": 5, "delay": 0.2}
        )
        resp = await client.send(req, stream=True)
        assert resp.headers["content-type"].startswith("text/event-stream")
        async for line in resp.aiter_lines():
            if line.startswith("data: "):
                events.append(line[6:])
                arrivals.append(time.monotonic() - started)
        await resp.aclose()
    assert events[-1] == "[DONE]"
    assert [json.loads(e)["choices"][0]["text"] for e in events[:-1]] == ["0", "1", "2", "3", "4"]
    assert arrivals[0] < 0.8, "the first token must not wait for the whole stream"
    assert arrivals[-1] >= 1.0


async def test_pointing_at_another_pool_moves_new_requests_and_lets_in_flight_ones_finish(router: Router) -> None:
    async with httpx.AsyncClient(timeout=20) as client:
        slow = asyncio.create_task(complete(client, router.url, stream=True, max_tokens=10, delay=0.1))
        await asyncio.sleep(0.3)
        assert router.in_flight() == 1
        router.point("b")
        after = [await complete(client, router.url) for _ in range(3)]
        streamed = await slow
    assert [r.json()["worker"]["candidate"] for r in after] == ["b1"] * 3
    assert streamed.status_code == 200
    data = [line[6:] for line in streamed.text.splitlines() if line.startswith("data: ")]
    assert data[-1] == "[DONE]" and len(data) == 11
    assert json.loads(data[0])["worker"]["candidate"] in {"a1", "a2"}
    assert router.stats.failed == 0


async def test_no_ready_worker_gives_a_clean_503_json_error(router: Router) -> None:
    router.point("empty")
    async with httpx.AsyncClient(timeout=10) as client:
        resp = await complete(client, router.url)
        ready = await client.get(router.url + "/readyz")
    assert resp.status_code == 503
    assert resp.json()["error"]["code"] == "no_ready_worker"
    assert ready.status_code == 503
    assert router.stats.failed == 1


async def test_unknown_paths_are_not_forwarded(router: Router) -> None:
    async with httpx.AsyncClient(timeout=10) as client:
        resp = await client.get(router.url + "/admin")
        health = await client.get(router.url + "/healthz")
    assert resp.status_code == 404 and "error" in resp.json()
    assert health.status_code == 200


async def test_a_refused_connection_is_retried_on_another_worker(
    router: Router, workers: dict[str, FakeWorker]
) -> None:
    router.set_pool("mixed", [f"http://127.0.0.1:{free_port()}", workers["b1"].url])
    router.point("mixed")
    async with httpx.AsyncClient(timeout=10) as client:
        answers = [await complete(client, router.url) for _ in range(4)]
    assert [r.status_code for r in answers] == [200] * 4
    assert {r.json()["worker"]["candidate"] for r in answers} == {"b1"}
    assert router.stats.retried >= 1 and router.stats.failed == 0


async def test_a_worker_that_dies_before_answering_gives_a_502_json_error() -> None:
    victim = FakeWorker("victim")
    try:
        victim.wait_ready()
        async with Router(retry_seconds=1.0) as r:
            r.set_pool("p", [victim.url])
            r.point("p")
            async with httpx.AsyncClient(timeout=10) as client:
                resp = await client.post(r.url + "/v1/die", json={})
            assert resp.status_code in (502, 503)
            assert resp.json()["error"]["code"] == {502: "bad_gateway", 503: "no_ready_worker"}[resp.status_code]
            assert r.stats.failed == 1
    finally:
        victim.stop()


async def test_a_worker_that_dies_mid_stream_ends_the_stream_with_an_error_event() -> None:
    victim = FakeWorker("victim")
    try:
        victim.wait_ready()
        async with Router(retry_seconds=1.0) as r:
            r.set_pool("p", [victim.url])
            r.point("p")
            async with httpx.AsyncClient(timeout=10) as client:
                resp = await client.post(r.url + "/v1/die", json={"before": 2})
            data = [line[6:] for line in resp.text.splitlines() if line.startswith("data: ")]
            assert resp.status_code == 200  # the head was already sent
            assert len(data) == 3
            assert json.loads(data[-1])["error"]["code"] == "bad_gateway"
            assert r.stats.failed == 1
    finally:
        victim.stop()


async def test_switch_and_drain_under_concurrent_load_drops_nothing() -> None:
    """The switch sequence the platform runs: new pool ready, point, stop routing, SIGTERM old."""
    old, new = FakeWorker("old"), FakeWorker("new")
    try:
        old.wait_ready()
        new.wait_ready()
        async with Router(retry_seconds=5.0) as r:
            r.set_pool("old", [old.url])
            r.set_pool("new", [new.url])
            r.point("old")
            results: list[httpx.Response] = []
            stop = asyncio.Event()

            async def client_loop(client: httpx.AsyncClient, stream: bool) -> None:
                while not stop.is_set():
                    results.append(await complete(client, r.url, stream=stream, max_tokens=4, delay=0.05))

            async with httpx.AsyncClient(timeout=30) as client:
                tasks = [asyncio.create_task(client_loop(client, i % 2 == 0)) for i in range(6)]
                await asyncio.sleep(1.0)
                r.point("new")
                r.remove_member(old.url)
                assert await r.wait_idle(old.url, timeout=10)
                old.proc.send_signal(signal.SIGTERM)
                await asyncio.sleep(1.0)
                stop.set()
                await asyncio.gather(*tasks)
            assert old.proc.wait(timeout=10) in (0, -signal.SIGTERM)  # uvicorn re-raises the signal
    finally:
        old.stop()
        new.stop()
    assert len(results) > 20
    assert [x.status_code for x in results if x.status_code != 200] == []
    assert r.stats.failed == 0
    streamed = [x for x in results if x.headers["content-type"].startswith("text/event-stream")]
    assert streamed and all(x.text.rstrip().endswith("data: [DONE]") for x in streamed)
    assert r.stats.by_upstream.get(old.url, 0) > 0 and r.stats.by_upstream.get(new.url, 0) > 0


async def test_a_curl_style_expect_continue_request_is_forwarded(router: Router) -> None:
    """curl sends `Expect: 100-continue` for bodies over 1 KiB and waits for the go-ahead."""
    host, port = router.url.removeprefix("http://").split(":")
    reader, writer = await asyncio.open_connection(host, int(port))
    body = json.dumps({"prompt": "p" * 2000, "max_tokens": 2}).encode()
    head = (
        f"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
        f"Content-Length: {len(body)}\r\nExpect: 100-continue\r\nConnection: close\r\n\r\n"
    )
    writer.write(head.encode())
    await writer.drain()
    interim = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 2.0)
    assert interim.startswith(b"HTTP/1.1 100")
    writer.write(body)
    await writer.drain()
    answer = await asyncio.wait_for(reader.read(), 10.0)
    writer.close()
    status, _, rest = answer.partition(b"\r\n")
    assert status == b"HTTP/1.1 200 OK"
    assert json.loads(rest.split(b"\r\n\r\n", 1)[1])["echo"] == "p" * 2000
