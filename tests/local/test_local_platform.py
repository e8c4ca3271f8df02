"""The local platform runs the operator's actions as real processes on loopback.

Most tests start `fake_worker.py` (a real uvicorn server taking the worker's flags) so process
management is tested in seconds; the last ones start the real worker on a trained model.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import os
import signal
import sys
from collections.abc import AsyncIterator, Callable, Sequence
from pathlib import Path

import httpx
import pytest

from helios_local.platform import LocalEvent, LocalPlatform, worker_command
from helios_local.prometheus import LocalPrometheus
from helios_local.router import Router
from helios_local.runner import LocalRunner
from helios_operator.core.types import (
    Candidate,
    DeleteWorker,
    EmitEvent,
    EnsureWorker,
    HeliosSpec,
    Observed,
    Owner,
    PointService,
)

FAKE_WORKER = Path(__file__).with_name("fake_worker.py")
SPEC = HeliosSpec(candidates=(Candidate("tiny", "/models/tiny"), Candidate("small", "/models/small")))
OWNER = Owner("local", "demo", "")  # a LocalPlatform serves one HeliosDeployment
pytestmark = pytest.mark.timeout(180)


def fake_command(args: Sequence[str]) -> list[str]:
    return [sys.executable, str(FAKE_WORKER), *args]


def ensure(name: str, pool: str, replicas: int = 1, candidate: str = "tiny", depth: int = 2) -> EnsureWorker:
    return EnsureWorker(name, candidate, f"/models/{candidate}", depth, "serve", pool, replicas)


@pytest.fixture
async def platform(tmp_path: Path) -> AsyncIterator[LocalPlatform]:
    router = Router(retry_seconds=5.0)
    await router.start()
    p = LocalPlatform("demo", SPEC, router, tmp_path / "logs", command=fake_command, drain_timeout_s=20)
    try:
        yield p
    finally:
        await p.close()
        await router.close()


async def observe_until(p: LocalPlatform, done: Callable[[Observed], bool], timeout: float = 30.0) -> Observed:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while True:
        observed = await p.observe(OWNER)
        if done(observed):
            return observed
        assert loop.time() < deadline, f"timed out; last observed {observed}"
        await asyncio.sleep(0.2)


def ready(name: str, n: int) -> Callable[[Observed], bool]:
    return lambda o: (w := o.worker(name)) is not None and w.ready_replicas == n


def test_the_worker_command_is_python_dash_m_helios_worker_with_the_given_arguments() -> None:
    assert worker_command(["--model", "/m"]) == [sys.executable, "-m", "helios_worker", "--model", "/m"]


async def test_a_local_worker_gets_the_flags_its_container_gets_but_where_it_listens(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """One builder (core/worker_args): the local process and the Deployment's container parse, with the
    worker's own parser, to the same options; only the address (loopback, port 0 + port file) differs."""
    import argparse

    from helios_operator.core import manifests
    from helios_worker.serve import add_worker_arguments, options_from_args

    started: list[list[str]] = []

    def record(args: Sequence[str]) -> list[str]:
        started.append(list(args))
        return [sys.executable, "-c", "pass"]

    def parse(args: list[str]) -> dict[str, object]:
        parser = argparse.ArgumentParser()
        add_worker_arguments(parser)
        return vars(options_from_args(parser.parse_args(args), env={}))

    spec = dataclasses.replace(SPEC, worker=dataclasses.replace(SPEC.worker, image="helios-worker:test"))
    for action in (ensure("w1", "p", depth=3), dataclasses.replace(ensure("w2", "p", depth=0), role="profile")):
        async with Router() as router:
            p = LocalPlatform("demo", spec, router, tmp_path, command=record)
            await p.apply(OWNER, spec, [action])
            await p.close()
        container = manifests.worker_deployment("demo", "ns", spec, action)["spec"]["template"]["spec"]["containers"][0]
        local, cluster = parse(started[-1]), parse(container["args"])
        assert local.pop("host") == "127.0.0.1" and cluster.pop("host") == "0.0.0.0"
        assert local.pop("port") == 0 and cluster.pop("port") == 8000
        assert str(local.pop("port_file")).endswith(".port") and cluster.pop("port_file") is None
        assert local == cluster
        assert local["drain_timeout"] == 30


async def test_ensure_worker_starts_replicas_as_processes_and_reports_them_ready(platform: LocalPlatform) -> None:
    await platform.apply(OWNER, SPEC, [ensure("hd-tiny-l2", "hd-tiny-l2", replicas=2)])
    first = await platform.observe(OWNER)
    assert first.worker("hd-tiny-l2") is not None and first.service_pool is None
    observed = await observe_until(platform, ready("hd-tiny-l2", 2))
    w = observed.worker("hd-tiny-l2")
    assert w is not None and (w.candidate, w.depth, w.role, w.replicas) == ("tiny", 2, "serve", 2)
    assert len(platform.endpoints()) == 2 and set(platform.endpoints().values()) == {"hd-tiny-l2"}
    assert all(v > 0 for v in platform.resident_bytes().values())
    # Idempotent: the same action again starts nothing new.
    pids = {r.process.pid for r in platform._workers["hd-tiny-l2"].replicas}
    await platform.apply(OWNER, SPEC, [ensure("hd-tiny-l2", "hd-tiny-l2", replicas=2)])
    assert {r.process.pid for r in platform._workers["hd-tiny-l2"].replicas} == pids


async def test_point_service_routes_the_stable_endpoint_to_the_pool(platform: LocalPlatform) -> None:
    await platform.apply(OWNER, SPEC, [ensure("w1", "pool-a", replicas=2), PointService("pool-a")])
    observed = await observe_until(platform, ready("w1", 2))
    assert observed.service_pool == "pool-a"
    async with httpx.AsyncClient(timeout=10) as client:
        answers = [await client.post(platform.router.url + "/v1/completions", json={}) for _ in range(4)]
    assert [a.status_code for a in answers] == [200] * 4
    assert len({a.json()["worker"]["port"] for a in answers}) == 2


async def test_scaling_down_drains_the_extra_process(platform: LocalPlatform) -> None:
    await platform.apply(OWNER, SPEC, [ensure("w1", "p", replicas=2)])
    await observe_until(platform, ready("w1", 2))
    gone = platform._workers["w1"].replicas[-1].process
    await platform.apply(OWNER, SPEC, [ensure("w1", "p", replicas=1)])
    await asyncio.wait_for(gone.wait(), 20)
    observed = await observe_until(platform, ready("w1", 1))
    w = observed.worker("w1")
    assert w is not None and w.replicas == 1 and len(platform.endpoints()) == 1


async def test_a_switch_under_load_drops_no_request(platform: LocalPlatform) -> None:
    """The operator's switch, run as actions: new worker ready, point, delete the old one."""
    await platform.apply(OWNER, SPEC, [ensure("old", "old"), PointService("old")])
    await observe_until(platform, ready("old", 1))
    old_proc = platform._workers["old"].replicas[0].process
    statuses: list[int] = []
    served_by: list[str] = []
    stop = asyncio.Event()

    async def client_loop(client: httpx.AsyncClient, stream: bool) -> None:
        while not stop.is_set():
            body = {"stream": stream, "max_tokens": 4, "delay": 0.05}
            resp = await client.post(platform.router.url + "/v1/completions", json=body)
            statuses.append(resp.status_code)
            if stream:
                assert resp.text.rstrip().endswith("data: [DONE]")
                first = resp.text.split("\n", 1)[0].removeprefix("data: ")
                served_by.append(json.loads(first)["worker"]["candidate"])
            else:
                served_by.append(resp.json()["worker"]["candidate"])

    async with httpx.AsyncClient(timeout=30) as client:
        tasks = [asyncio.create_task(client_loop(client, i % 2 == 0)) for i in range(4)]
        await asyncio.sleep(0.5)
        await platform.apply(OWNER, SPEC, [ensure("new", "new", candidate="small", depth=3)])
        await observe_until(platform, ready("new", 1))
        await platform.apply(OWNER, SPEC, [PointService("new"), DeleteWorker("old")])
        observed = await platform.observe(OWNER)
        assert observed.worker("old") is None and observed.service_pool == "new"
        await asyncio.wait_for(old_proc.wait(), 20)
        await asyncio.sleep(0.5)
        stop.set()
        await asyncio.gather(*tasks)
    assert statuses and set(statuses) == {200}
    assert "tiny" in served_by and served_by[-1] == "small"
    assert platform.router.stats.failed == 0


async def test_a_changed_template_rolls_the_worker_with_no_failed_request(platform: LocalPlatform) -> None:
    """A spec change (env, image, dtype...) under the same worker name: new processes first, then the
    old ones drain, as a Deployment with maxUnavailable 0 does."""
    first = dataclasses.replace(ensure("w1", "p", replicas=2), template="aaaa")
    await platform.apply(OWNER, SPEC, [first, PointService("p")])
    await observe_until(platform, ready("w1", 2))
    old = [r.process for r in platform._workers["w1"].replicas]
    statuses: list[int] = []
    stop = asyncio.Event()

    async def client_loop(client: httpx.AsyncClient) -> None:
        while not stop.is_set():
            resp = await client.post(platform.router.url + "/v1/completions", json={"max_tokens": 2, "delay": 0.05})
            statuses.append(resp.status_code)

    async with httpx.AsyncClient(timeout=30) as client:
        tasks = [asyncio.create_task(client_loop(client)) for _ in range(3)]
        await asyncio.sleep(0.3)
        await platform.apply(OWNER, SPEC, [dataclasses.replace(first, template="bbbb")])
        observed = await observe_until(platform, lambda o: not platform._workers["w1"].retiring)
        await asyncio.gather(*(asyncio.wait_for(proc.wait(), 20) for proc in old))
        await asyncio.sleep(0.3)
        stop.set()
        await asyncio.gather(*tasks)
    w = observed.worker("w1")
    assert w is not None and w.template == "bbbb" and w.ready_replicas == 2
    assert {r.process.pid for r in platform._workers["w1"].replicas}.isdisjoint({p.pid for p in old})
    assert statuses and set(statuses) == {200} and platform.router.stats.failed == 0


async def test_a_crashed_worker_process_is_replaced_and_reported(platform: LocalPlatform) -> None:
    await platform.apply(OWNER, SPEC, [ensure("w1", "p")])
    await observe_until(platform, ready("w1", 1))
    victim = platform._workers["w1"].replicas[0].process
    os.kill(victim.pid, signal.SIGKILL)
    await victim.wait()
    await observe_until(platform, lambda o: any(e.reason == "WorkerExited" for e in platform.events))
    observed = await observe_until(platform, ready("w1", 1), timeout=40)
    assert observed.worker("w1") is not None
    assert platform._workers["w1"].replicas[0].process.pid != victim.pid
    assert platform._workers["w1"].restarts == 1


async def test_events_are_recorded_and_handed_to_the_listener(tmp_path: Path) -> None:
    seen: list[LocalEvent] = []
    async with Router() as router:
        p = LocalPlatform("demo", SPEC, router, tmp_path, command=fake_command, on_event=seen.append)
        await p.apply(OWNER, SPEC, [EmitEvent("Switching", "tiny@2 -> small@3"), EmitEvent("Breach", "60%", "Warning")])
        await p.close()
    assert [(e.reason, e.type) for e in p.events] == [("Switching", "Normal"), ("Breach", "Warning")]
    assert seen == p.events


async def test_close_drains_every_worker(tmp_path: Path) -> None:
    async with Router() as router:
        p = LocalPlatform("demo", SPEC, router, tmp_path, command=fake_command, drain_timeout_s=20)
        await p.apply(OWNER, SPEC, [ensure("a", "a"), ensure("b", "b")])
        await observe_until(p, lambda o: all(w.ready_replicas == 1 for w in o.workers))
        procs = [r.process for w in p._workers.values() for r in w.replicas]
        await p.close()
    assert all(proc.returncode is not None for proc in procs)
    assert p.endpoints() == {} and p.draining == 0


# ---------------------------------------------------------------------------------------------
# The loop: the operator's own step driving the local platform


async def test_the_runner_drives_the_platform_with_the_operators_step(platform: LocalPlatform) -> None:
    """First ticks of a deployment: profiling workers for every candidate, the Service on their pool."""
    runner = LocalRunner("demo", SPEC, platform, interval_s=0.2)
    first = await runner.tick()
    assert runner.status.phase == "Profiling"
    started = {a.candidate for a in first.result.actions if isinstance(a, EnsureWorker) and a.role == "profile"}
    assert started == {"tiny", "small"}
    assert any(isinstance(a, EmitEvent) and a.reason == "ProfilingStarted" for a in first.result.actions)
    for _ in range(150):
        tick = await runner.tick()
        if tick.observed.service_pool and len(platform.endpoints()) == 2:
            break
        await asyncio.sleep(0.2)
    assert tick.observed.service_pool is not None and tick.observed.service_pool.startswith("demo-p1")
    tick = await runner.tick()
    assert tick.telemetry.available, tick.telemetry.message
    assert {w.candidate for w in tick.telemetry.workers} == {"tiny", "small"}
    async with httpx.AsyncClient(timeout=10) as client:
        resp = await client.post(platform.router.url + "/v1/completions", json={})
    assert resp.status_code == 200 and resp.json()["worker"]["candidate"] in {"tiny", "small"}


@pytest.mark.skipif(not LocalPrometheus.available(), reason="the prometheus binary is not installed")
async def test_a_local_prometheus_reads_the_workers_like_the_clusters_does(
    platform: LocalPlatform, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # A relative directory, as `helios demo --out demo-out` gives it: Prometheus resolves file_sd paths
    # against its config file, so a relative targets path once left it scraping nothing.
    monkeypatch.chdir(tmp_path)
    prom = LocalPrometheus(Path("prom"))
    await prom.start()
    try:
        await platform.apply(OWNER, SPEC, [ensure("demo-tiny-l2", "p"), PointService("p")])
        await observe_until(platform, ready("demo-tiny-l2", 1))
        read = prom.source("demo")
        snapshot = await read(platform)
        targets = json.loads(prom.targets_path.read_text())
        assert targets == [{"targets": [platform.endpoints().popitem()[0][7:]], "labels": {"worker": "demo-tiny-l2"}}]
        for _ in range(50):
            snapshot = await read(platform)
            if snapshot.available:
                break
            await asyncio.sleep(0.3)
        assert snapshot.available, snapshot.message
        w = snapshot.worker("demo-tiny-l2")
        assert w is not None and (w.candidate, w.depth) == ("tiny", 2)
    finally:
        await prom.close()


async def test_a_worker_that_cannot_start_is_reported_as_crash_looping(tmp_path: Path) -> None:
    def broken(args: Sequence[str]) -> list[str]:
        return [sys.executable, "-c", "import sys; print('no such model'); sys.exit(3)"]

    async with Router() as router:
        p = LocalPlatform("demo", SPEC, router, tmp_path, command=broken)
        await p.apply(OWNER, SPEC, [ensure("w1", "p")])
        await observe_until(p, lambda o: bool(p.crash_looping(restarts=2)), timeout=20)
        message = p.crash_looping(restarts=2)["w1"]
        assert p.crash_looping(restarts=3) == {}  # not yet: a third exit is needed
        await p.close()
    assert "exited with 3" in message and "no such model" in message
    assert [e.reason for e in p.events] == ["WorkerExited", "WorkerExited"]
