"""The operator's configuration: one typed object, read once from flags and `HELIOS_*` variables.

Precedence: command-line flag > environment variable > default. `load_settings` validates the
whole object at start-up and raises SettingsError naming every bad value, so a misconfigured
operator stops before it touches the cluster.
"""

from __future__ import annotations

import argparse
import os
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, fields
from typing import Any
from urllib.parse import urlparse

ENV_PREFIX = "HELIOS_"
LOG_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR")


class SettingsError(ValueError):
    """A flag or HELIOS_* variable that cannot work."""


def _setting(default: Any, help: str) -> Any:
    """A setting's default and its help text, kept together (the help is what `helios operator --help` shows)."""
    return field(default=default, metadata={"help": help})


@dataclass(frozen=True)
class Settings:
    prometheus_url: str = _setting(
        "http://prometheus-operated.monitoring:9090",
        "Prometheus HTTP API the operator reads worker telemetry from; a HeliosDeployment's spec.prometheus.url wins",
    )
    query_timeout_s: float = _setting(5.0, "seconds one Prometheus request may take before telemetry counts as failed")
    stale_after_s: float = _setting(
        120.0, "seconds after which the newest sample is stale (MetricsAvailable=False, reason Stale)"
    )
    worker_image: str = _setting(
        "ghcr.io/helios-dev/helios-worker:0.1.0", "worker image for HeliosDeployments that set no spec.worker.image"
    )
    namespaces: tuple[str, ...] = _setting((), "comma-separated namespaces to watch; empty: every namespace")
    log_level: str = _setting("INFO", "DEBUG, INFO, WARNING or ERROR")
    resync_interval_s: float = _setting(15.0, "seconds between reconciles of a HeliosDeployment when nothing changes")
    metrics_port: int = _setting(8081, "port of the operator's own /metrics (helios_operator_*); 0 turns it off")
    metrics_host: str = _setting("0.0.0.0", "address the operator's /metrics listens on")
    service_monitors: bool = _setting(
        True, "create a ServiceMonitor per HeliosDeployment where the Prometheus operator's CRD is installed"
    )
    service_monitor_labels: tuple[str, ...] = _setting(
        (),
        "comma-separated key=value labels on the ServiceMonitors the operator creates, for the cluster's"
        " Prometheus to select them (kube-prometheus-stack: release=<its release>)",
    )
    leader_election_lease: str = _setting(
        "", "namespace/name of a Lease: act only while holding it (one acting operator of many); empty: off"
    )

    def validate(self) -> Settings:
        problems: list[str] = []
        url = urlparse(self.prometheus_url)
        if url.scheme not in ("http", "https") or not url.netloc:
            problems.append(f"prometheus_url must be an http(s) URL, got {self.prometheus_url!r}")
        if not 0 < self.query_timeout_s <= 300:
            problems.append(f"query_timeout_s must be in (0, 300], got {self.query_timeout_s}")
        if self.stale_after_s <= 0:
            problems.append(f"stale_after_s must be positive, got {self.stale_after_s}")
        if not self.worker_image.strip():
            problems.append("worker_image must not be empty")
        if self.log_level not in LOG_LEVELS:
            problems.append(f"log_level must be one of {', '.join(LOG_LEVELS)}, got {self.log_level!r}")
        if not 0 < self.resync_interval_s <= 3600:
            problems.append(f"resync_interval_s must be in (0, 3600], got {self.resync_interval_s}")
        if not 0 <= self.metrics_port <= 65535:
            problems.append(f"metrics_port must be in [0, 65535] (0: off), got {self.metrics_port}")
        lease = self.leader_election_lease
        if lease and (lease.count("/") != 1 or not all(lease.split("/"))):
            problems.append(f"leader_election_lease must be namespace/name, got {lease!r}")
        bad_labels = [kv for kv in self.service_monitor_labels if not _label_pair(kv)]
        if bad_labels:
            problems.append(f"service_monitor_labels must be key=value pairs, got {bad_labels}")
        if any(not ns.strip() for ns in self.namespaces):
            problems.append(f"namespaces must not hold empty names, got {list(self.namespaces)}")
        if problems:
            raise SettingsError("; ".join(problems))
        return self

    @property
    def monitor_labels(self) -> dict[str, str]:
        """service_monitor_labels as a mapping."""
        return dict(kv.split("=", 1) for kv in self.service_monitor_labels)


def _label_pair(text: str) -> bool:
    key, sep, value = text.partition("=")
    return bool(sep and _LABEL_KEY.fullmatch(key) and _LABEL_VALUE.fullmatch(value))


# Kubernetes' label syntax: an optional DNS-subdomain prefix, a name of at most 63; values alike or empty.
_LABEL_KEY = re.compile(r"([a-z0-9]([-a-z0-9.]{0,251}[a-z0-9])?/)?[A-Za-z0-9]([-A-Za-z0-9_.]{0,61}[A-Za-z0-9])?")
_LABEL_VALUE = re.compile(r"([A-Za-z0-9]([-A-Za-z0-9_.]{0,61}[A-Za-z0-9])?)?")


def env_name(field_name: str) -> str:
    """`query_timeout_s` -> `HELIOS_QUERY_TIMEOUT_S`."""
    return ENV_PREFIX + field_name.upper()


def _flag(field_name: str) -> str:
    return "--" + field_name.replace("_", "-")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Add one flag per setting (`--prometheus-url`, ...); absent flags fall back to HELIOS_* or defaults."""
    for f in fields(Settings):
        parser.add_argument(
            _flag(f.name), dest=f.name, default=None, help=f"{f.metadata['help']} (env {env_name(f.name)})"
        )


def load_settings(argv: Sequence[str] | None = None, environ: Mapping[str, str] | None = None) -> Settings:
    """Read flags (argv, unknown flags ignored) over HELIOS_* variables over defaults; validate."""
    parser = argparse.ArgumentParser(add_help=False)
    add_arguments(parser)
    args, _ = parser.parse_known_args(list(argv or ()))
    return settings_from_namespace(args, environ)


def settings_from_namespace(args: argparse.Namespace, environ: Mapping[str, str] | None = None) -> Settings:
    """Parsed flags (None or absent: not given) over HELIOS_* variables over defaults; validated."""
    env = os.environ if environ is None else environ
    raw: dict[str, str] = {}
    for f in fields(Settings):
        value = getattr(args, f.name, None)
        if value is None:
            value = env.get(env_name(f.name))
        if value is not None:
            raw[f.name] = str(value)
    return settings_from_strings(raw)


def settings_from_strings(raw: Mapping[str, str]) -> Settings:
    defaults = Settings()
    values: dict[str, object] = {}
    problems: list[str] = []
    for f in fields(Settings):
        if f.name not in raw:
            continue
        text = raw[f.name].strip()
        default = getattr(defaults, f.name)
        try:
            if isinstance(default, bool):
                values[f.name] = _boolean(text)
            elif isinstance(default, int):
                values[f.name] = int(text)
            elif isinstance(default, float):
                values[f.name] = float(text)
            elif isinstance(default, tuple):
                values[f.name] = tuple(p.strip() for p in text.split(",") if p.strip())
            elif f.name == "log_level":
                values[f.name] = text.upper()
            else:
                values[f.name] = text
        except ValueError:
            kind = "true or false" if isinstance(default, bool) else "a number"
            problems.append(f"{f.name} ({env_name(f.name)}) must be {kind}, got {text!r}")
    if problems:
        raise SettingsError("; ".join(problems))
    return Settings(**values).validate()  # type: ignore[arg-type]


def _boolean(text: str) -> bool:
    lowered = text.lower()
    if lowered in ("true", "1", "yes"):
        return True
    if lowered in ("false", "0", "no", ""):
        return False
    raise ValueError(text)
