"""The job lifecycle: every state a job can be in and every legal move between them, in one table.

Theory of operation. A job is born `queued`. A runner's lease moves it to `leased`; the runner's first
status report moves it to `running`; its final report ends it `done` or `failed`. An operator's cancel
ends any live job `failed` with error "cancelled by user" (the seed's exact terminal mutation; the
same happens when the runner holding it is deactivated). Clearing the queue ends waiting jobs
`cancelled`: they never ran. A lease that lapses without heartbeats (`expire`) puts the job back in
the queue while attempts remain (`requeue`) and otherwise fails it (`expire_final`); the rule is
applied set-wise by storage.jobs.expire_leases with the states named here. A queued job whose upstream
job in a chain ended without success fails (`upstream_failed`). Terminal states have no way out: a
rerun is a new job.

This module is pure: no I/O, no storage. Callers ask it what a move leads to, or from which states an
event is legal, and hand those states to the compare-and-set in storage.jobs.
"""

from __future__ import annotations

QUEUED = "queued"
LEASED = "leased"
RUNNING = "running"
DONE = "done"
FAILED = "failed"
CANCELLED = "cancelled"

STATES = (QUEUED, LEASED, RUNNING, DONE, FAILED, CANCELLED)
LIVE = (LEASED, RUNNING)  # held by a runner, under a lease
TERMINAL = (DONE, FAILED, CANCELLED)

TRANSITIONS: dict[tuple[str, str], str] = {
    (QUEUED, "lease"): LEASED,
    (QUEUED, "cancel"): FAILED,
    (QUEUED, "clear"): CANCELLED,
    (QUEUED, "upstream_failed"): FAILED,
    (LEASED, "start"): RUNNING,
    (LEASED, "succeed"): DONE,
    (LEASED, "fail"): FAILED,
    (LEASED, "cancel"): FAILED,
    (LEASED, "requeue"): QUEUED,
    (LEASED, "expire_final"): FAILED,
    (RUNNING, "succeed"): DONE,
    (RUNNING, "fail"): FAILED,
    (RUNNING, "cancel"): FAILED,
    (RUNNING, "requeue"): QUEUED,
    (RUNNING, "expire_final"): FAILED,
}

CANCEL_ERROR = "cancelled by user"
CANCEL_NOTE = "[control] job cancelled by user"

# What a runner's status report means, as an event of the table above.
REPORTED_EVENTS = {RUNNING: "start", DONE: "succeed", FAILED: "fail"}


class IllegalTransition(Exception):
    """A move the table does not allow (for example cancelling a finished job)."""

    def __init__(self, state: str, event: str) -> None:
        self.state = state
        self.event = event
        super().__init__(f"cannot {event} a job that is {state}")


def advance(state: str, event: str) -> str:
    """The state `event` leads to from `state`; raises IllegalTransition when the table has no such move."""
    try:
        return TRANSITIONS[(state, event)]
    except KeyError:
        raise IllegalTransition(state, event) from None


def sources(event: str) -> tuple[str, ...]:
    """Every state from which `event` is legal."""
    return tuple(state for (state, name) in TRANSITIONS if name == event)


def target(event: str) -> str:
    """The one state `event` leads to (every event here has exactly one target)."""
    targets = {to for (_, name), to in TRANSITIONS.items() if name == event}
    assert len(targets) == 1, event
    return targets.pop()
