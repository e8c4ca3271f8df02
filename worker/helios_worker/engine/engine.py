"""The engine: a background thread runs steps over a continuously changing batch of requests.

At each step boundary, cancelled rows leave, waiting requests take free KV slots and are prefilled
together (as many as the per-step prompt-token budget holds; the rest wait for the next step), then
one batched decode step advances every running row by a token. The asyncio server talks to the
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
    SERVING_CONTEXT,
    Draining,
    EngineConfig,
    EngineObserver,
    Finished,
    FinishReason,
    GenerationRequest,
    GraphCaptureError,
    PromptTooLong,
    QueueFull,
    TokenEvent,
)
from helios_worker.engine.blocks import StackModel, family_of
from helios_worker.engine.confidence import BreachWindow, agreement, token_confidence
from helios_worker.engine.forward import ExitRule, ExitTranslate, StepOutput, decode, prefill, prefill_batch
from helios_worker.engine.kvcache import KVCache, plan_cache
from helios_worker.engine.observing import GuardedObserver
from helios_worker.engine.rows import Event, Row, Sink
from helios_worker.engine.sampling import choose_tokens, make_rng, token_logprobs
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


def serving_context(config: EngineConfig, model: StackModel) -> int:
    """Tokens per request the cache reserves: the configured context, else SERVING_CONTEXT capped by the model's."""
    return config.max_context or min(SERVING_CONTEXT, model.max_context())


def exit_translator(model: StackModel) -> ExitTranslate | None:
    """The model's trained exit adapters (models.exit_adapters: PartialModel.exit_adapters), which every
    exit applies to its layer's hidden state before the shared final norm and LM head; None without."""
    adapters = getattr(model, "exit_adapters", None)
    if adapters is None:
        return None
    translate: ExitTranslate = adapters.translate
    return translate


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
        self.model, self.config = model, config
        self.observer = GuardedObserver(observer) if observer is not None else None
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
            max_context=serving_context(config, model),
            budget_bytes=_kv_budget(config, self.device),
        )
        self.cache = KVCache(plan, self.device, self.dtype)
        exit_layers = None if config.exit_layers is None else frozenset(config.exit_layers)
        if exit_layers is not None and not all(1 <= layer < self.layers for layer in exit_layers):
            raise ValueError(f"exit layers {sorted(exit_layers)} must lie in 1..{self.layers - 1}")
        # Propagation is part of the exit semantics, in serving and profiling alike; early_stop only
        # decides whether a step whose rows all exited skips the rest of its layers.
        self._rule = ExitRule(
            config.confidence_threshold,
            config.confidence_measure,
            config.profile,
            True,
            exit_layers,
            exit_translator(model),
        )
        self._deeper_layers_exist = model.loaded_layers < model.model_layers  # else an unconfident token is no breach
        self._static = (
            StaticDecoder(self._fam, model.exit_logits, self.cache, self._rule, config.exit_max_batch)
            if (static_steps if static_steps is not None else config.cuda_graphs and self.device.type == "cuda")
            else None
        )
        slots = self.cache.plan.slots
        self._tokens = torch.zeros(slots, dtype=torch.long, device=self.device)  # next input per slot
        self._positions = torch.zeros(slots, dtype=torch.long, device=self.device)
        self._eos = frozenset() if config.ignore_eos else eos_ids(model)
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
        """Start the engine thread; on CUDA first capture the decode graphs (GraphCaptureError if they cannot be)."""
        with self._cond:
            if self._thread is not None:
                return
            with torch.inference_mode():
                self._capture_graphs()
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
        """Capture once, while nothing runs. A failure is loud: eager decoding would silently serve at a
        fraction of the planned speed (often the cause is memory: lower --max-context or --max-batch)."""
        if self._static is None or self._static.captured or self.device.type != "cuda":
            return
        try:
            self._static.capture()
        except Exception as error:
            raise GraphCaptureError(
                f"CUDA graph capture of the decode step failed ({type(error).__name__}: {error}); lower"
                " --max-context or --max-batch, or turn CUDA graphs off to decode eagerly"
            ) from error

    async def generate(self, request: GenerationRequest) -> AsyncIterator[TokenEvent | Finished]:
        """Events of one request; leaving the iterator early cancels it at the next step boundary."""
        loop = asyncio.get_running_loop()
        events: asyncio.Queue[Event] = asyncio.Queue()

        def deliver(event: Event) -> None:
            with contextlib.suppress(RuntimeError):  # the loop closed: nobody is listening
                loop.call_soon_threadsafe(events.put_nowait, event)

        row = self.submit(request, deliver)
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

            self.submit(request, sink)
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

    def submit(self, request: GenerationRequest, sink: Sink) -> Row:
        """Queue a request whose events go to `sink` (called on the engine thread, or in step())."""
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
            while True:
                with self._cond:
                    while not self._stopping and not self._waiting and not self._running:
                        self._cond.wait()
                    if self._stopping:
                        return
                self.step()
                with self._cond:
                    self._cond.notify_all()

    def step(self) -> None:
        """One step boundary: cancelled rows leave, waiting ones are admitted and prefilled, then one
        decode step. The engine thread's body; benchmarks call it directly (without start()) to observe
        a step in their own thread. A failure ends only the requests it touched."""
        try:
            with self._cond:
                admitted = self._admit()
            self._leave_cancelled()
            if admitted:
                self._guarded(self._prefill, *admitted)
            if self._running:
                self._guarded(self._decode_step)
        except Exception as error:  # outside any one step (admission, cancellation): fail what runs
            log.exception("engine loop failed")
            message = f"{type(error).__name__}: {error}"
            for row in list(self._running):
                self._finish(self._remove(row), "error", message)

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
        """Waiting rows that get a slot and are prefilled in this step (called under the lock): in order,
        while their padded prompts fit the per-step token budget (at least one), so a burst of prompts
        is spread over steps, each followed by a decode step of the running rows."""
        admitted: list[Row] = []
        longest = 0
        while self._waiting and self.cache.free_slots > len(admitted):
            row = self._waiting[0]
            length = len(row.request.prompt_ids)
            if admitted and max(longest, length) * (len(admitted) + 1) > self.config.prefill_tokens:
                break
            self._waiting.popleft()
            if row.cancelled.is_set():
                self._finish(row, "cancelled")
            elif row.request.sampling.max_tokens < 1:
                self._finish(row, "length")
            else:
                admitted.append(row)
                longest = max(longest, length)
        return admitted

    def _leave_cancelled(self) -> None:
        for row in [r for r in self._running if r.cancelled.is_set()]:
            self._finish(self._remove(row), "cancelled")

    def _checkpoints(self, rows: int) -> bool:
        limit = self.config.exit_max_batch
        return limit is None or rows <= limit

    def _prefill(self, *rows: Row) -> None:
        """Prompts of `rows` in one pass into the slots just past the running rows."""
        first = len(self._running)
        for row in rows:
            slot = self.cache.allocate()
            assert slot == len(self._running)  # running rows occupy slots 0..n-1
            row.slot = slot
            self._running.append(row)
            row.rng = make_rng(row.request.sampling)
            row.position = len(row.request.prompt_ids)
        width = max(r.position for r in rows)
        padded = [list(r.request.prompt_ids) + [0] * (width - r.position) for r in rows]
        ids = torch.tensor(padded, device=self.device)
        lengths = torch.tensor([r.position for r in rows], device=self.device)
        checkpoints = self._checkpoints(1)  # a prompt's exit is decided as if it ran alone
        result = prefill_batch(
            self._fam, self.model.exit_logits, self.cache, self._rule, first, ids, lengths, checkpoints
        )
        end = first + len(rows)
        self._positions[first:end] = lengths
        self._emit(list(rows), result, self._tokens[first:end])

    def _decode_step(self) -> None:
        started = time.perf_counter()
        rows = list(self._running)
        n = len(rows)
        tokens, positions = self._tokens[:n], self._positions[:n]
        length = max(r.position for r in rows) + 1  # the live context of the longest row
        if self._static is not None:
            result = self._static(tokens, positions, length)
        else:
            early_stop = self.config.early_stop and not self.config.profile
            checkpoints = self._checkpoints(n)
            result = decode(
                self._fam,
                self.model.exit_logits,
                self.cache,
                self._rule,
                tokens,
                positions,
                length,
                early_stop,
                checkpoints,
            )
        self._positions[:n] += 1
        for row in rows:
            row.position += 1
        self._emit(rows, result, tokens)
        if self.observer is not None:
            self.observer.on_step(n, len(self._waiting), time.perf_counter() - started)

    def _choose(self, rows: list[Row], result: StepOutput) -> tuple[torch.Tensor, torch.Tensor]:
        """(tokens, their confidences) on the device: the exit's argmax, or a sampled row's own draw."""
        rngs = [r.rng for r in rows]
        tokens, sampled = choose_tokens(result.logits, result.greedy, [r.request.sampling for r in rows], rngs)
        if sampled is None:
            return tokens, result.confidence
        conf = result.confidence.clone()
        conf[sampled] = token_confidence(result.logits[sampled], tokens[sampled], self.config.confidence_measure)
        return tokens, conf

    def _emit(self, rows: list[Row], result: StepOutput, next_tokens: torch.Tensor) -> None:
        """Choose the step's tokens (written into `next_tokens`, on the device), read everything the host
        needs back in one packed copy, and turn it into events and telemetry."""
        tokens, conf = self._choose(rows, result)
        next_tokens.copy_(tokens)
        logprobs = token_logprobs(result.logits, tokens, [r.request.sampling for r in rows])
        parts = [tokens, result.exit_layer, result.first_confident, conf]
        if result.layer_tokens is not None:
            parts.extend(result.layer_tokens)
        packed = torch.stack([p.to(torch.float64) for p in parts]).tolist()  # the step's one device-to-host copy
        token_ids, exit_layers, first_confident, confidences = (
            [int(x) for x in packed[0]],
            [int(x) for x in packed[1]],
            [int(x) for x in packed[2]],
            packed[3],
        )
        layer_tokens = [[int(x) for x in col] for col in zip(*packed[4:], strict=True)] if len(packed) > 4 else None
        now = time.perf_counter()
        for i, row in enumerate(rows):
            breach = first_confident[i] > self.layers and self._deeper_layers_exist
            self._window.record(breach)
            text, reason = row.advance(token_ids[i], token_ids[i] in self._eos)
            row.sink(TokenEvent(token_ids[i], text, exit_layers[i], confidences[i], breach, *logprobs[i]))
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
            self._tokens[row.slot] = self._tokens[last.slot]
            self._positions[row.slot] = self._positions[last.slot]
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
