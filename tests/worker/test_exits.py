"""Exit confidence, the breach window and profiling agreement: pure logic."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from helios_worker.engine.confidence import BreachWindow, agreement, confidence, exits_enabled


def test_max_prob_is_the_top_softmax_probability_and_its_token() -> None:
    logits = torch.log(torch.tensor([[0.1, 0.7, 0.2], [0.5, 0.25, 0.25]]))
    conf, token = confidence(logits, "max_prob")
    assert conf.tolist() == pytest.approx([0.7, 0.5])
    assert token.tolist() == [1, 0]


def test_margin_is_top_one_minus_top_two() -> None:
    logits = torch.log(torch.tensor([[0.1, 0.7, 0.2], [0.5, 0.25, 0.25], [0.4, 0.4, 0.2]]))
    conf, token = confidence(logits, "margin")
    assert conf.tolist() == pytest.approx([0.5, 0.25, 0.0], abs=1e-6)
    assert token.tolist()[:2] == [1, 0]


def test_confidence_is_computed_in_float32_for_half_precision_logits() -> None:
    conf, _ = confidence(torch.tensor([[10.0, 0.0]], dtype=torch.bfloat16))
    assert conf.dtype == torch.float32 and conf.item() == pytest.approx(1 / (1 + torch.exp(torch.tensor(-10.0))))


def test_a_threshold_above_one_disables_exits() -> None:
    assert exits_enabled(0.9) and exits_enabled(1.0) and not exits_enabled(1.5)


@given(st.integers(1, 20), st.lists(st.booleans(), max_size=80))
def test_breach_window_ratio_is_the_share_of_breaches_among_the_last_tokens(size: int, breaches: list[bool]) -> None:
    window = BreachWindow(size)
    for i, breach in enumerate(breaches):
        window.record(breach)
        last = breaches[max(0, i + 1 - size) : i + 1]
        assert window.tokens == len(last)
        assert window.breaches == sum(last)
        assert window.ratio == pytest.approx(sum(last) / len(last))
    if not breaches:
        assert window.ratio == 0.0 and window.tokens == 0


def test_breach_window_counts_the_breaches_of_its_last_tokens_only() -> None:
    window = BreachWindow(4)
    for breach in (True, True, False, False):
        window.record(breach)
    assert window.breaches == 2
    window.record(True)  # the first True leaves, a new one enters: still 2
    assert window.breaches == 2
    window.record(True)  # the second True leaves: still 2
    assert window.breaches == 2
    window.record(True)  # a False leaves: 3 of 4
    assert window.breaches == 3 and window.ratio == 0.75


def test_breach_window_needs_room_for_a_token() -> None:
    with pytest.raises(ValueError):
        BreachWindow(0)


def test_agreement_of_layers_and_of_truncated_depths() -> None:
    # layer tokens 1..4: the final token is 9; layer 2 is the first confident one and it says 7
    layers, depths = agreement([5, 7, 9, 9], first_confident=2)
    assert layers == (3, 4)
    assert depths == ()  # every depth >= 2 exits at layer 2 (7); depth 1 emits 5
    layers, depths = agreement([5, 9, 7, 9], first_confident=5)  # never confident: depth d emits layer d
    assert layers == (2, 4) and depths == (2, 4)
    _, depths = agreement([9, 7, 7, 9], first_confident=1)
    assert depths == (1, 2, 3, 4)


@given(st.lists(st.integers(0, 3), min_size=1, max_size=12), st.integers(1, 13))
def test_the_full_depth_always_agrees_when_nothing_exits_before_it(tokens: list[int], first: int) -> None:
    layers, depths = agreement(tokens, first_confident=first)
    assert len(tokens) in layers
    assert (len(tokens) in depths) == (min(first, len(tokens)) in layers)
