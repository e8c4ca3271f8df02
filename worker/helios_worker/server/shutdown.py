"""Graceful shutdown for Kubernetes: on SIGTERM, drain first, then let uvicorn stop.

Plain uvicorn closes its socket at once, so /readyz and new requests would see connection errors.
Here the first signal keeps the socket open: /readyz turns 503, new requests get 503, in-flight
ones finish (engine.drain), and only then does uvicorn shut down. A second signal stops at once.
"""

from __future__ import annotations

import asyncio
import logging
import socket
from collections.abc import Awaitable, Callable
from pathlib import Path
from types import FrameType

import uvicorn

log = logging.getLogger("helios.worker.server")


class DrainingServer(uvicorn.Server):
    """uvicorn.Server whose first SIGTERM/SIGINT runs `drain` before exiting."""

    def __init__(
        self, config: uvicorn.Config, drain: Callable[[], Awaitable[None]], port_file: Path | None = None
    ) -> None:
        super().__init__(config)
        self._drain = drain
        self._drain_requested = False
        self._drain_task: asyncio.Task[None] | None = None
        self._port_file = port_file

    def handle_exit(self, sig: int, frame: FrameType | None) -> None:
        if self._drain_requested:  # a second signal: stop now
            self.force_exit = True
            self.should_exit = True
            return
        self._drain_requested = True

    async def on_tick(self, counter: int) -> bool:
        if self._drain_requested and self._drain_task is None:
            log.info("signal received: draining before shutdown")
            self._drain_task = asyncio.ensure_future(self._drain_then_exit())
        return await super().on_tick(counter)

    async def _drain_then_exit(self) -> None:
        try:
            await self._drain()
        except Exception:  # exit anyway; the log says why the drain was cut short
            log.exception("drain failed")
        self.should_exit = True

    async def startup(self, sockets: list[socket.socket] | None = None) -> None:
        await super().startup(sockets)
        if self.started and self.servers:
            port = self.servers[0].sockets[0].getsockname()[1]
            log.info("helios worker listening on http://%s:%s", self.config.host, port)
            if self._port_file is not None:
                self._port_file.write_text(f"{port}\n")
