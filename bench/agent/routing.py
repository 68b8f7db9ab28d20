"""Matching a request path and method to one handler: `{name}` segments become `request.params`.

A path nobody serves is 404 `NOT_FOUND`; a served path with another method is 405
`METHOD_NOT_ALLOWED` with an `Allow` header. HEAD is served by the GET handler (the server sends
no body). The route lists themselves live with their owners (`routes.py`, `simulator.py`).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from bench.agent.http import ApiError, Handler, Outcome, Request


@dataclass(frozen=True)
class Route:
    method: str
    pattern: str
    handler: Handler

    @property
    def segments(self) -> tuple[str, ...]:
        return tuple(self.pattern.strip("/").split("/")) if self.pattern != "/" else ()


class Router:
    def __init__(self, routes: Sequence[Route]) -> None:
        self._routes = [(route, route.segments) for route in routes]

    async def dispatch(self, request: Request, path: str | None = None) -> Outcome:
        """Run the handler for `path` (default: the request's own path)."""
        target = request.path if path is None else path
        parts = tuple(target.strip("/").split("/")) if target.strip("/") else ()
        allowed: list[str] = []
        method = "GET" if request.method == "HEAD" else request.method
        for route, segments in self._routes:
            params = match(segments, parts)
            if params is None:
                continue
            if route.method != method:
                allowed.append(route.method)
                continue
            request.params = params
            return await route.handler(request)
        if allowed:
            raise ApiError(405, "METHOD_NOT_ALLOWED", {"allow": allowed},
                           [("allow", ", ".join(allowed))])
        raise ApiError(404, "NOT_FOUND", {"path": target})


def match(segments: tuple[str, ...], parts: tuple[str, ...]) -> dict[str, str] | None:
    if len(segments) != len(parts):
        return None
    params: dict[str, str] = {}
    for segment, part in zip(segments, parts, strict=True):
        if segment.startswith("{") and segment.endswith("}"):
            if not part:
                return None
            params[segment[1:-1]] = part
        elif segment != part:
            return None
    return params
