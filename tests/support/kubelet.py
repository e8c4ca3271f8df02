"""A small test kubelet: registers a Node with a real API server and runs the pods bound to it as
local processes.

It stands in for the kubelet and the container runtime on machines that can run neither (no
containers, no root networking); everything it talks to is real. What it does, as the kubelet does:

- registers its Node (capacity and allocatable: cpu, memory, pods, `nvidia.com/gpu` as set per
  test), reports it Ready, and renews its Lease in `kube-node-lease` so the node-lifecycle
  controller keeps it Ready (stop renewing, and the real controller marks it NotReady);
- authenticates as `system:node:NAME` (group `system:nodes`), so the Node authorizer and
  NodeRestriction admission judge it as they judge a real kubelet;
- watches the pods the real scheduler bound to its node and runs each container as a process, from
  the container's own command, args and env (an image's entrypoint from `images` when the container
  sets no command); an image it cannot run gets the waiting reason ErrImagePull, then
  ImagePullBackOff, as a registry that lacks the image would;
- gives every pod its own address as pod IP: `pod_prefix`.N.x, where N is the node's subnet. The
  API server refuses loopback addresses in EndpointSlices, so scripts/cluster.sh routes the pod
  CIDR 10.244.0.0/16 locally on lo (as 127.0.0.0/8 is) and the plane's pods get 10.244.N.x; where
  it cannot (no CAP_NET_ADMIN), 127.0.N.x;
- asks for the pod's ServiceAccount token (a TokenRequest bound to the pod) and hands it to the
  processes as a KUBECONFIG file, the stand-in for the projected token volume: a pod acts with its
  ServiceAccount's RBAC, never with the test's credentials;
- runs the pod's init containers first, one after another, each to completion (a failed one is
  restarted with back-off, or fails the pod under restartPolicy Never), and starts the containers
  only once all have succeeded: initContainerStatuses and the Initialized condition say where it
  is (native sidecars, init containers with their own restartPolicy Always, are not supported);
- probes startup, readiness and liveness (httpGet, tcpSocket, exec) and writes truthful pod status:
  phase, Ready/ContainersReady conditions, container states, restart counts, exit codes, the
  termination message (FallbackToLogsOnError: the log's tail), CrashLoopBackOff between restarts;
- on deletion runs preStop (exec, httpGet or sleep), sends SIGTERM, waits out the grace period,
  sends SIGKILL, and then deletes the pod for good (grace period 0), as the kubelet does.

What a container cannot have here, and what stands in (docs/cluster-testing.md says it too):
- no network namespace: a process that listens on 0.0.0.0 or `::` is given its pod IP instead
  (an arg that is `0.0.0.0`, or holds `=0.0.0.0` or `://0.0.0.0:`, and env values that are
  `0.0.0.0`); a program that binds 0.0.0.0 by default must be told its address (status.podIP);
- no mount namespace: a mount path at the start of an arg or env value is rewritten to the host
  directory the volume stands for (hostPath, a PVC bound to a hostPath PV, or a per-pod emptyDir);
- no cgroups: resources are scheduled by the real scheduler against the capacity reported here,
  never enforced; no image pulls, no kube-proxy (ClusterIPs do not route: reach pods by pod IP).
"""

from __future__ import annotations

import base64
import contextlib
import datetime as dt
import fnmatch
import itertools
import json
import os
import shlex
import signal
import socket
import ssl
import subprocess
import tempfile
import threading
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import yaml

LEASE_SECONDS = 40
RENEW_SECONDS = 10.0
POLL_SECONDS = 0.5
BACKOFF_START_S = 1.0
BACKOFF_MAX_S = 20.0
_subnets = itertools.count(10)


def now() -> str:
    return dt.datetime.now(dt.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def now_micro() -> str:
    return dt.datetime.now(dt.UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


@dataclass(frozen=True)
class ApiCredentials:
    """Where the API server is and who we are: read from a kubeconfig (certificate or token)."""

    server: str
    ca_file: str
    cert: tuple[str, str] | None = None
    token: str | None = None

    @classmethod
    def from_kubeconfig(cls, path: str | Path, scratch: Path) -> ApiCredentials:
        config = yaml.safe_load(Path(path).read_text())
        context = next(c["context"] for c in config["contexts"] if c["name"] == config["current-context"])
        cluster = next(c["cluster"] for c in config["clusters"] if c["name"] == context["cluster"])
        user = next(u["user"] for u in config["users"] if u["name"] == context["user"])
        scratch.mkdir(parents=True, exist_ok=True)

        def materialise(data_key: str, file_key: str, section: dict[str, Any], name: str) -> str | None:
            if section.get(file_key):
                return str(section[file_key])
            if section.get(data_key):
                target = scratch / name
                target.write_bytes(base64.b64decode(section[data_key]))
                target.chmod(0o600)
                return str(target)
            return None

        ca = materialise("certificate-authority-data", "certificate-authority", cluster, "ca.crt")
        crt = materialise("client-certificate-data", "client-certificate", user, "client.crt")
        key = materialise("client-key-data", "client-key", user, "client.key")
        if ca is None:
            raise ValueError(f"{path}: the cluster has no certificate authority")
        return cls(
            server=str(cluster["server"]),
            ca_file=ca,
            cert=(crt, key) if crt and key else None,
            token=user.get("token"),
        )

    def client(self, timeout: float = 10.0) -> httpx.Client:
        headers = {"Authorization": f"Bearer {self.token}"} if self.token else {}
        context = ssl.create_default_context(cafile=self.ca_file)
        if self.cert is not None:
            context.load_cert_chain(*self.cert)
        return httpx.Client(base_url=self.server, verify=context, headers=headers, timeout=timeout)


@dataclass
class Container:
    """One container of a pod: its process, probes' state and what its status says."""

    spec: dict[str, Any]
    log_path: Path
    init: bool = False  # an init container: runs to completion before the containers start
    proc: subprocess.Popen[bytes] | None = None
    restarts: int = 0
    started_at: str | None = None
    started_mono: float = 0.0
    started: bool = False  # the startup probe passed (or there is none)
    ready: bool = False
    waiting: tuple[str, str] | None = ("ContainerCreating", "")
    last_terminated: dict[str, Any] | None = None
    terminated: dict[str, Any] | None = None
    next_start: float = 0.0
    backoff_s: float = BACKOFF_START_S
    probe_due: dict[str, float] = field(default_factory=dict)
    probe_fails: dict[str, int] = field(default_factory=dict)
    probe_passes: dict[str, int] = field(default_factory=dict)

    @property
    def name(self) -> str:
        return str(self.spec["name"])

    @property
    def succeeded(self) -> bool:
        """It ran to completion with exit code 0 (what an init container must do)."""
        return self.terminated is not None and self.terminated["exitCode"] == 0


@dataclass
class Pod:
    """A pod bound to this node, as this kubelet runs it."""

    body: dict[str, Any]
    ip: str
    containers: list[Container]
    workdir: Path
    init_containers: list[Container] = field(default_factory=list)
    image_error: str | None = None
    started_at: str = field(default_factory=now)
    terminating_since: float | None = None
    last_status: str = ""
    stopped: bool = False

    @property
    def key(self) -> str:
        return f"{self.body['metadata']['namespace']}/{self.body['metadata']['name']}"

    @property
    def uid(self) -> str:
        return str(self.body["metadata"]["uid"])

    @property
    def every_container(self) -> list[Container]:
        return [*self.init_containers, *self.containers]

    @property
    def initialized(self) -> bool:
        return not self.incomplete_init

    @property
    def incomplete_init(self) -> list[str]:
        """The init containers that have not succeeded yet, by name."""
        return [c.name for c in self.init_containers if not c.succeeded]

    @property
    def init_failed(self) -> bool:
        """An init container failed for good (restartPolicy Never): the pod has failed."""
        return any(c.terminated is not None and not c.succeeded for c in self.init_containers)


class TestKubelet:
    """Registers `node` and runs its pods until `stop()`. Use as a context manager.

    pod_prefix: the first two octets of pod and node addresses (Plane.pod_prefix: 10.244 or 127.0).

    images: image name patterns (fnmatch, on the name without registry or tag, e.g. `helios-worker`)
    the node can "pull", each with the entrypoint to run when a container sets no command (None:
    the container must set one). Any other image fails with ErrImagePull.
    """

    __test__ = False  # not a pytest class

    def __init__(
        self,
        credentials: ApiCredentials,
        node: str,
        *,
        capacity: Mapping[str, str] | None = None,
        labels: Mapping[str, str] | None = None,
        images: Mapping[str, Sequence[str] | None] | None = None,
        env: Mapping[str, str] | None = None,
        workdir: Path | None = None,
        pod_prefix: str = "127.0",
        pid_file: Path | None = None,
    ) -> None:
        self.credentials = credentials
        self.node = node
        self.capacity = {"cpu": "8", "memory": "32Gi", "pods": "110", **(capacity or {})}
        self.labels = {
            "kubernetes.io/hostname": node,
            "kubernetes.io/os": "linux",
            "kubernetes.io/arch": "amd64",
            **(labels or {}),
        }
        self.images = dict(images or {})
        self.env = dict(env if env is not None else os.environ)
        self.workdir = workdir or Path(tempfile.mkdtemp(prefix=f"kubelet-{node}-"))
        subnet = next(_subnets)
        self.node_ip = f"{pod_prefix}.{subnet}.1"
        self._free_ips = [f"{pod_prefix}.{subnet}.{i}" for i in range(2, 255)]
        # Every process started is listed here (`cluster.sh down` stops those still running, should
        # the test process die without stopping them); each carries HELIOS_TEST_KUBELET_POD.
        self.pid_file = pid_file
        self.pods: dict[str, Pod] = {}
        self.renew_leases = True  # a test clears it to play a node that stops heartbeating
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self._threads: list[threading.Thread] = []
        self._api = credentials.client()
        self.errors: list[str] = []

    # -----------------------------------------------------------------------------------------
    # life cycle

    def __enter__(self) -> TestKubelet:
        self.start()
        return self

    def __exit__(self, *_: object) -> None:
        self.stop()

    def start(self) -> None:
        self._register()
        self._renew_lease()
        for target, name in ((self._heartbeat_loop, "lease"), (self._pod_loop, "pods")):
            thread = threading.Thread(target=target, name=f"kubelet-{self.node}-{name}", daemon=True)
            thread.start()
            self._threads.append(thread)

    def stop(self, *, delete_node: bool = True) -> None:
        """Stop the loops and kill every process this kubelet started (the node "powers off")."""
        self._stop.set()
        for thread in self._threads:
            thread.join(10)
        with self._lock:
            for pod in self.pods.values():
                for c in pod.every_container:
                    self._kill(c, grace_s=2.0)
        if delete_node:
            with contextlib.suppress(httpx.HTTPError):
                self._api.delete(f"/api/v1/nodes/{self.node}")
        self._api.close()

    # -----------------------------------------------------------------------------------------
    # the Node and its Lease

    def _register(self) -> None:
        body = {
            "apiVersion": "v1",
            "kind": "Node",
            "metadata": {"name": self.node, "labels": self.labels},
            "spec": {},
        }
        r = self._api.post("/api/v1/nodes", json=body)
        if r.status_code not in (200, 201, 409):
            raise RuntimeError(f"registering node {self.node}: {r.status_code} {r.text}")
        self._patch_node_status()

    def _patch_node_status(self) -> None:
        stamp = now()
        conditions = [
            {"type": t, "status": "False", "reason": reason, "lastHeartbeatTime": stamp, "lastTransitionTime": stamp}
            for t, reason in (
                ("MemoryPressure", "KubeletHasSufficientMemory"),
                ("DiskPressure", "KubeletHasNoDiskPressure"),
                ("PIDPressure", "KubeletHasSufficientPID"),
            )
        ]
        conditions.append(
            {
                "type": "Ready",
                "status": "True",
                "reason": "KubeletReady",
                "message": "test kubelet (tests/support/kubelet.py) is posting ready status",
                "lastHeartbeatTime": stamp,
                "lastTransitionTime": stamp,
            }
        )
        status = {
            "capacity": self.capacity,
            "allocatable": self.capacity,
            "conditions": conditions,
            "addresses": [
                {"type": "InternalIP", "address": self.node_ip},
                {"type": "Hostname", "address": self.node},
            ],
            "nodeInfo": {
                "kubeletVersion": "v1.37.2",
                "kubeProxyVersion": "",
                "operatingSystem": "linux",
                "architecture": "amd64",
                "containerRuntimeVersion": "helios-test-kubelet://0",
                "osImage": "local processes",
                "kernelVersion": os.uname().release,
                "machineID": self.node,
                "systemUUID": self.node,
                "bootID": self.node,
            },
            "daemonEndpoints": {"kubeletEndpoint": {"Port": 0}},
        }
        r = self._api.patch(
            f"/api/v1/nodes/{self.node}/status",
            content=json.dumps({"status": status}),
            headers={"Content-Type": "application/strategic-merge-patch+json"},
        )
        if r.status_code != 200:
            raise RuntimeError(f"node {self.node} status: {r.status_code} {r.text}")

    def _renew_lease(self) -> None:
        path = f"/apis/coordination.k8s.io/v1/namespaces/kube-node-lease/leases/{self.node}"
        r = self._api.get(path)
        spec = {"holderIdentity": self.node, "leaseDurationSeconds": LEASE_SECONDS, "renewTime": now_micro()}
        if r.status_code == 404:
            node = self._api.get(f"/api/v1/nodes/{self.node}").json()
            body = {
                "apiVersion": "coordination.k8s.io/v1",
                "kind": "Lease",
                "metadata": {
                    "name": self.node,
                    "namespace": "kube-node-lease",
                    "ownerReferences": [
                        {"apiVersion": "v1", "kind": "Node", "name": self.node, "uid": node["metadata"]["uid"]}
                    ],
                },
                "spec": spec,
            }
            r = self._api.post("/apis/coordination.k8s.io/v1/namespaces/kube-node-lease/leases", json=body)
        else:
            lease = r.json()
            lease["spec"].update(spec)
            r = self._api.put(path, json=lease)
        if r.status_code not in (200, 201):
            raise RuntimeError(f"lease of {self.node}: {r.status_code} {r.text}")

    def _heartbeat_loop(self) -> None:
        while not self._stop.wait(RENEW_SECONDS):
            if not self.renew_leases:
                continue
            try:
                self._renew_lease()
            except (httpx.HTTPError, RuntimeError) as err:
                self.errors.append(f"lease: {err}")

    # -----------------------------------------------------------------------------------------
    # pods

    def _pod_loop(self) -> None:
        while not self._stop.is_set():
            try:
                self._sync()
            except (httpx.HTTPError, RuntimeError, OSError, ValueError) as err:
                self.errors.append(f"sync: {type(err).__name__}: {err}")
            self._stop.wait(POLL_SECONDS)

    def _sync(self) -> None:
        r = self._api.get("/api/v1/pods", params={"fieldSelector": f"spec.nodeName={self.node}"})
        r.raise_for_status()
        seen: set[str] = set()
        for body in r.json()["items"]:
            uid = body["metadata"]["uid"]
            seen.add(uid)
            with self._lock:
                pod = self.pods.get(uid)
                if pod is None:
                    if body["status"].get("phase") in ("Succeeded", "Failed") and not body["metadata"].get(
                        "deletionTimestamp"
                    ):
                        continue  # finished before we saw it (a previous kubelet of this name)
                    pod = self._admit(body)
                    self.pods[uid] = pod
                pod.body = body
            self._step(pod)
        with self._lock:
            for uid in list(self.pods):
                if uid not in seen:
                    gone = self.pods.pop(uid)
                    for c in gone.every_container:
                        self._kill(c, grace_s=0.0)
                    self._free_ips.append(gone.ip)

    def _admit(self, body: dict[str, Any]) -> Pod:
        ip = self._free_ips.pop(0)
        uid = body["metadata"]["uid"]
        workdir = self.workdir / uid
        workdir.mkdir(parents=True, exist_ok=True)
        containers = [Container(spec=c, log_path=workdir / f"{c['name']}.log") for c in body["spec"]["containers"]]
        inits = [
            Container(spec=c, log_path=workdir / f"init-{c['name']}.log", init=True)
            for c in body["spec"].get("initContainers") or ()
        ]
        for c in [*inits[1:], *(containers if inits else ())]:
            c.waiting = ("PodInitializing", "")  # what a container waiting for the init containers shows
        pod = Pod(body=body, ip=ip, containers=containers, workdir=workdir, init_containers=inits)
        for c in containers:
            if self._entrypoint(c.spec) is None:
                pod.image_error = c.spec.get("image", "")
        return pod

    def _image_name(self, image: str) -> str:
        name = image.rsplit("/", 1)[-1]
        return name.split("@", 1)[0].split(":", 1)[0]

    def _entrypoint(self, spec: dict[str, Any]) -> list[str] | None:
        """The argv prefix for a container, or None when its image cannot be "pulled" here."""
        name = self._image_name(str(spec.get("image", "")))
        for pattern, entry in self.images.items():
            if fnmatch.fnmatch(name, pattern):
                if spec.get("command"):
                    return [str(x) for x in spec["command"]]
                return list(entry) if entry is not None else None
        return None

    def _step(self, pod: Pod) -> None:
        meta = pod.body["metadata"]
        if meta.get("deletionTimestamp"):
            self._terminate(pod)
            return
        if pod.stopped:
            return
        if not pod.initialized:
            self._initialize(pod)
            if not pod.initialized:
                self._write_status(pod)
                return
        restart = pod.body["spec"].get("restartPolicy", "Always")
        for c in pod.containers:
            if pod.image_error is not None:
                self._image_backoff(c)
                continue
            if c.proc is None and c.terminated is None and time.monotonic() >= c.next_start:
                self._start(pod, c)
            elif c.proc is not None and c.proc.poll() is not None:
                self._exited(pod, c, restart)
            elif c.proc is not None:
                self._probe(pod, c)
        self._write_status(pod)

    def _initialize(self, pod: Pod) -> None:
        """Advance the first init container that has not succeeded yet: start, watch, or restart it."""
        for c in pod.init_containers:
            if c.succeeded:
                continue
            if c.terminated is not None:
                return  # failed under restartPolicy Never: nothing more runs
            if self._entrypoint(c.spec) is None:
                self._image_backoff(c)
            elif c.proc is None and time.monotonic() >= c.next_start:
                self._start(pod, c)
            elif c.proc is not None and c.proc.poll() is not None:
                self._exited(pod, c, self._restart_policy(pod, c))
                if c.succeeded:
                    continue  # done: the next one starts now
            return

    def _restart_policy(self, pod: Pod, c: Container) -> str:
        """The pod's restartPolicy; an init container is restarted only on failure, and never under Never."""
        restart = str(pod.body["spec"].get("restartPolicy", "Always"))
        return ("Never" if restart == "Never" else "OnFailure") if c.init else restart

    def _image_backoff(self, c: Container) -> None:
        image = c.spec.get("image", "")
        if c.waiting is None or c.waiting[0] in ("ContainerCreating", "PodInitializing"):
            c.waiting = ("ErrImagePull", f'failed to pull image "{image}": the test kubelet cannot run this image')
            c.next_start = time.monotonic() + BACKOFF_START_S
        elif time.monotonic() >= c.next_start:
            c.waiting = ("ImagePullBackOff", f'Back-off pulling image "{image}"')

    # --- processes

    def _volume_paths(self, pod: Pod) -> dict[str, Path]:
        """volume name -> the host directory it stands for."""
        out: dict[str, Path] = {}
        for vol in pod.body["spec"].get("volumes") or ():
            name = vol["name"]
            if "hostPath" in vol:
                out[name] = Path(vol["hostPath"]["path"])
            elif "emptyDir" in vol:
                path = pod.workdir / "volumes" / name
                path.mkdir(parents=True, exist_ok=True)
                out[name] = path
            elif "persistentVolumeClaim" in vol:
                claim = vol["persistentVolumeClaim"]["claimName"]
                ns = pod.body["metadata"]["namespace"]
                pvc = self._api.get(f"/api/v1/namespaces/{ns}/persistentvolumeclaims/{claim}")
                pv_name = pvc.json().get("spec", {}).get("volumeName") if pvc.status_code == 200 else None
                if pv_name:
                    pv = self._api.get(f"/api/v1/persistentvolumes/{pv_name}")
                    host = pv.json().get("spec", {}).get("hostPath", {}).get("path") if pv.status_code == 200 else None
                    if host:
                        out[name] = Path(host)
        return out

    def _mounts(self, pod: Pod, spec: dict[str, Any]) -> list[tuple[str, str]]:
        volumes = self._volume_paths(pod)
        mounts = []
        for m in spec.get("volumeMounts") or ():
            host = volumes.get(m["name"])
            if host is not None:
                mounts.append((m["mountPath"].rstrip("/"), str(host / m.get("subPath", "")).rstrip("/")))
        # longest mount path first, so /models/a wins over /models
        return sorted(mounts, key=lambda pair: -len(pair[0]))

    def _rewrite(self, value: str, mounts: list[tuple[str, str]], ip: str) -> str:
        if value == "0.0.0.0" or value == "::":
            return ip
        for wildcard in ("://0.0.0.0:", "=0.0.0.0"):  # --liveness=http://0.0.0.0:8080/..., --host=0.0.0.0
            value = value.replace(wildcard, wildcard.replace("0.0.0.0", ip))
        for inside, host in mounts:
            if value == inside or value.startswith(inside + "/"):
                return host + value[len(inside) :]
        return value

    def _field_ref(self, pod: Pod, path: str) -> str:
        meta = pod.body["metadata"]
        table: dict[str, str] = {
            "metadata.name": meta["name"],
            "metadata.namespace": meta["namespace"],
            "metadata.uid": meta["uid"],
            "spec.nodeName": self.node,
            "spec.serviceAccountName": pod.body["spec"].get("serviceAccountName", "default"),
            "status.podIP": pod.ip,
            "status.hostIP": self.node_ip,
        }
        return table.get(path, "")

    def _argv_env(self, pod: Pod, c: Container) -> tuple[list[str], dict[str, str]]:
        entry = self._entrypoint(c.spec)
        assert entry is not None
        mounts = self._mounts(pod, c.spec)
        env: dict[str, str] = {}
        for var in c.spec.get("env") or ():
            if "value" in var:
                env[var["name"]] = self._rewrite(str(var.get("value") or ""), mounts, pod.ip)
            elif "fieldRef" in var.get("valueFrom", {}):
                env[var["name"]] = self._field_ref(pod, var["valueFrom"]["fieldRef"]["fieldPath"])
        argv = entry + [str(a) for a in c.spec.get("args") or ()]

        def expand(arg: str) -> str:  # $(VAR) references, as the kubelet expands them
            for k, v in env.items():
                arg = arg.replace(f"$({k})", v)
            return arg

        argv = [self._rewrite(expand(a), mounts, pod.ip) for a in argv]
        base = {k: v for k, v in self.env.items() if k != "KUBECONFIG"}  # never the test's own identity
        account = self._service_account_kubeconfig(pod)
        if account is not None:
            base["KUBECONFIG"] = account
        marker = {"HELIOS_TEST_KUBELET_POD": pod.uid}
        return argv, {**base, "HOSTNAME": pod.body["metadata"]["name"], **marker, **env}

    def _service_account_kubeconfig(self, pod: Pod) -> str | None:
        """The pod's ServiceAccount token (a TokenRequest bound to the pod, as the kubelet asks for
        its projected token volume), handed over as a kubeconfig file: no mount namespace here."""
        spec = pod.body["spec"]
        if spec.get("automountServiceAccountToken") is False:
            return None
        path = pod.workdir / "serviceaccount.kubeconfig"
        if path.exists():
            return str(path)
        meta = pod.body["metadata"]
        account = spec.get("serviceAccountName") or "default"
        request = {
            "apiVersion": "authentication.k8s.io/v1",
            "kind": "TokenRequest",
            "spec": {
                "expirationSeconds": 3600 * 6,
                "boundObjectRef": {"apiVersion": "v1", "kind": "Pod", "name": meta["name"], "uid": meta["uid"]},
            },
        }
        r = self._api.post(f"/api/v1/namespaces/{meta['namespace']}/serviceaccounts/{account}/token", json=request)
        if r.status_code not in (200, 201):
            raise RuntimeError(f"token for {meta['namespace']}/{account}: {r.status_code} {r.text[:300]}")
        config = {
            "apiVersion": "v1",
            "kind": "Config",
            "clusters": [
                {
                    "name": "c",
                    "cluster": {"server": self.credentials.server, "certificate-authority": self.credentials.ca_file},
                }
            ],
            "users": [{"name": account, "user": {"token": r.json()["status"]["token"]}}],
            "contexts": [{"name": "c", "context": {"cluster": "c", "user": account, "namespace": meta["namespace"]}}],
            "current-context": "c",
        }
        path.write_text(yaml.safe_dump(config))
        path.chmod(0o600)
        return str(path)

    def _start(self, pod: Pod, c: Container) -> None:
        argv, env = self._argv_env(pod, c)
        workdir = c.spec.get("workingDir")
        log = c.log_path.open("ab")
        try:
            c.proc = subprocess.Popen(
                argv,
                env=env,
                cwd=workdir if workdir and Path(workdir).is_dir() else str(pod.workdir),
                stdout=log,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                start_new_session=True,
            )
        except OSError as err:
            # What a runtime says when the command is not in the image.
            c.waiting = None
            c.terminated = None
            self._record_exit(pod, c, 128, "StartError", f"exec: {argv[0]!r}: {err.strerror}")
            return
        finally:
            log.close()
        if self.pid_file is not None:
            with self.pid_file.open("a") as pids:
                pids.write(f"{c.proc.pid}\n")
        c.started_at = now()
        c.started_mono = time.monotonic()
        c.waiting = None
        c.ready = False
        c.started = "startupProbe" not in c.spec
        c.probe_due = {}
        c.probe_fails = {}
        c.probe_passes = {}

    def _termination_message(self, c: Container, exit_code: int) -> str:
        if exit_code == 0 or c.spec.get("terminationMessagePolicy") != "FallbackToLogsOnError":
            return ""
        try:
            lines = c.log_path.read_text(errors="replace").splitlines()
        except OSError:
            return ""
        return "\n".join(lines[-80:])[-2048:]

    def _record_exit(self, pod: Pod, c: Container, code: int, reason: str | None = None, message: str = "") -> None:
        restart = self._restart_policy(pod, c)
        state = {
            "exitCode": code,
            "reason": reason or ("Completed" if code == 0 else "Error"),
            "startedAt": c.started_at or now(),
            "finishedAt": now(),
        }
        text = message or self._termination_message(c, code)
        if text:
            state["message"] = text
        if restart == "Always" or (restart == "OnFailure" and code != 0):
            c.last_terminated = state
            c.restarts += 1 if c.started_at else 0
            c.waiting = ("CrashLoopBackOff", f"back-off {c.backoff_s:.0f}s restarting failed container={c.name}")
            c.next_start = time.monotonic() + c.backoff_s
            c.backoff_s = min(c.backoff_s * 2, BACKOFF_MAX_S)
            if c.restarts == 0:
                c.restarts = 1
        else:
            c.terminated = state
        c.proc = None
        c.ready = False

    def _exited(self, pod: Pod, c: Container, restart: str) -> None:
        assert c.proc is not None
        code = c.proc.returncode
        if code < 0:  # killed by a signal: a runtime reports 128 + signal
            code = 128 - code
        if time.monotonic() - c.started_mono > 10 * BACKOFF_MAX_S:
            c.backoff_s = BACKOFF_START_S  # ran long enough: the back-off resets
        self._record_exit(pod, c, code)

    def _kill(self, c: Container, grace_s: float) -> int | None:
        proc = c.proc
        if proc is None:
            return None
        if proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGTERM)
            try:
                proc.wait(timeout=max(grace_s, 0.0))
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(proc.pid, signal.SIGKILL)
                proc.wait(10)
        return proc.returncode

    # --- probes

    def _probe_once(self, pod: Pod, c: Container, probe: dict[str, Any]) -> bool:
        timeout = float(probe.get("timeoutSeconds", 1))
        if "httpGet" in probe:
            get = probe["httpGet"]
            port = self._port(c, get["port"])
            scheme = str(get.get("scheme", "HTTP")).lower()
            try:
                r = httpx.get(f"{scheme}://{pod.ip}:{port}{get.get('path', '/')}", timeout=timeout, verify=False)
            except httpx.HTTPError:
                return False
            return 200 <= r.status_code < 400
        if "tcpSocket" in probe:
            try:
                with socket.create_connection((pod.ip, self._port(c, probe["tcpSocket"]["port"])), timeout=timeout):
                    return True
            except OSError:
                return False
        if "exec" in probe:
            _, env = self._argv_env(pod, c)
            try:
                done = subprocess.run(
                    probe["exec"]["command"], env=env, timeout=timeout, capture_output=True, check=False
                )
            except (OSError, subprocess.TimeoutExpired):
                return False
            return done.returncode == 0
        return True

    def _port(self, c: Container, port: int | str) -> int:
        if isinstance(port, int) or str(port).isdigit():
            return int(port)
        for p in c.spec.get("ports") or ():
            if p.get("name") == port:
                return int(p["containerPort"])
        raise ValueError(f"container {c.name} has no port named {port!r}")

    def _probe(self, pod: Pod, c: Container) -> None:
        t = time.monotonic()
        kinds = ["startupProbe"] if not c.started else ["readinessProbe", "livenessProbe"]
        for kind in kinds:
            probe = c.spec.get(kind)
            if probe is None:
                if kind == "readinessProbe":
                    c.ready = True
                continue
            due = c.probe_due.get(kind, c.started_mono + float(probe.get("initialDelaySeconds", 0)))
            if t < due:
                continue
            c.probe_due[kind] = t + float(probe.get("periodSeconds", 10))
            ok = self._probe_once(pod, c, probe)
            if ok:
                c.probe_fails[kind] = 0
                c.probe_passes[kind] = c.probe_passes.get(kind, 0) + 1
                if c.probe_passes[kind] >= int(probe.get("successThreshold", 1)):
                    if kind == "startupProbe":
                        c.started = True
                    elif kind == "readinessProbe":
                        c.ready = True
                continue
            c.probe_passes[kind] = 0
            c.probe_fails[kind] = c.probe_fails.get(kind, 0) + 1
            if c.probe_fails[kind] < int(probe.get("failureThreshold", 3)):
                continue
            if kind == "readinessProbe":
                c.ready = False
            else:  # a startup or liveness failure: the kubelet kills and restarts the container
                grace = float(pod.body["spec"].get("terminationGracePeriodSeconds", 30))
                self._kill(c, grace_s=min(grace, 10.0))
                if c.proc is not None and c.proc.returncode is not None:
                    self._exited(pod, c, pod.body["spec"].get("restartPolicy", "Always"))
                return

    # --- deletion

    def _pre_stop(self, pod: Pod, c: Container) -> None:
        hook = (c.spec.get("lifecycle") or {}).get("preStop")
        if not hook or c.proc is None:
            return
        if "sleep" in hook:
            time.sleep(float(hook["sleep"]["seconds"]))
        elif "httpGet" in hook:
            get = hook["httpGet"]
            with contextlib.suppress(httpx.HTTPError, ValueError):
                httpx.get(f"http://{pod.ip}:{self._port(c, get['port'])}{get.get('path', '/')}", timeout=30)
        elif "exec" in hook:
            _, env = self._argv_env(pod, c)
            with contextlib.suppress(OSError, subprocess.TimeoutExpired):
                subprocess.run(hook["exec"]["command"], env=env, timeout=60, capture_output=True, check=False)

    def _terminate(self, pod: Pod) -> None:
        if pod.terminating_since is not None:
            return
        pod.terminating_since = time.monotonic()
        thread = threading.Thread(target=self._terminate_pod, args=(pod,), name=f"stop-{pod.key}", daemon=True)
        thread.start()

    def _terminate_pod(self, pod: Pod) -> None:
        assert pod.terminating_since is not None
        grace = float(
            pod.body["metadata"].get("deletionGracePeriodSeconds")
            or pod.body["spec"].get("terminationGracePeriodSeconds", 30)
        )
        deadline = pod.terminating_since + grace
        hooks = [threading.Thread(target=self._pre_stop, args=(pod, c), daemon=True) for c in pod.containers]
        for h in hooks:
            h.start()
        for h in hooks:
            h.join(max(deadline - time.monotonic(), 0.0))
        for c in pod.every_container:
            if c.proc is not None:
                self._kill(c, grace_s=max(deadline - time.monotonic(), 2.0))
                assert c.proc is not None
                code = c.proc.returncode
                c.terminated = {
                    "exitCode": 128 - code if code < 0 else code,
                    "reason": "Completed" if code == 0 else "Error",
                    "startedAt": c.started_at or now(),
                    "finishedAt": now(),
                }
                c.proc = None
            c.ready = False
        pod.stopped = True
        with contextlib.suppress(httpx.HTTPError, RuntimeError):
            self._write_status(pod)
        meta = pod.body["metadata"]
        # The kubelet's last word: remove the pod object now that nothing runs (grace period 0).
        with contextlib.suppress(httpx.HTTPError):
            self._api.request(
                "DELETE",
                f"/api/v1/namespaces/{meta['namespace']}/pods/{meta['name']}",
                json={
                    "kind": "DeleteOptions",
                    "apiVersion": "v1",
                    "gracePeriodSeconds": 0,
                    "preconditions": {"uid": pod.uid},
                },
            )

    # --- status

    def _container_status(self, c: Container) -> dict[str, Any]:
        state: dict[str, Any]
        if c.proc is not None:
            state = {"running": {"startedAt": c.started_at}}
        elif c.terminated is not None:
            state = {"terminated": c.terminated}
        else:
            reason, message = c.waiting or ("ContainerCreating", "")
            state = {"waiting": {"reason": reason, **({"message": message} if message else {})}}
        out: dict[str, Any] = {
            "name": c.name,
            "image": c.spec.get("image", ""),
            "imageID": "",
            "ready": c.ready and c.proc is not None,
            "started": c.proc is not None and c.started,
            "restartCount": c.restarts,
            "state": state,
            "lastState": {"terminated": c.last_terminated} if c.last_terminated else {},
        }
        if c.proc is not None:
            out["containerID"] = f"helios-test://{c.proc.pid}"
        return out

    def _init_container_status(self, c: Container) -> dict[str, Any]:
        out = self._container_status(c)
        out["ready"] = c.succeeded  # as the kubelet says of an init container that is done
        return out

    def _write_status(self, pod: Pod) -> None:
        statuses = [self._container_status(c) for c in pod.containers]
        all_ready = bool(statuses) and all(s["ready"] for s in statuses)
        restart = pod.body["spec"].get("restartPolicy", "Always")
        if any("running" in s["state"] for s in statuses):
            phase = "Running"
        elif statuses and all("terminated" in s["state"] for s in statuses):
            codes = [s["state"]["terminated"]["exitCode"] for s in statuses]
            phase = "Succeeded" if all(code == 0 for code in codes) else "Failed"
            if restart == "Always" and not pod.stopped:
                phase = "Running"
        else:
            phase = "Pending"
        if pod.init_failed:
            phase = "Failed"
        old = {c["type"]: c for c in pod.body.get("status", {}).get("conditions") or ()}

        def cond(kind: str, ok: bool, reason: str = "", message: str = "") -> dict[str, Any]:
            status = "True" if ok else "False"
            prev = old.get(kind)
            since = prev["lastTransitionTime"] if prev and prev.get("status") == status else now()
            return {
                "type": kind,
                "status": status,
                "lastTransitionTime": since,
                **({"reason": reason} if reason else {}),
                **({"message": message} if message else {}),
            }

        incomplete = pod.incomplete_init
        conditions = [
            cond("PodReadyToStartContainers", True),
            cond(
                "Initialized",
                not incomplete,
                "ContainersNotInitialized" if incomplete else "",
                f"containers with incomplete status: [{' '.join(incomplete)}]" if incomplete else "",
            ),
            cond("ContainersReady", all_ready, "" if all_ready else "ContainersNotReady"),
            cond("Ready", all_ready, "" if all_ready else "ContainersNotReady"),
        ]
        if "PodScheduled" in old:
            conditions.append(old["PodScheduled"])
        status: dict[str, Any] = {
            "phase": phase,
            "conditions": conditions,
            "hostIP": self.node_ip,
            "hostIPs": [{"ip": self.node_ip}],
            "podIP": pod.ip,
            "podIPs": [{"ip": pod.ip}],
            "startTime": pod.started_at,
            "containerStatuses": statuses,
            "qosClass": pod.body.get("status", {}).get("qosClass", "BestEffort"),
        }
        if pod.init_containers:
            status["initContainerStatuses"] = [self._init_container_status(c) for c in pod.init_containers]
        text = json.dumps(status, sort_keys=True)
        if text == pod.last_status:
            return
        meta = pod.body["metadata"]
        r = self._api.patch(
            f"/api/v1/namespaces/{meta['namespace']}/pods/{meta['name']}/status",
            content=json.dumps({"metadata": {"uid": pod.uid}, "status": status}),
            headers={"Content-Type": "application/merge-patch+json"},
        )
        if r.status_code == 200:
            pod.last_status = text
            pod.body = r.json()
        elif r.status_code != 404:
            raise RuntimeError(f"status of pod {pod.key}: {r.status_code} {r.text[:300]}")

    # -----------------------------------------------------------------------------------------
    # for tests

    def log_of(self, namespace: str, name: str, container: str | None = None) -> str:
        """The output of a pod's container (what `kubectl logs` would show), by pod name."""
        with self._lock:
            for pod in self.pods.values():
                meta = pod.body["metadata"]
                if meta["namespace"] == namespace and meta["name"] == name:
                    c = (
                        pod.containers[0]
                        if container is None
                        else next(c for c in pod.every_container if c.name == container)
                    )
                    return c.log_path.read_text(errors="replace") if c.log_path.exists() else ""
        return ""

    def describe(self) -> str:
        with self._lock:
            lines = [f"node {self.node} ({self.node_ip}), {len(self.pods)} pod(s); errors: {self.errors[-5:]}"]
            for pod in self.pods.values():
                for c in pod.every_container:
                    argv = shlex.join(c.proc.args) if c.proc is not None and isinstance(c.proc.args, list) else "-"
                    lines.append(f"  {pod.key} {pod.ip} {c.name}: restarts={c.restarts} ready={c.ready} {argv}")
        return "\n".join(lines)
