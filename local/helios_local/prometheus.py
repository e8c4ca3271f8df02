"""A real Prometheus on loopback for local runs: the operator's own PromQL path, without a cluster."""

from __future__ import annotations

import asyncio
import contextlib
import json
import shutil
import socket
import time
from pathlib import Path

import httpx

from helios_local.platform import LocalPlatform
from helios_local.runner import TelemetrySource
from helios_operator.adapters.prometheus import query_prometheus
from helios_operator.core.types import TelemetrySnapshot


class LocalPrometheus:
    """A real Prometheus on loopback that scrapes the local workers, as the cluster's does.

    Targets come from a file_sd file rewritten from the platform's ready replicas, labelled with
    `worker` like the PodMonitor's relabelling, so the operator's own PromQL path reads them.
    """

    def __init__(self, directory: Path, binary: str | None = None, scrape_interval_s: float = 1.0) -> None:
        self.binary = binary or shutil.which("prometheus") or ""
        # Absolute: Prometheus reads file_sd paths relative to its config file, not to our working directory.
        self.directory = directory.resolve()
        self.scrape_interval_s = scrape_interval_s
        self.targets_path = self.directory / "targets.json"
        self.url = ""
        self._process: asyncio.subprocess.Process | None = None
        self._written = ""

    @staticmethod
    def available() -> bool:
        return shutil.which("prometheus") is not None

    def config(self) -> str:
        interval = f"{self.scrape_interval_s:g}s"
        return json.dumps(  # JSON is YAML: no YAML writer needed
            {
                "global": {"scrape_interval": interval, "evaluation_interval": interval},
                "scrape_configs": [
                    {
                        "job_name": "helios-local",
                        "scrape_interval": interval,
                        "scrape_timeout": interval,
                        "file_sd_configs": [{"files": [str(self.targets_path)], "refresh_interval": interval}],
                    }
                ],
            },
            indent=2,
        )

    def write_targets(self, endpoints: dict[str, str]) -> None:
        """Ready replica URL -> worker name, as file_sd target groups (written only on change)."""
        groups = [
            {"targets": [url.removeprefix("http://")], "labels": {"worker": worker}}
            for url, worker in sorted(endpoints.items())
        ]
        text = json.dumps(groups)
        if text != self._written:
            tmp = self.targets_path.with_suffix(".tmp")
            tmp.write_text(text)
            tmp.replace(self.targets_path)  # atomic: Prometheus never reads half a file
            self._written = text

    async def start(self, timeout_s: float = 30.0) -> None:
        if not self.binary:
            raise RuntimeError("no prometheus binary found on PATH")
        self.directory.mkdir(parents=True, exist_ok=True)
        (self.directory / "prometheus.yml").write_text(self.config())
        self.write_targets({})
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = int(s.getsockname()[1])
        self.url = f"http://127.0.0.1:{port}"
        log = (self.directory / "prometheus.log").open("ab")
        self._process = await asyncio.create_subprocess_exec(
            self.binary,
            f"--config.file={self.directory / 'prometheus.yml'}",
            f"--storage.tsdb.path={self.directory / 'tsdb'}",
            f"--web.listen-address=127.0.0.1:{port}",
            "--log.level=warn",
            stdin=asyncio.subprocess.DEVNULL,
            stdout=log,
            stderr=asyncio.subprocess.STDOUT,
        )
        log.close()
        deadline = time.monotonic() + timeout_s
        async with httpx.AsyncClient(timeout=1.0) as client:
            while True:
                if self._process.returncode is not None:
                    raise RuntimeError(f"prometheus exited; see {self.directory / 'prometheus.log'}")
                with contextlib.suppress(httpx.HTTPError):
                    if (await client.get(self.url + "/-/ready")).status_code == 200:
                        return
                if time.monotonic() > deadline:
                    raise RuntimeError(f"prometheus was not ready within {timeout_s:.0f}s")
                await asyncio.sleep(0.2)

    def source(self, deployment: str) -> TelemetrySource:
        """The runner's telemetry: refresh the targets, then ask Prometheus like the operator does."""

        async def read(platform: LocalPlatform) -> TelemetrySnapshot:
            self.write_targets(platform.endpoints())
            return await query_prometheus(self.url, deployment, namespace=None, stale_after_s=30.0)

        return read

    async def close(self) -> None:
        if self._process is not None and self._process.returncode is None:
            self._process.terminate()
            try:
                await asyncio.wait_for(self._process.wait(), 10)
            except TimeoutError:
                self._process.kill()
                await self._process.wait()
