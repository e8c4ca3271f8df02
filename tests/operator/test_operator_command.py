"""`helios operator` as a person runs it: the console command, settings from flags and HELIOS_*
variables, kopf's login from KUBECONFIG, the operator's own /metrics, and a clean stop on SIGTERM.

GAPS: the API server is the kmock emulator (see kmock_support.py: no schema validation, no garbage
collection, no Deployment controller); Prometheus is deliberately unreachable, so this proves the
real telemetry path's failure handling, not its success (test_telemetry_prometheus.py does that).
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import httpx
import pytest

from helios_operator.core import names
from tests.support.bodies import hd_body

from .kmock_support import FakeCluster, fake_cluster, free_port  # noqa: F401  (the fixture)

pytestmark = pytest.mark.timeout(90)

NS = "default"
HD = "cmd"
SPEC = {
    "objective": "latency",
    "candidates": [{"name": "a", "model": "/models/a"}, {"name": "b", "model": "/models/b"}],
}


def _condition(cluster: FakeCluster, type_: str) -> dict[str, str] | None:
    status = (cluster.get(cluster.hd_path(NS, HD)) or {}).get("status") or {}
    return next((c for c in status.get("conditions") or () if c["type"] == type_), None)


def test_the_operator_command_profiles_and_says_why_telemetry_is_missing(
    fake_cluster: FakeCluster,  # noqa: F811
    tmp_path: Path,
) -> None:
    metrics_port, dead_prometheus = free_port(), free_port()
    env = {
        **os.environ,
        "KUBECONFIG": str(fake_cluster.kubeconfig),
        "HELIOS_WORKER_IMAGE": "registry.example/helios-worker:test",  # from the environment
        "HELIOS_METRICS_PORT": str(metrics_port),
        "HELIOS_METRICS_HOST": "127.0.0.1",
    }
    command = [
        sys.executable, "-m", "helios_cli.main", "operator", "--standalone",
        "--prometheus-url", f"http://127.0.0.1:{dead_prometheus}",  # from a flag
        "--query-timeout-s", "0.5", "--resync-interval-s", "60",  # spec changes must not wait for it
    ]  # fmt: skip
    log = tmp_path / "operator.log"
    with log.open("wb") as out:
        proc = subprocess.Popen(command, env=env, stdout=out, stderr=subprocess.STDOUT)
    try:
        fake_cluster.create(fake_cluster.hd_path(NS), hd_body(HD, NS, SPEC))

        def profiling_workers() -> list[dict[str, Any]] | None:
            items = fake_cluster.items(fake_cluster.deployment_path(NS))
            return items if len(items) >= 2 else None

        workers = fake_cluster.wait_for("a profiling worker per candidate", profiling_workers, timeout=40)
        images = {d["spec"]["template"]["spec"]["containers"][0]["image"] for d in workers}
        assert images == {"registry.example/helios-worker:test"}
        roles = {d["metadata"]["labels"][names.LABEL_ROLE] for d in workers}
        assert roles == {names.ROLE_PROFILE}

        metrics = fake_cluster.wait_for(
            "MetricsAvailable=False with reason PrometheusError",
            lambda: (
                (c := _condition(fake_cluster, "MetricsAvailable"))
                and c["status"] == "False"
                and c["reason"] == "PrometheusError"
                and c
            ),
            timeout=30,
        )
        assert metrics["message"], metrics
        status = fake_cluster.get(fake_cluster.hd_path(NS, HD))["status"]  # type: ignore[index]
        assert status["phase"] == "Profiling" and not status.get("decisions"), status

        own = httpx.get(f"http://127.0.0.1:{metrics_port}/metrics", timeout=5).text
        assert f'helios_operator_metrics_available{{deployment="{HD}",namespace="{NS}"}} 0.0' in own

        # A spec change wakes the loop at once (the step's own requeue while profiling is 5 s).
        candidates = [*SPEC["candidates"], {"name": "c", "model": "/models/c"}]
        fake_cluster.patch(fake_cluster.hd_path(NS, HD), {"spec": {"candidates": candidates}})
        patched = time.monotonic()
        fake_cluster.wait_for(
            "the new candidate's profiling worker",
            lambda: len(fake_cluster.items(fake_cluster.deployment_path(NS))) >= 3,
            timeout=10,
        )
        assert time.monotonic() - patched < 3.0
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            code = proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()
            raise
    text = log.read_text(errors="replace")
    assert code == 0, text[-3000:]
    assert "Traceback" not in text, text[-3000:]
