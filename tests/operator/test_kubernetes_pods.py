"""What the Kubernetes adapter reads from pods and nodes: a pod waiting for a node is a wait (with the
scheduler's words), not a failure; placement time starts the load clock; the nodes' GPU supply."""

from __future__ import annotations

from typing import Any

from helios_operator.adapters.kubernetes import PodStates, gpu_supply, observed_worker, pod_failure, pod_scheduled_at

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
