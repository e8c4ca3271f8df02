"""The engine: a background thread runs steps over a continuously changing batch of requests.

At each step boundary, cancelled rows leave, waiting requests take free KV slots and are prefilled,
then one batched decode step advances every running row by a token. The asyncio server talks to the
thread through a lock for submission and loop.call_soon_threadsafe for events.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import threading
import time
from collections import deque
from collections.abc import AsyncIterator, Callable, Iterable

import torch

from helios_worker.engine.api import (
    Draining,
    EngineConfig,
    EngineObserver,
    Finished,
    FinishReason,
    GenerationRequest,
    PromptTooLong,
    QueueFull,
    TokenEvent,
)
from helios_worker.engine.blocks import StackModel, family_of
from helios_worker.engine.confidence import BreachWindow, agreement
from helios_worker.engine.forward import ExitRule, StepOutput, decode, prefill
from helios_worker.engine.kvcache import KVCache, plan_cache
from helios_worker.engine.rows import Event, Row, Sink
from helios_worker.engine.sampling import choose_tokens, make_generator, token_logprobs
from helios_worker.engine.static import StaticDecoder

log = logging.getLogger(__name__)

CUDA_FREE_MEMORY_SHARE = 0.9  # of the memory the truncated model leaves free, for the KV cache
QUEUE_RETRY_SECONDS = 1.0


def eos_ids(model: StackModel) -> frozenset[int]:
    ids: set[int] = set()
    for source in (model.tokenizer, model.hf_model.config, getattr(model.hf_model, "generation_config", None)):
        value = getattr(source, "eos_token_id", None)
        ids.update(value if isinstance(value, list | tuple) else [] if value is None else [value])
    return frozenset(int(i) for i in ids)


def _kv_budget(config: EngineConfig, device: torch.device) -> int | None:
    if config.kv_budget_bytes is not None:
        return config.kv_budget_bytes
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return int(free * CUDA_FREE_MEMORY_SHARE)
    return None


class Engine:
    """Continuous batching over a truncated early-exit stack; see helios_worker.engine.api for the surface."""

    def __init__(
        self,
        model: StackModel,
        config: EngineConfig,
        observer: EngineObserver | None = None,
        *,
        static_steps: bool | None = None,
    ) -> None:
        """`static_steps`: decode at bucketed static shapes (graph-captured on CUDA); None means
        exactly when config.cuda_graphs is set and the model is on CUDA. Tests force it on the CPU."""
        self.model, self.config, self.observer = model, config, observer
        self._fam = family_of(model)
        weight = next(model.hf_model.parameters())
        self.device, self.dtype = weight.device, weight.dtype
        self.layers = len(self._fam.layers)
        plan = plan_cache(
            layers=self.layers,
            kv_heads=self._fam.kv_heads,
            head_dim=self._fam.head_dim,
            dtype_bytes=weight.element_size(),
            max_batch=config.max_batch,
            max_context=config.max_context or model.max_context(),
            budget_bytes=_kv_budget(config, self.device),
        )
        self.cache = KVCache(plan, self.device, self.dtype)
        self._rule = ExitRule(
            config.confidence_threshold, config.confidence_measure, config.profile, propagate=config.early_stop
        )
        self._static = (
            StaticDecoder(self._fam, model.exit_logits, self.cache, self._rule)
            if (static_steps if static_steps is not None else config.cuda_graphs and self.device.type == "cuda")
            else None
        )
        self._eos = eos_ids(model)
        self._window = BreachWindow(config.breach_window)
        self._cond = threading.Condition()
        self._waiting: deque[Row] = deque()
        self._running: list[Row] = []
        self._draining = self._stopping = False
        self._thread: threading.Thread | None = None

    # ---- the surface the server uses -------------------------------------------------------------

    @property
    def max_context(self) -> int:
        return self.cache.plan.max_seq

    @property
    def kv_cache_bytes(self) -> int:
        """Bytes of the preallocated KV cache (helios_kv_cache_bytes)."""
        return self.cache.bytes

    @property
    def kv_bytes_per_token(self) -> int:
        """K and V of one token over the loaded layers (helios_kv_bytes_per_token)."""
        return self.cache.plan.bytes_per_token

    @property
    def queue_length(self) -> int:
        return len(self._waiting)

    @property
    def running(self) -> int:
        return len(self._running)

    @property
    def breach_ratio(self) -> float:
        return self._window.ratio

    def start(self) -> None:
        with self._cond:
            if self._thread is not None:
                return
            self._thread = threading.Thread(target=self._loop, name="helios-engine", daemon=True)
            self._thread.start()

    def warmup(self) -> None:
        """Pay first-call costs (a prefill and a decode step) and capture the CUDA graphs before serving."""
        if self._thread is not None:
            raise RuntimeError("warm up before start()")
        slot = self.cache.allocate()
        assert slot == 0
        prompt = torch.tensor([0, 0], device=self.device)
        with torch.inference_mode():
            prefill(self._fam, self.model.exit_logits, self.cache, self._rule, slot, prompt)
            positions = torch.tensor([2], device=self.device)
            decode(self._fam, self.model.exit_logits, self.cache, self._rule, prompt[:1], positions, 3, False)
            self._capture_graphs()
        self.cache.release(slot)

    def _capture_graphs(self) -> None:
        """Capture once, while nothing runs; on failure the static step runs eagerly."""
        if self._static is None or self._static.captured or self.device.type != "cuda":
            return
        try:
            self._static.capture()
        except Exception:  # a model op that cannot be captured: serve eagerly rather than not at all
            log.exception("CUDA graph capture failed; decoding eagerly")
            self._static = None

    async def generate(self, request: GenerationRequest) -> AsyncIterator[TokenEvent | Finished]:
        """Events of one request; leaving the iterator early cancels it at the next step boundary."""
        loop = asyncio.get_running_loop()
        events: asyncio.Queue[Event] = asyncio.Queue()

        def deliver(event: Event) -> None:
            with contextlib.suppress(RuntimeError):  # the loop closed: nobody is listening
                loop.call_soon_threadsafe(events.put_nowait, event)

        row = self._submit(request, deliver)
        try:
            while True:
                event = await events.get()
                yield event
                if isinstance(event, Finished):
                    return
        finally:
            row.cancelled.set()
            self._wake()

    def generate_batch(self, requests: Iterable[GenerationRequest]) -> list[tuple[list[TokenEvent], Finished]]:
        """Submit all, wait for all (starts the engine thread if needed): for benchmarks and tests."""
        self.start()
        results: list[tuple[list[TokenEvent], list[Finished], threading.Event]] = []
        for request in requests:
            tokens: list[TokenEvent] = []
            ends: list[Finished] = []
            done = threading.Event()

            def sink(
                event: Event,
                tokens: list[TokenEvent] = tokens,
                ends: list[Finished] = ends,
                done: threading.Event = done,
            ) -> None:
                if isinstance(event, Finished):
                    ends.append(event)
                    done.set()
                else:
                    tokens.append(event)

            self._submit(request, sink)
            results.append((tokens, ends, done))
        for _, _, done in results:
            done.wait()
        return [(tokens, ends[0]) for tokens, ends, _ in results]

    def drain(self, timeout: float) -> None:
        """Refuse new requests (Draining) and wait up to `timeout` seconds for in-flight ones to finish."""
        deadline = time.monotonic() + timeout
        with self._cond:
            self._draining = True
            while self._waiting or self._running:
                left = deadline - time.monotonic()
                if left <= 0:
                    return
                self._cond.wait(left)

    def stop(self) -> None:
        """Stop the thread; requests still waiting or running end as cancelled."""
        with self._cond:
            self._stopping = self._draining = True
            self._cond.notify_all()
            thread, self._thread = self._thread, None
        if thread is not None:
            thread.join()
        while self._running:
            self._finish(self._remove(self._running[-1]), "cancelled")
        while self._waiting:
            self._finish(self._waiting.popleft(), "cancelled")

    # ---- submission (any thread) ------------------------------------------------------------------

    def _submit(self, request: GenerationRequest, sink: Sink) -> Row:
        if not request.prompt_ids:
            raise PromptTooLong("the prompt is empty")
        if len(request.prompt_ids) + request.sampling.max_tokens > self.max_context:
            raise PromptTooLong(
                f"prompt ({len(request.prompt_ids)} tokens) plus max_tokens ({request.sampling.max_tokens})"
                f" exceed the context of {self.max_context} tokens"
            )
        row = Row.create(request, sink, self.model.tokenizer)
        with self._cond:
            if self._draining:
                raise Draining("the worker is draining")
            if len(self._waiting) >= self.config.max_queue:
                raise QueueFull(QUEUE_RETRY_SECONDS)
            self._waiting.append(row)
            self._cond.notify_all()
        return row

    def _wake(self) -> None:
        with self._cond:
            self._cond.notify_all()

    # ---- the engine thread ------------------------------------------------------------------------

    def _loop(self) -> None:
        with torch.inference_mode():
            self._capture_graphs()
            while True:
                with self._cond:
                    while not self._stopping and not self._waiting and not self._running:
                        self._cond.wait()
                    if self._stopping:
                        return
                    admitted = self._admit()
                self._leave_cancelled()
                for row in admitted:
                    self._guarded(self._prefill, row)
                if self._running:
                    self._guarded(self._decode_step)
                with self._cond:
                    self._cond.notify_all()

    def _guarded(self, step: Callable[..., None], *args: Row) -> None:
        """A failing step ends the rows it touched with an error; the engine keeps serving the rest."""
        try:
            step(*args)
        except Exception as error:
            log.exception("engine step failed")
            message = f"{type(error).__name__}: {error}"
            for row in args or list(self._running):
                if row in self._running:
                    self._remove(row)
                self._finish(row, "error", message)

    def _admit(self) -> list[Row]:
        """Waiting rows that get a slot now (called under the lock)."""
        admitted: list[Row] = []
        while self._waiting and self.cache.free_slots > len(admitted):
            row = self._waiting.popleft()
            if row.cancelled.is_set():
                self._finish(row, "cancelled")
            elif row.request.sampling.max_tokens < 1:
                self._finish(row, "length")
            else:
                admitted.append(row)
        return admitted

    def _leave_cancelled(self) -> None:
        for row in [r for r in self._running if r.cancelled.is_set()]:
            self._finish(self._remove(row), "cancelled")

    def _prefill(self, row: Row) -> None:
        slot = self.cache.allocate()
        assert slot == len(self._running)  # running rows occupy slots 0..n-1
        row.slot = slot
        self._running.append(row)
        row.generator = make_generator(row.request.sampling, self.device)
        prompt = torch.tensor(row.request.prompt_ids, device=self.device)
        result = prefill(self._fam, self.model.exit_logits, self.cache, self._rule, slot, prompt)
        row.position = len(row.request.prompt_ids)
        self._emit([row], result)

    def _decode_step(self) -> None:
        started = time.perf_counter()
        rows = list(self._running)
        tokens = torch.tensor([r.last_token for r in rows], device=self.device)
        positions = torch.tensor([r.position for r in rows], device=self.device)
        if self._static is not None:
            result = self._static(tokens, positions)
        else:
            length = max(r.position for r in rows) + 1
            early_stop = self.config.early_stop
            result = decode(
                self._fam, self.model.exit_logits, self.cache, self._rule, tokens, positions, length, early_stop
            )
        for row in rows:
            row.position += 1
        self._emit(rows, result)
        if self.observer is not None:
            self.observer.on_step(len(rows), len(self._waiting), time.perf_counter() - started)

    def _emit(self, rows: list[Row], result: StepOutput) -> None:
        """Turn a step's per-row exits into tokens, events and telemetry."""
        params = [r.request.sampling for r in rows]
        generators = [r.generator if isinstance(r.generator, torch.Generator) else None for r in rows]
        tokens = choose_tokens(result.logits, result.greedy, params, generators)
        logprobs = token_logprobs(result.logits, tokens, params)
        exit_layers = result.exit_layer.tolist()
        first_confident = result.first_confident.tolist()
        confidences = result.confidence.tolist()
        layer_tokens = result.layer_tokens.T.tolist() if result.layer_tokens is not None else None
        now = time.perf_counter()
        for i, row in enumerate(rows):
            breach = first_confident[i] > self.layers
            self._window.record(breach)
            text, reason = row.advance(tokens[i], tokens[i] in self._eos)
            row.sink(TokenEvent(tokens[i], text, exit_layers[i], confidences[i], breach, *logprobs[i]))
            observer = self.observer
            if observer is not None:
                observer.on_token(exit_layers[i], breach, self._window.ratio, self._window.tokens)
                if layer_tokens is not None:
                    observer.on_profile_token(first_confident[i], *agreement(layer_tokens[i], first_confident[i]))
                if row.generated == 1:
                    observer.on_first_token(now - row.arrived)
                else:
                    observer.on_inter_token(now - row.last_emitted)
            row.last_emitted = now
            if reason is not None:
                self._finish(self._remove(row), reason)

    def _remove(self, row: Row) -> Row:
        """Take a running row out of the batch, moving the last row into its slot to keep slots 0..n-1."""
        last = self._running.pop()
        self.cache.release(row.slot)
        if last is not row:
            self.cache.move(last.slot, row.slot, last.position)
            last.slot = row.slot
            self._running[row.slot] = last
        row.slot = -1
        return row

    def _finish(self, row: Row, reason: FinishReason, error: str | None = None) -> None:
        if row.done:
            return
        finished = row.finished(reason, error)
        row.sink(finished)
        if self.observer is not None:
            self.observer.on_finished(finished, self.config.profile)
