"""Files, backups and mods: the control side of the data plane.

Small JSON operations (list, read/edit text, delete, rename, mkdir, resumable-upload sessions, mods,
backups) are Quart routes forwarded through the agent client. Streams (download, upload, upload
chunks, backup download) are served by gateway/dataplane.py; `stream_authorizer` is the rule it asks.
Files are mounted under both `/api/game/servers/:id/files…` and `/api/servers/:id/files…` from this
one implementation: compatibility between the two is part of the contract."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Annotated, Any

import pydantic

from gateway.agent_client import forward_agent_result
from gateway.dataplane import StreamGrant
from gateway.errors import ApiError
from gateway.outbound import check_file_path, file_path_problem, segment
from gateway.server import Request
from storage import instances as store_instances
from storage import users

from .access import agent_target, owned, server_not_found
from .api import Body, Ctx, CurrentUser, authenticate
from .lifecycle import InstanceState
from .servers import ready_instance, server_row
from .services import Services

FILE_MOUNTS = ("/api/game/servers", "/api/servers")



def _file_path(path: str) -> str:
    problem = file_path_problem(path)
    if problem is not None:
        raise ValueError(f"{problem}: at most 4096 bytes, 255 bytes per name, no NUL")
    return path


FilePath = Annotated[str, pydantic.StringConstraints(min_length=1, max_length=4096),
                     pydantic.AfterValidator(_file_path)]


class WriteContent(Body):
    path: FilePath
    content: Annotated[str, pydantic.StringConstraints(max_length=1024 * 1024)]


class Rename(Body):
    from_: FilePath = pydantic.Field(alias="from")
    to: FilePath


class MakeDir(Body):
    path: FilePath


class StartUpload(Body):
    path: FilePath
    size: int = pydantic.Field(ge=0)


class CreateBackup(Body):
    name: Annotated[str, pydantic.StringConstraints(min_length=1, max_length=128)] | None = None


class InstallMod(Body):
    id: Annotated[str, pydantic.StringConstraints(min_length=1, max_length=128, pattern=r"^[A-Za-z0-9_.:-]+$")]
    name: Annotated[str, pydantic.StringConstraints(max_length=256)] | None = None
    version: Annotated[str, pydantic.StringConstraints(max_length=64)] | None = None


def _path_param(ctx: Ctx, required: bool = True) -> dict[str, str]:
    path = ctx.query.get("path")
    if path is None:
        if required:
            raise ApiError(400, "VALIDATION_FAILED", [{"field": "path", "message": "query parameter required"}])
        return {}
    return {"path": check_file_path(path)}


async def _forward(ctx: Ctx, server_id: int, method: str, agent_path: str, *, json_body: Any = None,
                   params: dict[str, str] | None = None, timeout: float | None = None) -> tuple[Any, int]:
    instance = await ready_instance(ctx, server_id)
    result = await ctx.services.agents.call(agent_target(instance), method, agent_path, json_body=json_body,
                                            params=params, timeout=timeout)
    return forward_agent_result(result)


# --- files ----------------------------------------------------------------------------------------

async def list_files(ctx: Ctx, server_id: int) -> tuple[Any, int]:
    return await _forward(ctx, server_id, "GET", "/files", params=_path_param(ctx, required=False))


async def read_content(ctx: Ctx, server_id: int) -> tuple[Any, int]:
    return await _forward(ctx, server_id, "GET", "/files/content", params=_path_param(ctx))


async def write_content(ctx: Ctx, server_id: int) -> tuple[Any, int]:
    return await _forward(ctx, server_id, "PUT", "/files/content", json_body=ctx.body.model_dump())


async def delete_file(ctx: Ctx, server_id: int) -> tuple[Any, int]:
    return await _forward(ctx, server_id, "DELETE", "/files", params=_path_param(ctx))


async def rename_file(ctx: Ctx, server_id: int) -> tuple[Any, int]:
    return await _forward(ctx, server_id, "POST", "/files/rename", json_body=ctx.body.model_dump(by_alias=True))


async def make_dir(ctx: Ctx, server_id: int) -> tuple[Any, int]:
    return await _forward(ctx, server_id, "POST", "/files/mkdir", json_body=ctx.body.model_dump())


async def start_upload(ctx: Ctx, server_id: int) -> tuple[Any, int]:
    limit = await _upload_limit(ctx.services, ctx.me)
    if limit is not None and ctx.body.size > limit:
        raise ApiError(413, "PAYLOAD_TOO_LARGE", {"limit": limit, "declared": ctx.body.size})
    return await _forward(ctx, server_id, "POST", "/files/uploads", json_body=ctx.body.model_dump())


async def upload_status(ctx: Ctx, server_id: int, upload_id: str) -> tuple[Any, int]:
    return await _forward(ctx, server_id, "GET", f"/files/uploads/{segment(upload_id)}")


async def abort_upload(ctx: Ctx, server_id: int, upload_id: str) -> tuple[Any, int]:
    return await _forward(ctx, server_id, "DELETE", f"/files/uploads/{segment(upload_id)}")


# --- backups --------------------------------------------------------------------------------------

async def list_backups(ctx: Ctx, server_id: int) -> tuple[Any, int]:
    return await _forward(ctx, server_id, "GET", "/backups")


async def create_backup(ctx: Ctx, server_id: int) -> tuple[Any, int]:
    body = ctx.body.model_dump(exclude_none=True) if ctx.body else {}
    return await _forward(ctx, server_id, "POST", "/backups", json_body=body, timeout=600)


async def restore_backup(ctx: Ctx, server_id: int) -> tuple[Any, int]:
    backup_id = ctx.query.get("id")
    if not backup_id:
        raise ApiError(400, "VALIDATION_FAILED", [{"field": "id", "message": "query parameter required"}])
    return await _forward(ctx, server_id, "POST", "/backups/restore", params={"id": backup_id})


async def delete_backup(ctx: Ctx, server_id: int, backup_id: str) -> tuple[Any, int]:
    return await _forward(ctx, server_id, "DELETE", f"/backups/{segment(backup_id)}")


async def restore_status(ctx: Ctx, server_id: int) -> dict[str, Any]:
    """Restore/backup progress from the normalized state (the poller's last /status)."""
    _instance, agent = await server_row(ctx, server_id)
    operations = (agent.operations if agent else None) or []
    return {"operations": operations,
            "running": [op for op in operations if op.get("state") == "running"]}


# --- mods -----------------------------------------------------------------------------------------

async def list_mods(ctx: Ctx, server_id: int) -> tuple[Any, int]:
    return await _forward(ctx, server_id, "GET", "/mods")


async def install_mod(ctx: Ctx, server_id: int) -> tuple[Any, int]:
    return await _forward(ctx, server_id, "POST", "/mods", json_body=ctx.body.model_dump(exclude_none=True))


async def remove_mod(ctx: Ctx, server_id: int, mod_id: str) -> tuple[Any, int]:
    return await _forward(ctx, server_id, "DELETE", f"/mods/{segment(mod_id)}")


async def enable_mod(ctx: Ctx, server_id: int, mod_id: str) -> tuple[Any, int]:
    return await _forward(ctx, server_id, "POST", f"/mods/{segment(mod_id)}/enable")


async def disable_mod(ctx: Ctx, server_id: int, mod_id: str) -> tuple[Any, int]:
    return await _forward(ctx, server_id, "POST", f"/mods/{segment(mod_id)}/disable")


# --- the data plane's rule ------------------------------------------------------------------------

def _plan_upload_limit(user_id: int) -> int:
    row = users.user_by_id(user_id)
    plan = users.plan_by_name(row.plan) if row else None
    return plan.max_upload_bytes if plan else 0


async def _upload_limit(services: Services, user: CurrentUser) -> int | None:
    return None if user.is_admin else await services.store.read(_plan_upload_limit, user.id)


def stream_authorizer(services: Services) -> Callable[[Request, int], Awaitable[StreamGrant]]:
    """May this request stream to or from this server? The one access rule (authenticate, then
    grant), one DB hop for the instance and the plan's upload limit."""

    async def authorize(request: Request, server_id: int) -> StreamGrant:
        header = request.header(b"authorization")
        user = authenticate(services, {"authorization": header.decode("latin-1") if header else None})

        def load() -> tuple[Any, int | None]:
            return store_instances.get_instance(server_id), None if user.is_admin else _plan_upload_limit(user.id)

        found, limit = await services.store.read(load)
        instance = owned(user, found, server_not_found(server_id))
        if instance.state != InstanceState.READY.value:
            raise ApiError(409, "SERVER_NOT_READY", {"state": instance.state})
        return StreamGrant(agent_target(instance), limit, instance.id)

    return authorize
