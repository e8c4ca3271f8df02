"""What the bench produces, typed: each phase's result, and the assembled run that bench.json holds.

The JSON keeps the shape it had as a dict: `BenchData.to_dict()` writes each field under its old key,
in the old order, so readers of bench.json (and `report`, which reads that dict) see no change.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Generic, TypeVar

from helios_bench import report
from helios_bench.device import DeviceInfo
from helios_bench.measure import DecodeBound, Latency, Sizes, Throughput
from helios_bench.options import BenchOptions
from helios_bench.systems import Completion
from helios_operator.core import policy
from helios_operator.core.types import CandidateProfile, Objective

T = TypeVar("T")


@dataclass(frozen=True)
class CandidateDepth:
    """Where the bench serves: a candidate at a depth (the operator's Placement also names a worker)."""

    candidate: str
    depth: int

    @property
    def label(self) -> str:
        return f"{self.candidate}@{self.depth}"


@dataclass(frozen=True)
class Adaptation:
    """One firing of the breach rule while serving: where it fired, why, and where serving moved (None: stayed)."""

    after_requests: int
    source: CandidateDepth
    breach_ratio: float
    reason: str
    target: CandidateDepth | None

    def to_dict(self) -> dict[str, Any]:
        return {
            "after_requests": self.after_requests,
            "from": asdict(self.source),
            "breach_ratio": self.breach_ratio,
            "reason": self.reason,
            "to": None if self.target is None else asdict(self.target),
        }


@dataclass
class Served:
    """HELIOS serving the evaluation prompts: what it emitted, where, and how it adapted."""

    final: CandidateDepth
    completions: list[Completion]
    served_by: list[str]  # candidate that served each prompt
    adaptations: list[Adaptation] = field(default_factory=list)
    breach_ratio: float = 0.0
    window_tokens: int = 0
    exit_layers: Counter[int] = field(default_factory=Counter)


@dataclass(frozen=True)
class Batches:
    """The largest batch a configuration fits in the memory budget, and the batch actually run."""

    max_batch: int
    run_batch: int
    capped: bool  # --max-run-batch held the run below max_batch
    budget_bytes: int


@dataclass(frozen=True)
class Memory:
    resident_weight_bytes: int
    kv_cache_bytes: int
    total_bytes: int
    peak_allocated_bytes: int | None  # the allocator's peak during the throughput run; CUDA only


@dataclass(frozen=True)
class Capacity:
    """A configuration at the largest batch its budget holds: everything but the run at a fixed rate."""

    throughput: Throughput
    max_batch: Batches
    memory: Memory
    bandwidth: dict[str, DecodeBound]  # by batch size, as the JSON keys it
    sizes: Sizes


@dataclass(frozen=True)
class Measured:
    """One configuration measured; the latency run comes apart because the static capacity sets its rate."""

    capacity: Capacity
    latency: Latency


@dataclass(frozen=True)
class Measurements:
    """The measure phase: both baselines, HELIOS at each placement serving ended on, and the rate run's load."""

    static: Measured
    generate: Measured
    generate_outputs: list[Completion]  # plain generate on the evaluation prompts, scored for accuracy
    helios: dict[CandidateDepth, Measured]
    rate: float  # requests/s of the latency runs
    arrivals: list[float]


@dataclass(frozen=True)
class Accuracy:
    """Tokens against the serving candidate's full model (what the floor bounds) and against the largest."""

    agreement: float  # teacher-forced, ties within the tolerance agreed
    strict_agreement: float  # teacher-forced, only the very token agreed (no tie tolerance)
    agreement_ci95: tuple[float, float]
    floor_met: bool
    agreement_with_largest: float
    free_running_agreement: float
    sequence_agreement: float
    exact_match: float
    exact_match_easy: float
    exact_match_hard: float
    requests: int
    tokens: int


@dataclass(frozen=True)
class Trio(Generic[T]):
    """One figure per configuration, in the JSON's order."""

    static: T
    generate: T
    helios: T


@dataclass(frozen=True)
class LatencySection(Trio[Latency]):
    rate_rps: float
    requests: int


@dataclass(frozen=True)
class Energy:
    joules: float | None
    tokens_per_joule: float | None


@dataclass(frozen=True)
class EnergySection:
    available: bool
    reason: str | None  # why not, where unavailable
    static: Energy
    generate: Energy
    helios: Energy


@dataclass(frozen=True)
class AccuracySection:
    floor: float
    prompts: int
    tie_tolerance: float
    helios: Accuracy
    static: Accuracy
    generate: Accuracy
    helios_by_placement: dict[str, Accuracy]  # by the label of the placement serving started at


@dataclass(frozen=True)
class BandwidthSection:
    bytes_per_second: float
    batches: dict[str, Trio[DecodeBound]]


@dataclass(frozen=True)
class Sections:
    throughput: Trio[Throughput]
    max_batch: Trio[Batches]
    memory: Trio[Memory]
    latency: LatencySection
    energy: EnergySection
    accuracy: AccuracySection
    bandwidth: BandwidthSection


@dataclass(frozen=True)
class Meta:
    """The run's circumstances; command, quick, seed and max_new_tokens are read from the options."""

    date: str
    device: DeviceInfo
    presets: tuple[str, ...]
    largest: str
    dtype: str
    context_tokens: int
    memory_budget_bytes: int
    bandwidth_bytes_per_second: float
    options: BenchOptions

    def to_dict(self) -> dict[str, Any]:
        o = self.options
        return {
            "date": self.date,
            "device": self.device.to_dict(),
            "command": o.command,
            "presets": list(self.presets),
            "largest": self.largest,
            "dtype": self.dtype,
            "quick": o.quick,
            "seed": o.seed,
            "context_tokens": self.context_tokens,
            "max_new_tokens": o.max_new_tokens,
            "memory_budget_bytes": self.memory_budget_bytes,
            "bandwidth_bytes_per_second": self.bandwidth_bytes_per_second,
            "options": {k: (str(v) if isinstance(v, Path) else v) for k, v in asdict(o).items()},
        }


@dataclass(frozen=True)
class ModelEntry:
    path: Path
    layers: int
    sizes: Sizes  # at full depth

    def to_dict(self) -> dict[str, Any]:
        return {"path": str(self.path), "layers": self.layers, **asdict(self.sizes)}


@dataclass(frozen=True)
class Chosen:
    """The policy's choice for one objective, and the placement serving ended on from there."""

    choice: policy.Choice
    final: CandidateDepth

    def to_dict(self) -> dict[str, Any]:
        c = self.choice
        return {
            "candidate": c.candidate,
            "depth": c.depth,
            "model_layers": c.model_layers,
            "accuracy": c.accuracy,
            "reason": c.reason,
            "final": asdict(self.final),
        }


@dataclass(frozen=True)
class HeliosRun:
    """What HELIOS did: the choices, the placement the table reports, adaptations and exits while serving."""

    choices: dict[Objective, Chosen]
    final: CandidateDepth
    model_layers: int  # of the final placement's candidate
    adaptations: list[Adaptation]
    breach_ratio: float
    window_tokens: int
    exit_layers: dict[str, int]  # tokens per exit layer, by layer in order
    first_confident: tuple[float, ...]  # the final candidate's profile

    def to_dict(self) -> dict[str, Any]:
        return {
            "choices": {obj: c.to_dict() for obj, c in self.choices.items()},
            "final": {**asdict(self.final), "model_layers": self.model_layers},
            "adaptations": [a.to_dict() for a in self.adaptations],
            "breach_ratio": self.breach_ratio,
            "window_tokens": self.window_tokens,
            "exit_layers": dict(self.exit_layers),
            "first_confident": list(self.first_confident),
        }


@dataclass(frozen=True)
class BenchData:
    """The assembled run: what bench.json holds, less the ratios."""

    meta: Meta
    models: dict[str, ModelEntry]
    profiles: tuple[CandidateProfile, ...]
    helios: HeliosRun
    configs: dict[str, str]  # what each configuration is, in words
    sections: Sections

    def to_dict(self) -> dict[str, Any]:
        return {
            "meta": self.meta.to_dict(),
            "models": {name: m.to_dict() for name, m in self.models.items()},
            "profiles": [p.to_dict() for p in self.profiles],
            "helios": self.helios.to_dict(),
            "configs": dict(self.configs),
            "sections": asdict(self.sections),
        }


@dataclass(frozen=True)
class BenchResult:
    data: BenchData
    ratios: list[report.Ratio]
    table: str
    json_path: Path
    plot_path: Path
    results_md: Path | None  # the log the entry was appended to, if any
