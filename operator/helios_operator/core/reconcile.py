"""The pure reconcile step: (spec, status, observed objects, telemetry, now) -> (actions, status).

It reads nothing else, so an operator restart resumes from status and the observed objects, and the
same step drives the Kubernetes platform and the local one. The state machine is drawn in
docs/decisions.md. Actions are a diff against what is observed: applied, they converge to none.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from helios_operator.core import conditions as cond
from helios_operator.core import names, policy
from helios_operator.core.manifests import pool_selector
from helios_operator.core.types import (
    GPU_RESOURCE,
    MAX_DECISIONS,
    Action,
    CandidateProfile,
    Decision,
    DeleteWorker,
    EmitEvent,
    EnsureWorker,
    Observed,
    ObservedWorker,
    Phase,
    Placement,
    PointService,
    Status,
    StepInput,
    StepResult,
)
from helios_operator.core.worker_args import worker_template

BUSY_REQUEUE = 5.0  # profiling, reassessing, switching: something changes within seconds
IDLE_REQUEUE = 30.0  # serving: telemetry moves on Prometheus' scrape interval

Trigger = Literal["profiling", "breach", "reassessment", "rollback", "spec"]
WORKER_FAILED = "WorkerFailed"  # Degraded reason: a worker's pods cannot start


@dataclass
class _Draft:
    """The step's working state: the input, the status being built, the actions so far."""

    inp: StepInput
    status: Status
    actions: list[Action] = field(default_factory=list)
    degraded: tuple[str, str] | None = None  # (reason, message) found while stepping


def step(inp: StepInput) -> StepResult:
    """Advance the state machine by as many phases as the observations allow, then report."""
    d = _Draft(inp, inp.status.with_changes(observed_generation=inp.generation))
    for _ in range(6):  # a phase change runs the next phase's handler in the same step
        phase = d.status.phase
        _HANDLERS[phase](d)
        if d.status.phase == phase:
            break
    status = _report(d)
    _announce_worker_failure(d, status)
    busy = status.phase in ("Profiling", "Reassessing", "Switching", "Pending")
    return StepResult(_normalise(d.actions), status, BUSY_REQUEUE if busy else IDLE_REQUEUE)


# ---------------------------------------------------------------------------------------------
# Phases


def _pending(d: _Draft) -> None:
    """Start a profiling round: every candidate at full depth, serving live traffic."""
    r = d.status.profiling_round + 1
    names = ", ".join(c.name for c in d.inp.spec.candidates)
    _event(d, "ProfilingStarted", f"round {r}: profiling {names} at full depth on live traffic")
    d.status = d.status.with_changes(
        phase="Profiling",
        profiling_round=r,
        profiling_since=cond.timestamp(d.inp.now),
        target=None,
        round_profiles=(),
        round_dropped=(),
        round_heard=0.0,
        round_heard_at=cond.timestamp(d.inp.now),
    )


def _profiling(d: _Draft) -> None:
    """Profiling (no active worker: the round's pool serves) or Reassessing (beside the active)."""
    active = d.status.active
    if active is not None and d.status.phase == "Profiling":
        d.status = d.status.with_changes(phase="Reassessing")
    _listen(d)
    _advance_round(d)
    keep, release = _ensure_round(d)
    if active is None:
        _point(d, _round_pool(d))
    else:
        _ensure_active(d, active)
        keep.add(active.worker)
    _collect(d, keep, release)
    if _round_settled(d):
        _conclude_round(d)


def _switching(d: _Draft) -> None:
    """Ensure the target, wait Ready, point the Service, then drain the rest; roll back on timeout."""
    spec, obs, target, active = d.inp.spec, d.inp.observed, d.status.target, d.status.active
    if target is None or spec.candidate(target.candidate) is None:
        if target is not None:
            _event(d, "SwitchAborted", f"{target.candidate} left the spec; not switching to it", "Warning")
            _delete(d, target.worker)
        d.status = d.status.with_changes(phase="Serving" if active else "Pending", target=None)
        return
    desired = max(1, spec.replicas)
    _ensure(d, target.worker, target.candidate, target.depth, "serve", target.worker, desired)
    if obs.service_pool == target.worker:  # the Service moved: the switch is committed
        # Drain what it replaces; never ensure it again (a restart mid-drain would re-create it).
        _collect(d, {target.worker})
        since = cond.timestamp(d.inp.now)
        _event(d, "Switched", f"serving {target.candidate} at {target.depth} layers ({target.worker})")
        d.status = d.status.with_changes(
            phase="Serving",
            active=Placement(target.candidate, target.depth, target.worker, since),
            target=None,
            requests_at_assessment=0.0,
            switch_started="",
        )
        return
    keep = {target.worker}
    worker = obs.worker(target.worker)
    waiting = worker is not None and worker.unschedulable is not None
    release = False
    if active is not None:
        _ensure_active(d, active)
        keep.add(active.worker)
    elif waiting and worker is not None and worker.ready_replicas > 0:
        # The round's last worker holds a GPU the target's other pods need: move traffic to the
        # target's Ready pods first; the commit above then releases the round.
        keep |= _ensure_round(d)[0]
        _point(d, target.worker)
    elif waiting:
        release = True  # no target pod placed yet: let the round's GPUs go (a short gap, no deadlock)
    else:
        keep |= _ensure_round(d)[0]
    ready = worker is not None and worker.ready_replicas >= desired
    _collect(d, keep, release)
    if ready:
        _point(d, target.worker)
        return
    started = cond.parse_timestamp(d.status.switch_started) or d.inp.now
    timeout = spec.rollout.ready_timeout_seconds
    if worker is not None and waiting:
        started, timeout = worker.created_at, spec.rollout.schedule_timeout_seconds
    elif worker is not None:
        started = max(started, worker.started_at)
    if d.inp.now - started < timeout:
        return
    _delete(d, target.worker)
    serving = f"{active.candidate} at {active.depth} layers" if active else f"the profiling pool {_round_pool(d)}"
    why = f"{target.candidate} at {target.depth} layers was not Ready within {timeout}s"
    if waiting and worker is not None:
        why = f"{target.candidate} at {target.depth} layers found no node within {timeout}s ({worker.unschedulable})"
    elif worker is not None and worker.failure:
        why += f" ({worker.failure})"
    why += f": rolled back; {serving} keeps serving"
    _decide(d, "rollback", target.candidate, target.depth, why, applied=True)
    d.status = d.status.with_changes(phase="Serving", target=None, switch_started="")


def _serving(d: _Draft) -> None:
    active = d.status.active
    if active is None:
        _serving_from_round(d)
        return
    spec, tel = d.inp.spec, d.inp.telemetry
    if spec.candidate(active.candidate) is None:
        _event(d, "CandidateRemoved", f"{active.candidate} left the spec; re-profiling beside it", "Warning")
        _start_reassessment(d)
        return
    _ensure_active(d, active)
    _point(d, active.worker)
    _collect(d, {active.worker})
    worker = tel.worker(active.worker)
    if not tel.available or worker is None or spec.mode != "active" or not _whole(d, active.worker):
        return
    at = d.status.requests_at_assessment
    if worker.requests_ok < at:  # the worker's counters restarted
        at = 0.0
        d.status = d.status.with_changes(requests_at_assessment=at)
    last = d.status.decisions[-1] if d.status.decisions else None
    rolled_back = last is not None and last.trigger == "rollback"  # no retry storm: wait for reassessment
    if policy.breach_triggered(worker, spec.exit) and not rolled_back:
        _on_breach(d, active)
    elif policy.reassessment_due(worker.requests_ok, at, spec.reassessment.every_requests):
        _start_reassessment(d)


def _serving_from_round(d: _Draft) -> None:
    """No active worker (advisory mode, or the first switch rolled back): the round's pool serves."""
    spec, tel = d.inp.spec, d.inp.telemetry
    keep, release = _ensure_round(d)
    _point(d, _round_pool(d))
    _collect(d, keep, release)
    last = d.status.decisions[-1] if d.status.decisions else None
    if spec.mode == "active" and (last is None or last.trigger != "rollback"):
        # Mode turned active, or status was lost: act on the profiles at hand.
        choice = policy.choose(d.status.profiles, spec.objective, spec.accuracy_floor)
        if choice is not None:
            _decide(d, "spec", choice.candidate, choice.depth, choice.reason, applied=True)
            _start_switch(d, choice)
            return
    if not tel.available:
        return
    served = sum(w.requests_ok for name in keep if (w := tel.worker(name)) is not None)
    at = d.status.requests_at_assessment if served >= d.status.requests_at_assessment else 0.0
    if not policy.reassessment_due(served, at, spec.reassessment.every_requests):
        return
    profiles = tuple(p for name in sorted(keep) if (w := tel.worker(name)) is not None and (p := w.profile))
    d.status = d.status.with_changes(requests_at_assessment=served, profiles=profiles or d.status.profiles)
    choice = policy.choose(profiles, spec.objective, spec.accuracy_floor)
    if choice is None:
        return
    _decide(d, "reassessment", choice.candidate, choice.depth, choice.reason, applied=spec.mode == "active")
    if spec.mode == "active":
        _start_switch(d, choice)


_HANDLERS = {
    "Pending": _pending,
    "Failed": _pending,
    "Profiling": _profiling,
    "Reassessing": _profiling,
    "Switching": _switching,
    "Serving": _serving,
}


# ---------------------------------------------------------------------------------------------
# Transitions


def _start_reassessment(d: _Draft) -> None:
    r = d.status.profiling_round + 1
    _event(d, "ReassessmentStarted", f"round {r}: re-profiling every candidate beside the active worker")
    d.status = d.status.with_changes(
        phase="Reassessing",
        profiling_round=r,
        profiling_since=cond.timestamp(d.inp.now),
        round_profiles=(),
        round_dropped=(),
        round_heard=0.0,
        round_heard_at=cond.timestamp(d.inp.now),
    )


def _on_breach(d: _Draft, active: Placement) -> None:
    spec = d.inp.spec
    result = policy.adapt(d.status.profiles, active.candidate, active.depth, spec.objective, spec.accuracy_floor)
    if result.choice is not None:
        _decide(d, "breach", result.choice.candidate, result.choice.depth, result.reason, applied=True)
        _start_switch(d, result.choice)
        return
    last = d.status.decisions[-1] if d.status.decisions else None
    if last is None or (last.trigger, last.candidate, last.depth, last.applied) != (
        "breach",
        active.candidate,
        active.depth,
        False,
    ):  # record "no deeper option" once, not at every step of the storm
        _decide(d, "breach", active.candidate, active.depth, result.reason, applied=False)


def _conclude_round(d: _Draft) -> None:
    """Every candidate is profiled or dropped: decide on what was heard, and end the phase."""
    spec, active = d.inp.spec, d.status.active
    heard = {p.candidate: p for p in d.status.round_profiles}
    profiles = tuple(heard[c.name] for c in spec.candidates if c.name in heard)
    if not profiles:
        why = f"round {d.status.profiling_round}: no candidate could be profiled (see the CandidateDropped events)"
        _event(d, "ProfilingTimedOut", why, "Warning")
        if active is None and spec.mode != "active":  # advisory touches no worker: the same ones listen again
            d.status = d.status.with_changes(round_dropped=(), profiling_since=cond.timestamp(d.inp.now))
            return
        if active is None:  # nothing serves yet: profile again, a round at a time, until traffic comes
            _pending(d)
            return
        _decide(d, "reassessment", active.candidate, active.depth, f"{why}; keeping the active worker", True)
        for name in _round_names(d):
            _delete(d, name)
        worker = d.inp.telemetry.worker(active.worker)
        served = worker.requests_ok if worker else 0.0
        d.status = d.status.with_changes(phase="Serving", requests_at_assessment=served)
        return
    _conclude_profiling(d, profiles)


def _conclude_profiling(d: _Draft, profiles: tuple[CandidateProfile, ...]) -> None:
    spec, active = d.inp.spec, d.status.active
    d.status = d.status.with_changes(profiles=profiles)
    if active is None:
        choice = policy.choose(profiles, spec.objective, spec.accuracy_floor)
        if choice is None:
            return
        applied = spec.mode == "active"
        _decide(d, "profiling", choice.candidate, choice.depth, choice.reason, applied=applied)
        served = sum(w.requests_ok for w in d.inp.telemetry.workers if w.worker in _round_names(d))
        d.status = d.status.with_changes(requests_at_assessment=served)
        if applied:
            _start_switch(d, choice)
        else:
            d.status = d.status.with_changes(phase="Serving")
        return
    trigger: Trigger = "spec" if spec.candidate(active.candidate) is None else "reassessment"
    result = policy.reassess(profiles, active.candidate, active.depth, spec.objective, spec.accuracy_floor)
    for name in _round_names(d):
        _delete(d, name)
    worker = d.inp.telemetry.worker(active.worker)
    d.status = d.status.with_changes(requests_at_assessment=worker.requests_ok if worker else 0.0)
    if result.switch and result.choice is not None:
        _decide(d, trigger, result.choice.candidate, result.choice.depth, result.reason, applied=True)
        _start_switch(d, result.choice)
        return
    _decide(d, trigger, active.candidate, active.depth, result.reason, applied=True)
    d.status = d.status.with_changes(phase="Serving")


def _start_switch(d: _Draft, choice: policy.Choice) -> None:
    name = names.serve_worker(d.inp.name, choice.candidate, choice.depth)
    active = d.status.active
    if active is not None and active.worker == name:
        d.status = d.status.with_changes(phase="Serving", target=None)
        return
    _event(d, "SwitchStarted", f"starting {name}: {choice.candidate} at {choice.depth}/{choice.model_layers} layers")
    d.status = d.status.with_changes(
        phase="Switching",
        target=Placement(choice.candidate, choice.depth, name, cond.timestamp(d.inp.now)),
        switch_started=cond.timestamp(d.inp.now),
    )


# ---------------------------------------------------------------------------------------------
# Profiling rounds


def _round_pool(d: _Draft) -> str:
    active = d.status.active
    return active.worker if active is not None else names.profile_pool(d.inp.name, d.status.profiling_round)


def _round_names(d: _Draft) -> dict[str, str]:
    """Profile worker name -> candidate, for this round and the spec's candidates."""
    r = d.status.profiling_round
    return {names.profile_worker(d.inp.name, r, c.name): c.name for c in d.inp.spec.candidates}


def _profiling_budget(d: _Draft) -> int:
    """Profile workers that may run at once: the spec's bound, and the GPUs left beside the active
    worker's; at least one, so a round always advances."""
    spec = d.inp.spec
    budget = spec.profiling.max_concurrent_workers or len(spec.candidates)
    per_pod = spec.worker.gpus_per_pod
    if per_pod > 0 and d.inp.observed.gpu_supply is not None:
        held = spec.replicas * per_pod if d.status.active is not None else 0
        budget = min(budget, (d.inp.observed.gpu_supply - held) // per_pod)
    return max(1, min(budget, len(spec.candidates)))


def _settled(d: _Draft) -> set[str]:
    return {p.candidate for p in d.status.round_profiles} | set(d.status.round_dropped)


def _round_settled(d: _Draft) -> bool:
    return all(c.name in _settled(d) for c in d.inp.spec.candidates)


def _listen(d: _Draft) -> None:
    """The idle clock: it restarts whenever the round's pool (and the active worker) served more
    requests than last counted. Waking from idle restarts the candidates' timeouts too: their pods
    are new."""
    tel, now = d.inp.telemetry, d.inp.now
    if not tel.available:
        return
    active = d.status.active
    pool = [*_round_names(d), *([active.worker] if active is not None else [])]
    heard = sum(w.requests_ok for name in pool if (w := tel.worker(name)) is not None)
    at = d.status.round_heard_at or cond.timestamp(now)
    changes: dict[str, object] = {"round_heard": heard, "round_heard_at": at}
    if heard > d.status.round_heard:
        if _idle(d):
            _event(d, "ProfilingResumed", "traffic came back: the idle profile workers scale up again")
            changes["profiling_since"] = cond.timestamp(now)
        changes["round_heard_at"] = cond.timestamp(now)
    d.status = d.status.with_changes(**changes)


def _idle(d: _Draft) -> bool:
    """No request to the round's pool for spec.profiling.idleSeconds (and telemetry to say so)."""
    idle_s = d.inp.spec.profiling.idle_seconds
    heard_at = cond.parse_timestamp(d.status.round_heard_at)
    return bool(idle_s and heard_at is not None and d.inp.telemetry.available and d.inp.now - heard_at >= idle_s)


def _idled(d: _Draft, kept: tuple[str, ...]) -> tuple[str, ...]:
    """Of the round's workers this step keeps, those at zero replicas while the round is idle: all of
    them beside an active worker (it serves), else all but the first Ready one, which the stable
    Service keeps selecting. None while no kept worker is Ready: nothing would serve."""
    if not _idle(d):
        return ()
    if d.status.active is not None:
        return kept
    sentinel = next((n for n in sorted(kept) if _ready(d.inp.observed, n)), None)
    return () if sentinel is None else tuple(n for n in kept if n != sentinel)


def _ensure_round(d: _Draft) -> tuple[set[str], bool]:
    """Ensure this wave of profile workers: the first unsettled candidates, as many as the budget.

    Without an active worker the round's pool serves, so finished candidates keep serving while the
    budget has room for them, and one keeps serving until a new worker is Ready. Returns the round
    workers to keep, and whether to release the others even when they are the last Ready ones: a
    budget of one lets a finished worker go first (a short gap in serving, instead of a pod that
    waits forever for the GPU it holds)."""
    pool, names, obs = _round_pool(d), _round_names(d), d.inp.observed
    settled, budget = _settled(d), _profiling_budget(d)
    pending = [n for n, c in names.items() if c not in settled]
    wave = pending[:budget]
    held: list[str] = []
    release = False
    if d.status.active is None:
        finished = [n for n, c in names.items() if c in settled and obs.worker(n) is not None]
        # While switching, one finished worker serves: the target needs the other GPUs.
        held = finished[: budget - len(wave) if d.status.phase != "Switching" else 1]
        if not any(_ready(obs, n) for n in (*wave, *held)):
            ready = [n for n in finished if _ready(obs, n)]
            if ready and budget >= 2:
                wave, held = (wave[:-1] if len(wave) >= budget else wave), [ready[0]]
            elif ready:
                release = True
    idled = _idled(d, (*wave, *held))
    for name in (*wave, *held):
        candidate = names[name]
        c = d.inp.spec.candidate(candidate)
        depth = (c.layers if c else None) or 0  # 0: all layers, read from the model's config
        _ensure(d, name, candidate, depth, "profile", pool, 0 if name in idled else 1)
    return {*wave, *held}, release


def _placed(obs: Observed, name: str) -> bool:
    w = obs.worker(name)
    return w is not None and w.unschedulable is None


def _ready(obs: Observed, name: str) -> bool:
    w = obs.worker(name)
    return w is not None and w.ready_replicas > 0


def _advance_round(d: _Draft) -> None:
    """Settle each running candidate that served its quota, ran out of time, or found no node."""
    tel, spec, now = d.inp.telemetry, d.inp.spec, d.inp.now
    if not tel.available:
        return  # never decide from missing telemetry
    need, timeout = spec.profiling.requests_per_candidate, spec.profiling.timeout_seconds
    since = cond.parse_timestamp(d.status.profiling_since) or now
    profiles, dropped, settled = list(d.status.round_profiles), list(d.status.round_dropped), _settled(d)
    no_node = False
    for name, candidate in _round_names(d).items():
        w = d.inp.observed.worker(name)
        if candidate in settled or w is None:
            continue
        t = tel.worker(name)
        profile = t.profile if t is not None else None
        heard = profile.profiled_requests if profile is not None else 0
        if profile is not None and heard >= need:
            profiles.append(profile)
            _event(d, "CandidateProfiled", f"{candidate}: {heard} requests, {profile.profiled_tokens} tokens")
        elif w.unschedulable is not None:
            wait = spec.rollout.schedule_timeout_seconds
            # While another worker of the round holds a node, this one waits for its GPU, not for a new node.
            if now - w.created_at >= wait and not any(_placed(d.inp.observed, n) for n in _round_names(d)):
                dropped.append(candidate)
                why = f"{candidate}: no node could take its pod within {wait}s ({w.unschedulable})"
                _event(d, "CandidateDropped", why, "Warning")
                no_node = True
        elif now - max(w.started_at, since) >= timeout:
            if profile is not None and heard >= 1:
                profiles.append(profile)
                why = f"{candidate}: {heard} of {need} requests within {timeout}s; profiled on what it heard"
                _event(d, "CandidateProfiledPartially", why, "Warning")
            else:
                dropped.append(candidate)
                _event(d, "CandidateDropped", f"{candidate} served no request within {timeout}s", "Warning")
    if no_node:  # the others ask for the same GPUs: waiting for each in turn would only hold the phase
        done = {p.candidate for p in profiles} | set(dropped)
        for name, candidate in _round_names(d).items():
            w = d.inp.observed.worker(name)
            if candidate not in done and (w is None or w.unschedulable is not None):
                dropped.append(candidate)
                _event(
                    d, "CandidateDropped", f"{candidate}: not tried, no node took the last candidate's pod", "Warning"
                )
    d.status = d.status.with_changes(round_profiles=tuple(profiles), round_dropped=tuple(dropped))


# ---------------------------------------------------------------------------------------------
# Actions as a diff against what is observed


def _ensure(
    d: _Draft, name: str, candidate: str, depth: int, role: Literal["profile", "serve"], pool: str, replicas: int
) -> None:
    c = d.inp.spec.candidate(candidate)
    if c is None:
        return
    seen = d.inp.observed.worker(name)
    # An earlier phase of this step may have collected it: the status was one phase behind the
    # objects (an operator killed, or its status patch lost, after it created them). The later
    # phase's word wins (_normalise keeps the last), so say it even when nothing is to change.
    dropped = any(isinstance(a, DeleteWorker) and a.name == name for a in d.actions)
    template = worker_template(d.inp.spec, c.model)
    same = seen is not None and seen.replicas == replicas and seen.pool == pool and seen.template in (None, template)
    if same and not dropped:
        return
    d.actions.append(EnsureWorker(name, candidate, c.model, depth, role, pool, replicas, template))


def _ensure_active(d: _Draft, active: Placement) -> None:
    """The scale subresource drives spec.replicas; the operator alone writes the Deployment."""
    _ensure(d, active.worker, active.candidate, active.depth, "serve", active.worker, d.inp.spec.replicas)


def _delete(d: _Draft, name: str) -> None:
    if d.inp.observed.worker(name) is not None:
        d.actions.append(DeleteWorker(name))


def _whole(d: _Draft, name: str) -> bool:
    """Every pod of the worker Ready and none failing: only then is its telemetry complete enough to act on
    (a pod killed mid-request leaves partial counters and a half-filled breach window behind)."""
    w = d.inp.observed.worker(name)
    return w is not None and w.ready_replicas >= w.replicas and not w.failure


def _ready_in(workers: tuple[ObservedWorker, ...], pool: str) -> bool:
    return any(w.pool == pool and w.ready_replicas > 0 for w in workers)


def _point(d: _Draft, pool: str) -> None:
    """Point the Service at a pool, never at one without a Ready worker."""
    obs = d.inp.observed
    # As in _ensure: an earlier phase of this step may have pointed it elsewhere; the later word wins.
    moved = any(isinstance(a, PointService) for a in d.actions)
    if (obs.service_pool != pool or moved) and _ready_in(obs.workers, pool):
        d.actions.append(PointService(pool))


def _collect(d: _Draft, keep: set[str], release: bool = False) -> None:
    """Delete the workers not kept, but never the last Ready ones the Service selects, unless
    `release`: then the GPUs they hold are needed by a pod that waits for them."""
    obs = d.inp.observed
    kept_serving = release or _ready_in(tuple(w for w in obs.workers if w.name in keep), obs.service_pool or "")
    for w in obs.workers:
        if w.name not in keep and (w.pool != obs.service_pool or kept_serving):
            d.actions.append(DeleteWorker(w.name))


def _event(d: _Draft, reason: str, message: str, type_: Literal["Normal", "Warning"] = "Normal") -> None:
    d.actions.append(EmitEvent(reason, message, type_))


def _decide(d: _Draft, trigger: Trigger, candidate: str, depth: int, reason: str, applied: bool) -> None:
    decision = Decision(cond.timestamp(d.inp.now), trigger, candidate, depth, reason, applied)
    d.status = d.status.with_changes(decisions=(*d.status.decisions, decision)[-MAX_DECISIONS:])
    if trigger == "rollback":
        _event(d, "RolledBack", reason, "Warning")
    else:
        _event(d, "Decided" if applied else "Advised", f"{trigger}: {reason}")


def _normalise(actions: list[Action]) -> tuple[Action, ...]:
    """The last word per worker and for the Service wins; events are kept once each, in order."""
    last: dict[str, int] = {}
    for i, a in enumerate(actions):
        if isinstance(a, EnsureWorker | DeleteWorker):
            last[a.name] = i
        elif isinstance(a, PointService):
            last["\0service"] = i
    out: list[Action] = []
    for i, a in enumerate(actions):
        if isinstance(a, EnsureWorker | DeleteWorker) and last[a.name] != i:
            continue
        if isinstance(a, PointService) and last["\0service"] != i:
            continue
        if a not in out:
            out.append(a)
    return tuple(out)


# ---------------------------------------------------------------------------------------------
# Reporting: replicas, selector, conditions


def _report(d: _Draft) -> Status:
    inp, s = d.inp, d.status
    obs, now = inp.observed, inp.now
    serving_pool = s.active.worker if s.active is not None else names.profile_pool(inp.name, s.profiling_round)
    members = [w for w in obs.workers if w.pool == serving_pool]
    if s.active is not None:
        members = [w for w in members if w.name == s.active.worker]
    replicas = sum(w.replicas for w in members)
    ready = sum(w.ready_replicas for w in members)
    s = s.with_changes(replicas=replicas, ready_replicas=ready, selector=pool_selector(inp.name, serving_pool))
    c = s.conditions
    service_ready = sum(w.ready_replicas for w in obs.workers if w.pool == obs.service_pool)
    if obs.service_pool is not None and service_ready > 0:
        c = cond.set_condition(c, cond.READY, "True", "Serving", f"pool {obs.service_pool}: {service_ready} ready", now)
    else:
        c = cond.set_condition(c, cond.READY, "False", "NoReadyWorker", "no Ready worker behind the Service yet", now)
    c = cond.set_condition(c, cond.PROFILING, *_profiling_condition(d, s), now)
    tel = inp.telemetry
    if tel.available:
        c = cond.set_condition(c, cond.METRICS_AVAILABLE, "True", "MetricsOk", tel.message or "telemetry is fresh", now)
    else:
        reason = {"Missing": "MetricsMissing", "Stale": "MetricsStale"}.get(tel.reason, tel.reason)
        msg = tel.message or f"telemetry unavailable ({tel.reason}): no decision is taken from it"
        c = cond.set_condition(c, cond.METRICS_AVAILABLE, "False", reason, msg, now)
    if s.phase == "Switching" and s.target is not None:
        t = s.target
        c = cond.set_condition(
            c, cond.ROLLOUT_PROGRESSING, "True", "Switching", f"to {t.candidate} at {t.depth} layers ({t.worker})", now
        )
    else:
        c = cond.set_condition(c, cond.ROLLOUT_PROGRESSING, "False", "Idle", "no switch in progress", now)
    c = cond.set_condition(c, cond.CAPACITY_AVAILABLE, *_capacity_condition(d), now)
    degraded = d.degraded or _worker_failed(obs.workers) or _degraded(d, s)
    if degraded is not None:
        c = cond.set_condition(c, cond.DEGRADED, "True", degraded[0], degraded[1], now)
    else:
        c = cond.set_condition(c, cond.DEGRADED, "False", "AsExpected", "serving as decided", now)
    return s.with_changes(conditions=c)


def _profiling_condition(d: _Draft, s: Status) -> tuple[Literal["True", "False"], str, str]:
    if s.phase not in ("Profiling", "Reassessing"):
        return "False", "Profiled", f"{len(s.profiles)} candidate(s) profiled"
    need = d.inp.spec.profiling.requests_per_candidate
    finished = {p.candidate: p.profiled_requests for p in s.round_profiles}
    progress = []
    for name, candidate in _round_names(d).items():
        w = d.inp.telemetry.worker(name)
        heard = w.profile.profiled_requests if w is not None and w.profile is not None else 0
        if candidate in finished:
            progress.append(f"{candidate} {finished[candidate]}/{need} done")
        elif candidate in s.round_dropped:
            progress.append(f"{candidate} dropped")
        elif d.inp.observed.worker(name) is None:
            progress.append(f"{candidate} waits for a profiling slot")
        else:
            progress.append(f"{candidate} {heard}/{need}")
    budget = f" ({_profiling_budget(d)} at a time)" if _profiling_budget(d) < len(d.inp.spec.candidates) else ""
    round_names = _round_names(d)
    observed = [(c, d.inp.observed.worker(n)) for n, c in round_names.items()]
    idled = [c for c, w in observed if w is not None and w.replicas == 0] if _idle(d) else []
    idle_s = d.inp.spec.profiling.idle_seconds
    idle = f"; no request for {idle_s}s: {', '.join(idled)} at zero replicas until traffic comes" if idled else ""
    return "True", s.phase, f"round {s.profiling_round}{budget}: " + ", ".join(progress) + idle


def _capacity_condition(d: _Draft) -> tuple[Literal["True", "False"], str, str]:
    """A pod that waits for a node is a wait of its own (a cluster autoscaler may be adding one),
    not a failure; it says how long it may still wait. Replicas the nodes' GPUs cannot hold are said
    before any pod waits, so a platform team sees why the replica count will not be reached."""
    waiting = [w for w in d.inp.observed.workers if w.unschedulable is not None]
    spec, supply = d.inp.spec, d.inp.observed.gpu_supply
    wanted = spec.replicas * spec.worker.gpus_per_pod
    if not waiting and supply is not None and wanted > supply:
        fit = supply // spec.worker.gpus_per_pod
        return (
            "False",
            "ReplicasExceedGpus",
            f"spec.replicas {spec.replicas} x {spec.worker.gpus_per_pod} {GPU_RESOURCE} = {wanted}, but the"
            f" schedulable nodes have {supply}: {fit} replica(s) fit until a node is added",
        )
    if not waiting:
        return "True", "AllPlaced", "every worker pod has a node"
    limit = d.inp.spec.rollout.schedule_timeout_seconds
    parts = []
    for w in waiting:
        left = max(0, int(limit - (d.inp.now - w.created_at)))
        parts.append(f"worker {w.name} waits for a node ({left}s left of {limit}s): {w.unschedulable}")
    return "False", "Unschedulable", "; ".join(parts)[:1000]


def _worker_failed(workers: tuple[ObservedWorker, ...]) -> tuple[str, str] | None:
    """A worker whose pods cannot start (crash at start, bad image, a quota, a volume held elsewhere),
    in the pod's words; the reason is the workers' own when they share one."""
    failed = [w for w in workers if w.failure]
    if not failed:
        return None
    parts = []
    for w in failed:
        depth = f"{w.depth} layers" if w.depth > 0 else "full depth"
        parts.append(f"worker {w.name} ({w.candidate} at {depth}): {w.failure}")
    reasons = {w.failure_reason for w in failed}
    return (reasons.pop() if len(reasons) == 1 else WORKER_FAILED), "; ".join(parts)[:1000]


def _announce_worker_failure(d: _Draft, status: Status) -> None:
    """One Warning Event per new WorkerFailed message (not one per reconcile)."""
    now, before = status.condition(cond.DEGRADED), d.inp.status.condition(cond.DEGRADED)
    if now is None or now.reason != WORKER_FAILED or now.status != "True":
        return
    if before is None or (before.reason, before.message) != (now.reason, now.message):
        d.actions.append(EmitEvent(WORKER_FAILED, now.message, "Warning"))


def _degraded(d: _Draft, s: Status) -> tuple[str, str] | None:
    phase: Phase = s.phase
    if phase == "Profiling" and s.active is None and not s.profiles and s.profiling_round > 1:
        timeout = d.inp.spec.profiling.timeout_seconds
        return "ProfilingTimedOut", f"no candidate served a request within {timeout}s; profiling again"
    if s.active is None and phase == "Serving" and d.inp.spec.mode == "active":
        last = s.decisions[-1] if s.decisions else None
        return "RolloutFailed", last.reason if last else "no serve worker"
    if s.active is not None and s.ready_replicas < d.inp.spec.replicas:
        return "ReplicasUnavailable", f"{s.ready_replicas}/{d.inp.spec.replicas} replicas of {s.active.worker} ready"
    return None
