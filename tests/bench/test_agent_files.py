"""The reference agent's file routes: streamed transfers, ranges, aborted and resumable uploads,
path safety, and the small edit/rename/mkdir/delete operations."""

from __future__ import annotations

import os
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
import trio
from agent_harness import SECRET, raw_request, running_agent, send_and_vanish

BLOB = bytes(range(256)) * 8192  # 2 MiB with a recognisable pattern


def leftovers(agent_files: Path) -> list[str]:
    return [name for _, _, names in os.walk(agent_files) for name in names
            if name.startswith(".zlh-upload-")]


@pytest.mark.trio
async def test_upload_then_download_round_trip_with_ranges(tmp_path: Path) -> None:
    async with running_agent(tmp_path) as agent:
        put = await agent.client.put("/files/upload", params={"path": "world/region.bin"},
                                     content=BLOB)
        assert put.status_code == 201
        assert put.json() == {"path": "world/region.bin", "size": len(BLOB)}
        listing = (await agent.client.get("/files", params={"path": "world"})).json()
        assert listing["path"] == "world"
        [entry] = listing["entries"]
        assert entry["name"] == "region.bin" and entry["type"] == "file"
        assert entry["size"] == len(BLOB) and entry["modifiedAt"].endswith("Z")
        root = (await agent.client.get("/files")).json()
        assert root["entries"][0]["type"] == "dir"

        params = {"path": "world/region.bin"}
        whole = await agent.client.get("/files/download", params=params)
        assert whole.status_code == 200 and whole.content == BLOB
        assert whole.headers["content-type"] == "application/octet-stream"
        assert whole.headers["accept-ranges"] == "bytes"
        assert whole.headers["content-length"] == str(len(BLOB))
        for header, start, end in [("bytes=10-19", 10, 19), ("bytes=2097100-", 2097100, None),
                                   ("bytes=-5", len(BLOB) - 5, None),
                                   ("bytes=100-99999999", 100, None)]:
            part = await agent.client.get("/files/download", params=params,
                                          headers={"range": header})
            assert part.status_code == 206, header
            expected = BLOB[start:] if end is None else BLOB[start:end + 1]
            assert part.content == expected, header
            last = start + len(expected) - 1
            assert part.headers["content-range"] == f"bytes {start}-{last}/{len(BLOB)}"
        unsatisfiable = await agent.client.get("/files/download", params=params,
                                               headers={"range": f"bytes={len(BLOB)}-"})
        assert unsatisfiable.status_code == 416
        assert unsatisfiable.headers["content-range"] == f"bytes */{len(BLOB)}"
        missing = await agent.client.get("/files/download", params={"path": "nope.bin"})
        assert missing.status_code == 404


@pytest.mark.trio
async def test_chunked_upload_is_streamed_into_place(tmp_path: Path) -> None:
    async def pieces() -> AsyncIterator[bytes]:
        for offset in range(0, len(BLOB), 300_000):
            yield BLOB[offset:offset + 300_000]

    async with running_agent(tmp_path) as agent:
        response = await agent.client.post("/files/upload", params={"path": "chunked.bin"},
                                           content=pieces())
        assert response.status_code == 201
        assert (agent.files_dir / "chunked.bin").read_bytes() == BLOB


@pytest.mark.trio
async def test_aborted_upload_leaves_nothing(tmp_path: Path) -> None:
    async with running_agent(tmp_path) as agent:
        head = (f"PUT /files/upload?path=half.bin HTTP/1.1\r\nHost: agent\r\n"
                f"Authorization: Bearer {SECRET}\r\nContent-Length: {len(BLOB)}\r\n\r\n").encode()
        await send_and_vanish(agent.ports.port, head, BLOB[:700_000])
        with trio.fail_after(5):
            while leftovers(agent.files_dir):
                await trio.sleep(0.02)
        assert not (agent.files_dir / "half.bin").exists()
        listing = (await agent.client.get("/files")).json()
        assert listing["entries"] == []


@pytest.mark.trio
async def test_multipart_upload_writes_the_file_part_into_a_directory(tmp_path: Path) -> None:
    async with running_agent(tmp_path) as agent:
        await agent.client.post("/files/mkdir", json={"path": "plugins"})
        response = await agent.client.post(
            "/files/upload", params={"path": "plugins"},
            data={"note": "ignored form field"},
            files={"file": ("essentials.jar", BLOB, "application/java-archive")})
        assert response.status_code == 201
        assert response.json() == {"path": "plugins/essentials.jar", "size": len(BLOB)}
        assert (agent.files_dir / "plugins" / "essentials.jar").read_bytes() == BLOB
        renamed = await agent.client.post(
            "/files/upload", params={"path": "plugins/renamed.jar"},
            files={"file": ("whatever.jar", b"small", "application/octet-stream")})
        assert renamed.json() == {"path": "plugins/renamed.jar", "size": 5}
        no_file = await agent.client.post("/files/upload", params={"path": "plugins"},
                                          data={"only": "fields"},
                                          files={"empty": ("", b"", "text/plain")})
        assert no_file.status_code == 400
        assert leftovers(agent.files_dir) == []


@pytest.mark.trio
async def test_resumable_upload_resumes_after_a_mid_body_disconnect(tmp_path: Path) -> None:
    async with running_agent(tmp_path) as agent:
        created = await agent.client.post("/files/uploads",
                                          json={"path": "backups/big.bin", "size": len(BLOB)})
        assert created.status_code == 201
        upload_id = created.json()["uploadId"]
        assert created.json()["offset"] == 0
        head = (f"PATCH /files/uploads/{upload_id} HTTP/1.1\r\nHost: agent\r\n"
                f"Authorization: Bearer {SECRET}\r\nUpload-Offset: 0\r\n"
                f"Content-Length: {len(BLOB)}\r\n\r\n").encode()
        await send_and_vanish(agent.ports.port, head, BLOB[:800_000])
        with trio.fail_after(5):
            while (offset := (await agent.client.get(f"/files/uploads/{upload_id}"))
                   .json()["offset"]) < 800_000:
                await trio.sleep(0.02)
        assert offset == 800_000
        assert not (agent.files_dir / "backups" / "big.bin").exists()
        stale = await agent.client.patch(f"/files/uploads/{upload_id}", content=b"xx",
                                         headers={"upload-offset": "0"})
        assert stale.status_code == 409
        assert stale.json() == {"error": "OFFSET_MISMATCH", "details": {"offset": 800_000}}
        rest = await agent.client.patch(f"/files/uploads/{upload_id}", content=BLOB[offset:],
                                        headers={"upload-offset": str(offset)})
        assert rest.status_code == 200
        assert rest.json()["complete"] is True and rest.json()["offset"] == len(BLOB)
        assert (agent.files_dir / "backups" / "big.bin").read_bytes() == BLOB
        assert not list((agent.data_dir / ".uploads").glob("*.part"))
        repeated = await agent.client.patch(f"/files/uploads/{upload_id}", content=b"",
                                            headers={"upload-offset": str(len(BLOB))})
        assert repeated.status_code == 200 and repeated.json()["complete"] is True
        too_much = await agent.client.post("/files/uploads", json={"path": "t.bin", "size": 3})
        tid = too_much.json()["uploadId"]
        refused = await agent.client.patch(f"/files/uploads/{tid}", content=b"four",
                                           headers={"upload-offset": "0"})
        assert refused.status_code == 413
        assert (await agent.client.delete(f"/files/uploads/{tid}")).status_code == 200
        assert (await agent.client.get(f"/files/uploads/{tid}")).status_code == 404


@pytest.mark.trio
async def test_paths_outside_the_files_root_are_refused(tmp_path: Path) -> None:
    outside = tmp_path / "secret.txt"
    outside.write_text("not yours")
    async with running_agent(tmp_path) as agent:
        (agent.files_dir / "escape").symlink_to(outside)
        (agent.files_dir / "escape-dir").symlink_to(tmp_path)
        for path in ["../secret.txt", "/etc/passwd", "a/../../secret.txt", "bad\x00name",
                     "escape", "escape-dir/secret.txt"]:
            for method, route in [("GET", "/files/download"), ("GET", "/files"),
                                  ("PUT", "/files/upload"), ("DELETE", "/files")]:
                response = await agent.client.request(method, route, params={"path": path},
                                                      content=b"x" if method == "PUT" else None)
                assert response.status_code == 400, (method, route, path)
                assert response.json()["error"] == "INVALID_PATH"
        moved = await agent.client.post("/files/rename", json={"from": "escape", "to": "in.txt"})
        assert moved.status_code == 400
        assert outside.read_text() == "not yours"


@pytest.mark.trio
async def test_names_no_filesystem_can_hold_are_400_not_500(tmp_path: Path) -> None:
    """A 5,000-byte component, a path past PATH_MAX, a lone surrogate: the client's doing, so 400."""
    async with running_agent(tmp_path) as agent:
        for path in ["n" * 5000, "a/" * 2100, "ok/" + "é" * 128]:  # 256 bytes in the last name
            for method, route in [("GET", "/files/download"), ("GET", "/files"),
                                  ("PUT", "/files/upload"), ("DELETE", "/files"), ("GET", "/files/content")]:
                response = await agent.client.request(method, route, params={"path": path},
                                                      content=b"x" if method == "PUT" else None)
                assert response.status_code == 400, (method, route, len(path))
                assert response.json()["error"] == "INVALID_PATH"
            for route, body in [("/files/mkdir", {"path": path}), ("/files/rename", {"from": "x", "to": path}),
                                ("/files/content", {"path": path, "content": ""})]:
                method = "PUT" if route == "/files/content" else "POST"
                response = await agent.client.request(method, route, json=body)
                assert response.status_code == 400, (route, len(path))
        surrogate = await agent.client.put("/files/content", content=b'{"path": "\\ud800", "content": ""}',
                                           headers={"content-type": "application/json"})
        assert surrogate.status_code == 400 and surrogate.json()["error"] == "INVALID_PATH"
        longest = await agent.client.put("/files/upload", params={"path": "d/" + "n" * 255}, content=b"fits")
        assert longest.status_code == 201  # 255 bytes is a name the filesystem holds


@pytest.mark.trio
async def test_text_content_edit_rename_mkdir_delete(tmp_path: Path) -> None:
    async with running_agent(tmp_path) as agent:
        written = await agent.client.put("/files/content",
                                         json={"path": "server.properties", "content": "pvp=true\n"})
        assert written.status_code == 200
        read = await agent.client.get("/files/content", params={"path": "server.properties"})
        assert read.json() == {"path": "server.properties", "content": "pvp=true\n"}
        (agent.files_dir / "binary.dat").write_bytes(b"\xff\xfe\x00")
        assert (await agent.client.get("/files/content",
                                       params={"path": "binary.dat"})).status_code == 415
        (agent.files_dir / "huge.log").write_bytes(b"a" * (1024 * 1024 + 1))
        assert (await agent.client.get("/files/content",
                                       params={"path": "huge.log"})).status_code == 413
        assert (await agent.client.post("/files/mkdir",
                                        json={"path": "config/nested"})).status_code == 201
        renamed = await agent.client.post("/files/rename",
                                          json={"from": "server.properties",
                                                "to": "config/nested/server.properties"})
        assert renamed.status_code == 200
        assert (agent.files_dir / "config/nested/server.properties").read_text() == "pvp=true\n"
        clash = await agent.client.post("/files/rename", json={"from": "binary.dat",
                                                                "to": "huge.log"})
        assert clash.status_code == 409
        assert (await agent.client.delete("/files", params={"path": "config"})).status_code == 200
        assert not (agent.files_dir / "config").exists()
        assert (await agent.client.delete("/files", params={"path": "config"})).status_code == 404
        assert (await agent.client.delete("/files", params={"path": ""})).status_code == 400


@pytest.mark.trio
async def test_keep_alive_survives_an_unread_small_body(tmp_path: Path) -> None:
    async with running_agent(tmp_path) as agent:
        pipelined = (b"POST /start HTTP/1.1\r\nHost: a\r\nContent-Length: 5\r\n"
                     b"Authorization: Bearer " + SECRET.encode() + b"\r\n\r\nhello"
                     b"GET /health HTTP/1.1\r\nHost: a\r\nConnection: close\r\n"
                     b"Authorization: Bearer " + SECRET.encode() + b"\r\n\r\n")
        answer = await raw_request(agent.ports.port, pipelined)
        assert answer.count(b"HTTP/1.1 200") == 2
