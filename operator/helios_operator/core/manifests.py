"""Pure builders: manifests for the worker Deployments, the stable Service and the ServiceMonitor.

Dicts ready for the Kubernetes API. Owner references are added here when the owner's uid is given;
otherwise the platform adopts the object (it knows the owner).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from helios_operator.core import names
from helios_operator.core.types import (
    EnsureWorker,
    HeliosSpec,
    InferencePoolSpec,
    ModelCacheSpec,
    SpecError,
    WorkerSpec,
)
from helios_operator.core.worker_args import DRAIN_TIMEOUT_S, worker_args

API_TOKEN_ENV = "HELIOS_API_TOKEN"  # the worker reads its bearer token from it
MODELS_ROOT = "/models"  # where PVCs and downloaded models are mounted in the worker
HF_DIR = f"{MODELS_ROOT}/hf"
HF_VOLUME = "hf-models"
FETCH_CONTAINER = "fetch-model"
DEFAULT_MODEL_CACHE = ModelCacheSpec()  # no claim: a bounded emptyDir per pod


@dataclass(frozen=True)
class WorkerSettings:
    """Operator-wide knobs of the worker pods (not per HeliosDeployment)."""

    startup_period_seconds: int = 5
    startup_failure_threshold: int = 120  # 10 minutes to load weights before the kubelet restarts it
    termination_grace_seconds: int = 120  # above preStop + drain: the kubelet never kills a draining worker
    pre_stop_sleep_seconds: int = 10  # endpoints drop the pod before it starts draining
    drain_timeout_seconds: int = DRAIN_TIMEOUT_S
    scrape_interval: str = "15s"


DEFAULT_SETTINGS = WorkerSettings()


@dataclass(frozen=True)
class ModelSource:
    """Where the worker reads the model and what the pod needs for that."""

    path: str
    volumes: tuple[dict[str, Any], ...] = ()
    mounts: tuple[dict[str, Any], ...] = ()
    init_containers: tuple[dict[str, Any], ...] = ()


def pool_selector(hd_name: str, pool: str) -> str:
    """The label selector string of a pool (status.selector, for the scale subresource)."""
    return ",".join(f"{k}={v}" for k, v in _pool_labels(hd_name, pool).items())


def _pool_labels(hd_name: str, pool: str) -> dict[str, str]:
    return {names.LABEL_DEPLOYMENT: hd_name, names.LABEL_POOL: pool}


def worker_labels(hd_name: str, action: EnsureWorker) -> dict[str, str]:
    """Every label a worker Deployment and its pods carry; the platform observes workers by them."""
    return {
        **_owned_labels(hd_name),
        names.LABEL_CANDIDATE: action.candidate,
        names.LABEL_DEPTH: str(action.depth),
        names.LABEL_ROLE: action.role,
        names.LABEL_WORKER: action.name,
        names.LABEL_POOL: action.pool,
    }


def model_source(
    model: str, image: str, env: tuple[dict[str, Any], ...] = (), cache: ModelCacheSpec = DEFAULT_MODEL_CACHE
) -> ModelSource:
    """local path as is; pvc://claim/path mounted read-only; hf://org/name downloaded by an init
    container (see `_fetch_container`) into the model cache, which the worker mounts read-only."""
    if model.startswith("pvc://"):
        claim, _, sub = model.removeprefix("pvc://").partition("/")
        if not claim:
            raise SpecError(f"model {model!r}: pvc:// needs a claim name, as pvc://claim/path")
        volume = names.dns_label(f"model-{claim}")
        root = f"{MODELS_ROOT}/{claim}"
        return ModelSource(
            path=f"{root}/{sub}".rstrip("/"),
            volumes=({"name": volume, "persistentVolumeClaim": {"claimName": claim, "readOnly": True}},),
            mounts=({"name": volume, "mountPath": root, "readOnly": True},),
        )
    if model.startswith("hf://"):
        repo = model.removeprefix("hf://").strip("/")
        if repo.count("/") != 1 or not all(repo.split("/")):
            raise SpecError(f"model {model!r}: hf:// needs org/name, as hf://org/name")
        path = f"{HF_DIR}/{repo.replace('/', '--')}"
        # One claim for every pod of the HeliosDeployment (downloaded once), else a bounded emptyDir per pod.
        cache_volume: dict[str, Any] = (
            {"name": HF_VOLUME, "persistentVolumeClaim": {"claimName": cache.claim_name}}
            if cache.claim_name
            else {"name": HF_VOLUME, "emptyDir": {"sizeLimit": cache.size_limit}}
        )
        mount = {"name": HF_VOLUME, "mountPath": HF_DIR, "readOnly": True}
        return ModelSource(path, (cache_volume,), (mount,), (_fetch_container(repo, path, image, env),))
    if "://" in model:
        raise SpecError(f"model {model!r}: use a local path, pvc://claim/path or hf://org/name")
    return ModelSource(path=model)


def _fetch_container(repo: str, path: str, image: str, env: tuple[dict[str, Any], ...]) -> dict[str, Any]:
    """The init container that downloads `repo` into `path` (helios_worker.models.fetch: once per
    cache, skipped when complete). Its environment is its own: the worker image sets HF_HUB_OFFLINE=1
    for the worker, which never reaches the hub; spec.worker.env (HF_TOKEN, HF_ENDPOINT) passes through."""
    ours = [
        {"name": "HF_HUB_OFFLINE", "value": "0"},
        {"name": "HF_HOME", "value": "/tmp/hf-home"},  # the token and hub client caches: the root is read-only
        {"name": "HF_HUB_DISABLE_PROGRESS_BARS", "value": "1"},  # the log's tail is the termination message
    ]
    taken = {e["name"] for e in ours}
    return {
        "name": FETCH_CONTAINER,
        "image": image,
        "command": ["python", "-m", "helios_worker.models.fetch"],
        "args": [repo, path],
        "env": [*(e for e in env if e.get("name") not in taken), *ours],
        "volumeMounts": [{"name": HF_VOLUME, "mountPath": HF_DIR}, {"name": "tmp", "mountPath": "/tmp"}],
        "terminationMessagePolicy": "FallbackToLogsOnError",
        "securityContext": _container_security(),
    }


WORKER_COMMAND = ("helios", "worker")


def worker_env(worker: WorkerSpec) -> list[dict[str, Any]]:
    """spec.worker.env, plus HELIOS_API_TOKEN from the Secret named in spec.worker.apiTokenSecret."""
    env = list(worker.env)
    if worker.api_token_secret is not None:
        ref = {"name": worker.api_token_secret.name, "key": worker.api_token_secret.key}
        env = [e for e in env if e.get("name") != API_TOKEN_ENV]
        env.append({"name": API_TOKEN_ENV, "valueFrom": {"secretKeyRef": ref}})
    return env


def worker_deployment(
    hd_name: str,
    namespace: str,
    spec: HeliosSpec,
    action: EnsureWorker,
    *,
    owner_uid: str | None = None,
    settings: WorkerSettings = DEFAULT_SETTINGS,
) -> dict[str, Any]:
    """An apps/v1 Deployment running one worker: non-root, probed, drained on stop, scraped."""
    image = spec.worker.image
    if image is None:
        raise ValueError("spec.worker.image is unset: the controller fills in the operator's worker_image")
    source = model_source(action.model, image, spec.worker.env, spec.worker.model_cache)
    labels = worker_labels(hd_name, action)
    resources = _quantities_as_strings(spec.worker.pod_resources)
    http = names.WORKER_PORT_NAME
    container = {
        "name": "worker",
        "image": image,
        # The command is set, not left to the image's ENTRYPOINT, so a custom worker image works too.
        "command": list(WORKER_COMMAND),
        "args": worker_args(
            hd_name,
            spec,
            action,
            model_path=source.path,
            host="0.0.0.0",
            port=names.WORKER_PORT,
            drain_timeout_s=settings.drain_timeout_seconds,
        ),
        "ports": [{"name": http, "containerPort": names.WORKER_PORT, "protocol": "TCP"}],
        "env": worker_env(spec.worker),
        "resources": resources,
        # A worker that cannot start prints one `helios worker: error: ...` line: it becomes the
        # pod's lastState.terminated.message, which the operator reports (Degraded=WorkerFailed).
        "terminationMessagePolicy": "FallbackToLogsOnError",
        "startupProbe": {
            "httpGet": {"path": "/readyz", "port": http},
            "periodSeconds": settings.startup_period_seconds,
            "failureThreshold": settings.startup_failure_threshold,
        },
        "readinessProbe": {"httpGet": {"path": "/readyz", "port": http}, "periodSeconds": 5, "failureThreshold": 2},
        "livenessProbe": {"httpGet": {"path": "/healthz", "port": http}, "periodSeconds": 10, "failureThreshold": 3},
        "lifecycle": {"preStop": {"sleep": {"seconds": settings.pre_stop_sleep_seconds}}},
        "volumeMounts": [{"name": "tmp", "mountPath": "/tmp"}, *source.mounts],
        "securityContext": _container_security(),
    }
    pod_spec: dict[str, Any] = {
        "containers": [container],
        "volumes": [{"name": "tmp", "emptyDir": {}}, *source.volumes],
        "terminationGracePeriodSeconds": settings.termination_grace_seconds,
        "securityContext": {"runAsNonRoot": True, "seccompProfile": {"type": "RuntimeDefault"}},
        "enableServiceLinks": False,
    }
    if source.init_containers:
        pod_spec["initContainers"] = list(source.init_containers)
    if spec.worker.node_selector:
        pod_spec["nodeSelector"] = dict(spec.worker.node_selector)
    if spec.worker.tolerations:
        pod_spec["tolerations"] = list(spec.worker.tolerations)
    metadata = _metadata(action.name, namespace, labels, owner_uid, hd_name)
    if action.template:
        metadata["annotations"] = {names.ANNOTATION_TEMPLATE: action.template}
    return {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "metadata": metadata,
        "spec": {
            "replicas": action.replicas,
            "selector": {"matchLabels": {names.LABEL_DEPLOYMENT: hd_name, names.LABEL_WORKER: action.name}},
            # A worker's depth never changes in place, so old pods go only once new ones are Ready.
            "strategy": {"type": "RollingUpdate", "rollingUpdate": {"maxUnavailable": 0, "maxSurge": 1}},
            "template": {
                "metadata": {
                    "labels": labels,
                    "annotations": {
                        "prometheus.io/scrape": "true",
                        "prometheus.io/port": str(names.WORKER_PORT),
                        "prometheus.io/path": "/metrics",
                    },
                },
                "spec": pod_spec,
            },
        },
    }


def _owned_labels(hd_name: str) -> dict[str, str]:
    """What every object the operator makes for a HeliosDeployment carries (the platform finds them by it)."""
    return {names.LABEL_APP: names.APP_NAME, names.LABEL_MANAGED_BY: names.MANAGER, names.LABEL_DEPLOYMENT: hd_name}


def _service_labels(hd_name: str, kind: str) -> dict[str, str]:
    return {**_owned_labels(hd_name), names.LABEL_SERVICE: kind}


def _http_port() -> dict[str, Any]:
    http = names.WORKER_PORT_NAME
    return {"name": http, "port": names.WORKER_PORT, "targetPort": http, "protocol": "TCP"}


def stable_service(hd_name: str, namespace: str, pool: str, *, owner_uid: str | None = None) -> dict[str, Any]:
    """The Service clients call, named like the HeliosDeployment; the operator moves its selector."""
    return {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": _metadata(hd_name, namespace, _service_labels(hd_name, names.SERVICE_STABLE), owner_uid, hd_name),
        "spec": {"type": "ClusterIP", "selector": _pool_labels(hd_name, pool), "ports": [_http_port()]},
    }


def metrics_service(hd_name: str, namespace: str, *, owner_uid: str | None = None) -> dict[str, Any]:
    """A headless Service over every worker of the HeliosDeployment, whatever its pool, so that
    profiling workers outside the stable Service's pool are scraped too."""
    name = names.dns_label(f"{hd_name}-metrics")
    return {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": _metadata(name, namespace, _service_labels(hd_name, names.SERVICE_METRICS), owner_uid, hd_name),
        "spec": {
            "clusterIP": "None",
            "selector": {names.LABEL_DEPLOYMENT: hd_name, names.LABEL_APP: names.APP_NAME},
            "ports": [_http_port()],
        },
    }


def service_monitor_name(hd_name: str) -> str:
    return names.dns_label(f"{hd_name}-workers")


def service_monitor(
    hd_name: str,
    namespace: str,
    *,
    owner_uid: str | None = None,
    settings: WorkerSettings = DEFAULT_SETTINGS,
    extra_labels: Mapping[str, str] | None = None,
) -> dict[str, Any]:
    """Prometheus Operator scrape config for every worker, through the headless metrics Service.
    `extra_labels` are what the cluster's Prometheus selects ServiceMonitors by (kube-prometheus-stack:
    `release: <its release>`); ours cannot be overridden by them."""
    labels = {**(extra_labels or {}), **_service_labels(hd_name, names.SERVICE_METRICS)}
    return {
        "apiVersion": "monitoring.coreos.com/v1",
        "kind": "ServiceMonitor",
        "metadata": _metadata(service_monitor_name(hd_name), namespace, labels, owner_uid, hd_name),
        "spec": {
            "selector": {"matchLabels": {names.LABEL_DEPLOYMENT: hd_name, names.LABEL_SERVICE: names.SERVICE_METRICS}},
            "namespaceSelector": {"matchNames": [namespace]},
            "endpoints": [
                {
                    "port": names.WORKER_PORT_NAME,
                    "path": "/metrics",
                    "interval": settings.scrape_interval,
                    # adapters/prometheus.py selects each worker's series by `worker` and `namespace`.
                    "relabelings": [
                        {"sourceLabels": [_pod_label_meta(names.LABEL_WORKER)], "targetLabel": names.SERIES_WORKER},
                        {"sourceLabels": ["__meta_kubernetes_namespace"], "targetLabel": names.SERIES_NAMESPACE},
                    ],
                }
            ],
        },
    }


def scrape_hint(hd_name: str, namespace: str, extra_labels: Mapping[str, str] | None = None) -> str:
    """What a platform team sets when the workers' series never reach Prometheus (MetricsAvailable's
    message, so `kubectl describe hd` says it)."""
    labels = ", ".join(
        f"{k}={v}"
        for k, v in sorted({**(extra_labels or {}), **_service_labels(hd_name, names.SERVICE_METRICS)}.items())
    )
    return (
        f"Prometheus must scrape the workers: with the Prometheus Operator, its serviceMonitorSelector (and"
        f" serviceMonitorNamespaceSelector) must match ServiceMonitor {namespace}/{service_monitor_name(hd_name)}"
        f" (labels {labels}; more through the chart's serviceMonitor.labels); with a plain Prometheus, a"
        f" kubernetes_sd_configs pod job that keeps prometheus.io/scrape=true pods and relabels the pod label"
        f" {names.LABEL_WORKER} into `{names.SERIES_WORKER}` (README: Prometheus)"
    )


def disruption_budget(hd_name: str, namespace: str, *, owner_uid: str | None = None) -> dict[str, Any]:
    """At most one serving pod evicted at a time (a node drain, the cluster autoscaler's scale-down);
    profiling workers are disposable and not covered. A pod that is not Ready may always go, so a
    crashing worker never blocks a drain."""
    return {
        "apiVersion": "policy/v1",
        "kind": "PodDisruptionBudget",
        "metadata": _metadata(disruption_budget_name(hd_name), namespace, _owned_labels(hd_name), owner_uid, hd_name),
        "spec": {
            "maxUnavailable": 1,
            "selector": {"matchLabels": {names.LABEL_DEPLOYMENT: hd_name, names.LABEL_ROLE: names.ROLE_SERVE}},
            "unhealthyPodEvictionPolicy": "AlwaysAllow",
        },
    }


def inference_pool(hd_name: str, namespace: str, pool: str, spec: InferencePoolSpec) -> dict[str, Any]:
    """The Gateway API Inference Extension's InferencePool (v1) over the pods of `pool` (the active
    worker's, as the stable Service selects them), named like the HeliosDeployment."""
    return {
        "apiVersion": f"{INFERENCE_GROUP}/v1",
        "kind": "InferencePool",
        "metadata": _metadata(hd_name, namespace, _owned_labels(hd_name), None, hd_name),
        "spec": {
            "selector": {"matchLabels": _pool_labels(hd_name, pool)},
            "targetPorts": [{"number": names.WORKER_PORT}],
            "endpointPickerRef": {
                "kind": "Service",
                "name": spec.endpoint_picker,
                "port": {"number": spec.port},
                "failureMode": spec.failure_mode,
            },
        },
    }


INFERENCE_GROUP = "inference.networking.k8s.io"


def disruption_budget_name(hd_name: str) -> str:
    return names.dns_label(f"{hd_name}-serving")


def _pod_label_meta(label: str) -> str:
    """Prometheus' Kubernetes SD name of a pod label: `helios.dev/worker` -> `..._helios_dev_worker`."""
    return "__meta_kubernetes_pod_label_" + "".join(ch if ch.isalnum() else "_" for ch in label)


def _metadata(
    name: str, namespace: str, labels: dict[str, str], owner_uid: str | None, owner_name: str
) -> dict[str, Any]:
    meta: dict[str, Any] = {"name": name, "namespace": namespace, "labels": dict(labels)}
    if owner_uid:
        meta["ownerReferences"] = [
            {
                "apiVersion": names.API_VERSION,
                "kind": names.KIND,
                "name": owner_name,
                "uid": owner_uid,
                "controller": True,
                "blockOwnerDeletion": True,
            }
        ]
    return meta


def _quantities_as_strings(resources: dict[str, Any]) -> dict[str, Any]:
    """Quantities as the API's own strings ("1"): some clients reject an integer GPU count."""
    out: dict[str, Any] = dict(resources)
    for part in ("limits", "requests"):
        if isinstance(out.get(part), dict):
            out[part] = {k: str(v) for k, v in out[part].items()}
    return out


def _container_security() -> dict[str, Any]:
    return {
        "runAsNonRoot": True,
        "readOnlyRootFilesystem": True,
        "allowPrivilegeEscalation": False,
        "capabilities": {"drop": ["ALL"]},
        "seccompProfile": {"type": "RuntimeDefault"},
    }
