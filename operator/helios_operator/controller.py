"""The one reconcile loop, for Kubernetes and for the local platform: observe, measure, step, act, report.

Knows nothing of kopf (`handlers` passes the object's body in) nor of where the workers run: it
drives one `Platform`. Never raises for bad input: a spec that cannot work becomes a Ready=False
condition and a Warning Event, and the serving workers are left untouched; platform failures become
a Degraded condition and the next reconcile retries.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, replace
from typing import Any

from helios_operator.adapters import metrics
from helios_operator.adapters.prometheus import PrometheusTelemetry, TelemetryProvider
from helios_operator.core import conditions, reconcile
from helios_operator.core.types import (
    EmitEvent,
    EnsureMonitoring,
    HeliosSpec,
    Observed,
    Owner,
    PlatformAction,
    SpecError,
    Status,
    StepInput,
    StepResult,
    TelemetrySnapshot,
)
from helios_operator.platform import Platform
from helios_operator.settings import Settings

log = logging.getLogger(__name__)

Step = Callable[[StepInput], StepResult]


@dataclass(frozen=True)
class Outcome:
    result: str  # ok | spec_error | platform_error | error
    status: Status
    telemetry: TelemetrySnapshot | None = None
    requeue_after: float | None = None
    actions: tuple[PlatformAction, ...] = ()
    observed: Observed | None = None  # None: the platform could not be observed
    step: StepResult | None = None  # None: the step did not run


@dataclass
class Controller:
    settings: Settings
    platform: Platform
    telemetry: TelemetryProvider
    _locks: dict[tuple[str, str], asyncio.Lock] = field(default_factory=dict)
    _wakeups: dict[tuple[str, str], asyncio.Event] = field(default_factory=dict)

    def lock(self, namespace: str, name: str) -> asyncio.Lock:
        return self._locks.setdefault((namespace, name), asyncio.Lock())

    def wakeup(self, namespace: str, name: str) -> asyncio.Event:
        """Set by a change to the object; its resync loop reconciles at once instead of at its next tick."""
        return self._wakeups.setdefault((namespace, name), asyncio.Event())


def make_controller(settings: Settings, platform: Platform, telemetry: TelemetryProvider | None = None) -> Controller:
    provider = telemetry or PrometheusTelemetry(
        settings.prometheus_url, timeout_s=settings.query_timeout_s, stale_after_s=settings.stale_after_s
    )
    return Controller(settings=settings, platform=platform, telemetry=provider)


def owner_of(body: Mapping[str, Any]) -> Owner:
    meta = body.get("metadata") or {}
    namespace = str(meta.get("namespace") or "default")
    return Owner(namespace=namespace, name=str(meta["name"]), uid=str(meta.get("uid", "")))


def read_spec(body: Mapping[str, Any], settings: Settings) -> HeliosSpec:
    spec = HeliosSpec.from_dict(dict(body.get("spec") or {}))
    if spec.worker.image is None:  # the operator-wide default image
        spec = replace(spec, worker=replace(spec.worker, image=settings.worker_image))
    return spec


def read_status(body: Mapping[str, Any]) -> Status:
    try:
        return Status.from_dict(dict(body.get("status") or {}))
    except (KeyError, TypeError, ValueError) as err:  # a hand-edited status: start over, say why
        log.warning("status of %s is unreadable (%s); starting from an empty status", owner_of(body).name, err)
        return Status()


def wake(body: Mapping[str, Any], controller: Controller) -> None:
    """A change to the object: its resync loop reconciles at once instead of at its next tick."""
    owner = owner_of(body)
    controller.wakeup(owner.namespace, owner.name).set()


async def resync(body: Mapping[str, Any], controller: Controller, stopped: Any) -> None:
    """The one reconcile loop per object under kopf (its daemon): every resync_interval_s, sooner
    when the step asks (requeue_after) or the spec changes (`wakeup`). `stopped` is kopf's flag."""
    owner = owner_of(body)
    wakeup = controller.wakeup(owner.namespace, owner.name)
    while not stopped:
        wakeup.clear()
        outcome = await reconcile_once(body, controller)
        delay = controller.settings.resync_interval_s
        if outcome.requeue_after is not None:
            delay = max(0.05, min(delay, outcome.requeue_after))
        woken, timer = asyncio.ensure_future(wakeup.wait()), asyncio.ensure_future(stopped.wait(delay))
        try:
            await asyncio.wait({woken, timer}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            woken.cancel()
            timer.cancel()


async def reconcile_once(body: Mapping[str, Any], controller: Controller, *, now: float | None = None) -> Outcome:
    """Reconcile one HeliosDeployment's body once, under its lock; report the outcome to metrics."""
    owner = owner_of(body)
    clock = time.time() if now is None else now
    platform = controller.platform
    async with controller.lock(owner.namespace, owner.name):
        status = read_status(body)
        try:
            spec = read_spec(body, controller.settings)
        except SpecError as err:
            outcome = await _report_spec_error(platform, owner, status, str(err), clock)
        else:
            generation = int((body.get("metadata") or {}).get("generation") or 0)
            target = Target(owner, generation, spec, status)
            outcome = await reconcile_spec(platform, controller.telemetry, target, now=clock)
    metrics.record_reconcile(owner.namespace, owner.name, outcome.status, outcome.telemetry, outcome.result)
    return outcome


@dataclass(frozen=True)
class Target:
    """One HeliosDeployment as the loop reads it: who owns the children, and its parsed spec and status."""

    owner: Owner
    generation: int
    spec: HeliosSpec
    status: Status


async def reconcile_spec(
    platform: Platform, telemetry: TelemetryProvider, target: Target, *, now: float, step: Step = reconcile.step
) -> Outcome:
    """One reconcile of a parsed spec on any platform; a bug becomes a Degraded condition, not a crash."""
    try:
        return await _reconcile(platform, telemetry, target, now, step)
    except Exception as err:  # a bug must not stop the loop; say it in status and retry
        owner = target.owner
        log.exception("reconciling %s/%s failed", owner.namespace, owner.name)
        why = f"{type(err).__name__}: {err}"
        outcome = await _report_platform_error(platform, owner, target.status, why, now, "Error")
        return replace(outcome, result="error")


async def _reconcile(
    platform: Platform, telemetry: TelemetryProvider, target: Target, now: float, step: Step
) -> Outcome:
    owner, generation, spec, status = target.owner, target.generation, target.spec, target.status
    try:
        observed = await platform.observe(owner)
    except Exception as err:  # an unreachable API must not crash the operator
        return await _report_platform_error(platform, owner, status, f"observing children failed: {err}", now)
    try:
        snapshot = await telemetry(owner.namespace, owner.name, spec)
    except Exception as err:  # a provider bug is a telemetry outage, not a crash
        snapshot = TelemetrySnapshot("PrometheusError", f"{type(err).__name__}: {err}")

    result = step(StepInput(owner.name, generation, spec, status, observed, snapshot, now))

    # The order survives a kill at any point: the Events (at least once), then the status (what was
    # decided), then the objects it implies. Killed in between, the status is ahead of the objects and
    # the next step completes them (a diff); a status behind them would replay a phase already left
    # and undo its work (move the Service back, re-create drained workers). Nothing is done to the
    # objects that the status does not record: if it cannot be written, the next reconcile retries.
    events = tuple(a for a in result.actions if isinstance(a, EmitEvent))
    changes: tuple[PlatformAction, ...] = (
        *(a for a in result.actions if not isinstance(a, EmitEvent)),
        EnsureMonitoring(),
    )
    new_status = result.status
    outcome = "ok"

    try:
        await platform.apply(owner, spec, events)
    except Exception as err:  # PlatformError; Events never hold the switch back
        outcome, new_status = "platform_error", _failed(new_status, err, now)
    try:
        await platform.write_status(owner, new_status)
    except Exception as err:
        log.warning("writing the status of %s failed: %s; its actions wait for the next reconcile", owner.name, err)
        return Outcome("platform_error", new_status, snapshot, result.requeue_after, result.actions, observed, result)
    try:
        await platform.apply(owner, spec, changes)
    except Exception as err:  # PlatformError, or a manifest the API cannot take
        outcome, new_status = "platform_error", _failed(new_status, err, now)
        try:
            await platform.write_status(owner, new_status)
        except Exception as err2:
            log.warning("writing the status of %s failed: %s", owner.name, err2)
    return Outcome(outcome, new_status, snapshot, result.requeue_after, result.actions, observed, result)


def _failed(status: Status, err: Exception, now: float) -> Status:
    """Degraded=True with the platform's own words: the next reconcile retries."""
    why = f"{type(err).__name__}: {err}"[:1000]
    return status.with_changes(
        conditions=conditions.set_condition(status.conditions, conditions.DEGRADED, "True", "PlatformError", why, now)
    )


async def _report_spec_error(platform: Platform, owner: Owner, status: Status, message: str, now: float) -> Outcome:
    """Ready=False with the reason, one Warning Event per new message; workers are left as they are."""
    old = status.condition(conditions.READY)
    new_status = status.with_changes(
        conditions=conditions.set_condition(status.conditions, conditions.READY, "False", "InvalidSpec", message, now)
    )
    try:
        if old is None or old.reason != "InvalidSpec" or old.message != message:
            await platform.apply(owner, None, (EmitEvent("InvalidSpec", message, "Warning"),))
        await platform.write_status(owner, new_status)
    except Exception as err:
        log.warning("reporting the spec error of %s failed: %s", owner.name, err)
    return Outcome("spec_error", new_status)


async def _report_platform_error(
    platform: Platform,
    owner: Owner,
    status: Status,
    message: str,
    now: float,
    reason: str = "PlatformError",
) -> Outcome:
    new_status = status.with_changes(
        conditions=conditions.set_condition(status.conditions, conditions.DEGRADED, "True", reason, message[:1000], now)
    )
    try:
        await platform.write_status(owner, new_status)
    except Exception as err:
        log.warning("reporting the platform error of %s failed: %s", owner.name, err)
    return Outcome("platform_error", new_status)


async def finalize(body: Mapping[str, Any], controller: Controller) -> None:
    """On deletion: the platform removes the workers and the Services; the object's state is forgotten."""
    owner = owner_of(body)
    async with controller.lock(owner.namespace, owner.name):
        await controller.platform.remove(owner)
    metrics.forget(owner.namespace, owner.name)
    controller._locks.pop((owner.namespace, owner.name), None)


__all__ = [
    "Controller",
    "Outcome",
    "Target",
    "finalize",
    "make_controller",
    "reconcile_once",
    "reconcile_spec",
    "resync",
]
