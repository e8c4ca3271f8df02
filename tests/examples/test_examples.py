"""Examples are tests: every file in examples/ is driven end to end through the local runner.

The operator's own loop (LocalRunner over a LocalPlatform, the router as the stable Service) profiles
the example's candidates on live requests, decides, and serves. What a single CPU machine cannot do
is substituted, and only that: every candidate's model (hf://, pvc:// or a path this machine lacks)
becomes one of the project's trained presets, `tiny` or `micro`, at that preset's own depth; replicas
become 1 (two cores). Objective, accuracy floor, mode, exit rule, profiling and reassessment settings
are the example's own. Its schema and CEL rules are checked in tests/crd/test_crd_examples.py.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml

from helios_local.demo.run import WORKER_ENV
from helios_local.platform import LocalPlatform
from helios_local.router import Router
from helios_local.runner import LocalRunner
from helios_operator.core.types import HeliosSpec, Status

EXAMPLES = sorted((Path(__file__).resolve().parents[2] / "examples").glob("*.yaml"))
PROMPTS = ("What is 2 + 3?", "Reverse the word stone.", "What is 7 + 1?", "Count the letters in cat.")
pytestmark = [pytest.mark.slow, pytest.mark.timeout(300)]


def local_spec(spec: dict[str, Any], models: Sequence[Path]) -> HeliosSpec:
    """The example's spec with each candidate's model a local preset (in turn) and one replica."""
    candidates = []
    for i, candidate in enumerate(spec["candidates"]):
        model = models[i % len(models)]
        layers = json.loads((model / "config.json").read_text())["num_hidden_layers"]
        candidates.append({**candidate, "model": str(model), "layers": layers})
    return HeliosSpec.from_dict({**spec, "candidates": candidates, "replicas": 1})


async def _traffic(url: str, stop: asyncio.Event, served: list[int]) -> None:
    """Live requests through the stable endpoint: profiling measures real traffic."""
    async with httpx.AsyncClient(base_url=url, timeout=30) as client:
        i = 0
        while not stop.is_set():
            body = {"prompt": PROMPTS[i % len(PROMPTS)], "max_tokens": 8, "temperature": 0.0}
            with contextlib.suppress(httpx.HTTPError):
                served.append((await client.post("/v1/completions", json=body)).status_code)
            i += 1
            await asyncio.sleep(0.05)


def _settled(status: Status, advisory: bool) -> bool:
    decided = any(d.trigger == "profiling" for d in status.decisions)
    if advisory:
        return decided and status.phase == "Serving"
    return decided and status.phase == "Serving" and status.active is not None


@pytest.mark.parametrize("example", EXAMPLES, ids=[p.stem for p in EXAMPLES])
async def test_the_example_is_profiled_decided_and_served_by_the_local_runner(
    example: Path, tiny_model_dir: Path, micro_model_dir: Path, tmp_path: Path
) -> None:
    body = yaml.safe_load(example.read_text())
    name = body["metadata"]["name"]
    spec = local_spec(body["spec"], (tiny_model_dir, micro_model_dir))
    advisory = spec.mode == "advisory"
    served: list[int] = []
    stop = asyncio.Event()
    async with Router(retry_seconds=30.0) as router:
        platform = LocalPlatform(name, spec, router, tmp_path / "logs", env=WORKER_ENV, drain_timeout_s=30)
        runner = LocalRunner(name, spec, platform, interval_s=0.5)
        traffic = asyncio.create_task(_traffic(router.url, stop, served))
        try:
            deadline = time.monotonic() + 240
            while not _settled(runner.status, advisory) and time.monotonic() < deadline:
                tick = await runner.tick()
                await asyncio.sleep(runner.next_delay(tick.result))
            before = len(served)
            await asyncio.sleep(1.0)  # it keeps serving once settled
        finally:
            stop.set()
            await traffic
            await platform.close()
    status = runner.status
    assert _settled(status, advisory), (status.phase, [d.reason for d in status.decisions], status.conditions)
    decision = next(d for d in status.decisions if d.trigger == "profiling")
    assert decision.candidate in {c.name for c in spec.candidates}
    assert decision.applied is not advisory  # advisory decides and reports, never rolls
    if not advisory:
        assert status.active is not None and status.active.candidate == decision.candidate
    assert 200 in served[before:], served[before:]  # the stable endpoint answers once settled
