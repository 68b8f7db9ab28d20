"""Assembly: the one list of every mounted route, the Quart-Trio app built from it, and
`run_gateway`, whose nursery owns every background service and the front server.

Routes marked data_plane are served by gateway/ natively (streaming, websockets, IDE proxy); they
are listed here too so this file and /openapi.json stay the complete map of the API."""

from __future__ import annotations

import logging
import re
from collections.abc import Callable
from datetime import UTC
from functools import partial
from typing import Any

import trio
from hypercorn.config import Config as HypercornConfig
from hypercorn.trio.lifespan import Lifespan
from hypercorn.utils import wrap_app
from quart_trio import QuartTrio

from gateway.agent_client import AgentClient
from gateway.agent_http import SmallCallPool
from gateway.asgi import asgi_handler
from gateway.console import ConsoleRelay
from gateway.dataplane import DataRoute, FileStreams, path_router
from gateway.forwarded import trusted_networks
from gateway.ide_proxy import IDE_METHODS, IDE_PATH
from gateway.metrics import Metrics
from gateway.poller import Poller
from gateway.server import FrontServer, Request
from gateway.upstream import UpstreamPool
from storage import instances as store_instances
from storage import users
from storage.clock import utcnow
from storage.db import Store, connect_database
from storage.migrations import migrate

from . import admin, billing, cluster, console, dev, environments, files, instances, jobs, ops, servers
from .api import (
    ID_DIGITS,
    AccessLog,
    Route,
    front_view,
    install_error_handlers,
    install_url_converters,
    make_view,
    openapi_document,
    route_pattern,
)
from .auth import routes as auth
from .auth.tokens import TokenService
from .config import Settings
from .demo import ensure_demo
from .edge import prometheus_sd
from .edge.configured import edge_publisher
from .mailer import Mailer
from .providers.base import Provider
from .providers.local import LocalProvider
from .provisioning import Provisioner
from .services import Services
from .sessions import Sessions

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
        Route("GET", "/live", ops.live, "Liveness: the process answers", auth=OPEN, tags=("ops",)),
        Route("GET", "/", ops.service_info, "What this service is, and where its APIs live", auth=OPEN,
              tags=("ops",)),
        Route("GET", "/metrics", ops.metrics, "Prometheus metrics (text exposition)", auth=OPEN, tags=("ops",),
              content_type="text/plain"),
        Route("GET", "/openapi.json", ops.openapi, "This document", auth=OPEN, tags=("ops",)),
        Route("GET", "/api/edge/prometheus-sd", prometheus_sd.service_discovery,
              "Prometheus http_sd targets: each published agent's metrics endpoint with labels "
              "(bearer: PROMETHEUS_SD_TOKEN; 404 when not configured)", auth=OPEN,
              response=prometheus_sd.TARGET_GROUPS_SCHEMA, tags=("edge",)),
        # Auth
        Route("POST", "/api/auth/register", auth.register, "Create an account and log in", auth=OPEN,
              body=auth.Credentials, response=auth.SESSION_SCHEMA, status=201, tags=("auth",)),
        Route("POST", "/api/auth/login", auth.login, "Log in: access + refresh token", auth=OPEN,
              body=auth.LoginBody, response=auth.SESSION_SCHEMA, tags=("auth",)),
        Route("POST", "/api/auth/refresh", auth.refresh,
              "Rotate a refresh token; reusing a rotated one revokes its whole family", auth=OPEN,
              body=auth.RefreshBody, response=auth.SESSION_SCHEMA, tags=("auth",)),
        Route("POST", "/api/auth/logout", auth.logout,
              "Revoke the refresh-token family and end the IDE sessions opened from it", auth=OPEN,
              body=auth.RefreshBody, status=204, tags=("auth",)),
        Route("POST", "/api/auth/password-reset/request", auth.password_reset_request,
              "Mail a single-use reset token (same answer whether or not the account exists)", auth=OPEN,
              body=auth.ResetRequestBody, status=202, tags=("auth",)),
        Route("POST", "/api/auth/password-reset/confirm", auth.password_reset_confirm,
              "Set a new password with a reset token; revokes every session", auth=OPEN,
              body=auth.ResetConfirmBody, tags=("auth",)),
        Route("GET", "/api/me", auth.me, "The current user", response=auth.USER_SCHEMA, tags=("auth",)),
        *admin.admin_routes(),
        # Instances and containers
        Route("GET", "/api/instances", instances.list_instances,
              "ContainerInstance rows (owner-scoped; admins see all)",
              response={"type": "array", "items": instances.INSTANCE_SCHEMA}, tags=("instances",)),
        Route("POST", "/api/instances", instances.create_instance,
              "Provision a game server or dev container: plan limits, create, configure agent, wait for "
              "semantic readiness, then ready and published. Answers 202 at once; poll the server state.",
              body=instances.CreateInstance, response=instances.INSTANCE_SCHEMA, status=202, tags=("instances",)),
        Route("DELETE", "/api/containers/<int:vmid>", instances.delete_container,
              "Delete / clean up / remediate an orphan: tears down edge routes and the container, archives the "
              "instance metadata; idempotent (a repeat answers 404)", tags=("instances",)),
        # Servers: normalized state and control actions
        Route("GET", "/api/servers", servers.list_servers, "Normalized state of every server the user may see",
              response={"type": "array", "items": servers.SERVER_SCHEMA}, tags=("servers",), hot=True,
              extra_doc=servers.LIST_DOC),
        Route("GET", "/api/servers/<int:server_id>", servers.get_server, "Normalized state of one server",
              response=servers.SERVER_SCHEMA, tags=("servers",), hot=True),
        Route("POST", "/api/servers/<int:server_id>/start", servers.start, "Start the game server", tags=("servers",)),
        Route("POST", "/api/servers/<int:server_id>/stop", servers.stop, "Stop the game server", tags=("servers",)),
        Route("POST", "/api/servers/<int:server_id>/restart", servers.restart, "Restart the game server",
              tags=("servers",)),
        Route("POST", "/api/servers/<int:server_id>/console/command", servers.console_command,
              "Send one console command", body=servers.ConsoleCommand, tags=("servers",)),
        Route("POST", "/api/servers/<int:server_id>/console/token", console.console_token,
              "A short-lived console token for the websocket console (bound to this user and server)",
              response=console.TOKEN_SCHEMA, tags=("console",)),
        Route("GET", "/api/servers/<int:server_id>/console", None,
              "Websocket console. First frame {type: auth, token, since?}; then agent frames "
              "{type: line, seq, ts, data} and client frames {type: command, command}. Close codes: 4001 auth, "
              "4004 not found, 4008 policy/rate, 4009 capacity, 4010 revoked/suspended, 1009 too big, "
              "1011 agent unavailable, 1001 going away.", auth=None, data_plane=True, status=101,
              tags=("console",)),
        *file_routes(),
        *backup_and_mod_routes(),
        # Resource families: each module lists its own routes; they are mounted here, in this order.
        *dev.dev_routes(),
        *environments.routes(),
        *jobs.routes(),
        *billing.routes(),
    ]


PATH_QUERY = [{"name": "path", "in": "query", "required": True, "schema": {"type": "string"},
               "description": "file path relative to the server's data directory"}]
RAW_BODY = {"required": True, "content": {"application/octet-stream": {"schema": {"type": "string",
                                                                                   "format": "binary"}},
                                          "multipart/form-data": {"schema": {"type": "object"}}}}
RESUMABLE_DOC = (
    "Resumable uploads: POST …/files/uploads {path,size} opens a session and answers {uploadId, offset}. "
    "Send bytes with PATCH …/files/uploads/{uploadId}, header `Upload-Offset: <offset>` and the raw body; "
    "bytes that arrive are kept even if the connection drops. After an interruption, GET …/files/uploads/{uploadId} "
    "reports the offset the server holds; continue from there with another PATCH. When offset reaches size the "
    "file is moved into place atomically. A PATCH whose Upload-Offset differs from the server's answers 409 with "
    "the current offset. DELETE …/files/uploads/{uploadId} abandons the session.")


def file_routes() -> list[Route]:
    """One implementation, two mounts: /api/game/servers/:id/files… and /api/servers/:id/files…"""
    routes: list[Route] = []
    for mount in files.FILE_MOUNTS:
        base = f"{mount}/<int:server_id>/files"
        tags = ("files",)
        routes += [
            Route("GET", base, files.list_files, "List a directory (query `path`, default the root)", tags=tags),
            Route("GET", f"{base}/content", files.read_content, "Read a small text file", tags=tags,
                  extra_doc={"parameters": PATH_QUERY}),
            Route("PUT", f"{base}/content", files.write_content, "Write a small text file (atomic)",
                  body=files.WriteContent, tags=tags),
            Route("DELETE", base, files.delete_file, "Delete a file or directory", tags=tags,
                  extra_doc={"parameters": PATH_QUERY}),
            Route("POST", f"{base}/rename", files.rename_file, "Rename or move", body=files.Rename, tags=tags),
            Route("POST", f"{base}/mkdir", files.make_dir, "Create a directory", body=files.MakeDir, tags=tags),
            Route("POST", f"{base}/uploads", files.start_upload, "Open a resumable upload session",
                  body=files.StartUpload, status=201, tags=tags, extra_doc={"description": RESUMABLE_DOC}),
            Route("GET", f"{base}/uploads/<upload_id>", files.upload_status,
                  "Offset a resumable upload has reached", tags=tags, extra_doc={"description": RESUMABLE_DOC}),
            Route("DELETE", f"{base}/uploads/<upload_id>", files.abort_upload, "Abandon a resumable upload",
                  tags=tags),
            Route("PATCH", f"{base}/uploads/<upload_id>", None, "Append bytes to a resumable upload (streamed)",
                  data_plane=True, tags=tags, extra_doc={"description": RESUMABLE_DOC, "requestBody": RAW_BODY,
                  "parameters": [{"name": "Upload-Offset", "in": "header", "required": True,
                                  "schema": {"type": "integer"}}]}),
            Route("GET", f"{base}/download", None,
                  "Download a file, streamed; Range requests give 206 (resumable downloads)", data_plane=True,
                  tags=tags, extra_doc={"parameters": PATH_QUERY, "responses": {
                      "206": {"description": "partial content"}}}),
            Route("PUT", f"{base}/upload", None,
                  "Upload a file, streamed as-is (raw bytes or multipart; Content-Length or chunked); "
                  "the plan's size limit is enforced as bytes flow; an aborted upload leaves nothing",
                  data_plane=True, status=201, tags=tags,
                  extra_doc={"parameters": PATH_QUERY, "requestBody": RAW_BODY}),
            Route("POST", f"{base}/upload", None, "Same as PUT …/files/upload", data_plane=True, status=201,
                  tags=tags, extra_doc={"parameters": PATH_QUERY, "requestBody": RAW_BODY}),
        ]
    return routes


def backup_and_mod_routes() -> list[Route]:
    base = "/api/game/servers/<int:server_id>"
    return [
        Route("GET", f"{base}/backups", files.list_backups, "List backups (agent status and body kept)",
              tags=("backups",)),
        Route("POST", f"{base}/backups", files.create_backup, "Create a backup", body=files.CreateBackup,
              status=201, tags=("backups",)),
        Route("POST", f"{base}/backups/restore", files.restore_backup,
              "Start restoring backup `id`; answers 202 at once — poll the restore status or the server state",
              status=202, tags=("backups",), extra_doc={"parameters": [
                  {"name": "id", "in": "query", "required": True, "schema": {"type": "string"}}]}),
        Route("GET", f"{base}/backups/restore", files.restore_status,
              "Backup/restore operations in progress (from the gateway's normalized state)", tags=("backups",)),
        Route("DELETE", f"{base}/backups/<backup_id>", files.delete_backup, "Delete a backup", tags=("backups",)),
        Route("GET", f"{base}/backups/<backup_id>/download", None, "Download a backup archive, streamed",
              data_plane=True, tags=("backups",)),
        Route("GET", f"{base}/mods", files.list_mods, "List mods", tags=("mods",)),
        Route("POST", f"{base}/mods", files.install_mod, "Install a mod", body=files.InstallMod, status=201,
              tags=("mods",)),
        Route("DELETE", f"{base}/mods/<mod_id>", files.remove_mod, "Remove a mod", tags=("mods",)),
        Route("POST", f"{base}/mods/<mod_id>/enable", files.enable_mod, "Enable a mod", tags=("mods",)),
        Route("POST", f"{base}/mods/<mod_id>/disable", files.disable_mod, "Disable a mod", tags=("mods",)),
    ]


def background_services(services: Services) -> list[Callable[..., Any]]:
    """Every background service of this process but the cluster membership: `async def run(*,
    task_status)` callables, each started in the lifespan nursery of run_gateway (so each has an owner
    and stops with the app). The membership (ClusterService.run) outlives them, in run_gateway."""
    once = services.cluster.leader_only if services.cluster is not None else _here
    return [services.sessions.run, services.events.run, services.provisioner.run, services.poller.run,
            services.ide.proxy.run,
            # Once across the fleet: on PostgreSQL only the fleet leader runs these (control/cluster.py).
            *([once(services.edge_outbox.run)] if services.edge_outbox is not None else []),
            once(billing.BillingScheduler(services.billing, services.mailer, services.settings.billing_interval,
                                          services.running).run),
            once(jobs.lease_reaper(services)), jobs.updates.restart_service(services),
            once(auth.rate_limit_pruner(services)),
            services.ide_activity.run,
            services.environments.run]


def _here(service: Callable[..., Any]) -> Callable[..., Any]:
    """One process (SQLite): once-per-fleet work simply runs here."""
    return service


FILES_PREFIX = rf"^/api/(?:game/)?servers/(?P<id>{ID_DIGITS})/files/"


def data_plane_router(services: Services, control: list[Route]) -> Callable[[Request], Any]:
    """The routes gateway/ serves natively, with the rules they need handed in, and the control routes
    marked hot (served on the front server without Quart: control/api.py front_view)."""
    streams = FileStreams(services.upstream, files.stream_authorizer(services), services.metrics)
    ide = services.ide.proxy
    hot = [DataRoute(frozenset({route.method}), route_pattern(route), front_view(route, services), route.path)
           for route in control if route.hot]
    routes = [*hot,
        DataRoute(frozenset({"GET"}), re.compile(FILES_PREFIX + "download$"), streams.download, "files.download"),
        DataRoute(frozenset({"PUT", "POST"}), re.compile(FILES_PREFIX + "upload$"), streams.upload, "files.upload"),
        DataRoute(frozenset({"PATCH"}), re.compile(FILES_PREFIX + r"uploads/(?P<upload>[A-Za-z0-9_-]{1,128})$"),
                  streams.upload_chunk, "files.upload_chunk"),
        DataRoute(frozenset({"GET"}),
                  re.compile(rf"^/api/game/servers/(?P<id>{ID_DIGITS})/backups/(?P<backup>[A-Za-z0-9_.-]{{1,128}})/download$"),
                  streams.backup_download, "backups.download"),
        DataRoute(frozenset({"GET"}), re.compile(rf"^/api/servers/(?P<id>{ID_DIGITS})/console$"),
                  services.consoles.handle,
                  "console", websocket=True),
        DataRoute(IDE_METHODS, IDE_PATH, ide.handle_path, "ide.path"),
        DataRoute(frozenset({"POST"}), re.compile(rf"^/api/v1/jobs/(?P<job_id>{ID_DIGITS})/artifacts$"),
                  jobs.artifacts.artifact_upload_handler(services), "jobs.artifact_upload"),
    ]
    return path_router(routes, host_route=ide.host_route)


def build_provider(settings: Settings, store: Store) -> Provider:
    if settings.provider == "local":
        return LocalProvider(settings.data_dir, agent_args=settings.local_agent_args,
                             stop_agents_on_exit=settings.local_stop_agents_on_exit,
                             ide_command=settings.local_ide_command,
                             recorded=partial(store.read, store_instances.provider_refs, LocalProvider.name))
    if settings.provider == "proxmox":
        # Imported here: proxmoxer and requests (~8 MB) load only when this provider is configured.
        from .providers.proxmox import ProxmoxProvider

        return ProxmoxProvider(settings, store)
    raise ValueError(f"unknown provider {settings.provider!r}")


def create_app(services: Services, routes: list[Route]) -> QuartTrio:
    app = QuartTrio("zlh")
    # Streaming never passes through Quart (see gateway/server.py): control bodies are small JSON.
    app.config["MAX_CONTENT_LENGTH"] = 1024 * 1024
    app.config["BODY_TIMEOUT"] = 30
    app.config["RESPONSE_TIMEOUT"] = 60
    app.config["PROVIDE_AUTOMATIC_OPTIONS"] = False
    app.json.sort_keys = False  # type: ignore[attr-defined]
    install_url_converters(app)
    for route in routes:
        if route.data_plane:
            continue
        app.add_url_rule(route.path, route.endpoint, make_view(route, services), methods=[route.method],
                         strict_slashes=False)
    install_error_handlers(app)
    return app


def hypercorn_config(settings: Settings) -> HypercornConfig:
    """The front server's configuration from hypercorn.toml, checked (control/config.py): a missing
    named file, a TLS key or a key the front server does not honour stops the start."""
    config = HypercornConfig.from_mapping(settings.server_options())
    config.accesslog = None
    return config


async def _drain_on_shutdown(shutdown: trio.Event, membership: cluster.ClusterService) -> None:
    """Drain (SIGTERM, `zlh-gateway drain`): while open streams finish, hand the slots over at once."""
    await shutdown.wait()
    await membership.drain()


def open_store(settings: Settings) -> Store:
    db = connect_database(settings.database_url, max_connections=settings.db_threads + 4)
    return Store(db, threads=settings.db_threads)


async def prepare_storage(settings: Settings, store: Store) -> None:
    """Migrate and load the configured plans: what `make run` and tests do before serving. The plans
    are seeded under the migrations' lock (replicas may start at the same instant)."""
    await trio.to_thread.run_sync(partial(migrate, store.db, partial(users.ensure_plans, settings.plans)))


async def run_gateway(settings: Settings, shutdown: trio.Event | None = None, *,
                      task_status: trio.TaskStatus[list[str]] = trio.TASK_STATUS_IGNORED) -> None:
    """Serve until `shutdown` is set (then drain) or until cancelled (then stop at once).
    The nurseries here own every background service of this process."""
    shutdown = trio.Event() if shutdown is None else shutdown
    config = hypercorn_config(settings)  # a configuration error stops the start before anything runs
    store = open_store(settings)
    services: Services | None = None
    try:
        await prepare_storage(settings, store)
        metrics = Metrics(version=ops.VERSION)
        services = Services(
            settings=settings,
            store=store,
            tokens=TokenService(settings.jwt_secret, settings.jwt_issuer),
            metrics=metrics,
            mailer=Mailer(settings.data_dir / "outbox"),
            sessions=Sessions(store, horizon=max(settings.access_token_ttl, settings.ide_session_ttl,
                                                 settings.console_token_ttl) + 60,
                              resync_interval=settings.session_resync_interval),
        )
        services.agents = AgentClient(SmallCallPool(connect_timeout=settings.agent_timeout),
                                      timeout=settings.agent_timeout)
        services.edge, services.edge_outbox = edge_publisher(settings, store)
        if cluster.cluster_enabled(settings, store):
            services.cluster = cluster.ClusterService(settings, store)
        services.takeover = cluster.operation_takeover(settings, services.cluster)
        services.provisioner = Provisioner(store, build_provider(settings, store), services.edge, services.agents,
                                           services.takeover, ready_timeout=settings.ready_timeout)
        services.upstream = UpstreamPool()
        services.consoles = ConsoleRelay(console.console_authorizer(services), console.console_still_allowed(services),
                                         metrics, clock=lambda: utcnow().replace(tzinfo=UTC).timestamp(),
                                         limits=settings.console_limits)
        services.poller = Poller(store, services.agents, metrics, interval=settings.poll_interval)
        if services.cluster is not None:
            services.cluster.attach(services.poller)
        services.events = cluster.FleetEvents(store, settings.replica_id, listen=services.cluster is not None)
        services.ide_activity = dev.IdeActivityRecorder(store, interval=settings.ide_activity_interval,
                                                        replica=settings.replica_id)
        services.ide = dev.HostedIde(services)
        cluster.wire_session_events(services.events, services.sessions, services.consoles, services.ide)
        services.environments = environments.EnvironmentService(services)
        ops.watch_live_state(services)
        services.billing = billing.Billing.from_settings(settings, store, services.extra)
        services.extra["suspend_servers"] = cluster.fleet_suspender(services.events, servers.server_suspender(services))
        routes = control_routes()
        services.extra["openapi"] = openapi_document(routes, "ZLH gateway", "0.1.0")
        app = create_app(services, routes)
        logged_app = AccessLog(app, services)
        wrapped = wrap_app(logged_app, config.wsgi_max_body_size, "asgi")  # type: ignore[arg-type]  # an ASGI app
        async with trio.open_nursery() as membership:
            if services.cluster is not None:
                await membership.start(services.cluster.run)  # a share of the fleet before anything runs
            async with trio.open_nursery() as nursery:
                lifespan = Lifespan(wrapped, config, {})
                await nursery.start(lifespan.handle_lifespan)
                await lifespan.wait_for_startup()
                for service in background_services(services):
                    await nursery.start(service)
                # The demo is a check-then-create: with several replicas only the fleet leader (known
                # since the first heartbeat above) makes it, so replicas started together make one.
                if settings.demo_servers and (services.cluster is None or services.cluster.is_leader()):
                    await ensure_demo(services)
                if services.cluster is not None:
                    nursery.start_soon(_drain_on_shutdown, shutdown, services.cluster)
                front = FrontServer(data_plane_router(services, routes), asgi_handler(logged_app), config, metrics,
                                    trusted_proxies=trusted_networks(tuple(settings.trusted_proxies)))
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
            # Resign only now: no operation this replica drives is still running (control/cluster.py).
            membership.cancel_scope.cancel()
    finally:
        if services is not None:
            with trio.CancelScope(shield=True):
                await services.agents.aclose()
                await services.upstream.aclose()
        store.close()
