"""What a token means: propagation whatever early_stop says, profiling on serving's context, breaches
only where deeper layers exist, a sampled token's own confidence, and telemetry that cannot stall requests."""

from __future__ import annotations

import threading
from dataclasses import dataclass
from typing import Any

import pytest
import torch

from helios_worker.engine.api import EngineConfig, Finished, GenerationRequest, SamplingParams, TokenEvent
from helios_worker.engine.blocks import family_of
from helios_worker.engine.engine import Engine
from helios_worker.engine.forward import ExitRule, decode, prefill
from helios_worker.engine.kvcache import KVCache
from helios_worker.engine.testing import HFStack, cpu_cache, random_model, random_prompts

MIXED = 0.2  # on the random llama (seed 1), some tokens exit at layer 1 or 2, most run to layer 3
NO_EXITS = 2.0
Result = tuple[list[TokenEvent], Finished]


@pytest.fixture(scope="module")
def llama() -> HFStack:
    return random_model("llama", seed=1)


def run(model: HFStack, requests: list[GenerationRequest], **config: Any) -> list[Result]:
    """generate_batch on a fresh engine, in a thread given 60 s: a hang fails instead of stalling the suite."""
    settings: dict[str, Any] = {"confidence_threshold": MIXED, "max_batch": 4, "max_context": 64, **config}
    observer = settings.pop("observer", None)
    engine = Engine(model, EngineConfig(**settings), observer)
    results: list[Result] = []
    worker = threading.Thread(target=lambda: results.extend(engine.generate_batch(requests)), daemon=True)
    worker.start()
    worker.join(60)
    alive = worker.is_alive()
    engine.stop()
    assert not alive, "the requests never finished"
    return results


def request(prompt: tuple[int, ...], max_tokens: int = 20, **sampling: Any) -> GenerationRequest:
    return GenerationRequest(prompt, SamplingParams(max_tokens=max_tokens, **sampling))


def test_turning_early_stop_off_keeps_state_propagation(llama: HFStack) -> None:
    """early_stop only decides whether a step may skip its last layers; the tokens are the same."""
    reqs = [request((5, 6, 7, 8)), request((40, 41))]
    stopping = run(llama, reqs, early_stop=True)
    running_all = run(llama, reqs, early_stop=False)
    for (a, _), (b, _) in zip(stopping, running_all, strict=True):
        assert [e.token_id for e in a] == [e.token_id for e in b]
        assert [e.exit_layer for e in a] == [e.exit_layer for e in b]
    assert {e.exit_layer for events, _ in stopping for e in events} >= {1, 2, 3}


def _prefilled(model: HFStack, rule: ExitRule) -> tuple[KVCache, torch.Tensor]:
    fam, cache = cpu_cache(model, 4)
    prompts = random_prompts(7, (5, 3, 4, 6))
    first = [prefill(fam, model.exit_logits, cache, rule, slot, torch.tensor(p)) for slot, p in enumerate(prompts)]
    return cache, torch.cat([r.greedy for r in first])


def test_a_profiling_step_writes_the_cache_a_serving_step_writes(llama: HFStack) -> None:
    """So the next tokens' agreement is measured on the context serving would have built."""
    fam = family_of(llama)
    serving = ExitRule(MIXED, "max_prob", profile=False, propagate=True)
    profiling = ExitRule(MIXED, "max_prob", profile=True, propagate=True)
    served_cache, tokens = _prefilled(llama, serving)
    profiled_cache, _ = _prefilled(llama, profiling)
    positions = torch.tensor([5, 3, 4, 6])
    with torch.inference_mode():
        served = decode(fam, llama.exit_logits, served_cache, serving, tokens, positions, 7, early_stop=False)
        profiled = decode(fam, llama.exit_logits, profiled_cache, profiling, tokens, positions, 7, early_stop=False)
    assert torch.equal(served.first_confident, profiled.first_confident)
    exited = served.first_confident.tolist()
    assert any(layer < 3 for layer in exited) and any(layer > 2 for layer in exited)  # both kinds of rows
    torch.testing.assert_close(served_cache.k, profiled_cache.k)
    torch.testing.assert_close(served_cache.v, profiled_cache.v)
    assert profiled.layer_tokens is not None and profiled.exit_layer.tolist() == [3] * 4


def test_profiled_tokens_equal_served_ones_until_the_full_depth_exit_disagrees(llama: HFStack) -> None:
    @dataclass
    class Depths:
        calls: list[tuple[int, ...]]

        def __getattr__(self, name: str) -> Any:
            return lambda *args: self.calls.append(args[2]) if name == "on_profile_token" else None

    depths = Depths([])
    for prompt in ((5, 6, 7, 8), (40, 41), (9, 10, 11)):
        depths.calls.clear()
        ((served, _),) = run(llama, [request(prompt)])
        ((profiled, _),) = run(llama, [request(prompt)], profile=True, observer=depths)
        agreed = [3 in d for d in depths.calls]
        first_miss = agreed.index(False) if False in agreed else len(agreed)
        assert [e.token_id for e in served[:first_miss]] == [e.token_id for e in profiled[:first_miss]]
        if first_miss < len(served):
            assert served[first_miss].token_id != profiled[first_miss].token_id


@dataclass
class Truncated(HFStack):
    """The random llama presented as the first 3 of a 6-layer model."""

    @property
    def model_layers(self) -> int:
        return 6


def test_an_unconfident_token_is_a_breach_only_where_deeper_layers_exist(llama: HFStack) -> None:
    ((full, _),) = run(llama, [request((5, 6, 7), 8)], confidence_threshold=NO_EXITS)
    ((cut, _),) = run(
        Truncated(llama.hf_model, llama.tokenizer), [request((5, 6, 7), 8)], confidence_threshold=NO_EXITS
    )
    assert [e.token_id for e in full] == [e.token_id for e in cut]
    assert not any(e.breach for e in full)  # the whole model: nothing deeper could have been loaded
    assert all(e.breach for e in cut)


def test_a_sampled_token_reports_its_own_probability(llama: HFStack) -> None:
    prompt = (20, 21, 22)
    ((events, _),) = run(llama, [request(prompt, 16, temperature=1.5, seed=4)], confidence_threshold=NO_EXITS)
    ids = [*prompt, *(e.token_id for e in events)]
    with torch.no_grad():
        logits = llama.hf_model(torch.tensor([ids])).logits[0, len(prompt) - 1 : -1]
    probs = torch.softmax(logits.float(), dim=-1)
    own = probs[torch.arange(len(events)), torch.tensor(ids[len(prompt) :])]
    assert [e.confidence for e in events] == pytest.approx(own.tolist(), abs=1e-4)
    assert any(float(o) < float(p.max()) - 0.05 for o, p in zip(own, probs, strict=True))  # not all argmaxes


def test_margin_of_a_sampled_token_that_is_not_the_top_one_is_negative(llama: HFStack) -> None:
    ((events, _),) = run(
        llama,
        [request((20, 21, 22), 16, temperature=2.0, seed=4)],
        confidence_threshold=NO_EXITS,
        confidence_measure="margin",
    )
    assert min(e.confidence for e in events) < 0  # the old report, the argmax's margin, is never negative
    assert all(-1 <= e.confidence <= 1 for e in events)


class FailingObserver:
    """Every hook raises."""

    def __getattr__(self, name: str) -> Any:
        def hook(*args: Any) -> None:
            raise RuntimeError(f"{name} failed")

        return hook


def test_a_failing_observer_neither_stalls_nor_fails_requests(llama: HFStack) -> None:
    reqs = [request((5, 6, 7), 6), request((9,), 4, temperature=1.0, seed=2)]
    quiet = run(llama, reqs)
    noisy = run(llama, reqs, observer=FailingObserver())
    assert [f for _, f in noisy] == [f for _, f in quiet]
    assert [[e.token_id for e in events] for events, _ in noisy] == [[e.token_id for e in ev] for ev, _ in quiet]
    assert all(f.finish_reason == "length" for _, f in noisy)
