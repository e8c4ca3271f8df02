"""The pure step, driven through the whole life cycle against a simulated platform."""

from __future__ import annotations

import copy
from dataclasses import dataclass, field, replace

from hypothesis import given, settings
from hypothesis import strategies as st

from helios_operator.core import reconcile
from helios_operator.core.types import (
    MAX_DECISIONS,
    Action,
    CandidateProfile,
    DeleteWorker,
    EmitEvent,
    EnsureWorker,
    HeliosSpec,
    Observed,
    ObservedWorker,
    PointService,
    Status,
    StepInput,
    StepResult,
    TelemetryReason,
    TelemetrySnapshot,
    WorkerTelemetry,
)

from .profiles import GB, profile

HD = "chat"
T0 = 1_700_000_000.0

SPEC = HeliosSpec.from_dict(
    {
        "objective": "throughput",
        "accuracyFloor": 0.95,
        "candidates": [
            {"name": "small", "model": "/models/small", "layers": 8},
            {"name": "big", "model": "pvc://models/big"},
        ],
        "profiling": {"requestsPerCandidate": 5, "timeoutSeconds": 300},
        "reassessment": {"everyRequests": 150},
        "rollout": {"readyTimeoutSeconds": 120},
        "replicas": 2,
    }
)
PROFILES = {
    "small": profile("small", layers=8),
    "big": profile("big", layers=16, fixed=1 * GB, layer=0.1 * GB, tokens_per_second=400),
}


@dataclass
class Platform:
    """Plays Kubernetes and Prometheus: applies actions, makes pods Ready, serves requests."""

    spec: HeliosSpec = SPEC
    status: Status = field(default_factory=Status)
    workers: dict[str, ObservedWorker] = field(default_factory=dict)
    service_pool: str | None = None
    now: float = T0
    served: dict[str, float] = field(default_factory=dict)
    breaches: dict[str, float] = field(default_factory=dict)  # worker -> ratio in a full window
    profiles: dict[str, CandidateProfile] = field(default_factory=lambda: dict(PROFILES))
    broken: set[str] = field(default_factory=set)  # workers whose pods never get Ready
    failures: dict[str, str] = field(default_factory=dict)  # worker -> what its pods say (ObservedWorker.failure)
    telemetry_reason: TelemetryReason = "Ok"
    history: list[Action] = field(default_factory=list)

    def observed(self) -> Observed:
        workers = tuple(replace(w, failure=self.failures.get(w.name)) for w in self.workers.values())
        return Observed(workers, self.service_pool)

    def telemetry(self) -> TelemetrySnapshot:
        if self.telemetry_reason != "Ok":
            return TelemetrySnapshot(self.telemetry_reason, "prometheus said no")
        out = []
        for w in self.workers.values():
            n = self.served.get(w.name, 0.0)
            prof = None
            if w.role == "profile":
                base = self.profiles[w.candidate]
                prof = replace(base, profiled_requests=int(n), profiled_tokens=int(n) * 100)
            ratio = self.breaches.get(w.name, 0.0)
            window = 100.0 if n * 100 >= 100 else n * 100
            layers = self.profiles[w.candidate].model_layers
            out.append(WorkerTelemetry(w.name, w.candidate, w.depth, layers, n, n * 100, ratio, window, prof))
        return TelemetrySnapshot("Ok", "", tuple(out))

    def input(self) -> StepInput:
        return StepInput(HD, 1, self.spec, self.status, self.observed(), self.telemetry(), self.now)

    def apply(self, actions: tuple[Action, ...]) -> None:
        for a in actions:
            self.history.append(a)
            if isinstance(a, EnsureWorker):
                old = self.workers.get(a.name)
                ready = min(old.ready_replicas, a.replicas) if old else 0
                self.workers[a.name] = ObservedWorker(
                    a.name,
                    a.candidate,
                    a.depth,
                    a.role,
                    a.pool,
                    a.replicas,
                    ready,
                    old.created_at if old else self.now,
                    template=a.template,
                )
            elif isinstance(a, DeleteWorker):
                self.workers.pop(a.name)
                self.served.pop(a.name, None)
            elif isinstance(a, PointService):
                assert any(w.pool == a.pool and w.ready_replicas > 0 for w in self.workers.values()), a
                self.service_pool = a.pool
        self.assert_service_invariant()

    def assert_service_invariant(self) -> None:
        """Once the Service selects a Ready pool, no action leaves it without a Ready worker
        (pods here only ever become Ready, and replicas never go to 0)."""
        if self.service_pool is None:
            return
        ready = [w for w in self.workers.values() if w.pool == self.service_pool and w.ready_replicas > 0]
        assert ready, f"Service {self.service_pool} lost every Ready worker"

    def kubelet(self) -> None:
        for name, w in self.workers.items():
            if name not in self.broken:
                self.workers[name] = replace(w, ready_replicas=w.replicas)

    def serve(self, requests: int) -> None:
        """Live traffic reaches the workers the Service selects, spread evenly."""
        pool = [w.name for w in self.workers.values() if w.pool == self.service_pool and w.ready_replicas > 0]
        for name in pool:
            self.served[name] = self.served.get(name, 0.0) + requests / len(pool)

    def step(self) -> StepResult:
        result = reconcile.step(self.input())
        assert reconcile.step(self.input()) == result  # pure: the same input, the same answer
        self.apply(result.actions)
        self.status = result.status
        return result

    def settle(self, steps: int = 12) -> None:
        """Step, make pods Ready, advance time, until nothing is left to do."""
        quiet = 0
        for _ in range(steps):
            phase = self.status.phase
            result = self.step()
            self.kubelet()
            self.now += 5
            idle = not [a for a in result.actions if not isinstance(a, EmitEvent)] and phase == self.status.phase
            quiet = quiet + 1 if idle else 0
            if quiet == 2:  # twice: the first quiet step may have been waiting for pods to get Ready
                return
        raise AssertionError(f"did not settle: {self.status.phase}")

    def events(self, reason: str) -> list[EmitEvent]:
        return [a for a in self.history if isinstance(a, EmitEvent) and a.reason == reason]


def condition(status: Status, type_: str) -> str:
    c = status.condition(type_)
    assert c is not None
    return c.status


def profiled(p: Platform) -> None:
    """Pending -> Profiling, with the profiling pool Ready and every candidate profiled."""
    p.settle()
    assert p.status.phase == "Profiling"
    p.serve(10)  # 5 per candidate: requestsPerCandidate reached


# ---------------------------------------------------------------------------------------------
# The life cycle


def test_pending_starts_profiling_every_candidate_at_full_depth() -> None:
    p = Platform()
    result = p.step()
    ensures = [a for a in result.actions if isinstance(a, EnsureWorker)]
    assert {(e.name, e.candidate, e.depth, e.role, e.pool) for e in ensures} == {
        ("chat-p1-small", "small", 8, "profile", "chat-p1"),
        ("chat-p1-big", "big", 0, "profile", "chat-p1"),
    }
    assert not [a for a in result.actions if isinstance(a, PointService)]  # nothing Ready yet
    assert result.status.phase == "Profiling"
    assert condition(result.status, "Profiling") == "True"
    assert result.requeue_after == reconcile.BUSY_REQUEUE
    p.kubelet()
    assert PointService("chat-p1") in p.step().actions  # live traffic reaches the profiling workers


def test_full_life_cycle_profiling_serving_breach_reassessment() -> None:
    p = Platform()
    profiled(p)
    p.settle()
    # Profiling chose small at 5/8 layers, rolled it out and drained the profiling pool.
    assert p.status.phase == "Serving"
    assert p.status.active is not None
    assert (p.status.active.candidate, p.status.active.depth, p.status.active.worker) == ("small", 5, "chat-small-l5")
    assert set(p.workers) == {"chat-small-l5"}
    assert p.service_pool == "chat-small-l5"
    assert p.workers["chat-small-l5"].replicas == 2
    assert p.status.decisions[-1].trigger == "profiling" and p.status.decisions[-1].applied
    assert "5/8 layers" in p.status.decisions[-1].reason
    assert p.status.selector == "helios.dev/deployment=chat,helios.dev/pool=chat-small-l5"
    assert (p.status.replicas, p.status.ready_replicas) == (2, 2)
    assert condition(p.status, "Ready") == "True" and condition(p.status, "Degraded") == "False"
    assert p.step().requeue_after == reconcile.IDLE_REQUEUE

    # Traffic gets harder; a breach storm (60 of 100 tokens) -> more layers of small.
    p.profiles["small"] = profile("small", layers=8, depth_agreement=(0.5, 0.6, 0.7, 0.8, 0.94, 0.945, 0.98, 1.0))
    p.serve(20)
    p.breaches["chat-small-l5"] = 0.6
    p.settle()
    assert p.status.decisions[-1].trigger == "breach"
    assert p.status.active is not None and (p.status.active.candidate, p.status.active.depth) == ("small", 7)
    assert set(p.workers) == {"chat-small-l7"}

    # 150 requests later: reassessment beside the active worker, which keeps its place.
    p.serve(149)
    p.settle()
    assert p.status.phase == "Serving"
    p.serve(1)
    p.settle()
    assert p.status.phase == "Reassessing"
    assert {w.pool for w in p.workers.values()} == {"chat-small-l7"}  # they share live traffic
    assert {w.role for w in p.workers.values()} == {"serve", "profile"}
    p.serve(15)
    p.settle()
    assert p.status.phase == "Serving"
    assert p.status.decisions[-1].trigger == "reassessment"
    assert set(p.workers) == {"chat-small-l7"}  # reassessment workers deleted
    assert p.status.requests_at_assessment == p.served["chat-small-l7"]


def test_reassessment_switches_when_another_candidate_is_clearly_better() -> None:
    p = Platform()
    profiled(p)
    p.settle()
    p.profiles["big"] = replace(PROFILES["big"], tokens_per_second=20000.0)  # traffic changed
    p.serve(150)
    p.settle()
    p.serve(20)
    p.settle()
    assert p.status.active is not None and p.status.active.candidate == "big"
    assert p.status.decisions[-1].trigger == "reassessment"
    assert list(p.workers) == [p.status.active.worker]


def test_breach_at_full_depth_records_no_deeper_option_once_and_does_not_roll() -> None:
    spec = replace(SPEC, candidates=SPEC.candidates[:1], accuracy_floor=1.0)
    p = Platform(spec=spec)
    p.serve(0)
    p.settle()
    p.serve(5)
    p.settle()
    assert p.status.active is not None and p.status.active.depth == 8
    p.serve(5)
    p.breaches[p.status.active.worker] = 0.9
    p.settle()
    p.settle()
    last = p.status.decisions[-1]
    assert (last.trigger, last.applied) == ("breach", False) and "no deeper option" in last.reason
    assert sum(1 for d in p.status.decisions if d.trigger == "breach") == 1
    assert p.status.phase == "Serving"


def test_advisory_mode_profiles_decides_and_then_touches_nothing() -> None:
    p = Platform(spec=replace(SPEC, mode="advisory"))
    profiled(p)
    p.settle()
    assert p.status.decisions[-1].trigger == "profiling" and not p.status.decisions[-1].applied
    assert p.events("Advised")
    before = len(p.history)
    for _ in range(3):
        p.serve(200)
        p.settle()
    later = [a for a in p.history[before:] if not isinstance(a, EmitEvent)]
    assert later == []  # no serve workers, no switches, no deletions, the Service stays
    assert p.service_pool == "chat-p1"
    assert all(not d.applied for d in p.status.decisions)
    assert p.status.decisions[-1].trigger == "reassessment"


def test_missing_telemetry_sets_metrics_available_false_and_takes_no_decision() -> None:
    p = Platform()
    p.settle()
    p.serve(10)
    p.telemetry_reason = "Stale"
    p.settle()
    assert p.status.phase == "Profiling" and not p.status.decisions
    c = p.status.condition("MetricsAvailable")
    assert c is not None and (c.status, c.reason) == ("False", "MetricsStale")
    p.telemetry_reason = "Ok"
    p.settle()
    assert p.status.phase == "Serving"
    p.breaches[p.status.active.worker if p.status.active else ""] = 0.9
    p.serve(20)
    p.telemetry_reason = "PrometheusError"
    p.settle()
    assert p.status.decisions[-1].trigger == "profiling"  # the storm is invisible: no roll


def test_a_switch_in_progress_completes_without_telemetry() -> None:
    p = Platform()
    profiled(p)
    p.step()
    assert p.status.phase == "Switching"
    p.telemetry_reason = "Missing"
    p.settle()
    assert p.status.phase == "Serving" and p.status.active is not None


def test_a_target_not_ready_in_time_is_rolled_back_and_the_profiling_pool_keeps_serving() -> None:
    p = Platform(broken={"chat-small-l5"})
    profiled(p)
    p.settle()
    assert p.status.phase == "Switching"
    p.now += 121
    p.settle()
    assert "chat-small-l5" not in p.workers
    assert p.status.phase == "Serving" and p.status.active is None
    assert p.status.decisions[-1].trigger == "rollback"
    assert p.events("RolledBack")[0].type == "Warning"
    assert p.service_pool == "chat-p1"
    c = p.status.condition("Degraded")
    assert c is not None and (c.status, c.reason) == ("True", "RolloutFailed")


def test_a_breach_target_not_ready_is_rolled_back_and_the_active_worker_stays() -> None:
    p = Platform(broken={"chat-small-l7"})
    profiled(p)
    p.settle()
    p.serve(20)
    p.breaches["chat-small-l5"] = 0.6
    p.settle()
    p.now += 121
    p.settle()
    assert p.status.active is not None and p.status.active.worker == "chat-small-l5"
    assert set(p.workers) == {"chat-small-l5"} and p.service_pool == "chat-small-l5"
    assert p.status.decisions[-1].trigger == "rollback"


def test_a_worker_that_cannot_start_is_degraded_worker_failed_and_rolled_back_serving_untouched() -> None:
    """A schema-valid spec that cannot work (here: a depth the model lacks) ends in a condition with
    the worker's own error line; the serving worker is never touched, the switch rolls back."""
    error = "helios worker: error: --layers 6 exceeds the model's 4 layers"
    p = Platform(broken={"chat-small-l7"})
    p.failures["chat-small-l7"] = f"pod chat-small-l7-abc: container worker exited with code 2: {error}"
    profiled(p)
    p.settle()
    p.serve(20)
    serving = p.workers["chat-small-l5"]
    p.breaches["chat-small-l5"] = 0.6
    for _ in range(4):  # several reconciles while the target crash-loops
        p.step()
        p.now += 5
    assert p.status.phase == "Switching"
    c = p.status.condition("Degraded")
    assert c is not None and (c.status, c.reason) == ("True", "WorkerFailed")
    assert "worker chat-small-l7 (small at 7 layers)" in c.message and error in c.message
    assert [e.type for e in p.events("WorkerFailed")] == ["Warning"]  # once, not at every reconcile
    assert p.service_pool == "chat-small-l5" and p.workers["chat-small-l5"] == serving
    p.now += 121
    p.settle()
    assert p.status.decisions[-1].trigger == "rollback" and error in p.status.decisions[-1].reason
    assert set(p.workers) == {"chat-small-l5"} and p.service_pool == "chat-small-l5"
    assert not [a for a in p.history if isinstance(a, DeleteWorker) and a.name == "chat-small-l5"]
    c = p.status.condition("Degraded")
    assert c is not None and c.status == "False"  # the failed worker is gone; what serves is healthy


def test_profiling_drops_a_silent_candidate_at_the_timeout() -> None:
    p = Platform(broken={"chat-p1-big"})
    p.settle()
    p.serve(5)  # only small is Ready, so only small profiles
    p.settle()
    assert p.status.phase == "Profiling"
    p.now += 300
    p.settle()
    assert [x.candidate for x in p.status.profiles] == ["small"]
    assert p.events("CandidateDropped")[0].type == "Warning"
    assert p.status.active is not None and p.status.active.candidate == "small"


def test_all_candidates_silent_is_degraded() -> None:
    p = Platform()
    p.settle()
    p.now += 301
    p.settle()
    c = p.status.condition("Degraded")
    assert c is not None and (c.status, c.reason) == ("True", "ProfilingTimedOut")
    assert p.status.phase == "Profiling"


def test_scaling_changes_only_the_active_workers_replicas() -> None:
    p = Platform()
    profiled(p)
    p.settle()
    p.spec = replace(SPEC, replicas=4)
    result = p.step()
    assert [a for a in result.actions if not isinstance(a, EmitEvent)] == [
        EnsureWorker(
            "chat-small-l5",
            "small",
            "/models/small",
            5,
            "serve",
            "chat-small-l5",
            4,
            p.workers["chat-small-l5"].template,
        )
    ]  # the same template: a scale, not a roll
    c = result.status.condition("Degraded")
    assert c is not None and c.reason == "ReplicasUnavailable"


def test_removing_the_active_candidate_reprofiles_and_moves_off_it() -> None:
    p = Platform()
    profiled(p)
    p.settle()
    p.spec = replace(SPEC, candidates=SPEC.candidates[1:])
    p.settle()
    assert p.status.phase == "Reassessing"
    p.serve(20)
    p.settle()
    assert p.status.active is not None and p.status.active.candidate == "big"
    assert p.status.decisions[-1].trigger == "spec"


def test_restart_resumes_from_status_alone() -> None:
    p = Platform()
    profiled(p)
    p.step()
    assert p.status.phase == "Switching"
    p.status = Status.from_dict(p.status.to_dict())  # what a restarted operator reads back
    p.settle()
    assert p.status.phase == "Serving" and p.status.active is not None


def test_conditions_keep_their_transition_time_until_they_flip() -> None:
    p = Platform()
    p.step()
    first = p.status.condition("Profiling")
    p.now += 50
    p.step()
    again = p.status.condition("Profiling")
    assert first is not None and again is not None
    assert again.last_transition_time == first.last_transition_time
    p.kubelet()
    p.step()  # the Service now selects the Ready profiling pool
    p.serve(10)
    p.settle()
    flipped = p.status.condition("Profiling")
    assert flipped is not None and flipped.status == "False"
    assert flipped.last_transition_time != first.last_transition_time


# ---------------------------------------------------------------------------------------------
# Properties over random life cycles


moves = st.lists(
    st.tuples(
        st.sampled_from(("serve", "serve", "serve", "time", "breach", "telemetry", "restart", "scale", "wait")),
        st.integers(0, 200),
        st.booleans(),  # do the pods get Ready after this step?
    ),
    max_size=30,
)


@settings(max_examples=60, deadline=None)
@given(moves=moves, advisory=st.booleans(), broken=st.booleans())
def test_random_life_cycles_keep_the_invariants(
    moves: list[tuple[str, int, bool]], advisory: bool, broken: bool
) -> None:
    p = Platform(spec=replace(SPEC, mode="advisory" if advisory else "active"))
    if broken:
        p.broken = {"chat-small-l5"}
    for move, n, pods_ready in moves:
        if move == "serve":
            p.serve(n)
        elif move == "time":
            p.now += n
        elif move == "breach" and p.status.active is not None:
            p.breaches[p.status.active.worker] = n / 200
        elif move == "telemetry":
            p.telemetry_reason = ("Ok", "Ok", "Missing", "Stale", "PrometheusError")[n % 5]
        elif move == "restart":
            p.status = Status.from_dict(p.status.to_dict())
        elif move == "scale":
            p.spec = replace(p.spec, replicas=1 + n % 3)
        decisions = len(p.status.decisions)
        available = p.telemetry().available
        result = p.step()  # asserts purity and the Service invariant
        new = result.status.decisions[decisions:]
        if not available:
            assert all(d.trigger in ("rollback", "spec") for d in new)
        if advisory:
            assert not [a for a in p.history if isinstance(a, EnsureWorker) and a.role == "serve"]
            assert not [a for a in p.history if isinstance(a, DeleteWorker)]
            assert all(not d.applied for d in result.status.decisions)
        assert len(result.status.decisions) <= MAX_DECISIONS
        assert result.status.observed_generation == 1
        # Converge: with nothing changing outside, the step runs out of things to do.
        probe = copy.deepcopy(p)
        for _ in range(8):
            r = probe.step()
            if not [a for a in r.actions if not isinstance(a, EmitEvent)]:
                break
        else:
            raise AssertionError(f"no convergence in {probe.status.phase}")
        if pods_ready:
            p.kubelet()
        p.now += 5
