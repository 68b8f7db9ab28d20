"""How a control route is declared and served: the Route record (one per operation), the Quart view
that authenticates, parses and validates the body strictly and answers in the one envelope, and the
OpenAPI document built from the same records. Handlers never see raw JSON or unauthenticated users."""

from __future__ import annotations

import json
import math
import re
import time
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import parse_qsl

import orjson
import pydantic
from pydantic.json_schema import models_json_schema
from quart import Response, request
from werkzeug.exceptions import HTTPException
from werkzeug.routing import IntegerConverter, Map

from gateway.errors import ApiError, envelope
from gateway.forwarded import header_pairs, real_client, trusted_networks
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
    content_type: str = "application/json"  # of the success body, for the OpenAPI document
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


# Client JSON is refused before it can cost anything: a nesting depth the decoder would recurse into,
# an integer with thousands of digits (int() is quadratic, and raises ValueError above 4,300 digits),
# a key given twice (the YAML loader refuses it too, so the two parsers agree), NaN/Infinity.
MAX_JSON_DEPTH = 64
MAX_JSON_INT = 2**63 - 1
_JSON_STRING = re.compile(r'"[^"\\]*(?:\\.[^"\\]*)*"', re.DOTALL)
_NOT_BRACKET = re.compile(r"[^\[\]{}]+")


class JsonRefused(ValueError):
    """A client body that is not acceptable JSON; `reason` says why, for the 400 envelope."""

    def __init__(self, reason: str, **where: int) -> None:
        super().__init__(reason)
        self.reason = reason
        self.where = where


def _json_depth_ok(text: str) -> bool:
    depth = 0
    for bracket in _NOT_BRACKET.sub("", _JSON_STRING.sub("", text)):
        depth += 1 if bracket in "[{" else -1
        if depth > MAX_JSON_DEPTH:
            return False
    return True


def _unique_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    obj: dict[str, Any] = {}
    for key, value in pairs:
        if key in obj:
            raise JsonRefused(f"duplicate key {key[:64]!r}")
        obj[key] = value
    return obj


def _bounded_int(digits: str) -> int:
    if len(digits.lstrip("-")) > 19 or abs(value := int(digits)) > MAX_JSON_INT:
        raise JsonRefused(f"integer out of range (|n| <= {MAX_JSON_INT})")
    return value


def _finite_float(text: str) -> float:
    value = float(text)
    if not math.isfinite(value):
        raise JsonRefused("number out of range")
    return value


def _no_constant(name: str) -> Any:
    raise JsonRefused(f"{name} is not JSON")


def decode_json(raw: bytes) -> Any:
    """The one decoder of client JSON in control/: UTF-8, depth <= MAX_JSON_DEPTH, integers within
    64 bits, no duplicate keys, no NaN/Infinity. An empty body is None. Raises JsonRefused."""
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError:
        raise JsonRefused("body is not valid UTF-8") from None
    if not text.strip():
        return None
    if not _json_depth_ok(text):
        raise JsonRefused(f"nested deeper than {MAX_JSON_DEPTH}")
    try:
        return json.loads(text, object_pairs_hook=_unique_keys, parse_int=_bounded_int, parse_float=_finite_float,
                          parse_constant=_no_constant)
    except json.JSONDecodeError as exc:
        raise JsonRefused(exc.msg, line=exc.lineno, column=exc.colno) from None
    except RecursionError:  # the depth scan is the guard; this only backs it up
        raise JsonRefused(f"nested deeper than {MAX_JSON_DEPTH}") from None


async def parse_body(model: type[pydantic.BaseModel]) -> pydantic.BaseModel:
    mimetype = request.mimetype
    if mimetype != "application/json":
        raise ApiError(415, "UNSUPPORTED_MEDIA_TYPE", {"expected": "application/json"})
    raw = await request.get_data(as_text=False, cache=True)
    try:
        data = decode_json(raw if isinstance(raw, bytes) else raw.encode())
    except JsonRefused as exc:
        raise ApiError(400, "INVALID_JSON", {"reason": exc.reason, **exc.where}) from None
    if not isinstance(data, dict):
        raise ApiError(400, "INVALID_JSON", {"reason": "body must be a JSON object"})
    try:
        return model.model_validate(data)
    except pydantic.ValidationError as exc:
        raise ApiError(422, "VALIDATION_FAILED", _validation_details(exc)) from None


# Ids in paths and queries: the database's id and vmid columns are 32-bit on PostgreSQL (SERIAL,
# INTEGER), so anything above would fail inside the query. Out of range is "no such object" (404 for
# a path) or a 422 for a query, decided before a handler runs.
MAX_ID = 2**31 - 1


def digits_up_to(high: int) -> str:
    """A regex (no anchors) for the decimal numbers 0..high written in ASCII digits, leading zeros
    allowed up to high's width: the data plane's path patterns use it, so an id out of range does not
    match (404) instead of reaching a query."""
    text = str(high)
    branches = [f"[0-9]{{1,{len(text) - 1}}}"] if len(text) > 1 else []
    for i, digit in enumerate(text):
        if digit != "0":
            rest = len(text) - i - 1
            branches.append(text[:i] + (f"[0-{int(digit) - 1}]" if digit != "1" else "0") +
                            (f"[0-9]{{{rest}}}" if rest else ""))
    branches.append(text)
    return "(?:" + "|".join(branches) + ")"


ID_DIGITS = digits_up_to(MAX_ID)


class BoundedInt(IntegerConverter):
    """`<int:…>` in every route: ASCII digits up to MAX_ID; anything else does not match (404)."""

    regex = ID_DIGITS

    def __init__(self, map: Map, *args: Any, **kwargs: Any) -> None:
        kwargs.setdefault("max", MAX_ID)
        super().__init__(map, *args, **kwargs)


def install_url_converters(app: Any) -> None:
    """Before any rule is added: `int` path parameters are bounded (BoundedInt)."""
    app.url_map.converters["int"] = BoundedInt


def parse_int(raw: str, low: int, high: int) -> int | None:
    """The one parser of integers a client writes in a query: ASCII digits (optional minus), within
    [low, high]; None for anything else (callers answer in their own envelope)."""
    text = raw.strip()
    if not re.fullmatch(r"-?[0-9]{1,19}", text):
        return None
    value = int(text)
    return value if low <= value <= high else None


def query_int(ctx: Ctx, name: str, default: int, low: int = 0, high: int = MAX_ID) -> int:
    """An integer query parameter, or 400 VALIDATION_FAILED naming it."""
    raw = ctx.query.get(name)
    if raw is None or raw == "":
        return default
    value = parse_int(raw, low, high)
    if value is None:
        raise ApiError(400, "VALIDATION_FAILED", [{"field": name, "message": f"integer in [{low}, {high}]",
                                                   "type": "range"}])
    return value


def bearer_token(headers: Any) -> str | None:
    """The one bearer parser: the token of an `Authorization: Bearer …` header (`headers` is anything
    with a case-insensitive or lower-cased `get`), else None."""
    value = headers.get("authorization") or ""
    scheme, _, token = value.partition(" ")
    if scheme.lower() != "bearer" or not token.strip():
        return None
    return token.strip()


def session_user(services: Services, claims: dict[str, Any]) -> CurrentUser:
    """The caller a verified token names, once the session rule holds: the account is active (not
    disabled, not deleted) and the login (`fam`) has not ended (control/sessions.py; in memory)."""
    user = CurrentUser(int(claims["sub"]), claims.get("role", "user"), claims.get("fam"))
    services.sessions.check(user.id, user.family)
    return user


def authenticate(services: Services, headers: Any) -> CurrentUser:
    """The one authentication of every control route and data-plane stream: bearer access token,
    verified, then the session rule. 401/403 in the envelope otherwise."""
    token = bearer_token(headers)
    if token is None:
        raise ApiError(401, "UNAUTHORIZED", {"reason": "missing bearer access token"},
                       headers={"WWW-Authenticate": "Bearer"})
    return session_user(services, services.tokens.verify(TokenKind.ACCESS, token))


def client_address(services: Services, scope: Mapping[str, Any], headers: Any) -> str:
    """The client's IP address: the TCP peer, or the client a trusted proxy names (gateway/forwarded.py)."""
    peer = scope.get("client")
    trusted = trusted_networks(tuple(services.settings.trusted_proxies))
    return real_client(peer[0] if peer else None, headers.items(), trusted) or "unknown"


def make_view(route: Route, services: Services) -> Callable[..., Awaitable[Response]]:
    assert route.handler is not None
    handler = route.handler

    async def view(**params: Any) -> Response:
        request.scope["zlh.route"] = route.path  # type: ignore[typeddict-unknown-key]  # read by AccessLog
        user = None
        if route.auth is not None:
            user = authenticate(services, request.headers)
            if route.auth == "admin" and not user.is_admin:
                raise ApiError(403, "FORBIDDEN", {"reason": "admin only"})
        body = await parse_body(route.body) if route.body is not None else None
        ctx = Ctx(services, user, body, {k: v for k, v in request.args.items()},
                  client_address(services, request.scope, request.headers),
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
    """The route's Quart path as a regular expression (a trailing slash allowed, as strict_slashes=False);
    an integer parameter matches only the ids the bounded `int` converter accepts, so a larger one is a 404."""
    pattern, last = "", 0
    for match in _PATH_PARAM.finditer(route.path):
        conv, name = match.groups()
        pattern += re.escape(route.path[last:match.start()])
        pattern += rf"(?P<{name}>{ID_DIGITS})" if conv == "int" else rf"(?P<{name}>[^/]+)"
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
            peer = scope.get("client")
            headers = header_pairs(scope.get("headers", []))
            trusted = trusted_networks(tuple(self.services.settings.trusted_proxies))
            self.services.metrics.observe_request(route, scope["method"], status or 499, duration)
            log_request(scope["method"], scope["path"], scope.get("query_string", b"").decode("latin-1"),
                        status or 499, duration, real_client(peer[0] if peer else None, headers, trusted), route,
                        peer=f"{peer[0]}:{peer[1]}" if peer else None)


ERROR_SCHEMA = {
    "type": "object",
    "required": ["error", "details"],
    "properties": {"error": {"type": "string"}, "details": {}},
}


def _operation_ids(routes: list[Route]) -> list[str]:
    """One operationId per route, named after its handler; a handler mounted twice (the two file
    mounts) is told apart by its path. Data-plane routes have no Quart handler: method + path."""
    ids: list[str] = []
    for route in routes:
        base = route.handler.__name__ if route.handler is not None else f"{route.method.lower()}_{_slug(route.path)}"
        ids.append(base if base not in ids else f"{base}_at_{_slug(route.path)}")
    assert len(set(ids)) == len(ids), "operationIds must be unique"
    return ids


def _slug(path: str) -> str:
    plain = re.sub(r"<(?:\w+:)?(\w+)>", r"\1", path).replace("-", "_").replace(".", "_")
    return "_".join(plain.split("/")[1:]) or "root"


def _path_parameter(converter: str | None, name: str) -> dict[str, Any]:
    schema: dict[str, Any] = ({"type": "integer", "minimum": 0, "maximum": MAX_ID} if converter == "int"
                              else {"type": "string", "minLength": 1})
    return {"name": name, "in": "path", "required": True, "schema": schema}


def openapi_document(routes: list[Route], title: str, version: str) -> dict[str, Any]:
    """The document for /openapi.json, from the same Route records the app mounts. Request-body models
    are hoisted into components/schemas (their nested models too), so every $ref resolves."""
    models = sorted({route.body for route in routes if route.body is not None}, key=lambda m: m.__qualname__)
    refs, hoisted = models_json_schema([(model, "validation") for model in models], by_alias=True,
                                       ref_template="#/components/schemas/{model}")
    schemas: dict[str, Any] = {"Error": ERROR_SCHEMA, **hoisted.get("$defs", {})}
    paths: dict[str, dict[str, Any]] = {}
    for route, operation_id in zip(routes, _operation_ids(routes), strict=True):
        params = [_path_parameter(conv or None, name) for conv, name in re.findall(r"<(?:(\w+):)?(\w+)>", route.path)]
        success: dict[str, Any] = {"description": "success"}
        if route.response is not None:
            success["content"] = {route.content_type: {"schema": route.response}}
        elif route.content_type != "application/json":
            success["content"] = {route.content_type: {"schema": {"type": "string"}}}
        elif not route.data_plane and route.status not in (101, 204):
            success["content"] = {"application/json": {"schema": {"description": "JSON (shape not described)"}}}
        op: dict[str, Any] = {
            "operationId": operation_id,
            "summary": route.summary,
            "tags": list(route.tags),
            "parameters": params + route.extra_doc.get("parameters", []),
            "responses": {
                str(route.status): success,
                "default": {"description": "error envelope",
                            "content": {"application/json": {"schema": {"$ref": "#/components/schemas/Error"}}}},
            },
        }
        op["responses"].update(route.extra_doc.get("responses", {}))
        if route.auth:
            op["security"] = [{"bearer": []}]
        if route.body is not None:
            op["requestBody"] = {"required": True, "content": {"application/json": {
                "schema": refs[(route.body, "validation")]}}}
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
            "schemas": schemas,
            "securitySchemes": {"bearer": {"type": "http", "scheme": "bearer", "bearerFormat": "JWT"}},
        },
    }
