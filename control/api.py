"""How a control route is declared and served: the Route record (one per operation), the Quart view
that authenticates, parses and validates the body strictly and answers in the one envelope, and the
OpenAPI document built from the same records. Handlers never see raw JSON or unauthenticated users."""

from __future__ import annotations

import json
import re
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import parse_qsl

import orjson
import pydantic
from quart import Response, request
from werkzeug.exceptions import HTTPException

from gateway.errors import ApiError, envelope
from gateway.logs import log_request
from gateway.server import Exchange

from .auth.tokens import TokenKind
from .services import Services


class Body(pydantic.BaseModel):
    """Base of every request body: unknown fields are an error, strings are not coerced."""

    model_config = pydantic.ConfigDict(extra="forbid", strict=True, populate_by_name=True)


@dataclass(frozen=True)
class CurrentUser:
    id: int
    role: str
    family: str | None = None

    @property
    def is_admin(self) -> bool:
        return self.role == "admin"


@dataclass
class Ctx:
    services: Services
    user: CurrentUser | None
    body: Any
    query: dict[str, str]
    client: str
    headers: dict[str, str]

    @property
    def me(self) -> CurrentUser:
        assert self.user is not None
        return self.user


Result = dict[str, Any] | list[Any] | tuple[Any, int] | Response | None
Handler = Callable[..., Awaitable[Result]]


@dataclass(frozen=True)
class Route:
    method: str
    path: str  # Quart syntax: /api/servers/<int:server_id>
    handler: Handler | None
    summary: str
    auth: str | None = "user"  # None | "user" | "admin"
    body: type[pydantic.BaseModel] | None = None
    response: dict[str, Any] | None = None  # JSON Schema of the success body
    status: int = 200
    tags: tuple[str, ...] = ()
    raw_body: bool = False  # handler reads the raw body itself (webhooks)
    data_plane: bool = False  # served by gateway/ natively; listed here for the OpenAPI document
    hot: bool = False  # a GET the Portal polls: served on the front server itself, no Quart (front_view)
    extra_doc: dict[str, Any] = field(default_factory=dict)

    @property
    def endpoint(self) -> str:
        return f"{self.method.lower()}:{self.path}"

    @property
    def openapi_path(self) -> str:
        return re.sub(r"<(?:\w+:)?(\w+)>", r"{\1}", self.path)


# orjson: ~10x cheaper than json.dumps on a server listing (issue 20), and it embeds stored JSON text
# (orjson.Fragment) without decoding it. The options keep json.dumps(default=str)'s answers for what orjson
# would otherwise render its own way (datetimes, dataclasses) and accept non-string keys as json does.
_JSON_OPTIONS = orjson.OPT_NON_STR_KEYS | orjson.OPT_PASSTHROUGH_DATETIME | orjson.OPT_PASSTHROUGH_DATACLASS


def json_bytes(data: Any) -> bytes:
    try:
        return orjson.dumps(data, default=str, option=_JSON_OPTIONS)
    except TypeError:
        # orjson refuses integers past 64 bits, which json.loads accepts in a request and a handler may
        # echo back: answer them as json.dumps always did rather than with a 500.
        return json.dumps(data, separators=(",", ":"), default=str).encode()


def json_response(data: Any, status: int = 200, headers: dict[str, str] | None = None) -> Response:
    return Response(json_bytes(data), status=status, content_type="application/json", headers=headers)


def error_response(error: ApiError) -> Response:
    return json_response(envelope(error.code, error.details), error.status, error.headers)


def _validation_details(exc: pydantic.ValidationError) -> list[dict[str, Any]]:
    return [
        {"field": ".".join(str(p) for p in err["loc"]) or None, "message": err["msg"], "type": err["type"]}
        for err in exc.errors(include_url=False, include_input=False)
    ]


async def parse_body(model: type[pydantic.BaseModel]) -> pydantic.BaseModel:
    mimetype = request.mimetype
    if mimetype != "application/json":
        raise ApiError(415, "UNSUPPORTED_MEDIA_TYPE", {"expected": "application/json"})
    raw = await request.get_data(as_text=False, cache=True)
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise ApiError(400, "INVALID_JSON", {"reason": "body is not valid UTF-8"}) from exc
    try:
        data = json.loads(text) if text.strip() else None
    except json.JSONDecodeError as exc:
        raise ApiError(400, "INVALID_JSON", {"reason": exc.msg, "line": exc.lineno, "column": exc.colno}) from exc
    if not isinstance(data, dict):
        raise ApiError(400, "INVALID_JSON", {"reason": "body must be a JSON object"})
    try:
        return model.model_validate(data)
    except pydantic.ValidationError as exc:
        raise ApiError(422, "VALIDATION_FAILED", _validation_details(exc)) from exc


def bearer_token(headers: Any) -> str | None:
    value = headers.get("authorization", "")
    scheme, _, token = value.partition(" ")
    if scheme.lower() != "bearer" or not token.strip():
        return None
    return token.strip()


def authenticate(services: Services, headers: Any) -> CurrentUser:
    token = bearer_token(headers)
    if token is None:
        raise ApiError(401, "UNAUTHORIZED", {"reason": "missing bearer access token"},
                       headers={"WWW-Authenticate": "Bearer"})
    claims = services.tokens.verify(TokenKind.ACCESS, token)
    return CurrentUser(int(claims["sub"]), claims.get("role", "user"), claims.get("fam"))


def client_address() -> str:
    addr = request.scope.get("client")
    return addr[0] if addr else "unknown"


def make_view(route: Route, services: Services) -> Callable[..., Awaitable[Response]]:
    assert route.handler is not None
    handler = route.handler

    async def view(**params: Any) -> Response:
        request.scope["zlh.route"] = route.path
        user = None
        if route.auth is not None:
            user = authenticate(services, request.headers)
            if route.auth == "admin" and not user.is_admin:
                raise ApiError(403, "FORBIDDEN", {"reason": "admin only"})
        body = await parse_body(route.body) if route.body is not None else None
        ctx = Ctx(services, user, body, {k: v for k, v in request.args.items()}, client_address(),
                  {k.lower(): v for k, v in request.headers.items()})
        result = await handler(ctx, **params)
        if isinstance(result, Response):
            return result
        if isinstance(result, tuple):
            data, status = result
            return json_response(data, status)
        if result is None:
            return Response(b"", status=204)
        return json_response(result, route.status)

    view.__name__ = route.endpoint
    return view


_PATH_PARAM = re.compile(r"<(?:(\w+):)?(\w+)>")


def route_pattern(route: Route) -> re.Pattern[str]:
    """The route's Quart path as a regular expression (a trailing slash allowed, as strict_slashes=False)."""
    pattern, last = "", 0
    for match in _PATH_PARAM.finditer(route.path):
        conv, name = match.groups()
        pattern += re.escape(route.path[last:match.start()])
        pattern += rf"(?P<{name}>\d+)" if conv == "int" else rf"(?P<{name}>[^/]+)"
        last = match.end()
    return re.compile("^" + pattern + re.escape(route.path[last:].rstrip("/")) + "/?$")


def front_view(route: Route, services: Services) -> Callable[[Exchange, dict[str, str]], Awaitable[None]]:
    """`route` served on the front server's exchange with no Quart in between, for the hot reads the Portal
    polls: the same authentication, Ctx, handler and error envelope as make_view, minus Quart's request and
    response machinery (a tenth of the CPU of a 100-server listing, and Quart caps any route near 2k req/s
    here). GET without a body only; the front server logs and counts it under `route.path`."""
    assert route.handler is not None and route.method == "GET" and route.body is None
    handler = route.handler
    converters = {name: int if conv == "int" else str for conv, name in _PATH_PARAM.findall(route.path)}

    async def view(exchange: Exchange, params: dict[str, str]) -> None:
        request = exchange.request
        headers = {k.decode("latin-1"): v.decode("latin-1") for k, v in request.headers}
        user = None
        if route.auth is not None:
            user = authenticate(services, headers)
            if route.auth == "admin" and not user.is_admin:
                raise ApiError(403, "FORBIDDEN", {"reason": "admin only"})
        query: dict[str, str] = {}
        for key, value in parse_qsl(request.query, keep_blank_values=True):
            query.setdefault(key, value)
        client = (request.client or "unknown:0").rpartition(":")[0]
        ctx = Ctx(services, user, None, query, client, headers)
        result = await handler(ctx, **{name: converters[name](value) for name, value in params.items()})
        if isinstance(result, Response):
            raise TypeError(f"{route.endpoint}: a hot route answers with data, not a Quart Response")
        if result is None:
            await exchange.send_head(204, [])
            await exchange.end()
            return
        data, status = result if isinstance(result, tuple) else (result, route.status)
        await exchange.respond(status, json_bytes(data))

    return view


def install_error_handlers(app: Any) -> None:
    @app.errorhandler(ApiError)
    async def on_api_error(error: ApiError) -> Response:
        return error_response(error)

    @app.errorhandler(HTTPException)
    async def on_http_exception(error: HTTPException) -> Response:
        status = error.code or 500
        return error_response(ApiError(status))

    @app.errorhandler(Exception)
    async def on_unexpected(error: Exception) -> Response:
        app.logger.exception("unhandled error on %s", request.path)
        return error_response(ApiError(500))


class AccessLog:
    """ASGI wrapper: one structured log line and metrics per control-API request."""

    def __init__(self, app: Any, services: Services) -> None:
        self.app = app
        self.services = services

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = time.perf_counter()
        status = 0

        async def observed_send(message: dict[str, Any]) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, observed_send)
        finally:
            duration = time.perf_counter() - started
            route = scope.get("zlh.route", "unmatched")
            client = scope.get("client")
            self.services.metrics.observe_request(route, scope["method"], status or 499, duration)
            log_request(scope["method"], scope["path"], scope.get("query_string", b"").decode("latin-1"),
                        status or 499, duration, f"{client[0]}:{client[1]}" if client else None, route)


ERROR_SCHEMA = {
    "type": "object",
    "required": ["error", "details"],
    "properties": {"error": {"type": "string"}, "details": {}},
}


def openapi_document(routes: list[Route], title: str, version: str) -> dict[str, Any]:
    paths: dict[str, dict[str, Any]] = {}
    for route in routes:
        params = [
            {"name": name, "in": "path", "required": True,
             "schema": {"type": "integer" if conv == "int" else "string"}}
            for conv, name in re.findall(r"<(?:(\w+):)?(\w+)>", route.path)
        ]
        op: dict[str, Any] = {
            "operationId": route.endpoint,
            "summary": route.summary,
            "tags": list(route.tags),
            "parameters": params + route.extra_doc.get("parameters", []),
            "responses": {
                str(route.status): {
                    "description": "success",
                    **({"content": {"application/json": {"schema": route.response}}} if route.response else {}),
                },
                "default": {"description": "error envelope",
                            "content": {"application/json": {"schema": {"$ref": "#/components/schemas/Error"}}}},
            },
        }
        op["responses"].update(route.extra_doc.get("responses", {}))
        if route.auth:
            op["security"] = [{"bearer": []}]
        if route.body is not None:
            op["requestBody"] = {"required": True, "content": {"application/json": {
                "schema": route.body.model_json_schema(by_alias=True)}}}
        elif "requestBody" in route.extra_doc:
            op["requestBody"] = route.extra_doc["requestBody"]
        if route.extra_doc.get("description"):
            op["description"] = route.extra_doc["description"]
        paths.setdefault(route.openapi_path, {})[route.method.lower()] = op
    return {
        "openapi": "3.1.0",
        "info": {"title": title, "version": version},
        "paths": paths,
        "components": {
            "schemas": {"Error": ERROR_SCHEMA},
            "securitySchemes": {"bearer": {"type": "http", "scheme": "bearer", "bearerFormat": "JWT"}},
        },
    }
