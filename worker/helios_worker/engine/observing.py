"""Telemetry hooks that cannot hurt the engine: a failing observer is logged, never propagated.

An exception escaping a hook on the engine thread would end the thread, and every request waiting
on it would hang; telemetry is worth less than the requests it describes.
"""

from __future__ import annotations

import logging
from typing import Any

from helios_worker.engine.api import EngineObserver, Finished

log = logging.getLogger(__name__)


class GuardedObserver:
    """Forwards each hook to `inner`; an exception is logged (with its traceback once per hook) and dropped."""

    def __init__(self, inner: EngineObserver) -> None:
        self.inner = inner
        self.failures: dict[str, int] = {}

    def _call(self, hook: str, *args: Any) -> None:
        try:
            getattr(self.inner, hook)(*args)
        except Exception:
            count = self.failures.get(hook, 0) + 1
            self.failures[hook] = count
            if count == 1:
                log.exception("telemetry hook %s failed; the engine serves on", hook)
            else:
                log.warning("telemetry hook %s failed again (%d times)", hook, count)

    def on_step(self, batch_size: int, queue_length: int, seconds: float) -> None:
        self._call("on_step", batch_size, queue_length, seconds)

    def on_token(self, exit_layer: int, breach: bool, breach_ratio: float, window_tokens: int) -> None:
        self._call("on_token", exit_layer, breach, breach_ratio, window_tokens)

    def on_profile_token(
        self, first_confident_layer: int, agreeing_layers: tuple[int, ...], agreeing_depths: tuple[int, ...]
    ) -> None:
        self._call("on_profile_token", first_confident_layer, agreeing_layers, agreeing_depths)

    def on_first_token(self, seconds: float) -> None:
        self._call("on_first_token", seconds)

    def on_inter_token(self, seconds: float) -> None:
        self._call("on_inter_token", seconds)

    def on_finished(self, finished: Finished, profiled: bool) -> None:
        self._call("on_finished", finished, profiled)
