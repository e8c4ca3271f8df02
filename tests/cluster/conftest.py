"""The cluster suite's gate, configuration and cluster fixtures (see docs/cluster-testing.md).

Every test under tests/cluster is marked `cluster`. It runs against one of two targets:
- the project's own control plane (the default): `scripts/cluster.sh up` starts real etcd,
  kube-apiserver, kube-controller-manager and kube-scheduler on loopback (built from Go modules
  once per machine), and tests/support/kubelet.py stands in for the kubelet; the suite is skipped,
  with the reason, where the plane cannot be built (no Go >= 1.25) or HELIOS_CLUSTER=0;
- any cluster, with HELIOS_E2E=1 and KUBECONFIG (kind, k3d, a cloud cluster): skipped, with the
  reason, unless it answers `kubectl version` within seconds.
Tests marked `own_plane` need the project's plane (its test kubelet, its audit log).
What the fixtures leave behind on an external cluster is one namespace (deleted at the end unless
HELIOS_E2E_KEEP=1), one PersistentVolume named after it, the CRD (kept: other releases may use it)
and the Helm release's cluster-wide objects (removed by `helm uninstall`).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import uuid
from collections.abc import Callable, Iterator
from functools import cache
from pathlib import Path
from typing import Any

import plane as own
import pytest
from e2e_support import (
    HERE,
    MODEL_CLAIM,
    OPERATOR,
    PROMETHEUS,
    RELEASE,
    REPO,
    ROLE_KINDS,
    SKIP_REASON,
    E2EConfig,
    Kubectl,
    LocalPrometheus,
    host_claim,
    image_name,
    local_prometheus_config,
    operator_logs,
    prometheus_objects,
    split_image,
    wait_for,
)
from tests.support.kubelet import TestKubelet


@cache
def e2e_config() -> E2EConfig:
    return E2EConfig.from_env()


def external() -> bool:
    """HELIOS_E2E=1: the cluster KUBECONFIG names, not the project's own plane."""
    return e2e_config().enabled


@cache
def unavailable() -> str | None:
    """Why the suite cannot run here, or None. Asks the cluster only when HELIOS_E2E=1."""
    if not external():
        return own.unavailable()
    cfg = e2e_config()
    if shutil.which("kubectl") is None:
        return f"{SKIP_REASON} (no kubectl on PATH)"
    if cfg.kubeconfig is None:
        return f"{SKIP_REASON} (no KUBECONFIG and no ~/.kube/config)"
    try:
        done = subprocess.run(
            ["kubectl", "version", "-o", "json", "--request-timeout=5s"],
            capture_output=True,
            text=True,
            timeout=15,
            check=False,
        )
    except subprocess.TimeoutExpired:
        return f"{SKIP_REASON} (`kubectl version` did not answer in 15 s)"
    if done.returncode != 0 or "serverVersion" not in done.stdout:
        return f"{SKIP_REASON} (the cluster in {cfg.kubeconfig} did not answer: {done.stderr.strip()[:300]})"
    if shutil.which(cfg.helm) is None:
        return f"the chart is installed with Helm: put `helm` on PATH or set HELIOS_HELM (got {cfg.helm!r})"
    return None


OWN_PLANE_ONLY = "needs the project's own plane (its test kubelet and audit log): unset HELIOS_E2E"


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", "own_plane: needs scripts/cluster.sh's plane (test kubelet, audit log)")


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    # This hook sees every collected item, not only this folder's: touch only ours.
    ours = [item for item in items if HERE in Path(str(item.path)).resolve().parents]
    if not ours:
        return
    reason = unavailable()
    for item in ours:
        item.add_marker(pytest.mark.cluster)
        if reason is not None:
            item.add_marker(pytest.mark.skip(reason=reason))
        elif external() and item.get_closest_marker("own_plane"):
            item.add_marker(pytest.mark.skip(reason=OWN_PLANE_ONLY))


# ---------------------------------------------------------------------------------------------
# Fixtures: one namespace, the CRD, models on a hostPath volume, Prometheus, the chart


@pytest.fixture(scope="session")
def e2e() -> E2EConfig:
    return e2e_config()


@pytest.fixture(scope="session")
def plane() -> Iterator[own.Plane | None]:
    """The project's own plane, started (or reused) by `scripts/cluster.sh up`; None on an external
    cluster. Stopped at the end if this session started it, unless HELIOS_CLUSTER_KEEP=1."""
    if external():
        yield None
        return
    started = own.up()
    yield started
    if started.started_here and os.environ.get("HELIOS_CLUSTER_KEEP") != "1":
        own.down()


@pytest.fixture(scope="session")
def client_env(plane: own.Plane | None) -> dict[str, str] | None:
    """The environment of real clients (kubectl, helm): the plane's, or this process's."""
    return plane.env() if plane is not None else None


@pytest.fixture(scope="session")
def kube(e2e: E2EConfig, client_env: dict[str, str] | None) -> Iterator[Kubectl]:
    """kubectl bound to a fresh namespace, deleted at the end (unless HELIOS_E2E_KEEP=1)."""
    kube = Kubectl(f"helios-e2e-{uuid.uuid4().hex[:6]}", env=client_env)
    kube.ok("create", "namespace", kube.namespace)
    yield kube
    if not e2e.keep:
        kube.run("delete", "namespace", kube.namespace, "--wait=false")


@pytest.fixture(scope="session")
def kube_factory(e2e: E2EConfig, client_env: dict[str, str] | None) -> Iterator[Callable[[str], Kubectl]]:
    """kubectl in another fresh namespace (prefix-xxxxxx), for modules that must not share the
    e2e suite's namespace (its operator watches that one); all deleted at the end."""
    made: list[Kubectl] = []

    def make(prefix: str) -> Kubectl:
        kube = Kubectl(f"{prefix}-{uuid.uuid4().hex[:6]}", env=client_env)
        kube.ok("create", "namespace", kube.namespace)
        made.append(kube)
        return kube

    yield make
    if not e2e.keep:
        for kube in made:
            kube.run("delete", "namespace", kube.namespace, "--wait=false")


@pytest.fixture(scope="session")
def crd(kube: Kubectl, e2e: E2EConfig) -> dict[str, Any]:
    """`kubectl apply -f crds/`, then the CRD once Established."""
    kube.ok("apply", "--server-side", "--force-conflicts", "-f", str(REPO / "crds"))
    kube.ok("wait", "--for=condition=Established", "crd/heliosdeployments.helios.dev", "--timeout=60s", timeout=90)
    return kube.json("get", "crd", "heliosdeployments.helios.dev")


@pytest.fixture(scope="session")
def model_dir(e2e: E2EConfig, plane: own.Plane | None, tmp_path_factory: pytest.TempPathFactory) -> str:
    """The directory on the nodes holding helios-tiny/ and helios-small/. On the project's own plane
    the nodes are this machine: the project's trained models (cached; about a minute each the first
    time). There `helios-small` is the `micro` preset: the `small` preset needs far longer than the
    suite's budget to train on 2 shared cores, and any second candidate proves the flow."""
    if plane is None:
        return e2e.model_dir
    from helios_worker.models.cache import train_preset

    models = tmp_path_factory.mktemp("models")
    for name, preset in (("helios-tiny", "tiny"), ("helios-small", "micro")):
        (models / name).symlink_to(train_preset(preset))
    return str(models)


@pytest.fixture(scope="session")
def model_claim(kube: Kubectl, e2e: E2EConfig, model_dir: str) -> Iterator[str]:
    """A read-only PVC over the model directory on the nodes (a hostPath PV bound to it by name),
    so the example's models are named pvc://helios-models/helios-tiny and .../helios-small."""
    pv = f"{kube.namespace}-models"
    kube.apply(host_claim(kube.namespace, MODEL_CLAIM, pv, model_dir, "ReadOnlyMany"))
    wait_for(
        "the model claim Bound",
        lambda: kube.ns_json("get", "pvc", MODEL_CLAIM)["status"].get("phase") == "Bound",
        timeout=60,
    )
    yield MODEL_CLAIM
    if not e2e.keep:
        kube.run("delete", "pv", pv, "--wait=false")


@pytest.fixture(scope="session")
def prometheus_url(
    kube: Kubectl, e2e: E2EConfig, plane: own.Plane | None, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[str]:
    """HELIOS_E2E_PROMETHEUS_URL, or a Prometheus of our own that discovers the worker pods through
    kubernetes_sd_configs, scrapes them every few seconds and labels their series `worker` and
    `namespace` as the chart's ServiceMonitor does. On an external cluster it runs in the namespace;
    on the project's plane it is a local process (the plane's own build: Debian's package has no
    kubernetes_sd_configs) that asks this API server for pods with a ServiceAccount token (no pod:
    it would need cluster DNS and a token volume)."""
    if e2e.prometheus_url:
        yield e2e.prometheus_url
        return
    if plane is None:
        kube.apply(prometheus_objects(kube.namespace, e2e.prometheus_image))
        kube.ns(
            "rollout", "status", f"deployment/{PROMETHEUS}", f"--timeout={int(e2e.timeout_s)}s", timeout=e2e.timeout_s
        )
        yield f"http://{PROMETHEUS}.{kube.namespace}.svc:9090"
        return
    objects = [o for o in prometheus_objects(kube.namespace, e2e.prometheus_image) if o["kind"] in ROLE_KINDS]
    kube.apply(objects)
    directory = tmp_path_factory.mktemp("prometheus")
    token = directory / "token"
    token.write_text(kube.ns("create", "token", PROMETHEUS, "--duration=6h").strip())
    server = LocalPrometheus(
        directory,
        local_prometheus_config(kube.namespace, own.api_server(plane), str(plane.state / "pki" / "ca.crt"), str(token)),
        binary=str(plane.bin_dir / "prometheus"),
    )
    server.start()
    try:
        yield server.url
    finally:
        server.stop()


@pytest.fixture(scope="session")
def ops_node(
    plane: own.Plane | None, e2e: E2EConfig, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[TestKubelet | None]:
    """On the project's plane, the node that runs the operator and worker pods (tests/support/kubelet.py):
    the images map to `helios operator` and to the pod's own command; none elsewhere."""
    if plane is None:
        yield None
        return
    scratch = tmp_path_factory.mktemp("node-e2e")
    images = {image_name(e2e.operator_image): ["helios", "operator"], image_name(e2e.worker_image): None}
    kubelet = plane.test_node("node-e2e", scratch, images)
    with kubelet:
        yield kubelet


@pytest.fixture(scope="session")
def operator_release(
    kube: Kubectl,
    e2e: E2EConfig,
    crd: dict[str, Any],
    prometheus_url: str,
    plane: own.Plane | None,
    ops_node: TestKubelet | None,
) -> Iterator[str]:
    """The chart, installed into the test namespace and watching only it; the operator Deployment's name."""
    repository, tag = split_image(e2e.operator_image)
    helm_bin = plane.helm if plane is not None else e2e.helm
    command = [
        helm_bin,
        "install",
        RELEASE,
        str(REPO / "charts" / "helios"),
        "--namespace",
        kube.namespace,
        "--skip-crds",  # applied by the `crd` fixture from crds/, the same file
        "--wait",
        "--timeout",
        f"{int(e2e.timeout_s)}s",
        "--set",
        f"fullnameOverride={OPERATOR}",
        "--set",
        f"image.repository={repository}",
        "--set",
        f"image.tag={tag}",
        "--set",
        f"operator.workerImage={e2e.worker_image}",
        "--set",
        f"operator.prometheusUrl={prometheus_url}",
        "--set",
        f"watchNamespaces={{{kube.namespace}}}",
        "--set",
        "operator.logLevel=debug",
    ]
    if plane is not None:
        # A test node has no network namespace: the operator's metrics server must be told its pod IP.
        env = [{"name": "HELIOS_METRICS_HOST", "valueFrom": {"fieldRef": {"fieldPath": "status.podIP"}}}]
        command += ["--set-json", f"operator.extraEnv={json.dumps(env)}"]
    done = subprocess.run(
        command, capture_output=True, text=True, timeout=e2e.timeout_s + 60, check=False, env=kube.env
    )
    assert done.returncode == 0, f"helm install failed: {done.stderr.strip()}\n{operator_logs(kube, ops_node)}"
    yield OPERATOR
    if not e2e.keep:
        subprocess.run(
            [helm_bin, "uninstall", RELEASE, "--namespace", kube.namespace],
            capture_output=True,
            timeout=120,
            check=False,
            env=kube.env,
        )


@pytest.fixture(scope="session")
def api_proxy(e2e: E2EConfig, client_env: dict[str, str] | None) -> Iterator[str]:
    """`kubectl proxy` on a free loopback port; its base URL."""
    proc = subprocess.Popen(
        ["kubectl", "proxy", "--address=127.0.0.1", "--port=0"],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env=client_env,
    )
    try:
        assert proc.stdout is not None
        line = proc.stdout.readline()  # "Starting to serve on 127.0.0.1:PORT"
        assert "Starting to serve on" in line, f"kubectl proxy said: {line!r}"
        yield "http://" + line.rsplit(" ", 1)[-1].strip()
    finally:
        proc.terminate()
        proc.wait(10)
