"""The real Prometheus server as a test fixture: own port, own TSDB directory, generated scrape config.

`start_prometheus(["127.0.0.1:8000"], tmp_path)` yields a `PrometheusServer` whose `query()` runs
PromQL through the HTTP API. `stop()` and `restart()` let fault tests take it away and bring it back
(the TSDB directory survives a restart).
"""

from __future__ import annotations

import shutil
import subprocess
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import httpx
import yaml

from tests.support.servers import free_port

PROMETHEUS = shutil.which("prometheus") or "/usr/bin/prometheus"


class PrometheusError(RuntimeError):
    """Prometheus did not start, or answered a query with an error."""


def scrape_config(targets: list[str], scrape_interval: str, job: str = "helios") -> dict[str, Any]:
    """The prometheus.yml for scraping `targets` (host:port) at /metrics."""
    return {
        "global": {"scrape_interval": scrape_interval, "evaluation_interval": scrape_interval},
        "scrape_configs": [
            {
                "job_name": job,
                "scrape_interval": scrape_interval,
                "scrape_timeout": scrape_interval,
                "metrics_path": "/metrics",
                "static_configs": [{"targets": list(targets)}],
            }
        ],
    }


class PrometheusServer:
    """One Prometheus process; `url` is its base URL."""

    def __init__(
        self, targets: list[str], directory: Path, scrape_interval: str = "1s", binary: str = PROMETHEUS
    ) -> None:
        self.binary = binary
        self.directory = directory
        self.directory.mkdir(parents=True, exist_ok=True)
        self.config_path = directory / "prometheus.yml"
        self.config_path.write_text(yaml.safe_dump(scrape_config(targets, scrape_interval)))
        self.log_path = directory / "prometheus.log"
        self.port = 0
        self.url = ""
        self._process: subprocess.Popen[bytes] | None = None

    def start(self, timeout: float = 30.0) -> None:
        """Start on a fresh free port (retrying if another process took it first) and wait for /-/ready."""
        for _attempt in range(3):
            self.port = free_port()
            self.url = f"http://127.0.0.1:{self.port}"
            with self.log_path.open("ab") as log:
                self._process = subprocess.Popen(
                    [
                        self.binary,
                        f"--config.file={self.config_path}",
                        f"--storage.tsdb.path={self.directory / 'data'}",
                        f"--web.listen-address=127.0.0.1:{self.port}",
                        "--web.enable-lifecycle",
                        "--log.level=warn",
                    ],
                    stdout=log,
                    stderr=subprocess.STDOUT,
                )
            if self._wait_ready(timeout):
                return
            self.stop()
        raise PrometheusError(f"prometheus did not become ready; log:\n{self.log_text()}")

    def _wait_ready(self, timeout: float) -> bool:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self._process is None or self._process.poll() is not None:
                return False
            try:
                if httpx.get(f"{self.url}/-/ready", timeout=1.0).status_code == 200:
                    return True
            except httpx.HTTPError:
                pass
            time.sleep(0.1)
        return False

    def stop(self) -> None:
        if self._process is not None and self._process.poll() is None:
            self._process.terminate()
            try:
                self._process.wait(10)
            except subprocess.TimeoutExpired:
                self._process.kill()
                self._process.wait(5)
        self._process = None

    def restart(self) -> None:
        """Stop and start again (a new port: read `url` again); the stored data stays."""
        self.stop()
        self.start()

    @property
    def running(self) -> bool:
        return self._process is not None and self._process.poll() is None

    def log_text(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def query(self, promql: str) -> list[dict[str, Any]]:
        """An instant query; the `data.result` list (each item has `metric` and `value`)."""
        response = httpx.get(f"{self.url}/api/v1/query", params={"query": promql}, timeout=10.0)
        body = response.json()
        if body.get("status") != "success":
            raise PrometheusError(f"{promql!r}: {body.get('errorType')}: {body.get('error')}")
        result: list[dict[str, Any]] = body["data"]["result"]
        return result

    def query_value(self, promql: str) -> float | None:
        """The single sample's value of a query that returns one series (None when it returns none)."""
        result = self.query(promql)
        if not result:
            return None
        if len(result) > 1:
            raise PrometheusError(f"{promql!r} returned {len(result)} series, expected one")
        return float(result[0]["value"][1])

    def targets(self) -> list[dict[str, Any]]:
        """The active scrape targets (each with `health`, `scrapeUrl`, `lastError`)."""
        body = httpx.get(f"{self.url}/api/v1/targets", timeout=10.0).json()
        active: list[dict[str, Any]] = body["data"]["activeTargets"]
        return active

    def wait_for(self, promql: str, predicate: Any = bool, timeout: float = 20.0) -> list[dict[str, Any]]:
        """Poll a query until `predicate(result)` holds (targets appear ~5 s after start; rate() needs 2 scrapes)."""
        deadline = time.monotonic() + timeout
        result: list[dict[str, Any]] = []
        while time.monotonic() < deadline:
            result = self.query(promql)
            if predicate(result):
                return result
            time.sleep(0.25)
        raise TimeoutError(f"{promql!r} did not satisfy the condition in {timeout}s; last: {result}")


@contextmanager
def start_prometheus(targets: list[str], tmp_path: Path, scrape_interval: str = "1s") -> Iterator[PrometheusServer]:
    """Run the real Prometheus scraping `targets` (host:port) until the block ends."""
    server = PrometheusServer(targets, Path(tmp_path) / "prometheus", scrape_interval)
    server.start()
    try:
        yield server
    finally:
        server.stop()
