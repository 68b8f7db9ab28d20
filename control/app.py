"""Assembly: the one list of every mounted route, the Quart-Trio app built from it, and
`run_gateway`, whose nursery owns every background service and the front server.

Routes marked data_plane are served by gateway/ natively (streaming, websockets, IDE proxy); they
are listed here too so this file and /openapi.json stay the complete map of the API."""

from __future__ import annotations

import logging
import tomllib
from collections.abc import Callable
from pathlib import Path
from typing import Any

import trio
from hypercorn.config import Config as HypercornConfig
from hypercorn.trio.lifespan import Lifespan
from hypercorn.utils import wrap_app
from quart_trio import QuartTrio

from gateway.metrics import Metrics
from gateway.server import FrontServer, Request
from storage import users
from storage.db import Store, connect_database
from storage.migrations import migrate

from . import ops
from .api import AccessLog, Route, install_error_handlers, make_view, openapi_document
from .auth import routes as auth
from .auth.tokens import TokenService
from .config import Settings
from .mailer import Mailer
from .services import Services

log = logging.getLogger("zlh.app")

OPEN = None
ADMIN = "admin"


def control_routes() -> list[Route]:
    """Every route of the gateway, in one place."""
    return [
        # Operations
        Route("GET", "/health", ops.health, "Liveness", auth=OPEN, tags=("ops",)),
        Route("GET", "/ready", ops.ready, "Readiness: database reachable, background services running",
              auth=OPEN, tags=("ops",)),
        Route("GET", "/metrics", ops.metrics, "Prometheus metrics (text exposition)", auth=OPEN, tags=("ops",)),
        Route("GET", "/openapi.json", ops.openapi, "This document", auth=OPEN, tags=("ops",)),
        # Auth
        Route("POST", "/api/auth/register", auth.register, "Create an account and log in", auth=OPEN,
              body=auth.Credentials, response=auth.SESSION_SCHEMA, status=201, tags=("auth",)),
        Route("POST", "/api/auth/login", auth.login, "Log in: access + refresh token", auth=OPEN,
              body=auth.LoginBody, response=auth.SESSION_SCHEMA, tags=("auth",)),
        Route("POST", "/api/auth/refresh", auth.refresh,
              "Rotate a refresh token; reusing a rotated one revokes its whole family", auth=OPEN,
              body=auth.RefreshBody, response=auth.SESSION_SCHEMA, tags=("auth",)),
        Route("POST", "/api/auth/logout", auth.logout, "Revoke the refresh-token family", auth=OPEN,
              body=auth.RefreshBody, status=204, tags=("auth",)),
        Route("POST", "/api/auth/password-reset/request", auth.password_reset_request,
              "Mail a single-use reset token (same answer whether or not the account exists)", auth=OPEN,
              body=auth.ResetRequestBody, status=202, tags=("auth",)),
        Route("POST", "/api/auth/password-reset/confirm", auth.password_reset_confirm,
              "Set a new password with a reset token; revokes every session", auth=OPEN,
              body=auth.ResetConfirmBody, tags=("auth",)),
        Route("GET", "/api/me", auth.me, "The current user", response=auth.USER_SCHEMA, tags=("auth",)),
        # Resource families: each module lists its own routes; they are mounted here, in this order.
    ]


def background_services(services: Services) -> list[Callable[..., Any]]:
    """Every background service of this process: `async def run(*, task_status)` callables, each
    started in the lifespan nursery of run_gateway (so each has an owner and stops with the app)."""
    return []


def data_plane_router(services: Services) -> Callable[[Request], Any]:
    """The data-plane routes gateway/ serves natively (none yet beyond the handoff)."""

    def route(request: Request) -> Any:
        return None

    return route


def create_app(services: Services, routes: list[Route]) -> QuartTrio:
    app = QuartTrio("zlh")
    # Streaming never passes through Quart (see gateway/server.py): control bodies are small JSON.
    app.config["MAX_CONTENT_LENGTH"] = 1024 * 1024
    app.config["BODY_TIMEOUT"] = 30
    app.config["RESPONSE_TIMEOUT"] = 60
    app.config["PROVIDE_AUTOMATIC_OPTIONS"] = False
    app.json.sort_keys = False  # type: ignore[attr-defined]
    for route in routes:
        if route.data_plane:
            continue
        app.add_url_rule(route.path, route.endpoint, make_view(route, services), methods=[route.method],
                         strict_slashes=False)
    install_error_handlers(app)
    return app


def hypercorn_config(settings: Settings) -> HypercornConfig:
    path = Path(settings.hypercorn_config)
    data: dict[str, Any] = {}
    if path.exists():
        data = tomllib.loads(path.read_text())
    config = HypercornConfig.from_mapping(data)
    if settings.bind:
        config.bind = list(settings.bind)
    config.accesslog = None
    return config


def open_store(settings: Settings) -> Store:
    db = connect_database(settings.database_url, max_connections=settings.db_threads + 4)
    return Store(db, threads=settings.db_threads)


async def prepare_storage(settings: Settings, store: Store) -> None:
    """Migrate and load the configured plans: what `make run` and tests do before serving."""
    await trio.to_thread.run_sync(migrate, store.db)
    await store.run(users.ensure_plans, settings.plans)


async def run_gateway(settings: Settings, shutdown: trio.Event | None = None, *,
                      task_status: trio.TaskStatus[list[str]] = trio.TASK_STATUS_IGNORED) -> None:
    """Serve until `shutdown` is set (then drain) or until cancelled (then stop at once).
    The nursery here owns every background service of this process."""
    shutdown = trio.Event() if shutdown is None else shutdown
    store = open_store(settings)
    try:
        await prepare_storage(settings, store)
        metrics = Metrics()
        services = Services(
            settings=settings,
            store=store,
            tokens=TokenService(settings.jwt_secret, settings.jwt_issuer),
            metrics=metrics,
            mailer=Mailer(settings.data_dir / "outbox"),
        )
        routes = control_routes()
        services.extra["openapi"] = openapi_document(routes, "ZLH gateway", "0.1.0")
        app = create_app(services, routes)
        config = hypercorn_config(settings)
        wrapped = wrap_app(AccessLog(app, services), config.wsgi_max_body_size, "asgi")
        async with trio.open_nursery() as nursery:
            lifespan = Lifespan(wrapped, config, {})
            await nursery.start(lifespan.handle_lifespan)
            await lifespan.wait_for_startup()
            for service in background_services(services):
                await nursery.start(service)
            front = FrontServer(data_plane_router(services), wrapped, config, metrics)
            async with trio.open_nursery() as server:
                binds = await server.start(front.serve, shutdown)
                services.running.add("server")
                log.info("serving", extra={"fields": {"binds": binds}})
                task_status.started(binds)
            # The front server has drained; now stop the app and the background services.
            services.running.discard("server")
            with trio.move_on_after(5):
                await lifespan.wait_for_shutdown()
            nursery.cancel_scope.cancel()
    finally:
        store.close()
