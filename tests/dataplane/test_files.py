"""Files through the gateway's data plane, against real reference agents on real sockets."""

from __future__ import annotations

import hashlib
import os

import httpx
import pytest
import trio

from tests.conftest import Gateway
from tests.dataplane.helpers import PeakRss, agent_files, generated, kill_agent, make_sparse_file

MOUNTS = ("/api/servers", "/api/game/servers")


@pytest.fixture
async def server(gateway: Gateway) -> tuple[Gateway, dict, dict]:
    session = await gateway.register()
    instance = await gateway.provision(session, "game", "files")
    return gateway, session, instance


async def test_both_mounts_behave_identically(server: tuple[Gateway, dict, dict]) -> None:
    gateway, session, instance = server
    auth = gateway.bearer(session)
    results = []
    for mount in MOUNTS:
        base = f"{mount}/{instance['id']}/files"
        name = f"hello-{mount.count('/')}.txt"
        up = await gateway.client.put(f"{base}/upload", params={"path": name}, content=b"hello world", headers=auth)
        assert up.status_code == 201, up.text
        down = await gateway.client.get(f"{base}/download", params={"path": name}, headers=auth)
        listing = await gateway.client.get(base, headers=auth)
        mkdir = await gateway.client.post(f"{base}/mkdir", json={"path": f"dir-{len(mount)}"}, headers=auth)
        content = await gateway.client.get(f"{base}/content", params={"path": name}, headers=auth)
        missing = await gateway.client.get(f"{base}/download", params={"path": "nope.bin"}, headers=auth)
        traversal = await gateway.client.get(f"{base}/download", params={"path": "../../container.json"}, headers=auth)
        results.append((up.status_code, down.status_code, down.content, listing.status_code, mkdir.status_code,
                        content.json()["content"], missing.status_code, missing.json()["error"],
                        traversal.status_code))
        names = {e["name"] for e in listing.json()["entries"]}
        assert name in names
    assert results[0] == results[1]
    assert results[0][2] == b"hello world" and results[0][6] == 404 and results[0][8] == 400


async def test_edit_rename_delete_round_trip(server: tuple[Gateway, dict, dict]) -> None:
    gateway, session, instance = server
    auth = gateway.bearer(session)
    base = f"/api/servers/{instance['id']}/files"
    put = await gateway.client.put(f"{base}/content", json={"path": "server.properties", "content": "motd=hi\n"},
                                   headers=auth)
    assert put.status_code == 200, put.text
    moved = await gateway.client.post(f"{base}/rename", json={"from": "server.properties", "to": "s.properties"},
                                      headers=auth)
    assert moved.status_code == 200, moved.text
    read = await gateway.client.get(f"{base}/content", params={"path": "s.properties"}, headers=auth)
    assert read.json()["content"] == "motd=hi\n"
    gone = await gateway.client.delete(base, params={"path": "s.properties"}, headers=auth)
    assert gone.status_code == 200
    assert (await gateway.client.get(f"{base}/content", params={"path": "s.properties"}, headers=auth)).status_code == 404
    unauth = await gateway.client.get(f"{base}/download", params={"path": "x"})
    assert unauth.status_code == 401 and unauth.json()["error"] == "UNAUTHORIZED"


async def test_range_requests_pass_through(server: tuple[Gateway, dict, dict]) -> None:
    gateway, session, instance = server
    auth = gateway.bearer(session)
    base = f"/api/servers/{instance['id']}/files"
    data = bytes(range(256)) * 64
    await gateway.client.put(f"{base}/upload", params={"path": "r.bin"}, content=data, headers=auth)
    part = await gateway.client.get(f"{base}/download", params={"path": "r.bin"},
                                    headers={**auth, "range": "bytes=100-199"})
    assert part.status_code == 206 and part.content == data[100:200]
    assert part.headers["content-range"] == f"bytes 100-199/{len(data)}"
    bad = await gateway.client.get(f"{base}/download", params={"path": "r.bin"},
                                   headers={**auth, "range": f"bytes={len(data) + 10}-"})
    assert bad.status_code == 416


async def test_chunked_upload_streams_and_checks_out(server: tuple[Gateway, dict, dict]) -> None:
    gateway, session, instance = server
    auth = gateway.bearer(session)
    base = f"/api/servers/{instance['id']}/files"
    size = 64 * 1024 * 1024
    up = await gateway.client.put(f"{base}/upload", params={"path": "big.bin"}, content=generated(size), headers=auth)
    assert up.status_code == 201, up.text
    digest = hashlib.sha256()
    received = 0
    async with gateway.client.stream("GET", f"{base}/download", params={"path": "big.bin"}, headers=auth) as down:
        assert down.status_code == 200
        async for chunk in down.aiter_raw():
            digest.update(chunk)
            received += len(chunk)
    expected = hashlib.sha256()
    async for chunk in generated(size):
        expected.update(chunk)
    assert received == size and digest.hexdigest() == expected.hexdigest()


async def test_aborted_upload_leaves_nothing_at_the_agent(server: tuple[Gateway, dict, dict]) -> None:
    gateway, session, instance = server
    host, port = gateway.url.removeprefix("http://").split(":")
    stream = await trio.open_tcp_stream(host, int(port))
    head = (f"PUT /api/servers/{instance['id']}/files/upload?path=partial.bin HTTP/1.1\r\nHost: x\r\n"
            f"Authorization: Bearer {session['accessToken']}\r\nContent-Length: {100 * 1024 * 1024}\r\n\r\n")
    await stream.send_all(head.encode())
    for _ in range(10):
        await stream.send_all(b"x" * 1024 * 1024)
    await trio.sleep(0.3)
    await stream.aclose()
    files = agent_files(gateway, instance["vmid"])
    with trio.fail_after(10):
        while True:
            leftovers = [p for p in files.rglob("*") if p.is_file()] if files.exists() else []
            if not leftovers:
                break
            await trio.sleep(0.05)
    assert leftovers == []


async def test_upload_over_the_plan_limit_is_413_and_leaves_nothing(server: tuple[Gateway, dict, dict]) -> None:
    gateway, session, instance = server
    from storage.db import connect_database
    from storage.models import Plan

    db = connect_database(gateway.settings.database_url)
    with db.connection_context(), db.bind_ctx([Plan]):
        Plan.update(max_upload_bytes=1024 * 1024).where(Plan.name == "free").execute()
    base = f"/api/servers/{instance['id']}/files"
    declared = await gateway.client.put(f"{base}/upload", params={"path": "a.bin"}, content=b"x" * (2 * 1024 * 1024),
                                        headers=gateway.bearer(session))
    assert declared.status_code == 413 and declared.json()["error"] == "PAYLOAD_TOO_LARGE"
    counted = await gateway.client.put(f"{base}/upload", params={"path": "b.bin"},
                                       content=generated(3 * 1024 * 1024), headers=gateway.bearer(session))
    assert counted.status_code == 413
    await trio.sleep(0.2)
    files = agent_files(gateway, instance["vmid"])
    assert not [p for p in files.rglob("*") if p.is_file()]


async def test_agent_killed_mid_download_is_a_client_visible_error(server: tuple[Gateway, dict, dict]) -> None:
    gateway, session, instance = server
    make_sparse_file(agent_files(gateway, instance["vmid"]) / "huge.bin", 2 * 1024**3)
    received = 0
    with pytest.raises(httpx.HTTPError):
        async with gateway.client.stream("GET", f"/api/servers/{instance['id']}/files/download",
                                         params={"path": "huge.bin"}, headers=gateway.bearer(session)) as down:
            assert down.status_code == 200
            async for chunk in down.aiter_raw():
                received += len(chunk)
                if received > 8 * 1024 * 1024 and received - len(chunk) <= 8 * 1024 * 1024:
                    kill_agent(gateway, instance["vmid"])
    assert received < 2 * 1024**3


async def test_slow_reader_does_not_grow_memory(server: tuple[Gateway, dict, dict], nursery: trio.Nursery) -> None:
    gateway, session, instance = server
    make_sparse_file(agent_files(gateway, instance["vmid"]) / "slow.bin", 1024**3)
    meter = PeakRss()
    await nursery.start(meter.run)
    host, port = gateway.url.removeprefix("http://").split(":")
    stream = await trio.open_tcp_stream(host, int(port))
    request = (f"GET /api/servers/{instance['id']}/files/download?path=slow.bin HTTP/1.1\r\nHost: x\r\n"
               f"Authorization: Bearer {session['accessToken']}\r\n\r\n")
    await stream.send_all(request.encode())
    # Read at ~1 MB/s for 4 s: a gateway without backpressure would pull the whole GiB meanwhile.
    read = 0
    for _ in range(40):
        read += len(await stream.receive_some(100 * 1024))
        await trio.sleep(0.1)
    await stream.aclose()
    assert read < 16 * 1024 * 1024
    assert meter.growth < 64 * 1024 * 1024, meter.growth


async def test_resumable_upload_continues_from_the_reported_offset(server: tuple[Gateway, dict, dict]) -> None:
    gateway, session, instance = server
    auth = gateway.bearer(session)
    base = f"/api/servers/{instance['id']}/files"
    data = os.urandom(3 * 1024 * 1024)
    opened = await gateway.client.post(f"{base}/uploads", json={"path": "resumed.bin", "size": len(data)}, headers=auth)
    assert opened.status_code == 201, opened.text
    upload_id = opened.json()["uploadId"]
    # First attempt dies after 1 MiB + 123 bytes.
    host, port = gateway.url.removeprefix("http://").split(":")
    stream = await trio.open_tcp_stream(host, int(port))
    cut = 1024 * 1024 + 123
    head = (f"PATCH {base}/uploads/{upload_id} HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {session['accessToken']}\r\n"
            f"Upload-Offset: 0\r\nContent-Length: {len(data)}\r\n\r\n")
    await stream.send_all(head.encode() + data[:cut])
    await trio.sleep(0.3)
    await stream.aclose()
    with trio.fail_after(10):
        while True:
            status = await gateway.client.get(f"{base}/uploads/{upload_id}", headers=auth)
            if status.json()["offset"] == cut:
                break
            await trio.sleep(0.05)
    stale = await gateway.client.patch(f"{base}/uploads/{upload_id}", content=data[:10],
                                       headers={**auth, "upload-offset": "0"})
    assert stale.status_code == 409
    rest = await gateway.client.patch(f"{base}/uploads/{upload_id}", content=data[cut:],
                                      headers={**auth, "upload-offset": str(cut)})
    assert rest.status_code in (200, 201, 204), rest.text
    down = await gateway.client.get(f"{base}/download", params={"path": "resumed.bin"}, headers=auth)
    assert down.content == data


@pytest.mark.e2e
async def test_two_gib_each_way_with_flat_memory(server: tuple[Gateway, dict, dict], nursery: trio.Nursery) -> None:
    gateway, session, instance = server
    auth = gateway.bearer(session)
    base = f"/api/servers/{instance['id']}/files"
    size = 2 * 1024**3
    meter = PeakRss()
    await nursery.start(meter.run)
    up = await gateway.client.put(f"{base}/upload", params={"path": "two.bin"}, content=generated(size), headers=auth)
    assert up.status_code == 201, up.text
    received = 0
    async with gateway.client.stream("GET", f"{base}/download", params={"path": "two.bin"}, headers=auth) as down:
        async for chunk in down.aiter_raw():
            received += len(chunk)
    assert received == size
    assert meter.growth < 64 * 1024 * 1024, meter.growth
