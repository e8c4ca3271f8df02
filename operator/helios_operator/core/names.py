"""Names other systems depend on: the API group, the kind, label keys; and the deterministic DNS-1123
names of the worker Deployments and pools (a restarted operator must find the same objects again, so
they depend only on the spec and status). Defined once, here."""

from __future__ import annotations

import hashlib
import re

GROUP = "helios.dev"
VERSION = "v1alpha1"
API_VERSION = f"{GROUP}/{VERSION}"
KIND = "HeliosDeployment"
PLURAL = "heliosdeployments"
SINGULAR = "heliosdeployment"
SHORT_NAME = "hd"
CRD_NAME = f"{PLURAL}.{GROUP}"

# Labels on every object the operator creates.
LABEL_APP = "app.kubernetes.io/name"
LABEL_MANAGED_BY = "app.kubernetes.io/managed-by"
LABEL_DEPLOYMENT = f"{GROUP}/deployment"  # the HeliosDeployment's name
LABEL_CANDIDATE = f"{GROUP}/candidate"
LABEL_DEPTH = f"{GROUP}/depth"
LABEL_ROLE = f"{GROUP}/role"  # profile | serve
LABEL_WORKER = f"{GROUP}/worker"  # the worker Deployment's name
LABEL_POOL = f"{GROUP}/pool"  # the Service selects one pool; workers that share live traffic share it
ANNOTATION_TEMPLATE = f"{GROUP}/template"  # on worker Deployments: EnsureWorker.template they run
LABEL_SERVICE = f"{GROUP}/service"  # on our Services: stable (clients) | metrics (headless, every worker)
SERVICE_STABLE = "stable"
SERVICE_METRICS = "metrics"
APP_NAME = "helios-worker"
MANAGER = "helios-operator"

ROLE_PROFILE = "profile"
ROLE_SERVE = "serve"

# Labels on the workers' series in Prometheus: the ServiceMonitor relabels LABEL_WORKER into `worker`.
SERIES_WORKER = "worker"
SERIES_NAMESPACE = "namespace"

WORKER_PORT = 8000
WORKER_PORT_NAME = "http"

# Worker Deployment and pool names

MAX_NAME = 63  # a DNS-1123 label; Deployment names also end up in pod labels
_INVALID = re.compile(r"[^a-z0-9-]+")


def dns_label(raw: str) -> str:
    """Lower-case, replace what DNS-1123 forbids, and truncate with a hash suffix when too long."""
    name = _INVALID.sub("-", raw.lower()).strip("-") or "x"
    if name == raw and len(name) <= MAX_NAME:
        return name
    # Sanitised or truncated: a hash of the raw name keeps two different names from colliding.
    digest = hashlib.sha256(raw.encode()).hexdigest()[:8]
    return f"{name[: MAX_NAME - 9].rstrip('-')}-{digest}"


def profile_pool(hd: str, round_: int) -> str:
    """The pool of the initial profiling workers of one round (they serve live traffic together)."""
    return dns_label(f"{hd}-p{round_}")


def profile_worker(hd: str, round_: int, candidate: str) -> str:
    return dns_label(f"{hd}-p{round_}-{candidate}")


def serve_worker(hd: str, candidate: str, depth: int) -> str:
    """A serve worker is its own pool: the Service moves from one to the next."""
    return dns_label(f"{hd}-{candidate}-l{depth}")
