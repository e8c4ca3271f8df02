"""Leader election on a coordination.k8s.io Lease, as client-go's: one operator acts, others wait.

kopf runs with --standalone (no peering), so two operator processes watching the same objects
would both reconcile them. With HELIOS_LEADER_ELECTION_LEASE=namespace/name the operator takes
the Lease before kopf's handlers run (a startup handler that waits), renews it every RENEW_S, and
stops (SIGTERM to itself, so kopf shuts down cleanly and the pod restarts to wait again) as soon
as it cannot renew within the lease's duration. Writes are conditional on the Lease's
resourceVersion, so two candidates cannot both win one round.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import http.server
import logging
import os
import signal
import socket
import threading
import time
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlparse

from helios_operator.adapters.kubernetes import KubeApi, KubeApiError, configure_client

log = logging.getLogger("helios_operator.leader")
DURATION_S = 15
RENEW_S = 5.0


def _now() -> dt.datetime:
    return dt.datetime.now(dt.UTC)


def _stamp(t: dt.datetime) -> str:
    return t.strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def _parse(text: str | None) -> dt.datetime | None:
    if not text:
        return None
    return dt.datetime.fromisoformat(text.replace("Z", "+00:00"))


def identity() -> str:
    """Who this process is: the pod's name (HOSTNAME) and the process id."""
    return f"{os.environ.get('HOSTNAME') or socket.gethostname()}_{os.getpid()}"


@dataclass
class LeaseLock:
    api: KubeApi
    namespace: str
    name: str
    holder: str
    duration_s: int = DURATION_S

    @property
    def path(self) -> str:
        return f"/apis/coordination.k8s.io/v1/namespaces/{self.namespace}/leases/{self.name}"

    def try_acquire_or_renew(self) -> bool:
        """True when this process holds the Lease after the call."""
        now = _now()
        try:
            lease: dict[str, Any] | None = self.api.request("GET", self.path)
        except KubeApiError as err:
            if err.status != 404:
                raise
            lease = None
        spec_now = {"holderIdentity": self.holder, "leaseDurationSeconds": self.duration_s, "renewTime": _stamp(now)}
        if lease is None:
            body = {
                "apiVersion": "coordination.k8s.io/v1",
                "kind": "Lease",
                "metadata": {"name": self.name, "namespace": self.namespace},
                "spec": {**spec_now, "acquireTime": _stamp(now), "leaseTransitions": 0},
            }
            try:
                self.api.request("POST", f"/apis/coordination.k8s.io/v1/namespaces/{self.namespace}/leases", body)
            except KubeApiError as err:
                if err.status == 409:
                    return False  # another candidate created it first
                raise
            return True
        spec = lease.get("spec") or {}
        holder = spec.get("holderIdentity") or ""
        renewed = _parse(spec.get("renewTime")) or _parse(spec.get("acquireTime"))
        duration = dt.timedelta(seconds=int(spec.get("leaseDurationSeconds") or self.duration_s))
        expired = renewed is None or now > renewed + duration
        if holder and holder != self.holder and not expired:
            return False
        new_spec = {**spec, **spec_now}
        if holder != self.holder:
            new_spec["acquireTime"] = _stamp(now)
            new_spec["leaseTransitions"] = int(spec.get("leaseTransitions") or 0) + 1
        lease["spec"] = new_spec  # PUT carries metadata.resourceVersion: 409 if someone wrote since
        try:
            self.api.request("PUT", self.path, lease)
        except KubeApiError as err:
            if err.status == 409:
                return False
            raise
        return True

    def release(self) -> None:
        """Give the Lease up at shutdown, so a waiting operator takes over at once."""
        try:
            lease = self.api.request("GET", self.path)
            if (lease.get("spec") or {}).get("holderIdentity") == self.holder:
                lease["spec"]["holderIdentity"] = ""
                self.api.request("PUT", self.path, lease)
        except KubeApiError as err:
            log.warning("releasing the lease %s/%s: %s", self.namespace, self.name, err)


def parse_lease(text: str) -> tuple[str, str]:
    """`namespace/name` -> (namespace, name)."""
    namespace, sep, name = text.partition("/")
    if not sep or not namespace or not name:
        raise ValueError(f"leader_election_lease must be namespace/name, got {text!r}")
    return namespace, name


async def lead(lease_name: str) -> asyncio.Task[None]:
    """Take the Lease (waiting while another operator holds it), then keep renewing it."""
    namespace, name = parse_lease(lease_name)
    lock = LeaseLock(KubeApi(), namespace, name, identity())
    log = logging.getLogger("helios_operator.leader")
    while not await asyncio.to_thread(_try, lock):
        log.info("waiting for the lease %s/%s (held by another operator)", namespace, name)
        await asyncio.sleep(RENEW_S)
    log.info("leading: holding the lease %s/%s as %s", namespace, name, lock.holder)
    return keep_leading(lock)


def wait_for_lease(lease_name: str, liveness: str | None) -> LeaseLock:
    """Before kopf starts: take the Lease, waiting while another operator holds it, and answer the
    liveness probe meanwhile (kopf serves it only once its startup handlers are done: a replica
    waiting in one would be killed as dead). Returns the held lock."""
    configure_client()
    namespace, name = parse_lease(lease_name)
    lock = LeaseLock(KubeApi(), namespace, name, identity())
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
            time.sleep(RENEW_S)
    finally:
        if server is not None:
            server.shutdown()
            server.server_close()
    log.info("leading: holding the lease %s/%s as %s", namespace, name, lock.holder)
    return lock


def keep_leading(lock: LeaseLock) -> asyncio.Task[None]:
    """Renew the Lease in a task that stops this operator (SIGTERM: kopf shuts down cleanly, the pod
    restarts and waits again) once it can no longer renew within the lease's duration."""
    log = logging.getLogger("helios_operator.leader")
    namespace, name = lock.namespace, lock.name

    async def renew() -> None:
        last = asyncio.get_running_loop().time()
        try:
            while True:
                await asyncio.sleep(RENEW_S)
                if await asyncio.to_thread(_try, lock):
                    last = asyncio.get_running_loop().time()
                elif asyncio.get_running_loop().time() - last > lock.duration_s - RENEW_S:
                    log.error("lost the lease %s/%s: stopping, so that only the new leader acts", namespace, name)
                    os.kill(os.getpid(), signal.SIGTERM)
                    return
        except asyncio.CancelledError:
            await asyncio.to_thread(lock.release)
            raise

    return asyncio.create_task(renew(), name="leader lease")


def _try(lock: LeaseLock) -> bool:
    try:
        return bool(lock.try_acquire_or_renew())
    except Exception as err:  # an unreachable API: not leading this round
        logging.getLogger("helios_operator.leader").warning("lease: %s", err)
        return False
