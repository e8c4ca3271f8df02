"""Prefill and decode over the loaded stack, with HELIOS exits decided per row as the layers run.

Semantics (identical on every path): a token is emitted at its first exit checkpoint whose
confidence reaches the threshold, else at the last loaded layer L (a breach when deeper layers
exist). Serving evaluates one exit head per row at L, plus the rule's checkpoints in steps where the
engine turns them on (where they can end the step); profiling evaluates every layer. With state
propagation, a row's K/V at layers above its exit are computed from its exit hidden state
(CALM-style), whether the step stopped early (eager path, all rows confident: only the K/V
projections of the skipped layers run), ran every layer with the exited rows' inputs replaced (graph
path: no host synchronisation), or profiled every layer (the chain runs on, the cache gets the exit
state's K/V). A row's tokens do not depend on which other rows share its batch, except through
whether its steps had checkpoints on. Rotary families decode through the fused layer (fused.py). Where
the model carries trained exit adapters (the rule's `translate`), every exit, the last layer's included,
translates its hidden state before the shared head.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, replace

import torch

from helios_worker.engine.api import ConfidenceMeasure
from helios_worker.engine.blocks import Family, Rope, attend
from helios_worker.engine.confidence import confidence, exits_enabled
from helios_worker.engine.kvcache import KVCache

ExitHead = Callable[[torch.Tensor], torch.Tensor]  # hidden [B, hidden] -> logits [B, vocab]
ExitTranslate = Callable[[torch.Tensor, int], torch.Tensor]  # hidden [B, hidden] at a 1-based layer -> head input


@dataclass(frozen=True)
class ExitRule:
    threshold: float
    measure: ConfidenceMeasure
    profile: bool  # emit the last layer's token; record every layer's exit
    propagate: bool = True  # fill an exited row's deeper K/V from its exit state
    exit_layers: frozenset[int] | None = None  # checkpoints below L (1-based); None: every layer
    translate: ExitTranslate | None = None  # trained exit adapters (models.exit_adapters), at every exit

    @property
    def exits(self) -> bool:
        return exits_enabled(self.threshold)

    def checks(self, layer: int, layers: int, checkpoints: bool) -> bool:
        """Whether the exit head runs after `layer` of `layers` in a step whose checkpoints are on."""
        if layer == layers or self.profile:
            return True
        if not (checkpoints and self.exits):
            return False
        return self.exit_layers is None or layer in self.exit_layers


@dataclass
class StepOutput:
    """Per row of one step: what to emit and where it exited."""

    exit_layer: torch.Tensor  # [B] 1-based layer the token is emitted from
    first_confident: torch.Tensor  # [B] first confident layer, L+1 when none was: a breach
    confidence: torch.Tensor  # [B] at the exit layer, of its argmax
    greedy: torch.Tensor  # [B] argmax at the exit layer
    logits: torch.Tensor  # [B, vocab] at the exit layer, for sampling
    layer_tokens: torch.Tensor | None  # profiling: [L, B] argmax at every layer
    layers_run: int  # full layers computed (less than L when the step stopped early)
    heads: int = 0  # exit-head evaluations per row in this step


def _rows_view(mask: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    return mask.view(-1, *([1] * (like.dim() - 1)))


class ExitTracker:
    """Follows each row through the layers: first confident layer, selected logits, exit hidden state."""

    def __init__(
        self,
        rule: ExitRule,
        head: ExitHead,
        layers: int,
        batch: int,
        device: torch.device,
        checkpoints: bool,
        hidden_of: Callable[[torch.Tensor], torch.Tensor] | None = None,  # a layer's output -> its hidden state
    ) -> None:
        self.rule, self._head, self.layers, self._checkpoints = rule, head, layers, checkpoints
        self._hidden_of = hidden_of
        self.first_confident = torch.full((batch,), layers + 1, dtype=torch.long, device=device)
        self._logits: torch.Tensor | None = None
        self._conf = torch.zeros(batch, device=device)
        self._greedy = torch.zeros(batch, dtype=torch.long, device=device)
        self.exit_hidden: torch.Tensor | None = None
        self._layer_tokens: list[torch.Tensor] = []
        self.layers_run = layers
        self.heads = 0

    def checks(self, layer: int) -> bool:
        return self.rule.checks(layer, self.layers, self._checkpoints)

    def exited(self, like: torch.Tensor) -> torch.Tensor | None:
        """[B, 1, ...] rows that exited below the current layer, None before any exit was possible."""
        if self.exit_hidden is None:
            return None
        return _rows_view(self.first_confident <= self.layers, like)

    def layer_input(self, h: torch.Tensor) -> torch.Tensor:
        """Serving: a row that already exited feeds its exit state to the next layer (state propagation)."""
        exited = self.exited(h)
        if exited is None or self.rule.profile:
            return h
        assert self.exit_hidden is not None
        return torch.where(exited, self.exit_hidden, h)

    def all_exited(self) -> bool:
        """Host synchronisation: only the eager path asks, after a checkpoint."""
        return bool((self.first_confident <= self.layers).all())

    def observe(self, layer: int, h: torch.Tensor) -> None:
        """Layer `layer` (1-based) produced h [B, T, hidden]; its last position is the row's exit state."""
        rule, last = self.rule, layer == self.layers
        if not self.checks(layer):
            return
        self.heads += 1
        hidden = h if h.dim() == 2 else h[:, -1]
        if self._hidden_of is not None:
            hidden = self._hidden_of(hidden)
        if rule.translate is not None:
            hidden = rule.translate(hidden, layer)
        logits = self._head(hidden)
        conf, greedy = confidence(logits, rule.measure)
        if rule.profile:
            self._layer_tokens.append(greedy)
        if self._logits is None and last:  # the only exit of the step: nothing to select
            self.first_confident = torch.where(conf >= rule.threshold, layer, layer + 1)
            self._logits, self._conf, self._greedy = logits, conf, greedy
            return
        unexited = self.first_confident > self.layers
        new = unexited & (conf >= rule.threshold)
        self.first_confident = torch.where(new, layer, self.first_confident)
        take = torch.full_like(new, last) if rule.profile else new | (unexited & last)
        if self._logits is None:
            self._logits = torch.zeros_like(logits)
        self._logits = torch.where(take[:, None], logits, self._logits)
        self._conf = torch.where(take, conf, self._conf)
        self._greedy = torch.where(take, greedy, self._greedy)
        if rule.propagate and rule.exits and not last:
            if self.exit_hidden is None:
                self.exit_hidden = torch.zeros_like(h)
            self.exit_hidden = torch.where(_rows_view(new, h), h, self.exit_hidden)

    def result(self) -> StepOutput:
        assert self._logits is not None
        exit_layer = torch.clamp(self.first_confident, max=self.layers)
        if self.rule.profile:
            exit_layer = torch.full_like(exit_layer, self.layers)
        tokens = torch.stack(self._layer_tokens) if self._layer_tokens else None
        return StepOutput(
            exit_layer,
            self.first_confident,
            self._conf,
            self._greedy,
            self._logits,
            tokens,
            self.layers_run,
            self.heads,
        )


def prefill(
    fam: Family,
    head: ExitHead,
    cache: KVCache,
    rule: ExitRule,
    slot: int,
    prompt: torch.Tensor,
    checkpoints: bool = True,
) -> StepOutput:
    """Run a prompt [T] through every loaded layer into `slot`; exits decide the first generated token."""
    lengths = torch.tensor([prompt.shape[0]], device=prompt.device)
    return prefill_batch(fam, head, cache, rule, slot, prompt[None], lengths, checkpoints)


def prefill_batch(
    fam: Family,
    head: ExitHead,
    cache: KVCache,
    rule: ExitRule,
    first_slot: int,
    ids: torch.Tensor,
    lengths: torch.Tensor,
    checkpoints: bool = True,
) -> StepOutput:
    """Prompts `ids` [N, T], right-padded, of `lengths` [N], into slots first_slot.. in one pass.

    Causal attention keeps a real position from seeing the padding after it; the padding's K/V land in
    cache positions the rows' first decode steps overwrite before they are read. Exits read each row's
    last real position.
    """
    n, t = ids.shape
    positions = torch.arange(t, device=ids.device)[None].expand(n, t)
    h = fam.embed(ids, positions)
    rope = fam.rope(positions, h)
    # The prompt's own K/V are computed at full depth: no propagation for prompt tokens.
    no_propagation = replace(rule, propagate=False)
    tracker = ExitTracker(no_propagation, head, len(fam.layers), n, ids.device, checkpoints)
    rows, last = torch.arange(n, device=ids.device), lengths - 1
    for i in range(len(fam.layers)):
        q, k, v = fam.qkv(i, fam.attn_input(i, h), rope)
        cache.write_prompts(i, first_slot, k, v)
        h = fam.finish(i, h, attend(q, k, v, None, fam.scale(i)))
        if tracker.checks(i + 1):
            tracker.observe(i + 1, h[rows, last])
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
    checkpoints: bool = True,
) -> StepOutput:
    """One token per row: tokens, positions [B], row i in cache slot i; attention reads `length` positions.

    `checkpoints`: whether the rule's exits below L are evaluated in this step (else one head per row,
    at L). `early_stop` (eager only) ends the step once every row exited, filling the skipped layers'
    K/V from each row's exit state; without it every layer runs and no value is read back to the host.
    Profiling runs every layer for every row, but writes an exited row's deeper K/V from its exit
    state, as serving does, so the next tokens' agreement is measured on the context serving builds.
    """
    pos = positions[:, None]
    h = fam.embed(tokens[:, None], pos)
    rope = fam.rope(pos, h)
    layers, batch = len(fam.layers), tokens.shape[0]
    fused = fam.fused if not rule.profile else None
    if fused is not None:  # serving on a rotary family: the lean layer on the state [B, hidden + 1]
        assert rope is not None
        step = fused.prepare(rope, cache, positions, length)
        h = fused.extend(h[:, 0])
        rows = step.rows
        tracker = ExitTracker(rule, head, layers, batch, tokens.device, checkpoints, fused.hidden_of)
    else:
        keys = torch.arange(length, device=tokens.device)
        mask = (keys[None, :] <= positions[:, None])[:, None, None, :]
        rows = torch.arange(batch, device=tokens.device)
        tracker = ExitTracker(rule, head, layers, batch, tokens.device, checkpoints)
    for i in range(layers):
        h = tracker.layer_input(h)
        if fused is not None:
            h = fused.layer(i, h, step, cache)
            tracker.observe(i + 1, h)
            stop = early_stop and i + 1 < layers and tracker.exit_hidden is not None and tracker.checks(i + 1)
            if stop and tracker.all_exited():
                exit_state = fused.hidden_of(tracker.exit_hidden)[:, None]  # type: ignore[arg-type]
                for j in range(i + 1, layers):
                    _write_kv(fam, cache, j, exit_state, rope, rows, positions)
                tracker.layers_run = i + 1
                break
            continue
        q, k_new, v_new = _write_kv(fam, cache, i, h, rope, rows, positions)
        k, v = cache.read(i, batch, length)
        h = fam.finish(i, h, attend(q, k, v, mask, fam.scale(i)))
        exited = tracker.exited(k_new) if rule.profile and rule.propagate else None
        if exited is not None:
            assert tracker.exit_hidden is not None
            _, k_exit, v_exit = fam.qkv(i, fam.attn_input(i, tracker.exit_hidden), rope)
            k_kept, v_kept = torch.where(exited, k_exit, k_new), torch.where(exited, v_exit, v_new)
            cache.write(i, rows, positions, k_kept[:, :, 0], v_kept[:, :, 0])
        tracker.observe(i + 1, h)
        stop = early_stop and i + 1 < layers and tracker.exit_hidden is not None and tracker.checks(i + 1)
        if stop and tracker.all_exited():
            for j in range(i + 1, layers):
                _write_kv(fam, cache, j, tracker.exit_hidden, rope, rows, positions)  # type: ignore[arg-type]
            tracker.layers_run = i + 1
            break
    return tracker.result()
