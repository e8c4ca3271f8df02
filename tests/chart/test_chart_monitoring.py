"""Alerts, ServiceMonitor and the Grafana dashboard: checked by the real promtool (Prometheus 2.42's parser and rule
evaluator) and against the telemetry contract (helios_worker/contract.py), so a renamed metric fails here."""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path
from typing import Any

import jsonschema
import pytest
import yaml
from chart_render import (
    CHART,
    NAMESPACE,
    OPERATOR_METRICS,
    PROMETHEUS_SERIES,
    RELEASE,
    contract_series,
    manifests,
    metric_names,
    one,
)

PROMTOOL = shutil.which("promtool") or "/usr/bin/promtool"
KNOWN_SERIES = contract_series() | OPERATOR_METRICS | PROMETHEUS_SERIES
DASHBOARD = CHART / "dashboards" / "helios.json"

DURATION = "^([0-9]+(ms|s|m|h|d|w|y))+$"
# The parts of the Prometheus Operator's CRDs our objects use (their CRDs are not installed here).
PROMETHEUS_RULE_SCHEMA = {
    "type": "object",
    "required": ["apiVersion", "kind", "metadata", "spec"],
    "properties": {
        "apiVersion": {"const": "monitoring.coreos.com/v1"},
        "kind": {"const": "PrometheusRule"},
        "spec": {
            "type": "object",
            "additionalProperties": False,
            "required": ["groups"],
            "properties": {
                "groups": {
                    "type": "array",
                    "minItems": 1,
                    "items": {
                        "type": "object",
                        "additionalProperties": False,
                        "required": ["name", "rules"],
                        "properties": {
                            "name": {"type": "string", "minLength": 1},
                            "rules": {
                                "type": "array",
                                "minItems": 1,
                                "items": {
                                    "type": "object",
                                    "additionalProperties": False,
                                    "required": ["alert", "expr"],
                                    "properties": {
                                        "alert": {"type": "string", "pattern": "^Helios[A-Za-z]+$"},
                                        "expr": {"type": "string", "minLength": 1},
                                        "for": {"type": "string", "pattern": DURATION},
                                        "labels": {
                                            "type": "object",
                                            "required": ["severity"],
                                            "properties": {"severity": {"enum": ["info", "warning", "critical"]}},
                                        },
                                        "annotations": {
                                            "type": "object",
                                            "required": ["summary", "description"],
                                            "additionalProperties": {"type": "string"},
                                        },
                                    },
                                },
                            },
                        },
                    },
                }
            },
        },
    },
}
SERVICE_MONITOR_SCHEMA = {
    "type": "object",
    "required": ["apiVersion", "kind", "metadata", "spec"],
    "properties": {
        "apiVersion": {"const": "monitoring.coreos.com/v1"},
        "kind": {"const": "ServiceMonitor"},
        "spec": {
            "type": "object",
            "additionalProperties": False,
            "required": ["selector", "endpoints"],
            "properties": {
                "selector": {"type": "object", "required": ["matchLabels"]},
                "namespaceSelector": {"type": "object", "properties": {"matchNames": {"type": "array"}}},
                "endpoints": {
                    "type": "array",
                    "minItems": 1,
                    "items": {
                        "type": "object",
                        "additionalProperties": False,
                        "required": ["port"],
                        "properties": {
                            "port": {"type": "string"},
                            "path": {"type": "string"},
                            "interval": {"type": "string", "pattern": DURATION},
                        },
                    },
                },
            },
        },
    },
}


def _rule() -> dict[str, Any]:
    rule: dict[str, Any] = one(manifests("monitoring"), "PrometheusRule")
    return rule


def _alerts() -> dict[str, dict[str, Any]]:
    return {r["alert"]: r for g in _rule()["spec"]["groups"] for r in g["rules"]}


def _promtool(*args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run([PROMTOOL, *args], cwd=cwd, capture_output=True, text=True, timeout=60, check=False)


# ---------------------------------------------------------------------------------------------
# the extractor the checks below rely on


def test_metric_name_extraction_finds_series_and_skips_functions_labels_and_durations() -> None:
    expr = (
        "histogram_quantile(0.95, sum by (le, candidate) (rate(helios_time_to_first_token_seconds_bucket"
        '{namespace=~"$ns", status="ok"}[5m]))) / on(deployment) group_left max(helios_loaded_layers) > 1e3'
    )
    assert metric_names(expr) == {"helios_time_to_first_token_seconds_bucket", "helios_loaded_layers"}
    assert metric_names('absent(up{job="x"} == 1) or vector(0)') == {"up"}
    assert metric_names("helios_no_such_metric offset 5m") == {"helios_no_such_metric"}
    assert "helios_no_such_metric" not in KNOWN_SERIES
    assert {"helios_operator_rollout_in_progress", "helios_operator_metrics_available"} <= OPERATOR_METRICS


# ---------------------------------------------------------------------------------------------
# PrometheusRule


def test_prometheus_rule_has_the_shape_the_prometheus_operator_accepts() -> None:
    jsonschema.validate(_rule(), PROMETHEUS_RULE_SCHEMA)
    assert set(_alerts()) == {
        "HeliosBreachRatioHigh",
        "HeliosWorkerErrors",
        "HeliosWorkerMetricsMissing",
        "HeliosRolloutStuck",
        "HeliosOperatorDown",
    }


def _write_rules(tmp_path: Path, groups: list[dict[str, Any]], name: str = "rules.yaml") -> Path:
    path = tmp_path / name
    path.write_text(yaml.safe_dump({"groups": groups}, sort_keys=False))
    return path


def test_promtool_check_rules_accepts_the_alerts_and_their_templates(tmp_path: Path) -> None:
    _write_rules(tmp_path, _rule()["spec"]["groups"])
    result = _promtool("check", "rules", "rules.yaml", cwd=tmp_path)
    assert result.returncode == 0, result.stdout + result.stderr
    assert f"SUCCESS: {len(_alerts())} rules found" in result.stdout


def test_promtool_check_rules_rejects_a_broken_expression(tmp_path: Path) -> None:
    groups = [{"name": "g", "rules": [{"alert": "HeliosBroken", "expr": "sum by (le (helios_batch_size_bucket)"}]}]
    _write_rules(tmp_path, groups)
    result = _promtool("check", "rules", "rules.yaml", cwd=tmp_path)
    assert result.returncode != 0


def test_alert_expressions_select_only_contract_operator_or_up_series() -> None:
    for name, rule in _alerts().items():
        used = metric_names(rule["expr"])
        assert used, name
        assert used <= KNOWN_SERIES, f"{name} uses unknown series {used - KNOWN_SERIES}"


SERIES = 'namespace="ml", deployment="chat"'
PLACE = f'{SERIES}, candidate="small", depth="12"'


def _unit_test(tmp_path: Path, input_series: list[dict[str, str]], checks: list[dict[str, Any]]) -> str:
    """Run `promtool test rules` over the chart's alerts (annotations left out: check rules covers them)."""
    groups = [
        {"name": g["name"], "rules": [{k: v for k, v in r.items() if k != "annotations"} for r in g["rules"]]}
        for g in _rule()["spec"]["groups"]
    ]
    _write_rules(tmp_path, groups)
    spec = {
        "rule_files": ["rules.yaml"],
        "evaluation_interval": "1m",
        "tests": [{"interval": "1m", "input_series": input_series, "alert_rule_test": checks}],
    }
    (tmp_path / "test.yaml").write_text(yaml.safe_dump(spec, sort_keys=False))
    result = _promtool("test", "rules", "test.yaml", cwd=tmp_path)
    return f"rc={result.returncode}\n{result.stdout}{result.stderr}"


def _fires(alert: str, at: str, labels: dict[str, str]) -> dict[str, Any]:
    return {"eval_time": at, "alertname": alert, "exp_alerts": [{"exp_labels": labels}]}


def _silent(alert: str, at: str) -> dict[str, Any]:
    return {"eval_time": at, "alertname": alert, "exp_alerts": []}


PLACE_LABELS = {"namespace": "ml", "deployment": "chat", "candidate": "small", "depth": "12"}
HD_LABELS = {"namespace": "ml", "deployment": "chat"}


def test_breach_alert_fires_after_15_minutes_above_half_and_never_below(tmp_path: Path) -> None:
    out = _unit_test(
        tmp_path,
        [
            {"series": f"helios_breach_window_ratio{{{PLACE}}}", "values": "0.7x40"},
            {"series": f'helios_breach_window_ratio{{{SERIES}, candidate="large", depth="30"}}', "values": "0.3x40"},
        ],
        [
            _silent("HeliosBreachRatioHigh", "10m"),
            _fires("HeliosBreachRatioHigh", "20m", {"severity": "warning", **PLACE_LABELS}),
        ],
    )
    assert out.startswith("rc=0"), out


def test_a_wrong_expectation_fails_so_the_alert_tests_can_fail(tmp_path: Path) -> None:
    out = _unit_test(
        tmp_path,
        [{"series": f"helios_breach_window_ratio{{{PLACE}}}", "values": "0.7x40"}],
        [_silent("HeliosBreachRatioHigh", "20m")],
    )
    assert not out.startswith("rc=0"), out


def test_rollout_stuck_fires_after_30_minutes_in_progress(tmp_path: Path) -> None:
    out = _unit_test(
        tmp_path,
        [{"series": f"helios_operator_rollout_in_progress{{{SERIES}}}", "values": "1x50"}],
        [
            _silent("HeliosRolloutStuck", "25m"),
            _fires("HeliosRolloutStuck", "35m", {"severity": "warning", **HD_LABELS}),
        ],
    )
    assert out.startswith("rc=0"), out


def test_missing_metrics_and_server_errors_fire(tmp_path: Path) -> None:
    out = _unit_test(
        tmp_path,
        [
            {"series": f"helios_operator_metrics_available{{{SERIES}}}", "values": "0x30"},
            {"series": f'helios_requests_total{{{PLACE}, status="ok"}}', "values": "0+10x30"},
            {"series": f'helios_requests_total{{{PLACE}, status="error"}}', "values": "0+5x30"},
        ],
        [
            _fires("HeliosWorkerMetricsMissing", "15m", {"severity": "warning", **HD_LABELS}),
            _fires("HeliosWorkerErrors", "20m", {"severity": "critical", **HD_LABELS}),
        ],
    )
    assert out.startswith("rc=0"), out


def test_operator_down_fires_when_prometheus_stops_scraping_it(tmp_path: Path) -> None:
    job = f'job="{RELEASE}-metrics", namespace="{NAMESPACE}"'
    labels = {"severity": "critical", "job": f"{RELEASE}-metrics", "namespace": NAMESPACE}
    out = _unit_test(
        tmp_path,
        [{"series": f"up{{{job}}}", "values": "1x10 0x30"}],
        [_silent("HeliosOperatorDown", "15m"), _fires("HeliosOperatorDown", "25m", labels)],
    )
    assert out.startswith("rc=0"), out
    gone = _unit_test(
        tmp_path,
        [{"series": f"up{{{job}}}", "values": "1x10 _x30"}],
        [_silent("HeliosOperatorDown", "5m"), _fires("HeliosOperatorDown", "30m", labels)],
    )
    assert gone.startswith("rc=0"), gone


# ---------------------------------------------------------------------------------------------
# ServiceMonitor


def test_service_monitor_scrapes_the_operators_metrics_service() -> None:
    docs = manifests("monitoring")
    monitor = one(docs, "ServiceMonitor")
    jsonschema.validate(monitor, SERVICE_MONITOR_SCHEMA)
    service = one(docs, "Service")
    assert monitor["spec"]["selector"]["matchLabels"].items() <= service["metadata"]["labels"].items()
    assert monitor["spec"]["endpoints"][0]["port"] in {p["name"] for p in service["spec"]["ports"]}
    assert monitor["metadata"]["labels"]["release"] == "kube-prometheus-stack"


# ---------------------------------------------------------------------------------------------
# Grafana dashboard


def _dashboard() -> dict[str, Any]:
    data: dict[str, Any] = json.loads(DASHBOARD.read_text())
    return data


def _panel_exprs() -> list[tuple[str, str]]:
    return [(p["title"], t["expr"]) for p in _dashboard()["panels"] for t in p.get("targets", [])]


def test_dashboard_configmap_carries_the_dashboard_file_with_the_sidecar_label() -> None:
    config_map = one(manifests("defaults"), "ConfigMap")
    assert config_map["metadata"]["labels"]["grafana_dashboard"] == "1"
    assert json.loads(config_map["data"]["helios.json"]) == _dashboard()


def test_dashboard_panels_cover_exits_breaches_speed_latency_batch_queue_memory_energy() -> None:
    dashboard = _dashboard()
    assert dashboard["uid"] == "helios-overview"
    panels = {p["title"]: p for p in dashboard["panels"]}
    assert panels["Exit layer of emitted tokens"]["type"] == "heatmap"
    used = set().union(*(metric_names(expr) for _, expr in _panel_exprs()))
    for series in (
        "helios_exit_layer_bucket",
        "helios_breach_window_ratio",
        "helios_generated_tokens_total",
        "helios_time_to_first_token_seconds_bucket",
        "helios_batch_size_bucket",
        "helios_queue_length",
        "helios_resident_weight_bytes",
        "helios_energy_joules_total",
    ):
        assert series in used, series
    ttft = [e for t, e in _panel_exprs() if t == "Time to first token"]
    assert [e.split(",")[0] for e in ttft] == ["histogram_quantile(0.5", "histogram_quantile(0.95"]
    ids = [p["id"] for p in dashboard["panels"]]
    assert len(ids) == len(set(ids))


def test_dashboard_queries_select_only_contract_or_operator_series() -> None:
    for title, expr in _panel_exprs():
        used = metric_names(expr)
        assert used and used <= KNOWN_SERIES, f"{title}: unknown series {used - KNOWN_SERIES}"
    for variable in _dashboard()["templating"]["list"]:
        if variable["type"] == "query":
            assert "helios_worker_info" in variable["query"]["query"]


def _as_promql(expr: str) -> str:
    """Grafana's variables replaced by what they expand to, so Prometheus' parser can read the query."""
    return expr.replace("$__rate_interval", "5m").replace("$namespace", ".*").replace("$deployment", ".*")


@pytest.mark.parametrize("dashboard", [DASHBOARD], ids=["helios.json"])
def test_promtool_parses_every_dashboard_query(tmp_path: Path, dashboard: Path) -> None:
    rules = [
        {"record": f"helios:dashboard:q{i}", "expr": _as_promql(expr)} for i, (_, expr) in enumerate(_panel_exprs())
    ]
    _write_rules(tmp_path, [{"name": "dashboard", "rules": rules}])
    result = _promtool("check", "rules", "rules.yaml", cwd=tmp_path)
    assert result.returncode == 0, result.stdout + result.stderr
    assert f"SUCCESS: {len(rules)} rules found" in result.stdout
