"""Real HELIOS workers for tests: in this process under uvicorn, or as a `python -m helios_worker` process."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import httpx

from helios_worker.serve import WorkerOptions, build_app
from tests.support.servers import run_uvicorn, wait_until


def wait_ready(base_url: str, timeout: float = 60.0) -> None:
    """Poll /readyz until it answers 200 (the model is warmed up)."""

    def ready() -> bool:
        try:
            return httpx.get(f"{base_url}/readyz", timeout=2.0).status_code == 200
        except httpx.HTTPError:
            return False

    wait_until(ready, timeout=timeout, interval=0.05)


@contextmanager
def serve_worker(options: WorkerOptions) -> Iterator[str]:
    """A worker app built from `options` on a free loopback port, ready; yields its base URL."""
    app = build_app(options)
    with run_uvicorn(app) as base_url:
        wait_ready(base_url)
        yield base_url


class WorkerProcess:
    """`python -m helios_worker` as a child process on a free port (via --port 0 --port-file)."""

    def __init__(self, args: list[str], directory: Path, env: dict[str, str] | None = None) -> None:
        self.port_file = directory / f"worker-{time.monotonic_ns()}.port"
        self.log_path = self.port_file.with_suffix(".log")
        command = [sys.executable, "-m", "helios_worker", *args, "--port", "0", "--port-file", str(self.port_file)]
        with self.log_path.open("wb") as log:
            self.process = subprocess.Popen(
                command, stdout=log, stderr=subprocess.STDOUT, env={**os.environ, **(env or {})}
            )
        self.base_url = ""

    def wait_listening(self, timeout: float = 60.0) -> str:
        def port() -> str | None:
            if self.process.poll() is not None:
                raise RuntimeError(f"worker exited with {self.process.returncode}:\n{self.log()}")
            text = self.port_file.read_text().strip() if self.port_file.exists() else ""
            return text or None

        self.base_url = f"http://127.0.0.1:{wait_until(port, timeout=timeout)}"
        return self.base_url

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def terminate(self) -> None:
        self.process.send_signal(signal.SIGTERM)

    def wait(self, timeout: float = 60.0) -> int:
        return self.process.wait(timeout)

    def kill(self) -> None:
        if self.process.poll() is None:
            self.process.kill()
            self.process.wait(10)


@contextmanager
def worker_process(args: list[str], directory: Path, env: dict[str, str] | None = None) -> Iterator[WorkerProcess]:
    """A worker process, listening and ready; killed at the end if still running."""
    worker = WorkerProcess(args, directory, env)
    try:
        wait_ready(worker.wait_listening())
        yield worker
    finally:
        worker.kill()
