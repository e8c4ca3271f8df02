"""Prefill and decode over the loaded stack, with HELIOS exits decided per row as the layers run.

Semantics (identical on every path): a token is emitted at its first layer whose exit confidence
reaches the threshold, else at the last loaded layer L as a breach. With state propagation, a row's
K/V at layers above its exit are computed from its exit hidden state (CALM-style), whether the step
stopped early (eager path, all rows confident: only the K/V projections of the skipped layers run)
or ran every layer with the exited rows' inputs replaced (graph path: no host synchronisation).
Either way a row's tokens do not depend on which other rows share its batch.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from helios_worker.engine.api import ConfidenceMeasure
from helios_worker.engine.blocks import Family, Rope, attend
from helios_worker.engine.confidence import confidence, exits_enabled
from helios_worker.engine.kvcache import KVCache

ExitHead = Callable[[torch.Tensor, int], torch.Tensor]  # hidden [B, hidden], 1-based layer -> logits [B, vocab]


@dataclass(frozen=True)
class ExitRule:
    threshold: float
    measure: ConfidenceMeasure
    profile: bool  # emit the last layer's token; record every layer
    propagate: bool  # fill an exited row's deeper K/V from its exit state

    @property
    def exits(self) -> bool:
        return exits_enabled(self.threshold)


@dataclass
class StepOutput:
    """Per row of one step: what to emit and where it exited."""

    exit_layer: torch.Tensor  # [B] 1-based layer the token is emitted from
    first_confident: torch.Tensor  # [B] first confident layer, L+1 when none was: a breach
    confidence: torch.Tensor  # [B] at the exit layer
    greedy: torch.Tensor  # [B] argmax at the exit layer
    logits: torch.Tensor  # [B, vocab] at the exit layer, for sampling
    layer_tokens: torch.Tensor | None  # profiling: [L, B] argmax at every layer
    layers_run: int  # full layers computed (less than L when the step stopped early)


class ExitTracker:
    """Follows each row through the layers: first confident layer, selected logits, exit hidden state."""

    def __init__(self, rule: ExitRule, head: ExitHead, layers: int, batch: int, device: torch.device) -> None:
        self.rule, self._head, self.layers = rule, head, layers
        self.first_confident = torch.full((batch,), layers + 1, dtype=torch.long, device=device)
        self._logits: torch.Tensor | None = None
        self._conf = torch.zeros(batch, device=device)
        self._greedy = torch.zeros(batch, dtype=torch.long, device=device)
        self.exit_hidden: torch.Tensor | None = None
        self._layer_tokens: list[torch.Tensor] = []
        self.layers_run = layers

    def layer_input(self, h: torch.Tensor) -> torch.Tensor:
        """A row that already exited feeds its exit state to the next layer (state propagation)."""
        if self.exit_hidden is None:
            return h
        exited = (self.first_confident <= self.layers).view(-1, *([1] * (h.dim() - 1)))
        return torch.where(exited, self.exit_hidden, h)

    def all_exited(self) -> bool:
        """Host synchronisation: only the eager path asks."""
        return bool((self.first_confident <= self.layers).all())

    def observe(self, layer: int, h: torch.Tensor) -> None:
        """Layer `layer` (1-based) produced h [B, T, hidden]; its last position is the row's exit state."""
        rule, last = self.rule, layer == self.layers
        if not (last or rule.profile or rule.exits):
            return
        logits = self._head(h[:, -1], layer)
        conf, greedy = confidence(logits, rule.measure)
        if rule.profile:
            self._layer_tokens.append(greedy)
        unexited = self.first_confident > self.layers
        new = unexited & (conf >= rule.threshold)
        self.first_confident = torch.where(new, layer, self.first_confident)
        take = torch.full_like(new, last) if rule.profile else new | (unexited & last)
        if self._logits is None:
            self._logits = torch.zeros_like(logits)
        self._logits = torch.where(take[:, None], logits, self._logits)
        self._conf = torch.where(take, conf, self._conf)
        self._greedy = torch.where(take, greedy, self._greedy)
        if rule.propagate and not rule.profile and rule.exits and not last:
            if self.exit_hidden is None:
                self.exit_hidden = torch.zeros_like(h)
            self.exit_hidden = torch.where(new.view(-1, *([1] * (h.dim() - 1))), h, self.exit_hidden)

    def result(self) -> StepOutput:
        assert self._logits is not None
        exit_layer = torch.clamp(self.first_confident, max=self.layers)
        if self.rule.profile:
            exit_layer = torch.full_like(exit_layer, self.layers)
        tokens = torch.stack(self._layer_tokens) if self._layer_tokens else None
        return StepOutput(
            exit_layer, self.first_confident, self._conf, self._greedy, self._logits, tokens, self.layers_run
        )


def prefill(fam: Family, head: ExitHead, cache: KVCache, rule: ExitRule, slot: int, prompt: torch.Tensor) -> StepOutput:
    """Run a prompt [T] through every loaded layer into `slot`; exits decide the first generated token."""
    ids = prompt[None]
    positions = torch.arange(ids.shape[1], device=ids.device)[None]
    h = fam.embed(ids, positions)
    rope = fam.rope(positions, h)
    # The prompt's own K/V are computed at full depth: no propagation for prompt tokens.
    no_propagation = ExitRule(rule.threshold, rule.measure, rule.profile, propagate=False)
    tracker = ExitTracker(no_propagation, head, len(fam.layers), 1, ids.device)
    for i in range(len(fam.layers)):
        q, k, v = fam.qkv(i, fam.attn_input(i, h), rope)
        cache.write_prefix(i, slot, k[0], v[0])
        h = fam.finish(i, h, attend(q, k, v, None, fam.scale(i)))
        tracker.observe(i + 1, h)
    return tracker.result()


def _write_kv(
    fam: Family,
    cache: KVCache,
    i: int,
    h: torch.Tensor,
    rope: Rope | None,
    rows: torch.Tensor,
    positions: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    q, k, v = fam.qkv(i, fam.attn_input(i, h), rope)
    cache.write(i, rows, positions, k[:, :, 0], v[:, :, 0])
    return q, k, v


def decode(
    fam: Family,
    head: ExitHead,
    cache: KVCache,
    rule: ExitRule,
    tokens: torch.Tensor,
    positions: torch.Tensor,
    length: int,
    early_stop: bool,
) -> StepOutput:
    """One token per row: tokens, positions [B], row i in cache slot i; attention reads `length` positions.

    `early_stop` (eager only) ends the step once every row exited, filling the skipped layers' K/V from
    each row's exit state; without it every layer runs and no value is read back to the host.
    """
    pos = positions[:, None]
    h = fam.embed(tokens[:, None], pos)
    rope = fam.rope(pos, h)
    keys = torch.arange(length, device=tokens.device)
    mask = (keys[None, :] <= positions[:, None])[:, None, None, :]
    layers, batch = len(fam.layers), tokens.shape[0]
    rows = torch.arange(batch, device=tokens.device)
    tracker = ExitTracker(rule, head, layers, batch, tokens.device)
    for i in range(layers):
        h = tracker.layer_input(h)
        q, _, _ = _write_kv(fam, cache, i, h, rope, rows, positions)
        k, v = cache.read(i, batch, length)
        h = fam.finish(i, h, attend(q, k, v, mask, fam.scale(i)))
        tracker.observe(i + 1, h)
        if early_stop and i + 1 < layers and tracker.exit_hidden is not None and tracker.all_exited():
            for j in range(i + 1, layers):
                _write_kv(fam, cache, j, tracker.exit_hidden, rope, rows, positions)
            tracker.layers_run = i + 1
            break
    return tracker.result()
