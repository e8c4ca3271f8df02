"""Pure decisions: which candidate and depth to serve, when to adapt, when to reassess.

No I/O. The cost model and the rules are explained, with the paper's numbers, in docs/decisions.md.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from helios_operator.core.types import CandidateProfile, ExitSpec, Objective, WorkerTelemetry

_EPS = 1e-9


@dataclass(frozen=True)
class CostModel:
    """The knobs of the cost model and of hysteresis (defaults documented in docs/decisions.md)."""

    full_batch: int = 64  # rows the full-depth model runs with: the memory budget's KV reserve
    context_tokens: int = 2048  # KV tokens reserved (and read) per sequence
    max_batch_growth: float = 16.0  # freed memory never buys more than this many times the full batch
    switch_margin: float = 0.10  # a reassessment switches only for a 10% better score
    load_cost_weight: float = 0.25  # cost of loading one full model's worth of weights, in score share
    candidate_change_cost: float = 0.05  # extra cost of changing model (cold files, new tokenizer)
    accuracy_z: float = 1.0  # the floor is held by the agreement's Wilson lower bound at this z, not the mean


DEFAULT_COST = CostModel()


@dataclass(frozen=True)
class Estimate:
    """What the cost model predicts for one candidate at one depth, per replica."""

    batch: int
    bytes_per_step: float
    tokens_per_second: float
    latency_seconds: float  # per token at batch 1
    joules_per_token: float | None  # None where NVML reported no energy
    bytes_per_token: float


@dataclass(frozen=True)
class Choice:
    """A (candidate, depth) with its accuracy, its score for the objective and why."""

    candidate: str
    depth: int
    model_layers: int
    accuracy: float  # depth_agreement[depth-1], measured against the candidate's own full depth
    score: float  # higher is better: tokens/s, 1/latency, or tokens per joule (or per GB read)
    gain: float  # score / score of the same candidate at full depth
    estimate: Estimate
    reason: str


@dataclass(frozen=True)
class Adaptation:
    """The answer to a breach: a deeper or different placement, or None with why not."""

    choice: Choice | None
    reason: str


@dataclass(frozen=True)
class Reassessment:
    """The answer to a periodic reassessment: keep the current placement or switch."""

    choice: Choice | None  # None only when nothing was profiled
    switch: bool
    reason: str


# ---------------------------------------------------------------------------------------------
# The cost model


def batch_capacity(profile: CandidateProfile, depth: int, cost: CostModel = DEFAULT_COST) -> int:
    """Rows that fit at `depth` in the memory the full model needs with its full batch."""
    n, f, w = profile.model_layers, profile.fixed_weight_bytes, profile.layer_weight_bytes
    k = profile.kv_bytes_per_token_per_layer
    cap = int(cost.full_batch * cost.max_batch_growth)
    if k <= 0:
        return cost.full_batch
    budget = f + n * w + cost.full_batch * cost.context_tokens * n * k
    free = budget - f - depth * w
    rows = free / (cost.context_tokens * depth * k) + _EPS
    return int(max(1.0, min(rows, cap)))  # clamp before int(): a tiny k makes rows infinite


def step_bytes(profile: CandidateProfile, depth: int, batch: int, cost: CostModel = DEFAULT_COST) -> float:
    """Bytes one decode step reads: weights of `depth` layers plus the batch's KV over them."""
    kv = batch * cost.context_tokens * depth * profile.kv_bytes_per_token_per_layer
    return profile.fixed_weight_bytes + depth * profile.layer_weight_bytes + kv


def estimate(profile: CandidateProfile, depth: int, cost: CostModel = DEFAULT_COST) -> Estimate:
    """Decode is memory-bandwidth bound: step time is proportional to the bytes a step reads.

    The measured full-depth tokens/s (taken as the full batch's) calibrates bytes per second.
    """
    n = profile.model_layers
    full_bytes = step_bytes(profile, n, cost.full_batch, cost)
    bandwidth = max(profile.tokens_per_second, _EPS) * full_bytes / cost.full_batch  # bytes/s
    batch = batch_capacity(profile, depth, cost)
    per_step = step_bytes(profile, depth, batch, cost)
    bytes_per_token = per_step / batch
    joules = None
    if profile.joules_per_token is not None:
        joules = profile.joules_per_token * bytes_per_token / (full_bytes / cost.full_batch)
    return Estimate(
        batch=batch,
        bytes_per_step=per_step,
        tokens_per_second=batch * bandwidth / per_step,
        latency_seconds=step_bytes(profile, depth, 1, cost) / bandwidth,
        joules_per_token=joules,
        bytes_per_token=bytes_per_token,
    )


def score(est: Estimate, objective: Objective, measured_energy: bool = True) -> float:
    """Higher is better for every objective, so one comparison serves all three."""
    if objective == "throughput":
        return est.tokens_per_second
    if objective == "latency":
        return 1.0 / max(est.latency_seconds, _EPS)
    if measured_energy and est.joules_per_token is not None:
        return 1.0 / max(est.joules_per_token, _EPS)
    return 1e9 / max(est.bytes_per_token, _EPS)  # tokens per GB read: energy follows bytes moved


_UNITS: dict[str, str] = {"throughput": "throughput", "latency": "lower latency", "energy": "energy efficiency"}


def pct(x: float) -> str:
    """0.95 -> '95%', 0.975 -> '97.5%' (what a person reads in a reason)."""
    return f"{x * 100:.1f}".rstrip("0").rstrip(".") + "%"


def options(
    profiles: tuple[CandidateProfile, ...], objective: Objective, floor: float, cost: CostModel = DEFAULT_COST
) -> list[Choice]:
    """Every (candidate, depth) with its estimate and reason, in spec order then depth order."""
    measured_energy = all(p.joules_per_token is not None for p in profiles)
    out: list[Choice] = []
    for p in profiles:
        n = p.model_layers
        full_score = score(estimate(p, n, cost), objective, measured_energy)
        for depth in range(1, n + 1):
            est = estimate(p, depth, cost)
            s = score(est, objective, measured_energy)
            acc = accuracy(p, depth, cost.accuracy_z)
            gain = s / max(full_score, _EPS)
            verdict = "≥" if acc >= floor - _EPS else "<"
            reason = (
                f"{p.candidate} at {depth}/{n} layers: {pct(acc)} agreement (lower bound over {p.profiled_tokens}"
                f" tokens) {verdict} floor {pct(floor)},"
                f" est. {gain:.2f}× {_UNITS[objective]} vs full depth (batch {est.batch})"
            )
            out.append(Choice(p.candidate, depth, n, acc, s, gain, est, reason))
    return out


def accuracy(profile: CandidateProfile, depth: int, z: float = DEFAULT_COST.accuracy_z) -> float:
    """depth_agreement[L-1] (at full depth too: tokens confident earlier still exit early there), as the
    Wilson lower bound over the profiled tokens: 48 tokens that all agree do not prove 100%."""
    if depth > profile.model_layers or depth < 1 or depth > len(profile.depth_agreement):
        return 0.0
    return wilson_lower_bound(profile.depth_agreement[depth - 1], profile.profiled_tokens, z)


def wilson_interval(share: float, n: int, z: float) -> tuple[float, float]:
    """The Wilson score interval of a share measured over n trials (n <= 0 or z <= 0: the share itself).
    The one Wilson bound of the project: the policy holds the floor with it, the bench reports it."""
    if n <= 0 or z <= 0:
        return share, share
    z2 = z * z
    centre = share + z2 / (2 * n)
    spread = z * math.sqrt(share * (1 - share) / n + z2 / (4 * n * n))
    return max(0.0, (centre - spread) / (1 + z2 / n)), min(1.0, (centre + spread) / (1 + z2 / n))


def wilson_lower_bound(share: float, n: int, z: float) -> float:
    """The lower end of the Wilson score interval (n <= 0: the share)."""
    return wilson_interval(share, n, z)[0]


def _feasible(c: Choice, floor: float) -> bool:
    return c.accuracy >= floor - _EPS


def _best(cands: list[Choice], order: dict[str, int]) -> Choice:
    """Highest score; ties go to higher accuracy, then spec order, then the shallower depth."""
    return min(cands, key=lambda c: (-c.score, -c.accuracy, order.get(c.candidate, 0), c.depth))


# ---------------------------------------------------------------------------------------------
# The rules


def choose(
    profiles: tuple[CandidateProfile, ...], objective: Objective, floor: float, cost: CostModel = DEFAULT_COST
) -> Choice | None:
    """The best (candidate, depth) for the objective whose accuracy stays at or above the floor."""
    if not profiles:
        return None
    order = {p.candidate: i for i, p in enumerate(profiles)}
    every = options(profiles, objective, floor, cost)
    feasible = [c for c in every if _feasible(c, floor)]
    if feasible:
        return _best(feasible, order)
    # Nothing proves the floor: the most accurate option, and among equals the deepest (the safest bet).
    fallback = max(every, key=lambda c: (round(c.accuracy, 9), c.depth / c.model_layers, c.score))
    return _with_reason(fallback, f"no option reaches floor {pct(floor)}; most accurate: {fallback.reason}")


def breach_triggered(telemetry: WorkerTelemetry, exit_spec: ExitSpec) -> bool:
    """A full window holding more than breachLimit breaches (paper: more than 50 of 100 tokens).

    A new worker's window starts empty, so the rule waits until it fills: the cool-down after a switch.
    """
    if telemetry.window_tokens < exit_spec.breach_window:
        return False
    breaches = round(telemetry.breach_ratio * exit_spec.breach_window)
    return breaches > exit_spec.breach_limit


def reassessment_due(served: float, served_at_assessment: float, every_requests: int) -> bool:
    """Every `everyRequests` requests served by the active worker (paper: 150)."""
    return served - served_at_assessment >= every_requests


def adapt(
    profiles: tuple[CandidateProfile, ...],
    candidate: str,
    depth: int,
    objective: Objective,
    floor: float,
    cost: CostModel = DEFAULT_COST,
) -> Adaptation:
    """Answer a breach with more layers of the current model or another model, whichever costs less.

    Never the same or a shallower depth of the current model, nor a less accurate one; another model
    only where its profiled accuracy beats the current one's: repeated breaches only climb, and end.
    A deeper depth closes at least half the gap to full depth: the profile that chose the current depth
    no longer describes the traffic, and every step is a new worker, so a storm ends in log2(N) steps.
    """
    current_profile = next((p for p in profiles if p.candidate == candidate), None)
    if current_profile is not None and depth >= current_profile.model_layers:
        return Adaptation(
            None,
            f"no deeper option: {candidate} already runs all {current_profile.model_layers} layers,"
            " so its breaches emit the full model's own token",
        )
    every = options(profiles, objective, floor, cost)
    current = next((c for c in every if c.candidate == candidate and c.depth == depth), None)
    cur_acc = current.accuracy if current else 0.0
    cur_score = current.score if current else max((c.score for c in every), default=1.0)
    order = {p.candidate: i for i, p in enumerate(profiles)}
    by_name = {p.candidate: p for p in profiles}
    reference = by_name.get(candidate)

    def load_cost(c: Choice) -> float:
        p = by_name[c.candidate]
        ref = reference or p
        ref_bytes = ref.fixed_weight_bytes + ref.model_layers * ref.layer_weight_bytes
        loaded = p.fixed_weight_bytes + c.depth * p.layer_weight_bytes
        switch = cost.load_cost_weight * loaded / max(ref_bytes, _EPS)
        return switch + (cost.candidate_change_cost if c.candidate != candidate else 0.0)

    def total(c: Choice) -> float:
        return (cur_score - c.score) / max(cur_score, _EPS) + load_cost(c)

    full = current_profile.model_layers if current_profile is not None else depth + 1
    min_deeper = depth + max(1, math.ceil((full - depth) / 2))
    candidates = [
        c
        for c in every
        if _feasible(c, floor)
        and (
            (c.candidate == candidate and c.depth >= min_deeper and c.accuracy >= cur_acc - _EPS)
            or (c.candidate != candidate and c.accuracy > cur_acc + _EPS)
        )
    ]
    if not candidates:
        return Adaptation(None, f"no deeper option than {candidate} at {depth} layers within floor {pct(floor)}")
    best = min(candidates, key=lambda c: (total(c), -c.accuracy, c.candidate != candidate, order[c.candidate], c.depth))
    kind = "more layers" if best.candidate == candidate else "switch model"
    why = f"breach at {candidate} {depth} layers -> {kind} (cost {total(best):.2f}): {best.reason}"
    return Adaptation(_with_reason(best, why), why)


def reassess(
    profiles: tuple[CandidateProfile, ...],
    candidate: str,
    depth: int,
    objective: Objective,
    floor: float,
    cost: CostModel = DEFAULT_COST,
) -> Reassessment:
    """Re-choose from fresh profiles, with hysteresis: keep the current placement unless it fell
    below the floor or the best option beats it by the switch margin (noise never flaps)."""
    best = choose(profiles, objective, floor, cost)
    if best is None:
        return Reassessment(None, False, "nothing was profiled; keeping the current placement")
    current = next(
        (c for c in options(profiles, objective, floor, cost) if c.candidate == candidate and c.depth == depth), None
    )
    if current is None:
        return Reassessment(best, True, f"{candidate} at {depth} layers was not re-profiled; {best.reason}")
    if not _feasible(current, floor) and best.accuracy > current.accuracy + _EPS:
        why = f"{candidate} at {depth} layers fell to {pct(current.accuracy)} < floor {pct(floor)}; {best.reason}"
        return Reassessment(_with_reason(best, why), True, why)
    if (best.candidate, best.depth) == (candidate, depth):
        return Reassessment(current, False, f"still the best: {current.reason}")
    ratio = best.score / max(current.score, _EPS)
    if ratio >= 1 + cost.switch_margin - _EPS:
        why = f"{best.candidate} at {best.depth} layers scores {ratio:.2f}× the current one: {best.reason}"
        return Reassessment(_with_reason(best, why), True, why)
    why = (
        f"keeping {current.reason}; best alternative {best.candidate} at {best.depth} layers is only"
        f" {ratio:.2f}× (< {1 + cost.switch_margin:.2f}× switch margin)"
    )
    return Reassessment(_with_reason(current, why), False, why)


def _with_reason(c: Choice, reason: str) -> Choice:
    return Choice(c.candidate, c.depth, c.model_layers, c.accuracy, c.score, c.gain, c.estimate, reason)
