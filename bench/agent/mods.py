"""The mods routes: a list of installed mods persisted as `DATA/mods.json`.

The reference agent only keeps the records (id, name, version, enabled); it downloads nothing. The
file is rewritten atomically on every change. It must never accept an id that is not a plain token.
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path
from typing import Any

from bench.agent.fields import json_object, optional, required
from bench.agent.http import ApiError, Request, Response, json_response

MOD_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")


class ModRegistry:
    def __init__(self, path: Path) -> None:
        self.path = path
        self.mods: dict[str, dict[str, Any]] = {}
        if path.exists():
            self.mods = {mod["id"]: mod for mod in json.loads(path.read_text())["mods"]}

    def save(self) -> None:
        temp = self.path.with_suffix(".tmp")
        temp.write_text(json.dumps({"mods": list(self.mods.values())}, indent=1))
        os.replace(temp, self.path)

    def lookup(self, request: Request) -> dict[str, Any]:
        mod = self.mods.get(request.params["mod_id"])
        if mod is None:
            raise ApiError(404, "NOT_FOUND", {"id": request.params["mod_id"]})
        return mod

    async def list_mods(self, request: Request) -> Response:
        return json_response({"mods": list(self.mods.values())})

    async def install(self, request: Request) -> Response:
        payload = await json_object(request)
        mod_id = required(payload, "id", str)
        if not MOD_ID.match(mod_id):
            raise ApiError(400, "BAD_REQUEST", {"field": "id", "reason": "letters, digits, ._-"})
        if mod_id in self.mods:
            raise ApiError(409, "CONFLICT", {"reason": "already installed", "id": mod_id})
        mod = {"id": mod_id, "name": optional(payload, "name", str) or mod_id,
               "version": optional(payload, "version", str) or "latest", "enabled": True}
        self.mods[mod_id] = mod
        self.save()
        return json_response({"mod": mod}, 201)

    async def remove(self, request: Request) -> Response:
        mod = self.lookup(request)
        del self.mods[mod["id"]]
        self.save()
        return json_response({"deleted": mod["id"]})

    async def enable(self, request: Request) -> Response:
        return self.set_enabled(request, True)

    async def disable(self, request: Request) -> Response:
        return self.set_enabled(request, False)

    def set_enabled(self, request: Request, enabled: bool) -> Response:
        mod = self.lookup(request)
        mod["enabled"] = enabled
        self.save()
        return json_response({"mod": mod})
