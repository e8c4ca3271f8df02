"""Names other systems depend on: the API group, the kind, label keys. Defined once, here."""

from __future__ import annotations

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
