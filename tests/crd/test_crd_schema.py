"""The CRD itself: names, subresources, printer columns, a structural schema, and one place for each fact
(defaults, enums and bounds agree with operator/helios_operator/core/types.py and core/names.py)."""

from __future__ import annotations

import dataclasses
import re
import typing
from typing import Any

import celpy
import kubernetes_validate
import pytest
from crd_rules import (
    admit,
    apply_defaults,
    heliosdeployment,
    load_crd,
    rules,
    schema_defaults,
    structural_schema,
    to_json_schema,
)

from helios_operator.core import names, types
from helios_operator.core.types import (
    Candidate,
    CandidateProfile,
    Condition,
    Decision,
    HeliosSpec,
    Placement,
    Status,
)


def _spec_schema() -> dict[str, Any]:
    spec: dict[str, Any] = structural_schema()["properties"]["spec"]
    return spec


def _status_schema() -> dict[str, Any]:
    status: dict[str, Any] = structural_schema()["properties"]["status"]
    return status


def test_crd_is_a_valid_kubernetes_1_32_object() -> None:
    kubernetes_validate.validate(load_crd(), "1.32.0", strict=True)


def test_crd_names_come_from_names_py() -> None:
    crd = load_crd()
    assert crd["metadata"]["name"] == names.CRD_NAME
    assert crd["spec"]["group"] == names.GROUP
    assert crd["spec"]["scope"] == "Namespaced"
    assert crd["spec"]["names"]["kind"] == names.KIND
    assert crd["spec"]["names"]["plural"] == names.PLURAL
    assert crd["spec"]["names"]["singular"] == names.SINGULAR
    assert crd["spec"]["names"]["shortNames"] == [names.SHORT_NAME]
    (version,) = crd["spec"]["versions"]
    assert version["name"] == names.VERSION
    assert version["served"] and version["storage"]


def test_status_and_scale_subresources_point_at_replicas_and_selector() -> None:
    (version,) = load_crd()["spec"]["versions"]
    assert version["subresources"]["status"] == {}
    assert version["subresources"]["scale"] == {
        "specReplicasPath": ".spec.replicas",
        "statusReplicasPath": ".status.replicas",
        "labelSelectorPath": ".status.selector",
    }
    status = _status_schema()["properties"]
    assert status["replicas"]["type"] == "integer"
    assert status["selector"]["type"] == "string"


def _resolve(schema: dict[str, Any], json_path: str) -> dict[str, Any]:
    node = schema
    for part in json_path.strip(".").split("."):
        node = node["properties"][part]
    return node


def test_printer_columns_show_phase_candidate_depth_replicas_ready_age_and_point_at_real_fields() -> None:
    (version,) = load_crd()["spec"]["versions"]
    columns = {c["name"]: c for c in version["additionalPrinterColumns"]}
    default_view = [c["name"] for c in version["additionalPrinterColumns"] if not c.get("priority")]
    assert default_view == ["Phase", "Candidate", "Depth", "Replicas", "Ready", "Age"]
    assert columns["Candidate"]["jsonPath"] == ".status.active.candidate"
    assert columns["Depth"]["jsonPath"] == ".status.active.depth"
    schema = structural_schema()
    schema["properties"]["metadata"]["properties"] = {"creationTimestamp": {"type": "string"}}
    kinds = {"integer": "integer", "string": "string", "date": "string"}
    for column in columns.values():
        field = _resolve(schema, column["jsonPath"])
        assert field["type"] == kinds[column["type"]], column


def _walk(schema: dict[str, Any], path: str = "") -> typing.Iterator[tuple[str, dict[str, Any]]]:
    yield path, schema
    for name, sub in (schema.get("properties") or {}).items():
        yield from _walk(sub, f"{path}.{name}")
    if isinstance(schema.get("items"), dict):
        yield from _walk(schema["items"], f"{path}[]")
    if isinstance(schema.get("additionalProperties"), dict):
        yield from _walk(schema["additionalProperties"], f"{path}[*]")


def test_schema_is_structural_every_node_has_a_type() -> None:
    for path, node in _walk(structural_schema()):
        if node.get("x-kubernetes-int-or-string"):
            assert [a["type"] for a in node["anyOf"]] == ["integer", "string"], path
            continue
        assert node.get("type") in {"object", "array", "string", "integer", "number", "boolean"}, path


def test_every_string_and_list_under_a_rule_is_bounded_so_the_api_server_accepts_the_rules_cost() -> None:
    for path, node in _walk(_spec_schema(), "spec"):
        # the rule on spec itself compares two integers; the others walk lists and strings
        if not node.get("x-kubernetes-validations") or path == "spec":
            continue
        for sub_path, sub in _walk(node, path):
            if sub.get("type") == "array":
                assert "maxItems" in sub, sub_path
            if sub.get("type") == "string" and "enum" not in sub and sub_path != path:
                assert "maxLength" in sub, sub_path


def test_every_rule_compiles_in_cel_and_has_a_message() -> None:
    env = celpy.Environment()
    found = rules()
    assert len(found) >= 7
    for rule in found:
        env.compile(rule.rule)
        assert len(rule.message) > 20, rule


def test_enums_and_bounds_equal_model_py() -> None:
    spec = _spec_schema()["properties"]
    assert tuple(spec["objective"]["enum"]) == types.OBJECTIVES
    assert tuple(spec["mode"]["enum"]) == types.MODES
    assert spec["candidates"]["maxItems"] == types.MAX_CANDIDATES
    status = _status_schema()["properties"]
    assert tuple(status["phase"]["enum"]) == typing.get_args(types.Phase)
    assert status["decisions"]["maxItems"] == types.MAX_DECISIONS
    trigger = typing.get_type_hints(Decision)["trigger"]
    assert tuple(status["decisions"]["items"]["properties"]["trigger"]["enum"]) == typing.get_args(trigger)


def _camel(name: str) -> str:
    head, *rest = name.split("_")
    return head + "".join(part.capitalize() for part in rest)


# Scalar defaults the CRD deliberately leaves out, and why.
NOT_DEFAULTED_IN_CRD = {
    # absent means "as many as the nodes' GPUs allow": the operator reads the supply at run time
    "profiling.maxConcurrentWorkers",
    # absent means "the operator's HELIOS_WORKER_IMAGE" (settings.worker_image; the chart sets it)
    "worker.image",
    # absent means "no token": the workers serve /v1 open
    "worker.apiTokenSecret",
    # absent means a per-pod emptyDir; a CRD default for sizeLimit would refuse every claimName (exclusive)
    "worker.modelCache.claimName",
    "worker.modelCache.sizeLimit",
}


def _model_scalar_defaults() -> dict[str, Any]:
    """core/types.py's scalar defaults by the spec's camelCase path (prometheus.url has none)."""
    found: dict[str, Any] = {}
    sections = {
        "exit": types.ExitSpec,
        "profiling": types.ProfilingSpec,
        "reassessment": types.ReassessmentSpec,
        "rollout": types.RolloutSpec,
        "worker": types.WorkerSpec,
        "worker.modelCache": types.ModelCacheSpec,
    }
    for field in dataclasses.fields(HeliosSpec):
        if field.name in sections or field.name in ("candidates", "prometheus_url", "inference_pool"):
            continue
        found[_camel(field.name)] = field.default
    for section, cls in sections.items():
        for field in dataclasses.fields(cls):
            nested = dataclasses.is_dataclass(field.default)  # a section of its own, listed above
            if field.default is not dataclasses.MISSING and not isinstance(field.default, tuple) and not nested:
                found[f"{section}.{_camel(field.name)}"] = field.default
    # The CRD nests the picker's fields (endpointPicker.name, .port, .failureMode); the dataclass is flat.
    found["inferencePool.endpointPicker.failureMode"] = types.InferencePoolSpec.failure_mode
    return found


def test_crd_defaults_equal_model_py_defaults() -> None:
    crd = {k: v for k, v in schema_defaults(_spec_schema()).items() if v != {}}
    expected = {k: v for k, v in _model_scalar_defaults().items() if k not in NOT_DEFAULTED_IN_CRD}
    assert crd == expected


def test_a_spec_defaulted_by_the_crd_parses_to_the_same_spec_as_the_bare_one() -> None:
    bare = {"candidates": [{"name": "tiny", "model": "/models/tiny"}]}
    defaulted = apply_defaults(_spec_schema(), bare)
    assert defaulted["exit"] == {"confidenceThreshold": 0.9, "breachWindow": 100, "breachLimit": 50}
    assert HeliosSpec.from_dict(defaulted) == HeliosSpec.from_dict(bare)
    assert HeliosSpec.from_dict(bare).candidates == (Candidate("tiny", "/models/tiny"),)


def test_defaulting_fills_a_partly_given_section_without_touching_the_given_field() -> None:
    result = admit(heliosdeployment({"candidates": [{"name": "a", "model": "/m"}], "exit": {"breachWindow": 400}}))
    assert result.accepted, result.errors
    assert result.obj["spec"]["exit"] == {"breachWindow": 400, "confidenceThreshold": 0.9, "breachLimit": 50}
    assert result.obj["spec"]["replicas"] == 1


def _full_status() -> Status:
    profile = CandidateProfile(
        candidate="small",
        model_layers=4,
        profiled_tokens=100,
        profiled_requests=5,
        agreement=(0.5, 0.7, 0.9, 1.0),
        depth_agreement=(0.6, 0.8, 0.95, 1.0),
        first_confident=(0.3, 0.3, 0.2, 0.1, 0.1),
        tokens_per_second=120.5,
        fixed_weight_bytes=1e6,
        layer_weight_bytes=2e5,
        kv_bytes_per_token_per_layer=512.0,
        joules_per_token=None,
    )
    return Status(
        phase="Switching",
        active=Placement("small", 3, "demo-small-3", "2026-01-01T00:00:00Z"),
        target=Placement("large", 8, "demo-large-8", "2026-01-01T00:05:00Z"),
        profiles=(profile, dataclasses.replace(profile, candidate="large", joules_per_token=0.2)),
        decisions=(Decision("2026-01-01T00:00:00Z", "profiling", "small", 3, "best tokens/s above floor", True),),
        conditions=(Condition("Ready", "True", "Serving", "serving small at depth 3", "2026-01-01T00:00:00Z"),),
        replicas=2,
        ready_replicas=1,
        selector="helios.dev/deployment=demo",
        observed_generation=3,
        profiling_round=1,
        profiling_since="2026-01-01T00:00:00Z",
        requests_at_assessment=150.0,
        switch_started="2026-01-01T00:05:00Z",
    )


def _undeclared_keys(schema: dict[str, Any], value: Any, path: str) -> list[str]:
    missing: list[str] = []
    if isinstance(value, dict):
        props = schema.get("properties") or {}
        for key, item in value.items():
            if key not in props:
                missing.append(f"{path}.{key}")
            else:
                missing += _undeclared_keys(props[key], item, f"{path}.{key}")
    elif isinstance(value, list):
        for item in value:
            missing += _undeclared_keys(schema.get("items") or {}, item, f"{path}[]")
    return missing


@pytest.mark.parametrize("status", [Status(), _full_status()], ids=["empty", "full"])
def test_every_status_field_the_operator_writes_is_declared_and_valid(status: Status) -> None:
    import jsonschema

    written = status.to_dict()
    assert _undeclared_keys(_status_schema(), written, "status") == []
    jsonschema.validate(written, to_json_schema(_status_schema()))
    assert Status.from_dict(written) == status


def test_status_schema_rejects_an_unknown_phase() -> None:
    import jsonschema

    bad = {**Status().to_dict(), "phase": "Sleeping"}
    with pytest.raises(jsonschema.ValidationError, match="'Sleeping' is not one of"):
        jsonschema.validate(bad, to_json_schema(_status_schema()))


def test_the_size_limit_rule_and_the_operator_accept_the_same_quantities() -> None:
    cache = _spec_schema()["properties"]["worker"]["properties"]["modelCache"]
    (rule,) = cache["properties"]["sizeLimit"]["x-kubernetes-validations"]
    assert rule["rule"] == f"self.matches('{types.SIZE_LIMIT_PATTERN}')"
    for good in ("50Gi", "1", "500M", "2Ti"):
        assert admit(heliosdeployment({**_BARE, "worker": {"modelCache": {"sizeLimit": good}}})).accepted
        assert HeliosSpec.from_dict({**_BARE, "worker": {"modelCache": {"sizeLimit": good}}})
    for bad in ("0", "0Gi", "-5Gi", "1.5Gi", "50GB", "lots"):
        assert not admit(heliosdeployment({**_BARE, "worker": {"modelCache": {"sizeLimit": bad}}})).accepted
        with pytest.raises(types.SpecError, match="sizeLimit"):
            HeliosSpec.from_dict({**_BARE, "worker": {"modelCache": {"sizeLimit": bad}}})


_BARE: dict[str, Any] = {"candidates": [{"name": "tiny", "model": "hf://org/tiny"}]}


def test_candidate_name_pattern_is_a_dns_label_that_fits_in_worker_names() -> None:
    name = _spec_schema()["properties"]["candidates"]["items"]["properties"]["name"]
    pattern = re.compile(name["pattern"])
    for good in ("a", "llama-1b", "qwen2-5", "x" * 32):
        assert pattern.fullmatch(good)
    for bad in ("-a", "a-", "A", "a.b", "a_b", ""):
        assert not pattern.fullmatch(bad)
    assert name["maxLength"] <= 63
