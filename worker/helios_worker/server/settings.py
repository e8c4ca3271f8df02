"""What the server is told at start: identity, auth and shutdown behaviour."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class ServerSettings:
    model_name: str  # what /v1/models and every response call the model
    candidate: str
    depth: int
    model_layers: int
    exits: str = "trained"  # trained | adapters | off | untrained, as in helios_worker_info
    api_token: str | None = None  # bearer token the /v1 routes require; None: open
    drain_timeout_seconds: float = 30.0
    warmup: bool = True

    @property
    def system_fingerprint(self) -> str:
        """OpenAI's backend-configuration field: which candidate at which depth served the answer."""
        return f"helios-{self.candidate}-depth{self.depth}"
