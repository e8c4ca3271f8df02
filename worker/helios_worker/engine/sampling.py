"""Choosing the emitted tokens from the exits' logits, batched on the device: greedy, or temperature + top-p.

Each sampled request draws its uniforms from its own seeded host generator (one number per token),
so its tokens depend on its seed only, not on its batch, and the draw needs no device generator and
no host synchronisation: the sample is the inverse CDF of the filtered distribution at that number.
"""

from __future__ import annotations

import random

import torch

from helios_worker.engine.api import SamplingParams


def make_rng(params: SamplingParams) -> random.Random | None:
    """A uniform stream per sampled request; None for a greedy one."""
    if params.temperature <= 0.0:
        return None
    return random.Random(params.seed if params.seed is not None else random.getrandbits(63))


def top_p_filter(probs: torch.Tensor, top_p: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(kept probabilities sorted descending [B, vocab], their token ids) for each row's top_p [B]:
    the smallest prefix whose mass reaches top_p, never empty."""
    sorted_probs, order = probs.sort(dim=-1, descending=True)
    mass_before = sorted_probs.cumsum(dim=-1) - sorted_probs
    keep = mass_before < top_p[:, None]
    keep[:, 0] = True  # a top_p that rounds to 0 must still leave the most likely token
    return sorted_probs * keep, order


def sample(logits: torch.Tensor, temperature: torch.Tensor, top_p: torch.Tensor, uniform: torch.Tensor) -> torch.Tensor:
    """One token per row of `logits` [B, vocab], with per-row temperature (> 0), top_p and uniform in [0, 1)."""
    scaled = logits.float()
    # Shift before scaling: a tiny temperature would otherwise overflow the logits to inf and softmax to NaN.
    # A temperature below float32's range (5e-324) would be 0: floor it, which is greedy in effect.
    floor = torch.finfo(torch.float32).tiny
    scaled = (scaled - scaled.max(dim=-1, keepdim=True).values) / temperature.float().clamp_min(floor)[:, None]
    probs = torch.softmax(scaled, dim=-1)
    kept, order = top_p_filter(probs, top_p)
    cdf = kept.cumsum(dim=-1)
    target = (uniform * cdf[:, -1])[:, None]
    last_kept = (kept > 0).sum(dim=-1, keepdim=True) - 1  # rounding must not pick a filtered token
    index = torch.minimum(torch.searchsorted(cdf, target, right=True), last_kept)
    return order.gather(1, index)[:, 0]


def choose_tokens(
    logits: torch.Tensor,
    greedy: torch.Tensor,
    params: list[SamplingParams],
    rngs: list[random.Random | None],
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(tokens [B] on the device, the sampled rows' indices or None): `greedy` for greedy rows, a draw for
    sampled ones. Reads nothing back from the device."""
    sampled = [i for i, rng in enumerate(rngs) if rng is not None]
    if not sampled:
        return greedy, None
    device = logits.device
    rows = torch.tensor(sampled, device=device)
    temperature = torch.tensor([params[i].temperature for i in sampled], device=device)
    top_p = torch.tensor([params[i].top_p for i in sampled], device=device)
    uniform = torch.tensor([rngs[i].random() for i in sampled], device=device)  # type: ignore[union-attr]
    tokens = greedy.clone()
    tokens[rows] = sample(logits[rows], temperature, top_p, uniform)
    return tokens, rows


Logprobs = tuple[float | None, tuple[tuple[int, float], ...]]


def token_logprobs(logits: torch.Tensor, tokens: torch.Tensor, params: list[SamplingParams]) -> list[Logprobs]:
    """Per row, the chosen token's log-probability under the exit layer's logits [B, vocab] and the top
    `params.logprobs` tokens; (None, ()) for rows that did not ask. Touches the device only when one did."""
    asked = [p.logprobs for p in params]
    if all(k is None for k in asked):
        return [(None, ())] * len(asked)
    logp = torch.log_softmax(logits.float(), dim=-1)
    chosen = logp.gather(1, tokens[:, None].long())[:, 0].tolist()
    top = max(k or 0 for k in asked)
    values, ids = logp.topk(top, dim=-1)
    top_values, top_ids = values.tolist(), ids.tolist()
    return [
        (None, ()) if k is None else (chosen[row], tuple(zip(top_ids[row][:k], top_values[row][:k], strict=True)))
        for row, k in enumerate(asked)
    ]
