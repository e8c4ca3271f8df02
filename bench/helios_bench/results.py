"""What the bench produces: where HELIOS served, what serving the evaluation did, and the run's files."""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from helios_bench import report
from helios_bench.systems import Completion


@dataclass(frozen=True)
class BenchResult:
    data: dict[str, Any]  # what bench.json holds, without the ratios
    ratios: list[report.Ratio]
    table: str
    json_path: Path
    plot_path: Path
    results_md: Path | None  # the log the entry was appended to, if any


@dataclass(frozen=True)
class CandidateDepth:
    """Where the bench serves: a candidate at a depth (the operator's Placement also names a worker)."""

    candidate: str
    depth: int


@dataclass
class Served:
    """HELIOS serving the evaluation prompts: what it emitted, where, and how it adapted."""

    final: CandidateDepth
    completions: list[Completion]
    served_by: list[str]  # candidate that served each prompt
    adaptations: list[dict[str, Any]] = field(default_factory=list)
    breach_ratio: float = 0.0
    window_tokens: int = 0
    exit_layers: Counter[int] = field(default_factory=Counter)
