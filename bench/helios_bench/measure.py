"""One measurement each: served throughput (with energy and peak memory), decode speed against the
memory-bandwidth bound, latency at a fixed request rate, and the memory-budget arithmetic."""

from __future__ import annotations

import math
import random
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Protocol

from helios_bench.device import EnergyMeter, PeakMemory, synchronize
from helios_bench.observe import ServeObserver
from helios_bench.stats import percentile
from helios_bench.systems import Completion, Prompt, Timing


class System(Protocol):
    def run_batch(self, prompts: Sequence[Prompt], max_new_tokens: int) -> list[Completion]: ...

    def serve(self, arrivals: Sequence[float], prompts: Sequence[Prompt], max_new_tokens: int) -> list[Timing]: ...

    def close(self) -> None: ...


@dataclass(frozen=True)
class Sizes:
    """Bytes of one configuration as loaded: what the budget holds and what a decode step reads."""

    resident_weight_bytes: int  # every loaded parameter (embeddings, loaded layers, norm, LM head)
    fixed_weight_bytes: int  # embeddings, final norm, LM head
    layer_weight_bytes: int  # one decoder layer
    kv_bytes_per_token_per_layer: int
    loaded_layers: int

    @property
    def kv_bytes_per_token(self) -> int:
        return self.kv_bytes_per_token_per_layer * self.loaded_layers


@dataclass(frozen=True)
class Throughput:
    """A served run of `requests` requests, `batch` at a time, and what it cost (joules: None without NVML)."""

    tokens_per_second: float
    requests_per_second: float
    batch: int
    requests: int
    tokens: int
    seconds: float
    joules: float | None
    tokens_per_joule: float | None


@dataclass(frozen=True)
class DecodeBound:
    """Decode speed at one batch size against what the memory bandwidth allows (see bandwidth_fraction)."""

    tokens_per_second: float
    decode_tokens: int
    timing: str  # "difference" or "total": how decode_speed timed it
    layers_per_step: float
    bytes_per_step: float
    bound_tokens_per_second: float
    fraction: float


@dataclass(frozen=True)
class Latency:
    """Percentiles of a run at a fixed request rate (seconds)."""

    requests: int
    tokens: int
    ttft_p50_s: float
    ttft_p95_s: float
    per_token_p50_s: float
    per_token_p95_s: float


def cycle(prompts: Sequence[Prompt], n: int) -> list[Prompt]:
    return [prompts[i % len(prompts)] for i in range(n)]


def max_batch_in_budget(sizes: Sizes, budget_bytes: int, context: int) -> int:
    """Rows of `context` tokens whose KV fits beside the weights: the same rule for the engine and for
    `generate` (the engine's cache plans every slot for a row, no spare)."""
    free = budget_bytes - sizes.resident_weight_bytes
    per_row = sizes.kv_bytes_per_token * context
    return max(0, int(free // per_row)) if per_row > 0 else 0


def default_budget(static: Sizes, context: int, rows: int) -> int:
    """The static baseline's weights plus KV for `rows` rows."""
    return static.resident_weight_bytes + rows * static.kv_bytes_per_token * context


def throughput(
    system: System,
    prompts: Sequence[Prompt],
    *,
    batch: int,
    waves: int,
    max_new_tokens: int,
    device: str,
    energy: EnergyMeter,
) -> tuple[Throughput, int | None]:
    """Served tokens/s with `waves * batch` requests submitted at once (the system keeps `batch` running),
    and the allocator's peak bytes meanwhile (None off CUDA).

    A warm-up of the same batch with two tokens comes first (first calls, kernels, CUDA graphs).
    """
    system.run_batch(cycle(prompts, batch), 2)
    requests = cycle(prompts, batch * waves)
    with PeakMemory(device) as peak:
        synchronize(device)
        joules_before = energy.read_joules()
        started = time.perf_counter()
        completions = system.run_batch(requests, max_new_tokens)
        synchronize(device)
        seconds = time.perf_counter() - started
        joules_after = energy.read_joules()
    tokens = sum(len(c.token_ids) for c in completions)
    joules = None if joules_before is None or joules_after is None else joules_after - joules_before
    figures = Throughput(
        tokens_per_second=tokens / seconds,
        requests_per_second=len(requests) / seconds,
        batch=batch,
        requests=len(requests),
        tokens=tokens,
        seconds=seconds,
        joules=joules,
        tokens_per_joule=tokens / joules if joules else None,
    )
    return figures, peak.peak_bytes


def decode_speed(
    system: System,
    prompts: Sequence[Prompt],
    *,
    batch: int,
    new_tokens: int,
    device: str,
    repeats: int = 2,
) -> tuple[float, int, str]:
    """Decode tokens/s at `batch`: the time of `new_tokens` tokens minus the time of one (prefill and
    first token), over the tokens in between. Systems here must ignore EOS so every row runs to the end.
    Where timing noise leaves no positive difference, all tokens over the whole time (prefill included,
    so lower) stand in. Returns (tokens/s, decode tokens, method); the best of `repeats`, after a warm-up.
    """
    rows = cycle(prompts, batch)
    system.run_batch(rows, 2)
    best_diff, best_total = math.inf, math.inf
    tokens = total_tokens = 0
    for _ in range(repeats):
        synchronize(device)
        t0 = time.perf_counter()
        system.run_batch(rows, 1)
        synchronize(device)
        t1 = time.perf_counter()
        completions = system.run_batch(rows, new_tokens)
        synchronize(device)
        t2 = time.perf_counter()
        total_tokens = sum(len(c.token_ids) for c in completions)
        tokens = total_tokens - batch
        best_total = min(best_total, t2 - t1)
        diff = (t2 - t1) - (t1 - t0)
        if diff > 0.05 * (t2 - t1):
            best_diff = min(best_diff, diff)
    if tokens > 0 and math.isfinite(best_diff):
        return tokens / best_diff, tokens, "difference"
    return total_tokens / best_total, total_tokens, "total"


def bandwidth_bound(
    sizes: Sizes,
    *,
    batch: int,
    layers_per_step: float,
    mean_context: float,
    bandwidth: float,
) -> tuple[float, float]:
    """Bytes a decode step must read (weights of the layers run, the batch's KV over them) and the
    tokens/s that reading them at the measured copy bandwidth allows."""
    weights = sizes.fixed_weight_bytes + layers_per_step * sizes.layer_weight_bytes
    kv = batch * mean_context * layers_per_step * sizes.kv_bytes_per_token_per_layer
    per_step = weights + kv
    return per_step, batch * bandwidth / per_step


def bandwidth_fraction(
    make: Callable[[int, ServeObserver], System],
    sizes: Sizes,
    prompts: Sequence[Prompt],
    *,
    batch: int,
    new_tokens: int,
    bandwidth: float,
    device: str,
    early_exit: bool,
    repeats: int,
) -> DecodeBound:
    """Decode speed at `batch` against the bound for the layers the system really ran per step."""
    observer = ServeObserver()
    system = make(batch, observer)
    try:
        tps, tokens, method = decode_speed(
            system, prompts, batch=batch, new_tokens=new_tokens, device=device, repeats=repeats
        )
    finally:
        system.close()
    layers = observer.mean_layers_per_step(float(sizes.loaded_layers)) if early_exit else float(sizes.loaded_layers)
    rows = cycle(prompts, batch)
    mean_context = sum(len(p) for p in rows) / len(rows) + new_tokens / 2
    per_step, bound = bandwidth_bound(
        sizes, batch=batch, layers_per_step=layers, mean_context=mean_context, bandwidth=bandwidth
    )
    return DecodeBound(tps, tokens, method, layers, per_step, bound, fraction=tps / bound)


def poisson_arrivals(n: int, rate: float, seed: int) -> list[float]:
    """Arrival times (seconds) of a Poisson process at `rate` requests/s; the same seed, the same times."""
    rng = random.Random(seed)
    t, out = 0.0, []
    for _ in range(n):
        out.append(t)
        t += rng.expovariate(rate)
    return out


def latency(system: System, arrivals: Sequence[float], prompts: Sequence[Prompt], max_new_tokens: int) -> Latency:
    """p50/p95 of time to first token (from arrival) and of per-token latency (gaps between tokens)."""
    system.run_batch(prompts[:1], 2)  # warm
    timings = system.serve(arrivals, prompts, max_new_tokens)
    ttft = [t.ttft_s for t in timings if t.tokens]
    gaps = [g for t in timings for g in t.gaps_s]
    return Latency(
        requests=len(timings),
        tokens=sum(t.tokens for t in timings),
        ttft_p50_s=percentile(ttft, 50),
        ttft_p95_s=percentile(ttft, 95),
        per_token_p50_s=percentile(gaps, 50),
        per_token_p95_s=percentile(gaps, 95),
    )
