"""Render charts/helios with the real Helm v4 engine (helm_python, in-process) and read what comes out."""

from __future__ import annotations

import re
from functools import cache
from pathlib import Path
from typing import Any

import helm_python as helm
import yaml

from helios_operator.adapters import metrics
from helios_worker import contract

ROOT = Path(__file__).resolve().parents[2]
CHART = ROOT / "charts" / "helios"
RELEASE = "helios"
NAMESPACE = "helios-system"

# Value sets the chart is rendered with: each one a way people install it.
VALUE_SETS: dict[str, dict[str, Any]] = {
    "defaults": {},
    "monitoring": {
        "serviceMonitor": {"enabled": True, "labels": {"release": "kube-prometheus-stack"}},
        "prometheusRule": {"enabled": True},
    },
    "namespaced": {"watchNamespaces": ["team-a", "team-b"], "serviceMonitor": {"enabled": True}},
    "monitors-off": {"serviceMonitor": {"enabled": False}},
    "custom": {
        "image": {"repository": "registry.example.com/ml/helios-operator", "tag": "1.2.3", "pullPolicy": "Always"},
        "imagePullSecrets": [{"name": "registry-creds"}],
        "operator": {
            "prometheusUrl": "https://prom.example.com",
            "workerImage": "registry.example.com/ml/w:1.2.3",
            "logLevel": "debug",
            "extraEnv": [{"name": "HTTPS_PROXY", "value": "http://proxy:3128"}],
        },
        "resources": {"requests": {"cpu": "250m", "memory": "256Mi"}, "limits": {"cpu": 1, "memory": "512Mi"}},
        "nodeSelector": {"kubernetes.io/os": "linux"},
        "tolerations": [{"key": "infra", "operator": "Exists", "effect": "NoSchedule"}],
        "podAnnotations": {"team": "ml-platform"},
        "priorityClassName": "system-cluster-critical",
        "dashboards": {"enabled": False},
    },
    "existing-account": {"rbac": {"create": False}, "serviceAccount": {"create": False, "name": "ops"}},
}


@cache
def _chart() -> helm.Chart:
    return helm.Chart.load(str(CHART))


def render(values: dict[str, Any], namespace: str = NAMESPACE) -> dict[str, str]:
    """Template path -> rendered text."""
    rendered: dict[str, str] = _chart().render(values, name=RELEASE, namespace=namespace, is_install=True)
    return rendered


@cache
def _render_set(name: str) -> tuple[dict[str, Any], ...]:
    docs: list[dict[str, Any]] = []
    for path, text in sorted(render(VALUE_SETS[name]).items()):
        if path.endswith(".txt"):
            continue
        docs += [d for d in yaml.safe_load_all(text) if d]
    return tuple(docs)


def manifests(value_set: str) -> list[dict[str, Any]]:
    return list(_render_set(value_set))


def notes(value_set: str) -> str:
    return next(text for path, text in render(VALUE_SETS[value_set]).items() if path.endswith("NOTES.txt"))


def one(docs: list[dict[str, Any]], kind: str, name: str | None = None) -> dict[str, Any]:
    found = [d for d in docs if d["kind"] == kind and (name is None or d["metadata"]["name"] == name)]
    assert len(found) == 1, f"expected one {kind} {name or ''}, found {len(found)}"
    return found[0]


def kinds(docs: list[dict[str, Any]]) -> list[str]:
    return sorted(d["kind"] for d in docs)


# ---------------------------------------------------------------------------------------------
# PromQL metric names


def _operator_series() -> frozenset[str]:
    """Series the operator exports about itself (helios_operator_*), read from its own registry."""
    found = set()
    for family in metrics.REGISTRY.collect():
        if family.type == "histogram":
            found |= {f"{family.name}_bucket", f"{family.name}_sum", f"{family.name}_count"}
        else:
            found.add(f"{family.name}_total" if family.type == "counter" else family.name)
    return frozenset(found)


OPERATOR_METRICS = _operator_series()
PROMETHEUS_SERIES = frozenset({"up"})


def contract_series() -> frozenset[str]:
    """Every series name the workers expose, as PromQL sees it (counters end in _total, histograms split)."""
    names: set[str] = set()
    for metric in contract.ALL_METRICS:
        if metric.kind == "histogram":
            names |= {f"{metric.name}_bucket", f"{metric.name}_sum", f"{metric.name}_count"}
        else:
            names.add(metric.series)
    return frozenset(names)


_KEYWORDS = frozenset(
    {
        "by",
        "without",
        "on",
        "ignoring",
        "group_left",
        "group_right",
        "bool",
        "and",
        "or",
        "unless",
        "offset",
        "inf",
        "nan",
    }
)


def metric_names(expr: str) -> set[str]:
    """The metric names a PromQL expression selects: identifiers that are no function, keyword or label."""
    text = re.sub(r'"(?:[^"\\]|\\.)*"', '""', expr)  # drop string contents
    text = re.sub(r"\{[^}]*\}", "", text)  # label matchers
    text = re.sub(r"\[[^\]]*\]", "", text)  # ranges
    text = re.sub(r"\b(by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)", " ", text)  # label lists
    found = set()
    for match in re.finditer(r"[A-Za-z_:][A-Za-z0-9_:]*", text):
        word = match.group(0)
        rest = text[match.end() :].lstrip()
        if word.lower() in _KEYWORDS or rest.startswith("("):
            continue
        if match.start() > 0 and (text[match.start() - 1].isdigit() or text[match.start() - 1] == "."):
            continue  # a unit in a number or duration
        found.add(word)
    return found
