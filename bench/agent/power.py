"""The game control routes: `POST /start`, `/stop`, `/restart`.

Each answers at once with the state it moved to (`starting`, `stopping`); the gateway follows the
rest through `/status`. A request the lifecycle table forbids (start while running, stop while
stopped, anything while installing) is 409 `CONFLICT` with the current state.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable

from bench.agent.game import GameServer
from bench.agent.http import ApiError, Request, Response, json_response
from bench.agent.lifecycle import GameState, IllegalTransition


class PowerRoutes:
    def __init__(self, game: GameServer) -> None:
        self.game = game

    async def start(self, request: Request) -> Response:
        return await self.act(self.game.start)

    async def stop(self, request: Request) -> Response:
        return await self.act(self.game.stop)

    async def restart(self, request: Request) -> Response:
        return await self.act(self.game.restart)

    async def act(self, action: Callable[[], Awaitable[GameState]]) -> Response:
        try:
            state = await action()
        except IllegalTransition as exc:
            raise ApiError(409, "CONFLICT", {"reason": str(exc), "state": exc.state.value}) from exc
        return json_response({"state": state.value})
