"""A catalogue of mistakes people make in a HeliosDeployment, each with the message that rejects it.

Every entry is the good spec below with one mistake in it. `layer` says who rejects it: "schema" (the
openAPIV3Schema: types, enums, ranges, patterns, required fields, unknown fields) or "cel" (an
x-kubernetes-validations rule). `expect` is a part of the message the person sees.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Any, Literal

GOOD_SPEC: dict[str, Any] = {
    "candidates": [
        {"name": "small", "model": "/models/tiny", "layers": 8},
        {"name": "large", "model": "pvc://models/llama-3.1-8b", "layers": 32},
    ],
}


@dataclass(frozen=True)
class Bad:
    mistake: str
    spec: dict[str, Any]
    layer: Literal["schema", "cel"]
    expect: str


def spec_with(changes: dict[str, Any]) -> dict[str, Any]:
    """GOOD_SPEC with `changes` merged in (nested dicts merge; any other value replaces)."""

    def merge(base: dict[str, Any], extra: dict[str, Any]) -> dict[str, Any]:
        out = copy.deepcopy(base)
        for key, value in extra.items():
            if isinstance(value, dict) and isinstance(out.get(key), dict):
                out[key] = merge(out[key], value)
            else:
                out[key] = copy.deepcopy(value)
        return out

    return merge(GOOD_SPEC, changes)


def with_candidate(**fields: Any) -> dict[str, Any]:
    """GOOD_SPEC whose first candidate is replaced by `fields` (None removes a field)."""
    first = {**GOOD_SPEC["candidates"][0], **fields}
    first = {k: v for k, v in first.items() if v is not None}
    return spec_with({"candidates": [first, *GOOD_SPEC["candidates"][1:]]})


def _without(key: str) -> dict[str, Any]:
    spec = copy.deepcopy(GOOD_SPEC)
    del spec[key]
    return spec


CATALOGUE: tuple[Bad, ...] = (
    # --- candidates
    Bad("no candidates field", _without("candidates"), "schema", "'candidates' is a required property"),
    Bad("an empty candidate list", spec_with({"candidates": []}), "schema", "should be non-empty"),
    Bad(
        "nine candidates",
        spec_with({"candidates": [{"name": f"m{i}", "model": f"/models/m{i}"} for i in range(9)]}),
        "schema",
        "is too long",
    ),
    Bad("a candidate without a model", with_candidate(model=None), "schema", "'model' is a required property"),
    Bad("a candidate without a name", with_candidate(name=None), "schema", "'name' is a required property"),
    Bad("an upper-case candidate name", with_candidate(name="Small"), "schema", "does not match"),
    Bad("an underscore in a candidate name", with_candidate(name="my_model"), "schema", "does not match"),
    Bad("a candidate name ending in '-'", with_candidate(name="small-"), "schema", "does not match"),
    Bad("a 33-character candidate name", with_candidate(name="a" * 33), "schema", "is too long"),
    Bad("a relative model path", with_candidate(model="models/tiny"), "schema", "does not match '^(/|pvc://|hf://)'"),
    Bad("an s3:// model", with_candidate(model="s3://bucket/tiny"), "schema", "does not match '^(/|pvc://|hf://)'"),
    Bad("zero layers", with_candidate(layers=0), "schema", "is less than the minimum of 1"),
    Bad("layers as a string", with_candidate(layers="16"), "schema", "is not of type 'integer'"),
    Bad("an unknown field in a candidate", with_candidate(path="/models/x"), "schema", "'path' was unexpected"),
    Bad(
        "two candidates with the same name",
        spec_with({"candidates": [{"name": "a", "model": "/m/a"}, {"name": "a", "model": "/m/b"}]}),
        "cel",
        "candidate names must be unique",
    ),
    Bad("a pvc:// model without a path", with_candidate(model="pvc://models"), "cel", "pvc://<claim>/<path>"),
    Bad(
        "a pvc:// claim that is no valid name", with_candidate(model="pvc://My_Claim/x"), "cel", "pvc://<claim>/<path>"
    ),
    Bad("an hf:// model without an organisation", with_candidate(model="hf://llama"), "cel", "hf://<org>/<name>"),
    # --- objective, floor, mode, replicas
    Bad("an unknown objective", spec_with({"objective": "cost"}), "schema", "'cost' is not one of"),
    Bad("an unknown mode", spec_with({"mode": "dry-run"}), "schema", "'dry-run' is not one of"),
    Bad("an accuracy floor of 0", spec_with({"accuracyFloor": 0}), "schema", "less than or equal to the minimum of 0"),
    Bad("an accuracy floor above 1", spec_with({"accuracyFloor": 1.5}), "schema", "greater than the maximum of 1"),
    Bad("an accuracy floor given as a percentage string", spec_with({"accuracyFloor": "98%"}), "schema", "not of type"),
    Bad("negative replicas", spec_with({"replicas": -1}), "schema", "is less than the minimum of 0"),
    Bad("a misspelt field", spec_with({"objetive": "latency"}), "schema", "'objetive' was unexpected"),
    # --- exit
    Bad("a confidence threshold of 1", spec_with({"exit": {"confidenceThreshold": 1}}), "schema", "maximum of 1"),
    Bad("a confidence threshold of 0", spec_with({"exit": {"confidenceThreshold": 0}}), "schema", "minimum of 0"),
    Bad(
        "a breach window of 1 token",
        spec_with({"exit": {"breachWindow": 1, "breachLimit": 1}}),
        "schema",
        "minimum of 2",
    ),
    Bad("a breach limit of 0", spec_with({"exit": {"breachLimit": 0}}), "schema", "is less than the minimum of 1"),
    Bad(
        "a breach limit equal to the window",
        spec_with({"exit": {"breachWindow": 100, "breachLimit": 100}}),
        "cel",
        "exit.breachLimit must be below exit.breachWindow",
    ),
    Bad(
        "a breach limit above the window",
        spec_with({"exit": {"breachWindow": 50, "breachLimit": 80}}),
        "cel",
        "exit.breachLimit must be below exit.breachWindow",
    ),
    Bad(
        "a breach window shorter than the default limit of 50",
        spec_with({"exit": {"breachWindow": 40}}),
        "cel",
        "exit.breachLimit must be below exit.breachWindow",
    ),
    # --- profiling, reassessment, rollout
    Bad("profiling with no requests", spec_with({"profiling": {"requestsPerCandidate": 0}}), "schema", "minimum of 1"),
    Bad("a 5-second profiling timeout", spec_with({"profiling": {"timeoutSeconds": 5}}), "schema", "minimum of 30"),
    Bad("reassessing every 0 requests", spec_with({"reassessment": {"everyRequests": 0}}), "schema", "minimum of 1"),
    Bad(
        "reassessing more often than a profile takes",
        spec_with({"reassessment": {"everyRequests": 3}}),
        "cel",
        "reassessment.everyRequests must be at least profiling.requestsPerCandidate",
    ),
    Bad("a rollout timeout of 0", spec_with({"rollout": {"readyTimeoutSeconds": 0}}), "schema", "minimum of 30"),
    # --- worker
    Bad("a batch of 0", spec_with({"worker": {"maxBatch": 0}}), "schema", "is less than the minimum of 1"),
    Bad("an empty worker image", spec_with({"worker": {"image": ""}}), "schema", "should be non-empty"),
    Bad(
        "a memory limit that is no quantity",
        spec_with({"worker": {"resources": {"limits": {"memory": "lots"}}}}),
        "schema",
        "does not match",
    ),
    Bad(
        "a GPU requested but not limited",
        spec_with({"worker": {"resources": {"requests": {"nvidia.com/gpu": 1}}}}),
        "cel",
        "must also be set in worker.resources.limits",
    ),
    Bad(
        "a node selector value that is a number",
        spec_with({"worker": {"nodeSelector": {"gpu-count": 8}}}),
        "schema",
        "is not of type 'string'",
    ),
    Bad(
        "an unknown toleration operator",
        spec_with({"worker": {"tolerations": [{"key": "gpu", "operator": "Maybe"}]}}),
        "schema",
        "'Maybe' is not one of",
    ),
    Bad(
        "a toleration with operator Exists and a value",
        spec_with({"worker": {"tolerations": [{"key": "gpu", "operator": "Exists", "value": "true"}]}}),
        "cel",
        "operator Exists must not set a value",
    ),
    Bad(
        "an env entry without a name",
        spec_with({"worker": {"env": [{"value": "1"}]}}),
        "schema",
        "'name' is a required",
    ),
    Bad(
        "the same env name twice",
        spec_with({"worker": {"env": [{"name": "HF_HOME", "value": "/a"}, {"name": "HF_HOME", "value": "/b"}]}}),
        "cel",
        "worker.env names must be unique",
    ),
    Bad(
        "a model cache with both a claim and a size limit",
        spec_with({"worker": {"modelCache": {"claimName": "hf-cache", "sizeLimit": "20Gi"}}}),
        "cel",
        "set claimName or sizeLimit, not both",
    ),
    Bad(
        "a model cache size limit of zero",
        spec_with({"worker": {"modelCache": {"sizeLimit": "0Gi"}}}),
        "cel",
        "sizeLimit must be a positive quantity such as 50Gi",
    ),
    Bad(
        "a model cache size limit in gigabytes, written GB",
        spec_with({"worker": {"modelCache": {"sizeLimit": "50GB"}}}),
        "cel",
        "sizeLimit must be a positive quantity such as 50Gi",
    ),
    Bad(
        "a model cache claim name that is no valid name",
        spec_with({"worker": {"modelCache": {"claimName": "HF_Cache"}}}),
        "schema",
        "does not match",
    ),
    Bad(
        "resources given as a list",
        spec_with({"worker": {"resources": [{"cpu": 1}]}}),
        "schema",
        "not of type 'object'",
    ),
    # --- prometheus
    Bad(
        "a Prometheus URL without a scheme",
        spec_with({"prometheus": {"url": "prometheus:9090"}}),
        "schema",
        "does not match",
    ),
    Bad(  # keys in this order: the first one is the field at fault
        "an InferencePool endpoint picker on port 0",
        spec_with({"inferencePool": {"endpointPicker": {"port": 0, "name": "epp"}}}),
        "schema",
        "port",
    ),
    Bad(
        "an InferencePool failure mode that is not one",
        spec_with({"inferencePool": {"endpointPicker": {"failureMode": "Open", "name": "epp", "port": 9002}}}),
        "schema",
        "FailOpen",
    ),
)
