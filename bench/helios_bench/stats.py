"""Small pure helpers: percentiles, token agreement, exact match over completions."""

from __future__ import annotations

import math
from collections.abc import Sequence

from helios_operator.core import policy
from helios_worker.models.tasks import exact_match, kind_of


def percentile(values: Sequence[float], q: float) -> float:
    """Linear-interpolated percentile (q in [0, 100]); NaN for no values."""
    if not values:
        return math.nan
    ordered = sorted(values)
    pos = (len(ordered) - 1) * q / 100.0
    lo, hi = math.floor(pos), math.ceil(pos)
    return ordered[lo] + (ordered[hi] - ordered[lo]) * (pos - lo)


def token_agreement(outputs: Sequence[Sequence[int]], references: Sequence[Sequence[int]]) -> float:
    """Share of the reference's tokens that the output reproduces at the same position.

    Free-running, as served: after a first difference the two continuations see different text, so
    this is stricter than the per-token agreement profiling measures on the reference's own context.
    A reference with no tokens counts as one token, agreed when the output is empty too.
    """
    agreed = total = 0
    for out, ref in zip(outputs, references, strict=True):
        if not ref:
            total += 1
            agreed += int(not out)
            continue
        total += len(ref)
        agreed += sum(1 for a, b in zip(out, ref, strict=False) if a == b)
    return agreed / total if total else 1.0


def forced_agreement(gaps: Sequence[Sequence[float]], tie_tolerance: float) -> float:
    """Share of served tokens the reference model would also have emitted on the same served context.

    `gaps[i][t]` is the reference's probability of its own greedy token minus that of the served token
    at position t of request i (0 when they are the same token). A gap within `tie_tolerance` is a tie
    that rounding decides (a batched incremental step and a whole-sequence forward round differently),
    not a disagreement. This is the quantity profiling estimates and the accuracy floor bounds;
    differences do not compound as they do in free-running agreement.
    """
    total = sum(len(g) for g in gaps)
    agreed = sum(1 for g in gaps for x in g if x <= tie_tolerance)
    return agreed / total if total else 1.0


def agreement_interval(successes: int, n: int, z: float = 1.96) -> tuple[float, float]:
    """95% (z=1.96) Wilson score interval of a count of successes (the policy's bound); (0, 1) for no trials."""
    if n == 0:
        return 0.0, 1.0
    p = successes / n
    low, high = policy.wilson_interval(p, n, z)
    return min(low, p), max(high, p)  # rounding must not put the estimate itself outside


def sequence_agreement(outputs: Sequence[Sequence[int]], references: Sequence[Sequence[int]]) -> float:
    """Share of requests whose whole output equals the reference's."""
    pairs = list(zip(outputs, references, strict=True))
    return sum(1 for a, b in pairs if list(a) == list(b)) / len(pairs) if pairs else 1.0


def exact_match_rates(prompts: Sequence[str], texts: Sequence[str]) -> dict[str, float]:
    """Exact match on the generated tasks: overall and per kind (easy, hard)."""
    hits: dict[str, list[bool]] = {"all": [], "easy": [], "hard": []}
    for prompt, text in zip(prompts, texts, strict=True):
        ok = exact_match(prompt, text)
        hits["all"].append(ok)
        kind = kind_of(prompt)
        if kind is not None:
            hits[kind].append(ok)
    return {k: (sum(v) / len(v) if v else math.nan) for k, v in hits.items()}


def safe_ratio(numerator: float | None, denominator: float | None) -> float | None:
    """numerator / denominator, or None where either is missing, not finite, or the denominator is 0."""
    if numerator is None or denominator is None:
        return None
    if not (math.isfinite(numerator) and math.isfinite(denominator)) or denominator == 0:
        return None
    return numerator / denominator
