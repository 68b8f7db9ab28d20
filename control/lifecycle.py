"""Lifecycles as explicit transition tables, one per kind of thing, and one error for an illegal move.

Instance (a container with its agent):

    reserved ──create──▶ creating ──created──▶ configuring ──configured──▶ awaiting_ready
        awaiting_ready ──ready──▶ publishing ──published──▶ ready
        any provisioning state ──fail──▶ failed          (what was created is cleaned up first)
        ready | failed | any provisioning state ──delete──▶ deleting ──deleted──▶ (archived; row gone)

Only `ready` is success: it is reached after the agent is *semantically* ready and the edge routes
are published. A gateway restart finds instances in provisioning states and resumes them from the
step they were in (every step is idempotent).

Dev environment (the Dev8 API, seed 004), mapped onto its dev container's lifecycle:

    CREATING ──ready──▶ RUNNING ──stop──▶ STOPPING ──stopped──▶ STOPPED ──start──▶ STARTING ──started──▶ RUNNING
    CREATING | STARTING | STOPPING ──fail──▶ ERROR ──start|stop──▶ STARTING | STOPPING
    any ──delete──▶ DELETING

(The job lifecycle lives with the job backend, control/jobs/lifecycle.py.)"""

from __future__ import annotations

from enum import Enum
from typing import TypeVar


class IllegalTransition(Exception):
    def __init__(self, kind: str, state: str, event: str) -> None:
        super().__init__(f"{kind}: no transition from {state!r} on {event!r}")
        self.state, self.event = state, event


StateT = TypeVar("StateT", bound=Enum)


class InstanceState(str, Enum):
    RESERVED = "reserved"
    CREATING = "creating"
    CONFIGURING = "configuring"
    AWAITING_READY = "awaiting_ready"
    PUBLISHING = "publishing"
    READY = "ready"
    FAILED = "failed"
    DELETING = "deleting"
    DELETED = "deleted"


S = InstanceState
PROVISIONING = (S.RESERVED, S.CREATING, S.CONFIGURING, S.AWAITING_READY, S.PUBLISHING)

INSTANCE_TRANSITIONS: dict[tuple[InstanceState, str], InstanceState] = {
    (S.RESERVED, "create"): S.CREATING,
    (S.CREATING, "created"): S.CONFIGURING,
    (S.CONFIGURING, "configured"): S.AWAITING_READY,
    (S.AWAITING_READY, "ready"): S.PUBLISHING,
    (S.PUBLISHING, "published"): S.READY,
    **{(state, "fail"): S.FAILED for state in PROVISIONING},
    **{(state, "delete"): S.DELETING for state in (*PROVISIONING, S.READY, S.FAILED, S.DELETING)},
    (S.DELETING, "deleted"): S.DELETED,
}


def _transition(kind: str, table: dict[tuple[StateT, str], StateT], states: type[StateT], state: str,
                event: str) -> StateT:
    try:
        return table[(states(state), event)]
    except (KeyError, ValueError):
        raise IllegalTransition(kind, state, event) from None


def next_instance_state(state: str, event: str) -> InstanceState:
    return _transition("instance", INSTANCE_TRANSITIONS, InstanceState, state, event)


def is_provisioning(state: str) -> bool:
    return state in {s.value for s in PROVISIONING}


class EnvState(str, Enum):
    CREATING = "CREATING"
    STARTING = "STARTING"
    RUNNING = "RUNNING"
    STOPPING = "STOPPING"
    STOPPED = "STOPPED"
    ERROR = "ERROR"
    DELETING = "DELETING"


E = EnvState
ENV_IN_PROGRESS = (E.CREATING, E.STARTING, E.STOPPING)

ENVIRONMENT_TRANSITIONS: dict[tuple[EnvState, str], EnvState] = {
    (E.CREATING, "ready"): E.RUNNING,
    (E.STOPPED, "start"): E.STARTING,
    (E.ERROR, "start"): E.STARTING,
    (E.STARTING, "started"): E.RUNNING,
    (E.RUNNING, "stop"): E.STOPPING,
    (E.ERROR, "stop"): E.STOPPING,
    (E.STOPPING, "stopped"): E.STOPPED,
    **{(state, "fail"): E.ERROR for state in ENV_IN_PROGRESS},
    **{(state, "delete"): E.DELETING for state in EnvState},
}


def next_environment_state(state: str, event: str) -> EnvState:
    return _transition("environment", ENVIRONMENT_TRANSITIONS, EnvState, state, event)
