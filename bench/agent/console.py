"""The console routes: `POST /console/command` and the `WS /console` relay.

The websocket sends, in order: a `gap` frame if the client asked for lines the ring already dropped,
the retained lines it asked for (`?since=N`: those with seq > N; no `since`: all retained), the
current `state`, then every new line and state change as it happens. Client frames
`{"type":"command","command":...}` go to the game server's stdin. Each client reads the ring at its
own pace; the socket's send is the backpressure, and a client a whole ring behind is closed with
1008. It must never queue frames per client.
"""

from __future__ import annotations

import json
from typing import Any

import trio

from bench.agent.consolelog import ConsoleLog, FellBehind, state_frame
from bench.agent.fields import json_object, required
from bench.agent.game import ConsoleUnavailable, GameServer
from bench.agent.http import ApiError, Request, Response, WebsocketUpgrade, json_response
from bench.agent.websocket import POLICY_VIOLATION, WebSocket, WebSocketClosed


def checked_command(command: str) -> str:
    if not command.strip() or "\n" in command or "\r" in command:
        raise ApiError(400, "BAD_REQUEST", {"field": "command", "reason": "one non-empty line"})
    return command


def error_frame(code: str, details: Any) -> str:
    return json.dumps({"type": "error", "error": code, "details": details})


class ConsoleRoutes:
    def __init__(self, game: GameServer) -> None:
        self.game = game
        self.log: ConsoleLog = game.log

    async def command(self, request: Request) -> Response:
        payload = await json_object(request)
        command = checked_command(required(payload, "command", str))
        try:
            await self.game.send_command(command)
        except ConsoleUnavailable as exc:
            raise ApiError(409, "CONFLICT", {"reason": str(exc), "state": exc.state.value}) from exc
        return json_response({"accepted": True})

    async def connect(self, request: Request) -> WebsocketUpgrade:
        since_text = request.query.get("since")
        if since_text is not None and not since_text.isdigit():
            raise ApiError(400, "BAD_REQUEST", {"query": "since", "reason": "integer required"})
        since = int(since_text) if since_text is not None else None

        async def run(websocket: WebSocket) -> None:
            await self.relay(websocket, since)

        return WebsocketUpgrade(run)

    async def relay(self, websocket: WebSocket, since: int | None) -> None:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(self.receive_commands, websocket, nursery.cancel_scope)
            try:
                await self.send_output(websocket, since)
            except FellBehind:
                await websocket.close(POLICY_VIOLATION, "fell behind the console ring buffer")
            except (WebSocketClosed, trio.BrokenResourceError, trio.ClosedResourceError):
                pass
            nursery.cancel_scope.cancel()

    async def send_output(self, websocket: WebSocket, since: int | None) -> None:
        log = self.log
        if since is None:
            position = log.start
        else:
            if since > log.last_seq:
                since = 0  # the client counted lines of an earlier agent run
            first_kept = log.first_retained_seq()
            if since + 1 < first_kept:
                await websocket.send(json.dumps({"type": "gap", "from": since + 1,
                                                 "to": first_kept - 1}))
            position = log.position_after(since)
        live_from = log.end
        for replayed in range(position, live_from):
            entry = log.entry_at(replayed)
            if entry.is_line:
                await websocket.send(entry.frame)
        await websocket.send(state_frame(self.game.state.value))
        position = live_from
        while True:
            await log.wait_past(position)
            await websocket.send(log.entry_at(position).frame)
            position += 1

    async def receive_commands(self, websocket: WebSocket, done: trio.CancelScope) -> None:
        try:
            await self.obey_commands(websocket)
        except (WebSocketClosed, trio.BrokenResourceError, trio.ClosedResourceError):
            pass
        done.cancel()

    async def obey_commands(self, websocket: WebSocket) -> None:
        while (message := await websocket.receive()) is not None:
            try:
                frame = json.loads(message)
                if not isinstance(frame, dict) or frame.get("type") != "command":
                    raise ApiError(400, "BAD_REQUEST", {"reason": "expected a command frame"})
                await self.game.send_command(
                    checked_command(required(frame, "command", str)))
            except (ValueError, TypeError):
                await websocket.send(error_frame("BAD_REQUEST", {"reason": "invalid JSON"}))
            except ApiError as exc:
                await websocket.send(error_frame(exc.code, exc.details))
            except ConsoleUnavailable as exc:
                await websocket.send(error_frame("CONFLICT", {"reason": str(exc),
                                                              "state": exc.state.value}))
