"""HeliosDeployment bodies as `kubectl apply` sends them: one builder for every test that creates one."""

from __future__ import annotations

import copy
from collections.abc import Mapping
from typing import Any

from helios_operator.core import names

# Two candidates of known depth, small profiling and reassessment budgets: a whole life cycle is quick.
TWO_CANDIDATES: Mapping[str, Any] = {
    "objective": "throughput",
    "accuracyFloor": 0.9,
    "mode": "active",
    "replicas": 1,
    "candidates": [
        {"name": "small", "model": "/models/small", "layers": 8},
        {"name": "big", "model": "/models/big", "layers": 12},
    ],
    "exit": {"confidenceThreshold": 0.9, "breachWindow": 100, "breachLimit": 50},
    "profiling": {"requestsPerCandidate": 5},
    "reassessment": {"everyRequests": 50},
}


def hd_body(
    name: str, namespace: str = "default", spec: Mapping[str, Any] = TWO_CANDIDATES, **fields: Any
) -> dict[str, Any]:
    """A fresh HeliosDeployment named `name`: `spec` (a copy), with its top-level `fields` replaced."""
    return {
        "apiVersion": names.API_VERSION,
        "kind": names.KIND,
        "metadata": {"name": name, "namespace": namespace},
        "spec": {**copy.deepcopy(dict(spec)), **fields},
    }
