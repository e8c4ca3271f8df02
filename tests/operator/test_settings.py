"""The operator's settings: flags over HELIOS_* variables over defaults, validated at start-up."""

from __future__ import annotations

import pytest

from helios_operator.settings import Settings, SettingsError, load_settings


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
