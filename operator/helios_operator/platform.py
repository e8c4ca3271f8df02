"""The one interface the controller's loop drives: Kubernetes objects, or processes on one machine."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol

from helios_operator.core.types import HeliosSpec, Observed, Owner, PlatformAction, Status


class PlatformError(RuntimeError):
    """An action could not be applied; the next reconcile retries it."""


class Platform(Protocol):
    """Where one HeliosDeployment's workers live. Every call is idempotent; the loop retries it."""

    async def observe(self, owner: Owner) -> Observed:
        """The owner's workers and the pool its stable Service selects."""
        ...

    async def apply(self, owner: Owner, spec: HeliosSpec | None, actions: Sequence[PlatformAction]) -> None:
        """Apply in order; stop at the first failure (PlatformError), so order is kept. `spec` is what
        the workers are rendered from; None (a spec that does not parse) allows only Events."""
        ...

    async def write_status(self, owner: Owner, status: Status) -> None:
        """Record what the step decided (the Kubernetes status subresource, or memory)."""
        ...

    async def remove(self, owner: Owner) -> None:
        """The owner is gone: delete its workers and Services."""
        ...
