"""Check objects against the HeliosDeployment CRD the way the API server does, without an API server.

What runs: the CRD's own `openAPIV3Schema`, converted to JSON Schema and checked by `jsonschema`;
structural defaulting; `x-kubernetes-list-type: map` key uniqueness; and every `x-kubernetes-validations`
rule evaluated by a real CEL engine (cel-python) at its schema location, with `self` bound to the value
there and typed by the schema (a `number` field is a CEL double even when the JSON holds `1`), as
Kubernetes does. Unknown fields are errors, as with kubectl's default strict field validation.
Not emulated: CEL cost budgets, `oldSelf` transition rules (the CRD has none), server-side pruning.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from functools import cache
from pathlib import Path
from typing import Any

import celpy
import jsonschema
import yaml
from celpy import celtypes
from celpy.adapter import json_to_cel
from celpy.evaluation import CELEvalError

ROOT = Path(__file__).resolve().parents[2]
CRD_PATH = ROOT / "crds" / "heliosdeployments.helios.dev.yaml"


@cache
def load_crd() -> dict[str, Any]:
    with CRD_PATH.open() as fh:
        crd: dict[str, Any] = yaml.safe_load(fh)
    return crd


def structural_schema() -> dict[str, Any]:
    """The served version's openAPIV3Schema (a fresh copy)."""
    (version,) = load_crd()["spec"]["versions"]
    return copy.deepcopy(version["schema"]["openAPIV3Schema"])


# ---------------------------------------------------------------------------------------------
# OpenAPI v3.0 structural schema -> JSON Schema (draft 2020-12)


def to_json_schema(node: dict[str, Any], *, strict: bool = True) -> dict[str, Any]:
    """Translate the OpenAPI 3.0 dialect Kubernetes uses into JSON Schema.

    Boolean exclusiveMinimum/Maximum become numeric bounds, `nullable` widens the type, objects without
    `x-kubernetes-preserve-unknown-fields` reject unknown fields when `strict`.
    """
    out: dict[str, Any] = {}
    for key, value in node.items():
        if key.startswith("x-kubernetes-") or key in ("nullable", "format", "description", "default"):
            continue
        if key == "properties":
            out[key] = {name: to_json_schema(sub, strict=strict) for name, sub in value.items()}
        elif key == "items" or (key == "additionalProperties" and isinstance(value, dict)):
            out[key] = to_json_schema(value, strict=strict)
        elif key in ("anyOf", "allOf", "oneOf"):
            out[key] = [to_json_schema(sub, strict=strict) for sub in value]
        elif key in ("exclusiveMinimum", "exclusiveMaximum"):
            continue
        else:
            out[key] = value
    if node.get("exclusiveMinimum") is True:
        out["exclusiveMinimum"] = out.pop("minimum")
    if node.get("exclusiveMaximum") is True:
        out["exclusiveMaximum"] = out.pop("maximum")
    if node.get("nullable") and "type" in out:
        out["type"] = [out["type"], "null"]
    if (
        strict
        and node.get("type") == "object"
        and "properties" in node
        and "additionalProperties" not in node
        and not node.get("x-kubernetes-preserve-unknown-fields")
    ):
        out["additionalProperties"] = False
    return out


# ---------------------------------------------------------------------------------------------
# Defaulting


def apply_defaults(schema: dict[str, Any], value: Any) -> Any:
    """Structural defaulting: a missing property with a default gets it; defaulted objects are defaulted too."""
    if isinstance(value, dict) and schema.get("type") == "object":
        out = dict(value)
        for name, sub in (schema.get("properties") or {}).items():
            if name not in out and "default" in sub:
                out[name] = copy.deepcopy(sub["default"])
            if name in out:
                out[name] = apply_defaults(sub, out[name])
        extra = schema.get("additionalProperties")
        if isinstance(extra, dict):
            for name in out:
                if name not in (schema.get("properties") or {}):
                    out[name] = apply_defaults(extra, out[name])
        return out
    if isinstance(value, list) and isinstance(schema.get("items"), dict):
        return [apply_defaults(schema["items"], item) for item in value]
    return value


def schema_defaults(schema: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """Every `default` in the schema, by dotted path (list items as `[]`)."""
    found: dict[str, Any] = {}
    for name, sub in (schema.get("properties") or {}).items():
        path = f"{prefix}.{name}" if prefix else name
        if "default" in sub:
            found[path] = sub["default"]
        found.update(schema_defaults(sub, path))
    if isinstance(schema.get("items"), dict):
        found.update(schema_defaults(schema["items"], f"{prefix}[]"))
    return found


# ---------------------------------------------------------------------------------------------
# CEL


@dataclass(frozen=True)
class Rule:
    path: str  # schema location, e.g. spec.exit or spec.candidates[]
    rule: str
    message: str


def rules(schema: dict[str, Any] | None = None, path: str = "") -> list[Rule]:
    """Every x-kubernetes-validations rule in the schema, with where it sits."""
    schema = structural_schema() if schema is None else schema
    found = [Rule(path, r["rule"], r.get("message", "")) for r in schema.get("x-kubernetes-validations") or ()]
    for name, sub in (schema.get("properties") or {}).items():
        found += rules(sub, f"{path}.{name}" if path else name)
    if isinstance(schema.get("items"), dict):
        found += rules(schema["items"], f"{path}[]")
    if isinstance(schema.get("additionalProperties"), dict):
        found += rules(schema["additionalProperties"], f"{path}[*]")
    return found


_ENV = celpy.Environment()


@cache
def _program(rule: str) -> celpy.Runner:
    return _ENV.program(_ENV.compile(rule))


def to_cel(schema: dict[str, Any], value: Any) -> Any:
    """A JSON value as the CEL value Kubernetes binds, typed by its schema."""
    if value is None:
        return None
    if schema.get("x-kubernetes-int-or-string") or schema.get("x-kubernetes-preserve-unknown-fields"):
        return json_to_cel(value)
    kind = schema.get("type")
    if kind == "integer":
        return celtypes.IntType(value)
    if kind == "number":
        return celtypes.DoubleType(float(value))
    if kind == "string":
        return celtypes.StringType(value)
    if kind == "boolean":
        return celtypes.BoolType(value)
    if kind == "array":
        return celtypes.ListType([to_cel(schema.get("items") or {}, item) for item in value])
    if kind == "object":
        props = schema.get("properties") or {}
        extra = schema.get("additionalProperties")
        entries = {}
        for key, item in value.items():
            sub = props.get(key, extra if isinstance(extra, dict) else {})
            entries[celtypes.StringType(key)] = to_cel(sub, item)
        return celtypes.MapType(entries)
    return json_to_cel(value)


def cel_errors(schema: dict[str, Any], value: Any, path: str) -> list[str]:
    """Evaluate every rule at its location in `value`; return `path: message` for each that fails."""
    errors: list[str] = []
    if value is None:
        return errors
    for rule in schema.get("x-kubernetes-validations") or ():
        try:
            ok = _program(rule["rule"]).evaluate({"self": to_cel(schema, value)})
        except CELEvalError as err:
            errors.append(f"{path}: rule could not be evaluated ({rule['rule']}): {err}")
            continue
        if not bool(ok):
            errors.append(f"{path}: {rule.get('message') or 'failed rule: ' + rule['rule']}")
    if isinstance(value, dict):
        props = schema.get("properties") or {}
        extra = schema.get("additionalProperties")
        for key, item in value.items():
            sub = props.get(key, extra if isinstance(extra, dict) else None)
            if sub is not None:
                errors += cel_errors(sub, item, f"{path}.{key}")
    elif isinstance(value, list) and isinstance(schema.get("items"), dict):
        for i, item in enumerate(value):
            errors += cel_errors(schema["items"], item, f"{path}[{i}]")
    return errors


def list_map_errors(schema: dict[str, Any], value: Any, path: str) -> list[str]:
    """`x-kubernetes-list-type: map` rejects two items with the same keys, as the API server does."""
    errors: list[str] = []
    if isinstance(value, list):
        if schema.get("x-kubernetes-list-type") == "map":
            keys = schema.get("x-kubernetes-list-map-keys") or []
            seen: set[tuple[Any, ...]] = set()
            for i, item in enumerate(value):
                key = tuple(item.get(k) for k in keys) if isinstance(item, dict) else (item,)
                if key in seen:
                    errors.append(f"{path}[{i}]: Duplicate value: {dict(zip(keys, key, strict=True))}")
                seen.add(key)
        for i, item in enumerate(value):
            errors += list_map_errors(schema.get("items") or {}, item, f"{path}[{i}]")
    elif isinstance(value, dict):
        for key, item in value.items():
            sub = (schema.get("properties") or {}).get(key)
            if sub is not None:
                errors += list_map_errors(sub, item, f"{path}.{key}")
    return errors


# ---------------------------------------------------------------------------------------------
# The whole admission check


@dataclass(frozen=True)
class Admission:
    obj: dict[str, Any]  # after defaulting
    schema_errors: tuple[str, ...]
    rule_errors: tuple[str, ...]

    @property
    def errors(self) -> tuple[str, ...]:
        return self.schema_errors + self.rule_errors

    @property
    def accepted(self) -> bool:
        return not self.errors


def admit(obj: dict[str, Any]) -> Admission:
    """Default, then validate `obj` (a whole HeliosDeployment) by schema and by CEL rules."""
    schema = structural_schema()
    defaulted = apply_defaults(schema, obj)
    validator = jsonschema.Draft202012Validator(to_json_schema(schema))
    schema_errors = [
        f"{'.'.join(str(p) for p in err.absolute_path) or '<root>'}: {err.message}"
        for err in sorted(validator.iter_errors(defaulted), key=lambda e: list(map(str, e.absolute_path)))
    ]
    schema_errors += [e.lstrip(".") for e in list_map_errors(schema, defaulted, "")]
    # CEL runs only on values whose types the schema accepted, as in the API server.
    rule_errors = [] if any("is not of type" in e for e in schema_errors) else cel_errors(schema, defaulted, "")
    return Admission(defaulted, tuple(schema_errors), tuple(e.lstrip(".") for e in rule_errors))


def heliosdeployment(spec: dict[str, Any], name: str = "demo", namespace: str = "default") -> dict[str, Any]:
    return {
        "apiVersion": "helios.dev/v1alpha1",
        "kind": "HeliosDeployment",
        "metadata": {"name": name, "namespace": namespace},
        "spec": spec,
    }
