"""A stand-in worker for the router and process-management tests: a real uvicorn server.

It takes the worker's command line (`--model --layers --port ...`) and speaks the parts of its
protocol the router and the local platform rely on (/readyz, /v1/completions with SSE, /metrics),
with knobs the real worker lacks: a per-token delay, and `/v1/die` to kill itself mid-request.
Run as a script (`python fake_worker.py --port P ...`), never imported by the product.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import socket
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import uvicorn
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, PlainTextResponse, StreamingResponse


def build_app(args: argparse.Namespace) -> FastAPI:
    app = FastAPI()
    who = {"candidate": args.candidate, "depth": args.layers, "port": args.port, "pid": os.getpid()}
    state = {"served": 0}

    @app.get("/readyz")
    async def readyz() -> dict[str, Any]:
        return {"ready": True, **who}

    @app.get("/healthz")
    async def healthz() -> dict[str, Any]:
        return {"status": "ok"}

    @app.get("/metrics")
    async def metrics() -> PlainTextResponse:
        base = f'deployment="{args.deployment}",candidate="{args.candidate}",depth="{args.layers}"'
        lines = [
            f'helios_requests_total{{{base},status="ok"}} {state["served"]}',
            f"helios_generated_tokens_total{{{base}}} {state['served'] * 4}",
            f"helios_model_layers{{{base}}} {args.layers}",
            f"helios_loaded_layers{{{base}}} {args.layers}",
            f"helios_breach_window_ratio{{{base}}} 0.0",
            f"helios_breach_window_tokens{{{base}}} 0",
        ]
        return PlainTextResponse("\n".join(lines) + "\n")

    @app.post("/v1/completions", response_model=None)
    async def completions(request: Request) -> JSONResponse | StreamingResponse:
        body = await request.json()
        tokens = int(body.get("max_tokens", 4))
        delay = float(body.get("delay", 0.0))
        if body.get("stream"):
            return StreamingResponse(_stream(tokens, delay, who, state), media_type="text/event-stream")
        await asyncio.sleep(delay * tokens)
        state["served"] += 1
        return JSONResponse({"choices": [{"text": "x" * tokens}], "worker": who, "echo": body.get("prompt")})

    @app.post("/v1/die")
    async def die(request: Request) -> StreamingResponse:
        body = await request.json()

        async def events() -> AsyncIterator[bytes]:
            for _ in range(int(body.get("before", 0))):
                yield b'data: {"choices": [{"text": "x"}]}\n\n'
                await asyncio.sleep(0.05)
            os._exit(1)

        if body.get("before", 0):
            return StreamingResponse(events(), media_type="text/event-stream")
        os._exit(1)

    return app


async def _stream(tokens: int, delay: float, who: dict[str, Any], state: dict[str, int]) -> AsyncIterator[bytes]:
    for i in range(tokens):
        await asyncio.sleep(delay)
        yield f"data: {json.dumps({'choices': [{'text': str(i)}], 'worker': who})}\n\n".encode()
    state["served"] += 1
    yield b"data: [DONE]\n\n"


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", default="fake")
    parser.add_argument("--layers", type=int, default=6)
    parser.add_argument("--profile", action="store_true")
    parser.add_argument("--threshold", type=float, default=0.9)
    parser.add_argument("--breach-window", type=int, default=100)
    parser.add_argument("--deployment", default="demo")
    parser.add_argument("--candidate", default="c")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--port-file")
    parser.add_argument("--startup-delay", type=float, default=0.0)
    args, _ = parser.parse_known_args()
    if args.startup_delay:
        import time

        time.sleep(args.startup_delay)
    sock = socket.socket()
    sock.bind((args.host, args.port))
    args.port = sock.getsockname()[1]
    if args.port_file:  # like the real worker: bind port 0, say which port it got
        Path(args.port_file).write_text(str(args.port))
    config = uvicorn.Config(build_app(args), log_level="warning", timeout_graceful_shutdown=30)
    uvicorn.Server(config).run(sockets=[sock])


if __name__ == "__main__":
    main()
