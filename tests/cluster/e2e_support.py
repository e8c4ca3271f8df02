"""Helpers of the end-to-end suite: its configuration, kubectl, a Prometheus of its own, traffic.
Plain functions and classes; the fixtures that use them are in conftest.py."""

from __future__ import annotations

import json
import os
import subprocess
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import yaml
from tests.support.kubelet import TestKubelet
from tests.support.prometheus import PrometheusServer
from tests.support.servers import wait_until

REPO = Path(__file__).resolve().parents[2]
HERE = Path(__file__).resolve().parent  # tests/cluster
SKIP_REASON = "no Kubernetes cluster: set KUBECONFIG to a cluster and HELIOS_E2E=1; see docs/cluster-testing.md"
RELEASE = "helios-e2e"
OPERATOR = "helios-e2e-operator"  # the chart's fullnameOverride: a Deployment name the tests can find
MODEL_CLAIM = "helios-models"
PROMETHEUS = "helios-e2e-prometheus"


@dataclass(frozen=True)
class E2EConfig:
    """Everything the suite reads from the environment, read once."""

    enabled: bool
    kubeconfig: str | None
    helm: str
    operator_image: str
    worker_image: str
    model_dir: str  # on every node: holds helios-tiny/ and helios-small/ (`helios train --out`)
    prometheus_url: str | None  # an existing Prometheus that scrapes the workers; None: deploy one
    prometheus_image: str
    timeout_s: float  # for each wait on the cluster (pods pulling images, profiling on CPU)
    keep: bool

    @classmethod
    def from_env(cls, env: dict[str, str] | os._Environ[str] = os.environ) -> E2EConfig:
        default_config = Path.home() / ".kube" / "config"
        return cls(
            enabled=env.get("HELIOS_E2E") == "1",
            kubeconfig=env.get("KUBECONFIG") or (str(default_config) if default_config.is_file() else None),
            helm=env.get("HELIOS_HELM") or "helm",
            operator_image=env.get("HELIOS_E2E_OPERATOR_IMAGE") or "helios-operator:e2e",
            worker_image=env.get("HELIOS_E2E_WORKER_IMAGE") or "helios-worker:e2e",
            model_dir=env.get("HELIOS_E2E_MODEL_DIR") or "/models",
            prometheus_url=env.get("HELIOS_E2E_PROMETHEUS_URL") or None,
            prometheus_image=env.get("HELIOS_E2E_PROMETHEUS_IMAGE") or "quay.io/prometheus/prometheus:v2.53.0",
            timeout_s=float(env.get("HELIOS_E2E_TIMEOUT") or 600),
            keep=env.get("HELIOS_E2E_KEEP") == "1",
        )


# ---------------------------------------------------------------------------------------------
# kubectl and helm, as subprocesses with a time limit


@dataclass
class Kubectl:
    namespace: str
    timeout_s: float = 60.0
    env: dict[str, str] | None = None  # KUBECONFIG and PATH of the cluster (None: this process's)

    def run(
        self, *args: str, stdin: str | None = None, timeout: float | None = None
    ) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            ["kubectl", *args],
            input=stdin,
            capture_output=True,
            text=True,
            timeout=timeout or self.timeout_s,
            check=False,
            env=self.env,
        )

    def ok(self, *args: str, stdin: str | None = None, timeout: float | None = None) -> str:
        done = self.run(*args, stdin=stdin, timeout=timeout)
        assert done.returncode == 0, f"kubectl {' '.join(args)} failed: {done.stderr.strip()}"
        return done.stdout

    def json(self, *args: str) -> dict[str, Any]:
        out: dict[str, Any] = json.loads(self.ok(*args, "-o", "json"))
        return out

    def ns(self, *args: str, timeout: float | None = None) -> str:
        """kubectl in the test namespace."""
        return self.ok("-n", self.namespace, *args, timeout=timeout)

    def ns_json(self, *args: str) -> dict[str, Any]:
        return self.json("-n", self.namespace, *args)

    def apply(self, objects: list[dict[str, Any]], *flags: str) -> str:
        return self.ok("apply", *flags, "-f", "-", stdin=yaml.safe_dump_all(objects))


def wait_for(what: str, check: Callable[[], Any], timeout: float, interval: float = 2.0) -> Any:
    """Poll `check` until it returns something truthy; fail naming `what` and the last value."""
    return wait_until(check, timeout, interval, what=what)


def host_claim(namespace: str, claim: str, volume: str, path: str, mode: str) -> list[dict[str, Any]]:
    """A claim bound by name to a hostPath volume over `path` on the nodes (the test nodes are this
    machine): a PersistentVolume and its PersistentVolumeClaim, with no provisioner involved."""
    return [
        {
            "apiVersion": "v1",
            "kind": "PersistentVolume",
            "metadata": {"name": volume},
            "spec": {
                "capacity": {"storage": "1Gi"},
                "accessModes": [mode],
                "persistentVolumeReclaimPolicy": "Retain",
                "storageClassName": "",
                "hostPath": {"path": path, "type": "Directory"},
                "claimRef": {"namespace": namespace, "name": claim},
            },
        },
        {
            "apiVersion": "v1",
            "kind": "PersistentVolumeClaim",
            "metadata": {"name": claim, "namespace": namespace},
            "spec": {
                "accessModes": [mode],
                "storageClassName": "",
                "volumeName": volume,
                "resources": {"requests": {"storage": "1Gi"}},
            },
        },
    ]


def split_image(image: str) -> tuple[str, str]:
    """`registry:5000/helios-operator:e2e` -> (`registry:5000/helios-operator`, `e2e`); no tag: `latest`."""
    name, sep, tag = image.rpartition(":")
    if not sep or "/" in tag:
        return image, "latest"
    return name, tag


def operator_logs(kube: Kubectl, node: TestKubelet | None = None) -> str:
    """The operator's last log lines: `kubectl logs`, or the test kubelet's copy on the own plane
    (it serves no kubelet API, so `kubectl logs` cannot reach it)."""
    if node is not None:
        pods = kube.run(
            "-n", kube.namespace, "get", "pods", "-l", f"app.kubernetes.io/instance={RELEASE}", "-o", "json"
        )
        names = [p["metadata"]["name"] for p in json.loads(pods.stdout or '{"items": []}')["items"]]
        text = "\n".join(node.log_of(kube.namespace, n)[-6000:] for n in names)
        return f"operator logs:\n{text}\n{node.describe()}"
    done = kube.run("-n", kube.namespace, "logs", f"deployment/{OPERATOR}", "--tail=80")
    return f"operator logs:\n{done.stdout or done.stderr}"


def image_name(image: str) -> str:
    """`registry:5000/helios-operator:e2e` -> `helios-operator` (what the test kubelet matches)."""
    return split_image(image)[0].rsplit("/", 1)[-1]


def worker_scrape_job(namespace: str) -> dict[str, Any]:
    """The scrape job for the worker pods: the relabelling the operator's ServiceMonitor declares
    (worker and namespace labels; test_cluster_e2e checks the two agree)."""
    return {
        "job_name": "helios-workers",
        "kubernetes_sd_configs": [{"role": "pod", "namespaces": {"names": [namespace]}}],
        "relabel_configs": [
            {
                "source_labels": ["__meta_kubernetes_pod_label_helios_dev_worker"],
                "regex": ".+",
                "action": "keep",
            },
            {"source_labels": ["__meta_kubernetes_pod_container_port_name"], "regex": "http", "action": "keep"},
            {"source_labels": ["__meta_kubernetes_pod_label_helios_dev_worker"], "target_label": "worker"},
            {"source_labels": ["__meta_kubernetes_namespace"], "target_label": "namespace"},
            {"source_labels": ["__meta_kubernetes_pod_name"], "target_label": "pod"},
        ],
    }


def local_prometheus_config(namespace: str, api_server: str, ca_file: str, token_file: str) -> dict[str, Any]:
    """The same job for a Prometheus outside the cluster: it names the API server and authenticates
    with a ServiceAccount token instead of the in-cluster defaults."""
    job = worker_scrape_job(namespace)
    job["scrape_interval"] = "2s"
    sd = job["kubernetes_sd_configs"][0]
    sd.update(
        {
            "api_server": api_server,
            "tls_config": {"ca_file": ca_file},
            "authorization": {"credentials_file": token_file},
        }
    )
    return {"global": {"scrape_interval": "2s", "evaluation_interval": "2s"}, "scrape_configs": [job]}


ROLE_KINDS = ("ServiceAccount", "Role", "RoleBinding")


class LocalPrometheus(PrometheusServer):
    """Prometheus as a local process with a configuration of our own: the plane's build
    (scripts/cluster.sh), since the Debian package leaves kubernetes_sd_configs out."""

    def __init__(self, directory: Path, config: dict[str, Any], binary: str) -> None:
        super().__init__([], directory, scrape_interval="2s", binary=binary)
        self.config_path.write_text(yaml.safe_dump(config))


def prometheus_objects(namespace: str, image: str) -> list[dict[str, Any]]:
    labels = {"app.kubernetes.io/name": PROMETHEUS}
    scrape = {
        "global": {"scrape_interval": "5s", "evaluation_interval": "5s"},
        "scrape_configs": [worker_scrape_job(namespace)],
    }
    meta = {"name": PROMETHEUS, "namespace": namespace, "labels": labels}
    return [
        {"apiVersion": "v1", "kind": "ServiceAccount", "metadata": meta},
        {
            "apiVersion": "rbac.authorization.k8s.io/v1",
            "kind": "Role",
            "metadata": meta,
            "rules": [{"apiGroups": [""], "resources": ["pods"], "verbs": ["get", "list", "watch"]}],
        },
        {
            "apiVersion": "rbac.authorization.k8s.io/v1",
            "kind": "RoleBinding",
            "metadata": meta,
            "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "Role", "name": PROMETHEUS},
            "subjects": [{"kind": "ServiceAccount", "name": PROMETHEUS, "namespace": namespace}],
        },
        {
            "apiVersion": "v1",
            "kind": "ConfigMap",
            "metadata": meta,
            "data": {"prometheus.yml": yaml.safe_dump(scrape)},
        },
        {
            "apiVersion": "apps/v1",
            "kind": "Deployment",
            "metadata": meta,
            "spec": {
                "replicas": 1,
                "selector": {"matchLabels": labels},
                "template": {
                    "metadata": {"labels": labels},
                    "spec": {
                        "serviceAccountName": PROMETHEUS,
                        "containers": [
                            {
                                "name": "prometheus",
                                "image": image,
                                "args": [
                                    "--config.file=/etc/prometheus/prometheus.yml",
                                    "--storage.tsdb.path=/prometheus",
                                    "--storage.tsdb.retention.time=2h",
                                ],
                                "ports": [{"name": "http", "containerPort": 9090}],
                                "readinessProbe": {"httpGet": {"path": "/-/ready", "port": "http"}},
                                "volumeMounts": [
                                    {"name": "config", "mountPath": "/etc/prometheus"},
                                    {"name": "data", "mountPath": "/prometheus"},
                                ],
                            }
                        ],
                        "volumes": [
                            {"name": "config", "configMap": {"name": PROMETHEUS}},
                            {"name": "data", "emptyDir": {}},
                        ],
                    },
                },
            },
        },
        {
            "apiVersion": "v1",
            "kind": "Service",
            "metadata": meta,
            "spec": {"selector": labels, "ports": [{"name": "http", "port": 9090, "targetPort": "http"}]},
        },
    ]


# ---------------------------------------------------------------------------------------------
# Traffic through the stable Service


@dataclass
class Traffic:
    """Sends completions, one after another, through the API server's proxy to a Service, in a
    background thread, and counts outcomes. The service proxy picks a ready endpoint of the Service
    for every request (unlike `kubectl port-forward`, which pins one pod and dies with it)."""

    url: str
    outcomes: dict[str, int] = field(default_factory=dict)
    failures: list[str] = field(default_factory=list)

    def __post_init__(self) -> None:
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="traffic", daemon=True)

    def __enter__(self) -> Traffic:
        self._thread.start()
        return self

    def __exit__(self, *_: object) -> None:
        self._stop.set()
        self._thread.join(120)

    @property
    def ok(self) -> int:
        return self.outcomes.get("200", 0)

    def _run(self) -> None:
        body = {"prompt": "the quick brown fox", "max_tokens": 8, "temperature": 0}
        with httpx.Client(timeout=60.0) as client:
            while not self._stop.is_set():
                try:
                    r = client.post(self.url, json=body)
                    key = str(r.status_code)
                    if r.status_code != 200:
                        self.failures.append(f"{r.status_code}: {r.text[:200]}")
                except httpx.HTTPError as err:
                    key = type(err).__name__
                    self.failures.append(f"{key}: {err}")
                self.outcomes[key] = self.outcomes.get(key, 0) + 1
