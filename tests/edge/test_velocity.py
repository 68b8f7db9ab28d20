"""Velocity publishing: the [servers] and [forced-hosts] tables rendered atomically from every published
Minecraft server, the operator's own entries kept, and a reload through a command or an HTTP hook."""

from __future__ import annotations

import tomllib
from collections.abc import AsyncIterator
from datetime import timedelta
from functools import partial
from pathlib import Path

import pytest
import trio

from control.edge import PublishedInstance
from control.edge.outbox import Outbox, OutboxPublisher, VelocityTarget
from control.edge.velocity import VelocityConfig, render_config
from storage import clock
from storage import edge as edge_store
from storage.db import Store, connect_database
from storage.migrations import migrate

OPERATOR_CONFIG = """\
config-version = "2.7"
bind = "0.0.0.0:25577"

[servers]
lobby = "127.0.0.1:30066"
zlh-999 = "10.9.9.9:25565"
try = ["lobby"]

[forced-hosts]
"lobby.example.com" = ["lobby"]
"stale.games.test" = ["zlh-999"]

[advanced]
compression-threshold = 256
"""


@pytest.fixture
async def store(database_url: str) -> AsyncIterator[Store]:
    store = Store(connect_database(database_url), threads=4)
    await trio.to_thread.run_sync(migrate, store.db)
    yield store
    store.close()


def game(instance_id: int, engine: str = "paper", name: str = "Skyblock") -> PublishedInstance:
    return PublishedInstance(instance_id=instance_id, vmid=200 + instance_id, kind="game", name=name,
                             engine_type=engine, agent_host=f"10.0.1.{instance_id}", agent_port=18888,
                             payload={"port": 25565})


def test_render_replaces_only_our_entries_and_keeps_the_rest() -> None:
    text = render_config(OPERATOR_CONFIG, [game(1), game(2, name="Creative"), game(3, engine="valheim")],
                         "games.test")
    parsed = tomllib.loads(text)
    assert parsed["servers"] == {"lobby": "127.0.0.1:30066", "zlh-201": "10.0.1.1:25565",
                                 "zlh-202": "10.0.1.2:25565", "try": ["lobby"]}
    assert parsed["forced-hosts"] == {"lobby.example.com": ["lobby"], "skyblock-201.games.test": ["zlh-201"],
                                      "creative-202.games.test": ["zlh-202"]}
    assert parsed["advanced"] == {"compression-threshold": 256}
    assert parsed["bind"] == "0.0.0.0:25577"
    assert render_config(text, [game(1), game(2, name="Creative")], "games.test") == text  # stable


async def test_publish_renders_atomically_and_runs_the_reload_command(store: Store, tmp_path: Path) -> None:
    directory = tmp_path / "velocity"
    directory.mkdir()
    config_path = directory / "velocity.toml"
    config_path.write_text(OPERATOR_CONFIG)
    reloads = directory / "reloads"
    velocity = VelocityConfig(config_path, "games.test", reload_command=f"sh -c 'echo reload >> {reloads}'")
    publisher = OutboxPublisher(store, Outbox(store, [VelocityTarget(velocity, store)]))
    await publisher.publish(game(1))
    await publisher.publish(game(2, name="Creative"))
    await publisher.publish(game(3, engine="valheim"))  # not Minecraft: no Velocity change at all
    assert set(tomllib.loads(config_path.read_text())["servers"]) == {"lobby", "try", "zlh-201", "zlh-202"}
    assert reloads.read_text().splitlines() == ["reload", "reload"]
    await publisher.unpublish(game(1))
    servers = tomllib.loads(config_path.read_text())["servers"]
    assert set(servers) == {"lobby", "try", "zlh-202"}
    assert sorted(p.name for p in directory.iterdir()) == ["reloads", "velocity.toml"]  # no temp files left


async def test_reload_hook_is_posted_and_a_failing_reload_is_retried(
        store: Store, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    hits: list[bytes] = []
    answer = {"status": b"500 Internal Server Error"}

    async def hook(stream: trio.SocketStream) -> None:
        data = b""
        while b"\r\n\r\n" not in data:
            chunk = await stream.receive_some(4096)
            if not chunk:
                return
            data += chunk
        hits.append(data.split(b"\r\n", 1)[0])
        await stream.send_all(b"HTTP/1.1 " + answer["status"] + b"\r\nContent-Length: 0\r\nConnection: close\r\n\r\n")
        await stream.aclose()

    async with trio.open_nursery() as nursery:
        [listener] = await nursery.start(partial(trio.serve_tcp, hook, 0, host="127.0.0.1"))
        port = listener.socket.getsockname()[1]
        velocity = VelocityConfig(tmp_path / "velocity.toml", "games.test",
                                  reload_url=f"http://127.0.0.1:{port}/velocity/reload")
        publisher = OutboxPublisher(store, Outbox(store, [VelocityTarget(velocity, store)]))
        await publisher.publish(game(4))
        [pending] = await store.run(edge_store.pending_changes)
        assert "500" in pending["lastError"]
        answer["status"] = b"204 No Content"
        monkeypatch.setattr(clock, "offset", clock.offset + timedelta(minutes=10))
        assert await publisher.outbox.deliver() == 1
        nursery.cancel_scope.cancel()
    assert hits == [b"POST /velocity/reload HTTP/1.1"] * 2
    assert tomllib.loads((tmp_path / "velocity.toml").read_text())["servers"] == {"zlh-204": "10.0.1.4:25565"}
