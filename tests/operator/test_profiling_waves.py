"""GPU-aware profiling in the pure step: candidates profiled in waves bounded by a GPU budget, pods
that wait for a node as a wait of their own, and every phase ending.

`GpuPlatform` plays the scheduler's extended-resource accounting for `nvidia.com/gpu`: pods are
placed in creation order while GPUs are free, the rest wait with the scheduler's message, and only
placed pods get Ready. The real scheduler does the same on the cluster suite's test nodes.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace

from helios_operator.core.types import DeleteWorker, EnsureWorker, HeliosSpec, Observed

from .test_reconcile import PROFILES, Platform, profile

UNSCHEDULABLE = "0/1 nodes are available: 1 Insufficient nvidia.com/gpu."

THREE = HeliosSpec.from_dict(
    {
        "objective": "throughput",
        "accuracyFloor": 0.95,
        "candidates": [
            {"name": "small", "model": "/models/small", "layers": 8},
            {"name": "big", "model": "/models/big"},
            {"name": "mid", "model": "/models/mid"},
        ],
        "profiling": {"requestsPerCandidate": 5, "timeoutSeconds": 300},
        "rollout": {"readyTimeoutSeconds": 120, "scheduleTimeoutSeconds": 900},
        "replicas": 2,
        "worker": {"resources": {"limits": {"nvidia.com/gpu": 1}}},
    }
)


@dataclass
class GpuPlatform(Platform):
    spec: HeliosSpec = THREE
    gpus: int = 2
    report_supply: bool = True  # the operator read the nodes' allocatable GPUs
    gaps: int = 0  # steps after which the Service selected no Ready worker
    most_profile_workers: int = 0
    placed_at: dict[str, float] = field(default_factory=dict)  # when each worker's pods all got a node
    profiles: dict[str, object] = field(
        default_factory=lambda: {**PROFILES, "mid": profile("mid", layers=12, tokens_per_second=500)}
    )

    def placed(self) -> dict[str, int]:
        """Pods per worker that hold a GPU: the scheduler places them in creation order."""
        free, out = self.gpus, {}
        for w in sorted(self.workers.values(), key=lambda w: (w.created_at, w.name)):
            out[w.name] = min(w.replicas, free)
            free -= out[w.name]
        return out

    def observed(self) -> Observed:
        placed = self.placed()
        for name, w in self.workers.items():
            if placed[name] == w.replicas:
                self.placed_at.setdefault(name, self.now)  # PodScheduled's lastTransitionTime
        workers = tuple(
            replace(
                w,
                unschedulable=UNSCHEDULABLE if placed[w.name] < w.replicas else None,
                scheduled_at=self.placed_at.get(w.name) if placed[w.name] == w.replicas else None,
            )
            for w in self.workers.values()
        )
        return Observed(workers, self.service_pool, self.gpus if self.report_supply else None)

    def kubelet(self) -> None:
        placed = self.placed()
        for name, w in self.workers.items():
            self.workers[name] = replace(w, ready_replicas=placed[name])

    def assert_service_invariant(self) -> None:
        self.most_profile_workers = max(
            self.most_profile_workers, sum(w.role == "profile" for w in self.workers.values())
        )
        if self.service_pool is not None and not any(
            w.pool == self.service_pool and w.ready_replicas > 0 for w in self.workers.values()
        ):
            self.gaps += 1

    def run(self, rounds: int = 12, requests: int = 10) -> None:
        """Live traffic and the control loop, until nothing is left to do."""
        for _ in range(rounds):
            self.settle(40)
            self.serve(requests)
        self.settle(40)


def test_three_candidates_and_two_replicas_on_two_gpus_profile_and_switch_without_deadlock() -> None:
    p = GpuPlatform()
    p.run()
    assert p.status.phase == "Serving" and p.status.active is not None
    assert {x.candidate for x in p.status.profiles} == {"small", "big", "mid"}
    assert not [d for d in p.status.decisions if d.trigger == "rollback"]
    assert p.most_profile_workers <= 2  # never more profile workers than GPUs
    assert p.gaps == 0  # traffic moved to the target's first Ready pod before the round let go
    active = p.workers[p.status.active.worker]
    assert (active.replicas, active.ready_replicas) == (2, 2)
    assert set(p.workers) == {p.status.active.worker}


def test_max_concurrent_workers_one_profiles_serially_as_the_paper_does() -> None:
    serial = replace(THREE, profiling=replace(THREE.profiling, max_concurrent_workers=1))
    p = GpuPlatform(spec=serial, gpus=8)
    p.run()
    assert p.most_profile_workers == 1
    assert [e.candidate for e in p.history if isinstance(e, EnsureWorker) and e.role == "profile"][:3] == [
        "small",
        "big",
        "mid",
    ]
    assert {x.candidate for x in p.status.profiles} == {"small", "big", "mid"}
    assert p.status.phase == "Serving"
    c = p.status.condition("Profiling")
    assert c is not None and c.status == "False"


def test_a_waiting_candidate_says_it_waits_for_a_slot() -> None:
    serial = replace(THREE, profiling=replace(THREE.profiling, max_concurrent_workers=1))
    p = GpuPlatform(spec=serial, gpus=8)
    p.settle()
    c = p.status.condition("Profiling")
    assert c is not None and "(1 at a time)" in c.message and "mid waits for a profiling slot" in c.message


def test_a_target_waiting_for_a_node_is_not_rolled_back_and_completes_when_a_node_is_added() -> None:
    p = GpuPlatform(gpus=3)
    p.run()
    assert p.status.active is not None
    first = p.status.active.worker
    # Traffic changed: big is now clearly better, but its two pods need GPUs that are not there.
    p.profiles["big"] = replace(PROFILES["big"], tokens_per_second=20000.0)
    p.serve(150)
    p.run(rounds=6)
    assert p.status.phase == "Switching" and p.status.target is not None
    assert p.workers[first].ready_replicas == 2  # the active worker keeps serving meanwhile
    p.now += 300  # beyond readyTimeoutSeconds (120), within scheduleTimeoutSeconds (900)
    p.settle(40)
    assert p.status.phase == "Switching"
    c = p.status.condition("CapacityAvailable")
    assert c is not None and (c.status, c.reason) == ("False", "Unschedulable") and "waits for a node" in c.message
    assert not [d for d in p.status.decisions if d.trigger == "rollback"]
    p.gpus = 5  # the cluster autoscaler added a node
    p.settle(40)
    assert p.status.phase == "Serving" and p.status.active is not None
    assert p.status.active.candidate == "big"
    assert p.gaps == 0
    c = p.status.condition("CapacityAvailable")
    assert c is not None and c.status == "True"


def test_a_target_with_no_node_rolls_back_after_the_schedule_timeout() -> None:
    p = GpuPlatform(gpus=3)
    p.run()
    p.profiles["big"] = replace(PROFILES["big"], tokens_per_second=20000.0)
    p.serve(150)
    p.run(rounds=6)
    assert p.status.phase == "Switching"
    p.now += 901
    p.settle(40)
    last = p.status.decisions[-1]
    assert last.trigger == "rollback" and "found no node within 900s" in last.reason
    assert p.status.phase == "Serving" and p.status.active is not None


def test_a_reassessment_whose_candidates_never_schedule_ends() -> None:
    p = GpuPlatform(gpus=2)  # the active worker's two replicas take both GPUs
    p.run()
    assert p.status.active is not None
    active = p.status.active.worker
    p.gpus = 2
    p.serve(150)
    p.settle(40)
    assert p.status.phase == "Reassessing"
    p.now += 901
    p.settle(40)
    assert p.status.phase == "Serving" and p.status.active is not None and p.status.active.worker == active
    assert len(p.events("CandidateDropped")) >= 1
    assert "no node could take its pod" in p.events("CandidateDropped")[0].message


def test_no_traffic_ends_the_round_with_a_condition_and_profiles_again() -> None:
    p = GpuPlatform()
    p.settle(40)
    p.now += 301
    p.settle(40)
    p.now += 301
    p.settle(40)
    assert p.status.profiling_round >= 2 and p.status.phase == "Profiling"
    c = p.status.condition("Degraded")
    assert c is not None and (c.status, c.reason) == ("True", "ProfilingTimedOut")
    assert p.events("ProfilingTimedOut")
    assert not [a for a in p.history if isinstance(a, DeleteWorker) and a.name.startswith("chat-small")]


def test_without_a_gpu_supply_every_candidate_is_profiled_at_once() -> None:
    p = GpuPlatform(gpus=8, report_supply=False)
    p.settle()
    assert sum(w.role == "profile" for w in p.workers.values()) == 3


def test_replicas_the_nodes_gpus_cannot_hold_are_said_in_a_condition() -> None:
    """Before any pod waits (profiling holds fewer GPUs than serving will), the condition says that
    spec.replicas will not fit, and how many do."""
    p = GpuPlatform(spec=replace(THREE, replicas=4), gpus=3)
    p.settle()
    assert not [w for w in p.observed().workers if w.unschedulable]
    c = p.status.condition("CapacityAvailable")
    assert c is not None and (c.status, c.reason) == ("False", "ReplicasExceedGpus")
    assert "= 4, but the schedulable nodes have 3: 3 replica(s) fit" in c.message
    p.gpus = 8  # a node was added
    p.settle()
    c = p.status.condition("CapacityAvailable")
    assert c is not None and (c.status, c.reason) == ("True", "AllPlaced")


IDLE = replace(THREE, profiling=replace(THREE.profiling, idle_seconds=120))


def test_with_no_traffic_the_profile_workers_but_one_go_to_zero_and_the_round_still_ends() -> None:
    p = GpuPlatform(spec=IDLE, gpus=8)
    p.settle()
    assert {w.replicas for w in p.workers.values()} == {1}
    p.now += 121
    p.settle()
    replicas = sorted(w.replicas for w in p.workers.values())
    assert replicas == [0, 0, 1], "one keeps serving the stable Service; the others free their GPUs"
    c = p.status.condition("Profiling")
    assert c is not None and "no request for 120s" in c.message and "at zero replicas until traffic comes" in c.message
    p.now += IDLE.profiling.timeout_seconds  # the round's timeout runs on: every phase ends
    p.settle(40)
    assert p.status.profiling_round == 2 and p.events("ProfilingTimedOut")
    c = p.status.condition("Degraded")
    assert c is not None and c.reason == "ProfilingTimedOut"


def test_traffic_wakes_the_idle_profile_workers_and_the_round_completes() -> None:
    p = GpuPlatform(spec=IDLE, gpus=8)
    p.settle()
    p.now += 121
    p.settle()
    p.serve(1)  # reaches the one that kept serving
    p.settle()
    assert {w.replicas for w in p.workers.values() if w.role == "profile"} == {1}
    assert p.events("ProfilingResumed")
    p.run()
    assert p.status.phase == "Serving" and {x.candidate for x in p.status.profiles} == {"small", "big", "mid"}


def test_while_reassessing_with_no_traffic_every_profile_worker_goes_to_zero_beside_the_active() -> None:
    p = GpuPlatform(spec=IDLE, gpus=8)
    p.run()
    assert p.status.phase == "Serving" and p.status.active is not None
    p.serve(IDLE.reassessment.every_requests + 1)
    p.settle()
    assert p.status.phase == "Reassessing"
    p.now += 121
    p.settle()
    profile = [w.replicas for w in p.workers.values() if w.role == "profile"]
    assert profile and set(profile) == {0}
    assert p.workers[p.status.active.worker].replicas == IDLE.replicas  # the active worker keeps serving


def test_idle_seconds_zero_never_scales_profile_workers_down() -> None:
    p = GpuPlatform(spec=replace(THREE, profiling=replace(THREE.profiling, idle_seconds=0)), gpus=8)
    p.settle()
    p.now += 200
    p.settle()
    assert {w.replicas for w in p.workers.values()} == {1}


def test_profiled_one_at_a_time_an_idle_round_never_scales_down_the_worker_it_waits_for() -> None:
    """Serial profiling: the finished candidate serves while the next one loads. Idle then, the loading
    one must stay up (scaling it to zero beside a finished worker that is about to go would leave
    the round with nothing that can ever get Ready)."""
    serial = replace(IDLE, profiling=replace(IDLE.profiling, max_concurrent_workers=1, requests_per_candidate=2))
    p = GpuPlatform(spec=serial, gpus=8)
    p.settle()
    p.broken = {"chat-p1-big"}  # the next candidate takes long to load
    p.serve(2)  # the first candidate hears its quota
    p.settle()
    p.now += 121
    p.settle()
    assert p.workers["chat-p1-big"].replicas == 1
    p.broken = set()  # loaded
    p.run()
    assert p.status.phase == "Serving" and {x.candidate for x in p.status.profiles} >= {"small", "big"}
