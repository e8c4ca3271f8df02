"""The operator killed at every point of a switch and restarted: it resumes from status and what it observes.

The crash-point sweep drives the operator's own reconcile (`controller.reconcile_once`, the function
kopf's handlers call) against the kmock emulator over real HTTP, through `KubeApi` with one change:
right after the k-th write request (POST, PATCH, DELETE) was answered, the "process" dies: `Killed`
is a BaseException, so nothing in the operator runs after it, not even the status patch. A FRESH
Controller (new client, platform and locks; nothing kept in memory) then takes the HeliosDeployment
as the API holds it and reconciles until nothing is left to do. k runs over every write of a whole
life: profiling, the first switch (profiling pool -> serve worker), a breach and the second switch
(serve worker -> deeper serve worker). That covers the phases the issue names: right after the new
Deployment is created, right after the Service moved, and between the deletes of the drain (the
first switch drains two profile workers, one DELETE each, then the second drains the first worker).

Asserted for every crash point: the restart converges to the worker the uninterrupted run ends on,
in no more reconciles than that run had left; no Deployment is created twice (one uid per name for
its whole life) and no write is refused (a duplicate create is a 409); at the end only the serving
worker, the stable Service and the metrics Service exist (no orphan), each with the
HeliosDeployment's controller ownerReference; the decisions equal the uninterrupted run's (none
doubled); Events are at least once (the killed reconcile's may come again, once each); and after
EVERY write the emulator applied, from either process or the test, checked in the emulator's own
thread before the answer leaves (kmock_support's `after_write` hook), the stable Service, once it
exists, selects a pool with a Ready worker.

The kopf variant runs the real operator as a process (`kopf run` of helios_operator.handlers) and
SIGKILLs it from that same hook, right after the write a kill point names and before the process
reads the answer: after it creates the first switch's Deployment, after it moves the Service, after
its first delete of the drain; three kills in a row, each restart resuming the previous one's work,
then a fourth process runs to the end. Same end-state assertions.

Found and fixed on the way (the pure-step tests at the bottom pin the step's part): the status was
written after the objects it implies, so a kill in between left it a phase behind, and a restart
replayed that phase against objects of the next one: it deleted the switch's new target, re-created
drained workers, and (two kills in a row) moved the Service back to the profiling pool. The
controller now writes Events, then the status, then the objects; the step lets a later phase's
"keep it as it is" override an earlier phase's delete or Service move in the same step.

GAPS of kmock (see kmock_support.py), so some of a real restart is NOT shown here:
- no Deployment controller or kubelet: the test plays it (a Deployment becomes Ready on the played
  controller's second look at it, between reconciles in the sweep; within 0.1 s in the kopf variant);
  no pods, so "Ready" is the Deployment's readyReplicas and the Service's selector is checked against
  the Deployments' pool label, not against Endpoints; in-flight requests are not modelled (the
  worker suite proves the drain through preStop);
- DELETE is immediate (propagationPolicy Foreground is ignored: no deletionTimestamp while pods
  drain), and there is no garbage collection by ownerReferences: an orphan would stay, which lets
  the test see one, but cascading deletion itself is not exercised;
- no status/spec split, no schema validation, no conflict detection on writes without a
  resourceVersion; the emulator never dies with the operator, and a write is atomic here;
- a kill lands between two requests (after an applied write), never inside one: a write the API
  applied but whose answer was lost is the same case as "killed right after it";
- telemetry is scripted (tests/operator's World), not Prometheus.
"""

from __future__ import annotations

import collections
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import pytest
from kmock._internal import enums, rendering
from kubernetes import client as k8s
from tests.operator.kmock_support import FakeCluster, HeliosEmulator, fake_cluster  # noqa: F401  (the fixture)
from tests.operator.profiles import profile
from tests.operator.test_operator_kmock import DeploymentController, World
from tests.support.bodies import hd_body

from helios_operator.adapters.kubernetes import KubeApi, KubeApiError, KubernetesPlatform
from helios_operator.controller import Controller, Outcome, reconcile_once
from helios_operator.core import names, policy, reconcile
from helios_operator.core.types import (
    DeleteWorker,
    EmitEvent,
    EnsureWorker,
    HeliosSpec,
    Observed,
    ObservedWorker,
    Placement,
    PointService,
    Role,
    Status,
    StepInput,
    TelemetrySnapshot,
    WorkerTelemetry,
)
from helios_operator.settings import load_settings

pytestmark = pytest.mark.timeout(120)

HD = "chat"
IMAGE = "example.test/helios-worker:test"
WRITES = frozenset({"POST", "PUT", "PATCH", "DELETE"})
MAX_RECONCILES = 40  # a run that needs more has not converged


def _profiles() -> dict[str, Any]:
    return {"small": profile("small", layers=8), "big": profile("big", layers=12, tokens_per_second=400.0)}


def _first_worker() -> str:
    """The serve worker the first switch goes to (the policy's choice on the scripted profiles)."""
    profiles = _profiles()
    choice = policy.choose((profiles["small"], profiles["big"]), "throughput", 0.9)
    assert choice is not None
    return names.serve_worker(HD, choice.candidate, choice.depth)


# ---------------------------------------------------------------------------------------------
# What the test observes: the emulator's objects right after every write it applied


def _labels(obj: dict[str, Any]) -> dict[str, str]:
    return dict(obj["metadata"].get("labels") or {})


def _stable(services: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [s for s in services if _labels(s).get(names.LABEL_SERVICE) == names.SERVICE_STABLE]


@dataclass
class Observer:
    """An `after_write` hook (kmock_support): runs in the emulator's thread after EVERY write it applied,
    from the operator, kopf or the test. Once the stable Service exists it must select a pool with a Ready
    worker, and stay; every Deployment name must keep one uid for its life (a second uid: created twice)."""

    checks: collections.Counter[str] = field(default_factory=collections.Counter)  # namespace -> writes seen
    violations: list[str] = field(default_factory=list)
    uids: dict[tuple[str, str], set[str]] = field(default_factory=lambda: collections.defaultdict(set))
    _served: set[str] = field(default_factory=set)  # namespaces whose stable Service has existed

    def __call__(self, emulator: HeliosEmulator, request: rendering.Request) -> None:
        if request.namespace is None:
            return
        try:
            self._check(emulator, request.namespace)
        except Exception as err:  # never a 500 to the operator: say it in the test
            self.violations.append(f"{request.namespace}: the check failed: {err!r}")

    def _check(self, emulator: HeliosEmulator, ns: str) -> None:
        self.checks[ns] += 1
        deployments, stable = emulator.live("deployments", ns), _stable(emulator.live("services", ns))
        for d in deployments:
            self.uids[ns, d["metadata"]["name"]].add(d["metadata"]["uid"])
        if len(stable) > 1:
            self.violations.append(f"{ns}: {len(stable)} stable Services")
        if not stable:
            if ns in self._served:
                self.violations.append(f"{ns}: the stable Service vanished (write {self.checks[ns]})")
            return
        self._served.add(ns)
        pool = (stable[0]["spec"].get("selector") or {}).get(names.LABEL_POOL)
        if not any(
            _labels(d).get(names.LABEL_POOL) == pool and int((d.get("status") or {}).get("readyReplicas") or 0) >= 1
            for d in deployments
        ):
            ready = {d["metadata"]["name"]: (d.get("status") or {}).get("readyReplicas") for d in deployments}
            self.violations.append(f"{ns}: write {self.checks[ns]}: the Service selects {pool!r}; Deployments {ready}")

    def created_twice(self, ns: str) -> dict[str, int]:
        return {name: len(u) for (n, name), u in self.uids.items() if n == ns and len(u) > 1}


def _deployments(cluster: FakeCluster, ns: str) -> dict[str, dict[str, Any]]:
    return {d["metadata"]["name"]: d for d in cluster.items(FakeCluster.deployment_path(ns))}


def _services(cluster: FakeCluster, ns: str) -> dict[str, dict[str, Any]]:
    return {s["metadata"]["name"]: s for s in cluster.items(FakeCluster.service_path(ns))}


def _status(cluster: FakeCluster, ns: str) -> dict[str, Any]:
    return (cluster.get(cluster.hd_path(ns, HD)) or {}).get("status") or {}


def _settled(cluster: FakeCluster, ns: str, first: str) -> str | None:
    """The serving worker once the life is over: serving past the breach, only that worker, the Service on it."""
    st = _status(cluster, ns)
    active = (st.get("active") or {}).get("worker")
    if st.get("phase") != "Serving" or not active or active == first or st.get("target"):
        return None
    stable = _stable(list(_services(cluster, ns).values()))
    if set(_deployments(cluster, ns)) != {active} or len(stable) != 1:
        return None
    return str(active) if stable[0]["spec"]["selector"].get(names.LABEL_POOL) == active else None


def _assert_clean_end(cluster: FakeCluster, observer: Observer, ns: str, uid: str, worker: str) -> None:
    """Only the serving worker and the two Services, each owned by the HeliosDeployment; nothing created twice;
    the stable Service on a Ready worker after every write."""
    deployments, services = _deployments(cluster, ns), _services(cluster, ns)
    assert set(deployments) == {worker}, f"{ns}: orphan Deployments {sorted(set(deployments) - {worker})}"
    kinds = sorted(_labels(s).get(names.LABEL_SERVICE, "?") for s in services.values())
    assert kinds == sorted([names.SERVICE_STABLE, names.SERVICE_METRICS]), f"{ns}: Services {sorted(services)}"
    for obj in [*deployments.values(), *services.values()]:
        refs = [
            (r["kind"], r["name"], r["uid"], r.get("controller")) for r in obj["metadata"].get("ownerReferences") or []
        ]
        assert refs == [(names.KIND, HD, uid, True)], f"{ns}: {obj['metadata']['name']} is not owned by {HD}: {refs}"
    assert not observer.created_twice(ns), f"{ns}: created more than once: {observer.created_twice(ns)}"
    assert not [v for v in observer.violations if v.startswith(f"{ns}:")], observer.violations


@dataclass
class PlayedDeploymentController:
    """kmock has no Deployment controller: a Deployment becomes Ready on the second look at it."""

    cluster: FakeCluster
    ns: str
    seen: set[str] = field(default_factory=set)  # uids: a re-created Deployment starts unready again

    def tick(self) -> None:
        for name, d in _deployments(self.cluster, self.ns).items():
            uid, want = d["metadata"]["uid"], int(d["spec"].get("replicas", 1))
            if uid in self.seen and (d.get("status") or {}).get("readyReplicas") != want:
                self.cluster.patch(
                    FakeCluster.deployment_path(self.ns, name) + "/status",
                    {
                        "status": {
                            "replicas": want,
                            "readyReplicas": want,
                            "observedGeneration": d["metadata"].get("generation"),
                        }
                    },
                )
            self.seen.add(uid)


# ---------------------------------------------------------------------------------------------
# The operator process that dies


class Killed(BaseException):
    """The operator process died here. Not an Exception: no `except Exception` in the operator runs."""


@dataclass(frozen=True)
class Write:
    method: str
    path: str
    name: str  # the created object's name (POST), else ""
    code: int  # the API's answer

    def __str__(self) -> str:
        return f"{self.method} {self.path}{'/' + self.name if self.name else ''} -> {self.code}"

    def shape(self) -> tuple[str, str, str, int]:
        """The write without its namespace (nor an Event's unique name), to compare two lives."""
        parts = self.path.split("/")
        if "namespaces" in parts:
            parts[parts.index("namespaces") + 1] = "*"
        return self.method, "/".join(parts), "" if self.path.endswith("/events") else self.name, self.code


class CrashingApi(KubeApi):
    """KubeApi whose process dies right after its `crash_after`-th write was answered."""

    def __init__(self, url: str, journal: list[Write], crash_after: int | None) -> None:
        cfg = k8s.Configuration()
        cfg.host = url
        super().__init__(cfg)
        self.journal, self.crash_after = journal, crash_after
        self.writes = 0
        self.dead = False

    def request(
        self, method: str, path: str, body: Any = None, content_type: str = "application/json"
    ) -> dict[str, Any]:
        if self.dead:
            raise Killed("a dead process sends nothing")
        if method not in WRITES:
            return super().request(method, path, body, content_type)
        name = str((body.get("metadata") or {}).get("name", "")) if method == "POST" and isinstance(body, dict) else ""
        error: KubeApiError | None = None
        try:
            out = super().request(method, path, body, content_type)
        except KubeApiError as err:
            error, out = err, {}
        write = Write(method, path.split("?")[0], name, error.status if error else 200)
        self.journal.append(write)
        self.writes += 1
        if self.writes == self.crash_after:
            self.dead = True
            self.http.close()
            raise Killed(f"killed after write {self.writes}: {write}")
        if error is not None:
            raise error
        return out


SETTINGS = load_settings([], {"HELIOS_WORKER_IMAGE": IMAGE, "HELIOS_METRICS_PORT": "0"})


@dataclass
class Life:
    """One HeliosDeployment in its own namespace, reconciled by one operator process after another."""

    cluster: FakeCluster
    world: World
    ns: str
    journal: list[Write] = field(default_factory=list)
    marks: list[int] = field(default_factory=list)  # len(journal) after each reconcile
    clock: float = 1_800_000_000.0

    def __post_init__(self) -> None:
        self.deployment_controller = PlayedDeploymentController(self.cluster, self.ns)
        self.uid = self.cluster.create(self.cluster.hd_path(self.ns), hd_body(HD, self.ns))["metadata"]["uid"]

    def process(self, crash_after: int | None = None) -> Controller:
        """A fresh operator process: new client, new platform, new locks; nothing carried over."""
        api = CrashingApi(self.cluster.url, self.journal, crash_after)
        return Controller(settings=SETTINGS, platform=KubernetesPlatform(api), telemetry=self.world)

    async def reconcile(self, controller: Controller) -> Outcome:
        self.deployment_controller.tick()
        self.clock += 1.0
        body = self.cluster.get(self.cluster.hd_path(self.ns, HD))  # as the API holds it (kopf passes this)
        assert body is not None
        try:
            return await reconcile_once(body, controller, now=self.clock)
        finally:
            self.marks.append(len(self.journal))

    async def run_until_settled(self, controller: Controller, first: str) -> tuple[str, int]:
        """(the serving worker, reconciles it took)."""
        for n in range(1, MAX_RECONCILES + 1):
            outcome = await self.reconcile(controller)
            if outcome.result == "ok" and not [a for a in outcome.actions if not isinstance(a, EmitEvent)]:
                worker = _settled(self.cluster, self.ns, first)
                if worker is not None:
                    return worker, n
        raise AssertionError(f"{self.ns}: not settled in {MAX_RECONCILES} reconciles: {_status(self.cluster, self.ns)}")

    async def run_until_killed(self, controller: Controller) -> None:
        for _ in range(MAX_RECONCILES):
            try:
                await self.reconcile(controller)
            except Killed:
                return
        raise AssertionError(f"{self.ns}: the process was never killed")

    def decisions(self) -> list[tuple[str, str, int, bool]]:
        return [
            (d["trigger"], d["candidate"], d["depth"], d["applied"])
            for d in _status(self.cluster, self.ns).get("decisions") or []
        ]

    def events(self) -> collections.Counter[str]:
        events = self.cluster.items(f"/api/v1/namespaces/{self.ns}/events")
        return collections.Counter(str(e.get("reason")) for e in events)


def _phase(write: Write, serve_workers: set[str]) -> str:
    if write.method == "POST" and write.name in serve_workers:
        return "after creating the new Deployment"
    if "/services" in write.path and (write.method == "PATCH" or write.name == HD):
        return "after moving the Service"
    if write.method == "DELETE":
        return "during the drain"
    return "after an Event or status write"


async def test_killed_after_every_write_of_a_switch_the_restarted_operator_converges_with_no_duplicate_or_orphan(
    fake_cluster: FakeCluster,  # noqa: F811
) -> None:
    observer = Observer()
    fake_cluster.emulator.request_window = 16  # one request at a time here: keeps kmock's matching O(1)
    fake_cluster.emulator.after_write = observer
    started = time.monotonic()
    first = _first_worker()
    world = World(fake_cluster, _profiles(), breach={first: 0.9})  # the first serve worker breaches: 2nd switch

    reference = Life(fake_cluster, world, "no-crash")
    final, reconciles = await reference.run_until_settled(reference.process(), first)
    _assert_clean_end(fake_cluster, observer, reference.ns, reference.uid, final)
    writes, marks = list(reference.journal), list(reference.marks)
    decisions, events = reference.decisions(), reference.events()
    assert [(d[0], d[3]) for d in decisions] == [("profiling", True), ("breach", True)]
    phases = collections.Counter(_phase(w, {first, final}) for w in writes)
    assert phases["after creating the new Deployment"] == 2 and phases["after moving the Service"] >= 2
    drain = [w.path.rsplit("/", 1)[-1] for w in writes if w.method == "DELETE"]
    assert len(drain) == 3 and first in drain  # the two profile workers, one by one, then the first serve worker

    extra_reconciles, extra_events = 0, 0
    for k in range(1, len(writes) + 1):
        life = Life(fake_cluster, world, f"crash-{k:02d}")
        where = f"killed after write {k} ({writes[k - 1]})"
        await life.run_until_killed(life.process(crash_after=k))
        assert [w.shape() for w in life.journal] == [w.shape() for w in writes[:k]], f"{where}: not the reference run"
        worker, n = await life.run_until_settled(life.process(), first)
        assert worker == final, f"{where}: serving {worker}, not {final}"
        _assert_clean_end(fake_cluster, observer, life.ns, life.uid, worker)
        refused = [str(w) for w in life.journal if w.code >= 400 and not (w.method == "DELETE" and w.code == 404)]
        assert not refused, f"{where}: writes the API refused (a duplicate create is a 409): {refused}"
        assert life.decisions() == decisions, f"{where}: decisions {life.decisions()}, not {decisions}"
        got = life.events()  # at-least-once: each Event of the killed reconcile may come again, once
        assert set(got) == set(events) and all(got[r] <= 2 * events[r] for r in got), f"{where}: Events {got}"
        assert observer.checks[life.ns] >= len(life.journal)
        left = reconciles - next(i for i, m in enumerate(marks) if m >= k)  # the killed one included
        assert n <= left, f"{where}: {n} reconciles after the restart, the uninterrupted run had {left} left"
        extra_reconciles = max(extra_reconciles, n - left)
        extra_events = max(extra_events, sum(got.values()) - sum(events.values()))
    took = time.monotonic() - started
    checks = sum(observer.checks.values())
    print(
        f"\n{len(writes)} crash points ({', '.join(f'{n} {p}' for p, n in phases.items())}) across {reconciles} "
        f"reconciles; every restart converged, at most {extra_reconciles} reconcile(s) beyond the uninterrupted run; "
        f"at most {extra_events} Event(s) repeated; Service on a Ready worker at all {checks} writes; {took:.1f}s",
        file=sys.__stdout__,
    )


# ---------------------------------------------------------------------------------------------
# The step's part of the fix, pinned: a status one or two phases behind the objects (what a kill before
# the status write left before the controller wrote the status first; still what a reconcile handed an
# older body sees) must not undo the later phase: no target deleted, nothing drained re-created, the
# Service never moved back.

NOW = 1_800_000_100.0
SINCE = "2027-01-15T08:00:00Z"


def _worker(name: str, candidate: str, depth: int, role: Role, pool: str, ready: int = 1) -> ObservedWorker:
    return ObservedWorker(name, candidate, depth, role, pool, 1, ready, NOW - 10)


def _profiled() -> TelemetrySnapshot:
    """Both profile workers have served their requests: profiling completes in this step."""
    return TelemetrySnapshot(
        "Ok",
        "",
        tuple(
            WorkerTelemetry(names.profile_worker(HD, 1, c), c, p.model_layers, p.model_layers, 5, 500, 0, 100, p)
            for c, p in _profiles().items()
        ),
    )


def test_a_restart_that_lost_the_status_write_after_creating_the_target_keeps_the_target() -> None:
    """Killed after creating the switch's target, before patching status (still Profiling): the restarted
    step re-decides the same switch and must not delete the target it is about to wait for."""
    first = _first_worker()
    spec = HeliosSpec.from_dict(hd_body(HD, "default")["spec"])
    pool = names.profile_pool(HD, 1)
    observed = Observed(
        (
            _worker(names.profile_worker(HD, 1, "small"), "small", 8, "profile", pool),
            _worker(names.profile_worker(HD, 1, "big"), "big", 12, "profile", pool),
            _worker(first, "small", int(first.rsplit("-l", 1)[1]), "serve", first, ready=0),
        ),
        pool,
    )
    status = Status(phase="Profiling", profiling_round=1, profiling_since=SINCE)
    result = reconcile.step(StepInput(HD, 1, spec, status, observed, _profiled(), NOW))
    assert result.status.phase == "Switching" and result.status.target is not None
    assert result.status.target.worker == first
    assert DeleteWorker(first) not in result.actions, result.actions


def test_a_restart_that_lost_two_status_writes_never_moves_the_service_back() -> None:
    """Killed after creating the target, then again after moving the Service to it (the status still says
    Profiling): the restarted step replays profiling, which would point the Service at the profiling pool,
    then commits the switch; the later word must win: the Service stays on the target."""
    first = _first_worker()
    spec = HeliosSpec.from_dict(hd_body(HD, "default")["spec"])
    pool = names.profile_pool(HD, 1)
    observed = Observed(
        (
            _worker(names.profile_worker(HD, 1, "small"), "small", 8, "profile", pool),
            _worker(names.profile_worker(HD, 1, "big"), "big", 12, "profile", pool),
            _worker(first, "small", int(first.rsplit("-l", 1)[1]), "serve", first),
        ),
        first,
    )
    status = Status(phase="Profiling", profiling_round=1, profiling_since=SINCE)
    result = reconcile.step(StepInput(HD, 1, spec, status, observed, _profiled(), NOW))
    assert result.status.active is not None and result.status.active.worker == first
    assert [a.pool for a in result.actions if isinstance(a, PointService)] in ([], [first]), result.actions


@pytest.mark.parametrize("active", [False, True], ids=["first switch", "second switch"])
def test_a_restart_mid_drain_never_recreates_what_was_drained(active: bool) -> None:
    """Killed after the Service moved and the first old worker was deleted, before patching status (still
    Switching): the restarted step commits the switch and drains the rest; it re-creates nothing."""
    spec = HeliosSpec.from_dict(hd_body(HD, "default")["spec"])
    target = Placement("small", 6, names.serve_worker(HD, "small", 6), SINCE)
    old = Placement("small", 4, names.serve_worker(HD, "small", 4), SINCE) if active else None
    pool = names.profile_pool(HD, 1)
    left = [] if active else [_worker(names.profile_worker(HD, 1, "small"), "small", 8, "profile", pool)]
    observed = Observed((*left, _worker(target.worker, "small", 6, "serve", target.worker)), target.worker)
    status = Status(phase="Switching", active=old, target=target, profiling_round=1, switch_started=SINCE)
    result = reconcile.step(StepInput(HD, 1, spec, status, observed, TelemetrySnapshot("Missing"), NOW))
    assert result.status.phase == "Serving" and result.status.active is not None
    assert result.status.active.worker == target.worker
    ensured = {a.name for a in result.actions if isinstance(a, EnsureWorker)}
    assert ensured <= {target.worker}, f"re-created what was drained: {result.actions}"
    assert {a.name for a in result.actions if isinstance(a, DeleteWorker)} == {w.name for w in left}


# ---------------------------------------------------------------------------------------------
# The real operator process (kopf run), SIGKILLed at exact writes

ROOT = Path(__file__).resolve().parents[2]
NS = "default"


def operator_process() -> None:
    """Entry of the operator subprocess: `kopf run` of helios_operator.handlers, telemetry scripted as above."""
    import logging

    import kopf

    from helios_operator import handlers

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    url = os.environ["HELIOS_TEST_KMOCK_URL"]
    cluster = FakeCluster(None, url, Path(os.environ["KUBECONFIG"]), httpx.Client(base_url=url, timeout=5.0))  # type: ignore[arg-type]
    handlers.controls.telemetry = World(cluster, _profiles(), breach={_first_worker(): 0.9})

    @kopf.on.startup()
    def quick(settings: kopf.OperatorSettings, **_: Any) -> None:
        settings.watching.reconnect_backoff = 0.1
        settings.batching.idle_timeout = 0.2
        settings.batching.batch_window = 0.05
        settings.scanning.disabled = True

    kopf.run(clusterwide=True, standalone=True)


@dataclass
class KillPoint:
    what: str
    matches: Callable[[rendering.Request], bool]


def _created(plural: str, name: str) -> Callable[[rendering.Request], bool]:
    return lambda r: r.action == enums.action.CREATE and _plural(r) == plural and _body_name(r) == name


def _plural(request: rendering.Request) -> str:
    return str(request.resource.plural) if request.resource is not None else ""


def _body_name(request: rendering.Request) -> str:
    data = request.data if isinstance(request.data, dict) else {}
    return str((data.get("metadata") or {}).get("name") or request.name or "")


@dataclass
class Assassin:
    """An `after_write` hook: checks every write (Observer), and SIGKILLs the operator process right after
    the write its kill point names, in the emulator's thread, before the answer leaves: the process never
    learns the write succeeded."""

    observer: Observer
    victim: subprocess.Popen[bytes] | None = None
    point: KillPoint | None = None
    killed: threading.Event = field(default_factory=threading.Event)
    at_kill: list[str] = field(default_factory=list)

    def __call__(self, emulator: HeliosEmulator, request: rendering.Request) -> None:
        self.observer(emulator, request)
        if self.victim is None or self.point is None or request.subresource or not self.point.matches(request):
            return
        self.victim.kill()
        self.victim.wait(5)
        deployments = sorted(d["metadata"]["name"] for d in emulator.live("deployments", NS))
        stable = _stable(emulator.live("services", NS))
        pool = (stable[0]["spec"].get("selector") or {}).get(names.LABEL_POOL) if stable else None
        st = next(iter(emulator.live(names.PLURAL, NS)), {}).get("status") or {}
        phase = f"{st.get('phase')} to {(st.get('target') or {}).get('worker')}"
        self.at_kill.append(f"{self.point.what}: status {phase}, Service on {pool}, Deployments {deployments}")
        self.victim, self.point = None, None
        self.killed.set()


def _start_operator(log: Path, url: str) -> subprocess.Popen[bytes]:
    env = {
        **os.environ,
        "HELIOS_TEST_KMOCK_URL": url,
        "HELIOS_RESYNC_INTERVAL_S": "0.3",
        "HELIOS_WORKER_IMAGE": IMAGE,
        "HELIOS_METRICS_PORT": "0",
    }
    code = "from tests.reliability.test_operator_restart import operator_process; operator_process()"
    with log.open("ab") as out:
        return subprocess.Popen([sys.executable, "-c", code], cwd=ROOT, env=env, stdout=out, stderr=subprocess.STDOUT)


def test_the_kopf_operator_sigkilled_after_create_after_the_service_move_and_mid_drain_resumes_cleanly(
    fake_cluster: FakeCluster,  # noqa: F811
    tmp_path: Path,
) -> None:
    observer = Observer()
    assassin = Assassin(observer)
    fake_cluster.emulator.request_window = 500
    fake_cluster.emulator.after_write = assassin
    first = _first_worker()
    played = DeploymentController(fake_cluster)  # every Deployment Ready within 0.1 s
    log = tmp_path / "operator.log"
    points = [
        KillPoint("after creating the first switch's Deployment", _created("deployments", first)),
        KillPoint("after moving the Service", lambda r: r.action == enums.action.UPDATE and _plural(r) == "services"),
        KillPoint(
            "after the first delete of the drain",
            lambda r: r.action == enums.action.DELETE and _plural(r) == "deployments",
        ),
    ]
    processes: list[subprocess.Popen[bytes]] = []
    started = time.monotonic()
    try:
        played.thread.start()
        uid = fake_cluster.create(fake_cluster.hd_path(NS), hd_body(HD, NS))["metadata"]["uid"]
        for point in points:
            assassin.killed.clear()
            assassin.point = point
            assassin.victim = _start_operator(log, fake_cluster.url)
            processes.append(assassin.victim)
            assert assassin.killed.wait(40), f"never reached the kill point {point.what!r}:\n{log.read_text()[-3000:]}"
        last = _start_operator(log, fake_cluster.url)
        processes.append(last)
        resumed = time.monotonic()
        final = fake_cluster.wait_for("the operator to settle", lambda: _settled(fake_cluster, NS, first), timeout=40)
        settled_s = time.monotonic() - resumed
        last.terminate()
        last.wait(15)
    finally:
        for p in processes:
            if p.poll() is None:
                p.kill()
                p.wait(5)
        played.stop.set()
        played.thread.join(5)
    assert [p.returncode for p in processes[:3]] == [-signal.SIGKILL] * 3
    _assert_clean_end(fake_cluster, observer, NS, uid, final)
    decisions = [(d["trigger"], d["applied"]) for d in _status(fake_cluster, NS).get("decisions") or []]
    assert decisions == [("profiling", True), ("breach", True)]
    print(
        "\nkopf operator SIGKILLed 3 times: "
        + "; ".join(assassin.at_kill)
        + f"; the 4th process settled {settled_s:.1f}s after its start ({time.monotonic() - started:.1f}s in all; "
        f"Service on a Ready worker at all {observer.checks[NS]} writes)",
        file=sys.__stdout__,
    )
