"""Updates of the gateway's own release (admin only): check a release feed, list its tags, apply one,
roll back, report status, and restart.

Layout, all under the data dir:

    release-feed/<tag>.tar.gz + <tag>.tar.gz.sha256   what can be installed (Settings.update_feed_dir)
    releases/<tag>/                                   staged releases, extracted and verified
    releases/current  -> <tag>                        what the supervisor starts
    releases/previous -> <tag>                        what rollback returns to
    releases/state.json                               last check and last action, for status

Apply verifies the archive's SHA-256, extracts it with tarfile's "data" filter (no absolute paths,
no escaping links) into a staging directory, renames it into place, then swaps `previous` and
`current` by atomic symlink replacement. Rollback swaps them back. Neither touches the running
process: the new release runs after a restart. Every mutating route takes `dry_run` and then only
says what it would do. Restart is a graceful stop of this process (SIGTERM to itself, after the answer
is sent); the service manager starts `current` again. Never deletes a release."""

from __future__ import annotations

import hashlib
import json
import os
import re
import signal
import tarfile
from importlib import metadata
from pathlib import Path
from typing import Any

import pydantic
import trio

from gateway.errors import ApiError
from storage.clock import isoformat, utcnow

from ..api import Body, Ctx
from ..services import Services

TAG = re.compile(r"^v?\d+(\.\d+){0,3}([-+][A-Za-z0-9.]+)?$")
ARCHIVE_SUFFIX = ".tar.gz"
RESTART_DELAY = 0.5  # seconds between the answer and the stop, so the answer reaches the caller


class ApplyBody(Body):
    tag: pydantic.constr(min_length=1, max_length=64) | None = None  # type: ignore[valid-type]
    dry_run: bool = False


class DryRunBody(Body):
    dry_run: bool = False


def running_version() -> str:
    try:
        return metadata.version("zlh-gateway")
    except metadata.PackageNotFoundError:
        return "0.0.0"


def _version_key(tag: str) -> tuple[tuple[int, ...], int, str]:
    numbers = tuple(int(n) for n in re.findall(r"\d+", tag.split("-")[0].split("+")[0]))
    return numbers, 0 if "-" in tag else 1, tag  # a pre-release sorts before its release


class Releases:
    """The release directories of one data dir. Blocking file operations: call from a worker thread."""

    def __init__(self, settings: Any) -> None:
        self.root = Path(settings.data_dir) / "releases"
        self.feed = Path(settings.update_feed_dir or Path(settings.data_dir) / "release-feed")

    def _link(self, name: str) -> str | None:
        link = self.root / name
        return os.readlink(link) if link.is_symlink() else None

    def current(self) -> str | None:
        return self._link("current")

    def previous(self) -> str | None:
        return self._link("previous")

    def staged(self) -> list[str]:
        if not self.root.is_dir():
            return []
        return sorted((p.name for p in self.root.iterdir() if p.is_dir() and not p.is_symlink()
                       and TAG.match(p.name)), key=_version_key)

    def feed_tags(self) -> list[dict[str, Any]]:
        if not self.feed.is_dir():
            return []
        tags = []
        for archive in self.feed.glob(f"*{ARCHIVE_SUFFIX}"):
            tag = archive.name[: -len(ARCHIVE_SUFFIX)]
            checksum = archive.with_name(archive.name + ".sha256")
            if TAG.match(tag) and checksum.is_file():
                tags.append({"tag": tag, "size": archive.stat().st_size,
                             "sha256": checksum.read_text().split()[0].strip().lower()})
        return sorted(tags, key=lambda t: _version_key(t["tag"]))

    def state(self) -> dict[str, Any]:
        path = self.root / "state.json"
        return json.loads(path.read_text()) if path.is_file() else {}

    def record(self, **changes: Any) -> None:
        self.root.mkdir(parents=True, exist_ok=True)
        state = {**self.state(), **changes}
        scratch = self.root / ".state.json.tmp"
        scratch.write_text(json.dumps(state, indent=2))
        os.replace(scratch, self.root / "state.json")

    def _point(self, name: str, tag: str | None) -> None:
        link = self.root / name
        if tag is None:
            link.unlink(missing_ok=True)
            return
        scratch = self.root / f".{name}.tmp"
        scratch.unlink(missing_ok=True)
        scratch.symlink_to(tag)
        os.replace(scratch, link)  # atomic: readers see the old or the new target, never none

    def stage(self, tag: str) -> None:
        """Verify and extract `tag` from the feed into releases/<tag> (no-op if already staged)."""
        if (self.root / tag).is_dir():
            return
        entry = next((t for t in self.feed_tags() if t["tag"] == tag), None)
        if entry is None:
            raise ApiError(404, "TAG_NOT_FOUND", {"tag": tag})
        archive = self.feed / f"{tag}{ARCHIVE_SUFFIX}"
        digest = hashlib.sha256()
        with archive.open("rb") as source:
            while chunk := source.read(1024 * 1024):
                digest.update(chunk)
        if digest.hexdigest() != entry["sha256"]:
            raise ApiError(422, "CHECKSUM_MISMATCH", {"tag": tag, "expected": entry["sha256"],
                                                      "actual": digest.hexdigest()})
        staging = self.root / f".staging-{tag}"
        self.root.mkdir(parents=True, exist_ok=True)
        if staging.exists():
            _remove_tree(staging)
        try:
            with tarfile.open(archive, "r:gz") as bundle:
                bundle.extractall(staging, filter="data")
        except (tarfile.TarError, OSError) as exc:
            if staging.exists():
                _remove_tree(staging)
            raise ApiError(422, "BAD_RELEASE_ARCHIVE", {"tag": tag, "reason": str(exc)}) from exc
        os.replace(staging, self.root / tag)

    def switch(self, tag: str) -> dict[str, Any]:
        old = self.current()
        if old is not None and old != tag:
            self._point("previous", old)
        self._point("current", tag)
        return {"from": old, "to": tag}


def _remove_tree(path: Path) -> None:
    for child in sorted(path.rglob("*"), key=lambda p: len(p.parts), reverse=True):
        if child.is_dir() and not child.is_symlink():
            child.rmdir()
        else:
            child.unlink()
    path.rmdir()


def _lock(services: Services) -> trio.Lock:
    lock = services.extra.get("jobs.update_lock")
    if lock is None:
        lock = services.extra["jobs.update_lock"] = trio.Lock()
    return lock


def _status(releases: Releases) -> dict[str, Any]:
    state = releases.state()
    current = releases.current()
    return {"running": running_version(), "current": current, "previous": releases.previous(),
            "staged": releases.staged(), "pending_restart": state.get("pending_restart", False),
            "last_check": state.get("last_check"), "last_action": state.get("last_action")}


async def update_check(ctx: Ctx) -> dict[str, Any]:
    releases = Releases(ctx.services.settings)

    def check() -> dict[str, Any]:
        tags = releases.feed_tags()
        current = releases.current() or running_version()
        latest = tags[-1]["tag"] if tags else None
        available = latest is not None and _version_key(latest) > _version_key(current)
        result = {"current": current, "latest": latest, "update_available": available,
                  "checked_at": isoformat(utcnow())}
        releases.record(last_check=result)
        return result

    async with _lock(ctx.services):
        return await trio.to_thread.run_sync(check)


async def update_tags(ctx: Ctx) -> dict[str, Any]:
    releases = Releases(ctx.services.settings)

    def tags() -> dict[str, Any]:
        current, staged = releases.current(), set(releases.staged())
        return {"tags": [{**t, "staged": t["tag"] in staged, "current": t["tag"] == current}
                         for t in releases.feed_tags()]}

    return await trio.to_thread.run_sync(tags)


async def update_status(ctx: Ctx) -> dict[str, Any]:
    return await trio.to_thread.run_sync(_status, Releases(ctx.services.settings))


async def update_apply(ctx: Ctx) -> dict[str, Any]:
    body: ApplyBody = ctx.body
    releases = Releases(ctx.services.settings)

    def apply() -> dict[str, Any]:
        tags = releases.feed_tags()
        tag = body.tag or (tags[-1]["tag"] if tags else None)
        if tag is None or not any(t["tag"] == tag for t in tags):
            raise ApiError(404, "TAG_NOT_FOUND", {"tag": tag})
        current = releases.current()
        if body.dry_run:
            return {"dry_run": True, "from": current, "to": tag, "actions": [
                *([] if tag in releases.staged() else [f"verify sha256 and extract {tag} into releases/{tag}"]),
                *([f"point releases/previous at {current}"] if current and current != tag else []),
                f"point releases/current at {tag}", "restart to run it"]}
        releases.stage(tag)
        switched = releases.switch(tag)
        action = {"action": "apply", **switched, "at": isoformat(utcnow()), "by": ctx.me.id}
        releases.record(last_action=action, pending_restart=True)
        return {"dry_run": False, **action, "pending_restart": True}

    async with _lock(ctx.services):
        return await trio.to_thread.run_sync(apply)


async def update_rollback(ctx: Ctx) -> dict[str, Any]:
    body: DryRunBody = ctx.body
    releases = Releases(ctx.services.settings)

    def rollback() -> dict[str, Any]:
        previous, current = releases.previous(), releases.current()
        if previous is None or not (releases.root / previous).is_dir():
            raise ApiError(409, "NO_PREVIOUS_RELEASE", {"current": current})
        if body.dry_run:
            return {"dry_run": True, "from": current, "to": previous,
                    "actions": [f"point releases/current at {previous}", f"point releases/previous at {current}",
                                "restart to run it"]}
        switched = releases.switch(previous)
        action = {"action": "rollback", **switched, "at": isoformat(utcnow()), "by": ctx.me.id}
        releases.record(last_action=action, pending_restart=True)
        return {"dry_run": False, **action, "pending_restart": True}

    async with _lock(ctx.services):
        return await trio.to_thread.run_sync(rollback)


async def server_restart(ctx: Ctx) -> tuple[dict[str, Any], int]:
    body: DryRunBody = ctx.body
    status = await trio.to_thread.run_sync(_status, Releases(ctx.services.settings))
    plan = {"stop": "graceful (drain, then exit)", "then": "the service manager starts releases/current",
            "current": status["current"], "running": status["running"]}
    if body.dry_run:
        return {"dry_run": True, **plan}, 200
    restart_requested(ctx.services).set()
    return {"dry_run": False, "restarting": True, **plan}, 202


def restart_requested(services: Services) -> trio.Event:
    event = services.extra.get("jobs.restart")
    if event is None:
        event = services.extra["jobs.restart"] = trio.Event()
    return event


def restart_service(services: Services) -> Any:
    """Background service: when a restart is requested, stop this process gracefully the same way
    an operator's SIGTERM does (control/__main__.py drains and exits on it)."""

    async def run(*, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        requested = restart_requested(services)
        services.running.add("release-restart")
        task_status.started()
        await requested.wait()
        await trio.sleep(RESTART_DELAY)
        Releases(services.settings).record(pending_restart=False)
        signal.raise_signal(signal.SIGTERM)

    return run
