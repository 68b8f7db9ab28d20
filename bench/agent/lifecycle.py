"""The game server's lifecycle as one transition table, in the style of h11's state machine.

States are what `/status` reports; events are what the agent observed or was asked to do. Every
change of state goes through `next_state`; a pair missing from the table raises `IllegalTransition`,
which the routes answer with 409 `CONFLICT`. It must never do I/O.

    installing --installed--> stopped --start--> starting --ready line--> running
    starting|running --stop--> stopping --exit (any code)--> stopped
    starting|running --exit 0 (not asked)--> stopped
    starting|running --exit != 0 (not asked)--> crashed --start--> starting
"""

from __future__ import annotations

from enum import Enum


class GameState(str, Enum):
    INSTALLING = "installing"
    STOPPED = "stopped"
    STARTING = "starting"
    RUNNING = "running"
    STOPPING = "stopping"
    CRASHED = "crashed"


class GameEvent(Enum):
    INSTALLED = "installed"
    START = "start"
    READY = "ready"
    STOP = "stop"
    EXITED_CLEAN = "exited-clean"
    EXITED_FAILED = "exited-failed"


S, E = GameState, GameEvent

TRANSITIONS: dict[tuple[GameState, GameEvent], GameState] = {
    (S.INSTALLING, E.INSTALLED): S.STOPPED,
    (S.STOPPED, E.START): S.STARTING,
    (S.CRASHED, E.START): S.STARTING,
    (S.STARTING, E.READY): S.RUNNING,
    (S.STARTING, E.STOP): S.STOPPING,
    (S.RUNNING, E.STOP): S.STOPPING,
    (S.STOPPING, E.EXITED_CLEAN): S.STOPPED,
    # Killed after being asked to stop is still a requested stop, not a crash.
    (S.STOPPING, E.EXITED_FAILED): S.STOPPED,
    (S.STARTING, E.EXITED_CLEAN): S.STOPPED,
    (S.STARTING, E.EXITED_FAILED): S.CRASHED,
    (S.RUNNING, E.EXITED_CLEAN): S.STOPPED,
    (S.RUNNING, E.EXITED_FAILED): S.CRASHED,
}

class IllegalTransition(Exception):
    def __init__(self, state: GameState, event: GameEvent) -> None:
        super().__init__(f"cannot {event.value} while {state.value}")
        self.state = state
        self.event = event


def next_state(state: GameState, event: GameEvent) -> GameState:
    try:
        return TRANSITIONS[(state, event)]
    except KeyError:
        raise IllegalTransition(state, event) from None
