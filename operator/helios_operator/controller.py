"""One reconcile of one HeliosDeployment on Kubernetes: read, observe, measure, step, act, report.

Knows nothing of kopf: `handlers` passes the object's body in. Never raises for bad input: a spec
that cannot work becomes a Ready=False condition and a Warning Event, and the serving workers are
left untouched; API failures become a Degraded condition and the next reconcile retries.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from typing import Any

from helios_operator import conditions, operator_metrics
from helios_operator.model import (
    EmitEvent,
    EnsureWorker,
    HeliosSpec,
    SpecError,
    Status,
    StepInput,
    StepResult,
    TelemetrySnapshot,
)
from helios_operator.platforms.kubernetes import KubeApiError, KubernetesPlatform, Owner
from helios_operator.settings import Settings
from helios_operator.telemetry import PrometheusTelemetry, TelemetryProvider

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Outcome:
    result: str  # ok | spec_error | platform_error | error
    status: Status
    telemetry: TelemetrySnapshot | None = None
    requeue_after: float | None = None
    actions: tuple[Any, ...] = ()


CONFLICT_RETRIES = 3


class StatusConflict(Exception):
    """The status write lost a resourceVersion race (409): the step's decision rests on an old object."""


@dataclass
class Controller:
    settings: Settings
    platform: KubernetesPlatform
    telemetry: TelemetryProvider
    _locks: dict[tuple[str, str], asyncio.Lock] = field(default_factory=dict)
    _wakeups: dict[tuple[str, str], asyncio.Event] = field(default_factory=dict)

    def lock(self, namespace: str, name: str) -> asyncio.Lock:
        return self._locks.setdefault((namespace, name), asyncio.Lock())

    def wakeup(self, namespace: str, name: str) -> asyncio.Event:
        """Set by a change to the object; its resync loop reconciles at once instead of at its next tick."""
        return self._wakeups.setdefault((namespace, name), asyncio.Event())


def make_controller(settings: Settings, telemetry: TelemetryProvider | None = None) -> Controller:
    provider = telemetry or PrometheusTelemetry(
        settings.prometheus_url, timeout_s=settings.query_timeout_s, stale_after_s=settings.stale_after_s
    )
    platform = KubernetesPlatform(service_monitors=settings.service_monitors)
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


async def reconcile_once(body: Mapping[str, Any], controller: Controller, *, now: float | None = None) -> Outcome:
    """Reconcile one HeliosDeployment once, under its lock; report the outcome to metrics."""
    owner = owner_of(body)
    clock = time.time() if now is None else now
    async with controller.lock(owner.namespace, owner.name):
        try:
            for _ in range(CONFLICT_RETRIES):
                try:
                    outcome = await _reconcile(body, controller, owner, clock)
                    break
                except StatusConflict:
                    # Another writer changed the object since `body` was read: nothing was acted on;
                    # decide again from the object as it is now.
                    fresh = await asyncio.to_thread(controller.platform.get_owner, owner)
                    if fresh is None:
                        return Outcome("gone", read_status(body))
                    body = fresh
            else:
                outcome = Outcome("conflict", read_status(body), requeue_after=1.0)
        except Exception as err:  # a bug must not stop the loop; say it in status and retry
            log.exception("reconciling %s/%s failed", owner.namespace, owner.name)
            outcome = await _report_platform_error(
                controller.platform, owner, read_status(body), f"{type(err).__name__}: {err}", clock, "Error"
            )
            outcome = replace(outcome, result="error")
    operator_metrics.record_reconcile(owner.namespace, owner.name, outcome.status, outcome.telemetry, outcome.result)
    return outcome


async def _reconcile(body: Mapping[str, Any], controller: Controller, owner: Owner, now: float) -> Outcome:
    from helios_operator import reconcile, resources  # the step and the builders (pure)

    platform = controller.platform
    status = read_status(body)
    generation = int((body.get("metadata") or {}).get("generation") or 0)
    try:
        spec = read_spec(body, controller.settings)
    except SpecError as err:
        return await _report_spec_error(platform, owner, status, str(err), now)

    try:
        observed = await asyncio.to_thread(platform.observe, owner)
    except Exception as err:  # an unreachable API must not crash the operator
        return await _report_platform_error(platform, owner, status, f"observing children failed: {err}", now)
    try:
        snapshot = await controller.telemetry(owner.namespace, owner.name, spec)
    except Exception as err:  # a provider bug is a telemetry outage, not a crash
        snapshot = TelemetrySnapshot("PrometheusError", f"{type(err).__name__}: {err}")

    result: StepResult = reconcile.step(
        StepInput(
            name=owner.name,
            generation=generation,
            spec=spec,
            status=status,
            observed=observed,
            telemetry=snapshot,
            now=now,
        )
    )

    def worker_manifest(action: EnsureWorker) -> dict[str, Any]:
        return resources.worker_deployment(owner.name, owner.namespace, spec, action)

    def service_manifest(pool: str) -> dict[str, Any]:
        return resources.stable_service(owner.name, owner.namespace, pool)

    def act(actions: tuple[Any, ...]) -> None:
        platform.execute(owner, actions, worker_manifest=worker_manifest, service_manifest=service_manifest)

    def failed(status: Status, err: Exception) -> Status:
        why = f"{type(err).__name__}: {err}"[:1000]
        return status.with_changes(
            conditions=conditions.set_condition(status.conditions, conditions.DEGRADED, "True", "PlatformError",
                                                why, now)
        )

    # The order survives a kill at any point: the Events (at least once), then the status (what was
    # decided), then the objects it implies. Killed in between, the status is ahead of the objects and
    # the next step completes them (a diff); a status behind them would replay a phase already left
    # and undo its work (move the Service back, re-create drained workers). Nothing is done to the
    # objects that the status does not record: if it cannot be written, the next reconcile retries.
    events = tuple(a for a in result.actions if isinstance(a, EmitEvent))
    changes = tuple(a for a in result.actions if not isinstance(a, EmitEvent))
    new_status = result.status
    outcome = "ok"
    try:
        await asyncio.to_thread(act, events)
    except Exception as err:  # PlatformError; Events never hold the switch back
        outcome, new_status = "platform_error", failed(new_status, err)
    version = str((body.get("metadata") or {}).get("resourceVersion") or "") or None
    try:
        version = await asyncio.to_thread(platform.patch_status, owner, new_status.to_dict(), version) or None
    except KubeApiError as err:
        if err.status == 409:
            raise StatusConflict(str(err)) from err
        log.warning("patching the status of %s failed: %s; its actions wait for the next reconcile", owner.name, err)
        return Outcome("platform_error", new_status, snapshot, result.requeue_after, result.actions)
    except Exception as err:
        log.warning("patching the status of %s failed: %s; its actions wait for the next reconcile", owner.name, err)
        return Outcome("platform_error", new_status, snapshot, result.requeue_after, result.actions)
    try:
        await asyncio.to_thread(act, changes)
        await asyncio.to_thread(
            platform.ensure_monitoring,
            owner,
            resources.metrics_service(owner.name, owner.namespace),
            resources.service_monitor(owner.name, owner.namespace),
        )
    except Exception as err:  # PlatformError, or a manifest the API cannot take
        outcome, new_status = "platform_error", failed(new_status, err)
        try:
            await asyncio.to_thread(platform.patch_status, owner, new_status.to_dict(), version)
        except Exception as err2:
            log.warning("patching the status of %s failed: %s", owner.name, err2)
    return Outcome(outcome, new_status, snapshot, result.requeue_after, result.actions)


async def _report_spec_error(
    platform: KubernetesPlatform, owner: Owner, status: Status, message: str, now: float
) -> Outcome:
    """Ready=False with the reason, one Warning Event per new message; workers are left as they are."""
    old = status.condition(conditions.READY)
    new_status = status.with_changes(
        conditions=conditions.set_condition(status.conditions, conditions.READY, "False", "InvalidSpec", message, now)
    )
    try:
        if old is None or old.reason != "InvalidSpec" or old.message != message:
            await asyncio.to_thread(platform.emit_event, owner, EmitEvent("InvalidSpec", message, "Warning"))
        await asyncio.to_thread(platform.patch_status, owner, new_status.to_dict())
    except Exception as err:
        log.warning("reporting the spec error of %s failed: %s", owner.name, err)
    return Outcome("spec_error", new_status)


async def _report_platform_error(
    platform: KubernetesPlatform, owner: Owner, status: Status, message: str, now: float,
    reason: str = "PlatformError",
) -> Outcome:
    new_status = status.with_changes(
        conditions=conditions.set_condition(status.conditions, conditions.DEGRADED, "True", reason, message[:1000], now)
    )
    try:
        await asyncio.to_thread(platform.patch_status, owner, new_status.to_dict())
    except Exception as err:
        log.warning("reporting the platform error of %s failed: %s", owner.name, err)
    return Outcome("platform_error", new_status)


async def forget(body: Mapping[str, Any], controller: Controller) -> None:
    """The object is gone: drop what the operator holds for it. Its children are not touched: they
    carry ownerReferences, and the API server's garbage collector deletes them (no finalizer)."""
    owner = owner_of(body)
    operator_metrics.forget(owner.namespace, owner.name)
    controller._locks.pop((owner.namespace, owner.name), None)
    controller._wakeups.pop((owner.namespace, owner.name), None)


__all__ = ["Controller", "Outcome", "forget", "make_controller", "reconcile_once"]
