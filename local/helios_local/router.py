"""The local stand-in for the stable Service: a small asyncio HTTP reverse proxy on loopback.

Why not a framework: the operator image carries no server framework, and a proxy needs only
HTTP/1.1 request parsing, an upstream client (httpx) and chunked responses. The router forwards
`/v1/*` round-robin to the ready workers of the pool it points at. Each request picks its worker
when it arrives, so pointing at another pool only affects new requests: in-flight ones finish
where they started, which is what makes a switch drop nothing.

A request is retried on another worker only while nothing has been sent back and the worker did
not take it (connection refused, or a 503 from a draining or not-yet-ready worker). Once a worker
has the request, its failure becomes a clean JSON 502 (or, mid-stream, a final SSE error event).
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import json
import time
from collections.abc import Sequence
from dataclasses import dataclass, field

import httpx

# Headers that describe one hop of the connection, never forwarded (RFC 9110 §7.6.1).
HOP_BY_HOP = frozenset(
    {
        "connection",
        "keep-alive",
        "proxy-authenticate",
        "proxy-authorization",
        "proxy-connection",
        "te",
        "trailer",
        "transfer-encoding",
        "upgrade",
        "host",
        "content-length",
        "expect",  # answered by the router itself
    }
)
MAX_HEADER_BYTES = 64 * 1024
MAX_BODY_BYTES = 16 * 1024 * 1024
REASONS = {
    200: "OK",
    400: "Bad Request",
    404: "Not Found",
    413: "Content Too Large",
    429: "Too Many Requests",
    502: "Bad Gateway",
    503: "Service Unavailable",
}


class BadRequest(Exception):
    """The client sent something this proxy cannot parse."""


@dataclass(frozen=True)
class HttpRequest:
    method: str
    target: str  # path and query, as sent
    version: str
    headers: tuple[tuple[str, str], ...]
    body: bytes

    def header(self, name: str) -> str | None:
        name = name.lower()
        return next((v for k, v in self.headers if k.lower() == name), None)

    @property
    def path(self) -> str:
        return self.target.split("?", 1)[0]

    @property
    def keep_alive(self) -> bool:
        conn = (self.header("connection") or "").lower()
        if self.version == "HTTP/1.0":
            return conn == "keep-alive"
        return conn != "close"


async def read_request(reader: asyncio.StreamReader, writer: asyncio.StreamWriter | None = None) -> HttpRequest | None:
    """Read one HTTP/1.1 request; None when the client closed the connection between requests.

    With a writer, a client that asked `Expect: 100-continue` (curl does for larger bodies) is told to go on.
    """
    try:
        head = await reader.readuntil(b"\r\n\r\n")
    except asyncio.IncompleteReadError as err:
        if not err.partial.strip():
            return None
        raise BadRequest("the connection closed inside the request head") from err
    except asyncio.LimitOverrunError as err:
        raise BadRequest("the request head is too large") from err
    lines = head.decode("latin-1").split("\r\n")
    parts = lines[0].split(" ")
    if len(parts) != 3 or not parts[2].startswith("HTTP/"):
        raise BadRequest(f"malformed request line {lines[0]!r}")
    headers: list[tuple[str, str]] = []
    for line in lines[1:]:
        if not line:
            continue
        name, sep, value = line.partition(":")
        if not sep:
            raise BadRequest(f"malformed header line {line!r}")
        headers.append((name.strip(), value.strip()))
    req = HttpRequest(parts[0].upper(), parts[1], parts[2], tuple(headers), b"")
    if writer is not None and (req.header("expect") or "").lower() == "100-continue":
        writer.write(b"HTTP/1.1 100 Continue\r\n\r\n")
        await writer.drain()
    if (req.header("transfer-encoding") or "").lower() == "chunked":
        body = await _read_chunked(reader)
    else:
        length = int(req.header("content-length") or 0)
        if length > MAX_BODY_BYTES:
            raise BadRequest("the request body is too large")
        body = await reader.readexactly(length) if length else b""
    return HttpRequest(req.method, req.target, req.version, req.headers, body)


async def _read_chunked(reader: asyncio.StreamReader) -> bytes:
    body = bytearray()
    while True:
        size_line = await reader.readuntil(b"\r\n")
        size = int(size_line.split(b";", 1)[0].strip() or b"0", 16)
        if size == 0:
            while (await reader.readuntil(b"\r\n")) != b"\r\n":  # trailers
                pass
            return bytes(body)
        body += await reader.readexactly(size)
        await reader.readexactly(2)
        if len(body) > MAX_BODY_BYTES:
            raise BadRequest("the request body is too large")


def error_body(message: str, kind: str, code: str) -> bytes:
    """OpenAI's error shape, as the workers answer it, so clients parse one format."""
    return json.dumps({"error": {"message": message, "type": kind, "param": None, "code": code}}).encode()


@dataclass
class RouterStats:
    """Counts the demo and the tests read; the router never resets them."""

    forwarded: int = 0  # requests a worker answered (any status)
    failed: int = 0  # requests answered by the router with a 5xx of its own
    retried: int = 0  # attempts moved to another worker before any byte was sent
    by_upstream: dict[str, int] = field(default_factory=dict)


class Router:
    """Reverse proxy in front of one pool of workers at a time; see the module docstring."""

    def __init__(
        self,
        host: str = "127.0.0.1",
        port: int = 0,
        *,
        retry_seconds: float = 30.0,
        connect_timeout: float = 2.0,
    ) -> None:
        self._host = host
        self._port = port
        self._retry_seconds = retry_seconds
        self._pools: dict[str, tuple[str, ...]] = {}
        self._active: str | None = None
        self._rr = itertools.count()
        self._in_flight: dict[str, int] = {}
        self._server: asyncio.Server | None = None
        self._conns: set[asyncio.Task[None]] = set()
        self._client = httpx.AsyncClient(
            timeout=httpx.Timeout(connect=connect_timeout, read=None, write=30.0, pool=None),
            limits=httpx.Limits(max_connections=None, max_keepalive_connections=64),
        )
        self.stats = RouterStats()

    # -- control: what the local platform calls ----------------------------------------------

    def set_pool(self, pool: str, members: Sequence[str]) -> None:
        """The ready workers (base URLs) of a pool; an empty sequence forgets the pool."""
        if members:
            self._pools[pool] = tuple(members)
        else:
            self._pools.pop(pool, None)

    def remove_member(self, url: str) -> None:
        """Stop routing new requests to one worker, whatever pool it is in (drain starts here)."""
        for pool, members in list(self._pools.items()):
            self.set_pool(pool, [m for m in members if m != url])

    def point(self, pool: str) -> None:
        """New requests go to this pool from now on; in-flight ones are left alone."""
        self._active = pool

    def members(self, pool: str | None = None) -> tuple[str, ...]:
        name = self._active if pool is None else pool
        return self._pools.get(name, ()) if name is not None else ()

    def in_flight(self, url: str | None = None) -> int:
        """Requests forwarded and not finished: to one worker, or in total."""
        if url is None:
            return sum(self._in_flight.values())
        return self._in_flight.get(url, 0)

    async def wait_idle(self, url: str, timeout: float) -> bool:
        """Wait until no request is in flight to this worker; False when the timeout passed first."""
        deadline = time.monotonic() + timeout
        while self.in_flight(url) > 0:
            if time.monotonic() >= deadline:
                return False
            await asyncio.sleep(0.05)
        return True

    # -- lifecycle ------------------------------------------------------------------------------

    async def start(self) -> None:
        self._server = await asyncio.start_server(
            self._serve_connection, self._host, self._port, limit=MAX_HEADER_BYTES
        )
        sock = self._server.sockets[0]
        self._port = int(sock.getsockname()[1])

    @property
    def url(self) -> str:
        return f"http://{self._host}:{self._port}"

    async def close(self) -> None:
        if self._server is not None:
            self._server.close()
        for task in list(self._conns):
            task.cancel()
        await asyncio.gather(*self._conns, return_exceptions=True)
        if self._server is not None:
            await self._server.wait_closed()
        await self._client.aclose()

    async def __aenter__(self) -> Router:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    # -- serving ------------------------------------------------------------------------------

    async def _serve_connection(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._conns.add(task)
        try:
            while True:
                try:
                    req = await read_request(reader, writer)
                except (BadRequest, ValueError) as err:
                    await _write_simple(
                        writer, 400, error_body(str(err), "invalid_request_error", "invalid_request"), False
                    )
                    return
                if req is None:
                    return
                keep = await self._handle(req, writer)
                if not keep:
                    return
        except (ConnectionError, asyncio.IncompleteReadError):
            return
        except asyncio.CancelledError:
            return  # close() ends idle connections; asyncio 3.11 would log a cancelled callback task
        finally:
            self._conns.discard(task)
            writer.close()
            with contextlib.suppress(Exception):
                await writer.wait_closed()

    async def _handle(self, req: HttpRequest, writer: asyncio.StreamWriter) -> bool:
        keep = req.keep_alive
        if req.path == "/healthz":
            await _write_simple(writer, 200, b'{"status":"ok"}', keep)
            return keep
        if req.path == "/readyz":
            ready = bool(self.members())
            body = json.dumps({"ready": ready, "pool": self._active}).encode()
            await _write_simple(writer, 200 if ready else 503, body, keep)
            return keep
        if not req.path.startswith("/v1/"):
            await _write_simple(
                writer, 404, error_body(f"no route for {req.path}", "invalid_request_error", "not_found"), keep
            )
            return keep
        return await self._forward(req, writer, keep)

    def _pick(self, avoid: set[str]) -> str | None:
        members = self.members()
        fresh = [m for m in members if m not in avoid] or list(members)
        if not fresh:
            return None
        return fresh[next(self._rr) % len(fresh)]

    async def _forward(self, req: HttpRequest, writer: asyncio.StreamWriter, keep: bool) -> bool:
        headers = [(k, v) for k, v in req.headers if k.lower() not in HOP_BY_HOP]
        deadline = time.monotonic() + self._retry_seconds
        tried: set[str] = set()
        lost = 0  # attempts a worker took and then died on before answering
        last_error = "no worker is ready in the active pool"
        while True:
            upstream = self._pick(tried)
            if upstream is not None:
                outcome = await self._try_upstream(upstream, req, headers, writer, keep, may_retry=lost == 0)
                if isinstance(outcome, bool):
                    return outcome
                tried.add(upstream)
                self.stats.retried += 1
                lost += outcome == "lost"
                last_error = f"worker {upstream} did not take the request"
            if time.monotonic() >= deadline:
                self.stats.failed += 1
                await _write_simple(writer, 503, error_body(last_error, "service_unavailable", "no_ready_worker"), keep)
                return keep
            await asyncio.sleep(0.05)
            if len(tried) >= len(self.members()):
                tried.clear()  # every member failed once: the pool may have changed, try again

    async def _try_upstream(
        self,
        upstream: str,
        req: HttpRequest,
        headers: list[tuple[str, str]],
        writer: asyncio.StreamWriter,
        keep: bool,
        *,
        may_retry: bool,
    ) -> bool | str:
        """Forward to one worker. A bool: answered (keep the connection?). A string: nothing was sent
        back, retry elsewhere: "refused" (the worker never took it) or "lost" (it died first)."""
        request = self._client.build_request(req.method, upstream + req.target, headers=headers, content=req.body)
        self._in_flight[upstream] = self._in_flight.get(upstream, 0) + 1
        try:
            try:
                resp = await self._client.send(request, stream=True)
            except httpx.ConnectError:
                return "refused"
            except (httpx.RemoteProtocolError, httpx.ReadError) as err:
                # Completions have no side effects, so one more try elsewhere is safe; a request that
                # kills every worker it reaches is answered after the second.
                if may_retry:
                    return "lost"
                return await self._fail(writer, keep, f"worker {upstream} failed: {type(err).__name__}")
            except httpx.HTTPError as err:
                return await self._fail(writer, keep, f"worker {upstream} failed: {type(err).__name__}")
            try:
                if resp.status_code == 503:  # draining or not ready: it did not take the request
                    return "refused"
                if resp.headers.get("content-type", "").startswith("text/event-stream"):
                    return await self._relay_stream(resp, writer, keep, upstream)
                try:
                    body = await resp.aread()
                except httpx.HTTPError as err:
                    message = f"worker {upstream} failed mid-response: {type(err).__name__}"
                    return await self._fail(writer, keep, message)
                self._count(upstream)
                await _write_head(writer, resp.status_code, _response_headers(resp, len(body)), keep)
                writer.write(body)
                await writer.drain()
                return keep
            finally:
                await resp.aclose()
        finally:
            self._in_flight[upstream] -= 1
            if self._in_flight[upstream] == 0:
                del self._in_flight[upstream]

    def _count(self, upstream: str) -> None:
        self.stats.forwarded += 1
        self.stats.by_upstream[upstream] = self.stats.by_upstream.get(upstream, 0) + 1

    async def _relay_stream(
        self, resp: httpx.Response, writer: asyncio.StreamWriter, keep: bool, upstream: str
    ) -> bool:
        """Relay an SSE stream chunk by chunk; a worker dying mid-stream ends it with an error event."""
        await _write_head(writer, resp.status_code, _response_headers(resp, None), keep)
        try:
            async for chunk in resp.aiter_raw():
                if chunk:
                    writer.write(b"%x\r\n%s\r\n" % (len(chunk), chunk))
                    await writer.drain()
        except httpx.HTTPError as err:
            self.stats.failed += 1
            message = f"worker {upstream} failed mid-stream: {type(err).__name__}"
            payload = b"data: " + error_body(message, "server_error", "bad_gateway") + b"\n\n"
            writer.write(b"%x\r\n%s\r\n" % (len(payload), payload))
        else:
            self._count(upstream)
        writer.write(b"0\r\n\r\n")
        await writer.drain()
        return keep

    async def _fail(self, writer: asyncio.StreamWriter, keep: bool, message: str) -> bool:
        self.stats.failed += 1
        await _write_simple(writer, 502, error_body(message, "server_error", "bad_gateway"), keep)
        return keep


def _response_headers(resp: httpx.Response, length: int | None) -> list[tuple[str, str]]:
    out = [(k, v) for k, v in resp.headers.multi_items() if k.lower() not in HOP_BY_HOP]
    out = [(k, v) for k, v in out if k.lower() != "content-encoding"]  # httpx decodes bodies
    if length is None:
        out.append(("transfer-encoding", "chunked"))
    else:
        out.append(("content-length", str(length)))
    return out


async def _write_head(writer: asyncio.StreamWriter, status: int, headers: list[tuple[str, str]], keep: bool) -> None:
    lines = [f"HTTP/1.1 {status} {REASONS.get(status, 'Status')}"]
    lines += [f"{k}: {v}" for k, v in headers]
    lines.append("connection: keep-alive" if keep else "connection: close")
    writer.write(("\r\n".join(lines) + "\r\n\r\n").encode("latin-1"))


async def _write_simple(writer: asyncio.StreamWriter, status: int, body: bytes, keep: bool) -> None:
    headers = [("content-type", "application/json"), ("content-length", str(len(body)))]
    await _write_head(writer, status, headers, keep)
    writer.write(body)
    await writer.drain()
