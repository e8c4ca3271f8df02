"""The one interface the controller's loop drives: Kubernetes objects, or processes on one machine."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any, Protocol

from helios_operator.core.types import HeliosSpec, Observed, Owner, PlatformAction, Status


class PlatformError(RuntimeError):
    """An action could not be applied; the next reconcile retries it."""


class StatusConflict(Exception):
    """The status write lost a resourceVersion race (409): the step's decision rests on an old object."""


class Platform(Protocol):
    """Where one HeliosDeployment's workers live. Every call is idempotent; the loop retries it."""

    async def observe(self, owner: Owner) -> Observed:
        """The owner's workers and the pool its stable Service selects."""
        ...

    async def apply(self, owner: Owner, spec: HeliosSpec | None, actions: Sequence[PlatformAction]) -> None:
        """Apply in order; stop at the first failure (PlatformError), so order is kept. `spec` is what
        the workers are rendered from; None (a spec that does not parse) allows only Events."""
        ...

    async def write_status(self, owner: Owner, status: Status, version: str | None) -> str | None:
        """Record what the step decided (the Kubernetes status subresource, or memory). With `version`
        the write holds only if the object is still at it (else StatusConflict); returns the new one."""
        ...

    async def fetch(self, owner: Owner) -> Mapping[str, Any] | None:
        """The owner's object as it is now (after a StatusConflict); None when it is gone."""
        ...
