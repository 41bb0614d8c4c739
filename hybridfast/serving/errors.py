"""The one error type of the serving layer: what a request gets back, OpenAI-style."""
from __future__ import annotations

__all__ = ["RequestError", "error_body"]


class RequestError(ValueError):
    """A request the server refuses or could not finish: HTTP ``status`` and the OpenAI error
    fields (``param``: the request field at fault, ``code``: a short machine-readable reason)."""

    def __init__(self, status: int, message: str, *, param: str | None = None, code: str | None = None,
                 type: str | None = None):
        super().__init__(message)
        self.status, self.message, self.param, self.code = status, message, param, code
        self.type = type or ("invalid_request_error" if status < 500 else "server_error")


def error_body(e: RequestError) -> dict:
    """``{"error": {"message", "type", "param", "code"}}``."""
    return {"error": dict(message=e.message, type=e.type, param=e.param, code=e.code)}
