"""The operator killed at every point of a switch and restarted: it resumes from status and what it observes.

The crash-point sweep drives the operator's own reconcile (`controller.reconcile_once`, the function
kopf's handlers call) against the kmock emulator over real HTTP, through `KubeApi` with one change:
after the k-th write request (POST, PATCH, DELETE) has been answered, the "process" dies —
`Killed` is a BaseException, so no handler in the operator runs after it, not even the status
patch. A FRESH Controller (new platform, new client, new locks; nothing kept in memory) then takes
the HeliosDeployment as the API holds it and reconciles until nothing is left to do. k runs over
every write of a whole life: profiling, the first switch (profiling pool -> serve worker), a breach
and a second switch (serve worker -> deeper serve worker), so it covers the three phases the issue
names: right after the new Deployment is created, right after the Service moved, and between the
deletes of the drain (the first switch drains two profile workers, one DELETE each).

Asserted for every crash point: the run converges to the same serving worker as the run without a
crash; no Deployment name is created twice and no create meets a 409 (no duplicate); at the end only
the serving worker, the stable Service and the metrics Service exist (no orphan) and each carries
the HeliosDeployment's controller ownerReference; the recorded decisions equal those of the run
without a crash (none doubled); and after EVERY write of either process (and every step of the
played Deployment controller) the stable Service, once it exists, selects a pool with a Ready worker.

The kopf variant SIGKILLs a real `kopf run` process (a subprocess, so nothing of it survives) right
after the switch's target Deployment appears, starts a new process, and asserts the same end state.

GAPS of kmock (see kmock_support.py), so some of a real restart is NOT shown here:
- no Deployment controller or kubelet: the test plays it (a Deployment becomes Ready on the played
  controller's second look at it, between reconciles in the sweep, every 0.1 s in the kopf variant);
  no pods, so "Ready" is the Deployment's readyReplicas, and the Service's selector is checked against
  the Deployments' pool label, not against Endpoints;
- DELETE is immediate (propagationPolicy Foreground is ignored; no deletionTimestamp while pods
  drain through preStop), and there is no garbage collection by ownerReferences: an orphan would
  stay, which is what lets the test see one, but cascading deletion itself is not exercised;
- no status/spec split, no schema validation, no conflict detection on writes without a
  resourceVersion; the emulator never dies with the operator (API writes are atomic here);
- a kill lands between two requests (after an answered write), never inside one: a write the API
  applied but whose answer was lost is the same case as "killed right after it".
Events are at-least-once: a kill between an Event's POST and the status patch repeats it; the
sweep measures how often (see the figure it prints) and bounds it.
"""

from __future__ import annotations

import asyncio
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
from kubernetes import client as k8s
from tests.operator.kmock_support import FakeCluster, fake_cluster, free_port  # noqa: F401  (the fixture)
from tests.operator.profiles import profile
from tests.operator.test_operator_kmock import World

from helios_operator import names, naming, policy
from helios_operator.controller import Controller, Outcome, reconcile_once
from helios_operator.model import EmitEvent
from helios_operator.platforms.kubernetes import KubeApi, KubeApiError, KubernetesPlatform
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
    return naming.serve_worker(HD, choice.candidate, choice.depth)


def _hd(namespace: str) -> dict[str, Any]:
    return {
        "apiVersion": names.API_VERSION,
        "kind": names.KIND,
        "metadata": {"name": HD, "namespace": namespace},
        "spec": {
            "objective": "throughput",
            "accuracyFloor": 0.9,
            "mode": "active",
            "replicas": 1,
            "candidates": [
                {"name": "small", "model": "/models/small", "layers": 8},
                {"name": "big", "model": "/models/big", "layers": 12},
            ],
            "exit": {"confidenceThreshold": 0.9, "breachWindow": 100, "breachLimit": 50},
            "profiling": {"requestsPerCandidate": 5},
            "reassessment": {"everyRequests": 50},
        },
    }


# ---------------------------------------------------------------------------------------------
# What the test observes in the emulator


def _deployments(cluster: FakeCluster, ns: str) -> dict[str, dict[str, Any]]:
    return {d["metadata"]["name"]: d for d in cluster.items(FakeCluster.deployment_path(ns))}


def _services(cluster: FakeCluster, ns: str) -> dict[str, dict[str, Any]]:
    return {s["metadata"]["name"]: s for s in cluster.items(FakeCluster.service_path(ns))}


def _stable_service(services: dict[str, dict[str, Any]]) -> dict[str, Any] | None:
    stable = [s for s in services.values() if (s["metadata"].get("labels") or {}).get(names.LABEL_SERVICE)
              == names.SERVICE_STABLE]
    assert len(stable) <= 1, f"more than one stable Service: {sorted(services)}"
    return stable[0] if stable else None


def _hd_body(cluster: FakeCluster, ns: str) -> dict[str, Any]:
    body = cluster.get(cluster.hd_path(ns, HD))
    assert body is not None
    return body


@dataclass
class ServiceWatch:
    """After every write: once the stable Service exists, it selects a pool with a Ready worker."""

    cluster: FakeCluster
    ns: str
    checks: int = 0
    service_seen: bool = False

    def __call__(self, after: str) -> None:
        self.checks += 1
        svc = _stable_service(_services(self.cluster, self.ns))
        if svc is None:
            assert not self.service_seen, f"the stable Service vanished after {after}"
            return
        self.service_seen = True
        pool = (svc["spec"].get("selector") or {}).get(names.LABEL_POOL)
        ready = [
            name
            for name, d in _deployments(self.cluster, self.ns).items()
            if (d["metadata"].get("labels") or {}).get(names.LABEL_POOL) == pool
            and int((d.get("status") or {}).get("readyReplicas") or 0) >= 1
        ]
        assert ready, f"after {after}: the stable Service selects pool {pool!r}, which has no Ready worker"


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
                    {"status": {"replicas": want, "readyReplicas": want,
                                "observedGeneration": d["metadata"].get("generation")}},
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
        """The write without its namespace (and an Event's unique name), to compare two lives."""
        parts = self.path.split("/")
        if "namespaces" in parts and parts.index("namespaces") + 1 < len(parts):
            parts[parts.index("namespaces") + 1] = "*"
        return self.method, "/".join(parts), "" if self.path.endswith("/events") else self.name, self.code


class CrashingApi(KubeApi):
    """KubeApi whose process dies right after its `crash_after`-th write was answered; every write
    goes to the journal and is followed by the ServiceWatch's look at the emulator."""

    def __init__(self, url: str, journal: list[Write], watch: Callable[[str], None], crash_after: int | None) -> None:
        cfg = k8s.Configuration()
        cfg.host = url
        super().__init__(cfg)
        self.journal, self.watch, self.crash_after = journal, watch, crash_after
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
        self.watch(f"write {len(self.journal)} ({write})")
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
    clock: float = 1_800_000_000.0
    reconciles: int = 0

    def __post_init__(self) -> None:
        self.watch = ServiceWatch(self.cluster, self.ns)
        self.deployment_controller = PlayedDeploymentController(self.cluster, self.ns)
        self.uid = self.cluster.create(self.cluster.hd_path(self.ns), _hd(self.ns))["metadata"]["uid"]

    def process(self, crash_after: int | None = None) -> Controller:
        """A fresh operator process: new client, new platform, new locks; nothing carried over."""
        api = CrashingApi(self.cluster.url, self.journal, self.watch, crash_after)
        return Controller(settings=SETTINGS, platform=KubernetesPlatform(api), telemetry=self.world)

    async def reconcile(self, controller: Controller) -> Outcome:
        self.deployment_controller.tick()
        self.watch("the played Deployment controller's tick")
        self.clock += 1.0
        self.reconciles += 1
        return await reconcile_once(_hd_body(self.cluster, self.ns), controller, now=self.clock)

    def status(self) -> dict[str, Any]:
        return _hd_body(self.cluster, self.ns).get("status") or {}

    def settled(self, outcome: Outcome, first: str) -> str | None:
        """The serving worker, once the life is over: serving past the breach, nothing left to do."""
        st = self.status()
        active = (st.get("active") or {}).get("worker")
        if outcome.result != "ok" or st.get("phase") != "Serving" or not active or st.get("target"):
            return None
        if active == first or [a for a in outcome.actions if not isinstance(a, EmitEvent)]:
            return None
        svc = _stable_service(_services(self.cluster, self.ns))
        if set(_deployments(self.cluster, self.ns)) != {active} or svc is None:
            return None
        return str(active) if svc["spec"]["selector"].get(names.LABEL_POOL) == active else None

    async def run_until_settled(self, controller: Controller, first: str) -> tuple[str, int]:
        """(the serving worker, reconciles it took)."""
        for n in range(1, MAX_RECONCILES + 1):
            outcome = await self.reconcile(controller)
            worker = self.settled(outcome, first)
            if worker is not None:
                return worker, n
        raise AssertionError(f"{self.ns}: not settled after {MAX_RECONCILES} reconciles; status {self.status()}")

    async def run_until_killed(self, controller: Controller) -> int:
        for n in range(1, MAX_RECONCILES + 1):
            try:
                await self.reconcile(controller)
            except Killed:
                return n
        raise AssertionError(f"{self.ns}: the process was never killed")

    def decisions(self) -> list[tuple[str, str, int, bool]]:
        return [(d["trigger"], d["candidate"], d["depth"], d["applied"]) for d in self.status().get("decisions") or []]

    def events(self) -> collections.Counter[str]:
        return collections.Counter(e.get("reason") for e in self.cluster.items(f"/api/v1/namespaces/{self.ns}/events"))

    def assert_clean_end(self, worker: str) -> None:
        """Only the serving worker and the two Services, each owned by the HeliosDeployment; no create twice."""
        deployments, services = _deployments(self.cluster, self.ns), _services(self.cluster, self.ns)
        assert set(deployments) == {worker}, f"{self.ns}: orphan Deployments {sorted(set(deployments) - {worker})}"
        kinds = sorted((s["metadata"].get("labels") or {}).get(names.LABEL_SERVICE) for s in services.values())
        assert kinds == sorted([names.SERVICE_STABLE, names.SERVICE_METRICS]), f"{self.ns}: Services {sorted(services)}"
        for obj in [*deployments.values(), *services.values()]:
            refs = obj["metadata"].get("ownerReferences") or []
            assert [(r["kind"], r["name"], r["uid"], r.get("controller")) for r in refs] == [
                (names.KIND, HD, self.uid, True)
            ], f"{self.ns}: {obj['metadata']['name']} is not owned by {HD}: {refs}"
        creates = collections.Counter((w.path, w.name) for w in self.journal if w.method == "POST" and w.name
                                      and not w.path.endswith("/events"))
        twice = {k: n for k, n in creates.items() if n > 1}
        assert not twice, f"{self.ns}: created more than once: {twice}" + "\n".join(map(str, self.journal))
        failed = [str(w) for w in self.journal if w.code >= 400 and not (w.method == "DELETE" and w.code == 404)]
        assert not failed, f"{self.ns}: writes the API refused: {failed}"


def _phase(write: Write, first: str, second: str) -> str:
    if write.method == "POST" and write.name in (first, second):
        return "after creating the new Deployment"
    if "/services" in write.path and (write.method == "PATCH" or write.name == HD):
        return "after moving the Service"
    if write.method == "DELETE":
        return "during the drain"
    return "elsewhere"


async def test_killed_after_every_write_of_a_switch_the_restarted_operator_converges_with_no_duplicate_or_orphan(
    fake_cluster: FakeCluster,  # noqa: F811
) -> None:
    fake_cluster.emulator.request_window = 16  # one request at a time here: keep kmock's matching O(1)
    started = time.monotonic()
    first = _first_worker()
    world = World(fake_cluster, _profiles(), breach={first: 0.9})  # the first serve worker breaches: 2nd switch

    reference = Life(fake_cluster, world, "no-crash")
    final, reconciles = await reference.run_until_settled(reference.process(), first)
    print(f"reference {time.monotonic() - started:.2f}s", *enumerate(reference.journal, 1), sep="\n", file=sys.__stdout__)
    reference.assert_clean_end(final)
    writes = list(reference.journal)
    decisions, events = reference.decisions(), reference.events()
    assert [d[0] for d in decisions] == ["profiling", "breach"] and all(d[3] for d in decisions)
    phases = collections.Counter(_phase(w, first, final) for w in writes)
    assert phases["after creating the new Deployment"] == 2 and phases["after moving the Service"] >= 2
    assert phases["during the drain"] >= 3  # two profile workers, then the first serve worker

    after_restart: list[int] = []
    extra_events = 0
    for k in range(1, len(writes) + 1):
        life = Life(fake_cluster, world, f"crash-{k:02d}")
        life.clock = reference.clock - reference.reconciles  # the same timeline as the reference
        await life.run_until_killed(life.process(crash_after=k))
        assert [w.shape() for w in life.journal] == [w.shape() for w in writes[:k]], f"crash {k}: the first process strayed from the reference run"
        worker, n = await life.run_until_settled(life.process(), first)
        after_restart.append(n)
        assert worker == final, f"crash after write {k} ({writes[k - 1]}): serving {worker}, not {final}"
        life.assert_clean_end(worker)
        assert life.decisions() == decisions, f"crash after write {k} ({writes[k - 1]}): decisions differ"
        got = life.events()
        assert set(got) == set(events) and all(got[r] <= events[r] + 1 for r in got), (k, got, events)
        extra_events = max(extra_events, sum(got.values()) - sum(events.values()))
        assert life.watch.checks >= k
    took = time.monotonic() - started
    print(
        f"\n{len(writes)} crash points ({dict(phases)}) over {reconciles} reconciles; every restart converged in "
        f"{min(after_restart)}-{max(after_restart)} reconciles; at most {extra_events} Event(s) repeated; "
        f"{took:.1f}s",
        file=sys.__stdout__,
    )
