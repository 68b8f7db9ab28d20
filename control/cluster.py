"""The replica service: what makes several gateway processes on one PostgreSQL behave as one fleet.

- It registers this replica and heartbeats (storage/cluster.py holds the rules): the poller polls only
  the agents of the slots this replica holds (`poll_targets`, checked again per poll by `owns`); slots
  it gains (a dead replica's, or a fresh fleet's) are polled at once through `Poller.targets_grew`.
- `leader_only(service)` runs a once-per-fleet service (billing scheduler, publishing outbox, job lease
  reaper) only while this replica holds the fleet-leader lease, and cancels it when the lease is lost.
- Operations in progress (provisionings; environments' create, start, stop, delete) are driven by one
  replica each, the one that started them (storage/operations.py holds the rule). `OperationTakeover`
  claims, every heartbeat, those whose driver is no longer live and hands them to their service, so a
  killed replica's operations are finished elsewhere within the lease TTL plus one heartbeat (inside
  the takeover bound).
- Cross-replica events travel by PostgreSQL NOTIFY on one channel, received on a dedicated LISTEN
  connection that Trio waits on itself (`wait_readable` on its socket; no thread parked in `select()`,
  which fails on descriptors above 1,024), and are applied to this replica's session registry and
  connections (ended logins and accounts, consoles, IDE websockets). An event is also applied locally
  at once, so the origin never waits for the round trip.
- Takeover time: a killed replica's leases lapse one lease TTL after its last renewal; each heartbeat
  reports when the next foreign lease lapses and the replica beats again right then, so its share
  is claimed at the lapse, not up to a heartbeat later, and the poller polls the gained agents within
  its catch-up spread.

Ownership is judged on this replica's own clock against the renewal it last *started*, so it always
ends before the lease the database holds lapses: a replica cut off from the database stops polling
and leading before anyone else may start. Never poll or lead on a lease whose renewal failed. An
operation has no such local lapse: a replica cut off from the database fails at its next write, but a
provider call already under way may still finish after another replica took the operation over (the
steps are idempotent; this overlap is the one case where two replicas touch one operation).

Membership outlives the services that depend on it (run_gateway stops them first), so a replica that
exits gracefully resigns only once none of its operations is still running.

On SQLite (one process) there is no ClusterService: the poller polls every agent and every service
runs here, as before; operations interrupted by a restart resume at start-up. Events still reach
this process's own connections (`FleetEvents` local delivery)."""

from __future__ import annotations

import json
import logging
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any, TypeVar

import trio

from gateway.ide_proxy import IdeRevocation
from gateway.poller import Poller
from storage import cluster as store_cluster
from storage.db import Store, is_postgres
from storage.instances import PollTarget

from .config import Settings
from .sessions import SESSION_END, Sessions

log = logging.getLogger("zlh.cluster")

Service = Callable[..., Awaitable[None]]
EventHandler = Callable[[dict[str, Any]], None]
T = TypeVar("T")

LISTEN_RETRY = 0.5  # seconds before the first attempt to re-open a lost LISTEN connection
LISTEN_RETRY_MAX = 15.0  # the backoff between attempts doubles up to this
LAPSE_SLACK = 0.05  # seconds after a foreign lease's lapse to beat (the database's now must be past it)
MIN_BEAT_GAP = 0.05  # seconds; never beat more often than this


def cluster_enabled(settings: Settings, store: Store) -> bool:
    return settings.cluster == "on" or (settings.cluster == "auto" and is_postgres(store.db))


class ClusterService:
    """This replica's membership: slot ownership for the poller and the fleet-leader lease."""

    def __init__(self, settings: Settings, store: Store, *, address: str | None = None) -> None:
        self.store = store
        self.replica_id = settings.replica_id
        self.address = address
        self.heartbeat_interval = settings.cluster_heartbeat
        self.ttl = settings.cluster_lease_ttl
        self.slot_count = settings.cluster_slots
        self.poller: Poller | None = None
        self.slots: frozenset[int] = frozenset()
        self.live: list[str] = []
        self._slots_until = 0.0  # trio time; ownership lapses here without a renewal
        self._leader_until = 0.0
        self._changed = trio.Event()
        self._next_beat = 0.0  # trio time of the next heartbeat
        self.beats = 0
        self.draining = False

    # --- what the rest of the process asks ----------------------------------------------------------

    def owns(self, instance_id: int) -> bool:
        return trio.current_time() < self._slots_until and instance_id % self.slot_count in self.slots

    async def poll_targets(self) -> list[PollTarget]:
        if trio.current_time() >= self._slots_until:
            return []
        return await self.store.run(store_cluster.poll_targets_in_slots, self.slots, self.slot_count)

    async def drain(self) -> None:
        """Stop taking slots and the fleet lead now (the others take this replica's agents within a
        heartbeat); keep heartbeating so the operations this replica drives are not taken over."""
        self.draining = True
        await self._beat()

    def slots_held(self) -> int:
        """How many slot leases this replica holds now (/metrics)."""
        return len(self.slots) if trio.current_time() < self._slots_until else 0

    def is_leader(self) -> bool:
        return trio.current_time() < self._leader_until

    def attach(self, poller: Poller) -> None:
        """Partition `poller`: it polls only this replica's agents from now on."""
        poller.list_targets = self.poll_targets
        poller.owns = self.owns
        self.poller = poller

    # --- the heartbeat ------------------------------------------------------------------------------

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        try:
            await self._beat()  # hold a share before the poller's first round
            task_status.started()
            while True:
                await trio.sleep_until(self._next_beat)
                await self._beat()
        finally:
            self._slots_until = self._leader_until = 0.0
            self._signal()
            with trio.CancelScope(shield=True), trio.move_on_after(5):
                try:
                    await self.store.run(store_cluster.resign, self.replica_id)
                except Exception:
                    log.exception("could not resign from the cluster (leases lapse on their own)")

    async def _beat(self) -> None:
        started = trio.current_time()
        self._next_beat = started + self.heartbeat_interval
        try:
            view = await self.store.run(store_cluster.heartbeat, self.replica_id, self.address,
                                        ttl=self.ttl, slot_count=self.slot_count, draining=self.draining)
        except Exception:
            log.exception("cluster heartbeat failed; ownership lapses unless the next one succeeds")
            return
        if view.next_lapse is not None:  # a lease of a dead or departed replica becomes claimable
            lapse_at = started + (view.next_lapse - view.now).total_seconds() + LAPSE_SLACK
            self._next_beat = max(started + MIN_BEAT_GAP, min(self._next_beat, lapse_at))
        self.beats += 1
        gained = view.slots - self.slots if trio.current_time() < self._slots_until else view.slots
        if view.slots != self.slots or view.live != self.live:
            log.info("cluster membership", extra={"fields": {
                "replica": self.replica_id, "live": view.live, "slots": len(view.slots),
                "leader": view.leader}})
        self.slots, self.live = view.slots, view.live
        self._slots_until = started + self.ttl
        was_leader = self.is_leader()
        self._leader_until = started + self.ttl if view.leader else 0.0
        if view.leader != was_leader:
            log.info("fleet leadership %s", "taken" if view.leader else "lost",
                     extra={"fields": {"replica": self.replica_id}})
        if gained and self.poller is not None:
            self.poller.targets_grew()
        self._signal()

    def _signal(self) -> None:
        self._changed.set()
        self._changed = trio.Event()

    async def _until_changed(self, deadline: float) -> None:
        with trio.move_on_at(deadline):
            await self._changed.wait()

    # --- once-per-fleet work ------------------------------------------------------------------------

    def leader_only(self, service: Service) -> Service:
        """`service` (an `async def run(*, task_status)`) running only while this replica leads."""

        async def run(*, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
            task_status.started()
            while True:
                while not self.is_leader():
                    await self._until_changed(trio.current_time() + self.heartbeat_interval)
                async with trio.open_nursery() as nursery:
                    await nursery.start(service)
                    while self.is_leader():
                        await self._until_changed(self._leader_until)
                    nursery.cancel_scope.cancel()

        run.__qualname__ = f"leader_only({getattr(service, '__qualname__', service)!s})"
        return run


@dataclass(frozen=True)
class OperationTakeover:
    """How a service (the Provisioner, the EnvironmentService) finds the operations it should drive.
    `run(store, claim, launch)`: at start-up `claim` the operations this process may drive (every one
    in progress on one process; with several replicas the orphaned ones, this replica id's own and
    the undriven) and `launch` each; then, with several replicas, claim the orphaned ones every
    `interval` seconds. `claim(replica_id, ttl, *, own_and_undriven)` is a function of
    storage/operations.py; nothing here decides who may drive what."""

    replica_id: str
    ttl: float | None = None  # None: one process, every operation in progress is this one's
    interval: float | None = None  # None: nothing to take over after start-up

    async def run(self, store: Store, claim: Callable[..., list[T]], launch: Callable[[T], None], *,
                  task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        for item in await store.run(claim, self.replica_id, self.ttl, own_and_undriven=True):
            launch(item)
        task_status.started()
        if self.interval is None:
            await trio.sleep_forever()
        while True:
            await trio.sleep(self.interval)
            try:
                orphaned = await store.run(claim, self.replica_id, self.ttl, own_and_undriven=False)
            except Exception:
                log.exception("could not look for orphaned operations; trying again")
                continue
            for item in orphaned:
                log.info("taking over an orphaned operation", extra={"fields": {
                    "replica": self.replica_id, "operation": str(item)}})
                launch(item)


def operation_takeover(settings: Settings, cluster: ClusterService | None) -> OperationTakeover:
    if cluster is None:
        return OperationTakeover(settings.replica_id)
    return OperationTakeover(settings.replica_id, cluster.ttl, cluster.heartbeat_interval)


class FleetEvents:
    """Cross-replica events: `publish` applies an event here at once and NOTIFYs the other replicas,
    whose `run` applies it to their own connections. Delivery is prompt (one NOTIFY round trip) but
    best effort: an event sent while a replica's LISTEN connection is down is missed, which is why the
    console also re-checks access on its own (ConsoleLimits.access_check_interval)."""

    def __init__(self, store: Store, replica_id: str, *, listen: bool) -> None:
        self.store = store
        self.replica_id = replica_id
        self.listen = listen
        self.handlers: dict[str, EventHandler] = {}
        self.received = 0
        self.listening = False  # whether the LISTEN connection is open now

    def on(self, kind: str, handler: EventHandler) -> None:
        self.handlers[kind] = handler

    async def publish(self, kind: str, **fields: Any) -> None:
        event = {"kind": kind, "origin": self.replica_id, **fields}
        self._apply(event)
        if self.listen:
            await self.store.run(store_cluster.notify, json.dumps(event, separators=(",", ":")))

    def _apply(self, event: dict[str, Any]) -> None:
        handler = self.handlers.get(str(event.get("kind")))
        if handler is None:
            return
        try:
            handler(event)
        except Exception:
            log.exception("cluster event handler failed", extra={"fields": {"kind": event.get("kind")}})

    def _receive(self, payload: str) -> None:
        try:
            event = json.loads(payload)
        except ValueError:
            return
        if not isinstance(event, dict) or event.get("origin") == self.replica_id:
            return
        self.received += 1
        self._apply(event)

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        task_status.started()
        if not self.listen:
            await trio.sleep_forever()
        retry = LISTEN_RETRY
        while True:
            listener = store_cluster.NotificationListener(self.store.db)
            try:
                await trio.to_thread.run_sync(listener.open)  # bounded by the connect timeout
                retry = LISTEN_RETRY
                self.listening = True
                while True:
                    for payload in listener.drain():
                        self._receive(payload)
                    await trio.lowlevel.wait_readable(listener.fileno())
            except (store_cluster.ListenerLost, OSError) as exc:
                log.warning("cluster LISTEN connection lost (%s); re-opening in %.1fs", exc, retry)
            finally:
                self.listening = False
                listener.close()
            await trio.sleep(retry)
            retry = min(retry * 2, LISTEN_RETRY_MAX)


SERVER_SUSPENDED = "server.suspended"
MAX_EVENT_FAMILIES = 100  # ~30 bytes each, well inside one NOTIFY payload


def wire_session_events(events: FleetEvents, sessions: Sessions, consoles: Any, ide: Any) -> None:
    """Ended sessions and suspensions reach this replica's rule and connections: `session.end` is
    applied to the session registry (control/sessions.py), then the consoles (gateway.console.ConsoleRelay)
    and IDE websockets (control.dev.HostedIde) it ends are closed; a suspended server loses both."""

    def session_end(event: dict[str, Any]) -> None:
        sessions.apply(event)
        user = event.get("user")
        if user is not None and (event.get("allLogins") or event.get("account") in ("disabled", "deleted")):
            consoles.disconnect_user(int(user))
            ide.revoke(IdeRevocation(user_id=int(user)))
            return
        for family in event.get("families") or ():
            ide.revoke(IdeRevocation(family=str(family)))

    def server_suspended(event: dict[str, Any]) -> None:
        consoles.disconnect_instance(int(event["instance"]))
        ide.revoke(IdeRevocation(instance_id=int(event["instance"])))

    events.on(SESSION_END, session_end)
    events.on(SERVER_SUSPENDED, server_suspended)


async def end_sessions(events: FleetEvents, *, user: int, families: list[str] | tuple[str, ...] = (),
                       all_logins: bool = False, account: str | None = None) -> None:
    """End, on every replica, the logins `families` of `user` (or all of them) and, with `account`
    (active | disabled | deleted), record its new state. Call it after the change is stored: a replica
    that missed the event finds it in the database at its next resync."""
    names = list(families)
    # A NOTIFY payload holds at most 8000 bytes: many ended logins go in several events.
    for start in range(0, max(len(names), 1), MAX_EVENT_FAMILIES):
        await events.publish(SESSION_END, user=user, families=names[start:start + MAX_EVENT_FAMILIES],
                             allLogins=all_logins, account=account)


SuspendServers = Callable[[int, list[int], str], Awaitable[None]]


def fleet_suspender(events: FleetEvents, suspend: SuspendServers) -> SuspendServers:
    """The billing scheduler's suspension hook, fleet-wide: the consoles and IDE sessions of the
    suspended servers are closed on every replica (whichever one holds them), then this replica stops the servers."""

    async def suspend_servers(user_id: int, instance_ids: list[int], reason: str) -> None:
        for instance_id in instance_ids:
            await events.publish(SERVER_SUSPENDED, instance=instance_id, reason=reason)
        await suspend(user_id, instance_ids, reason)

    return suspend_servers
