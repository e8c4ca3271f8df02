"""The demo's record of what happened, and the report built from it: report.json and report.png.

Kept apart from the demo's processes and display so the report is a pure function of the records
(tested without running anything) and the plot reads nothing but the report.
"""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from helios_operator.core.types import Decision, Placement

REPORT_VERSION = 1


@dataclass(frozen=True)
class RequestRecord:
    """One client request through the stable endpoint."""

    index: int  # order of completion
    phase: str
    kind: str  # easy | hard
    ok: bool
    status: int  # HTTP status (0: no answer at all)
    started: float
    finished: float
    tokens: int = 0
    candidate: str = ""
    depth: int = 0
    exit_layers: tuple[int, ...] = ()
    breaches: int = 0
    streamed: bool = False
    error: str = ""


@dataclass(frozen=True)
class DecisionRecord:
    """A policy decision, placed on the request axis (requests finished when it was made)."""

    decision: Decision
    request_index: int


@dataclass(frozen=True)
class SwitchRecord:
    """The stable endpoint moved from one placement to another."""

    time: float
    request_index: int
    before: Placement | None
    after: Placement


@dataclass(frozen=True)
class PhaseRecord:
    name: str
    kind: str
    started: float
    finished: float


@dataclass
class DemoRecord:
    """Everything the demo saw; the report is built from this alone."""

    started: float
    candidates: dict[str, dict[str, Any]] = field(default_factory=dict)  # name -> {model, layers}
    spec: dict[str, Any] = field(default_factory=dict)
    requests: list[RequestRecord] = field(default_factory=list)
    decisions: list[DecisionRecord] = field(default_factory=list)
    switches: list[SwitchRecord] = field(default_factory=list)
    phases: list[PhaseRecord] = field(default_factory=list)
    events: list[dict[str, Any]] = field(default_factory=list)
    peak_resident_bytes: dict[str, int] = field(default_factory=dict)  # worker -> peak RSS
    profiles: list[dict[str, Any]] = field(default_factory=list)
    final_status: dict[str, Any] = field(default_factory=dict)
    training_seconds: float = 0.0
    finished: float = 0.0

    def note_decisions(self, decisions: Sequence[Decision]) -> list[Decision]:
        """Keep decisions the bounded status history shows for the first time; return them."""
        seen = {_decision_key(d.decision) for d in self.decisions}
        new = [d for d in decisions if _decision_key(d) not in seen]
        self.decisions += [DecisionRecord(d, len(self.requests)) for d in new]
        return new

    def note_active(self, active: Placement | None, now: float) -> SwitchRecord | None:
        """Record a move of the stable endpoint; None when it still serves the same placement."""
        last = self.switches[-1].after if self.switches else None
        if active is None or (last is not None and _same(last, active)):
            return None
        record = SwitchRecord(now, len(self.requests), last, active)
        self.switches.append(record)
        return record


def _decision_key(d: Decision) -> tuple[str, str, str, int]:
    return (d.time, d.trigger, d.candidate, d.depth)


def _same(a: Placement, b: Placement) -> bool:
    return (a.candidate, a.depth, a.worker) == (b.candidate, b.depth, b.worker)


def _label(p: Placement | None) -> str | None:
    return None if p is None else f"{p.candidate}@{p.depth}"


def exit_distributions(requests: Sequence[RequestRecord]) -> dict[str, dict[str, int]]:
    """Per candidate: how many tokens exited at each layer (keys are layer numbers as strings)."""
    out: dict[str, Counter[int]] = {}
    for r in requests:
        if r.ok and r.candidate:
            out.setdefault(r.candidate, Counter()).update(r.exit_layers)
    return {c: {str(k): v for k, v in sorted(counts.items())} for c, counts in sorted(out.items())}


def phase_summary(record: DemoRecord) -> list[dict[str, Any]]:
    """Per phase: requests, failures, tokens, tokens/s over the phase's wall time, what served it."""
    rows = []
    for ph in record.phases:
        mine = [r for r in record.requests if r.phase == ph.name]
        ok = [r for r in mine if r.ok]
        seconds = max(ph.finished - ph.started, 1e-9)
        tokens = sum(r.tokens for r in ok)
        layers = [x for r in ok for x in r.exit_layers]
        served = Counter(f"{r.candidate}@{r.depth}" for r in ok if r.candidate)
        rows.append(
            {
                "phase": ph.name,
                "kind": ph.kind,
                "seconds": round(seconds, 2),
                "requests": len(mine),
                "failed": len(mine) - len(ok),
                "tokens": tokens,
                "tokensPerSecond": round(tokens / seconds, 2),
                "meanExitLayer": round(sum(layers) / len(layers), 3) if layers else None,
                "breaches": sum(r.breaches for r in ok),
                "servedBy": dict(served.most_common()),
                "meanLatencySeconds": round(sum(r.finished - r.started for r in ok) / len(ok), 4) if ok else None,
            }
        )
    return rows


def build_report(record: DemoRecord) -> dict[str, Any]:
    """report.json's content; `failedRequests` must be 0 for a demo that kept its promise."""
    failed = [r for r in record.requests if not r.ok]
    return {
        "version": REPORT_VERSION,
        "durationSeconds": round(record.finished - record.started, 2),
        "trainingSeconds": round(record.training_seconds, 2),
        "candidates": record.candidates,
        "spec": record.spec,
        "requestsServed": len(record.requests) - len(failed),
        "failedRequests": len(failed),
        "failures": [{"index": r.index, "phase": r.phase, "status": r.status, "error": r.error} for r in failed[:20]],
        "streamedRequests": sum(r.streamed for r in record.requests),
        "phases": phase_summary(record),
        "decisions": [{**d.decision.to_dict(), "requestIndex": d.request_index} for d in record.decisions],
        "switches": [
            {
                "time": round(s.time - record.started, 3),
                "requestIndex": s.request_index,
                "from": _label(s.before),
                "to": _label(s.after),
                "worker": s.after.worker,
            }
            for s in record.switches
        ],
        "exitLayerDistributions": exit_distributions(record.requests),
        "peakResidentBytes": record.peak_resident_bytes,
        "profiles": record.profiles,
        "events": record.events,
        "finalStatus": record.final_status,
        "timeline": [
            {"index": r.index, "phase": r.phase, "candidate": r.candidate, "depth": r.depth, "ok": r.ok}
            for r in record.requests
        ],
    }


def write_report(report: dict[str, Any], out: Path) -> tuple[Path, Path]:
    out.mkdir(parents=True, exist_ok=True)
    json_path = out / "report.json"
    json_path.write_text(json.dumps(report, indent=2) + "\n")
    png_path = out / "report.png"
    plot_report(report, png_path)
    return json_path, png_path


def plot_report(report: dict[str, Any], path: Path) -> None:
    """Exit-layer histograms per candidate (top) and the decision timeline over requests (bottom)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    dists: dict[str, dict[str, int]] = report["exitLayerDistributions"]
    names = sorted(report["candidates"]) or sorted(dists)
    colors = {name: plt.get_cmap("tab10")(i) for i, name in enumerate(names)}
    fig = plt.figure(figsize=(12, 7.5), constrained_layout=True)
    grid = fig.add_gridspec(2, max(len(names), 1), height_ratios=[1, 1.3])
    for i, name in enumerate(names):
        ax = fig.add_subplot(grid[0, i])
        counts = dists.get(name, {})
        layers = int(report["candidates"].get(name, {}).get("layers") or max(map(int, counts), default=1))
        xs = list(range(1, layers + 1))
        total = sum(counts.values()) or 1
        ax.bar(xs, [counts.get(str(x), 0) / total for x in xs], color=colors[name])
        ax.set_title(f"{name}: exit layer of {sum(counts.values())} tokens")
        ax.set_xlabel("exit layer")
        ax.set_ylabel("share of tokens")
        ax.set_xticks(xs)
    _plot_timeline(fig.add_subplot(grid[1, :]), report, colors)
    fig.suptitle(
        f"HELIOS demo: {report['requestsServed']} requests served, {report['failedRequests']} failed, "
        f"{len(report['switches'])} placements"
    )
    fig.savefig(path, dpi=100)
    plt.close(fig)


def _plot_timeline(ax: Any, report: dict[str, Any], colors: dict[str, Any]) -> None:
    timeline = report["timeline"]
    for name, color in colors.items():
        pts = [(t["index"], t["depth"]) for t in timeline if t["candidate"] == name and t["ok"]]
        if pts:
            ax.scatter(*zip(*pts, strict=True), s=8, color=color, label=f"served by {name}")
    bad = [t["index"] for t in timeline if not t["ok"]]
    if bad:
        ax.scatter(bad, [0] * len(bad), marker="x", color="red", label="failed")
    top = max([t["depth"] for t in timeline] + [1])
    for phase in report["phases"]:
        idx = [t["index"] for t in timeline if t["phase"] == phase["phase"]]
        if idx:
            ax.axvspan(min(idx), max(idx), alpha=0.08 if phase["kind"] == "easy" else 0.2, color="grey")
            ax.text((min(idx) + max(idx)) / 2, top + 1.6, phase["phase"], ha="center", fontsize=9)
    for i, d in enumerate(report["decisions"]):
        ax.axvline(d["requestIndex"], color="black", linestyle=":", linewidth=1)
        label = f"{d['trigger']}: {d['candidate']}@{d['depth']}" + ("" if d["applied"] else " (not applied)")
        ax.text(d["requestIndex"], top + 0.3 + (i % 3) * 0.45, label, fontsize=7, ha="left")  # staggered rows
    ax.set_ylim(-0.5, top + 2.4)
    ax.set_xlabel("request (in order of completion)")
    ax.set_ylabel("depth served (layers)")
    ax.set_title("decision timeline: which candidate and depth served each request")
    ax.legend(loc="lower right", fontsize=8)
