"""The control loop on one machine: the operator's own loop (controller.reconcile_spec) on a LocalPlatform.

The Kubernetes handlers and this runner drive the same loop (observe -> telemetry -> the pure step ->
Events, status, changes) over the `Platform` protocol; only where the actions land (API objects or
local processes) and where telemetry comes from (Prometheus in the cluster, a direct scrape of the
workers here, or a local Prometheus) differ.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

from helios_local.platform import LocalPlatform
from helios_operator import controller
from helios_operator.adapters.prometheus import scrape_workers
from helios_operator.core import conditions, reconcile
from helios_operator.core.types import HeliosSpec, Observed, Owner, Status, StepResult, TelemetrySnapshot
from helios_operator.platform import PlatformError

TelemetrySource = Callable[[LocalPlatform], Awaitable[TelemetrySnapshot]]
NAMESPACE = "local"  # the Owner's namespace; one machine has one


async def scrape_telemetry(platform: LocalPlatform) -> TelemetrySnapshot:
    """Read the ready workers' /metrics directly; in a thread, so the router keeps serving."""
    return await asyncio.to_thread(scrape_workers, platform.endpoints())


@dataclass(frozen=True)
class Tick:
    """What one iteration saw and did; the demo's display and report read these."""

    time: float
    observed: Observed
    telemetry: TelemetrySnapshot
    result: StepResult


class LocalRunner:
    """Runs the operator's reconcile loop against a LocalPlatform until told to stop."""

    def __init__(
        self,
        name: str,
        spec: HeliosSpec,
        platform: LocalPlatform,
        *,
        step: controller.Step = reconcile.step,
        telemetry: TelemetrySource = scrape_telemetry,
        interval_s: float = 1.0,
        min_interval_s: float = 0.2,
        on_tick: Callable[[Tick], None] | None = None,
    ) -> None:
        self.owner = Owner(namespace=NAMESPACE, name=name, uid="")
        self.spec = spec
        self.platform = platform
        self.status = Status()
        self.generation = 1
        self.ticks = 0
        self.last: Tick | None = None
        self._step = step
        self._telemetry = telemetry
        self._interval_s = interval_s
        self._min_interval_s = min_interval_s
        self._on_tick = on_tick

    @property
    def name(self) -> str:
        return self.owner.name

    async def _read_telemetry(self, namespace: str, name: str, spec: HeliosSpec) -> TelemetrySnapshot:
        return await self._telemetry(self.platform)

    async def tick(self) -> Tick:
        """One reconcile through the operator's loop; raises PlatformError where it could not run the step."""
        now = time.time()
        target = controller.Target(self.owner, self.generation, self.spec, self.status)
        outcome = await controller.reconcile_spec(self.platform, self._read_telemetry, target, now=now, step=self._step)
        self.status = outcome.status
        if outcome.step is None or outcome.observed is None or outcome.telemetry is None:
            degraded = outcome.status.condition(conditions.DEGRADED)
            raise PlatformError(degraded.message if degraded else outcome.result)
        self.ticks += 1
        tick = Tick(now, outcome.observed, outcome.telemetry, outcome.step)
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
