"""The local platform: the operator's actions executed as worker processes on loopback.

Kubernetes turns an EnsureWorker into a Deployment whose pods the kubelet starts, probes and
restarts; here one object plays all three roles, so the same reconcile step can drive either:

- EnsureWorker  -> `python -m helios_worker` subprocesses with the container's arguments
                   (core/worker_args), on --port 0 --port-file F (replicas =
                   processes),
                   ready once their /readyz answers 200; a process that exits is replaced, with
                   back-off, like a pod under a restart policy of Always.
- DeleteWorker  -> drain: the router stops sending it new requests, in-flight ones finish, then
                   SIGTERM (the worker drains what it still holds and exits), then reap.
- PointService  -> the router (the stable endpoint) sends new requests to that pool.
- EmitEvent     -> an event log the demo shows.
- EnsureMonitoring -> nothing: the runner scrapes the workers, or a LocalPrometheus reads
                   `endpoints()`.
- EnsureDisruptionBudget -> nothing: no one evicts a local process.

It implements the operator's `Platform` protocol, so the operator's own loop (controller.py) drives it.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Literal

import httpx

from helios_local.router import Router
from helios_operator.core.types import (
    DeleteWorker,
    EmitEvent,
    EnsureWorker,
    HeliosSpec,
    Observed,
    ObservedWorker,
    Owner,
    PlatformAction,
    PointService,
    Status,
)
from helios_operator.core.worker_args import worker_args

LOOPBACK = "127.0.0.1"
MAX_RESTART_BACKOFF_S = 30.0


def worker_command(args: Sequence[str]) -> list[str]:
    """The worker process's argv: `python -m helios_worker` with the arguments its container gets."""
    return [sys.executable, "-m", "helios_worker", *args]


CommandBuilder = Callable[[Sequence[str]], list[str]]  # the worker's arguments -> argv


@dataclass(frozen=True)
class LocalEvent:
    time: float
    type: Literal["Normal", "Warning"]
    reason: str
    message: str


@dataclass
class Replica:
    """One worker process: what a pod is in Kubernetes."""

    process: asyncio.subprocess.Process
    port_file: Path
    log_path: Path
    started_at: float
    port: int = 0  # 0 until the worker has written its port file
    ready: bool = False

    @property
    def url(self) -> str:
        return f"http://{LOOPBACK}:{self.port}"

    def read_port(self) -> bool:
        """Pick up the port the worker bound; False while it has not written it yet."""
        if not self.port:
            with contextlib.suppress(OSError, ValueError):
                self.port = int(self.port_file.read_text().strip())
        return bool(self.port)


@dataclass
class LocalWorker:
    """One EnsureWorker's processes: what a Deployment is in Kubernetes."""

    desired: EnsureWorker
    created_at: float
    replicas: list[Replica] = field(default_factory=list)
    retiring: list[Replica] = field(default_factory=list)  # an older template's, serving until the new are Ready
    restarts: int = 0
    next_start_at: float = 0.0  # restart back-off
    last_exit: str = ""  # why its last process exited (exit code, log tail)

    @property
    def pods(self) -> list[Replica]:
        """Every process it runs, old template and new, as a Deployment's pods mid-rollout."""
        return [*self.replicas, *self.retiring]


def read_rss_bytes(pid: int) -> int:
    """Resident memory of a process (Linux /proc); 0 where it cannot be read."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return 0


def log_tail(path: Path, lines: int = 5) -> str:
    try:
        return " | ".join(path.read_text(errors="replace").strip().splitlines()[-lines:])
    except OSError:
        return ""


class LocalPlatform:
    """Executes actions as processes; observe() reports them as the step expects. See module doc."""

    def __init__(
        self,
        deployment: str,
        spec: HeliosSpec,
        router: Router,
        log_dir: Path,
        *,
        command: CommandBuilder = worker_command,
        env: Mapping[str, str] | None = None,
        drain_timeout_s: float = 120.0,
        probe_timeout_s: float = 1.0,
        on_event: Callable[[LocalEvent], None] | None = None,
    ) -> None:
        self.deployment = deployment
        self.spec = spec
        self.router = router
        self.log_dir = log_dir
        self._command = command
        self._env = {**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})}
        self._drain_timeout_s = drain_timeout_s
        self._on_event = on_event
        self._workers: dict[str, LocalWorker] = {}
        self._service_pool: str | None = None
        self._known_pools: set[str] = set()
        self._started = 0
        self._draining: set[asyncio.Task[None]] = set()
        self._probe = httpx.AsyncClient(timeout=probe_timeout_s)
        self.events: list[LocalEvent] = []
        self.status = Status()  # the last one written: what the status subresource holds in Kubernetes
        log_dir.mkdir(parents=True, exist_ok=True)

    # -- actions ----------------------------------------------------------------------------------

    # -- the Platform protocol (one LocalPlatform per HeliosDeployment: `owner` is always its own)

    async def apply(self, owner: Owner, spec: HeliosSpec | None, actions: Sequence[PlatformAction]) -> None:
        """Execute actions in order; each is idempotent, as on the Kubernetes platform."""
        if spec is not None:
            self.spec = spec
        for action in actions:
            if isinstance(action, EnsureWorker):
                await self._ensure(action)
            elif isinstance(action, DeleteWorker):
                self._delete(action.name)
            elif isinstance(action, PointService):
                self._point(action.pool)
            elif isinstance(action, EmitEvent):
                self.record(action.type, action.reason, action.message)

    def record(self, type_: Literal["Normal", "Warning"], reason: str, message: str) -> None:
        event = LocalEvent(time.time(), type_, reason, message)
        self.events.append(event)
        if self._on_event is not None:
            self._on_event(event)

    async def _ensure(self, action: EnsureWorker) -> None:
        current = self._workers.get(action.name)
        same = replace(action, replicas=0, pool="", template="")
        if current is not None and replace(current.desired, replicas=0, pool="", template="") != same:
            self._delete(action.name)  # another model or depth under the same name: replace it
            current = None
        if current is None:
            current = LocalWorker(desired=action, created_at=time.time())
            self._workers[action.name] = current
        if current.desired.template != action.template:  # roll: new processes first, as maxUnavailable 0
            current.retiring += current.replicas
            current.replicas = []
        current.desired = action
        await self._scale(current)

    async def _scale(self, worker: LocalWorker) -> None:
        want = max(worker.desired.replicas, 0)
        while len(worker.replicas) > want:
            self._drain(worker.replicas.pop())
        if len(worker.replicas) < want and time.time() >= worker.next_start_at:
            for _ in range(want - len(worker.replicas)):
                worker.replicas.append(await self._start(worker.desired, len(worker.replicas)))

    async def _start(self, action: EnsureWorker, index: int) -> Replica:
        self._started += 1
        stem = f"{action.name}-{index}-{self._started}"
        port_file = self.log_dir / f"{stem}.port"
        port_file.unlink(missing_ok=True)
        # port 0 and a port file: the worker binds a free port and says which, so no port races
        args = worker_args(
            self.deployment, self.spec, action, model_path=action.model, host=LOOPBACK, port=0, port_file=str(port_file)
        )
        log_path = self.log_dir / f"{stem}.log"
        with log_path.open("ab") as log:
            process = await asyncio.create_subprocess_exec(
                *self._command(args),
                stdin=asyncio.subprocess.DEVNULL,
                stdout=log,
                stderr=asyncio.subprocess.STDOUT,
                env=self._env,
                start_new_session=True,  # a Ctrl-C in the terminal reaches the demo, which drains
            )
        return Replica(process, port_file, log_path, time.time())

    def _delete(self, name: str) -> None:
        worker = self._workers.pop(name, None)
        if worker is None:
            return
        for replica in worker.pods:
            self._drain(replica)
        self._sync_router()

    def _drain(self, replica: Replica) -> None:
        if replica.port:
            self.router.remove_member(replica.url)
        task = asyncio.get_running_loop().create_task(self._drain_replica(replica))
        self._draining.add(task)
        task.add_done_callback(self._draining.discard)

    async def _drain_replica(self, replica: Replica) -> None:
        """Stop routing to it, let the router's in-flight requests finish, SIGTERM, reap."""
        if replica.port:
            await self.router.wait_idle(replica.url, self._drain_timeout_s)
        proc = replica.process
        if proc.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                proc.send_signal(signal.SIGTERM)
            try:
                await asyncio.wait_for(proc.wait(), self._drain_timeout_s)
            except TimeoutError:
                with contextlib.suppress(ProcessLookupError):
                    proc.kill()
                await proc.wait()

    def _point(self, pool: str) -> None:
        self._service_pool = pool
        self._sync_router()
        self.router.point(pool)

    # -- observation ------------------------------------------------------------------------------

    async def write_status(self, owner: Owner, status: Status, version: str | None) -> str | None:
        self.status = status  # one writer, in memory: no race to lose
        return None

    async def fetch(self, owner: Owner) -> dict[str, Any] | None:
        return None  # never asked: write_status never conflicts

    async def observe(self, owner: Owner) -> Observed:
        """Probe every process (exit, /readyz), replace dead ones, and report what is ready."""
        for name, worker in self._workers.items():
            worker.retiring = [r for r in worker.retiring if r.process.returncode is None]
            for replica in list(worker.replicas):
                if replica.process.returncode is not None:
                    worker.replicas.remove(replica)
                    if replica.port:
                        self.router.remove_member(replica.url)
                    worker.restarts += 1
                    worker.next_start_at = time.time() + min(2.0**worker.restarts, MAX_RESTART_BACKOFF_S)
                    worker.last_exit = (
                        f"{name} (port {replica.port}) exited with {replica.process.returncode}: "
                        f"{log_tail(replica.log_path)}"
                    )
                    self.record("Warning", "WorkerExited", worker.last_exit)
        everyone = [r for w in self._workers.values() for r in w.pods]
        await asyncio.gather(*(self._probe_ready(r) for r in everyone))
        for worker in self._workers.values():
            await self._scale(worker)
            if worker.retiring and sum(r.ready for r in worker.replicas) >= worker.desired.replicas:
                for replica in worker.retiring:  # the new template serves: the old processes drain
                    self._drain(replica)
                worker.retiring = []
        self._sync_router()
        return Observed(
            workers=tuple(
                ObservedWorker(
                    name=name,
                    candidate=w.desired.candidate,
                    depth=w.desired.depth,
                    role=w.desired.role,
                    pool=w.desired.pool,
                    replicas=w.desired.replicas,
                    ready_replicas=sum(r.ready for r in w.pods),
                    created_at=w.created_at,
                    template=w.desired.template,
                )
                for name, w in self._workers.items()
            ),
            service_pool=self._service_pool,
        )

    async def _probe_ready(self, replica: Replica) -> None:
        if not replica.read_port():
            return
        try:
            resp = await self._probe.get(replica.url + "/readyz")
            replica.ready = resp.status_code == 200
        except httpx.HTTPError:
            replica.ready = False

    def _sync_router(self) -> None:
        """Each pool's members are the ready replicas of the workers in it (the Endpoints object)."""
        pools: dict[str, list[str]] = {}
        for w in self._workers.values():
            members = pools.setdefault(w.desired.pool, [])
            members.extend(r.url for r in w.pods if r.ready)
        for pool, members in pools.items():
            self.router.set_pool(pool, members)
        for pool in set(self._known_pools) - set(pools):
            self.router.set_pool(pool, [])
        self._known_pools = set(pools)

    def endpoints(self) -> dict[str, str]:
        """Ready replicas' base URLs -> their worker's name: what scrape_workers reads."""
        return {r.url: name for name, w in self._workers.items() for r in w.pods if r.ready}

    def resident_bytes(self) -> dict[str, int]:
        """Resident memory of each worker's processes, summed over replicas."""
        return {name: sum(read_rss_bytes(r.process.pid) for r in w.pods) for name, w in self._workers.items()}

    def crash_looping(self, restarts: int = 3) -> dict[str, str]:
        """Workers that exited this many times (name -> the last exit's log tail): CrashLoopBackOff."""
        return {name: w.last_exit for name, w in self._workers.items() if w.restarts >= restarts}

    @property
    def draining(self) -> int:
        return len(self._draining)

    # -- shutdown ---------------------------------------------------------------------------------

    async def close(self) -> None:
        """Drain and stop every worker (in-flight requests finish first), then wait for them."""
        for name in list(self._workers):
            self._delete(name)
        if self._draining:
            await asyncio.gather(*list(self._draining), return_exceptions=True)
        await self._probe.aclose()
