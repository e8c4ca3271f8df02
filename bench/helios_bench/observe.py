"""Engine observers: the profile the policy reads, and what a served run did (exits, breaches, steps)."""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field

from helios_operator.core.types import CandidateProfile
from helios_worker.engine.api import Finished


class _Silent:
    """Every EngineObserver hook, doing nothing; subclasses override the ones they need."""

    def on_step(self, batch_size: int, queue_length: int, seconds: float) -> None:
        pass

    def on_token(self, exit_layer: int, breach: bool, breach_ratio: float, window_tokens: int) -> None:
        pass

    def on_profile_token(
        self, first_confident_layer: int, agreeing_layers: tuple[int, ...], agreeing_depths: tuple[int, ...]
    ) -> None:
        pass

    def on_first_token(self, seconds: float) -> None:
        pass

    def on_inter_token(self, seconds: float) -> None:
        pass

    def on_finished(self, finished: Finished, profiled: bool) -> None:
        pass


class ProfileCollector(_Silent):
    """Profiling at full depth, folded into the CandidateProfile the operator's policy reads."""

    def __init__(self, model_layers: int) -> None:
        self.model_layers = model_layers
        self.tokens = 0
        self.requests = 0
        self.agreeing = [0] * model_layers
        self.depth_agreeing = [0] * model_layers
        self.first_confident = [0] * (model_layers + 1)

    def on_profile_token(
        self, first_confident_layer: int, agreeing_layers: tuple[int, ...], agreeing_depths: tuple[int, ...]
    ) -> None:
        self.tokens += 1
        for layer in agreeing_layers:
            if 1 <= layer <= self.model_layers:
                self.agreeing[layer - 1] += 1
        for depth in agreeing_depths:
            if 1 <= depth <= self.model_layers:
                self.depth_agreeing[depth - 1] += 1
        index = min(max(first_confident_layer, 1), self.model_layers + 1) - 1
        self.first_confident[index] += 1

    def on_finished(self, finished: Finished, profiled: bool) -> None:
        if profiled:
            self.requests += 1

    def reset(self) -> None:
        """Forget what a warm-up run recorded."""
        self.tokens = self.requests = 0
        self.agreeing = [0] * self.model_layers
        self.depth_agreeing = [0] * self.model_layers
        self.first_confident = [0] * (self.model_layers + 1)

    def profile(
        self,
        candidate: str,
        *,
        tokens_per_second: float,
        fixed_weight_bytes: float,
        layer_weight_bytes: float,
        kv_bytes_per_token_per_layer: float,
        joules_per_token: float | None,
    ) -> CandidateProfile:
        if self.tokens == 0:
            raise RuntimeError(f"profiling {candidate} produced no profiled tokens")
        n = self.tokens
        return CandidateProfile(
            candidate=candidate,
            model_layers=self.model_layers,
            profiled_tokens=n,
            profiled_requests=self.requests,
            agreement=tuple(a / n for a in self.agreeing),
            depth_agreement=tuple(a / n for a in self.depth_agreeing),
            first_confident=tuple(f / n for f in self.first_confident),
            tokens_per_second=tokens_per_second,
            fixed_weight_bytes=fixed_weight_bytes,
            layer_weight_bytes=layer_weight_bytes,
            kv_bytes_per_token_per_layer=kv_bytes_per_token_per_layer,
            joules_per_token=joules_per_token,
        )


@dataclass
class ServeObserver(_Silent):
    """What a served run did: exit layers, breaches, the breach window, and layers run per step.

    The layers a step ran are the deepest exit among the tokens reported since the previous step:
    with early stopping, a step stops once every row is confident, so its deepest exit is its depth.
    """

    exit_layers: Counter[int] = field(default_factory=Counter)
    breaches: int = 0
    tokens: int = 0
    breach_ratio: float = 0.0
    window_tokens: int = 0
    steps: int = 0
    step_layers: list[int] = field(default_factory=list)
    _pending_max: int = 0

    def on_token(self, exit_layer: int, breach: bool, breach_ratio: float, window_tokens: int) -> None:
        self.tokens += 1
        self.exit_layers[exit_layer] += 1
        self.breaches += int(breach)
        self.breach_ratio = breach_ratio
        self.window_tokens = window_tokens
        self._pending_max = max(self._pending_max, exit_layer)

    def on_step(self, batch_size: int, queue_length: int, seconds: float) -> None:
        self.steps += 1
        if self._pending_max:
            self.step_layers.append(self._pending_max)
        self._pending_max = 0

    def mean_layers_per_step(self, default: float) -> float:
        return sum(self.step_layers) / len(self.step_layers) if self.step_layers else default

    def reset(self) -> None:
        """Forget the counts but keep the breach window's last reading (the engine keeps its window)."""
        self.exit_layers = Counter()
        self.breaches = self.tokens = self.steps = 0
        self.step_layers = []
        self._pending_max = 0
