"""The HTTP layer's one error type, and how failures reported by the engine map onto it.

Every refusal and failure a client sees is an `APIError`: a status, and an OpenAI error object
(`{"error": {"message", "type", "param", "code"}}`) that the OpenAI SDK turns into its own
exception classes (400 BadRequestError, 403 PermissionDeniedError, 503 InternalServerError ...).
"""
from __future__ import annotations

from ladi_core.backends import BackendDead
from ladi_core.verifiers.sandbox import SandboxUnavailable


class APIError(Exception):
    def __init__(self, status: int, message: str, type_: str = "invalid_request_error", param: str | None = None,
                 code: str | None = None):
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type_, param, code

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


class BadRequest(APIError):
    """400: a parameter out of its range or a request the server cannot serve as asked."""

    def __init__(self, message: str, param: str | None = None, code: str = "invalid_parameter"):
        super().__init__(400, message, "invalid_request_error", param, code)


class ShuttingDown(Exception):
    """The server was told to stop and its grace period ended before this request did."""


class DeadlineExceeded(Exception):
    """The request ran past --request-timeout-s; its rows were aborted."""


def from_failure(err: BaseException) -> APIError:
    """An APIError for an exception that ended a request after it was accepted."""
    if isinstance(err, APIError):
        return err
    if isinstance(err, BackendDead):
        return APIError(503, f"the decoder backend is dead ({err}); the server is exiting so that its "
                             "supervisor can restart it", "server_error", code="backend_dead")
    if isinstance(err, ShuttingDown):
        return APIError(503, "the server is shutting down and its grace period ended before this request "
                             "finished; retry on another replica", "server_error", code="shutting_down")
    if isinstance(err, DeadlineExceeded):
        return APIError(504, str(err), "timeout_error", code="request_timeout")
    if isinstance(err, SandboxUnavailable):
        return APIError(503, str(err), "server_error", code="sandbox_unavailable")
    return APIError(500, f"generation failed: {type(err).__name__}: {err}", "server_error")
