"""The engine's own decoder blocks and KV cache against transformers' generate(), for every family."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from helios_worker.engine.api import EngineConfig, GenerationRequest, SamplingParams
from helios_worker.engine.engine import Engine
from helios_worker.engine.forward import ExitRule, StepOutput, decode, prefill
from helios_worker.engine.kvcache import KVCache, plan_cache
from helios_worker.engine.testing import HFStack, cpu_cache, random_model, random_prompts
from helios_worker.models.loading import load_partial

FAMILIES = ("llama", "qwen2", "gpt2")
NO_EXITS = 2.0  # a threshold no confidence reaches: every token runs the whole stack
EOS = 2


def hf_generate(model: HFStack, batch: list[list[int]], new_tokens: int) -> list[list[int]]:
    """Greedy generate() on a left-padded batch; each row cut after its first EOS."""
    width = max(map(len, batch))
    ids = torch.tensor([[0] * (width - len(p)) + p for p in batch])
    mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in batch])
    with torch.no_grad():
        out = model.hf_model.generate(
            input_ids=ids, attention_mask=mask, max_new_tokens=new_tokens, do_sample=False, pad_token_id=0
        )
    rows = []
    for row in out[:, width:].tolist():
        rows.append(row[: row.index(EOS) + 1] if EOS in row else row)
    return rows


@pytest.mark.parametrize("family", FAMILIES)
def test_decoding_without_exits_equals_generate_on_a_padded_batch(family: str) -> None:
    model = random_model(family, seed=1)
    batch = random_prompts(1, (3, 9, 1, 6))
    expected = hf_generate(model, batch, 12)
    engine = Engine(model, EngineConfig(confidence_threshold=NO_EXITS, max_batch=4, max_context=64))
    try:
        results = engine.generate_batch(GenerationRequest(tuple(p), SamplingParams(max_tokens=12)) for p in batch)
    finally:
        engine.stop()
    got = [[e.token_id for e in events] for events, _ in results]
    assert got == expected
    assert len({tuple(r) for r in got}) > 1  # the rows differ: a wrong mask or position would show
    for events, finished in results:
        assert all(e.exit_layer == 3 and not e.breach for e in events)  # full depth: nothing deeper to load
        assert finished.finish_reason == ("stop" if events[-1].token_id == EOS else "length")


def run_steps(model: HFStack, threshold: float, early_stop: bool, steps: int) -> tuple[list[StepOutput], KVCache]:
    """Prefill two prompts into slots 0 and 1, then greedy-decode them together for `steps` steps."""
    fam, cache = cpu_cache(model, 2)
    rule = ExitRule(threshold, "max_prob", profile=False, propagate=True)
    first = [
        prefill(fam, model.exit_logits, cache, rule, slot, torch.tensor(p))
        for slot, p in enumerate(random_prompts(2, (5, 3)))
    ]
    tokens = torch.cat([r.greedy for r in first])
    positions = torch.tensor([5, 3])
    results = []
    with torch.inference_mode():
        for _ in range(steps):
            length = int(positions.max()) + 1
            result = decode(fam, model.exit_logits, cache, rule, tokens, positions, length, early_stop)
            results.append(result)
            tokens, positions = result.greedy, positions + 1
    return results, cache


def test_an_early_stopped_step_fills_the_cache_as_running_every_layer_would() -> None:
    model = random_model("llama", seed=1)
    stopped, stopped_cache = run_steps(model, 0.15, early_stop=True, steps=12)
    full, full_cache = run_steps(model, 0.15, early_stop=False, steps=12)
    assert any(r.layers_run < 3 for r in stopped)  # some steps did stop early
    assert all(r.layers_run == 3 for r in full)
    for a, b in zip(stopped, full, strict=True):
        assert a.greedy.tolist() == b.greedy.tolist()
        assert a.exit_layer.tolist() == b.exit_layer.tolist()
        torch.testing.assert_close(a.logits, b.logits)
    torch.testing.assert_close(stopped_cache.k, full_cache.k)
    torch.testing.assert_close(stopped_cache.v, full_cache.v)


def test_tokens_after_propagated_steps_have_finite_deterministic_logits() -> None:
    model = random_model("qwen2", seed=2)
    once, _ = run_steps(model, 0.15, early_stop=True, steps=10)
    again, _ = run_steps(model, 0.15, early_stop=True, steps=10)
    assert {int(layer) for r in once for layer in r.exit_layer} >= {1, 3}
    for a, b in zip(once, again, strict=True):
        assert torch.isfinite(a.logits).all()
        assert torch.equal(a.logits, b.logits)


@pytest.mark.parametrize("family", FAMILIES)
def test_with_every_token_exiting_at_layer_one_decoding_still_yields_valid_tokens(family: str) -> None:
    model = random_model(family, seed=3)
    engine = Engine(model, EngineConfig(confidence_threshold=0.0, max_batch=2, max_context=64))
    try:
        runs = [engine.generate_batch([GenerationRequest((7, 8, 9), SamplingParams(max_tokens=16))]) for _ in "ab"]
    finally:
        engine.stop()
    ((events, finished),) = runs[0]
    assert [e.token_id for e in events] == [e.token_id for e in runs[1][0][0]]
    assert all(e.exit_layer == 1 and not e.breach for e in events)
    assert all(0 <= e.token_id < len(model.tokenizer) for e in events)
    assert finished.completion_tokens == len(events)


def test_the_cache_plan_fits_the_budget_with_full_context_first() -> None:
    per_token = 2 * 4 * 2 * 16 * 2  # K and V, 4 layers, 2 kv heads, head_dim 16, bf16
    shape = {"layers": 4, "kv_heads": 2, "head_dim": 16, "dtype_bytes": 2, "max_batch": 8, "max_context": 100}
    assert plan_cache(**shape, budget_bytes=None).slots == 8
    assert plan_cache(**shape, budget_bytes=3 * 100 * per_token + 5).slots == 3
    short = plan_cache(**shape, budget_bytes=40 * per_token)
    assert (short.slots, short.max_seq) == (1, 40)
    assert plan_cache(**shape, budget_bytes=None).bytes == 8 * 100 * per_token
    with pytest.raises(ValueError):
        plan_cache(**shape, budget_bytes=per_token - 1)


def test_moving_a_slot_keeps_its_entries_and_frees_the_source() -> None:
    cache = KVCache(
        plan_cache(layers=2, kv_heads=1, head_dim=2, dtype_bytes=4, max_batch=3, max_context=4, budget_bytes=None),
        torch.device("cpu"),
        torch.float32,
    )
    slots = [cache.allocate() for _ in range(3)]
    assert slots == [0, 1, 2] and cache.allocate() is None
    cache.k[:, 2] = torch.arange(16.0).view(2, 1, 4, 2)
    cache.release(0)
    cache.move(2, 0, length=3)
    assert torch.equal(cache.k[:, 0, :, :3], torch.arange(16.0).view(2, 1, 4, 2)[:, :, :3])
    assert cache.allocate() == 2  # the moved row's old slot is the free one now


@pytest.mark.parametrize("family", FAMILIES)
def test_a_partially_loaded_model_decodes_like_its_first_layers_in_memory(family: str, tmp_path: Path) -> None:
    """load_partial(dir, 2) through the engine equals generate() of the same model cut to 2 layers in memory."""
    model = random_model(family, seed=4)
    model.hf_model.save_pretrained(tmp_path)
    model.tokenizer.save_pretrained(tmp_path)
    partial = load_partial(tmp_path, 2)
    base = model.hf_model.transformer if family == "gpt2" else model.hf_model.model
    if family == "gpt2":
        base.h = base.h[:2]
    else:
        base.layers = base.layers[:2]
    model.hf_model.config.num_hidden_layers = 2
    batch = random_prompts(4, (4, 7))
    expected = hf_generate(model, batch, 8)
    engine = Engine(partial, EngineConfig(confidence_threshold=NO_EXITS, max_batch=2, max_context=64))
    try:
        results = engine.generate_batch(GenerationRequest(tuple(p), SamplingParams(max_tokens=8)) for p in batch)
    finally:
        engine.stop()
    assert [[e.token_id for e in events] for events, _ in results] == expected
    assert all(e.exit_layer == 2 for events, _ in results for e in events)
