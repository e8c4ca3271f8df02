"""Logprobs of the emitted token and its top alternatives, from the logits of the layer it exited at."""

from __future__ import annotations

import pytest
import torch

from helios_worker.engine.api import SamplingParams
from helios_worker.engine.sampling import token_logprobs


def test_each_row_gets_its_own_top_k_and_the_chosen_tokens_logprob_even_when_sampled() -> None:
    logits = torch.log(torch.tensor([[0.6, 0.3, 0.1], [0.2, 0.5, 0.3], [0.1, 0.1, 0.8]]))
    params = [SamplingParams(logprobs=2), SamplingParams(), SamplingParams(logprobs=0)]
    (lp0, top0), (lp1, top1), (lp2, top2) = token_logprobs(logits, [1, 1, 0], params)
    assert lp0 == pytest.approx(torch.log(torch.tensor(0.3)).item())  # a sampled, not the top, token
    assert [t for t, _ in top0] == [0, 1] and top0[0][1] == pytest.approx(torch.log(torch.tensor(0.6)).item())
    assert (lp1, top1) == (None, ())
    assert lp2 == pytest.approx(torch.log(torch.tensor(0.1)).item()) and top2 == ()


def test_nothing_is_computed_when_no_row_asks() -> None:
    assert token_logprobs(torch.zeros(2, 5), [0, 1], [SamplingParams(), SamplingParams()]) == [(None, ()), (None, ())]
