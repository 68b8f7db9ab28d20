"""Resumable uploads: a session is created with the final path and size, then filled by PATCHes.

Each PATCH names the offset it starts at (`Upload-Offset`), which must equal the bytes already
staged; its body is appended as it arrives, and what arrived before a disconnect is kept, so the
client resumes from `GET /files/uploads/{id}`'s offset. When the offset reaches the size the staged
file is renamed into place. Staging lives in `DATA/.uploads/` (`<id>.part` plus `<id>.json`), on
the same filesystem as `DATA/files/` so the final rename is atomic, and survives agent restarts.

It must never put bytes under `DATA/files/` before the whole file is there, nor accept a PATCH
whose start offset disagrees with the staged bytes.
"""

from __future__ import annotations

import json
import os
import re
import secrets
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import trio

from bench.agent.bodyfile import BodyFile
from bench.agent.fields import json_object, required
from bench.agent.files import make_parents, not_found
from bench.agent.http import ApiError, Request, Response, json_response
from bench.agent.paths import FilesRoot

UPLOAD_ID = re.compile(r"^[0-9a-f]{16}$")
LOCK_WAIT_SECONDS = 2.0


@dataclass
class UploadSession:
    upload_id: str
    path: str
    size: int
    part: Path
    meta: Path
    complete: bool = False
    lock: trio.Lock = field(default_factory=trio.Lock, compare=False, repr=False)

    @property
    def offset(self) -> int:
        if self.complete:
            return self.size
        try:
            return self.part.stat().st_size
        except FileNotFoundError:
            return 0

    def describe(self) -> dict[str, Any]:
        return {"uploadId": self.upload_id, "path": self.path, "size": self.size,
                "offset": self.offset, "complete": self.complete}

    def save(self) -> None:
        temp = self.meta.with_suffix(".tmp")
        temp.write_text(json.dumps({"uploadId": self.upload_id, "path": self.path,
                                    "size": self.size, "complete": self.complete}))
        os.replace(temp, self.meta)


def answer(session: UploadSession, status: int = 200) -> Response:
    return json_response(session.describe(), status, [("upload-offset", str(session.offset))])


class UploadSessions:
    def __init__(self, staging: Path, files: FilesRoot) -> None:
        self.staging = staging
        self.files = files
        self.sessions: dict[str, UploadSession] = {}
        staging.mkdir(parents=True, exist_ok=True)
        for meta in staging.glob("*.json"):
            record = json.loads(meta.read_text())
            self.sessions[record["uploadId"]] = UploadSession(
                record["uploadId"], record["path"], record["size"],
                staging / f"{record['uploadId']}.part", meta, record["complete"])

    def lookup(self, request: Request) -> UploadSession:
        upload_id = request.params["upload_id"]
        session = self.sessions.get(upload_id) if UPLOAD_ID.match(upload_id) else None
        if session is None:
            raise not_found(upload_id)
        return session

    async def create(self, request: Request) -> Response:
        payload = await json_object(request)
        relative = required(payload, "path", str)
        size = required(payload, "size", int)
        if size < 0:
            raise ApiError(400, "BAD_REQUEST", {"field": "size", "reason": "negative"})
        target = self.files.resolve(relative, allow_root=False)
        if target.is_dir():
            raise ApiError(400, "IS_A_DIRECTORY", {"path": relative})
        upload_id = secrets.token_hex(8)
        session = UploadSession(upload_id, self.files.relative(target), size,
                                self.staging / f"{upload_id}.part",
                                self.staging / f"{upload_id}.json")
        session.part.touch()
        session.save()
        self.sessions[upload_id] = session
        if size == 0:
            self.finish(session)
        return answer(session, 201)

    async def describe(self, request: Request) -> Response:
        return answer(self.lookup(request))

    async def append(self, request: Request) -> Response:
        session = self.lookup(request)
        claimed = request.headers.get("upload-offset", "")
        if not claimed.isdigit():
            raise ApiError(400, "BAD_REQUEST", {"header": "Upload-Offset", "reason": "integer required"})
        with trio.move_on_after(LOCK_WAIT_SECONDS):
            async with session.lock:
                return await self.append_locked(request, session, int(claimed))
        raise ApiError(409, "UPLOAD_BUSY", {"offset": session.offset})

    async def append_locked(self, request: Request, session: UploadSession, claimed: int) -> Response:
        offset = session.offset
        if claimed != offset:
            raise ApiError(409, "OFFSET_MISMATCH", {"offset": offset},
                           [("upload-offset", str(offset))])
        room = session.size - offset
        declared = request.headers.get("content-length", "")
        if declared.isdigit() and int(declared) > room:
            raise ApiError(413, "PAYLOAD_TOO_LARGE", {"offset": offset, "remaining": room})
        if session.complete:
            await request.receive_body(0)
            return answer(session)
        fd = os.open(session.part, os.O_WRONLY | os.O_APPEND)
        try:
            body = BodyFile(fd)
            while (chunk := await request.receive_chunk()) is not None:
                if body.written + len(chunk) > room:
                    os.ftruncate(fd, offset)
                    raise ApiError(413, "PAYLOAD_TOO_LARGE", {"offset": offset, "remaining": room})
                await body.write(chunk)
        finally:
            os.close(fd)
        if not session.complete and session.offset == session.size:
            self.finish(session)
        return answer(session)

    def finish(self, session: UploadSession) -> None:
        target = self.files.resolve(session.path, allow_root=False)
        make_parents(target, session.path)
        os.replace(session.part, target)
        session.complete = True
        session.save()

    async def abort(self, request: Request) -> Response:
        session = self.lookup(request)
        with trio.move_on_after(LOCK_WAIT_SECONDS):
            async with session.lock:
                session.part.unlink(missing_ok=True)
                session.meta.unlink(missing_ok=True)
                del self.sessions[session.upload_id]
                return json_response({"uploadId": session.upload_id, "aborted": True})
        raise ApiError(409, "UPLOAD_BUSY", {"offset": session.offset})
