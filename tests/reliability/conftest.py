"""Shared parts of the worker's reliability tests: a model that talks for as long as it is allowed,
OpenAI error-shape checks, SSE parsing and a process's resident memory."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import httpx
import pytest

from helios_worker.engine.testing import HFStack, random_config
from helios_worker.models.tokenizer import build_tokenizer

LONG_CONTEXT = 4096  # room for a stream long enough to be cut in the middle


@pytest.fixture(scope="session")
def chatty_model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Random weights (3 layers, hidden 64) that rarely pick EOS, so requests run their full max_tokens;
    built in a second, no training."""
    import torch
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    config = random_config("llama", layers=3, hidden=64)
    config.max_position_embeddings = LONG_CONTEXT
    config.initializer_range = 0.2
    stack = HFStack(AutoModelForCausalLM.from_config(config, attn_implementation="eager").eval(), build_tokenizer())
    directory = tmp_path_factory.mktemp("chatty")
    stack.hf_model.save_pretrained(directory)
    stack.tokenizer.save_pretrained(directory)
    return directory


def openai_error(status: int, body: bytes | str) -> dict[str, Any]:
    """The `error` object of a 4xx/5xx body, asserting OpenAI's shape {message, type, param, code}."""
    assert 400 <= status < 600, status
    error = json.loads(body)["error"]
    assert set(error) == {"message", "type", "param", "code"}, error
    assert isinstance(error["message"], str) and error["message"]
    assert isinstance(error["type"], str) and isinstance(error["code"], str)
    assert error["param"] is None or isinstance(error["param"], str)
    return error  # type: ignore[no-any-return]


def assert_openai_error(response: httpx.Response, *statuses: int) -> dict[str, Any]:
    assert response.status_code in statuses, (response.status_code, response.text[:500])
    assert response.headers["content-type"].startswith("application/json")
    return openai_error(response.status_code, response.content)


def sse_payloads(lines: list[str]) -> list[Any]:
    """The data of each SSE line: JSON objects, and the string "[DONE]"."""
    out: list[Any] = []
    for line in lines:
        if not line:
            continue
        assert line.startswith("data: "), line
        data = line.removeprefix("data: ")
        out.append(data if data == "[DONE]" else json.loads(data))
    return out


def rss_bytes(pid: int) -> int:
    """Resident memory of a process, from /proc/<pid>/status (VmRSS, in kB)."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise AssertionError(f"no VmRSS for pid {pid}")


def metric_value(metrics_text: str, name: str, **labels: str) -> float:
    """The value of the first sample named `name` whose labels include `labels`."""
    from prometheus_client.parser import text_string_to_metric_families

    for family in text_string_to_metric_families(metrics_text):
        for sample in family.samples:
            if sample.name == name and all(sample.labels.get(k) == v for k, v in labels.items()):
                return float(sample.value)
    raise AssertionError(f"no sample {name}{labels}")
