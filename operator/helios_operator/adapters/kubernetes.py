"""The Kubernetes platform: observe a HeliosDeployment's children and execute the step's actions.

The `Platform` methods run the blocking calls below in a worker thread. It takes its connection and credentials
from the official `kubernetes` client's configuration (kubeconfig or in-cluster), and speaks plain
JSON over HTTP: the manifests come from `resources` as dicts, and newer clients validate bodies
against their own models (rejecting, e.g., an integer GPU quantity the API server accepts).

Children are listed with a label selector (the API server sends only this HeliosDeployment's) and
checked by label again on this side (the test emulator ignores selectors).
"""

from __future__ import annotations

import asyncio
import logging
import os
import ssl
import threading
import time
from calendar import timegm
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any
from urllib.parse import quote

import httpx
from kubernetes import client as k8s

from helios_operator.core import manifests, names
from helios_operator.core.types import (
    GPU_RESOURCE,
    DeleteWorker,
    EmitEvent,
    EnsureDisruptionBudget,
    EnsureInferencePool,
    EnsureMonitoring,
    EnsureWorker,
    HeliosSpec,
    Observed,
    ObservedWorker,
    Owner,
    PlatformAction,
    PointService,
    Role,
    Status,
)
from helios_operator.platform import PlatformError, StatusConflict

log = logging.getLogger(__name__)


def configure_client() -> None:
    """The official client's configuration: in-cluster, else the kubeconfig."""
    from kubernetes import config

    try:
        config.load_incluster_config()  # type: ignore[no-untyped-call]
    except config.ConfigException:
        # The client reads KUBECONFIG when first imported; read it now, in case it changed since.
        config.load_kube_config(config_file=os.environ.get("KUBECONFIG"))  # type: ignore[no-untyped-call]


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


def _budgets(namespace: str, name: str = "") -> str:
    return f"/apis/policy/v1/namespaces/{namespace}/poddisruptionbudgets" + (f"/{name}" if name else "")


def _of_owner(collection: str, owner_name: str) -> str:
    """A list of only the HeliosDeployment's children (by the label every child carries)."""
    return f"{collection}?labelSelector={quote(names.LABEL_DEPLOYMENT)}%3D{quote(owner_name)}"


def _pods(namespace: str, owner_name: str) -> str:
    return _of_owner(f"/api/v1/namespaces/{namespace}/pods", owner_name)


def _attach_failures(namespace: str) -> str:
    return f"/api/v1/namespaces/{namespace}/events?fieldSelector=reason%3D{ATTACH_FAILED}"


def _service_monitors(namespace: str, name: str = "") -> str:
    return f"/apis/monitoring.coreos.com/v1/namespaces/{namespace}/servicemonitors" + (f"/{name}" if name else "")


def _inference_pools(namespace: str) -> str:
    return f"/apis/{manifests.INFERENCE_GROUP}/v1/namespaces/{namespace}/inferencepools"


ATTACH_FAILED = "FailedAttachVolume"  # the attach/detach controller's Event reason, Multi-Attach among them
_CRDS = "/apis/apiextensions.k8s.io/v1/customresourcedefinitions"
SERVICE_MONITOR_CRD = f"{_CRDS}/servicemonitors.monitoring.coreos.com"
INFERENCE_POOL_CRD = f"{_CRDS}/inferencepools.{manifests.INFERENCE_GROUP}"
NODES_RECHECK_S = 30.0  # how long the nodes' GPU supply is believed
CRD_RECHECK_S = 300.0  # how long another project's CRD is believed present
CRD_ABSENT_RECHECK_S = 30.0  # and absent: one installed later is used within this


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
    waiting), worded the same at every restart; None if it may serve. A pod waiting for a node is
    not a failure: see `pod_unschedulable`."""
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
    return None


def _scheduled(pod: Mapping[str, Any]) -> Mapping[str, Any] | None:
    conditions = (pod.get("status") or {}).get("conditions") or []
    return next((c for c in conditions if c.get("type") == "PodScheduled"), None)


def pod_unschedulable(pod: Mapping[str, Any]) -> str | None:
    """The scheduler's message while the pod waits for a node (a cluster autoscaler may add one)."""
    condition = _scheduled(pod)
    if condition is not None and condition.get("status") == "False" and condition.get("reason") == "Unschedulable":
        return _error_line(condition.get("message")) or "no node fits"
    return None


def pod_scheduled_at(pod: Mapping[str, Any]) -> float | None:
    """When the pod got its node (PodScheduled's transition time); None while it has none."""
    condition = _scheduled(pod)
    if condition is None or condition.get("status") != "True":
        return None
    return _epoch(condition.get("lastTransitionTime"))


def pod_creating(pod: Mapping[str, Any]) -> bool:
    """Placed, but a container still waits to be created (volumes are attached and mounted first)."""
    if pod_scheduled_at(pod) is None:
        return False
    status = pod.get("status") or {}
    statuses = [*(status.get("initContainerStatuses") or []), *(status.get("containerStatuses") or [])]
    waiting = {((cs.get("state") or {}).get("waiting") or {}).get("reason") for cs in statuses}
    return not statuses or bool(waiting & {"ContainerCreating", "PodInitializing"})


def attach_failure(event: Mapping[str, Any]) -> tuple[str, str]:
    """A FailedAttachVolume Event -> (Degraded reason, message): a ReadWriteOnce claim already
    attached to another node (Multi-Attach) has a reason of its own, since it never resolves alone."""
    message = _error_line(event.get("message")) or "a volume cannot be attached"
    return ("VolumeMultiAttach" if "Multi-Attach" in message else "VolumeAttachFailed"), message


def deployment_blocked(deployment: Mapping[str, Any]) -> tuple[str, str] | None:
    """A worker Deployment whose ReplicaSet cannot create pods (a ResourceQuota, an admission
    webhook, a LimitRange): (Degraded reason, the API server's words), None if pods can be made."""
    for condition in (deployment.get("status") or {}).get("conditions") or []:
        if condition.get("type") == "ReplicaFailure" and condition.get("status") == "True":
            message = _error_line(condition.get("message")) or "pods cannot be created"
            reason = "QuotaExceeded" if "exceeded quota" in message else "PodsNotCreated"
            return reason, f"pods cannot be created: {message}"
    return None


@dataclass
class PodStates:
    """What a worker's pods say, beyond its Deployment's counts."""

    failure: str | None = None
    failure_reason: str = "WorkerFailed"
    unschedulable: str | None = None
    scheduled_at: float | None = 0.0  # the latest placement; None once any pod has no node
    creating: tuple[str, ...] = ()  # pods placed but not started: where a volume may fail to attach

    def add(self, pod: Mapping[str, Any]) -> None:
        name = (pod.get("metadata") or {}).get("name", "?")
        failure, waiting, placed = pod_failure(pod), pod_unschedulable(pod), pod_scheduled_at(pod)
        if self.failure is None and failure is not None:
            self.failure = f"pod {name}: {failure}"
        if self.unschedulable is None and waiting is not None:
            self.unschedulable = f"pod {name}: {waiting}"
        if pod_creating(pod):
            self.creating = (*self.creating, str(name))
        self.scheduled_at = None if placed is None or self.scheduled_at is None else max(self.scheduled_at, placed)

    def fail(self, reason: str, message: str) -> None:
        if self.failure is None:
            self.failure, self.failure_reason = message, reason


def _event_time(event: Mapping[str, Any]) -> str:
    return str(event.get("lastTimestamp") or event.get("eventTime") or "")


def _holds(current: Any, wanted: Any) -> bool:
    """Whether `current` already has every field of `wanted` (extra fields, defaulted by the API
    server, do not count as a difference)."""
    if isinstance(wanted, Mapping):
        return isinstance(current, Mapping) and all(k in current and _holds(current[k], v) for k, v in wanted.items())
    if isinstance(wanted, list):
        return isinstance(current, list) and len(current) == len(wanted) and all(map(_holds, current, wanted))
    return bool(current == wanted)


def gpu_supply(nodes: Mapping[str, Any]) -> int:
    """`nvidia.com/gpu` allocatable on the nodes that take new pods (Ready, not cordoned)."""
    total = 0
    for node in nodes.get("items") or []:
        spec, status = node.get("spec") or {}, node.get("status") or {}
        ready = any(c.get("type") == "Ready" and c.get("status") == "True" for c in status.get("conditions") or [])
        if ready and not spec.get("unschedulable"):
            total += int(str((status.get("allocatable") or {}).get(GPU_RESOURCE, "0")) or 0)
    return total


def observed_worker(deployment: Mapping[str, Any], pods: PodStates | None = None) -> ObservedWorker | None:
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
    blocked = deployment_blocked(deployment)
    if blocked is not None:  # no pod exists to say more; the Deployment's words are all there is
        pods = pods or PodStates()
        pods.fail(*blocked)
    return ObservedWorker(
        name=str(meta.get("name")),
        candidate=str(labels[names.LABEL_CANDIDATE]),
        depth=depth,
        role=role_,
        pool=str(labels.get(names.LABEL_POOL, "")),
        replicas=int(spec.get("replicas", 1) or 0),
        ready_replicas=int(status.get("readyReplicas") or 0),
        created_at=_epoch(meta.get("creationTimestamp")),
        failure=pods.failure if pods else None,
        failure_reason=pods.failure_reason if pods else "WorkerFailed",
        unschedulable=pods.unschedulable if pods else None,
        scheduled_at=pods.scheduled_at or None if pods else None,
        template=(meta.get("annotations") or {}).get(names.ANNOTATION_TEMPLATE),
    )


class KubernetesPlatform:
    """Observe and act for HeliosDeployments through the Kubernetes API (the `Platform` protocol)."""

    def __init__(
        self,
        api: KubeApi | None = None,
        *,
        service_monitors: bool = False,
        monitor_labels: Mapping[str, str] | None = None,
    ) -> None:
        self.api = api or KubeApi()
        self.service_monitors = service_monitors  # create them where the Prometheus Operator's CRD is
        self.monitor_labels = dict(monitor_labels or {})  # what the cluster's Prometheus selects them by
        self._crd_seen: dict[str, tuple[float, bool]] = {}  # CRD path -> (checked at, present)
        self._crd_lock = threading.Lock()
        self._nodes_seen: tuple[float, int | None] | None = None  # (checked at, GPU supply)
        self._nodes_lock = threading.Lock()

    # -- the Platform protocol

    async def observe(self, owner: Owner) -> Observed:
        return await asyncio.to_thread(self.observe_now, owner)

    async def apply(self, owner: Owner, spec: HeliosSpec | None, actions: Sequence[PlatformAction]) -> None:
        await asyncio.to_thread(self.execute, owner, spec, actions)

    async def write_status(self, owner: Owner, status: Status, version: str | None) -> str | None:
        try:
            return await asyncio.to_thread(self.patch_status, owner, status.to_dict(), version) or None
        except KubeApiError as err:
            if err.status == 409:
                raise StatusConflict(str(err)) from err
            raise

    async def fetch(self, owner: Owner) -> dict[str, Any] | None:
        return await asyncio.to_thread(self.get_owner, owner)

    # -- observe

    def observe_now(self, owner: Owner) -> Observed:
        deployments = self.api.request("GET", _of_owner(_deployments(owner.namespace), owner.name))
        pods = self._pod_states(owner)
        workers: list[ObservedWorker] = []
        for d in deployments.get("items") or []:
            if not _owned_by(d, owner.name) or (d.get("metadata") or {}).get("deletionTimestamp"):
                continue
            w = observed_worker(d, pods.get(str((d.get("metadata") or {}).get("name"))))
            if w is not None:
                workers.append(w)
        services = self.api.request("GET", _of_owner(_services(owner.namespace), owner.name))
        pool: str | None = None
        for s in services.get("items") or []:
            if _owned_by(s, owner.name) and _service_kind(s) == names.SERVICE_STABLE:
                pool = ((s.get("spec") or {}).get("selector") or {}).get(names.LABEL_POOL)
                break
        return Observed(
            workers=tuple(sorted(workers, key=lambda w: w.name)), service_pool=pool, gpu_supply=self._gpu_supply()
        )

    def _pod_states(self, owner: Owner) -> dict[str, PodStates]:
        """Worker name -> what its pods say (pods filtered by label on this side too)."""
        states: dict[str, PodStates] = {}
        for pod in self.api.request("GET", _pods(owner.namespace, owner.name)).get("items") or []:
            meta = pod.get("metadata") or {}
            labels = meta.get("labels") or {}
            worker = labels.get(names.LABEL_WORKER)
            if labels.get(names.LABEL_DEPLOYMENT) != owner.name or not worker or meta.get("deletionTimestamp"):
                continue
            states.setdefault(worker, PodStates()).add(pod)
        creating = {pod: state for state in states.values() for pod in state.creating}
        if creating:  # only then: a volume that cannot attach is said by an Event, not by the pod
            events = self.api.request("GET", _attach_failures(owner.namespace)).get("items") or []
            for event in sorted(events, key=_event_time, reverse=True):  # the newest word wins
                state = creating.get(str((event.get("involvedObject") or {}).get("name")))
                if state is not None:
                    reason, message = attach_failure(event)
                    state.fail(reason, f"pod {event['involvedObject']['name']}: {message}")
        return states

    def _gpu_supply(self) -> int | None:
        """The nodes' GPUs, read at most every NODES_RECHECK_S; None where RBAC hides the nodes."""
        with self._nodes_lock:
            if self._nodes_seen is not None and time.monotonic() - self._nodes_seen[0] < NODES_RECHECK_S:
                return self._nodes_seen[1]
            try:
                supply: int | None = gpu_supply(self.api.request("GET", "/api/v1/nodes"))
            except (KubeApiError, httpx.HTTPError) as err:
                why = f"HTTP {err.status}" if isinstance(err, KubeApiError) else type(err).__name__
                log.info("GPU supply unknown (nodes not readable: %s); profiling is bounded by the spec only", why)
                supply = None
            self._nodes_seen = (time.monotonic(), supply)
            return supply

    # -- monitoring: the headless metrics Service always, a ServiceMonitor where it can exist

    def ensure_monitoring(self, owner: Owner, service: dict[str, Any], monitor: dict[str, Any]) -> None:
        self._ensure_object(owner, _services(owner.namespace), service)
        if self.service_monitors and self.service_monitor_crd_present():
            self._ensure_object(owner, _service_monitors(owner.namespace), monitor)

    def service_monitor_crd_present(self) -> bool:
        return self._crd_present(SERVICE_MONITOR_CRD)

    def _crd_present(self, path: str) -> bool:
        """Whether another project's CRD is installed, believed for CRD_RECHECK_S (one installed later is found)."""
        with self._crd_lock:
            seen = self._crd_seen.get(path)
            if seen is not None and time.monotonic() - seen[0] < (CRD_RECHECK_S if seen[1] else CRD_ABSENT_RECHECK_S):
                return seen[1]
            try:
                self.api.request("GET", path)
                present = True
            except KubeApiError as err:
                if err.status != 404:
                    raise
                present = False
            self._crd_seen[path] = (time.monotonic(), present)
            return present

    def ensure_inference_pool(self, owner: Owner, manifest: dict[str, Any]) -> None:
        """Where the Gateway API Inference Extension is installed; its selector follows the pool."""
        if self._crd_present(INFERENCE_POOL_CRD):
            self._ensure_object(owner, _inference_pools(owner.namespace), manifest)

    def _create(self, owner: Owner, collection: str, manifest: dict[str, Any]) -> None:
        """POST a child into the HeliosDeployment's namespace, owned by it (garbage collection removes it)."""
        manifest.setdefault("metadata", {}).setdefault("ownerReferences", [owner.reference()])
        manifest["metadata"]["namespace"] = owner.namespace
        self.api.request("POST", collection, manifest)

    def ensure_disruption_budget(self, owner: Owner, manifest: dict[str, Any]) -> None:
        self._ensure_object(owner, _budgets(owner.namespace), manifest)

    def _ensure_object(self, owner: Owner, collection: str, manifest: dict[str, Any]) -> None:
        """Create the object if absent (owned by the HeliosDeployment); bring one we own back to the
        manifest when its labels or spec drifted (an upgrade changed them, someone edited it). An
        object of the same name that is not ours is left alone."""
        name = manifest["metadata"]["name"]
        try:
            current = self.api.request("GET", f"{collection}/{name}")
        except KubeApiError as err:
            if err.status != 404:
                raise
            self._create(owner, collection, manifest)
            return
        if not _owned_by(current, owner.name):
            log.warning("%s/%s exists and is not managed by %s: left as it is", owner.namespace, name, names.MANAGER)
            return
        wanted = {"metadata": {"labels": manifest["metadata"].get("labels") or {}}, "spec": manifest.get("spec") or {}}
        if not _holds(current, wanted):  # a merge patch: fields the API server defaulted stay
            self.api.request("PATCH", f"{collection}/{name}", wanted, MERGE)

    # -- act

    def execute(self, owner: Owner, spec: HeliosSpec | None, actions: Sequence[PlatformAction]) -> None:
        """Apply the actions in order, each rendered from the spec into its object; stop at the first
        failure (PlatformError) so order is kept."""
        for action in actions:
            try:
                if isinstance(action, EnsureWorker):
                    if spec is None:
                        raise ValueError("a worker is rendered from the spec, and there is none")
                    manifest = manifests.worker_deployment(owner.name, owner.namespace, spec, action)
                    self.ensure_worker(owner, action, manifest)
                elif isinstance(action, DeleteWorker):
                    self.delete_worker(owner, action.name)
                elif isinstance(action, PointService):
                    self.point_service(owner, manifests.stable_service(owner.name, owner.namespace, action.pool))
                elif isinstance(action, EmitEvent):
                    self.emit_event(owner, action)
                elif isinstance(action, EnsureMonitoring):
                    self.ensure_monitoring(
                        owner,
                        manifests.metrics_service(owner.name, owner.namespace),
                        manifests.service_monitor(owner.name, owner.namespace, extra_labels=self.monitor_labels),
                    )
                elif isinstance(action, EnsureDisruptionBudget):
                    self.ensure_disruption_budget(owner, manifests.disruption_budget(owner.name, owner.namespace))
                elif isinstance(action, EnsureInferencePool) and spec is not None and spec.inference_pool:
                    pool = manifests.inference_pool(owner.name, owner.namespace, action.pool, spec.inference_pool)
                    self.ensure_inference_pool(owner, pool)
            except (KubeApiError, httpx.HTTPError) as err:
                raise PlatformError(f"{type(action).__name__} failed: {err}") from err

    def ensure_worker(self, owner: Owner, action: EnsureWorker, manifest: dict[str, Any]) -> None:
        try:
            current = self.api.request("GET", _deployments(owner.namespace, action.name))
        except KubeApiError as err:
            if err.status != 404:
                raise
            self._create(owner, _deployments(owner.namespace), manifest)
            return
        meta = current.get("metadata") or {}
        labels, annotations = meta.get("labels") or {}, meta.get("annotations") or {}
        replicas = (current.get("spec") or {}).get("replicas")
        changed = bool(action.template) and annotations.get(names.ANNOTATION_TEMPLATE) != action.template
        if replicas == action.replicas and labels.get(names.LABEL_POOL) == action.pool and not changed:
            return
        template = (manifest.get("spec") or {}).get("template") or {}
        template_labels = (template.get("metadata") or {}).get("labels")
        patch: dict[str, Any] = {
            "metadata": {"labels": (manifest.get("metadata") or {}).get("labels") or {}},
            "spec": {"replicas": action.replicas},
        }
        if changed:  # image, env, resources, model...: the Deployment rolls its pods (maxUnavailable 0)
            self.api.request("PATCH", _deployments(owner.namespace, action.name), patch, MERGE)
            annotation = "/metadata/annotations/" + names.ANNOTATION_TEMPLATE.replace("/", "~1")
            ops = [{"op": "replace", "path": "/spec/template", "value": template}]  # whole: removed keys go too
            if "annotations" not in meta:
                ops.append({"op": "add", "path": "/metadata/annotations", "value": {}})
            ops.append({"op": "add", "path": annotation, "value": action.template})
            self.api.request("PATCH", _deployments(owner.namespace, action.name), ops, JSON_PATCH)
            return
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
            self._create(owner, _services(owner.namespace), manifest)
            return
        # A JSON patch replaces the selector whole (a merge patch would keep stale keys).
        patch = [{"op": "replace", "path": "/spec/selector", "value": selector}]
        self.api.request("PATCH", _services(owner.namespace, name), patch, JSON_PATCH)

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
