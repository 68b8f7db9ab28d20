"""Lifecycles as explicit transition tables, one per kind of thing, and one error for an illegal move.

Instance (a container with its agent):

    reserved ──create──▶ creating ──created──▶ configuring ──configured──▶ awaiting_ready
        awaiting_ready ──ready──▶ publishing ──published──▶ ready
        any provisioning state ──fail──▶ failed          (what was created is cleaned up first)
        ready | failed | any provisioning state ──delete──▶ deleting ──deleted──▶ (archived; row gone)

Only `ready` is success: it is reached after the agent is *semantically* ready and the edge routes
are published. A gateway restart finds instances in provisioning states and resumes them from the
step they were in (every step is idempotent)."""

from __future__ import annotations

from enum import Enum


class IllegalTransition(Exception):
    def __init__(self, kind: str, state: str, event: str) -> None:
        super().__init__(f"{kind}: no transition from {state!r} on {event!r}")
        self.state, self.event = state, event


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


def next_instance_state(state: str, event: str) -> InstanceState:
    try:
        return INSTANCE_TRANSITIONS[(InstanceState(state), event)]
    except (KeyError, ValueError):
        raise IllegalTransition("instance", state, event) from None


def is_provisioning(state: str) -> bool:
    return state in {s.value for s in PROVISIONING}
