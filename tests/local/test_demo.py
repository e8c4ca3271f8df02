"""`helios demo`: the report built from what happened, and a short demo end to end on real models."""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import pytest

from helios_local.demo.report import (
    DemoRecord,
    PhaseRecord,
    RequestRecord,
    build_report,
    write_report,
)
from helios_local.demo.run import (
    DemoOptions,
    WorkloadPhase,
    add_demo_arguments,
    demo_options_from_args,
    run_demo,
)
from helios_operator.core.types import Decision, Placement

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def _req(index: int, phase: str, candidate: str, depth: int, layers: tuple[int, ...], ok: bool = True) -> RequestRecord:
    return RequestRecord(
        index,
        phase,
        "easy",
        ok,
        200 if ok else 502,
        100.0 + index,
        100.5 + index,
        len(layers) if ok else 0,
        candidate,
        depth,
        layers,
        0,
    )


def _record() -> DemoRecord:
    rec = DemoRecord(started=100.0, finished=130.0)
    rec.candidates = {"tiny": {"model": "/m/tiny", "layers": 6}, "small": {"model": "/m/small", "layers": 10}}
    rec.requests = [
        _req(0, "easy", "tiny", 6, (1, 1, 2)),
        _req(1, "easy", "tiny", 2, (1, 2)),
        _req(2, "hard", "small", 10, (4, 10, 10)),
        _req(3, "hard", "", 0, (), ok=False),
    ]
    rec.phases = [PhaseRecord("easy", "easy", 100.0, 110.0), PhaseRecord("hard", "hard", 110.0, 130.0)]
    return rec


def test_the_report_counts_served_and_failed_requests_and_exit_layers_per_candidate() -> None:
    report = build_report(_record())
    assert report["requestsServed"] == 3 and report["failedRequests"] == 1
    assert report["failures"][0]["status"] == 502
    assert report["exitLayerDistributions"] == {"small": {"4": 1, "10": 2}, "tiny": {"1": 3, "2": 2}}
    easy, hard = report["phases"]
    assert easy["tokens"] == 5 and easy["tokensPerSecond"] == 0.5 and easy["servedBy"] == {"tiny@6": 1, "tiny@2": 1}
    assert easy["meanExitLayer"] == pytest.approx(7 / 5)
    assert hard["failed"] == 1 and hard["requests"] == 2 and hard["tokensPerSecond"] == pytest.approx(3 / 20)


def test_decisions_and_switches_are_placed_on_the_request_axis() -> None:
    rec = _record()
    d1 = Decision("2026-01-01T00:00:01Z", "profiling", "tiny", 2, "cheapest above the floor", True)
    d2 = Decision("2026-01-01T00:00:09Z", "breach", "small", 10, "62% breaches", True)
    assert rec.note_decisions([d1]) == [d1]
    assert rec.note_decisions([d1, d2]) == [d2]  # the bounded status history repeats old ones
    first = rec.note_active(Placement("tiny", 2, "demo-tiny-l2"), 105.0)
    assert first is not None and first.before is None and first.request_index == 4
    assert rec.note_active(Placement("tiny", 2, "demo-tiny-l2"), 106.0) is None
    second = rec.note_active(Placement("small", 10, "demo-small-l10"), 107.0)
    assert second is not None and second.before == first.after
    report = build_report(rec)
    assert [d["requestIndex"] for d in report["decisions"]] == [4, 4]
    assert [(s["from"], s["to"]) for s in report["switches"]] == [(None, "tiny@2"), ("tiny@2", "small@10")]


def test_the_report_is_written_as_json_and_a_png_plot(tmp_path: Path) -> None:
    rec = _record()
    rec.note_decisions([Decision("2026-01-01T00:00:01Z", "profiling", "tiny", 2, "why", True)])
    json_path, png_path = write_report(build_report(rec), tmp_path / "out")
    assert json.loads(json_path.read_text())["failedRequests"] == 1
    assert png_path.read_bytes()[:8] == PNG_MAGIC and png_path.stat().st_size > 10_000


def test_command_line_flags_become_demo_options() -> None:
    parser = argparse.ArgumentParser()
    add_demo_arguments(parser)
    ns = parser.parse_args(["--out", "/tmp/x", "--preset", "tiny", "--phase-seconds", "5", "9", "--plain"])
    options = demo_options_from_args(ns)
    assert options.out == Path("/tmp/x") and options.presets == ("tiny",) and options.live is False
    assert [(p.min_seconds, p.max_seconds) for p in options.phases] == [(5, 9)] * 3
    assert demo_options_from_args(parser.parse_args([])).presets == ("micro", "tiny")


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_a_short_demo_adapts_to_the_workload_and_drops_no_request(
    micro_model_dir: Path, tiny_model_dir: Path, tmp_path: Path
) -> None:
    """Real worker processes, the operator's own step, easy -> hard -> easy prompts through the router."""
    phases = (
        WorkloadPhase("easy", "easy", 5.0, 60.0),
        WorkloadPhase("hard", "hard", 5.0, 60.0),
        WorkloadPhase("easy again", "easy", 5.0, 60.0),
    )
    lines: list[str] = []
    started = time.monotonic()
    result = run_demo(
        DemoOptions(
            out=tmp_path / "demo",
            models=(micro_model_dir, tiny_model_dir),
            phases=phases,
            live=False,
            log=lines.append,
        )
    )
    elapsed = time.monotonic() - started
    report = json.loads((tmp_path / "demo" / "report.json").read_text())
    assert report == json.loads(json.dumps(result.report))
    assert report["failedRequests"] == 0, report["failures"]
    assert report["requestsServed"] > 30
    assert {d["trigger"] for d in report["decisions"]} >= {"profiling"}
    assert len(report["switches"]) >= 2, report["switches"]  # the first placement, then at least one move
    assert report["switches"][0]["from"] is None
    assert [p["phase"] for p in report["phases"]] == ["easy", "hard", "easy again"]
    assert all(p["tokensPerSecond"] > 0 for p in report["phases"])
    served = set(report["exitLayerDistributions"])
    assert served and served <= {"micro", "tiny"}
    assert report["streamedRequests"] > 0
    png = (tmp_path / "demo" / "report.png").read_bytes()
    assert png[:8] == PNG_MAGIC
    assert any("Switched" in line for line in lines)
    assert elapsed < 300
