"""`helios demo`: the whole loop on one machine, with no cluster and no GPU.

It builds (or reuses) the project's own early-exit models, starts the router that stands in for the
stable Service, lets the operator's own reconcile step drive worker processes through the local
platform, and plays a workload whose character shifts (easy prompts, hard ones, easy again) through
the router. A live display shows what the loop does; at the end a summary table is printed and
DIR/report.json and DIR/report.png are written (see report.py).

A phase of the workload ends once the loop has acted on it (a decision made since the phase began
and nothing in flight) and it ran its minimum time, or at its maximum time: the demo is as short as
the loop is quick, and never waits forever.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import signal
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import httpx

from helios_local.demo.display import Display, LiveState
from helios_local.demo.report import (
    DemoRecord,
    PhaseRecord,
    RequestRecord,
    build_report,
    write_report,
)
from helios_local.platform import CommandBuilder, LocalEvent, LocalPlatform, worker_command
from helios_local.prometheus import LocalPrometheus
from helios_local.router import Router
from helios_local.runner import LocalRunner, Tick, scrape_telemetry
from helios_operator.core.types import (
    ExitSpec,
    HeliosSpec,
    ProfilingSpec,
    ReassessmentSpec,
    RolloutSpec,
    WorkerSpec,
)

DEPLOYMENT = "demo"
SETTLED_PHASES = ("Serving",)
WORKER_ENV = {
    # Two cores are shared by every worker and the demo itself: one thread each avoids thrashing.
    "OMP_NUM_THREADS": "1",
    "MKL_NUM_THREADS": "1",
    "TOKENIZERS_PARALLELISM": "false",
}


@dataclass(frozen=True)
class WorkloadPhase:
    name: str
    kind: str  # easy | hard: which prompts helios_worker.models.tasks generates
    min_seconds: float
    max_seconds: float


DEFAULT_PHASES = (
    WorkloadPhase("easy", "easy", 20.0, 75.0),
    WorkloadPhase("hard", "hard", 20.0, 75.0),
    WorkloadPhase("easy again", "easy", 20.0, 90.0),
)


@dataclass(frozen=True)
class DemoOptions:
    out: Path = Path("helios-demo")
    presets: tuple[str, ...] = ("micro", "tiny")  # candidates, trained (cached) by the project
    models: tuple[Path, ...] = ()  # use these model directories instead of the presets
    seed: int = 0
    train_steps: int | None = None  # override the presets' training steps (a quicker, weaker model)
    phases: tuple[WorkloadPhase, ...] = DEFAULT_PHASES
    concurrency: int = 4
    stream_every: int = 3  # every n-th request is streamed (SSE), to show streams survive switches
    max_tokens: int = 10
    objective: str = "throughput"
    accuracy_floor: float = 0.9
    confidence_threshold: float = 0.9
    breach_window: int = 32
    breach_limit: int = 12
    profiling_requests: int = 4
    reassess_every: int = 60
    max_batch: int = 16
    tick_seconds: float = 0.5
    prometheus: bool = False  # read telemetry through a local Prometheus (the operator's PromQL path)
    live: bool | None = None  # None: a live display when stdout is a terminal, plain lines otherwise
    worker_command: CommandBuilder = worker_command
    log: Callable[[str], None] | None = None  # plain-line sink (default: print)


@dataclass(frozen=True)
class DemoReport:
    report: dict[str, Any]
    json_path: Path
    png_path: Path

    @property
    def failed_requests(self) -> int:
        return int(self.report["failedRequests"])


# ---------------------------------------------------------------------------------------------
# Models and spec


def prepare_models(options: DemoOptions, log: Callable[[str], None]) -> dict[str, Path]:
    """Candidate name -> model directory: the given ones, or the presets trained once and cached."""
    if options.models:
        names = [candidate_name(path) for path in options.models]
        if len(set(names)) != len(names):
            names = [path.name for path in options.models]
        return dict(zip(names, options.models, strict=True))
    from helios_worker.models.cache import train_preset

    models = {}
    for preset in options.presets:
        log(f"model {preset}: training or reusing the cached early-exit model")
        models[preset] = train_preset(preset, options.seed, steps=options.train_steps, log=log)
    return models


def candidate_name(model_dir: Path) -> str:
    """The preset a cached model was trained from (helios.json), else the directory's name."""
    try:
        return str(json.loads((model_dir / "helios.json").read_text())["preset"])
    except (OSError, ValueError, KeyError):
        return model_dir.name


def model_layers(model_dir: Path) -> int:
    config = json.loads((model_dir / "config.json").read_text())
    return int(config["num_hidden_layers"])


def demo_spec(models: dict[str, Path], options: DemoOptions) -> HeliosSpec:
    """A spec with small counts, so the loop visibly acts within a few minutes on two cores."""
    spec = HeliosSpec.from_dict(
        {
            "candidates": [{"name": n, "model": str(p), "layers": model_layers(p)} for n, p in models.items()],
            "objective": options.objective,
            "accuracyFloor": options.accuracy_floor,
        }
    )
    return replace(
        spec,
        exit=ExitSpec(options.confidence_threshold, options.breach_window, options.breach_limit),
        profiling=ProfilingSpec(requests_per_candidate=options.profiling_requests, timeout_seconds=120),
        reassessment=ReassessmentSpec(every_requests=options.reassess_every),
        rollout=RolloutSpec(ready_timeout_seconds=120),
        worker=WorkerSpec(max_batch=options.max_batch),
    )


# ---------------------------------------------------------------------------------------------
# The run


class DemoRun:
    """One demo: the loop, the platform, the router and the clients in one event loop."""

    def __init__(self, options: DemoOptions, models: dict[str, Path], display: Display, record: DemoRecord) -> None:
        self.options = options
        self.models = models
        self.spec = demo_spec(models, options)
        self.display = display
        self.state = display.state
        self.record = record
        self.router = Router(retry_seconds=60.0)
        self.platform = LocalPlatform(
            DEPLOYMENT,
            self.spec,
            self.router,
            options.out / "logs",
            command=options.worker_command,
            env=WORKER_ENV,
            on_event=self._on_event,
        )
        self.prometheus = LocalPrometheus(options.out / "prometheus") if options.prometheus else None
        self.runner = LocalRunner(
            DEPLOYMENT,
            self.spec,
            self.platform,
            telemetry=self.prometheus.source(DEPLOYMENT) if self.prometheus else scrape_telemetry,
            interval_s=options.tick_seconds,
            on_tick=self._on_tick,
        )
        self._phase_started_decisions = 0
        self._next = 0

    def _on_event(self, event: LocalEvent) -> None:
        self.record.events.append(
            {
                "time": round(event.time - self.record.started, 3),
                "type": event.type,
                "reason": event.reason,
                "message": event.message,
                "requestIndex": len(self.record.requests),
            }
        )
        mark = "!" if event.type == "Warning" else "·"
        self.display.say(f"{mark} {event.reason}: {event.message}")

    def _on_tick(self, tick: Tick) -> None:
        status = tick.result.status
        for d in self.record.note_decisions(status.decisions):
            self.state.reason = f"{d.trigger}: {d.candidate}@{d.depth}: {d.reason}"
        switch = self.record.note_active(status.active, tick.time)
        if switch is not None:
            before = f"{switch.before.candidate}@{switch.before.depth}" if switch.before else "profiling pool"
            self.display.say(f"» switched {before} -> {switch.after.candidate}@{switch.after.depth}")
        self.state.loop_phase = status.phase
        snapshot = tick.telemetry
        self.state.telemetry = "ok" if snapshot.available else f"{snapshot.reason} ({snapshot.message})"
        self.state.active = f"{status.active.candidate}@{status.active.depth}" if status.active else "profiling pool"
        self.state.target = f"{status.target.candidate}@{status.target.depth}" if status.target else "-"
        worker = tick.telemetry.worker(status.active.worker) if status.active else None
        self.state.breach_ratio = worker.breach_ratio if worker else None
        rss = self.platform.resident_bytes()
        self.state.resident_bytes = sum(rss.values())
        self.state.workers = [
            (w.name, w.role, f"{w.ready_replicas}/{w.replicas}", f"{rss.get(w.name, 0) / 2**20:.0f} MiB")
            for w in tick.observed.workers
        ]
        for name, value in rss.items():
            self.record.peak_resident_bytes[name] = max(value, self.record.peak_resident_bytes.get(name, 0))
        if status.profiles:
            self.record.profiles = [p.to_dict() for p in status.profiles]
        self.record.final_status = status.to_dict()
        self.display.heartbeat(time.time())

    async def run(self) -> None:
        main = asyncio.current_task()
        if main is not None:  # SIGTERM ends the demo like Ctrl-C does: through the finally below
            with contextlib.suppress(NotImplementedError, RuntimeError):
                asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, main.cancel)
        if self.prometheus is not None:
            await self.prometheus.start()
            self.display.say(f"· telemetry through a local Prometheus at {self.prometheus.url}")
        await self.router.start()
        stop_loop = asyncio.Event()
        loop_task = asyncio.create_task(self.runner.run(stop_loop))
        try:
            async with httpx.AsyncClient(base_url=self.router.url, timeout=120.0) as client:
                await self._wait_ready(client, loop_task)
                for phase in self.options.phases:
                    await self._play(client, phase, loop_task)
        finally:
            stop_loop.set()
            await asyncio.gather(loop_task, return_exceptions=True)
            await self.platform.close()
            await self.router.close()
            if self.prometheus is not None:
                await self.prometheus.close()

    def _check(self, loop_task: asyncio.Task[None]) -> None:
        """Stop the demo early, with the reason, when the loop crashed or a worker cannot start."""
        if loop_task.done():
            loop_task.result()  # raises the loop's error
        broken = self.platform.crash_looping()
        if broken:
            name, why = next(iter(broken.items()))
            raise RuntimeError(f"worker {name} keeps exiting; logs in {self.platform.log_dir}. Last: {why}")

    async def _wait_ready(self, client: httpx.AsyncClient, loop_task: asyncio.Task[None], timeout: float = 180) -> None:
        """The stable endpoint answers once the first profiling workers are Ready."""
        self.state.phase = "starting workers"
        deadline = time.monotonic() + timeout
        while (await client.get("/readyz")).status_code != 200:
            self._check(loop_task)
            if time.monotonic() > deadline:
                raise RuntimeError(f"no worker became ready within {timeout:.0f}s; see {self.platform.log_dir}")
            await asyncio.sleep(0.2)

    async def _play(self, client: httpx.AsyncClient, phase: WorkloadPhase, loop_task: asyncio.Task[None]) -> None:
        from helios_worker.models.tasks import workload_prompts

        self.state.phase = f"{phase.name} ({phase.kind} prompts)"
        self.state.phase_index = len(self.record.phases) + 1
        self.state.phase_count = len(self.options.phases)
        self.state.phase_started = time.time()
        self.display.say(f"▶ workload phase '{phase.name}': {phase.kind} prompts")
        prompts = workload_prompts(phase.kind, 200, seed=self.options.seed + len(self.record.phases))  # type: ignore[arg-type]
        decisions_before = len(self.record.decisions)
        started = time.time()
        stop = asyncio.Event()
        clients = [
            asyncio.create_task(self._client(client, phase, prompts, i, stop)) for i in range(self.options.concurrency)
        ]
        try:
            while True:
                await asyncio.sleep(0.25)
                self._check(loop_task)
                elapsed = time.time() - started
                acted = len(self.record.decisions) > decisions_before and self.state.loop_phase in SETTLED_PHASES
                if elapsed >= phase.max_seconds or (elapsed >= phase.min_seconds and acted):
                    break
            stop.set()
            await asyncio.gather(*clients)
        finally:  # interrupted or failed: the clients stop before the router and workers go away
            for task in clients:
                task.cancel()
            await asyncio.gather(*clients, return_exceptions=True)
        self.record.phases.append(PhaseRecord(phase.name, phase.kind, started, time.time()))

    async def _client(
        self, client: httpx.AsyncClient, phase: WorkloadPhase, prompts: Sequence[str], worker: int, stop: asyncio.Event
    ) -> None:
        i = worker
        while not stop.is_set():
            prompt = prompts[i % len(prompts)]
            i += self.options.concurrency
            self._next += 1
            stream = self.options.stream_every > 0 and self._next % self.options.stream_every == 0
            rec = await self._request(client, phase, prompt, stream)
            self.record.requests.append(replace(rec, index=len(self.record.requests)))
            if rec.ok:
                self.state.ok += 1
                self.state.recent_tokens.append((rec.finished, rec.tokens))
            else:
                self.state.failed += 1
                self.display.say(f"! request failed ({rec.status}): {rec.error}")

    async def _request(
        self, client: httpx.AsyncClient, phase: WorkloadPhase, prompt: str, stream: bool
    ) -> RequestRecord:
        body = {"prompt": prompt, "max_tokens": self.options.max_tokens, "temperature": 0.0, "stream": stream}
        started = time.time()
        base = RequestRecord(0, phase.name, phase.kind, False, 0, started, started, streamed=stream)
        try:
            if stream:
                return await _streamed(client, body, base)
            resp = await client.post("/v1/completions", json=body)
            if resp.status_code != 200:
                return replace(base, status=resp.status_code, finished=time.time(), error=resp.text[:200])
            payload = resp.json()
            info = payload["choices"][0]["helios"]
            return replace(
                base,
                ok=True,
                status=200,
                finished=time.time(),
                tokens=len(info["exit_layers"]),
                candidate=info["candidate"],
                depth=int(info["depth"]),
                exit_layers=tuple(int(x) for x in info["exit_layers"]),
                breaches=int(info["breaches"]),
            )
        except (httpx.HTTPError, ValueError, KeyError, IndexError) as err:
            return replace(base, finished=time.time(), error=f"{type(err).__name__}: {err}")


async def _streamed(client: httpx.AsyncClient, body: dict[str, Any], base: RequestRecord) -> RequestRecord:
    """A streamed completion: every chunk carries its token's exit layer; an error event is a failure."""
    layers: list[int] = []
    breaches = 0
    candidate, depth, done = "", 0, False
    async with client.stream("POST", "/v1/completions", json=body) as resp:
        if resp.status_code != 200:
            text = (await resp.aread()).decode(errors="replace")
            return replace(base, status=resp.status_code, finished=time.time(), error=text[:200])
        async for line in resp.aiter_lines():
            if not line.startswith("data: "):
                continue
            data = line[6:]
            if data == "[DONE]":
                done = True
                break
            chunk = json.loads(data)
            if "error" in chunk:
                return replace(base, status=502, finished=time.time(), error=str(chunk["error"])[:200])
            for choice in chunk.get("choices", []):
                info = choice.get("helios") or {}
                layers += [int(x) for x in info.get("exit_layers", [])]
                breaches += int(info.get("breaches", 0))
                candidate = info.get("candidate", candidate)
                depth = int(info.get("depth", depth))
    if not done:
        return replace(base, status=200, finished=time.time(), error="the stream ended without [DONE]")
    return replace(
        base,
        ok=True,
        status=200,
        finished=time.time(),
        tokens=len(layers),
        candidate=candidate,
        depth=depth,
        exit_layers=tuple(layers),
        breaches=breaches,
    )


# ---------------------------------------------------------------------------------------------
# Entry points


def run_demo(options: DemoOptions) -> DemoReport:
    """Run the demo end to end and write DIR/report.json and DIR/report.png."""
    log = options.log or (lambda line: print(line, flush=True))
    live = sys.stdout.isatty() if options.live is None else options.live
    started = time.time()
    models = prepare_models(options, log)
    record = DemoRecord(started=started, training_seconds=time.time() - started)
    for name, path in models.items():
        record.candidates[name] = {"model": str(path), "layers": model_layers(path)}
    state = LiveState(started=started)
    with Display(state, live, log) as display:
        run = DemoRun(options, models, display, record)
        record.spec = {**_spec_summary(run.spec), "telemetry": "prometheus" if options.prometheus else "scrape"}
        try:
            asyncio.run(run.run())
        except asyncio.CancelledError:  # SIGTERM: the workers were drained on the way out
            log("interrupted: every worker was stopped; no report written")
            raise SystemExit(128 + signal.SIGTERM) from None
    record.finished = time.time()
    report = build_report(record)
    json_path, png_path = write_report(report, options.out)
    print_summary(report, live, log)
    log(f"wrote {json_path} and {png_path}")
    return DemoReport(report, json_path, png_path)


def _spec_summary(spec: HeliosSpec) -> dict[str, Any]:
    return {
        "objective": spec.objective,
        "accuracyFloor": spec.accuracy_floor,
        "confidenceThreshold": spec.exit.confidence_threshold,
        "breachWindow": spec.exit.breach_window,
        "breachLimit": spec.exit.breach_limit,
        "profilingRequestsPerCandidate": spec.profiling.requests_per_candidate,
        "reassessEveryRequests": spec.reassessment.every_requests,
    }


def print_summary(report: dict[str, Any], rich_output: bool, log: Callable[[str], None]) -> None:
    """The closing table: per phase, what served it and how fast; then the decisions."""
    header = ("phase", "kind", "s", "requests", "failed", "tokens/s", "mean exit", "served by")
    rows = [
        (
            p["phase"],
            p["kind"],
            f"{p['seconds']:.0f}",
            str(p["requests"]),
            str(p["failed"]),
            f"{p['tokensPerSecond']:.0f}",
            "-" if p["meanExitLayer"] is None else f"{p['meanExitLayer']:.2f}",
            ", ".join(f"{k} ×{v}" for k, v in p["servedBy"].items()),
        )
        for p in report["phases"]
    ]
    decisions = [f"{d['trigger']}: {d['candidate']}@{d['depth']} — {d['reason']}" for d in report["decisions"]]
    totals = (
        f"{report['requestsServed']} requests served, {report['failedRequests']} failed, "
        f"{len(report['switches'])} placements, {report['durationSeconds']:.0f}s"
    )
    if rich_output:
        from rich.console import Console
        from rich.table import Table

        table = Table(title="HELIOS demo summary", caption=totals)
        for h in header:
            table.add_column(h)
        for row in rows:
            table.add_row(*row)
        console = Console()
        console.print(table)
        for line in decisions:
            console.print(f"  {line}")
        return
    log(" | ".join(header))
    for row in rows:
        log(" | ".join(row))
    for line in decisions:
        log(f"  {line}")
    log(totals)


def add_demo_arguments(parser: argparse.ArgumentParser) -> None:
    """The `helios demo` flags."""
    d = DemoOptions()
    add = parser.add_argument
    add("--out", type=Path, default=d.out, help="directory for report.json, report.png and worker logs")
    add("--preset", dest="presets", action="append", help="candidate model preset (repeatable; default micro, tiny)")
    add("--model", dest="models", action="append", type=Path, help="use this model directory as a candidate")
    add("--seed", type=int, default=d.seed, help="training and workload seed")
    add("--objective", choices=("throughput", "latency", "energy"), default=d.objective, help="what the loop optimises")
    add("--accuracy-floor", type=float, default=d.accuracy_floor, help="minimum agreement with the full model")
    add("--concurrency", type=int, default=d.concurrency, help="concurrent clients")
    add("--phase-seconds", type=float, nargs=2, metavar=("MIN", "MAX"), help="each workload phase's min and max")
    add("--plain", action="store_true", help="plain lines instead of the live display")
    add(
        "--prometheus",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="read telemetry through a local Prometheus (default: when the prometheus binary is installed)",
    )


def demo_options_from_args(ns: argparse.Namespace) -> DemoOptions:
    phases: tuple[WorkloadPhase, ...] = DEFAULT_PHASES
    if ns.phase_seconds:
        lo, hi = ns.phase_seconds
        phases = tuple(replace(p, min_seconds=lo, max_seconds=hi) for p in phases)
    return DemoOptions(
        out=ns.out,
        presets=tuple(ns.presets) if ns.presets else DemoOptions.presets,
        models=tuple(ns.models or ()),
        seed=ns.seed,
        objective=ns.objective,
        accuracy_floor=ns.accuracy_floor,
        concurrency=ns.concurrency,
        phases=phases,
        live=False if ns.plain else None,
        prometheus=LocalPrometheus.available() if ns.prometheus is None else ns.prometheus,
    )
