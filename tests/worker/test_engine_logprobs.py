"""Logprobs of the emitted token and its top alternatives, from the logits of the layer it exited at."""

from __future__ import annotations

import math

import pytest
import torch

from helios_worker.engine.api import EngineConfig, GenerationRequest, SamplingParams
from helios_worker.engine.engine import Engine
from helios_worker.engine.sampling import token_logprobs
from helios_worker.engine.testing import random_model


def test_each_row_gets_its_own_top_k_and_the_chosen_tokens_logprob_even_when_sampled() -> None:
    logits = torch.log(torch.tensor([[0.6, 0.3, 0.1], [0.2, 0.5, 0.3], [0.1, 0.1, 0.8]]))
    params = [SamplingParams(logprobs=2), SamplingParams(), SamplingParams(logprobs=0)]
    (lp0, top0), (lp1, top1), (lp2, top2) = token_logprobs(logits, torch.tensor([1, 1, 0]), params)
    assert lp0 == pytest.approx(torch.log(torch.tensor(0.3)).item())  # a sampled, not the top, token
    assert [t for t, _ in top0] == [0, 1] and top0[0][1] == pytest.approx(torch.log(torch.tensor(0.6)).item())
    assert (lp1, top1) == (None, ())
    assert lp2 == pytest.approx(torch.log(torch.tensor(0.1)).item()) and top2 == ()


def test_nothing_is_computed_when_no_row_asks() -> None:
    nobody = [SamplingParams(), SamplingParams()]
    assert token_logprobs(torch.zeros(2, 5), torch.tensor([0, 1]), nobody) == [(None, ()), (None, ())]


def test_the_engine_reports_logprobs_from_the_layer_each_token_exited_at() -> None:
    """max_prob confidence is the emitted greedy token's probability at its exit layer, so its log is the
    logprob; tokens exit at several layers, and a row that did not ask shares the batch without them."""
    model = random_model("llama", seed=1)
    engine = Engine(model, EngineConfig(confidence_threshold=0.2, max_batch=4, max_context=64))
    engine.start()
    try:
        asked = GenerationRequest((5, 6, 7, 8), SamplingParams(max_tokens=16, logprobs=3))
        plain = GenerationRequest((9, 10, 11), SamplingParams(max_tokens=16))
        (events, _), (others, _) = engine.generate_batch([asked, plain])
    finally:
        engine.stop()
    assert len({e.exit_layer for e in events}) > 1  # exits inside the stack and at the last layer
    for e in events:
        assert e.logprob == pytest.approx(math.log(e.confidence), abs=1e-4)
        assert len(e.top_logprobs) == 3 and e.top_logprobs[0] == (e.token_id, pytest.approx(e.logprob, abs=1e-5))
    assert all(e.logprob is None and e.top_logprobs == () for e in others)
