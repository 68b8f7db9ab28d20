"""Reading typed fields out of small JSON request bodies, failing with 400 `BAD_REQUEST`.

Handlers call these instead of indexing the payload, so a missing or mistyped field is always a
clear 4xx naming the field, never a KeyError turned into a 500.
"""

from __future__ import annotations

from typing import Any, TypeVar

from bench.agent.http import MAX_JSON_BODY, ApiError, Request, decode_json

T = TypeVar("T")


async def json_object(request: Request) -> dict[str, Any]:
    """The body as a JSON object; an empty body counts as `{}`."""
    body = await request.receive_body(MAX_JSON_BODY)
    if not body.strip():
        return {}
    payload = decode_json(body)
    if not isinstance(payload, dict):
        raise ApiError(400, "BAD_REQUEST", {"reason": "expected a JSON object"})
    return payload


def required(payload: dict[str, Any], name: str, kind: type[T]) -> T:
    value = payload.get(name)
    if not isinstance(value, kind) or (isinstance(value, bool) and kind is not bool):
        raise ApiError(400, "BAD_REQUEST", {"field": name, "reason": f"{kind.__name__} required"})
    return value


def optional(payload: dict[str, Any], name: str, kind: type[T]) -> T | None:
    if payload.get(name) is None:
        return None
    return required(payload, name, kind)
