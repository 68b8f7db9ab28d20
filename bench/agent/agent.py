"""Assembling one reference agent and serving it: `serve_agent(config, task_status=...)`.

It lays out the data directory (`files/`, `backups/`, `.uploads/`), builds the parts, puts the
bearer-secret check in front of every route, opens the main port (and reserves the IDE port), runs
the simulated install and reports the bound ports through `task_status`. Everything it starts lives
in its one nursery, so cancelling the caller's scope stops the agent and its child processes.
"""

from __future__ import annotations

import hmac
from dataclasses import dataclass

import trio

from bench.agent.backups import BackupManager
from bench.agent.codeserver import CodeServer
from bench.agent.config import AgentConfig
from bench.agent.console import ConsoleRoutes
from bench.agent.consolelog import ConsoleLog
from bench.agent.files import FileManager
from bench.agent.game import GameServer, make_game_config
from bench.agent.http import (
    ApiError,
    Outcome,
    Request,
    bound_port,
    open_listeners,
    serve_listeners,
)
from bench.agent.lifecycle import GameEvent
from bench.agent.mods import ModRegistry
from bench.agent.power import PowerRoutes
from bench.agent.routes import AgentParts, agent_routes
from bench.agent.routing import Router
from bench.agent.status import ResourceSampler, StatusReporter, VersionStore
from bench.agent.uploads import UploadSessions


@dataclass(frozen=True)
class AgentPorts:
    port: int
    ide_port: int


def bearer_matches(authorization: str | None, secret: bytes) -> bool:
    """Constant-time check of `Authorization: Bearer <secret>`."""
    scheme, _, token = (authorization or "").partition(" ")
    return scheme.lower() == "bearer" and hmac.compare_digest(token.strip().encode(), secret)


async def finish_install(game: GameServer, seconds: float, autostart: bool) -> None:
    await trio.sleep(seconds)
    game.transition(GameEvent.INSTALLED)
    if autostart:
        await game.start()


async def serve_agent(
    config: AgentConfig, *, task_status: trio.TaskStatus[AgentPorts] = trio.TASK_STATUS_IGNORED
) -> None:
    """Run one agent until cancelled; `await nursery.start(serve_agent, config)` gives its ports."""
    data_dir = config.data_dir.resolve()
    files_dir = data_dir / "files"
    files_dir.mkdir(parents=True, exist_ok=True)
    secret = config.secret.encode()
    async with trio.open_nursery() as nursery:
        log = ConsoleLog(config.console_capacity)
        game = GameServer(make_game_config(
            game_command=config.game_command, data_dir=data_dir, files_dir=files_dir,
            log_interval=config.log_interval, ready_pattern=config.ready_pattern,
            stop_timeout=config.stop_timeout), log, nursery)
        files = FileManager(files_dir)
        backups = BackupManager(data_dir, nursery, config.restore_min_seconds)
        codeserver = CodeServer(config.host, config.ide_port, config.codeserver_command,
                                data_dir, nursery)
        nursery.start_soon(close_at_exit, codeserver)
        parts = AgentParts(
            status=StatusReporter(
                game, backups,
                VersionStore(data_dir / "agent.json", config.version, config.latest_version),
                ResourceSampler(files_dir)),
            power=PowerRoutes(game),
            console=ConsoleRoutes(game),
            files=files,
            uploads=UploadSessions(data_dir / ".uploads", files.files),
            mods=ModRegistry(data_dir / "mods.json"),
            backups=backups,
            codeserver=codeserver,
        )
        router = Router(agent_routes(parts))

        async def handle(request: Request) -> Outcome:
            if not bearer_matches(request.headers.get("authorization"), secret):
                raise ApiError(401, "UNAUTHORIZED", None, [("www-authenticate", "Bearer")])
            return await router.dispatch(request)

        listeners = await open_listeners(config.host, config.port)
        await nursery.start(serve_listeners, handle, listeners)
        if config.ide_autostart:
            await codeserver.start()
        nursery.start_soon(finish_install, game, config.install_seconds, config.autostart)
        task_status.started(AgentPorts(bound_port(listeners), codeserver.port))


async def close_at_exit(codeserver: CodeServer) -> None:
    """Hold the IDE port until the agent is cancelled, then stop the IDE and release the port."""
    try:
        await trio.sleep_forever()
    finally:
        with trio.CancelScope(shield=True):
            await codeserver.stop()
        codeserver.close()
