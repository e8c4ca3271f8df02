"""Typed errors and the one table that maps them to HTTP answers in OpenAI's error shape.

Every failure a client can cause becomes a 4xx JSON body `{"error": {message, type, param, code}}`;
only a bug is a 500, and even that keeps the shape and the process alive.
"""

from __future__ import annotations

from dataclasses import dataclass

from helios_worker import contract
from helios_worker.engine.api import Draining, PromptTooLong, QueueFull


class ServerError(Exception):
    """Base of the server's own typed errors; `param` names the offending request field."""

    def __init__(self, message: str, param: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.param = param


class InvalidRequest(ServerError):
    """A well-formed body asking for something out of range or unsupported."""


class Unauthorized(ServerError):
    """Missing or wrong bearer token."""


class NotReady(ServerError):
    """The model is loaded but not warmed up yet."""


class NotFound(ServerError):
    """No such route."""


class MethodNotAllowed(ServerError):
    """The route exists, the method does not."""


class EngineFailed(ServerError):
    """The engine finished an admitted request with an error: a bug or a device fault."""


@dataclass(frozen=True)
class ErrorAnswer:
    """How one error type is answered."""

    status_code: int
    type: str
    code: str
    outcome: str  # helios_requests_total{status}


INTERNAL = ErrorAnswer(500, "server_error", "internal_error", contract.STATUS_ERROR)

# The one table: most specific first (lookup walks the exception's MRO).
ERROR_TABLE: dict[type[BaseException], ErrorAnswer] = {
    InvalidRequest: ErrorAnswer(400, "invalid_request_error", "invalid_request", contract.STATUS_CLIENT_ERROR),
    PromptTooLong: ErrorAnswer(400, "invalid_request_error", "context_length_exceeded", contract.STATUS_CLIENT_ERROR),
    Unauthorized: ErrorAnswer(401, "authentication_error", "invalid_api_key", contract.STATUS_CLIENT_ERROR),
    NotFound: ErrorAnswer(404, "invalid_request_error", "not_found", contract.STATUS_CLIENT_ERROR),
    MethodNotAllowed: ErrorAnswer(405, "invalid_request_error", "method_not_allowed", contract.STATUS_CLIENT_ERROR),
    QueueFull: ErrorAnswer(429, "rate_limit_error", "queue_full", contract.STATUS_REJECTED),
    Draining: ErrorAnswer(503, "service_unavailable", "draining", contract.STATUS_REJECTED),
    NotReady: ErrorAnswer(503, "service_unavailable", "model_not_ready", contract.STATUS_REJECTED),
    EngineFailed: ErrorAnswer(500, "server_error", "engine_error", contract.STATUS_ERROR),
}


def answer_for(error: BaseException) -> ErrorAnswer:
    """The table's row for this error (by its most specific listed type), else a 500."""
    for cls in type(error).__mro__:
        row = ERROR_TABLE.get(cls)
        if row is not None:
            return row
    return INTERNAL


def error_body(message: str, answer: ErrorAnswer, param: str | None = None) -> dict[str, object]:
    """OpenAI's error shape."""
    return {"error": {"message": message, "type": answer.type, "param": param, "code": answer.code}}


def retry_after_seconds(error: BaseException) -> int | None:
    """The Retry-After value for rejections that say when to come back."""
    if isinstance(error, QueueFull):
        return max(1, round(error.retry_after_seconds))
    return None
