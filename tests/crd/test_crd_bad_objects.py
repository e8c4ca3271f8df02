"""Each mistake in the catalogue is rejected by the CRD's schema or by its CEL rules (run in a real CEL
engine), with a message a person understands; good objects pass every rule."""

from __future__ import annotations

from typing import Any

import pytest
from bad_objects import CATALOGUE, GOOD_SPEC, Bad, spec_with
from crd_rules import admit, heliosdeployment, rules
from hypothesis import given, settings
from hypothesis import strategies as st

from helios_operator.core.types import HeliosSpec, SpecError


def test_the_catalogue_holds_at_least_30_distinct_mistakes_covering_every_cel_rule() -> None:
    assert len(CATALOGUE) >= 30
    assert len({b.mistake for b in CATALOGUE}) == len(CATALOGUE)
    messages = {r.message for r in rules() if r.path.startswith("spec")}
    caught = {r.message for r in rules() for b in CATALOGUE if b.layer == "cel" and b.expect in r.message}
    assert caught == messages


def test_the_good_spec_is_accepted() -> None:
    result = admit(heliosdeployment(GOOD_SPEC))
    assert result.accepted, result.errors


@pytest.mark.parametrize("bad", CATALOGUE, ids=[b.mistake for b in CATALOGUE])
def test_bad_object_is_rejected_with_its_message(bad: Bad) -> None:
    result = admit(heliosdeployment(bad.spec))
    assert not result.accepted
    found = result.schema_errors if bad.layer == "schema" else result.rule_errors
    assert any(bad.expect in e for e in found), f"expected {bad.expect!r} in {bad.layer} errors, got {result.errors}"
    if bad.layer == "cel":
        # the schema let it through; only the rule stops it (a duplicate list-map key is the exception)
        assert all("Duplicate value" in e for e in result.schema_errors), result.schema_errors


def test_cel_messages_name_the_field_path_where_the_rule_sits() -> None:
    result = admit(heliosdeployment(spec_with({"exit": {"breachWindow": 10, "breachLimit": 10}})))
    assert result.rule_errors == (
        "spec.exit: exit.breachLimit must be below exit.breachWindow (a limit equal to the window could never be "
        "exceeded)",
    )
    dup = admit(
        heliosdeployment(spec_with({"candidates": [{"name": "a", "model": "/a"}, {"name": "a", "model": "/b"}]}))
    )
    assert "spec.candidates: candidate names must be unique" in dup.rule_errors
    assert "spec.candidates[1]: Duplicate value: {'name': 'a'}" in dup.schema_errors
    pvc = admit(heliosdeployment(spec_with({"candidates": [{"name": "a", "model": "pvc://claim"}]})))
    assert pvc.rule_errors[0].startswith("spec.candidates[0]: a pvc:// model")


GOOD_VARIANTS: list[dict[str, Any]] = [
    spec_with({"candidates": [{"name": f"m{i}", "model": f"/models/m{i}"} for i in range(8)]}),
    spec_with({"exit": {"breachWindow": 2, "breachLimit": 1}}),
    spec_with({"accuracyFloor": 1, "replicas": 0, "mode": "advisory", "objective": "energy"}),
    spec_with({"candidates": [{"name": "h", "model": "hf://meta-llama/Llama-3.2-1B"}]}),
    spec_with({"reassessment": {"everyRequests": 5}, "profiling": {"requestsPerCandidate": 5}}),
    spec_with(
        {
            "worker": {
                "resources": {
                    "requests": {"nvidia.com/gpu": 1, "cpu": "500m"},
                    "limits": {"nvidia.com/gpu": "1", "memory": "16Gi"},
                }
            }
        }
    ),
    spec_with(
        {
            "worker": {
                "tolerations": [{"key": "gpu", "operator": "Exists"}, {"key": "a", "value": "b"}],
                "env": [
                    {"name": "A", "value": "1"},
                    {"name": "B", "valueFrom": {"secretKeyRef": {"name": "s", "key": "k"}}},
                ],
            }
        }
    ),
    spec_with({"prometheus": {"url": "https://prom.example.com:9090/prefix"}}),
]


@pytest.mark.parametrize("spec", GOOD_VARIANTS)
def test_good_variants_pass_schema_and_every_rule_and_parse(spec: dict[str, Any]) -> None:
    result = admit(heliosdeployment(spec))
    assert result.accepted, result.errors
    HeliosSpec.from_dict(result.obj["spec"])


@settings(max_examples=60, deadline=None)
@given(
    floor=st.floats(min_value=-0.5, max_value=1.5, allow_nan=False),
    threshold=st.floats(min_value=-0.5, max_value=1.5, allow_nan=False),
    window=st.integers(min_value=2, max_value=300),
    limit=st.integers(min_value=1, max_value=300),
    replicas=st.integers(min_value=-3, max_value=5),
)
def test_the_crd_and_model_py_agree_on_which_numbers_are_valid(
    floor: float, threshold: float, window: int, limit: int, replicas: int
) -> None:
    spec = spec_with(
        {
            "accuracyFloor": floor,
            "replicas": replicas,
            "exit": {"confidenceThreshold": threshold, "breachWindow": window, "breachLimit": limit},
        }
    )
    admitted = admit(heliosdeployment(spec)).accepted
    try:
        HeliosSpec.from_dict(spec)
        parsed = True
    except SpecError:
        parsed = False
    assert admitted == parsed
