"""Exit confidence and the confidence-breach window: the two numbers HELIOS adapts on."""

from __future__ import annotations

from collections import deque

import torch

from helios_worker.engine.api import ConfidenceMeasure


def confidence(logits: torch.Tensor, measure: ConfidenceMeasure = "max_prob") -> tuple[torch.Tensor, torch.Tensor]:
    """(confidence, argmax token) per row of `logits` [..., vocab]; the confidence is float32.

    max_prob is the top softmax probability; margin is top-1 minus top-2 probability (both in [0, 1]).
    A fused reduction: max (or top-2) and the sum of exp(logit - max), accumulated in float32, so no
    float32 probability matrix is materialised for low-precision logits.
    """
    if measure == "max_prob":
        top, token = logits.max(dim=-1)
        second = None
    elif measure == "margin":
        top2, idx = logits.topk(2, dim=-1)
        top, token, second = top2[..., 0], idx[..., 0], top2[..., 1]
    else:
        raise ValueError(f"unknown confidence measure {measure!r}")
    total = torch.exp(logits - top.unsqueeze(-1)).sum(dim=-1, dtype=torch.float32)
    if second is None:
        return total.reciprocal(), token
    return (1.0 - torch.exp((second - top).float())) / total, token


def token_confidence(logits: torch.Tensor, tokens: torch.Tensor, measure: ConfidenceMeasure) -> torch.Tensor:
    """The confidence of given tokens [B] (e.g. sampled ones) under `logits` [B, vocab], float32.

    max_prob: the token's own probability; margin: its probability minus the best other token's
    (negative when it is not the most likely one). Equals confidence() for the argmax token.
    """
    top2, idx = logits.topk(2, dim=-1)
    top = top2[:, 0]
    total = torch.exp(logits - top.unsqueeze(-1)).sum(dim=-1, dtype=torch.float32)
    own = torch.exp((logits.gather(1, tokens[:, None])[:, 0] - top).float()) / total
    if measure == "max_prob":
        return own
    best_other = torch.where(tokens == idx[:, 0], top2[:, 1], top)
    return own - torch.exp((best_other - top).float()) / total


def exits_enabled(threshold: float) -> bool:
    """A threshold above 1 can never be met: every token runs the whole loaded stack."""
    return threshold <= 1.0


class BreachWindow:
    """The last `size` emitted tokens, each a breach or not; its ratio drives adaptation."""

    def __init__(self, size: int) -> None:
        if size < 1:
            raise ValueError("the breach window holds at least one token")
        self.size = size
        self._window: deque[bool] = deque(maxlen=size)
        self._breaches = 0

    def record(self, breach: bool) -> None:
        if len(self._window) == self.size and self._window[0]:
            self._breaches -= 1
        self._window.append(breach)
        self._breaches += int(breach)

    @property
    def tokens(self) -> int:
        return len(self._window)

    @property
    def breaches(self) -> int:
        return self._breaches

    @property
    def ratio(self) -> float:
        """Breaches over the tokens seen, up to `size` of them; 0 before the first token."""
        return self._breaches / len(self._window) if self._window else 0.0


def agreement(layer_tokens: list[int], first_confident: int) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """Profiling: (layers whose own token equals the last layer's, depths whose early-exit token does).

    `layer_tokens[l-1]` is layer l's token; early-exit decoding truncated at depth d emits the token of
    the first confident layer if that is <= d, else the token of layer d.
    """
    final = layer_tokens[-1]
    layers = tuple(i + 1 for i, token in enumerate(layer_tokens) if token == final)
    depths = tuple(d for d in range(1, len(layer_tokens) + 1) if layer_tokens[min(first_confident, d) - 1] == final)
    return layers, depths
