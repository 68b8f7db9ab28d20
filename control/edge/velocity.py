"""Velocity proxy entries: render the `[servers]` and `[forced-hosts]` tables of a Velocity config
from every published Minecraft server, write the file atomically (temp file + rename, so Velocity
never reads half a file), then ask Velocity to reload through a configured command or HTTP hook.

Only entries named `zlh-…` are ours: the operator's own servers, the `try` list and every other
section of the file are kept as they are. This module never edits anything but that one file."""

from __future__ import annotations

import json
import os
import re
import shlex
import tempfile
import tomllib
from pathlib import Path
from typing import Any

import httpx
import trio

from . import EdgeError, PublishedInstance
from .names import backend_port, game_host, is_minecraft, velocity_server_name

MANAGED_PREFIX = "zlh-"
_HEADER = re.compile(r"^\s*\[\s*([^\[\]]+?)\s*\]\s*(#.*)?$")
_OURS = ("servers", "forced-hosts")


def _toml_string(value: str) -> str:
    return json.dumps(value, ensure_ascii=False)  # a JSON string is a valid TOML basic string


def _toml_value(value: Any) -> str:
    if isinstance(value, str):
        return _toml_string(value)
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return str(value)
    if isinstance(value, list):
        return "[" + ", ".join(_toml_value(v) for v in value) + "]"
    raise EdgeError(f"cannot write {value!r} into the Velocity config")


def render_config(existing: str, instances: list[PublishedInstance], domain: str) -> str:
    """The config text with our servers and forced hosts in place of the previous ones."""
    try:
        parsed = tomllib.loads(existing) if existing.strip() else {}
    except tomllib.TOMLDecodeError as exc:
        raise EdgeError(f"the Velocity config is not valid TOML: {exc}") from exc
    old_servers = dict(parsed.get("servers", {}))
    fallback = old_servers.pop("try", None)
    servers = {k: v for k, v in old_servers.items() if not k.startswith(MANAGED_PREFIX)}
    forced = {host: names for host, names in parsed.get("forced-hosts", {}).items()
              if not any(str(n).startswith(MANAGED_PREFIX) for n in names)}
    for instance in sorted(instances, key=lambda i: i.vmid):
        if instance.kind != "game" or not is_minecraft(instance.engine_type) or not instance.agent_host:
            continue
        name = velocity_server_name(instance)
        servers[name] = f"{instance.agent_host}:{backend_port(instance)}"
        if domain:
            forced[game_host(instance, domain)] = [name]

    lines = ["[servers]"] + [f"{_toml_string(k)} = {_toml_string(str(v))}" for k, v in servers.items()]
    if fallback is not None:
        lines.append(f"try = {_toml_value(fallback)}")
    lines += ["", "[forced-hosts]"] + [f"{_toml_string(k)} = {_toml_value(v)}" for k, v in forced.items()]
    rendered = "\n".join(lines) + "\n"

    kept: list[str] = []
    inserted = False
    skipping = False
    for line in existing.splitlines():
        header = _HEADER.match(line)
        if header:
            skipping = header.group(1) in _OURS
            if skipping and not inserted:
                kept.append(rendered)
                inserted = True
        if not skipping:
            kept.append(line)
    if not inserted:
        kept += ["", rendered]
    return "\n".join(kept).rstrip("\n") + "\n"


def write_atomically(path: Path, text: str) -> None:
    fd, temp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(fd, "w") as handle:
            handle.write(text)
            handle.flush()
            os.fsync(handle.fileno())
        if path.exists():
            os.chmod(temp, path.stat().st_mode & 0o777)
        os.replace(temp, path)
    except BaseException:
        Path(temp).unlink(missing_ok=True)
        raise


class VelocityConfig:
    def __init__(self, path: Path, domain: str, *, reload_command: str = "", reload_url: str = "",
                 timeout: float = 10.0) -> None:
        self.path = path
        self.domain = domain
        self.reload_command = shlex.split(reload_command)
        self.reload_url = reload_url
        self.timeout = timeout

    async def apply(self, instances: list[PublishedInstance]) -> None:
        """Render from the complete list of published instances, then reload Velocity."""

        def render() -> None:
            existing = self.path.read_text() if self.path.exists() else ""
            write_atomically(self.path, render_config(existing, instances, self.domain))

        await trio.to_thread.run_sync(render)
        await self.reload()

    async def reload(self) -> None:
        if self.reload_command:
            with trio.move_on_after(self.timeout) as waiting:
                result = await trio.run_process(self.reload_command, check=False, capture_stdout=True,
                                                capture_stderr=True)
            if waiting.cancelled_caught:
                raise EdgeError(f"Velocity reload command took longer than {self.timeout:.0f}s")
            if result.returncode != 0:
                raise EdgeError(f"Velocity reload command failed ({result.returncode}): "
                                f"{result.stderr.decode(errors='replace')[:500]}")
        if self.reload_url:
            try:
                async with httpx.AsyncClient(timeout=self.timeout) as client:
                    response = await client.post(self.reload_url)
            except httpx.HTTPError as exc:
                raise EdgeError(f"Velocity reload hook unreachable: {exc!r}") from exc
            if response.status_code >= 300:
                raise EdgeError(f"Velocity reload hook answered {response.status_code}")
