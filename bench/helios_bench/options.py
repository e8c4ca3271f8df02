"""The bench's options: one typed object, built from the command line or directly by tests."""

from __future__ import annotations

import argparse
import shlex
import sys
from dataclasses import dataclass, field, replace
from pathlib import Path

from helios_operator.core.types import OBJECTIVES, Objective

DEFAULT_RESULTS_MD = Path("bench/RESULTS.md")  # relative to where the command runs: the repository root
CPU_PRESETS = ("micro", "tiny")
GPU_PRESETS = ("medium", "large")


@dataclass(frozen=True)
class BenchOptions:
    device: str = "auto"  # auto | cpu | cuda
    presets: tuple[str, ...] = ()  # empty: micro,tiny on CPU; medium,large on CUDA
    out: Path = Path("bench/out")
    quick: bool = False  # CI: few prompts, short outputs, small batches
    batches: tuple[int, ...] = (1, 64)  # batch sizes for the bandwidth-bound fractions
    max_new_tokens: int = 24
    results_md: Path | None = DEFAULT_RESULTS_MD  # None: append nowhere
    seed: int = 0
    objectives: tuple[Objective, ...] = OBJECTIVES
    accuracy_floor: float = 0.98
    confidence_threshold: float = 0.9
    breach_window: int = 100
    breach_limit: int = 50
    prompts: int = 64  # evaluation prompts (half easy, half hard)
    profile_requests: int = 40  # per candidate, at full depth; the task answers are short, so 40 give ~400 tokens
    latency_requests: int = 48  # requests played at a fixed rate
    rate: float | None = None  # requests/s for the latency run; None: 0.8 x the static baseline's capacity
    memory_budget_bytes: int | None = None  # None: the static baseline's weights + KV for budget_batch rows
    budget_batch: int = 64  # rows of full context the static baseline fits in the default budget (quick: 8)
    max_run_batch: int = 1024  # the largest batch actually run for throughput (memory may allow more)
    cpu_threads: int = 1  # torch intra-op threads on CPU: on a loaded machine more threads spin and distort timings
    train_steps: int | None = None  # None: each preset's own step count
    dtype: str | None = None  # None: float32 on CPU, bfloat16 on CUDA
    bandwidth_probe_bytes: int = 1 << 30
    decode_tokens: int = 64  # tokens per row (EOS ignored) when measuring decode speed for the bandwidth bound
    decode_repeats: int = 3  # timed pairs per decode-speed measurement; the best counts
    command: str = field(default_factory=lambda: shlex.join(["helios", *sys.argv[1:]]))

    def for_quick(self) -> BenchOptions:
        """The CI sizes: a bench on tiny models that finishes in well under a minute on 2 cores."""
        return replace(
            self,
            prompts=min(self.prompts, 8),
            profile_requests=min(self.profile_requests, 3),
            latency_requests=min(self.latency_requests, 6),
            max_new_tokens=min(self.max_new_tokens, 16),
            max_run_batch=min(self.max_run_batch, 16),
            budget_batch=min(self.budget_batch, 8),
            bandwidth_probe_bytes=min(self.bandwidth_probe_bytes, 64 << 20),
            decode_tokens=min(self.decode_tokens, 8),
            decode_repeats=1,
        )


def _int_list(text: str) -> tuple[int, ...]:
    try:
        values = tuple(int(x) for x in text.split(",") if x.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None
    if not values or any(v < 1 for v in values):
        raise argparse.ArgumentTypeError(f"expected positive integers, got {text!r}")
    return values


def _name_list(text: str) -> tuple[str, ...]:
    return tuple(x.strip() for x in text.split(",") if x.strip())


def _objectives(text: str) -> tuple[Objective, ...]:
    names = _name_list(text)
    bad = [n for n in names if n not in OBJECTIVES]
    if bad or not names:
        raise argparse.ArgumentTypeError(f"objectives must be among {', '.join(OBJECTIVES)}, got {text!r}")
    return tuple(n for n in OBJECTIVES if n in names)


def add_bench_arguments(parser: argparse.ArgumentParser) -> None:
    d = BenchOptions()
    parser.add_argument(
        "--device",
        choices=("auto", "cpu", "cuda"),
        default=d.device,
        help="where to run everything (auto: CUDA when a GPU is visible)",
    )
    parser.add_argument(
        "--presets",
        type=_name_list,
        default=d.presets,
        help="model family, comma-separated, at least two sizes "
        f"(default: {','.join(CPU_PRESETS)} on CPU, {','.join(GPU_PRESETS)} on CUDA)",
    )
    parser.add_argument("--out", type=Path, default=d.out, help="directory for bench.json and bench.png")
    parser.add_argument("--quick", action="store_true", help="CI sizes: few prompts, short outputs, small batches")
    parser.add_argument(
        "--batches",
        type=_int_list,
        default=d.batches,
        help="batch sizes at which the memory-bandwidth-bound fraction is measured",
    )
    parser.add_argument("--max-new-tokens", type=int, default=d.max_new_tokens, help="tokens generated per request")
    parser.add_argument(
        "--results-md", type=Path, default=d.results_md, help="the results log a dated entry is appended to"
    )
    parser.add_argument("--no-results-md", action="store_true", help="append no entry to any results log")
    parser.add_argument("--seed", type=int, default=d.seed, help="seed for training, prompts and arrivals")
    parser.add_argument(
        "--objectives",
        type=_objectives,
        default=d.objectives,
        help="objectives the policy chooses for (throughput,latency,energy)",
    )
    parser.add_argument(
        "--accuracy-floor",
        type=float,
        default=d.accuracy_floor,
        help="minimum agreement with the full model's tokens, as in spec.accuracyFloor",
    )
    parser.add_argument("--threshold", type=float, default=d.confidence_threshold, help="exit confidence threshold")
    parser.add_argument("--breach-window", type=int, default=d.breach_window, help="tokens in the breach window")
    parser.add_argument("--breach-limit", type=int, default=d.breach_limit, help="breaches that trigger adaptation")
    parser.add_argument("--prompts", type=int, default=d.prompts, help="evaluation prompts (half easy, half hard)")
    parser.add_argument(
        "--profile-requests",
        type=int,
        default=d.profile_requests,
        help="profiling requests per candidate, at full depth",
    )
    parser.add_argument(
        "--latency-requests",
        type=int,
        default=d.latency_requests,
        help="requests played at a fixed rate for the latency percentiles",
    )
    parser.add_argument(
        "--rate",
        type=float,
        default=d.rate,
        help="request rate (1/s) of the latency run (default: 0.8 x the static baseline's capacity)",
    )
    parser.add_argument(
        "--memory-budget-bytes",
        type=int,
        default=d.memory_budget_bytes,
        help="memory budget for weights + KV cache (default: the static baseline's weights "
        "+ KV for --budget-batch rows)",
    )
    parser.add_argument(
        "--budget-batch",
        type=int,
        default=d.budget_batch,
        help="rows the static baseline fits in the default memory budget",
    )
    parser.add_argument(
        "--max-run-batch", type=int, default=d.max_run_batch, help="largest batch actually run for throughput"
    )
    parser.add_argument(
        "--decode-tokens",
        type=int,
        default=d.decode_tokens,
        help="tokens per row when timing decode for the bandwidth-bound fraction",
    )
    parser.add_argument(
        "--cpu-threads",
        type=int,
        default=d.cpu_threads,
        help="torch threads for CPU runs (default 1: timings stay comparable on a shared machine)",
    )
    parser.add_argument("--train-steps", type=int, default=d.train_steps, help="override each preset's training steps")
    parser.add_argument(
        "--dtype",
        choices=("float32", "bfloat16", "float16"),
        default=d.dtype,
        help="weights and KV dtype (default: float32 on CPU, bfloat16 on CUDA)",
    )


def bench_options_from_args(ns: argparse.Namespace) -> BenchOptions:
    options = BenchOptions(
        device=ns.device,
        presets=tuple(ns.presets),
        out=Path(ns.out),
        quick=bool(ns.quick),
        batches=tuple(ns.batches),
        max_new_tokens=int(ns.max_new_tokens),
        results_md=None if ns.no_results_md else Path(ns.results_md),
        seed=int(ns.seed),
        objectives=tuple(ns.objectives),
        accuracy_floor=float(ns.accuracy_floor),
        confidence_threshold=float(ns.threshold),
        breach_window=int(ns.breach_window),
        breach_limit=int(ns.breach_limit),
        prompts=int(ns.prompts),
        profile_requests=int(ns.profile_requests),
        latency_requests=int(ns.latency_requests),
        rate=ns.rate,
        memory_budget_bytes=ns.memory_budget_bytes,
        budget_batch=int(ns.budget_batch),
        max_run_batch=int(ns.max_run_batch),
        decode_tokens=int(ns.decode_tokens),
        cpu_threads=int(ns.cpu_threads),
        train_steps=ns.train_steps,
        dtype=ns.dtype,
    )
    validate(options)
    return options


def validate(options: BenchOptions) -> None:
    if options.presets and len(set(options.presets)) < 2:
        raise ValueError("--presets needs at least two different model sizes")
    if not 0 < options.accuracy_floor <= 1:
        raise ValueError("--accuracy-floor must be in (0, 1]")
    if not 0 < options.confidence_threshold < 1:
        raise ValueError("--threshold must be in (0, 1)")
    if not 1 <= options.breach_limit < options.breach_window:
        raise ValueError("--breach-limit must be at least 1 and below --breach-window")
    positive = (
        "cpu_threads",
        "max_new_tokens",
        "decode_tokens",
        "decode_repeats",
        "prompts",
        "profile_requests",
        "latency_requests",
        "budget_batch",
        "max_run_batch",
    )
    for name in positive:
        if getattr(options, name) < 1:
            raise ValueError(f"--{name.replace('_', '-')} must be at least 1")
    if options.rate is not None and options.rate <= 0:
        raise ValueError("--rate must be positive")
