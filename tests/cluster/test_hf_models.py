"""An hf:// candidate on the real control plane: the operator's worker Deployment, its fetch-model init
container downloading from a stand-in hub, the worker serving what it downloaded, and later pods of
the same HeliosDeployment (a new replica, a profiling worker) reusing the shared cache untouched.

Real: the API server, scheduler and controllers placing and rolling the pods; the Deployment exactly
as `manifests.worker_deployment` renders it; `snapshot_download` against HTTP; the worker process.
Standing in: the hub (tests/support/hub.py, no network here), the kubelet (tests/support/kubelet.py,
which starts each container with the worker image's own ENV from Dockerfile.worker, HF_HUB_OFFLINE=1
included: the setting that made every hf:// model fail), a hostPath PersistentVolume as the
ReadWriteMany claim.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import replace
from pathlib import Path
from typing import Any

import httpx
import pytest
from e2e_support import REPO, E2EConfig, Kubectl, host_claim, image_name, wait_for
from plane import Plane
from tests.support.dockerfile import image_env
from tests.support.hub import LocalHub, local_hub
from tests.support.kubelet import TestKubelet

from helios_operator.core import manifests, names
from helios_operator.core.types import EnsureWorker, HeliosSpec

pytestmark = [pytest.mark.own_plane, pytest.mark.timeout(900)]
GROUP = {"helios.dev/test-group": "hf-models"}
REPO_ID = "helios-test/tiny-llama"
CLAIM = "hf-cache"
MODEL = f"hf://{REPO_ID}"


@pytest.fixture(scope="module")
def space(kube_factory: Callable[[str], Kubectl]) -> Kubectl:
    return kube_factory("helios-hf")


@pytest.fixture(scope="module")
def hub_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A small Llama (random weights, 3 layers) with the project's tokenizer, as the hub would hold it."""
    import torch
    from transformers import AutoModelForCausalLM

    from helios_worker.engine.testing import random_config
    from helios_worker.models.tokenizer import build_tokenizer

    torch.manual_seed(0)
    folder = tmp_path_factory.mktemp("hub") / "tiny-llama"
    AutoModelForCausalLM.from_config(random_config("llama", layers=3, hidden=64)).save_pretrained(folder)
    build_tokenizer().save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def hub(hub_model: Path) -> Iterator[LocalHub]:
    with local_hub({REPO_ID: hub_model}) as running:
        yield running


@pytest.fixture(scope="module")
def node(plane: Plane, e2e: E2EConfig, tmp_path_factory: pytest.TempPathFactory) -> Iterator[TestKubelet]:
    """A node with GPUs (the worker pods ask for one) whose containers start with the worker image's ENV."""
    scratch = tmp_path_factory.mktemp("node-hf")
    images = {image_name(e2e.worker_image): None}
    env = image_env(REPO / "Dockerfile.worker")
    kubelet = plane.test_node("node-hf", scratch, images, capacity={"nvidia.com/gpu": "4"}, labels=GROUP, env=env)
    with kubelet:
        yield kubelet


@pytest.fixture(scope="module")
def cache_dir(space: Kubectl, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """The claim every pod of the HeliosDeployment shares: a ReadWriteMany hostPath volume; its folder."""
    folder = tmp_path_factory.mktemp("hf-cache")
    pv = f"{space.namespace}-{CLAIM}"
    space.apply(host_claim(space.namespace, CLAIM, pv, str(folder), "ReadWriteMany"))
    wait_for("the cache claim Bound", lambda: space.ns_json("get", "pvc", CLAIM)["status"].get("phase") == "Bound", 60)
    yield folder
    space.run("delete", "pv", pv, "--wait=false")


def spec(e2e: E2EConfig, hub: LocalHub) -> HeliosSpec:
    return HeliosSpec.from_dict(
        {
            "candidates": [{"name": "tiny", "model": MODEL}],
            "worker": {
                "image": e2e.worker_image,
                "nodeSelector": GROUP,
                "env": [{"name": "HF_ENDPOINT", "value": hub.url}],  # as a mirror of the hub would be set
                "modelCache": {"claimName": CLAIM},
            },
        }
    )


def roll_out(space: Kubectl, node: TestKubelet, name: str, replicas: int) -> list[dict[str, Any]]:
    """Wait until the worker Deployment `name` has `replicas` Ready pods; its pods."""
    selector = f"{names.LABEL_WORKER}={name}"

    def ready() -> list[dict[str, Any]] | None:
        pods = space.ns_json("get", "pods", "-l", selector)["items"]
        ok = [
            p
            for p in pods
            if {c["type"]: c["status"] for c in p["status"].get("conditions") or ()}.get("Ready") == "True"
        ]
        return pods if len(ok) == replicas == len(pods) else None

    try:
        return list(wait_for(f"{replicas} Ready pod(s) of {name}", ready, timeout=400, interval=2))
    except TimeoutError as err:
        logs = [
            f"--- {p['metadata']['name']} {c}:\n{node.log_of(space.namespace, p['metadata']['name'], c)[-3000:]}"
            for p in space.ns_json("get", "pods", "-l", selector)["items"]
            for c in (manifests.FETCH_CONTAINER, "worker")
        ]
        raise AssertionError(f"{err}\n{node.describe()}\n" + "\n".join(logs)) from None


def fetch_status(pod: dict[str, Any]) -> dict[str, Any]:
    (status,) = pod["status"]["initContainerStatuses"]
    assert status["name"] == manifests.FETCH_CONTAINER
    return dict(status)


def test_an_hf_candidate_is_downloaded_once_by_its_init_container_and_served_then_reused_by_later_pods(
    space: Kubectl, e2e: E2EConfig, hub: LocalHub, hub_model: Path, node: TestKubelet, cache_dir: Path
) -> None:
    hd = spec(e2e, hub)
    serve = EnsureWorker("hf-tiny-l0", "tiny", MODEL, 0, "serve", "hf-tiny-l0", 1)
    space.apply([manifests.worker_deployment("hf", space.namespace, hd, serve)])
    (pod,) = roll_out(space, node, serve.name, 1)

    # The init container went online despite the image's HF_HUB_OFFLINE=1, and fetched every file.
    done = fetch_status(pod)["state"]["terminated"]
    assert done["exitCode"] == 0 and done["reason"] == "Completed"
    files = sorted(p.name for p in hub_model.iterdir())
    assert sorted(hub.downloads(REPO_ID)) == files
    folder = cache_dir / REPO_ID.replace("/", "--")
    assert all((folder / f).read_bytes() == (hub_model / f).read_bytes() for f in files)
    assert "downloaded into" in node.log_of(space.namespace, pod["metadata"]["name"], manifests.FETCH_CONTAINER)

    # The worker serves the downloaded model, on its pod IP.
    answer = httpx.post(
        f"http://{pod['status']['podIP']}:{names.WORKER_PORT}/v1/completions",
        json={"prompt": "What is 2 + 3?", "max_tokens": 3, "temperature": 0.0},
        timeout=60,
    )
    assert answer.status_code == 200, answer.text
    assert answer.json()["choices"][0]["helios"]["candidate"] == "tiny"

    # A new replica and a profiling worker (what a scale-up, a switch or a new round create) reuse the
    # cache: their init containers complete without one request to the hub.
    asked = len(hub.requests)
    space.apply([manifests.worker_deployment("hf", space.namespace, hd, replace(serve, replicas=2))])
    profile = EnsureWorker("hf-p1-tiny", "tiny", MODEL, 0, "profile", "hf-p1", 1)
    space.apply([manifests.worker_deployment("hf", space.namespace, hd, profile)])
    later = [p for p in roll_out(space, node, serve.name, 2) if p["metadata"]["uid"] != pod["metadata"]["uid"]]
    later += roll_out(space, node, profile.name, 1)
    assert len(later) == 2
    for p in later:
        assert fetch_status(p)["state"]["terminated"]["exitCode"] == 0
        log = node.log_of(space.namespace, p["metadata"]["name"], manifests.FETCH_CONTAINER)
        assert f"{REPO_ID} already complete in" in log, log
    assert len(hub.requests) == asked, hub.requests[asked:]
