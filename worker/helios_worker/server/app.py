"""The FastAPI app factory: OpenAI-compatible routes, probes and /metrics around one engine.

The app owns the engine's lifecycle: it starts it, warms it up in the background (/readyz turns 200
after), and drains it on shutdown. `begin_drain` is what SIGTERM calls before uvicorn stops.
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import inspect
import logging
import time
import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any, Protocol

from fastapi import Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from starlette.exceptions import HTTPException as StarletteHTTPException

from helios_worker.engine.api import Draining, EngineError, SamplingParams
from helios_worker.metrics import WorkerMetrics
from helios_worker.server import streaming
from helios_worker.server.errors import (
    ERROR_TABLE,
    EngineFailed,
    InvalidRequest,
    MethodNotAllowed,
    NotFound,
    NotReady,
    Unauthorized,
    answer_for,
    error_body,
    retry_after_seconds,
)
from helios_worker.server.protocol import (
    ChatCompletionRequest,
    CompletionRequest,
    ModelCard,
    ModelList,
)
from helios_worker.server.serving import PromptEncoder, ServingEngine, collect, open_streams
from helios_worker.server.settings import ServerSettings

log = logging.getLogger("helios.worker.server")

V1 = "/v1/"
GENERATION_PATHS = ("/v1/completions", "/v1/chat/completions")


class ManagedEngine(ServingEngine, Protocol):
    """The engine's lifecycle (warmup before start); each method may be sync or async."""

    def start(self) -> Any: ...

    def warmup(self) -> Any: ...

    def drain(self, timeout: float) -> Any: ...

    def stop(self) -> Any: ...


class WorkerState:
    """Everything a route needs, found on app.state.worker."""

    def __init__(
        self, engine: ManagedEngine, encoder: PromptEncoder, telemetry: WorkerMetrics, settings: ServerSettings
    ) -> None:
        self.engine = engine
        self.encoder = encoder
        self.telemetry = telemetry
        self.settings = settings
        self.created = int(time.time())
        self.ready = False
        self.draining = False
        self.warmup_error: str | None = None
        self._drained: asyncio.Task[None] | None = None

    async def begin_drain(self) -> None:
        """Refuse new work (503, /readyz 503) and wait until in-flight generations finish; idempotent."""
        self.draining = True
        if self._drained is None:
            self._drained = asyncio.ensure_future(_call(self.engine.drain, self.settings.drain_timeout_seconds))
        await asyncio.shield(self._drained)

    def admit(self) -> None:
        if self.draining:
            raise Draining("the worker is draining and takes no new requests")
        if not self.ready:
            raise NotReady("the model is still warming up")


async def _call(method: Any, *args: Any) -> Any:
    """Await an async lifecycle method; run a sync one in a thread so the loop keeps serving."""
    if inspect.iscoroutinefunction(method):
        return await method(*args)
    return await asyncio.to_thread(method, *args)


def create_app(engine: ManagedEngine, tokenizer: Any, telemetry: WorkerMetrics, settings: ServerSettings) -> FastAPI:
    """The worker's app; the engine is started by the app's lifespan and stopped when it ends."""
    state = WorkerState(engine, PromptEncoder(tokenizer), telemetry, settings)
    telemetry.bind_live_state(lambda: engine.queue_length, lambda: engine.running)

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        warming = asyncio.create_task(_warm_up_and_start(state))
        try:
            yield
        finally:
            warming.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await warming
            await state.begin_drain()
            await _call(engine.stop)

    app = FastAPI(title="HELIOS worker", lifespan=lifespan, docs_url=None, redoc_url=None)
    app.state.worker = state
    _install_error_handlers(app, state)
    _add_probe_routes(app, state)
    _add_v1_routes(app, state)
    return app


async def _warm_up_and_start(state: WorkerState) -> None:
    """Warm up off the loop (so /healthz answers meanwhile), then start the engine and turn ready."""
    try:
        if state.settings.warmup:
            await _call(state.engine.warmup)
        await _call(state.engine.start)
        state.ready = True
        log.info("model warmed up; ready")
    except Exception as error:  # stays unready; /readyz says why
        state.warmup_error = f"{type(error).__name__}: {error}"
        log.exception("warm-up failed")


def _add_probe_routes(app: FastAPI, state: WorkerState) -> None:
    @app.get("/healthz")
    async def healthz() -> dict[str, str]:
        return {"status": "ok"}

    @app.get("/readyz")
    async def readyz() -> JSONResponse:
        if state.draining:
            return JSONResponse({"status": "draining"}, status_code=503)
        if not state.ready:
            body = {"status": "warming_up" if state.warmup_error is None else "failed", "error": state.warmup_error}
            return JSONResponse(body, status_code=503)
        return JSONResponse({"status": "ready"})

    @app.get("/metrics")
    async def metrics() -> Response:
        return Response(generate_latest(state.telemetry.registry), media_type=CONTENT_TYPE_LATEST)


def _require_token(state: WorkerState) -> Any:
    async def check(request: Request) -> None:
        expected = state.settings.api_token
        if expected is None:
            return
        scheme, _, given = request.headers.get("authorization", "").partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(given.strip().encode(), expected.encode()):
            raise Unauthorized("a valid bearer token is required (Authorization: Bearer <token>)")

    return Depends(check)


def _sampling(body: CompletionRequest | ChatCompletionRequest, max_tokens: int) -> SamplingParams:
    return SamplingParams(
        max_tokens=max_tokens,
        temperature=body.temperature,
        top_p=body.top_p,
        seed=body.seed,
        stop=body.stop_sequences(),
        logprobs=body.logprobs if isinstance(body, CompletionRequest) else body.logprobs_count(),
    )


def _add_v1_routes(app: FastAPI, state: WorkerState) -> None:
    auth = [_require_token(state)]

    @app.get("/v1/models", dependencies=auth)
    async def models() -> dict[str, Any]:
        s = state.settings
        card = ModelCard(
            id=s.model_name,
            created=state.created,
            helios={"candidate": s.candidate, "depth": s.depth, "model_layers": s.model_layers, "exits": s.exits},
        )
        return ModelList(data=[card]).model_dump()

    @app.post("/v1/completions", dependencies=auth)
    async def completions(body: CompletionRequest) -> Response:
        state.admit()
        encoder = state.encoder
        prompts = [encoder.encode(p) if isinstance(p, str) else encoder.check_ids(p) for p in body.prompts()]
        request_id = f"cmpl-{uuid.uuid4().hex}"
        streams = await open_streams(state.engine, prompts, body.n, _sampling(body, body.max_tokens), request_id)
        view = streaming.CompletionView(request_id, state.created, state.settings, body.n, encoder.token_text)
        if body.stream:
            include_usage = bool(body.stream_options and body.stream_options.include_usage)
            return _sse(view.stream(streams, include_usage))
        return JSONResponse(view.response(await collect(streams)))

    @app.post("/v1/chat/completions", dependencies=auth)
    async def chat_completions(body: ChatCompletionRequest) -> Response:
        state.admit()
        prompt = state.encoder.chat_prompt(body.messages)
        request_id = f"chatcmpl-{uuid.uuid4().hex}"
        streams = await open_streams(state.engine, [prompt], body.n, _sampling(body, body.token_limit()), request_id)
        view = streaming.ChatView(request_id, state.created, state.settings, body.n, state.encoder.token_text)
        if body.stream:
            include_usage = bool(body.stream_options and body.stream_options.include_usage)
            return _sse(view.stream(streams, include_usage))
        return JSONResponse(view.response(await collect(streams)))


def _sse(events: AsyncIterator[str]) -> StreamingResponse:
    headers = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}
    return StreamingResponse(events, media_type="text/event-stream", headers=headers)


def _install_error_handlers(app: FastAPI, state: WorkerState) -> None:
    def answer(request: Request, error: BaseException, message: str, param: str | None = None) -> JSONResponse:
        row = answer_for(error)
        # The engine counts what it admitted (on_finished); here, what never reached it.
        if request.url.path in GENERATION_PATHS and not isinstance(error, EngineFailed):
            state.telemetry.record_request(row.outcome)
        if row.status_code >= 500 and row.code == "internal_error":
            log.error("request %s failed: %s", request.url.path, type(error).__name__, exc_info=error)
        headers = {}
        retry = retry_after_seconds(error)
        if retry is not None:
            headers["Retry-After"] = str(retry)
        if row.code == "invalid_api_key":
            headers["WWW-Authenticate"] = "Bearer"
        return JSONResponse(error_body(message, row, param), status_code=row.status_code, headers=headers)

    async def typed(request: Request, error: Exception) -> Response:
        message = getattr(error, "message", None) or str(error) or type(error).__name__
        if answer_for(error).code == "internal_error":
            message = "internal error"  # never echo internals
        return answer(request, error, message, getattr(error, "param", None))

    async def invalid(request: Request, error: Exception) -> Response:
        assert isinstance(error, RequestValidationError)
        message, param = _describe_validation(error)
        return answer(request, InvalidRequest(message, param), message, param)

    async def http(request: Request, error: Exception) -> Response:
        assert isinstance(error, StarletteHTTPException)
        if error.status_code == 405:
            return answer(request, MethodNotAllowed("method not allowed"), f"{request.method} is not allowed here")
        if error.status_code == 404:
            return answer(request, NotFound("not found"), f"no route {request.url.path}")
        row = answer_for(InvalidRequest(""))
        body = error_body(str(error.detail), row)
        return JSONResponse(body, status_code=error.status_code, headers=error.headers)

    app.add_exception_handler(RequestValidationError, invalid)
    app.add_exception_handler(StarletteHTTPException, http)
    # Typed errors through the exception middleware (answered, not re-raised); the rest as a last resort.
    for cls in (*ERROR_TABLE, EngineError):
        app.add_exception_handler(cls, typed)
    app.add_exception_handler(Exception, typed)


def _describe_validation(error: RequestValidationError) -> tuple[str, str | None]:
    """One readable line (no input values: they may be prompts) and the offending field."""
    problems = error.errors()
    if not problems:
        return "invalid request", None
    first = problems[0]
    loc = [str(p) for p in first.get("loc", ()) if p != "body"]
    param = ".".join(loc) or None
    kind = first.get("type", "")
    if kind == "json_invalid":
        return "the body is not valid JSON", None
    if kind == "extra_forbidden":
        return f"unknown field: {param}", param
    if kind == "missing":
        return f"missing field: {param}", param
    msg = str(first.get("msg", "invalid value"))
    return (f"{param}: {msg}" if param else msg), param
