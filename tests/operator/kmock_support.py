"""kmock's Kubernetes emulator, made good enough for kopf, served over real HTTP with a KUBECONFIG.

What it is NOT (every test that uses it says so too): no real API server. No schema validation, no
defaults, no status/spec split, no garbage collection by ownerReferences, no label or field
selectors (lists and watches return everything), no kubelet or controller-manager: nothing makes
pods or sets a Deployment's readyReplicas, so tests play the Deployment controller by patching
/status themselves.

The fixes below are those TESTING.md lists as needed for kopf 1.45 with kmock 0.8.
"""

from __future__ import annotations

import asyncio
import copy
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import kmock
import pytest
from kmock._internal import enums, rendering

from helios_operator.core import names
from tests.support.servers import free_port, wait_until

__all__ = ["free_port"]  # re-exported: the operator tests import it from here

HD_RESOURCE = kmock.resource(names.GROUP, names.VERSION, names.PLURAL)
DEPLOYMENTS = kmock.resource("apps", "v1", "deployments")
SERVICES = kmock.resource("", "v1", "services")
EVENTS = kmock.resource("", "v1", "events")


@dataclass(frozen=True)
class ApiCall:
    agent: str  # User-Agent: kopf, helios-operator, or the test's own client (python-httpx)
    group: str
    resource: str  # plural, with /subresource
    verb: str  # as RBAC names it


_WRITES = frozenset({enums.action.CREATE, enums.action.UPDATE, enums.action.DELETE})
_VERBS = {"LIST": "list", "WATCH": "watch", "FETCH": "get", "CREATE": "create", "UPDATE": "patch", "DELETE": "delete"}


class HeliosEmulator(kmock.KubernetesEmulator):
    """The emulator plus what kopf relies on: resourceVersion, uid, generation, optimistic concurrency."""

    def __attrs_post_init__(self) -> None:
        super().__attrs_post_init__()
        self._rv = 0
        self.calls: list[ApiCall] = []  # every API request, as RBAC sees it
        # kmock keeps every request and matches each new one by scanning that history, so a request
        # costs O(requests so far): tests that send thousands set a window of recent requests to keep.
        self.request_window: int | None = None
        # Called in the emulator's own thread right after every write it applied (create, patch,
        # delete), before its answer is sent: it sees the objects as they are at that instant.
        self.after_write: Callable[[HeliosEmulator, rendering.Request], None] | None = None

    def _record(self, request: rendering.Request) -> None:
        if request.resource is None or request.action is None or not request.resource.plural:
            return
        verb = _VERBS[request.action.value]
        if request.action == enums.action.UPDATE and request.method is not None:
            verb = "update" if request.method.value == "PUT" else "patch"
        resource = request.resource.plural + (f"/{request.subresource}" if request.subresource else "")
        agent = str(request.headers.get("User-Agent") or request.headers.get("user-agent") or "")
        self.calls.append(ApiCall(agent, request.resource.group or "", str(resource), verb))

    def _next_rv(self) -> str:
        self._rv += 1
        return str(self._rv)

    async def _handle(self, request: rendering.Request) -> Any:
        self._record(request)
        if self.request_window is not None and len(self._requests) > self.request_window:
            del self._requests[: -self.request_window]  # the newest (this one, any in flight) stay
        if request.resource is not None:
            if request.action == enums.action.CREATE and isinstance(request.data, dict):
                meta = request.data.setdefault("metadata", {})  # in place: kmock matches by identity
                meta.setdefault("uid", str(uuid.uuid4()))
                meta.setdefault("creationTimestamp", time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()))
                meta["generation"] = 1
                meta["resourceVersion"] = self._next_rv()
                if request.namespace and "namespace" not in meta:
                    meta["namespace"] = request.namespace
            elif request.action == enums.action.UPDATE and request.name is not None:
                self._prepare_patch(request)
        response = await super()._handle(request)
        if self.after_write is not None and request.action in _WRITES:
            self.after_write(self, request)
        return response

    def live(self, plural: str, namespace: str) -> list[dict[str, Any]]:
        """Copies of the objects of one resource (by plural) in a namespace, as stored now; from the
        emulator's own thread (an `after_write` hook) it is a consistent view."""
        return [
            copy.deepcopy(obj.raw)
            for (resource, ns, _), obj in list(self.objects.items())
            if resource.plural == plural and ns == namespace and not obj.deleted
        ]

    def _current(self, request: rendering.Request) -> dict[str, Any] | None:
        key = (request.resource, request.namespace, request.name)
        if key not in self.objects or self.objects[key].deleted:
            return None
        return copy.deepcopy(self.objects[key].raw)

    def _prepare_patch(self, request: rendering.Request) -> None:
        current = self._current(request)
        if current is None:
            return  # the emulator answers 404 itself
        meta = current.get("metadata", {})
        rv = self._next_rv()
        data = request.data
        if isinstance(data, list):  # JSON patch
            for op in data:
                if op.get("op") == "test" and _pointer(current, op.get("path", "")) != op.get("value"):
                    raise kmock.KubernetesError(status=422, reason="Invalid", message=f"test failed: {op}")
            spec_changed = any(str(op.get("path", "")).startswith("/spec") for op in data)
            data[:] = [op for op in data if op.get("op") != "test"]
            data.append({"op": "add", "path": "/metadata/resourceVersion", "value": rv})
            if spec_changed and request.subresource is None:
                data.append({"op": "add", "path": "/metadata/generation", "value": int(meta.get("generation", 1)) + 1})
        elif isinstance(data, dict):  # merge patch (strategic merge and apply are treated alike)
            expected = (data.get("metadata") or {}).get("resourceVersion")
            if expected is not None and str(expected) != str(meta.get("resourceVersion")):
                # The real API server answers 409 Conflict; the operator's conditional status writes
                # rely on it. Elsewhere 422, which kopf retries quietly (409 makes it throttle).
                status = 409 if request.subresource == "status" else 422
                raise kmock.KubernetesError(status=status, reason="Conflict", message="resourceVersion mismatch")
            new_meta = data.setdefault("metadata", {})
            if new_meta is None:
                data["metadata"] = new_meta = {}
            new_meta["resourceVersion"] = rv
            if (
                request.subresource is None
                and "spec" in data
                and _merged(current.get("spec"), data["spec"]) != (current.get("spec"))
            ):
                new_meta["generation"] = int(meta.get("generation", 1)) + 1

    async def _serve_list(self, request: rendering.Request) -> Any:
        result = await super()._serve_list(request)
        if isinstance(result, dict) and request.resource is not None:
            info = self.resources[request.resource]
            group, version = request.resource.group, request.resource.version
            result["apiVersion"] = f"{group}/{version}" if group else str(version)
            result["kind"] = f"{info.kind}List" if info.kind else "List"
            result["metadata"] = {"resourceVersion": str(self._rv)}
        return result

    def _serve_watch(self, request: rendering.Request) -> Any:  # type: ignore[override]
        # kopf expects a JSON content type on watch streams.
        return rendering.Response(headers={"Content-Type": "application/json"}, payload=super()._serve_watch(request))


def _pointer(obj: Any, path: str) -> Any:
    for part in [p.replace("~1", "/").replace("~0", "~") for p in path.split("/")[1:]]:
        if isinstance(obj, dict):
            obj = obj.get(part)
        elif isinstance(obj, list) and part.isdigit() and int(part) < len(obj):
            obj = obj[int(part)]
        else:
            return None
    return obj


def _merged(base: Any, patch: Any) -> Any:
    if not isinstance(patch, dict) or not isinstance(base, dict):
        return patch
    out = dict(base)
    for k, v in patch.items():
        if v is None:
            out.pop(k, None)
        else:
            out[k] = _merged(base.get(k), v)
    return out


VERBS = {"get", "list", "watch", "create", "patch", "update", "delete"}


def register_resources(emulator: kmock.KubernetesEmulator) -> None:
    """Every resource kopf or the operator touches, with explicit kind and singular."""
    r = emulator.resources
    r["v1/namespaces"] = kmock.ResourceInfo(verbs=VERBS, kind="Namespace", singular="namespace", namespaced=False)
    r["apiextensions.k8s.io/v1/customresourcedefinitions"] = kmock.ResourceInfo(
        verbs=VERBS, kind="CustomResourceDefinition", singular="customresourcedefinition", namespaced=False
    )
    r[f"{names.GROUP}/{names.VERSION}/{names.PLURAL}"] = kmock.ResourceInfo(
        verbs=VERBS,
        kind=names.KIND,
        singular=names.SINGULAR,
        shortnames={names.SHORT_NAME},
        namespaced=True,
        subresources={"status", "scale"},
    )
    r["apps/v1/deployments"] = kmock.ResourceInfo(
        verbs=VERBS, kind="Deployment", singular="deployment", namespaced=True, subresources={"status", "scale"}
    )
    r["v1/services"] = kmock.ResourceInfo(verbs=VERBS, kind="Service", singular="service", namespaced=True)
    r["v1/events"] = kmock.ResourceInfo(verbs=VERBS, kind="Event", singular="event", namespaced=True)
    r["v1/pods"] = kmock.ResourceInfo(verbs=VERBS, kind="Pod", singular="pod", namespaced=True)


# ---------------------------------------------------------------------------------------------
# A running emulator, on its own event loop thread, so tests and KopfRunner's thread can both use it


@dataclass
class FakeCluster:
    emulator: HeliosEmulator
    url: str
    kubeconfig: Path
    client: httpx.Client

    # -- typed-ish helpers over real HTTP (objects written directly are not streamed to watches)

    def hd_path(self, namespace: str, name: str = "") -> str:
        base = f"/apis/{names.GROUP}/{names.VERSION}/namespaces/{namespace}/{names.PLURAL}"
        return f"{base}/{name}" if name else base

    @staticmethod
    def deployment_path(namespace: str, name: str = "") -> str:
        base = f"/apis/apps/v1/namespaces/{namespace}/deployments"
        return f"{base}/{name}" if name else base

    @staticmethod
    def service_path(namespace: str, name: str = "") -> str:
        base = f"/api/v1/namespaces/{namespace}/services"
        return f"{base}/{name}" if name else base

    def get(self, path: str) -> dict[str, Any] | None:
        r = self.client.get(path)
        if r.status_code == 404:
            return None
        r.raise_for_status()
        body: dict[str, Any] = r.json()
        return body

    def items(self, path: str) -> list[dict[str, Any]]:
        body = self.get(path) or {}
        return list(body.get("items") or [])

    def create(self, path: str, body: dict[str, Any]) -> dict[str, Any]:
        r = self.client.post(path, json=body)
        r.raise_for_status()
        out: dict[str, Any] = r.json()
        return out

    def patch(self, path: str, body: dict[str, Any]) -> dict[str, Any]:
        r = self.client.patch(path, json=body, headers={"Content-Type": "application/merge-patch+json"})
        r.raise_for_status()
        out: dict[str, Any] = r.json()
        return out

    def delete(self, path: str) -> None:
        self.client.delete(path).raise_for_status()

    def wait_for(self, what: str, check: Callable[[], Any], timeout: float = 15.0, interval: float = 0.1) -> Any:
        """Poll `check` until it returns something truthy; fail naming `what` on timeout."""
        return wait_until(check, timeout, interval, what=what)


def write_kubeconfig(path: Path, server_url: str) -> Path:
    path.write_text(
        f"""apiVersion: v1
kind: Config
clusters:
- name: kmock
  cluster:
    server: {server_url}
contexts:
- name: kmock
  context:
    cluster: kmock
    user: kmock
    namespace: default
current-context: kmock
users:
- name: kmock
  user:
    token: kmock-token
"""
    )
    return path


@pytest.fixture
def fake_cluster(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[FakeCluster]:
    """A HeliosEmulator served over real HTTP on a free loopback port; KUBECONFIG points at it."""
    loop = asyncio.new_event_loop()
    started = threading.Event()
    stop: asyncio.Event | None = None
    holder: dict[str, Any] = {}

    async def serve() -> None:
        nonlocal stop
        stop = asyncio.Event()
        async with HeliosEmulator() as emulator, kmock.Server(emulator) as server:
            register_resources(emulator)
            holder["emulator"], holder["url"] = emulator, str(server.url).rstrip("/")
            started.set()
            await stop.wait()

    thread = threading.Thread(target=lambda: loop.run_until_complete(serve()), name="kmock", daemon=True)
    thread.start()
    assert started.wait(10), "kmock did not start"
    kubeconfig = write_kubeconfig(tmp_path / "kubeconfig", holder["url"])
    monkeypatch.setenv("KUBECONFIG", str(kubeconfig))
    with httpx.Client(base_url=holder["url"], timeout=5.0) as client:
        cluster = FakeCluster(holder["emulator"], holder["url"], kubeconfig, client)
        client.post("/api/v1/namespaces", json={"metadata": {"name": "default"}})
        yield cluster
    assert stop is not None
    loop.call_soon_threadsafe(stop.set)
    thread.join(10)
    loop.close()
