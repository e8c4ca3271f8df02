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
    Action,
    EmitEvent,
    EnsureDisruptionBudget,
    EnsureInferencePool,
    EnsureMonitoring,
    HeliosSpec,
    Observed,
    Owner,
    PlatformAction,
    PointService,
    SpecError,
    Status,
    StepInput,
    StepResult,
    TelemetrySnapshot,
)
from helios_operator.platform import Platform, StatusConflict
from helios_operator.settings import Settings

log = logging.getLogger(__name__)

Step = Callable[[StepInput], StepResult]
CONFLICT_RETRIES = 3  # a status write that loses a resourceVersion race: decide again from the fresh object


@dataclass(frozen=True)
class Outcome:
    result: str  # ok | spec_error | platform_error | error | conflict | gone
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
        settings.prometheus_url,
        timeout_s=settings.query_timeout_s,
        stale_after_s=settings.stale_after_s,
        monitor_labels=tuple(sorted(settings.monitor_labels.items())),
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


class ObjectLoop:
    """One live HeliosDeployment's reconcile loop: its latest body (replaced in place by each watch
    event) and the task that reconciles it."""

    def __init__(self, uid: str, body: dict[str, Any]) -> None:
        self.uid = uid
        self.body = body
        self.stop = asyncio.Event()
        self.task: asyncio.Task[None] | None = None


async def watched(event: Mapping[str, Any], loops: dict[tuple[str, str], ObjectLoop], controller: Controller) -> None:
    """A watch event (or the initial listing) of a HeliosDeployment: keep one resync loop per live
    object, fed its latest body, and stop it when the object is gone.

    Fed by a watching handler, not a kopf daemon: kopf puts a finalizer on every object with a daemon,
    and a finalizer blocks deletion while the operator is down. The children carry ownerReferences,
    so the API server's garbage collector removes them; the operator keeps no finalizer."""
    obj = dict(event["object"])
    meta = obj.get("metadata") or {}
    key = (str(meta.get("namespace") or "default"), str(meta.get("name")))
    loop = loops.get(key)
    if event["type"] == "DELETED" or meta.get("deletionTimestamp"):
        if loop is not None and loop.uid == meta.get("uid"):
            loops.pop(key)
            loop.stop.set()
            controller.wakeup(*key).set()
            forget(obj, controller)
        return
    if loop is not None and loop.uid != meta.get("uid"):  # deleted and re-created while we looked away
        loop.stop.set()
        loop = None
    if loop is None:
        loop = ObjectLoop(uid=str(meta.get("uid")), body=obj)
        loop.task = asyncio.create_task(resync(loop, controller), name=f"resync {key[0]}/{key[1]}")
        loops[key] = loop
    else:  # the loop's body is live: replaced in place with the newest object
        changed = (loop.body.get("metadata") or {}).get("generation") != meta.get("generation")
        loop.body.clear()
        loop.body.update(obj)
        if changed:  # a spec change: reconcile the new body now, not at the next tick
            controller.wakeup(*key).set()


async def stop_loops(loops: dict[tuple[str, str], ObjectLoop]) -> None:
    for loop in loops.values():
        loop.stop.set()
    tasks = [loop.task for loop in loops.values() if loop.task is not None]
    if tasks:
        _done, pending = await asyncio.wait(tasks, timeout=5.0)
        for task in pending:
            task.cancel()


async def resync(loop: ObjectLoop, controller: Controller) -> None:
    """The one reconcile loop per object: every resync_interval_s, sooner when the step asks
    (requeue_after) or the spec changes (`wakeup`)."""
    owner = owner_of(loop.body)
    wakeup = controller.wakeup(owner.namespace, owner.name)
    while not loop.stop.is_set():
        wakeup.clear()
        outcome = await reconcile_once(loop.body, controller)
        delay = controller.settings.resync_interval_s
        if outcome.requeue_after is not None:
            delay = max(0.05, min(delay, outcome.requeue_after))
        woken, stopped = asyncio.ensure_future(wakeup.wait()), asyncio.ensure_future(loop.stop.wait())
        try:
            await asyncio.wait({woken, stopped}, timeout=delay, return_when=asyncio.FIRST_COMPLETED)
        finally:
            woken.cancel()
            stopped.cancel()


async def reconcile_once(body: Mapping[str, Any], controller: Controller, *, now: float | None = None) -> Outcome:
    """Reconcile one HeliosDeployment's body once, under its lock; report the outcome to metrics."""
    owner = owner_of(body)
    clock = time.time() if now is None else now
    platform = controller.platform
    async with controller.lock(owner.namespace, owner.name):
        for _ in range(CONFLICT_RETRIES):
            try:
                outcome = await _reconcile_body(body, controller, clock)
                break
            except StatusConflict:
                # Another writer changed the object since `body` was read: nothing was acted on;
                # decide again from the object as it is now.
                fresh = await platform.fetch(owner)
                if fresh is None:
                    return Outcome("gone", read_status(body))
                body = fresh
        else:
            outcome = Outcome("conflict", read_status(body), requeue_after=1.0)
    metrics.record_reconcile(owner.namespace, owner.name, outcome.status, outcome.telemetry, outcome.result)
    return outcome


async def _reconcile_body(body: Mapping[str, Any], controller: Controller, now: float) -> Outcome:
    owner, status = owner_of(body), read_status(body)
    meta = body.get("metadata") or {}
    version = str(meta.get("resourceVersion") or "") or None
    try:
        spec = read_spec(body, controller.settings)
    except SpecError as err:
        return await _report_spec_error(controller.platform, owner, status, str(err), now, version)
    target = Target(owner, int(meta.get("generation") or 0), spec, status, version)
    return await reconcile_spec(controller.platform, controller.telemetry, target, now=now)


@dataclass(frozen=True)
class Target:
    """One HeliosDeployment as the loop reads it: who owns the children, its parsed spec and status,
    and the resourceVersion they were read at (the status write is conditional on it)."""

    owner: Owner
    generation: int
    spec: HeliosSpec
    status: Status
    version: str | None = None


async def reconcile_spec(
    platform: Platform, telemetry: TelemetryProvider, target: Target, *, now: float, step: Step = reconcile.step
) -> Outcome:
    """One reconcile of a parsed spec on any platform; a bug becomes a Degraded condition, not a crash."""
    try:
        return await _reconcile(platform, telemetry, target, now, step)
    except StatusConflict:
        raise  # not a bug: the caller decides again from the fresh object
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
        why = f"observing children failed: {err}"
        return await _report_platform_error(platform, owner, status, why, now, version=target.version)
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
        EnsureDisruptionBudget(),
        *_inference_pool(spec, observed, result.actions),
    )
    new_status = result.status
    outcome = "ok"

    try:
        await platform.apply(owner, spec, events)
    except Exception as err:  # PlatformError; Events never hold the switch back
        outcome, new_status = "platform_error", _failed(new_status, err, now)
    try:
        version = await platform.write_status(owner, new_status, target.version)
    except StatusConflict:
        raise
    except Exception as err:
        log.warning("writing the status of %s failed: %s; its actions wait for the next reconcile", owner.name, err)
        return Outcome("platform_error", new_status, snapshot, result.requeue_after, result.actions, observed, result)
    try:
        await platform.apply(owner, spec, changes)
    except Exception as err:  # PlatformError, or a manifest the API cannot take
        outcome, new_status = "platform_error", _failed(new_status, err, now)
        try:
            await platform.write_status(owner, new_status, version)
        except Exception as err2:
            log.warning("writing the status of %s failed: %s", owner.name, err2)
    return Outcome(outcome, new_status, snapshot, result.requeue_after, result.actions, observed, result)


def _inference_pool(
    spec: HeliosSpec | None, observed: Observed, actions: tuple[Action, ...]
) -> tuple[EnsureInferencePool, ...]:
    """The InferencePool follows the stable Service: the pool this step points it at, else the one it selects."""
    if spec is None or spec.inference_pool is None:
        return ()
    pointed = [a.pool for a in actions if isinstance(a, PointService)]
    pool = pointed[-1] if pointed else observed.service_pool
    return (EnsureInferencePool(pool),) if pool else ()


def _failed(status: Status, err: Exception, now: float) -> Status:
    """Degraded=True with the platform's own words: the next reconcile retries."""
    why = f"{type(err).__name__}: {err}"[:1000]
    return status.with_changes(
        conditions=conditions.set_condition(status.conditions, conditions.DEGRADED, "True", "PlatformError", why, now)
    )


async def _report_spec_error(
    platform: Platform, owner: Owner, status: Status, message: str, now: float, version: str | None = None
) -> Outcome:
    """Ready=False with the reason, one Warning Event per new message; workers are left as they are."""
    old = status.condition(conditions.READY)
    new_status = status.with_changes(
        conditions=conditions.set_condition(status.conditions, conditions.READY, "False", "InvalidSpec", message, now)
    )
    try:
        if old is None or old.reason != "InvalidSpec" or old.message != message:
            await platform.apply(owner, None, (EmitEvent("InvalidSpec", message, "Warning"),))
        await platform.write_status(owner, new_status, version)
    except StatusConflict:
        raise
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
    version: str | None = None,
) -> Outcome:
    new_status = status.with_changes(
        conditions=conditions.set_condition(status.conditions, conditions.DEGRADED, "True", reason, message[:1000], now)
    )
    try:
        await platform.write_status(owner, new_status, version)
    except StatusConflict:
        raise
    except Exception as err:
        log.warning("reporting the platform error of %s failed: %s", owner.name, err)
    return Outcome("platform_error", new_status)


def forget(body: Mapping[str, Any], controller: Controller) -> None:
    """The object is gone: drop what the operator holds for it. Its children are not touched: they
    carry ownerReferences, and the API server's garbage collector deletes them (no finalizer)."""
    owner = owner_of(body)
    metrics.forget(owner.namespace, owner.name)
    controller._locks.pop((owner.namespace, owner.name), None)
    controller._wakeups.pop((owner.namespace, owner.name), None)


__all__ = [
    "Controller",
    "ObjectLoop",
    "Outcome",
    "Target",
    "forget",
    "make_controller",
    "reconcile_once",
    "reconcile_spec",
    "resync",
    "stop_loops",
    "watched",
]
