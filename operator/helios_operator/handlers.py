"""kopf registrations only: each handler is one call into `controller` (or `leader`).

Run with `helios operator` (main.py) or `kopf run -m helios_operator.handlers`. Settings come from
flags and HELIOS_* variables (settings.py). The state kopf's handlers share lives in kopf's memo;
what is chosen before kopf starts (the settings, a telemetry provider that replaces Prometheus, as
the tests do, the leader Lease already taken) lives in the one `controls` object.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
from dataclasses import dataclass
from typing import Any

import kopf

from helios_operator import controller, leader
from helios_operator.adapters import metrics
from helios_operator.adapters.kubernetes import KubernetesPlatform, configure_client
from helios_operator.adapters.prometheus import TelemetryProvider
from helios_operator.core import names
from helios_operator.settings import Settings, load_settings


@dataclass
class Controls:
    """Set before kopf starts; None: settings from HELIOS_* at start-up, telemetry from Prometheus,
    and the leader Lease (when leader election is on) taken in the startup handler."""

    settings: Settings | None = None
    telemetry: TelemetryProvider | None = None
    lease: leader.LeaseLock | None = None


controls = Controls()
_RESOURCE = (names.GROUP, names.VERSION, names.PLURAL)


@kopf.on.login()
def login(**kwargs: Any) -> kopf.ConnectionInfo | None:
    info: kopf.ConnectionInfo | None = kopf.login_with_service_account(**kwargs) or kopf.login_with_kubeconfig(**kwargs)
    return info


@kopf.on.startup()
async def startup(settings: kopf.OperatorSettings, memo: kopf.Memo, **_: Any) -> None:
    ours = controls.settings or load_settings([], os.environ)
    logging.getLogger("helios_operator").setLevel(ours.log_level)
    configure_client()
    if controls.lease is not None:  # taken by `helios operator` before kopf started
        memo.leader = leader.keep_leading(controls.lease)
    elif ours.leader_election_lease:  # kopf runs no handler until every startup handler returns
        memo.leader = await leader.lead(ours.leader_election_lease)
    settings.posting.level = logging.WARNING  # kopf's own log-to-Event posting: warnings only
    platform = KubernetesPlatform(service_monitors=ours.service_monitors, monitor_labels=ours.monitor_labels)
    memo.controller = controller.make_controller(ours, platform, controls.telemetry)
    memo.loops = {}
    memo.metrics_server = metrics.serve(ours.metrics_port, ours.metrics_host)


@kopf.on.cleanup()
async def cleanup(memo: kopf.Memo, **_: Any) -> None:
    lead = memo.get("leader")
    if lead is not None:
        lead.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await lead
    await controller.stop_loops(memo.get("loops") or {})
    server = getattr(memo, "metrics_server", None)
    if server is not None:
        server.shutdown()
        server.server_close()


@kopf.on.update(*_RESOURCE, field="spec")
async def spec_changed(body: kopf.Body, memo: kopf.Memo, **_: Any) -> None:
    """Wake the resync loop rather than reconcile here: a handler's body is the object as it was at the
    event, and its status may be older than the one the loop last wrote; the loop's body is live."""
    controller.wake(body, memo.controller)


@kopf.on.event(*_RESOURCE)
async def watched(event: kopf.RawEvent, memo: kopf.Memo, **_: Any) -> None:
    """Every watch event: one resync loop per live object (no daemon, so no finalizer)."""
    await controller.watched(event, memo.loops, memo.controller)
