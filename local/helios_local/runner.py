"""The control loop on one machine: observe -> telemetry -> the operator's own step -> actions.

The Kubernetes handlers and this loop call the same pure `reconcile.step`; only where the actions
land (API objects or local processes) and where telemetry comes from (Prometheus in the cluster,
a direct scrape of the workers here, or a local Prometheus) differ.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

from helios_local.platform import LocalPlatform
from helios_operator.adapters.prometheus import scrape_workers
from helios_operator.core.types import HeliosSpec, Observed, Status, StepInput, StepResult, TelemetrySnapshot

StepFunction = Callable[[StepInput], StepResult]
TelemetrySource = Callable[[LocalPlatform], Awaitable[TelemetrySnapshot]]


async def scrape_telemetry(platform: LocalPlatform) -> TelemetrySnapshot:
    """Read the ready workers' /metrics directly; in a thread, so the router keeps serving."""
    return await asyncio.to_thread(scrape_workers, platform.endpoints())


def default_step() -> StepFunction:
    from helios_operator.core.reconcile import step

    return step


@dataclass(frozen=True)
class Tick:
    """What one iteration saw and did; the demo's display and report read these."""

    time: float
    observed: Observed
    telemetry: TelemetrySnapshot
    result: StepResult


class LocalRunner:
    """Runs the reconcile loop against a LocalPlatform until told to stop."""

    def __init__(
        self,
        name: str,
        spec: HeliosSpec,
        platform: LocalPlatform,
        *,
        step: StepFunction | None = None,
        telemetry: TelemetrySource = scrape_telemetry,
        interval_s: float = 1.0,
        min_interval_s: float = 0.2,
        on_tick: Callable[[Tick], None] | None = None,
    ) -> None:
        self.name = name
        self.spec = spec
        self.platform = platform
        self.status = Status()
        self.generation = 1
        self.ticks = 0
        self.last: Tick | None = None
        self._step = step or default_step()
        self._telemetry = telemetry
        self._interval_s = interval_s
        self._min_interval_s = min_interval_s
        self._on_tick = on_tick

    async def tick(self) -> Tick:
        """One reconcile: the same order as the operator's resync loop."""
        observed = await self.platform.observe()
        telemetry = await self._telemetry(self.platform)
        inp = StepInput(
            name=self.name,
            generation=self.generation,
            spec=self.spec,
            status=self.status,
            observed=observed,
            telemetry=telemetry,
            now=time.time(),
        )
        result = self._step(inp)
        await self.platform.apply(result.actions)
        self.status = result.status
        self.ticks += 1
        tick = Tick(inp.now, observed, telemetry, result)
        self.last = tick
        if self._on_tick is not None:
            self._on_tick(tick)
        return tick

    def next_delay(self, result: StepResult) -> float:
        """The step may ask to run sooner (a rollout in progress); never busier than min_interval_s."""
        delay = self._interval_s if result.requeue_after is None else min(self._interval_s, result.requeue_after)
        return max(delay, self._min_interval_s)

    async def run(self, stop: asyncio.Event) -> None:
        while not stop.is_set():
            tick = await self.tick()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), self.next_delay(tick.result))
