"""What the Kubernetes adapter reads from pods and nodes: a pod waiting for a node is a wait (with the
scheduler's words), not a failure; placement time starts the load clock; the nodes' GPU supply."""

from __future__ import annotations

import copy
from typing import Any

import pytest

from helios_operator.adapters.kubernetes import (
    KubeApiError,
    KubernetesPlatform,
    PodStates,
    gpu_supply,
    observed_worker,
    pod_failure,
    pod_scheduled_at,
)
from helios_operator.core import manifests
from helios_operator.core.types import EnsureInferencePool, HeliosSpec, Owner, SpecError

WAITING = "0/3 nodes are available: 3 Insufficient nvidia.com/gpu. preemption: 0/3 nodes are available."


def pod(name: str, scheduled: str | None, message: str = WAITING) -> dict[str, Any]:
    condition = (
        {"type": "PodScheduled", "status": "True", "lastTransitionTime": scheduled}
        if scheduled
        else {"type": "PodScheduled", "status": "False", "reason": "Unschedulable", "message": message}
    )
    return {"metadata": {"name": name}, "status": {"conditions": [condition]}}


def test_an_unschedulable_pod_is_a_wait_with_the_schedulers_words_not_a_failure() -> None:
    waiting = pod("w-1", None)
    assert pod_failure(waiting) is None
    states = PodStates()
    states.add(waiting)
    assert states.unschedulable == f"pod w-1: {WAITING}"
    assert states.failure is None and states.scheduled_at is None


def test_placement_time_is_the_latest_pods_and_unknown_while_one_waits() -> None:
    states = PodStates()
    states.add(pod("w-1", "2026-12-01T10:00:00Z"))
    states.add(pod("w-2", "2026-12-01T10:05:00Z"))
    assert states.scheduled_at == pod_scheduled_at(pod("x", "2026-12-01T10:05:00Z"))
    assert states.unschedulable is None
    states.add(pod("w-3", None))
    assert states.scheduled_at is None and states.unschedulable is not None


def test_observed_worker_carries_the_pods_wait() -> None:
    deployment = {
        "metadata": {
            "name": "chat-big-l10",
            "creationTimestamp": "2026-12-01T09:00:00Z",
            "labels": {
                "helios.dev/role": "serve",
                "helios.dev/candidate": "big",
                "helios.dev/depth": "10",
                "helios.dev/pool": "chat-big-l10",
            },
        },
        "spec": {"replicas": 2},
        "status": {"readyReplicas": 1},
    }
    states = PodStates()
    states.add(pod("chat-big-l10-a", "2026-12-01T09:00:01Z"))
    states.add(pod("chat-big-l10-b", None))
    w = observed_worker(deployment, states)
    assert w is not None and w.unschedulable is not None and w.scheduled_at is None
    assert w.started_at == w.created_at  # no placement yet: the load clock falls back to creation


def node(gpus: str, ready: bool = True, cordoned: bool = False) -> dict[str, Any]:
    return {
        "spec": {"unschedulable": True} if cordoned else {},
        "status": {
            "allocatable": {"cpu": "8", "nvidia.com/gpu": gpus},
            "conditions": [{"type": "Ready", "status": "True" if ready else "False"}],
        },
    }


def test_gpu_supply_counts_ready_uncordoned_nodes_only() -> None:
    nodes = {"items": [node("2"), node("4", ready=False), node("8", cordoned=True), node("1"), {"status": {}}]}
    assert gpu_supply(nodes) == 3


# -- observe_now and the objects the platform keeps, against a recording stand-in for the API server


class RecordingApi:
    """Answers GETs from `objects` (path without query -> body), records every request; 404 otherwise."""

    def __init__(self, objects: dict[str, Any]) -> None:
        self.objects = objects
        self.calls: list[tuple[str, str, Any]] = []

    def request(self, method: str, path: str, body: Any = None, content_type: str = "application/json") -> Any:
        self.calls.append((method, path, body))
        if method == "GET":
            found = self.objects.get(path.split("?")[0])
            if found is None:
                raise KubeApiError(404, "not found")
            return found
        if method == "PATCH":
            return {}
        if method == "POST":
            return body
        raise AssertionError(f"unexpected {method} {path}")


NS, HD = "team", "chat"
OWNER = Owner(namespace=NS, name=HD, uid="uid-1")
OURS = {"helios.dev/deployment": HD, "app.kubernetes.io/managed-by": "helios-operator"}


def worker_deployment(name: str, conditions: list[dict[str, Any]] | None = None) -> dict[str, Any]:
    labels = {**OURS, "helios.dev/role": "serve", "helios.dev/candidate": "big", "helios.dev/depth": "10"}
    return {
        "metadata": {"name": name, "creationTimestamp": "2026-12-01T09:00:00Z", "labels": labels},
        "spec": {"replicas": 1},
        "status": {"conditions": conditions or []},
    }


def cluster(
    deployments: list[dict[str, Any]], pods: list[dict[str, Any]], events: list[dict[str, Any]]
) -> RecordingApi:
    return RecordingApi(
        {
            f"/apis/apps/v1/namespaces/{NS}/deployments": {"items": deployments},
            f"/api/v1/namespaces/{NS}/services": {"items": []},
            f"/api/v1/namespaces/{NS}/pods": {"items": pods},
            f"/api/v1/namespaces/{NS}/events": {"items": events},
            "/api/v1/nodes": {"items": []},
        }
    )


def test_observe_lists_only_the_heliosdeployments_children_by_label_selector() -> None:
    api = cluster([worker_deployment("chat-big-l10")], [], [])
    KubernetesPlatform(api).observe_now(OWNER)  # type: ignore[arg-type]
    lists = [path for method, path, _ in api.calls if method == "GET" and "/nodes" not in path]
    assert lists and all(path.endswith("?labelSelector=helios.dev/deployment%3Dchat") for path in lists), lists


def test_a_quota_that_refuses_the_pods_is_reported_with_its_own_reason_and_words() -> None:
    refused = (
        'pods "chat-big-l10-5d9f-x" is forbidden: exceeded quota: gpus, requested: requests.nvidia.com/gpu=1,'
        " used: requests.nvidia.com/gpu=0, limited: requests.nvidia.com/gpu=0"
    )
    condition = {"type": "ReplicaFailure", "status": "True", "reason": "FailedCreate", "message": refused}
    api = cluster([worker_deployment("chat-big-l10", [condition])], [], [])
    (w,) = KubernetesPlatform(api).observe_now(OWNER).workers  # type: ignore[arg-type]
    assert w.failure_reason == "QuotaExceeded"
    assert w.failure is not None and "exceeded quota: gpus" in w.failure


def test_a_volume_attached_to_another_node_is_reported_from_its_event_as_multi_attach() -> None:
    creating = {
        "metadata": {"name": "chat-big-l10-a", "labels": {**OURS, "helios.dev/worker": "chat-big-l10"}},
        "status": {
            "conditions": [{"type": "PodScheduled", "status": "True", "lastTransitionTime": "2026-12-01T09:00:01Z"}],
            "containerStatuses": [{"name": "worker", "state": {"waiting": {"reason": "ContainerCreating"}}}],
        },
    }
    multi = 'Multi-Attach error for volume "pvc-1" Volume is already used by pod(s) chat-small-l4-b on another node'
    events = [
        {
            "involvedObject": {"name": "chat-big-l10-a"},
            "message": "an older attach error",
            "lastTimestamp": "2026-12-01T09:00:02Z",
        },
        {"involvedObject": {"name": "chat-big-l10-a"}, "message": multi, "lastTimestamp": "2026-12-01T09:00:09Z"},
        {"involvedObject": {"name": "someone-elses-pod"}, "message": multi, "lastTimestamp": "2026-12-01T09:00:09Z"},
    ]
    api = cluster([worker_deployment("chat-big-l10")], [creating], events)
    (w,) = KubernetesPlatform(api).observe_now(OWNER).workers  # type: ignore[arg-type]
    assert (w.failure_reason, w.failure) == ("VolumeMultiAttach", f"pod chat-big-l10-a: {multi}")
    assert any("fieldSelector=reason%3DFailedAttachVolume" in path for _, path, _ in api.calls)


def test_events_are_not_read_while_no_pod_waits_for_its_volumes() -> None:
    api = cluster([worker_deployment("chat-big-l10")], [pod("chat-big-l10-a", None)], [])
    KubernetesPlatform(api).observe_now(OWNER)  # type: ignore[arg-type]
    assert not any("/events" in path for _, path, _ in api.calls)


def test_an_owned_object_that_drifted_is_patched_back_and_a_defaulted_one_is_left_alone() -> None:
    wanted = manifests.disruption_budget(HD, NS)
    path = f"/apis/policy/v1/namespaces/{NS}/poddisruptionbudgets/{wanted['metadata']['name']}"
    defaulted = copy.deepcopy(wanted)
    defaulted["spec"]["selector"]["matchExpressions"] = []  # what an API server may add
    defaulted["status"] = {"expectedPods": 2}
    api = RecordingApi({path: defaulted})
    platform = KubernetesPlatform(api)  # type: ignore[arg-type]
    platform.ensure_disruption_budget(OWNER, copy.deepcopy(wanted))
    assert [m for m, *_ in api.calls] == ["GET"]
    drifted = copy.deepcopy(wanted)
    drifted["spec"]["maxUnavailable"] = 3
    api.objects[path] = drifted
    platform.ensure_disruption_budget(OWNER, copy.deepcopy(wanted))
    assert api.calls[-1] == (
        "PATCH",
        path,
        {"metadata": {"labels": wanted["metadata"]["labels"]}, "spec": wanted["spec"]},
    )


def test_an_object_of_the_same_name_that_is_not_ours_is_left_alone() -> None:
    wanted = manifests.disruption_budget(HD, NS)
    path = f"/apis/policy/v1/namespaces/{NS}/poddisruptionbudgets/{wanted['metadata']['name']}"
    theirs = {
        "metadata": {"name": wanted["metadata"]["name"], "labels": {"team": "other"}},
        "spec": {"minAvailable": 5},
    }
    api = RecordingApi({path: theirs})
    KubernetesPlatform(api).ensure_disruption_budget(OWNER, copy.deepcopy(wanted))  # type: ignore[arg-type]
    assert [m for m, *_ in api.calls] == ["GET"]


def test_the_workers_service_monitor_carries_the_labels_prometheus_selects_and_ours_win() -> None:
    monitor = manifests.service_monitor(HD, NS, extra_labels={"release": "kps", "helios.dev/deployment": "x"})
    assert monitor["metadata"]["labels"]["release"] == "kps"
    assert monitor["metadata"]["labels"]["helios.dev/deployment"] == HD
    hint = manifests.scrape_hint(HD, NS, {"release": "kps"})
    assert f"ServiceMonitor {NS}/{monitor['metadata']['name']}" in hint and "release=kps" in hint


def test_an_inference_pool_is_made_only_where_its_crd_is_and_follows_the_pool() -> None:
    spec = HeliosSpec.from_dict(
        {
            "candidates": [{"name": "a", "model": "/m"}],
            "inferencePool": {"endpointPicker": {"name": "epp", "port": 9002}},
        }
    )
    assert spec.inference_pool is not None
    path = f"/apis/inference.networking.k8s.io/v1/namespaces/{NS}/inferencepools"
    api = RecordingApi({})
    platform = KubernetesPlatform(api)  # type: ignore[arg-type]
    platform.execute(OWNER, spec, [EnsureInferencePool("chat-a-l4")])
    assert not [c for c in api.calls if c[0] == "POST"], "no CRD: nothing is made"
    api.objects[
        "/apis/apiextensions.k8s.io/v1/customresourcedefinitions/inferencepools.inference.networking.k8s.io"
    ] = {}
    platform._crd_seen.clear()  # as after CRD_ABSENT_RECHECK_S
    platform.execute(OWNER, spec, [EnsureInferencePool("chat-a-l4")])
    (post,) = [c for c in api.calls if c[0] == "POST"]
    assert post[1] == path
    assert post[2]["spec"]["selector"]["matchLabels"] == {"helios.dev/deployment": HD, "helios.dev/pool": "chat-a-l4"}
    api.objects[f"{path}/{HD}"] = post[2]
    platform.execute(OWNER, spec, [EnsureInferencePool("chat-b-l8")])  # a switch moved the Service
    patch = api.calls[-1]
    assert patch[0] == "PATCH" and patch[2]["spec"]["selector"]["matchLabels"]["helios.dev/pool"] == "chat-b-l8"


def test_a_bad_inference_pool_spec_is_a_spec_error() -> None:
    for bad in (
        {"endpointPicker": {"name": "epp"}},
        {"endpointPicker": {"name": "epp", "port": 1, "failureMode": "x"}},
    ):
        with pytest.raises(SpecError, match=r"spec\.inferencePool"):
            HeliosSpec.from_dict({"candidates": [{"name": "a", "model": "/m"}], "inferencePool": bad})
