"""Deterministic, DNS-1123 names for the worker Deployments and pools the operator owns.

A restarted operator must find the same objects again, so names depend only on the spec and status.
"""

from __future__ import annotations

import hashlib
import re

MAX_NAME = 63  # a DNS-1123 label; Deployment names also end up in pod labels
_INVALID = re.compile(r"[^a-z0-9-]+")


def dns_label(raw: str) -> str:
    """Lower-case, replace what DNS-1123 forbids, and truncate with a hash suffix when too long."""
    name = _INVALID.sub("-", raw.lower()).strip("-") or "x"
    if name == raw and len(name) <= MAX_NAME:
        return name
    # Sanitised or truncated: a hash of the raw name keeps two different names from colliding.
    digest = hashlib.sha256(raw.encode()).hexdigest()[:8]
    return f"{name[: MAX_NAME - 9].rstrip('-')}-{digest}"


def profile_pool(hd: str, round_: int) -> str:
    """The pool of the initial profiling workers of one round (they serve live traffic together)."""
    return dns_label(f"{hd}-p{round_}")


def profile_worker(hd: str, round_: int, candidate: str) -> str:
    return dns_label(f"{hd}-p{round_}-{candidate}")


def serve_worker(hd: str, candidate: str, depth: int) -> str:
    """A serve worker is its own pool: the Service moves from one to the next."""
    return dns_label(f"{hd}-{candidate}-l{depth}")
