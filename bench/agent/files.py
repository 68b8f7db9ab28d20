"""The file manager routes over `DATA/files/`: list, download, upload, edit, delete, rename, mkdir.

Bodies stream both ways: downloads leave through sendfile (with single byte ranges), uploads go chunk
by chunk into a temp file beside the target that is renamed into place only once the whole body
arrived. It must never leave a half-written file under its final name, nor touch a path that
`FilesRoot.resolve` refused.
"""

from __future__ import annotations

import os
import secrets
import shutil
import stat
import urllib.parse
from contextlib import ExitStack
from pathlib import Path
from typing import Any, Self

import trio

from bench.agent.bodyfile import BodyFile
from bench.agent.clock import iso_utc
from bench.agent.fields import json_object, required
from bench.agent.http import (
    ApiError,
    FileSlice,
    Request,
    Response,
    error_response,
    json_response,
)
from bench.agent.multipart import (
    MultipartError,
    MultipartParser,
    PartData,
    PartEnd,
    PartStart,
    boundary_of,
)
from bench.agent.paths import NAME_MAX, FilesRoot, invalid_path
from bench.agent.ranges import RangeNotSatisfiable, parse_range

TEMP_PREFIX = ".zlh-upload-"
MAX_TEXT_CONTENT = 1 << 20


def not_found(path: str) -> ApiError:
    return ApiError(404, "NOT_FOUND", {"path": path})


def file_response(path: Path, request: Request, download_name: str) -> Response:
    """A streamed download of `path`, honouring a single `Range`."""
    try:
        info = path.stat()
    except FileNotFoundError:
        raise not_found(download_name) from None
    if stat.S_ISDIR(info.st_mode):
        raise ApiError(400, "IS_A_DIRECTORY", {"path": download_name})
    size = info.st_size
    headers = [
        ("content-type", "application/octet-stream"),
        ("accept-ranges", "bytes"),
        ("content-disposition",
         "attachment; filename*=UTF-8''" + urllib.parse.quote(Path(download_name).name)),
    ]
    try:
        wanted = parse_range(request.headers.get("range"), size)
    except RangeNotSatisfiable:
        return error_response(416, "RANGE_NOT_SATISFIABLE", {"size": size},
                              [("content-range", f"bytes */{size}")])
    if wanted is None:
        return Response(200, headers, FileSlice(str(path), 0, size))
    headers.append(("content-range", wanted.content_range(size)))
    return Response(206, headers, FileSlice(str(path), wanted.start, wanted.length))


def remove_quietly(path: Path) -> None:
    try:
        path.unlink()
    except FileNotFoundError:
        pass


class FileManager:
    def __init__(self, root: Path) -> None:
        self.files = FilesRoot(root)

    async def list_dir(self, request: Request) -> Response:
        relative = request.query.get("path", "")
        path = self.files.resolve(relative)
        if not path.exists():
            raise not_found(relative)
        if not path.is_dir():
            raise ApiError(400, "NOT_A_DIRECTORY", {"path": relative})
        entries = await trio.to_thread.run_sync(describe_entries, path)
        return json_response({"path": self.files.relative(path), "entries": entries})

    async def download(self, request: Request) -> Response:
        relative = request.query.get("path", "")
        return file_response(self.files.resolve(relative, allow_root=False), request, relative)

    async def upload(self, request: Request) -> Response:
        """PUT/POST /files/upload: a raw body, or the first file part of a multipart form."""
        relative = request.query.get("path", "")
        boundary = boundary_of(request.headers.get("content-type", ""))
        if boundary is not None:
            return await self.upload_multipart(request, relative, boundary)
        target = self.writable_target(relative)
        with StagedFile(target) as staged:
            while (chunk := await request.receive_chunk()) is not None:
                await staged.body.write(chunk)
            staged.commit()
        return json_response({"path": self.files.relative(target), "size": staged.body.written}, 201)

    async def upload_multipart(self, request: Request, relative: str, boundary: bytes) -> Response:
        parser = MultipartParser(boundary)
        destination = self.files.resolve(relative)
        with ExitStack() as stack:
            staged: StagedFile | None = None
            in_file_part = False
            while (chunk := await request.receive_chunk()) is not None:
                try:
                    events = parser.feed(chunk)
                except MultipartError as exc:
                    raise ApiError(400, "BAD_REQUEST", {"reason": str(exc)}) from exc
                for event in events:
                    if isinstance(event, PartStart) and staged is None and event.filename:
                        target = self.multipart_target(destination, event.filename)
                        staged = stack.enter_context(StagedFile(target))
                        in_file_part = True
                    elif isinstance(event, PartData) and in_file_part and staged is not None:
                        await staged.body.write(event.data)
                    elif isinstance(event, PartEnd):
                        in_file_part = False
            if staged is None or not parser.finished:
                raise ApiError(400, "BAD_REQUEST", {"reason": "no complete file part in the form"})
            staged.commit()
        return json_response({"path": self.files.relative(staged.target),
                              "size": staged.body.written}, 201)

    def writable_target(self, relative: str) -> Path:
        """The resolved upload target, its parent directories created."""
        target = self.files.resolve(relative, allow_root=False)
        if target.is_dir():
            raise ApiError(400, "IS_A_DIRECTORY", {"path": relative})
        make_parents(target, relative)
        return target

    def multipart_target(self, path: Path, filename: str) -> Path:
        """`path` itself, or `path/<filename>` when `path` is a directory (or the root)."""
        if not path.is_dir():
            return path
        name = filename.replace("\\", "/").rsplit("/", 1)[-1]
        if name in ("", ".", ".."):
            raise invalid_path(filename, "unusable file name")
        return self.writable_target(self.files.relative(path / name))

    async def read_text(self, request: Request) -> Response:
        relative = request.query.get("path", "")
        path = self.files.resolve(relative, allow_root=False)
        if not path.exists():
            raise not_found(relative)
        if path.is_dir():
            raise ApiError(400, "IS_A_DIRECTORY", {"path": relative})
        if path.stat().st_size > MAX_TEXT_CONTENT:
            raise ApiError(413, "PAYLOAD_TOO_LARGE", {"limit": MAX_TEXT_CONTENT})
        data = await trio.to_thread.run_sync(path.read_bytes)
        try:
            content = data.decode("utf-8")
        except UnicodeDecodeError:
            raise ApiError(415, "UNSUPPORTED_MEDIA_TYPE", {"reason": "not UTF-8 text"}) from None
        return json_response({"path": self.files.relative(path), "content": content})

    async def write_text(self, request: Request) -> Response:
        payload = await json_object(request)
        relative = required(payload, "path", str)
        content = required(payload, "content", str).encode("utf-8")
        target = self.writable_target(relative)
        with StagedFile(target) as staged:
            await staged.body.write(content)
            staged.commit()
        return json_response({"path": self.files.relative(target), "size": len(content)})

    async def delete(self, request: Request) -> Response:
        relative = request.query.get("path", "")
        path = self.files.resolve(relative, allow_root=False)
        if not path.is_symlink() and not path.exists():
            raise not_found(relative)
        if path.is_dir() and not path.is_symlink():
            await trio.to_thread.run_sync(shutil.rmtree, path)
        else:
            path.unlink()
        return json_response({"deleted": self.files.relative(path)})

    async def rename(self, request: Request) -> Response:
        payload = await json_object(request)
        source = self.files.resolve(required(payload, "from", str), allow_root=False)
        target = self.files.resolve(required(payload, "to", str), allow_root=False)
        if not source.exists():
            raise not_found(payload["from"])
        if target.exists():
            raise ApiError(409, "CONFLICT", {"reason": "target exists", "path": payload["to"]})
        if target == source or source in target.parents:
            raise ApiError(400, "BAD_REQUEST", {"reason": "cannot move a directory into itself"})
        make_parents(target, payload["to"])
        source.rename(target)
        return json_response({"from": self.files.relative(source),
                              "to": self.files.relative(target)})

    async def mkdir(self, request: Request) -> Response:
        payload = await json_object(request)
        relative = required(payload, "path", str)
        path = self.files.resolve(relative, allow_root=False)
        if path.exists() and not path.is_dir():
            raise ApiError(409, "CONFLICT", {"reason": "a file exists there", "path": relative})
        try:
            path.mkdir(parents=True, exist_ok=True)
        except (FileExistsError, NotADirectoryError):
            raise ApiError(409, "CONFLICT", {"reason": "a parent is a file", "path": relative}) from None
        return json_response({"path": self.files.relative(path)}, 201)


def make_parents(path: Path, relative: str) -> None:
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
    except (FileExistsError, NotADirectoryError):
        raise ApiError(409, "CONFLICT", {"reason": "a parent is a file", "path": relative}) from None


def describe_entries(directory: Path) -> list[dict[str, Any]]:
    entries = []
    with os.scandir(directory) as scan:
        for entry in scan:
            if entry.name.startswith(TEMP_PREFIX):
                continue
            try:
                info = entry.stat()
            except OSError:
                continue
            is_dir = stat.S_ISDIR(info.st_mode)
            entries.append({
                "name": entry.name,
                "type": "dir" if is_dir else "file",
                "size": 0 if is_dir else info.st_size,
                "modifiedAt": iso_utc(info.st_mtime),
            })
    entries.sort(key=lambda e: (e["type"] != "dir", e["name"]))
    return entries


class StagedFile:
    """A temp file beside `target` that becomes `target` on `commit`, or vanishes on exit."""

    def __init__(self, target: Path) -> None:
        self.target = target
        prefix = f"{TEMP_PREFIX}{secrets.token_hex(6)}-"
        # The target's name, cut so the temp name fits NAME_MAX too (a 255-byte name is a legal target).
        kept = os.fsencode(target.name)[:NAME_MAX - len(prefix)].decode("utf-8", "ignore")
        self.temp = target.with_name(prefix + kept)
        self.body = BodyFile(-1)
        self._committed = False

    def __enter__(self) -> Self:
        self.body = BodyFile(os.open(self.temp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644))
        return self

    def commit(self) -> None:
        self._close()
        os.replace(self.temp, self.target)
        self._committed = True

    def __exit__(self, *exc_info: object) -> None:
        self._close()
        if not self._committed:
            remove_quietly(self.temp)

    def _close(self) -> None:
        if self.body.fd >= 0:
            os.close(self.body.fd)
            self.body.fd = -1
