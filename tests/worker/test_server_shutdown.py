"""The worker as a process: bad options exit 2 with one line, and SIGTERM drains before exiting
(/readyz 503, new requests 503, in-flight streams finish, exit status 0)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
from pathlib import Path

import httpx
import pytest
from tests.support.servers import wait_until
from tests.support.workers import worker_process

from helios_worker.engine.testing import random_model


def run_cli(*args: str) -> subprocess.CompletedProcess[str]:
    command = [sys.executable, "-m", "helios_worker", *args]
    return subprocess.run(command, capture_output=True, text=True, timeout=120, check=False)


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--model", "/no/such/dir"], "not a directory"),
        (["--model", ".", "--threshold", "1.5"], "--threshold"),
        (["--model", ".", "--max-batch", "0"], "--max-batch"),
        (["--model", "."], "no config.json"),
        (["--model", ".", "--device", "tpu"], "--device tpu"),
    ],
)
def test_bad_options_exit_2_with_a_message_and_no_traceback(args: list[str], message: str) -> None:
    result = run_cli(*args)
    assert result.returncode == 2
    assert message in result.stderr
    assert "Traceback" not in result.stderr


def test_a_gpu_asked_for_where_none_is_visible_exits_2(tiny_model_dir: Path) -> None:
    result = subprocess.run(
        [sys.executable, "-m", "helios_worker", "--model", str(tiny_model_dir)],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
        env={**os.environ, "HELIOS_DEVICE": "cuda", "CUDA_VISIBLE_DEVICES": ""},
    )
    assert result.returncode == 2, result.stderr
    assert "CUDA is not available" in result.stderr and "Traceback" not in result.stderr


def test_layers_beyond_the_model_exit_2(tiny_model_dir: Path) -> None:
    result = run_cli("--model", str(tiny_model_dir), "--layers", "99")
    assert result.returncode == 2, result.stderr
    assert "helios worker: error:" in result.stderr and "Traceback" not in result.stderr


@pytest.fixture(scope="module")
def chatty_model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Random weights rarely pick EOS, so requests run their full max_tokens: long enough to drain."""
    stack = random_model("llama", layers=3, hidden=64)
    directory = tmp_path_factory.mktemp("chatty")
    stack.hf_model.save_pretrained(directory)
    stack.tokenizer.save_pretrained(directory)
    return directory


def test_sigterm_drains_in_flight_requests_then_exits_cleanly(chatty_model_dir: Path, tmp_path: Path) -> None:
    args = ["--model", str(chatty_model_dir), "--max-batch", "1", "--drain-timeout", "60"]
    with worker_process(args, tmp_path) as worker:
        url = worker.base_url
        streams: list[list[str]] = [[] for _ in range(6)]

        def stream(lines: list[str]) -> None:
            body = {"prompt": "x", "max_tokens": 200, "temperature": 0, "stream": True}
            with httpx.stream("POST", f"{url}/v1/completions", json=body, timeout=120) as r:
                lines.extend(line for line in r.iter_lines() if line)

        threads = [threading.Thread(target=stream, args=(lines,)) for lines in streams]
        for t in threads:
            t.start()

        def queued() -> bool:  # one running, the rest waiting: seconds of work in flight
            metrics = httpx.get(f"{url}/metrics", timeout=5).text
            return any(
                line.startswith("helios_queue_length{") and line.endswith(" 5.0") for line in metrics.splitlines()
            )

        wait_until(queued, timeout=60, interval=0.01)
        worker.terminate()

        def refusing() -> bool:
            return httpx.get(f"{url}/readyz", timeout=5).status_code == 503

        wait_until(refusing, timeout=10)
        late = httpx.post(f"{url}/v1/completions", json={"prompt": "x", "max_tokens": 2}, timeout=10)
        assert late.status_code == 503 and late.json()["error"]["code"] == "draining"
        for t in threads:
            t.join(timeout=120)
        assert worker.wait(timeout=60) == 0, worker.log()
    for lines in streams:
        assert lines[-1] == "data: [DONE]"
        finish = json.loads(lines[-2].removeprefix("data: "))["choices"][0]["finish_reason"]
        assert finish in ("length", "stop")
        tokens = sum(
            len(json.loads(x.removeprefix("data: "))["choices"][0]["helios"]["exit_layers"]) for x in lines[:-1]
        )
        assert finish == "stop" or tokens == 200
    assert "Traceback" not in worker.log()
