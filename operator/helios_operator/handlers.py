"""kopf registrations only: each handler is one call into `controller`.

Run with `helios operator` (or `kopf run -m helios_operator.handlers`). Settings come from flags
and HELIOS_* variables (settings.py). `telemetry_provider` may be set before kopf starts to replace
Prometheus (the tests do); None means Prometheus' HTTP API.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import os
import signal
import time
from typing import Any

import kopf

from helios_operator import controller, names, operator_metrics
from helios_operator.settings import Settings, add_arguments, load_settings, settings_from_namespace
from helios_operator.telemetry import TelemetryProvider

telemetry_provider: TelemetryProvider | None = None
configured: Settings | None = None  # set by run_operator; otherwise read from HELIOS_* at start-up
_held_lease: Any = None  # the leader Lease run_operator took before kopf started (leader.LeaseLock)
_RESOURCE = (names.GROUP, names.VERSION, names.PLURAL)


@kopf.on.login()
def login(**kwargs: Any) -> kopf.ConnectionInfo | None:
    info: kopf.ConnectionInfo | None = kopf.login_with_service_account(**kwargs) or kopf.login_with_kubeconfig(**kwargs)
    return info


@kopf.on.startup()
async def startup(settings: kopf.OperatorSettings, memo: kopf.Memo, **_: Any) -> None:
    ours = configured or load_settings([], os.environ)
    logging.getLogger("helios_operator").setLevel(ours.log_level)
    _configure_kubernetes_client()
    if _held_lease is not None:  # taken by run_operator before kopf started
        memo.leader = _keep_leading(_held_lease)
    elif ours.leader_election_lease:
        # kopf runs no handler until every startup handler returns: wait here until we lead.
        memo.leader = await _lead(ours.leader_election_lease)
    settings.posting.level = logging.WARNING  # kopf's own log-to-Event posting: warnings only
    memo.controller = controller.make_controller(ours, telemetry_provider)
    memo.metrics_server = operator_metrics.serve(ours.metrics_port, ours.metrics_host)


async def _lead(lease_name: str) -> asyncio.Task[None]:
    """Take the Lease (waiting while another operator holds it), then keep renewing it."""
    from helios_operator import leader
    from helios_operator.platforms.kubernetes import KubeApi

    namespace, name = leader.parse_lease(lease_name)
    lock = leader.LeaseLock(KubeApi(), namespace, name, leader.identity())
    log = logging.getLogger("helios_operator.leader")
    while not await asyncio.to_thread(_try, lock):
        log.info("waiting for the lease %s/%s (held by another operator)", namespace, name)
        await asyncio.sleep(leader.RENEW_S)
    log.info("leading: holding the lease %s/%s as %s", namespace, name, lock.holder)
    return _keep_leading(lock)


def _wait_for_lease(lease_name: str, liveness: str | None) -> Any:
    """Before kopf starts: take the Lease, waiting while another operator holds it, and answer the
    liveness probe meanwhile (kopf serves it only once its startup handlers are done: a replica
    waiting in one would be killed as dead). Returns the held lock."""
    import http.server
    import threading
    from urllib.parse import urlparse

    from helios_operator import leader
    from helios_operator.platforms.kubernetes import KubeApi

    _configure_kubernetes_client()
    namespace, name = leader.parse_lease(lease_name)
    lock = leader.LeaseLock(KubeApi(), namespace, name, leader.identity())
    log = logging.getLogger("helios_operator.leader")
    server: http.server.HTTPServer | None = None
    if liveness:
        url = urlparse(liveness)

        class Alive(http.server.BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                self.send_response(200)
                self.send_header("Content-Length", "0")
                self.end_headers()

            def log_message(self, *args: Any) -> None:
                pass

        server = http.server.HTTPServer((url.hostname or "0.0.0.0", url.port or 8080), Alive)
        threading.Thread(target=server.serve_forever, name="liveness while waiting", daemon=True).start()
    try:
        while not _try(lock):
            log.info("waiting for the lease %s/%s (held by another operator)", namespace, name)
            time.sleep(leader.RENEW_S)
    finally:
        if server is not None:
            server.shutdown()
            server.server_close()
    log.info("leading: holding the lease %s/%s as %s", namespace, name, lock.holder)
    return lock


def _keep_leading(lock: Any) -> asyncio.Task[None]:
    """Renew the Lease in a task that stops this operator (SIGTERM: kopf shuts down cleanly, the pod
    restarts and waits again) once it can no longer renew within the lease's duration."""
    from helios_operator import leader

    log = logging.getLogger("helios_operator.leader")
    namespace, name = lock.namespace, lock.name

    async def renew() -> None:
        last = asyncio.get_running_loop().time()
        try:
            while True:
                await asyncio.sleep(leader.RENEW_S)
                if await asyncio.to_thread(_try, lock):
                    last = asyncio.get_running_loop().time()
                elif asyncio.get_running_loop().time() - last > lock.duration_s - leader.RENEW_S:
                    log.error("lost the lease %s/%s: stopping, so that only the new leader acts", namespace, name)
                    os.kill(os.getpid(), signal.SIGTERM)
                    return
        except asyncio.CancelledError:
            await asyncio.to_thread(lock.release)
            raise

    return asyncio.create_task(renew(), name="leader lease")


def _try(lock: Any) -> bool:
    try:
        return bool(lock.try_acquire_or_renew())
    except Exception as err:  # an unreachable API: not leading this round
        logging.getLogger("helios_operator.leader").warning("lease: %s", err)
        return False


@kopf.on.cleanup()
async def cleanup(memo: kopf.Memo, **_: Any) -> None:
    lead = memo.get("leader")
    if lead is not None:
        lead.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await lead
    loops: dict[tuple[str, str], _Loop] = memo.get("loops") or {}
    for loop in loops.values():
        loop.stop.set()
    tasks = [loop.task for loop in loops.values() if loop.task is not None]
    if tasks:
        _done, pending = await asyncio.wait(tasks, timeout=5.0)
        for task in pending:
            task.cancel()
    server = getattr(memo, "metrics_server", None)
    if server is not None:
        server.shutdown()
        server.server_close()


def _configure_kubernetes_client() -> None:
    from kubernetes import config

    try:
        config.load_incluster_config()  # type: ignore[no-untyped-call]
    except config.ConfigException:
        # The client reads KUBECONFIG when first imported; read it now, in case it changed since.
        config.load_kube_config(config_file=os.environ.get("KUBECONFIG"))  # type: ignore[no-untyped-call]


@kopf.on.update(*_RESOURCE, field="spec")
async def spec_changed(body: kopf.Body, memo: kopf.Memo, **_: Any) -> None:
    """Wake the resync loop rather than reconcile here: a handler's body is the object as it was at the
    event, and its status may be older than the one the loop last wrote; the loop's body is live."""
    owner = controller.owner_of(body)
    memo.controller.wakeup(owner.namespace, owner.name).set()


@kopf.on.event(*_RESOURCE)
async def watched(event: kopf.RawEvent, memo: kopf.Memo, **_: Any) -> None:
    """Every watch event (and the initial listing) of a HeliosDeployment: keep one resync loop per
    live object, fed its latest body, and stop it when the object is gone.

    A watching handler, not a kopf daemon: kopf puts a finalizer on every object with a daemon, and a
    finalizer blocks deletion while the operator is down. The children carry ownerReferences, so the
    API server's garbage collector removes them; the operator keeps no finalizer."""
    obj = event["object"]
    meta = obj.get("metadata") or {}
    key = (str(meta.get("namespace") or "default"), str(meta.get("name")))
    loops: dict[tuple[str, str], _Loop] = memo.setdefault("loops", {})
    loop = loops.get(key)
    if event["type"] == "DELETED" or meta.get("deletionTimestamp"):
        if loop is not None and loop.uid == meta.get("uid"):
            loops.pop(key)
            loop.stop.set()
            memo.controller.wakeup(*key).set()
            await controller.forget(obj, memo.controller)
        return
    if loop is not None and loop.uid != meta.get("uid"):  # deleted and re-created while we looked away
        loop.stop.set()
        loop = None
    if loop is None:
        loop = _Loop(uid=str(meta.get("uid")), body=dict(obj))
        loop.task = asyncio.create_task(resync(loop, memo.controller), name=f"resync {key[0]}/{key[1]}")
        loops[key] = loop
    else:  # the loop's body is live: replaced in place with the newest object
        loop.body.clear()
        loop.body.update(obj)


class _Loop:
    def __init__(self, uid: str, body: dict[str, Any]) -> None:
        self.uid = uid
        self.body = body
        self.stop = asyncio.Event()
        self.task: asyncio.Task[None] | None = None


async def resync(loop: _Loop, ctl: controller.Controller) -> None:
    """The one reconcile loop per object (started when it appears, on create and on operator restart):
    every resync_interval_s, sooner when the step asks (requeue_after) or the spec changes."""
    owner = controller.owner_of(loop.body)
    wakeup = ctl.wakeup(owner.namespace, owner.name)
    while not loop.stop.is_set():
        wakeup.clear()
        try:
            outcome = await controller.reconcile_once(loop.body, ctl)
        except asyncio.CancelledError:
            raise
        except Exception:  # reconcile_once reports its own errors; never let the loop die
            logging.getLogger("helios_operator").exception("resync of %s/%s", owner.namespace, owner.name)
            outcome = None
        delay = ctl.settings.resync_interval_s
        if outcome is not None and outcome.requeue_after is not None:
            delay = max(0.05, min(delay, outcome.requeue_after))
        if loop.stop.is_set():
            break
        woken, stopped = asyncio.ensure_future(wakeup.wait()), asyncio.ensure_future(loop.stop.wait())
        try:
            await asyncio.wait({woken, stopped}, timeout=delay, return_when=asyncio.FIRST_COMPLETED)
        finally:
            woken.cancel()
            stopped.cancel()


# ---------------------------------------------------------------------------------------------
# `helios operator`


def add_operator_arguments(parser: argparse.ArgumentParser) -> None:
    add_arguments(parser)
    parser.add_argument("--standalone", action="store_true", help="no peering with other operator replicas")
    parser.add_argument("--liveness", default=None, help="kopf liveness endpoint, e.g. http://0.0.0.0:8080/healthz")


def run_operator(ns: argparse.Namespace) -> int:
    global configured, _held_lease
    configured = settings_from_namespace(ns)
    logging.basicConfig(level=configured.log_level)
    if configured.leader_election_lease:
        _held_lease = _wait_for_lease(configured.leader_election_lease, getattr(ns, "liveness", None))
    kopf.run(
        clusterwide=not configured.namespaces,
        namespaces=list(configured.namespaces),
        standalone=bool(getattr(ns, "standalone", False)),
        liveness_endpoint=getattr(ns, "liveness", None),
    )
    return 0
