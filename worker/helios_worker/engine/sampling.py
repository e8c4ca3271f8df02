"""Choosing the emitted token from an exit's logits: greedy, or temperature + top-p with a per-request seed."""

from __future__ import annotations

import random

import torch

from helios_worker.engine.api import SamplingParams


def make_generator(params: SamplingParams, device: torch.device) -> torch.Generator | None:
    """A generator per sampled request, so its tokens depend on its own seed only, not on its batch."""
    if params.temperature <= 0.0:
        return None
    generator = torch.Generator(device=device)
    generator.manual_seed(params.seed if params.seed is not None else random.getrandbits(63))
    return generator


def top_p_filter(probs: torch.Tensor, top_p: float) -> torch.Tensor:
    """Zero the tail of `probs` [vocab] beyond the smallest set whose mass reaches top_p (keeps >= 1 token)."""
    if top_p >= 1.0:
        return probs
    sorted_probs, order = probs.sort(descending=True)
    mass_before = sorted_probs.cumsum(0) - sorted_probs
    keep = mass_before < top_p
    keep[0] = True  # a top_p that rounds to 0 must still leave the most likely token
    sorted_probs = torch.where(keep, sorted_probs, torch.zeros_like(sorted_probs))
    return torch.zeros_like(probs).scatter(0, order, sorted_probs)


def sample_row(logits: torch.Tensor, params: SamplingParams, generator: torch.Generator | None) -> int:
    """The token for one row of logits [vocab]."""
    if params.temperature <= 0.0 or generator is None:
        return int(logits.argmax())
    scaled = logits.float()
    # Shift before scaling: a tiny temperature would otherwise overflow the logits to inf and softmax to NaN.
    probs = torch.softmax((scaled - scaled.max()) / params.temperature, dim=-1)
    if not bool(torch.isfinite(probs).all()):
        return int(logits.argmax())
    probs = top_p_filter(probs, params.top_p)
    return int(torch.multinomial(probs, 1, generator=generator))


def choose_tokens(
    logits: torch.Tensor,
    greedy: torch.Tensor,
    params: list[SamplingParams],
    generators: list[torch.Generator | None],
) -> list[int]:
    """Tokens for a batch: `greedy` [B] (argmax, already computed) for greedy rows, a draw for sampled ones."""
    tokens: list[int] = greedy.tolist()
    for row, (p, g) in enumerate(zip(params, generators, strict=True)):
        if g is not None:
            tokens[row] = sample_row(logits[row], p, g)
    return tokens


Logprobs = tuple[float | None, tuple[tuple[int, float], ...]]


def token_logprobs(logits: torch.Tensor, tokens: list[int], params: list[SamplingParams]) -> list[Logprobs]:
    """Per row, the chosen token's log-probability under the exit layer's logits and the top
    `params.logprobs` tokens; (None, ()) for rows that did not ask. Computed only when one did."""
    asked = [p.logprobs for p in params]
    if all(k is None for k in asked):
        return [(None, ())] * len(tokens)
    logp = torch.log_softmax(logits.float(), dim=-1)
    chosen = logp.gather(1, torch.tensor(tokens, device=logp.device)[:, None])[:, 0].tolist()
    top = max(k or 0 for k in asked)
    values, ids = logp.topk(top, dim=-1) if top else (logp[:, :0], logp[:, :0].long())
    out: list[Logprobs] = []
    for row, k in enumerate(asked):
        if k is None:
            out.append((None, ()))
        else:
            pairs = tuple(zip(ids[row, :k].tolist(), values[row, :k].tolist(), strict=True))
            out.append((chosen[row], pairs))
    return out
