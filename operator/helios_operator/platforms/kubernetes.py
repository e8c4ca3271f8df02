"""The Kubernetes platform: observe a HeliosDeployment's children and execute the step's actions.

Blocking; the controller calls it from a worker thread. It takes its connection and credentials
from the official `kubernetes` client's configuration (kubeconfig or in-cluster), and speaks plain
JSON over HTTP: the manifests come from `resources` as dicts, and newer clients validate bodies
against their own models (rejecting, e.g., an integer GPU quantity the API server accepts).

Children are found by label on the client side (some API servers — and the test emulator — ignore
label selectors; a real one honours them, which only makes the list shorter).
"""

from __future__ import annotations

import ssl
import threading
import time
from calendar import timegm
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any
from urllib.parse import quote

import httpx
from kubernetes import client as k8s

from helios_operator import names
from helios_operator.model import (
    Action,
    DeleteWorker,
    EmitEvent,
    EnsureWorker,
    Observed,
    ObservedWorker,
    PointService,
    Role,
)

WorkerManifest = Callable[[EnsureWorker], dict[str, Any]]
ServiceManifest = Callable[[str], dict[str, Any]]  # pool -> the stable Service


class PlatformError(RuntimeError):
    """An action could not be applied; the next reconcile retries it."""


@dataclass(frozen=True)
class Owner:
    """The HeliosDeployment that owns the children (their ownerReference and the Events' subject)."""

    namespace: str
    name: str
    uid: str

    def reference(self) -> dict[str, Any]:
        return {
            "apiVersion": names.API_VERSION,
            "kind": names.KIND,
            "name": self.name,
            "uid": self.uid,
            "controller": True,
            "blockOwnerDeletion": True,
        }


class KubeApiError(Exception):
    def __init__(self, status: int, message: str) -> None:
        super().__init__(f"HTTP {status}: {message[:300]}")
        self.status = status


class KubeApi:
    """A minimal JSON client over the kubernetes client's configuration (host, TLS, token)."""

    def __init__(self, configuration: k8s.Configuration | None = None, timeout_s: float = 10.0) -> None:
        self.cfg = configuration or k8s.Configuration.get_default_copy()
        verify: ssl.SSLContext | bool = bool(self.cfg.verify_ssl)
        if self.cfg.verify_ssl and (self.cfg.ssl_ca_cert or self.cfg.cert_file):
            ctx = ssl.create_default_context(cafile=self.cfg.ssl_ca_cert)
            if self.cfg.cert_file:
                ctx.load_cert_chain(self.cfg.cert_file, self.cfg.key_file)
            verify = ctx
        self.http = httpx.Client(
            base_url=str(self.cfg.host), verify=verify, timeout=timeout_s, headers={"User-Agent": names.MANAGER}
        )

    def request(
        self, method: str, path: str, body: Any = None, content_type: str = "application/json"
    ) -> dict[str, Any]:
        headers = {"Accept": "application/json", "Content-Type": content_type}
        auths: Any = self.cfg.auth_settings() or {}  # refreshes expiring tokens
        for auth in auths.values():
            if auth.get("in") == "header" and auth.get("value"):
                headers[str(auth["key"])] = str(auth["value"])
        response = self.http.request(method, path, json=body, headers=headers)
        if response.status_code >= 400:
            raise KubeApiError(response.status_code, response.text)
        data: dict[str, Any] = response.json() if response.content else {}
        return data


def _deployments(namespace: str, name: str = "") -> str:
    return f"/apis/apps/v1/namespaces/{namespace}/deployments" + (f"/{name}" if name else "")


def _services(namespace: str, name: str = "") -> str:
    return f"/api/v1/namespaces/{namespace}/services" + (f"/{name}" if name else "")


def _pods(namespace: str, owner_name: str) -> str:
    return f"/api/v1/namespaces/{namespace}/pods?labelSelector={quote(names.LABEL_DEPLOYMENT)}%3D{quote(owner_name)}"


def _service_monitors(namespace: str, name: str = "") -> str:
    return f"/apis/monitoring.coreos.com/v1/namespaces/{namespace}/servicemonitors" + (f"/{name}" if name else "")


SERVICE_MONITOR_CRD = "/apis/apiextensions.k8s.io/v1/customresourcedefinitions/servicemonitors.monitoring.coreos.com"
CRD_RECHECK_S = 300.0  # how long the presence (or absence) of the ServiceMonitor CRD is believed


MERGE = "application/merge-patch+json"
JSON_PATCH = "application/json-patch+json"


def _owned_by(obj: Mapping[str, Any], owner_name: str) -> bool:
    labels = (obj.get("metadata") or {}).get("labels") or {}
    return labels.get(names.LABEL_DEPLOYMENT) == owner_name and labels.get(names.LABEL_MANAGED_BY) == names.MANAGER


def _service_kind(obj: Mapping[str, Any]) -> str | None:
    labels = (obj.get("metadata") or {}).get("labels") or {}
    kind = labels.get(names.LABEL_SERVICE)
    return None if kind is None else str(kind)


def _epoch(timestamp: str | None) -> float:
    if not timestamp:
        return time.time()
    try:
        return float(timegm(time.strptime(timestamp.rstrip("Z")[:19], "%Y-%m-%dT%H:%M:%S")))
    except ValueError:
        return time.time()


# A container waiting for one of these will not start by itself; the pod's own words say why.
STUCK_REASONS = frozenset(
    {
        "CrashLoopBackOff",
        "ErrImagePull",
        "ImagePullBackOff",
        "InvalidImageName",
        "CreateContainerConfigError",
        "CreateContainerError",
        "RunContainerError",
    }
)


def _error_line(message: str | None) -> str:
    """The worker's `helios worker: error: ...` line from a termination message (or log tail), else its last line."""
    lines = [line.strip() for line in (message or "").splitlines() if line.strip()]
    errors = [line for line in lines if "error:" in line.lower()]
    return (errors or lines or [""])[-1][:500]


def pod_failure(pod: Mapping[str, Any]) -> str | None:
    """Why a worker pod cannot serve (a container that crashed and is not Ready again, one stuck
    waiting, an unschedulable pod), worded the same at every restart; None if it may serve."""
    status = pod.get("status") or {}
    statuses = [*(status.get("initContainerStatuses") or []), *(status.get("containerStatuses") or [])]
    for cs in statuses:
        state, last = cs.get("state") or {}, cs.get("lastState") or {}
        ended = state.get("terminated") or last.get("terminated") or {}
        code = ended.get("exitCode")
        if code not in (None, 0) and not cs.get("ready"):
            line = _error_line(ended.get("message"))
            return f"container {cs.get('name', '?')} exited with code {code}" + (
                f": {line}" if line else f" ({ended.get('reason') or 'Error'})"
            )
        waiting = state.get("waiting") or {}
        if waiting.get("reason") in STUCK_REASONS:
            line = _error_line(waiting.get("message"))
            return f"container {cs.get('name', '?')} {waiting['reason']}" + (f": {line}" if line else "")
    for condition in status.get("conditions") or []:
        if condition.get("type") == "PodScheduled" and condition.get("reason") == "Unschedulable":
            return f"pod unschedulable: {_error_line(condition.get('message')) or 'no node fits'}"
    return None


def observed_worker(deployment: Mapping[str, Any], failure: str | None = None) -> ObservedWorker | None:
    """A worker Deployment -> what the step needs to know of it; None if its labels are not ours."""
    meta = deployment.get("metadata") or {}
    labels = meta.get("labels") or {}
    role = labels.get(names.LABEL_ROLE)
    try:
        depth = int(labels.get(names.LABEL_DEPTH, ""))
    except ValueError:
        return None
    if role not in (names.ROLE_PROFILE, names.ROLE_SERVE) or not labels.get(names.LABEL_CANDIDATE):
        return None
    role_: Role = "profile" if role == names.ROLE_PROFILE else "serve"
    spec = deployment.get("spec") or {}
    status = deployment.get("status") or {}
    return ObservedWorker(
        name=str(meta.get("name")),
        candidate=str(labels[names.LABEL_CANDIDATE]),
        depth=depth,
        role=role_,
        pool=str(labels.get(names.LABEL_POOL, "")),
        replicas=int(spec.get("replicas", 1) or 0),
        ready_replicas=int(status.get("readyReplicas") or 0),
        created_at=_epoch(meta.get("creationTimestamp")),
        failure=failure,
    )


class KubernetesPlatform:
    """Observe and act for one HeliosDeployment through the Kubernetes API."""

    def __init__(self, api: KubeApi | None = None, *, service_monitors: bool = False) -> None:
        self.api = api or KubeApi()
        self.service_monitors = service_monitors  # create them where the Prometheus Operator's CRD is
        self._crd_seen: tuple[float, bool] | None = None  # (checked at, present)
        self._crd_lock = threading.Lock()

    # -- observe

    def observe(self, owner: Owner) -> Observed:
        deployments = self.api.request("GET", _deployments(owner.namespace))
        failures = self._pod_failures(owner)
        workers: list[ObservedWorker] = []
        for d in deployments.get("items") or []:
            if not _owned_by(d, owner.name) or (d.get("metadata") or {}).get("deletionTimestamp"):
                continue
            w = observed_worker(d, failures.get(str((d.get("metadata") or {}).get("name"))))
            if w is not None:
                workers.append(w)
        services = self.api.request("GET", _services(owner.namespace))
        pool: str | None = None
        for s in services.get("items") or []:
            if _owned_by(s, owner.name) and _service_kind(s) == names.SERVICE_STABLE:
                pool = ((s.get("spec") or {}).get("selector") or {}).get(names.LABEL_POOL)
                break
        return Observed(workers=tuple(sorted(workers, key=lambda w: w.name)), service_pool=pool)

    def _pod_failures(self, owner: Owner) -> dict[str, str]:
        """Worker name -> the first failing pod's reason (pods filtered by label on this side too)."""
        failures: dict[str, str] = {}
        for pod in self.api.request("GET", _pods(owner.namespace, owner.name)).get("items") or []:
            labels = (pod.get("metadata") or {}).get("labels") or {}
            worker = labels.get(names.LABEL_WORKER)
            if labels.get(names.LABEL_DEPLOYMENT) != owner.name or not worker or worker in failures:
                continue
            failure = pod_failure(pod)
            if failure is not None:
                failures[worker] = f"pod {(pod.get('metadata') or {}).get('name', '?')}: {failure}"
        return failures

    # -- monitoring: the headless metrics Service always, a ServiceMonitor where it can exist

    def ensure_monitoring(self, owner: Owner, service: dict[str, Any], monitor: dict[str, Any]) -> None:
        self._ensure_object(owner, _services(owner.namespace), service)
        if self.service_monitors and self.service_monitor_crd_present():
            self._ensure_object(owner, _service_monitors(owner.namespace), monitor)

    def service_monitor_crd_present(self) -> bool:
        with self._crd_lock:
            if self._crd_seen is not None and time.monotonic() - self._crd_seen[0] < CRD_RECHECK_S:
                return self._crd_seen[1]
            try:
                self.api.request("GET", SERVICE_MONITOR_CRD)
                present = True
            except KubeApiError as err:
                if err.status != 404:
                    raise
                present = False
            self._crd_seen = (time.monotonic(), present)
            return present

    def _ensure_object(self, owner: Owner, collection: str, manifest: dict[str, Any]) -> None:
        """Create the object if absent (owned by the HeliosDeployment); an existing one is left as it is."""
        name = manifest["metadata"]["name"]
        try:
            self.api.request("GET", f"{collection}/{name}")
            return
        except KubeApiError as err:
            if err.status != 404:
                raise
        manifest.setdefault("metadata", {}).setdefault("ownerReferences", [owner.reference()])
        manifest["metadata"]["namespace"] = owner.namespace
        self.api.request("POST", collection, manifest)

    # -- act

    def execute(
        self,
        owner: Owner,
        actions: Sequence[Action],
        *,
        worker_manifest: WorkerManifest,
        service_manifest: ServiceManifest,
    ) -> None:
        """Apply the actions in order; stop at the first failure (PlatformError) so order is kept."""
        for action in actions:
            try:
                if isinstance(action, EnsureWorker):
                    self.ensure_worker(owner, action, worker_manifest(action))
                elif isinstance(action, DeleteWorker):
                    self.delete_worker(owner, action.name)
                elif isinstance(action, PointService):
                    self.point_service(owner, service_manifest(action.pool))
                elif isinstance(action, EmitEvent):
                    self.emit_event(owner, action)
            except (KubeApiError, httpx.HTTPError) as err:
                raise PlatformError(f"{type(action).__name__} failed: {err}") from err

    def ensure_worker(self, owner: Owner, action: EnsureWorker, manifest: dict[str, Any]) -> None:
        try:
            current = self.api.request("GET", _deployments(owner.namespace, action.name))
        except KubeApiError as err:
            if err.status != 404:
                raise
            manifest.setdefault("metadata", {}).setdefault("ownerReferences", [owner.reference()])
            manifest["metadata"]["namespace"] = owner.namespace
            self.api.request("POST", _deployments(owner.namespace), manifest)
            return
        labels = (current.get("metadata") or {}).get("labels") or {}
        replicas = (current.get("spec") or {}).get("replicas")
        if replicas == action.replicas and labels.get(names.LABEL_POOL) == action.pool:
            return
        template_labels = ((manifest.get("spec") or {}).get("template") or {}).get("metadata", {}).get("labels")
        patch: dict[str, Any] = {
            "metadata": {"labels": (manifest.get("metadata") or {}).get("labels") or {}},
            "spec": {"replicas": action.replicas},
        }
        if template_labels:  # the pool moves with the pods' labels (the Service selects pods)
            patch["spec"]["template"] = {"metadata": {"labels": template_labels}}
        self.api.request("PATCH", _deployments(owner.namespace, action.name), patch, MERGE)

    def delete_worker(self, owner: Owner, name: str) -> None:
        try:
            self.api.request("DELETE", _deployments(owner.namespace, name), {"propagationPolicy": "Foreground"})
        except KubeApiError as err:
            if err.status != 404:
                raise

    def point_service(self, owner: Owner, manifest: dict[str, Any]) -> None:
        name = manifest["metadata"]["name"]
        selector = manifest["spec"]["selector"]
        try:
            self.api.request("GET", _services(owner.namespace, name))
        except KubeApiError as err:
            if err.status != 404:
                raise
            manifest.setdefault("metadata", {}).setdefault("ownerReferences", [owner.reference()])
            manifest["metadata"]["namespace"] = owner.namespace
            self.api.request("POST", _services(owner.namespace), manifest)
            return
        # A JSON patch replaces the selector whole (a merge patch would keep stale keys).
        patch = [{"op": "replace", "path": "/spec/selector", "value": selector}]
        self.api.request("PATCH", _services(owner.namespace, name), patch, JSON_PATCH)

    def delete_services(self, owner: Owner, monitor_name: str | None = None) -> None:
        """Delete the stable and metrics Services (and the ServiceMonitor, when one may exist)."""
        services = self.api.request("GET", _services(owner.namespace))
        paths = [_services(owner.namespace, s["metadata"]["name"]) for s in services.get("items") or []
                 if _owned_by(s, owner.name)]
        if monitor_name and self.service_monitors and self.service_monitor_crd_present():
            paths.append(_service_monitors(owner.namespace, monitor_name))
        for path in paths:
            try:
                self.api.request("DELETE", path)
            except KubeApiError as err:
                if err.status != 404:
                    raise

    def emit_event(self, owner: Owner, event: EmitEvent) -> None:
        now = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
        body = {
            "apiVersion": "v1",
            "kind": "Event",
            "metadata": {"name": f"{owner.name}.{time.time_ns():x}", "namespace": owner.namespace},
            "involvedObject": {
                "apiVersion": names.API_VERSION,
                "kind": names.KIND,
                "name": owner.name,
                "namespace": owner.namespace,
                "uid": owner.uid,
            },
            "reason": event.reason,
            "message": event.message[:1024],
            "type": event.type,
            "source": {"component": names.MANAGER},
            "firstTimestamp": now,
            "lastTimestamp": now,
            "count": 1,
            "reportingComponent": names.MANAGER,
        }
        self.api.request("POST", f"/api/v1/namespaces/{owner.namespace}/events", body)

    def patch_status(self, owner: Owner, status: dict[str, Any], resource_version: str | None = None) -> str:
        """Write status whole. With `resource_version` the write is conditional: the API server answers
        409 Conflict (KubeApiError) when the object changed since (optimistic concurrency).
        Returns the object's new resourceVersion."""
        path = f"/apis/{names.GROUP}/{names.VERSION}/namespaces/{owner.namespace}/{names.PLURAL}/{owner.name}/status"
        body: dict[str, Any] = {"status": status}
        if resource_version:
            body["metadata"] = {"resourceVersion": resource_version}
        done = self.api.request("PATCH", path, body, MERGE)
        return str((done.get("metadata") or {}).get("resourceVersion") or "")

    def get_owner(self, owner: Owner) -> dict[str, Any] | None:
        """The HeliosDeployment as the API server has it now; None when it is gone."""
        path = f"/apis/{names.GROUP}/{names.VERSION}/namespaces/{owner.namespace}/{names.PLURAL}/{owner.name}"
        try:
            return self.api.request("GET", path)
        except KubeApiError as err:
            if err.status == 404:
                return None
            raise
