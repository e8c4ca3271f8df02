"""The worker through real uvicorn on a loopback port with the trained tiny model: OpenAI shapes,
the `helios` extension, streaming, probes, /metrics, and batching under 64 concurrent requests."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families
from tests.support.workers import serve_worker

from helios_worker import contract
from helios_worker.serve import WorkerOptions

DEPTH = 4
EXT = contract.RESPONSE_EXTENSION_FIELD


@pytest.fixture(scope="module")
def base_url(tiny_model_dir: Path) -> Iterator[str]:
    options = WorkerOptions(model=tiny_model_dir, layers=DEPTH, deployment="api-test", candidate="tiny", max_batch=64)
    with serve_worker(options) as url:
        yield url


def sse_events(text: str) -> list[Any]:
    """The payloads of an SSE body: JSON objects, and the string "[DONE]"."""
    events: list[Any] = []
    for block in text.strip().split("\n\n"):
        assert block.startswith("data: "), block
        data = block[len("data: ") :]
        events.append(data if data == "[DONE]" else json.loads(data))
    return events


def metric_samples(base_url: str) -> dict[str, list[tuple[dict[str, str], float]]]:
    out: dict[str, list[tuple[dict[str, str], float]]] = {}
    for family in text_string_to_metric_families(httpx.get(f"{base_url}/metrics").text):
        for s in family.samples:
            out.setdefault(s.name, []).append((s.labels, s.value))
    return out


def check_extension(info: dict[str, Any], tokens: int) -> None:
    assert len(info["exit_layers"]) == len(info["confidences"]) == tokens
    assert all(1 <= layer <= DEPTH for layer in info["exit_layers"])
    assert all(0.0 <= c <= 1.0 for c in info["confidences"])
    assert 0 <= info["breaches"] <= tokens
    assert (info["depth"], info["candidate"]) == (DEPTH, "tiny")


def test_completion_has_openai_shape_and_per_token_exit_layers(base_url: str) -> None:
    r = httpx.post(
        f"{base_url}/v1/completions", json={"model": "x", "prompt": "12+7=", "max_tokens": 6, "temperature": 0}
    )
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["object"] == "text_completion" and body["id"].startswith("cmpl-")
    assert body["model"] == "tiny" and isinstance(body["created"], int)
    [choice] = body["choices"]
    assert choice["index"] == 0 and choice["logprobs"] is None
    assert choice["finish_reason"] in ("stop", "length")
    usage = body["usage"]
    assert usage["total_tokens"] == usage["prompt_tokens"] + usage["completion_tokens"]
    assert 1 <= usage["completion_tokens"] <= 6
    check_extension(choice[EXT], usage["completion_tokens"])


def test_chat_completion_has_openai_shape(base_url: str) -> None:
    r = httpx.post(
        f"{base_url}/v1/chat/completions",
        json={"messages": [{"role": "user", "content": "3+4="}], "max_tokens": 5, "temperature": 0},
    )
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["object"] == "chat.completion" and body["id"].startswith("chatcmpl-")
    [choice] = body["choices"]
    assert choice["message"]["role"] == "assistant" and isinstance(choice["message"]["content"], str)
    check_extension(choice[EXT], body["usage"]["completion_tokens"])


def test_streamed_completion_matches_the_unstreamed_one(base_url: str) -> None:
    request = {"prompt": "abc", "max_tokens": 8, "temperature": 0}
    whole = httpx.post(f"{base_url}/v1/completions", json=request).json()
    r = httpx.post(
        f"{base_url}/v1/completions", json={**request, "stream": True, "stream_options": {"include_usage": True}}
    )
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
    events = sse_events(r.text)
    assert events[-1] == "[DONE]"
    usage_chunk, chunks = events[-2], events[:-2]
    assert usage_chunk["choices"] == [] and usage_chunk["usage"] == whole["usage"]
    assert all(c["object"] == "text_completion" and c["id"] == chunks[0]["id"] for c in chunks)
    text = "".join(c["choices"][0]["text"] for c in chunks)
    layers = [layer for c in chunks for layer in c["choices"][0][EXT]["exit_layers"]]
    assert text == whole["choices"][0]["text"]
    assert layers == whole["choices"][0][EXT]["exit_layers"]
    assert chunks[-1]["choices"][0]["finish_reason"] == whole["choices"][0]["finish_reason"]
    assert all(c["choices"][0]["finish_reason"] is None for c in chunks[:-1])


def test_streamed_chat_opens_with_the_role_and_ends_with_a_finish_reason(base_url: str) -> None:
    r = httpx.post(
        f"{base_url}/v1/chat/completions",
        json={"messages": [{"role": "user", "content": "hi"}], "max_tokens": 4, "temperature": 0, "stream": True},
    )
    events = sse_events(r.text)
    assert events[-1] == "[DONE]"
    chunks = events[:-1]
    assert all(c["object"] == "chat.completion.chunk" for c in chunks)
    assert chunks[0]["choices"][0]["delta"] == {"role": "assistant", "content": ""}
    assert chunks[-1]["choices"][0]["finish_reason"] in ("stop", "length")
    content = [c["choices"][0]["delta"].get("content") for c in chunks[1:-1]]
    assert len(content) >= 1 and all(isinstance(piece, str) for piece in content)


def test_several_prompts_and_choices_are_indexed_prompt_major(base_url: str) -> None:
    r = httpx.post(
        f"{base_url}/v1/completions",
        json={"prompt": ["1+1=", "2+2="], "n": 2, "max_tokens": 3, "temperature": 0},
    )
    assert r.status_code == 200, r.text
    choices = r.json()["choices"]
    assert [c["index"] for c in choices] == [0, 1, 2, 3]
    assert choices[0]["text"] == choices[1]["text"]  # greedy: n copies agree
    ids = httpx.post(f"{base_url}/v1/completions", json={"prompt": [1, 20, 21], "max_tokens": 2}).json()
    assert ids["usage"]["prompt_tokens"] == 3


def test_models_and_probes(base_url: str) -> None:
    models = httpx.get(f"{base_url}/v1/models").json()
    assert models["object"] == "list"
    [card] = models["data"]
    assert card["id"] == "tiny" and card["object"] == "model"
    assert card[EXT]["depth"] == DEPTH and card[EXT]["model_layers"] > DEPTH
    assert httpx.get(f"{base_url}/healthz").json() == {"status": "ok"}
    assert httpx.get(f"{base_url}/readyz").status_code == 200


def test_metrics_carry_every_contract_series_with_identity_labels(base_url: str) -> None:
    httpx.post(f"{base_url}/v1/completions", json={"prompt": "5+5=", "max_tokens": 3})
    samples = metric_samples(base_url)
    profiling = {"first_confident_layer", "layer_agreement", "depth_agreement", "profiled_tokens", "profiled_requests"}
    for metric in contract.ALL_METRICS:
        nvml_only = (contract.ENERGY_JOULES, contract.GPU_MEMORY_USED_BYTES)
        if metric.name.removeprefix(contract.PREFIX) in profiling or metric in nvml_only:
            continue  # profiling mode only; NVML only
        name = metric.series + ("_count" if metric.kind == "histogram" else "")
        assert name in samples, name
        for labels, _ in samples[name]:
            assert (labels["deployment"], labels["candidate"], labels["depth"]) == ("api-test", "tiny", str(DEPTH))
    ((info, _),) = samples["helios_worker_info"]
    assert (info["device"], info["dtype"]) == ("cpu", "float32")  # `auto` on a machine with no GPU
    values = {n: v for n, rows in samples.items() for labels, v in rows if len(rows) == 1}
    assert values["helios_loaded_layers"] == DEPTH
    assert values["helios_model_layers"] > DEPTH
    assert values["helios_resident_weight_bytes"] > 0 and values["helios_layer_weight_bytes"] > 0
    assert values["helios_kv_cache_bytes"] > 0 and values["helios_kv_bytes_per_token"] > 0
    assert values["helios_generated_tokens_total"] >= 3
    assert values["helios_decode_seconds_total"] > 0


async def test_64_concurrent_requests_are_all_answered_in_shared_batches(base_url: str) -> None:
    before = metric_samples(base_url)
    async with httpx.AsyncClient(base_url=base_url, timeout=120) as client:
        bodies = [{"prompt": f"{i}+{i}=", "max_tokens": 8, "temperature": 0} for i in range(64)]
        responses = await asyncio.gather(*(client.post("/v1/completions", json=b) for b in bodies))
    assert [r.status_code for r in responses] == [200] * 64
    assert all(len(r.json()["choices"][0][EXT]["exit_layers"]) >= 1 for r in responses)
    after = metric_samples(base_url)

    def total(samples: dict[str, list[tuple[dict[str, str], float]]], name: str) -> float:
        return sum(v for _, v in samples.get(name, []))

    steps = total(after, "helios_batch_size_count") - total(before, "helios_batch_size_count")
    rows = total(after, "helios_batch_size_sum") - total(before, "helios_batch_size_sum")
    assert steps > 0
    assert rows / steps > 4, f"mean batch {rows / steps:.1f}: requests were not batched"
    ok = [v for labels, v in after["helios_requests_total"] if labels["status"] == "ok"]
    ok_before = [v for labels, v in before["helios_requests_total"] if labels["status"] == "ok"]
    assert ok[0] - ok_before[0] == 64
