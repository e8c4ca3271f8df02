"""The operator's settings: flags over HELIOS_* variables over defaults, validated at start-up."""

from __future__ import annotations

from dataclasses import fields
from pathlib import Path

import pytest

from helios_operator.settings import Settings, SettingsError, env_name, load_settings


def test_defaults_apply_when_nothing_is_set() -> None:
    s = load_settings([], {})
    assert s == Settings()
    assert s.prometheus_url.startswith("http")


def test_environment_variables_are_read_and_typed() -> None:
    s = load_settings(
        [],
        {
            "HELIOS_PROMETHEUS_URL": "http://prom:9090",
            "HELIOS_QUERY_TIMEOUT_S": "2.5",
            "HELIOS_NAMESPACES": "a, b",
            "HELIOS_LOG_LEVEL": "debug",
            "HELIOS_RESYNC_INTERVAL_S": "3",
            "UNRELATED": "x",
        },
    )
    assert s.prometheus_url == "http://prom:9090"
    assert s.query_timeout_s == 2.5
    assert s.namespaces == ("a", "b")
    assert s.log_level == "DEBUG"
    assert s.resync_interval_s == 3.0


def test_flags_win_over_environment_variables() -> None:
    s = load_settings(
        ["--prometheus-url", "http://flag:9090", "--stale-after-s", "30", "--unknown-kopf-flag"],
        {"HELIOS_PROMETHEUS_URL": "http://env:9090"},
    )
    assert s.prometheus_url == "http://flag:9090"
    assert s.stale_after_s == 30.0


@pytest.mark.parametrize(
    ("env", "named"),
    [
        ({"HELIOS_PROMETHEUS_URL": "prom:9090"}, "prometheus_url"),
        ({"HELIOS_QUERY_TIMEOUT_S": "0"}, "query_timeout_s"),
        ({"HELIOS_QUERY_TIMEOUT_S": "fast"}, "HELIOS_QUERY_TIMEOUT_S"),
        ({"HELIOS_STALE_AFTER_S": "-1"}, "stale_after_s"),
        ({"HELIOS_LOG_LEVEL": "LOUD"}, "log_level"),
        ({"HELIOS_RESYNC_INTERVAL_S": "0"}, "resync_interval_s"),
        ({"HELIOS_WORKER_IMAGE": " "}, "worker_image"),
    ],
)
def test_bad_values_stop_start_up_with_the_setting_named(env: dict[str, str], named: str) -> None:
    with pytest.raises(SettingsError, match=named):
        load_settings([], env)


def test_metrics_port_and_service_monitors_are_read_typed_and_checked() -> None:
    s = load_settings([], {"HELIOS_METRICS_PORT": "9100", "HELIOS_SERVICE_MONITORS": "true"})
    assert (s.metrics_port, s.service_monitors) == (9100, True)
    assert load_settings([], {"HELIOS_METRICS_PORT": "0"}).metrics_port == 0  # off
    assert load_settings([], {"HELIOS_SERVICE_MONITORS": "false"}).service_monitors is False
    with pytest.raises(SettingsError, match="metrics_port"):
        load_settings([], {"HELIOS_METRICS_PORT": "70000"})
    with pytest.raises(SettingsError, match=r"HELIOS_SERVICE_MONITORS\) must be true or false"):
        load_settings([], {"HELIOS_SERVICE_MONITORS": "maybe"})


def test_service_monitor_labels_are_key_value_pairs_a_label_selector_can_match() -> None:
    s = load_settings([], {"HELIOS_SERVICE_MONITOR_LABELS": "release=kube-prometheus-stack, team=ml"})
    assert s.monitor_labels == {"release": "kube-prometheus-stack", "team": "ml"}
    assert load_settings([], {}).monitor_labels == {}
    for bad in ("release", "=x", "a b=c", "release=not valid"):
        with pytest.raises(SettingsError, match="service_monitor_labels must be key=value"):
            load_settings([], {"HELIOS_SERVICE_MONITOR_LABELS": bad})


def test_a_spec_without_an_image_runs_the_operators_worker_image() -> None:
    from helios_operator.controller import read_spec

    body = {"spec": {"candidates": [{"name": "a", "model": "/m"}]}}
    assert read_spec(body, Settings(worker_image="registry.test/w:9")).worker.image == "registry.test/w:9"
    own = {"spec": {"candidates": [{"name": "a", "model": "/m"}], "worker": {"image": "mine:1"}}}
    assert read_spec(own, Settings(worker_image="registry.test/w:9")).worker.image == "mine:1"


def test_the_operators_own_metrics_are_served_on_metrics_port() -> None:
    import socket

    import httpx

    from helios_operator.adapters import metrics

    assert metrics.serve(0, "127.0.0.1") is None
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    server = metrics.serve(port, addr="127.0.0.1")
    assert server is not None
    try:
        text = httpx.get(f"http://127.0.0.1:{port}/metrics", timeout=5).text
    finally:
        server.shutdown()
        server.server_close()
    assert 'helios_operator_reconcile_total{result="ok"}' in text


def test_readme_names_every_setting_the_operator_reads() -> None:
    readme = (Path(__file__).resolve().parents[2] / "README.md").read_text()
    missing = [env_name(f.name) for f in fields(Settings) if f"`{env_name(f.name)}`" not in readme]
    assert missing == [], f"README's settings paragraph lacks {missing}"
