"""Errors the server answers in OpenAI's error shape: {"error": {"message", "type", "param", "code"}}.

OpenAI's clients read `type` and `code`; the status decides whether they retry (429 and 503 are
retried, honouring Retry-After).
"""

from __future__ import annotations

from fastapi.responses import JSONResponse


class APIError(Exception):
    """A request the server refuses or could not serve; becomes an OpenAI-style error response."""

    def __init__(self, status: int, message: str, *, type: str = "invalid_request_error", param: str | None = None,
                 code: str | None = None, retry_after: int | None = None):
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type, param, code
        self.retry_after = retry_after

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}

    def response(self) -> JSONResponse:
        headers = {"Retry-After": str(self.retry_after)} if self.retry_after is not None else None
        return JSONResponse(self.body(), status_code=self.status, headers=headers)


def bad_request(message: str, param: str | None = None, code: str | None = None) -> APIError:
    return APIError(400, message, param=param, code=code)


def overloaded(retry_after: int, waiting: int) -> APIError:
    return APIError(503, f"the server is busy: {waiting} requests are already waiting; retry after {retry_after} s",
                    type="server_overloaded", code="queue_full", retry_after=retry_after)
