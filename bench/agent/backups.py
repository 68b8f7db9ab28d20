"""Backups of `DATA/files/` as tar.gz archives in `DATA/backups/`, and restoring them.

Creating a backup runs in a worker thread and answers when the archive is complete; restoring
answers 202 at once and runs as a task in the agent's nursery (extract into a staging directory,
then swap it for `files/`). Both are operations visible in `/status` with their progress; only one
runs at a time. It must never leave a half-written archive under its final name, nor a half-restored
`files/` directory: the swap happens only after the whole archive was extracted.
"""

from __future__ import annotations

import json
import os
import re
import secrets
import shutil
import tarfile
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import trio

from bench.agent.clock import iso_utc
from bench.agent.fields import json_object, optional
from bench.agent.files import TEMP_PREFIX, file_response
from bench.agent.http import ApiError, Request, Response, json_response

BACKUP_ID = re.compile(r"^[0-9a-f]{12}$")
KEPT_OPERATIONS = 20


@dataclass
class Operation:
    kind: str  # "backup" | "restore"
    backup_id: str
    id: str = field(default_factory=lambda: "op-" + secrets.token_hex(6))
    state: str = "running"  # "running" | "done" | "failed"
    progress: int = 0
    started_at: str = field(default_factory=iso_utc)
    finished_at: str | None = None
    error: str | None = None

    def finish(self, error: str | None = None) -> None:
        self.state = "failed" if error else "done"
        self.progress = self.progress if error else 100
        self.error = error
        self.finished_at = iso_utc()

    def describe(self) -> dict[str, Any]:
        return {"id": self.id, "kind": self.kind, "backupId": self.backup_id,
                "state": self.state, "progress": self.progress, "startedAt": self.started_at,
                "finishedAt": self.finished_at, "error": self.error}


class BackupManager:
    def __init__(self, data_dir: Path, nursery: trio.Nursery, restore_min_seconds: float) -> None:
        self.data_dir = data_dir
        self.files_dir = data_dir / "files"
        self.backups_dir = data_dir / "backups"
        self.backups_dir.mkdir(parents=True, exist_ok=True)
        self.nursery = nursery
        self.restore_min_seconds = restore_min_seconds
        self.operations: deque[Operation] = deque(maxlen=KEPT_OPERATIONS)

    @property
    def running(self) -> Operation | None:
        return next((op for op in self.operations if op.state == "running"), None)

    def claim(self, kind: str, backup_id: str) -> Operation:
        """Register a new operation, refusing while another one runs."""
        current = self.running
        if current is not None:
            raise ApiError(409, "OPERATION_IN_PROGRESS", {"operation": current.describe()})
        operation = Operation(kind, backup_id)
        self.operations.append(operation)
        return operation

    def records(self) -> list[dict[str, Any]]:
        records = [json.loads(meta.read_text()) for meta in self.backups_dir.glob("*.json")]
        return sorted(records, key=lambda record: record["createdAt"])

    def lookup(self, backup_id: str) -> dict[str, Any]:
        meta = self.backups_dir / f"{backup_id}.json"
        if not BACKUP_ID.match(backup_id) or not meta.exists():
            raise ApiError(404, "NOT_FOUND", {"id": backup_id})
        record: dict[str, Any] = json.loads(meta.read_text())
        return record

    def archive_path(self, backup_id: str) -> Path:
        return self.backups_dir / f"{backup_id}.tar.gz"

    async def list_backups(self, request: Request) -> Response:
        return json_response({"backups": self.records()})

    async def create(self, request: Request) -> Response:
        payload = await json_object(request)
        backup_id = secrets.token_hex(6)
        name = optional(payload, "name", str) or f"backup-{iso_utc()}"
        operation = self.claim("backup", backup_id)
        try:
            size = await trio.to_thread.run_sync(
                write_archive, self.files_dir, self.archive_path(backup_id), operation)
        except BaseException as exc:
            operation.finish(f"{type(exc).__name__}: {exc}")
            raise
        record = {"id": backup_id, "name": name, "size": size, "createdAt": operation.started_at}
        meta = self.backups_dir / f"{backup_id}.json"
        meta.with_suffix(".tmp").write_text(json.dumps(record))
        os.replace(meta.with_suffix(".tmp"), meta)
        operation.finish()
        return json_response({"backup": record, "operation": operation.describe()}, 201)

    async def restore(self, request: Request) -> Response:
        backup_id = request.query.get("id", "")
        self.lookup(backup_id)
        operation = self.claim("restore", backup_id)
        self.nursery.start_soon(self.run_restore, operation)
        return json_response({"operation": operation.describe()}, 202)

    async def run_restore(self, operation: Operation) -> None:
        started = trio.current_time()
        staging = self.data_dir / f".restore-{operation.id}"
        try:
            await trio.to_thread.run_sync(
                extract_archive, self.archive_path(operation.backup_id), staging, operation)
            await trio.sleep_until(started + self.restore_min_seconds)
            await trio.to_thread.run_sync(swap_in, staging, self.files_dir)
        except (OSError, tarfile.TarError) as exc:
            operation.finish(f"{type(exc).__name__}: {exc}")
            await trio.to_thread.run_sync(shutil.rmtree, staging, True)
            return
        operation.finish()

    async def delete(self, request: Request) -> Response:
        backup_id = request.params["backup_id"]
        self.lookup(backup_id)
        current = self.running
        if current is not None and current.backup_id == backup_id:
            raise ApiError(409, "OPERATION_IN_PROGRESS", {"operation": current.describe()})
        self.archive_path(backup_id).unlink(missing_ok=True)
        (self.backups_dir / f"{backup_id}.json").unlink()
        return json_response({"deleted": backup_id})

    async def download(self, request: Request) -> Response:
        record = self.lookup(request.params["backup_id"])
        return file_response(self.archive_path(record["id"]), request, f"{record['name']}.tar.gz")


def write_archive(files_dir: Path, archive: Path, operation: Operation) -> int:
    """Write `files_dir` as tar.gz to `archive` (via a temp name); the archive's size."""
    members = sorted(path for path in files_dir.rglob("*") if not path.name.startswith(TEMP_PREFIX))
    total = sum(path.lstat().st_size for path in members if path.is_file()) or 1
    done = 0
    temp = archive.with_name(archive.name + ".part")
    try:
        with tarfile.open(temp, "w:gz", compresslevel=1) as tar:
            for path in members:
                tar.add(path, arcname=path.relative_to(files_dir).as_posix(), recursive=False)
                if path.is_file() and not path.is_symlink():
                    done += path.stat().st_size
                    operation.progress = min(99, done * 100 // total)
        os.replace(temp, archive)
    finally:
        temp.unlink(missing_ok=True)
    return archive.stat().st_size


def extract_archive(archive: Path, staging: Path, operation: Operation) -> None:
    """Extract `archive` into `staging`, with tarfile's `data` filter (no escapes, no devices)."""
    size = archive.stat().st_size or 1
    staging.mkdir()
    with archive.open("rb") as raw, tarfile.open(fileobj=raw, mode="r:gz") as tar:
        for member in tar:
            tar.extract(member, staging, filter="data")
            operation.progress = min(99, raw.tell() * 100 // size)


def swap_in(staging: Path, files_dir: Path) -> None:
    """Replace `files_dir` by `staging` with two renames, then drop the old tree."""
    retired = files_dir.with_name(f".files-retired-{secrets.token_hex(4)}")
    os.rename(files_dir, retired)
    os.rename(staging, files_dir)
    shutil.rmtree(retired, ignore_errors=True)
