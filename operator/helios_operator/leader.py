"""Leader election on a coordination.k8s.io Lease, as client-go's: one operator acts, others wait.

kopf runs with --standalone (no peering), so two operator processes watching the same objects
would both reconcile them. With HELIOS_LEADER_ELECTION_LEASE=namespace/name the operator takes
the Lease before kopf's handlers run (a startup handler that waits), renews it every RENEW_S, and
stops (SIGTERM to itself, so kopf shuts down cleanly and the pod restarts to wait again) as soon
as it cannot renew within the lease's duration. Writes are conditional on the Lease's
resourceVersion, so two candidates cannot both win one round.
"""

from __future__ import annotations

import datetime as dt
import logging
import os
import socket
from dataclasses import dataclass
from typing import Any

from helios_operator.platforms.kubernetes import KubeApi, KubeApiError

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
