"""Status conditions: set one, keeping lastTransitionTime unless the status flips."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Literal

from helios_operator.core.types import Condition

READY = "Ready"
PROFILING = "Profiling"
METRICS_AVAILABLE = "MetricsAvailable"
ROLLOUT_PROGRESSING = "RolloutProgressing"
DEGRADED = "Degraded"
CAPACITY_AVAILABLE = "CapacityAvailable"  # False while a worker pod waits for a node
ALL: tuple[str, ...] = (READY, PROFILING, METRICS_AVAILABLE, ROLLOUT_PROGRESSING, CAPACITY_AVAILABLE, DEGRADED)

ConditionStatus = Literal["True", "False", "Unknown"]


def timestamp(now: float) -> str:
    """RFC 3339 in UTC at second resolution, as Kubernetes writes times."""
    return datetime.fromtimestamp(now, tz=UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def parse_timestamp(value: str) -> float | None:
    if not value:
        return None
    try:
        return datetime.strptime(value, "%Y-%m-%dT%H:%M:%SZ").replace(tzinfo=UTC).timestamp()
    except ValueError:
        return None


def set_condition(
    conditions: tuple[Condition, ...],
    type_: str,
    status: ConditionStatus,
    reason: str,
    message: str,
    now: float,
) -> tuple[Condition, ...]:
    """Replace (or add) one condition; its transition time moves only when its status changes."""
    old = next((c for c in conditions if c.type == type_), None)
    since = old.last_transition_time if old is not None and old.status == status else timestamp(now)
    new = Condition(type_, status, reason, message, since)
    rest = tuple(c for c in conditions if c.type != type_)
    return tuple(sorted((*rest, new), key=lambda c: ALL.index(c.type) if c.type in ALL else len(ALL)))
