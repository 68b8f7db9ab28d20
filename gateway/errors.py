"""The one error envelope, `{"error": "<CODE>", "details": …}`, for every error the gateway itself
produces, on the control API and on the streaming data plane alike."""

from __future__ import annotations

import json
from http import HTTPStatus
from typing import Any

CODE_FOR_STATUS = {
    400: "BAD_REQUEST",
    401: "UNAUTHORIZED",
    403: "FORBIDDEN",
    404: "NOT_FOUND",
    405: "METHOD_NOT_ALLOWED",
    408: "REQUEST_TIMEOUT",
    409: "CONFLICT",
    411: "LENGTH_REQUIRED",
    413: "PAYLOAD_TOO_LARGE",
    415: "UNSUPPORTED_MEDIA_TYPE",
    416: "RANGE_NOT_SATISFIABLE",
    422: "VALIDATION_FAILED",
    429: "RATE_LIMITED",
    500: "INTERNAL_ERROR",
    502: "AGENT_UNAVAILABLE",
    503: "SERVICE_UNAVAILABLE",
    504: "AGENT_TIMEOUT",
}


class ApiError(Exception):
    """An error answered to the client in the envelope. Raise it anywhere a request is handled."""

    def __init__(
        self,
        status: int,
        code: str | None = None,
        details: Any = None,
        headers: dict[str, str] | None = None,
    ) -> None:
        self.status = status
        self.code = code or CODE_FOR_STATUS.get(status) or HTTPStatus(status).phrase.upper().replace(" ", "_")
        self.details = details
        self.headers = headers or {}
        super().__init__(f"{status} {self.code}")


def envelope(code: str, details: Any = None) -> dict[str, Any]:
    return {"error": code, "details": details}


def envelope_bytes(code: str, details: Any = None) -> bytes:
    return json.dumps(envelope(code, details), separators=(",", ":")).encode()
