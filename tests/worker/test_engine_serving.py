"""The serving path's lean pieces: one exit head per row unless a checkpoint can end the step, a fused
confidence, grouped-query attention without repeated K/V, a serving context, loud graph failures."""

from __future__ import annotations

from typing import Any

import pytest
import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode

from helios_worker.engine.api import EngineConfig, GenerationRequest, GraphCaptureError, SamplingParams
from helios_worker.engine.blocks import attend
from helios_worker.engine.confidence import confidence, token_confidence
from helios_worker.engine.engine import Engine, serving_context
from helios_worker.engine.forward import ExitRule, decode, prefill, prefill_batch
from helios_worker.engine.static import length_buckets
from helios_worker.engine.testing import HFStack, cpu_cache, random_model, random_prompts

MIXED = 0.2


@pytest.fixture(scope="module")
def llama() -> HFStack:
    return random_model("llama", seed=1)


def softmax_confidence(logits: torch.Tensor, measure: str) -> torch.Tensor:
    probs = torch.softmax(logits.float(), dim=-1)
    top2 = probs.topk(2, dim=-1).values
    return top2[:, 0] if measure == "max_prob" else top2[:, 0] - top2[:, 1]


@pytest.mark.parametrize("measure", ["max_prob", "margin"])
def test_the_fused_confidence_equals_the_softmax_one(measure: Any) -> None:
    logits = torch.randn(8, 5000, generator=torch.Generator().manual_seed(0)) * 4
    conf, token = confidence(logits, measure)
    torch.testing.assert_close(conf, softmax_confidence(logits, measure), rtol=1e-5, atol=1e-6)
    assert torch.equal(token, logits.argmax(dim=-1))
    torch.testing.assert_close(token_confidence(logits, token, measure), conf, rtol=1e-5, atol=1e-6)
    low, _ = confidence(logits.bfloat16(), measure)
    torch.testing.assert_close(low, softmax_confidence(logits.bfloat16(), measure), rtol=2e-2, atol=2e-3)


class Allocations(TorchDispatchMode):
    """Dtype and size of every tensor an op returns."""

    def __init__(self) -> None:
        super().__init__()
        self.outputs: list[tuple[torch.dtype, int]] = []

    def __torch_dispatch__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        out = func(*args, **(kwargs or {}))
        for t in out if isinstance(out, tuple | list) else (out,):
            if isinstance(t, torch.Tensor):
                self.outputs.append((t.dtype, t.numel()))
        return out


def test_the_confidence_of_bf16_logits_materialises_no_float32_matrix() -> None:
    logits = torch.randn(4, 3000).bfloat16()
    with Allocations() as seen:
        confidence(logits, "max_prob")
        confidence(logits, "margin")
    assert seen.outputs and max(n for dtype, n in seen.outputs if dtype == torch.float32) <= 4
    assert max(n for _, n in seen.outputs) == logits.numel()  # the bf16 temporaries, nothing wider


def _step(model: HFStack, rule: ExitRule, prompts: list[list[int]], checkpoints: bool, early_stop: bool) -> Any:
    fam, cache = cpu_cache(model, len(prompts))
    first = [prefill(fam, model.exit_logits, cache, rule, s, torch.tensor(p)) for s, p in enumerate(prompts)]
    tokens = torch.cat([r.greedy for r in first])
    positions = torch.tensor([len(p) for p in prompts])
    with torch.inference_mode():
        return decode(fam, model.exit_logits, cache, rule, tokens, positions, 32, early_stop, checkpoints)


def test_serving_without_checkpoints_runs_one_exit_head_per_row_at_the_last_layer(llama: HFStack) -> None:
    prompts = random_prompts(3, (4, 6, 2, 5))
    lean = _step(llama, ExitRule(MIXED, "max_prob", False, True, frozenset()), prompts, True, True)
    every = _step(llama, ExitRule(MIXED, "max_prob", False, True, None), prompts, True, False)
    assert lean.heads == 1 and lean.layers_run == 3
    assert lean.exit_layer.tolist() == [3] * 4
    assert every.heads == 3 and set(every.exit_layer.tolist()) != {3}  # the same rows exit early with checkpoints
    off = _step(llama, ExitRule(MIXED, "max_prob", False, True, None), prompts, False, False)
    assert off.heads == 1 and off.exit_layer.tolist() == [3] * 4  # checkpoints off in this step


def test_a_checkpoint_at_batch_one_ends_the_step(llama: HFStack) -> None:
    rule = ExitRule(0.0, "max_prob", False, True, frozenset({1}))  # every token is confident at layer 1
    result = _step(llama, rule, [[5, 6, 7]], True, True)
    assert (result.heads, result.layers_run, result.exit_layer.tolist()) == (1, 1, [1])


def generate(model: HFStack, prompts: list[tuple[int, ...]], **config: Any) -> list[list[tuple[int, int]]]:
    engine = Engine(model, EngineConfig(confidence_threshold=MIXED, max_batch=4, max_context=64, **config))
    try:
        results = engine.generate_batch(GenerationRequest(p, SamplingParams(max_tokens=10)) for p in prompts)
    finally:
        engine.stop()
    return [[(e.token_id, e.exit_layer) for e in events] for events, _ in results]


def test_checkpoints_run_only_in_steps_small_enough_to_end(llama: HFStack) -> None:
    prompts = [(5, 6, 7, 8), (40, 41)]
    alone = [generate(llama, [p], exit_layers=(1, 2), exit_max_batch=1)[0] for p in prompts]
    together = generate(llama, prompts, exit_layers=(1, 2), exit_max_batch=1)
    assert {layer for row in alone for _, layer in row[1:]} & {1, 2}  # alone, decode steps exit early
    assert all(layer == 3 for row in together for _, layer in row[1:])  # in a batch of 2, only L's head ran
    assert all(layer == 3 for row in generate(llama, prompts, exit_layers=()) for _, layer in row)


@pytest.mark.parametrize("heads,kv_heads", [(4, 2), (8, 1), (4, 4)])
def test_folded_grouped_query_decode_attention_equals_repeated_kv(heads: int, kv_heads: int) -> None:
    g = torch.Generator().manual_seed(heads * 10 + kv_heads)
    q = torch.randn(3, heads, 1, 16, generator=g)
    k, v = torch.randn(3, kv_heads, 9, 16, generator=g), torch.randn(3, kv_heads, 9, 16, generator=g)
    mask = (torch.arange(9)[None, :] <= torch.tensor([8, 3, 5])[:, None])[:, None, None, :]
    rep = heads // kv_heads
    ref = F.scaled_dot_product_attention(
        q, k.repeat_interleave(rep, 1), v.repeat_interleave(rep, 1), attn_mask=mask, scale=0.25
    )
    torch.testing.assert_close(attend(q, k, v, mask, 0.25), ref.transpose(1, 2).reshape(3, 1, -1))


def test_the_context_defaults_to_the_serving_context_capped_by_the_model(llama: HFStack) -> None:
    assert serving_context(EngineConfig(), llama) == 256  # the random model's own limit is smaller
    long = random_model("llama", seed=1)
    long.hf_model.config.max_position_embeddings = 8192  # like SmolLM2
    assert serving_context(EngineConfig(), long) == 4096
    assert serving_context(EngineConfig(max_context=8192), long) == 8192
    assert Engine(long, EngineConfig(max_batch=2)).max_context == 4096


def test_length_buckets_follow_the_live_context() -> None:
    assert length_buckets(4096) == (128, 256, 512, 1024, 2048, 4096)
    assert length_buckets(300) == (128, 256, 300)
    assert length_buckets(64) == (64,)


def test_static_steps_across_a_length_bucket_boundary_equal_eager_ones(llama: HFStack) -> None:
    prompt = tuple(random_prompts(5, (122,))[0])  # decoding crosses the 128-position bucket
    config = EngineConfig(confidence_threshold=MIXED, max_batch=2, max_context=200)
    tokens = []
    for static in (False, True):
        engine = Engine(llama, config, static_steps=static)
        try:
            ((events, _),) = engine.generate_batch([GenerationRequest(prompt, SamplingParams(max_tokens=12))])
        finally:
            engine.stop()
        tokens.append([(e.token_id, e.exit_layer) for e in events])
    assert tokens[0] == tokens[1]


def test_a_graph_that_cannot_be_captured_stops_the_start(llama: HFStack) -> None:
    engine = Engine(llama, EngineConfig(max_batch=2, max_context=64), static_steps=True)
    engine.device = torch.device("cuda")  # as on a GPU, where start() captures the decode graphs

    def fail() -> None:
        raise torch.OutOfMemoryError("CUDA out of memory")

    assert engine._static is not None
    engine._static.capture = fail  # type: ignore[method-assign]
    with pytest.raises(GraphCaptureError, match="lower --max-context or --max-batch"):
        engine.start()
    assert engine.running == 0


@pytest.mark.parametrize("family", ["llama", "qwen2"])
def test_the_fused_layer_reparameterises_the_model_without_changing_its_forward(family: str) -> None:
    model = random_model(family, seed=6)
    ids = torch.tensor([random_prompts(6, (9,))[0]])
    with torch.no_grad():
        before = model.hf_model(ids).logits
        params = sum(p.numel() for p in model.hf_model.parameters())
        Engine(model, EngineConfig(max_batch=1, max_context=32))
        once = model.hf_model(ids).logits
        first_weight = model.hf_model.model.layers[0].self_attn.q_proj.weight.clone()
        Engine(model, EngineConfig(max_batch=1, max_context=32))  # a second engine reuses the first's weights
        twice = model.hf_model(ids).logits
    torch.testing.assert_close(once, before, rtol=1e-4, atol=1e-4)
    assert torch.equal(twice, once)
    assert torch.equal(model.hf_model.model.layers[0].self_attn.q_proj.weight, first_weight)
    assert sum(p.numel() for p in model.hf_model.parameters()) == params  # views of the fused matrices


def test_prompts_prefilled_together_equal_prompts_prefilled_alone(llama: HFStack) -> None:
    prompts = random_prompts(8, (5, 9, 2))
    rule = ExitRule(MIXED, "max_prob", False, True, None)
    fam, alone_cache = cpu_cache(llama, 3)
    alone = [prefill(fam, llama.exit_logits, alone_cache, rule, s, torch.tensor(p)) for s, p in enumerate(prompts)]
    _, together_cache = cpu_cache(llama, 3)
    ids = torch.tensor([p + [0] * (9 - len(p)) for p in prompts])
    together = prefill_batch(fam, llama.exit_logits, together_cache, rule, 0, ids, torch.tensor([5, 9, 2]))
    assert together.greedy.tolist() == [int(r.greedy) for r in alone]
    assert together.first_confident.tolist() == [int(r.first_confident) for r in alone]
    torch.testing.assert_close(together.confidence, torch.cat([r.confidence for r in alone]))
    for slot, p in enumerate(prompts):  # the real positions; the padding's are overwritten before use
        torch.testing.assert_close(together_cache.kv[:, slot, : len(p)], alone_cache.kv[:, slot, : len(p)])


def test_the_prefill_token_budget_splits_prompts_without_changing_tokens(llama: HFStack) -> None:
    prompts = [tuple(p) for p in random_prompts(9, (6, 3, 8, 4))]
    one_pass = generate(llama, prompts, prefill_tokens=8192)
    one_by_one = generate(llama, prompts, prefill_tokens=1)
    assert one_pass == one_by_one


def test_a_burst_of_prompts_beyond_the_token_budget_is_prefilled_between_decode_steps(llama: HFStack) -> None:
    order: list[int] = []
    config = EngineConfig(confidence_threshold=MIXED, max_batch=4, max_context=64, prefill_tokens=6, ignore_eos=True)
    engine = Engine(llama, config)
    for i, prompt in enumerate(random_prompts(10, (5, 4, 6))):  # 5 + 4 padded to 10 > 6: one prompt a step
        engine.submit(GenerationRequest(tuple(prompt), SamplingParams(max_tokens=6)), lambda e, i=i: order.append(i))
    with torch.inference_mode():
        engine.step()
        assert engine.running == 1 and engine.queue_length == 2
        while engine.running or engine.queue_length:
            engine.step()
    engine.stop()
    assert order[:5] == [0, 0, 1, 0, 1]  # prefill 0, decode 0; prefill 1, decode 0 and 1; ...
    assert order.index(2) == 5 and len(order) == 3 * 7  # six tokens and a Finished each
