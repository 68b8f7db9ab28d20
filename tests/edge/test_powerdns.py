"""DNS publishing against a real PowerDNS (started by these tests): records resolve with dig right
after publish and are gone after unpublish; an outage delays a record but never loses or duplicates it."""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator
from datetime import timedelta

import pytest
import trio

from control.edge import PublishedInstance
from control.edge.dns import PowerDns
from control.edge.names import NamingPolicy
from control.edge.outbox import DnsTarget, Outbox, OutboxPublisher
from storage import clock
from storage import edge as edge_store
from storage.db import Store, connect_database
from storage.migrations import migrate
from tests.edge.servers import PowerDnsServer, ensure_installed, free_port

ZONE = "games.test"
EDGE_IP = "203.0.113.7"


@pytest.fixture(scope="module")
def pdns() -> Iterator[PowerDnsServer]:
    ensure_installed()
    server = PowerDnsServer()
    server.start()
    try:
        server.create_zone(ZONE)
        yield server
    finally:
        server.stop()


@pytest.fixture
async def store(database_url: str) -> AsyncIterator[Store]:
    store = Store(connect_database(database_url), threads=4)
    await trio.to_thread.run_sync(migrate, store.db)
    yield store
    store.close()


POLICY = NamingPolicy(zone=ZONE, domain=ZONE, address=EDGE_IP, ide_domain=f"ide.{ZONE}", ttl=30)


def dns_outbox(store: Store, api_url: str, api_key: str, **options: float) -> Outbox:
    target = DnsTarget(PowerDns(api_url, api_key, ZONE, timeout=2), POLICY)
    return Outbox(store, [target], **{"call_timeout": 3, **options})


async def dig(server: PowerDnsServer, name: str, rtype: str = "A") -> list[str]:
    result = await trio.run_process(
        ["dig", "@127.0.0.1", "-p", str(server.dns_port), "+short", "+time=2", "+tries=1", name, rtype],
        capture_stdout=True, check=True)
    return result.stdout.decode().split("\n")[:-1]


def minecraft(instance_id: int, name: str = "Survival World") -> PublishedInstance:
    return PublishedInstance(instance_id=instance_id, vmid=100 + instance_id, kind="game", name=name,
                             engine_type="paper", agent_host="10.0.0.5", agent_port=18888,
                             allocated_ports=[25570])


async def test_game_server_resolves_right_after_publish_and_is_gone_after_unpublish(
        pdns: PowerDnsServer, store: Store) -> None:
    publisher = OutboxPublisher(store, dns_outbox(store, pdns.api_url, pdns.api_key))
    server = minecraft(1)
    await publisher.publish(server)
    assert await dig(pdns, f"survival-world-101.{ZONE}") == [EDGE_IP]
    assert await dig(pdns, f"_minecraft._tcp.survival-world-101.{ZONE}", "SRV") == [
        f"0 5 25570 survival-world-101.{ZONE}."]
    assert await store.run(edge_store.pending_changes) == []
    await publisher.unpublish(server)
    assert await dig(pdns, f"survival-world-101.{ZONE}") == []
    assert await dig(pdns, f"_minecraft._tcp.survival-world-101.{ZONE}", "SRV") == []


async def test_dev_container_gets_its_ide_host_name(pdns: PowerDnsServer, store: Store) -> None:
    publisher = OutboxPublisher(store, dns_outbox(store, pdns.api_url, pdns.api_key))
    dev = PublishedInstance(instance_id=2, vmid=102, kind="dev", name="workbench", engine_type="node",
                            agent_host="10.0.0.6", agent_port=18888)
    await publisher.publish(dev)
    assert await dig(pdns, f"dev-2.ide.{ZONE}") == [EDGE_IP]
    assert await dig(pdns, f"workbench-102.{ZONE}") == []  # dev containers get no game host
    await publisher.unpublish(dev)
    assert await dig(pdns, f"dev-2.ide.{ZONE}") == []


async def test_outage_delays_a_record_but_never_loses_or_duplicates_it(
        pdns: PowerDnsServer, store: Store, monkeypatch: pytest.MonkeyPatch) -> None:
    down = f"http://127.0.0.1:{free_port()}"  # nothing listens there: PowerDNS is "down"
    publisher = OutboxPublisher(store, dns_outbox(store, down, pdns.api_key))
    server = minecraft(3, "Outage")
    await publisher.publish(server)  # does not raise: the change waits in the outbox
    [pending] = await store.run(edge_store.pending_changes)
    assert pending["attempts"] == 1 and "unreachable" in pending["lastError"]
    assert await dig(pdns, f"outage-103.{ZONE}") == []

    # PowerDNS is back. Another replica's worker (same database) delivers once the retry is due.
    recovered = dns_outbox(store, pdns.api_url, pdns.api_key)
    assert await recovered.deliver() == 0  # not due yet: backoff
    monkeypatch.setattr(clock, "offset", clock.offset + timedelta(minutes=10))
    assert await recovered.deliver() == 1
    assert await recovered.deliver() == 0
    assert await dig(pdns, f"outage-103.{ZONE}") == [EDGE_IP]
    # Publishing the same instance again (a retried provisioning step) keeps exactly one record.
    await OutboxPublisher(store, recovered).publish(server)
    assert await dig(pdns, f"outage-103.{ZONE}") == [EDGE_IP]
    await OutboxPublisher(store, recovered).unpublish(server)


async def test_unpublish_queued_behind_a_failed_publish_wins(
        pdns: PowerDnsServer, store: Store, monkeypatch: pytest.MonkeyPatch) -> None:
    down = f"http://127.0.0.1:{free_port()}"
    publisher = OutboxPublisher(store, dns_outbox(store, down, pdns.api_key))
    server = minecraft(4, "Short Lived")
    await publisher.publish(server)
    await publisher.unpublish(server)
    [pending] = await store.run(edge_store.pending_changes)
    assert pending["action"] == "unpublish"
    monkeypatch.setattr(clock, "offset", clock.offset + timedelta(minutes=10))
    await dns_outbox(store, pdns.api_url, pdns.api_key).deliver()
    assert await dig(pdns, f"short-lived-104.{ZONE}") == []
    assert await store.run(edge_store.pending_changes) == []


async def test_background_worker_retries_until_dns_answers(pdns: PowerDnsServer, store: Store) -> None:
    outbox = dns_outbox(store, f"http://127.0.0.1:{free_port()}", pdns.api_key, retry_base=0.05,
                        poll_interval=0.05)
    [target] = outbox.targets.values()
    assert isinstance(target, DnsTarget)
    server = minecraft(5, "Eventually")
    async with trio.open_nursery() as nursery:
        await nursery.start(outbox.run)
        await OutboxPublisher(store, outbox).publish(server)
        await trio.sleep(0.3)
        failed = await store.run(edge_store.pending_changes)
        assert failed and failed[0]["attempts"] >= 2  # retried in the background, still failing
        target.dns.api_url = pdns.api_url  # the outage ends
        with trio.fail_after(10):
            while await dig(pdns, f"eventually-105.{ZONE}") != [EDGE_IP]:
                await trio.sleep(0.05)
        nursery.cancel_scope.cancel()
    assert await store.run(edge_store.pending_changes) == []
    await OutboxPublisher(store, outbox).unpublish(server)
