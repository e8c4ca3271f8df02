"""What `helios demo` shows while it runs: a rich live panel on a terminal, plain lines otherwise."""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any


@dataclass
class LiveState:
    """The numbers on screen, updated by the loop's ticks and the clients."""

    phase: str = "starting"
    loop_phase: str = "Pending"
    telemetry: str = "-"  # "ok", or why the loop cannot read it (it then decides nothing)
    active: str = "-"
    target: str = "-"
    reason: str = ""
    breach_ratio: float | None = None
    resident_bytes: int = 0
    ok: int = 0
    failed: int = 0
    phase_index: int = 0
    phase_count: int = 0
    phase_started: float = 0.0
    started: float = field(default_factory=time.time)
    workers: list[tuple[str, str, str, str]] = field(default_factory=list)  # name, role, ready, memory
    events: deque[str] = field(default_factory=lambda: deque(maxlen=8))
    recent_tokens: deque[tuple[float, int]] = field(default_factory=deque)

    def tokens_per_second(self, now: float, window: float = 5.0) -> float:
        while self.recent_tokens and self.recent_tokens[0][0] < now - window:
            self.recent_tokens.popleft()
        return sum(t for _, t in self.recent_tokens) / window


class Display:
    """A rich live panel on a terminal; plain lines otherwise (CI logs, pipes)."""

    def __init__(self, state: LiveState, live: bool, log: Callable[[str], None]) -> None:
        self.state = state
        self.log = log
        self._live: Any = None
        self._last_line = 0.0
        if live:
            from rich.live import Live

            self._live = Live(get_renderable=self._render, refresh_per_second=4, transient=False)

    def __enter__(self) -> Display:
        if self._live is not None:
            self._live.__enter__()
        return self

    def __exit__(self, *exc: object) -> None:
        if self._live is not None:
            self._live.__exit__(None, None, None)

    def say(self, line: str) -> None:
        """A notable moment: into the event list, and a plain line when there is no live panel."""
        self.state.events.append(line)
        if self._live is None:
            self.log(line)

    def heartbeat(self, now: float) -> None:
        if self._live is None and now - self._last_line >= 5.0:
            self._last_line = now
            self.log(status_line(self.state, now))

    def _render(self) -> Any:
        from rich.console import Group
        from rich.panel import Panel
        from rich.table import Table

        s, now = self.state, time.time()
        table = Table.grid(padding=(0, 2))
        table.add_column(style="bold cyan")
        table.add_column()
        ratio = "-" if s.breach_ratio is None else f"{s.breach_ratio:.0%}"
        progress = f"  (phase {s.phase_index}/{s.phase_count}, {now - s.phase_started:.0f}s)" if s.phase_index else ""
        rows = [
            ("elapsed", f"{now - s.started:.0f}s"),
            ("workload", s.phase + progress),
            ("loop", s.loop_phase),
            ("telemetry", s.telemetry),
            ("serving", s.active + (f"  -> switching to {s.target}" if s.target != "-" else "")),
            ("last decision", s.reason or "-"),
            ("breach ratio", ratio),
            ("tokens/s", f"{s.tokens_per_second(now):.0f}"),
            ("worker memory", f"{s.resident_bytes / 2**20:.0f} MiB resident"),
            ("requests", f"{s.ok} ok, {s.failed} failed"),
        ]
        for k, v in rows:
            table.add_row(k, v)
        workers = Table("worker", "role", "ready", "memory", box=None, header_style="bold")
        for row in s.workers:
            workers.add_row(*row)
        events = "\n".join(s.events) or "-"
        return Group(
            Panel(table, title="HELIOS demo"),
            Panel(workers, title="worker processes"),
            Panel(events, title="events and decisions"),
        )


def status_line(s: LiveState, now: float) -> str:
    ratio = "-" if s.breach_ratio is None else f"{s.breach_ratio:.0%}"
    return (
        f"[{s.phase}] loop={s.loop_phase} telemetry={s.telemetry} serving={s.active} breach={ratio} "
        f"tok/s={s.tokens_per_second(now):.0f} mem={s.resident_bytes / 2**20:.0f}MiB ok={s.ok} failed={s.failed}"
    )
