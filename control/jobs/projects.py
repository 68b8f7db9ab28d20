"""Project routes: import (inline YAML, or a YAML file on the gateway's disk for admins), list, get,
delete, icon and reload. Every configuration passes the strict schema in project_config.py before
anything is stored; a reload that fails validation leaves the stored project as it was.

A project belongs to the user who imported it (access.py: others get a 404, admins see all). Its
`repository` must pass targets.py's rule (a 400 naming `project.repository`), and a `vault_connection`
must be one this owner may use (vault.usable_connection) whose URL is on the repository's origin, so
the secret can only ever go where its owner pointed it."""

from __future__ import annotations

import html
from pathlib import Path
from typing import Any

import pydantic
import trio
from quart import Response

from gateway.errors import ApiError
from storage import jobs as job_store
from storage.clock import utcnow
from storage.jobs import Project

from ..api import Body, Ctx
from .access import owner_filter, owns
from .present import project_json
from .project_config import MAX_YAML_BYTES, ConfigInvalid, ProjectConfig, parse_project_yaml
from .targets import Target
from .vault import checked_target, same_origin, usable_connection

ICON_TYPES = {".svg": "image/svg+xml", ".png": "image/png", ".jpg": "image/jpeg", ".jpeg": "image/jpeg",
              ".webp": "image/webp"}
MAX_ICON_BYTES = 512 * 1024


class ImportBody(Body):
    yaml: pydantic.constr(min_length=1, max_length=MAX_YAML_BYTES) | None = None  # type: ignore[valid-type]
    path: pydantic.constr(min_length=1, max_length=1024) | None = None  # type: ignore[valid-type]


def config_error(exc: ConfigInvalid) -> ApiError:
    return ApiError(422, "INVALID_PROJECT_CONFIG", exc.problems)


async def _read_source(path: str) -> str:
    source = trio.Path(path)
    if not source.is_absolute() or not await source.is_file():
        raise ApiError(422, "VALIDATION_FAILED", [{"field": "path", "message": "an absolute path to a YAML file",
                                                   "type": "path"}])
    if (await source.stat()).st_size > MAX_YAML_BYTES:
        raise config_error(ConfigInvalid([{"field": None, "message": "configuration too large", "type": "too_large"}]))
    return await source.read_text()


def _project_fields(config: ProjectConfig, text: str, source_path: str | None) -> dict[str, Any]:
    section = config.project
    return {"name": section.name, "description": section.description, "repository": section.repository,
            "default_ref": section.default_ref, "vault_connection": section.vault_connection,
            "icon": section.icon if source_path else None, "source_path": source_path, "config_yaml": text,
            "loaded_at": utcnow()}


async def check_repository(ctx: Ctx, config: ProjectConfig) -> Target | None:
    """targets.py's rule for the project's repository (a 400 naming project.repository)."""
    repository = config.project.repository
    return None if repository is None else await checked_target(ctx, repository, "project.repository")


def _save(config: ProjectConfig, text: str, source_path: str | None, project_id: int | None, owner_id: int | None,
          target: Target | None) -> dict[str, Any]:
    """One unit: check references into the vault, then store project, pipelines and chains."""
    name = config.project.vault_connection
    if name is not None:
        row = usable_connection(name, owner_id)
        if row is None:
            raise config_error(ConfigInvalid([{"field": "project.vault_connection",
                                               "message": f"no vault connection named {name!r}",
                                               "type": "reference"}]))
        if target is not None and not same_origin(target, row):
            raise ApiError(400, "SOURCE_REFUSED", [{
                "field": "project.repository", "type": "origin",
                "message": f"vault connection {name!r} is for another origin; its secret goes only to its own URL's "
                           "scheme, host and port"}])
    pipelines = [(p.name, p.model_dump(exclude={"name"})) for p in config.pipelines]
    chains = [(c.name, list(c.pipelines)) for c in config.chains]
    fields = _project_fields(config, text, source_path)
    if project_id is None:
        fields["owner_id"] = owner_id
    try:
        project = job_store.save_project(fields, pipelines, chains, project_id)
    except job_store.NameTaken as exc:
        raise ApiError(409, "PROJECT_EXISTS", {"field": "project.name", "name": str(exc)}) from exc
    return project_json(project, job_store.pipelines_of(project.id), job_store.chains_of(project.id))


def _parse(text: str) -> ProjectConfig:
    try:
        return parse_project_yaml(text)
    except ConfigInvalid as exc:
        raise config_error(exc) from exc


async def import_project(ctx: Ctx) -> tuple[dict[str, Any], int]:
    body: ImportBody = ctx.body
    if (body.yaml is None) == (body.path is None):
        raise ApiError(422, "VALIDATION_FAILED", [{"field": None, "message": "give exactly one of yaml, path",
                                                   "type": "one_of"}])
    if body.path is not None and not ctx.me.is_admin:
        raise ApiError(403, "FORBIDDEN", {"reason": "importing from the gateway's disk is admin only"})
    text = body.yaml if body.yaml is not None else await _read_source(body.path or "")
    config = _parse(text)
    target = await check_repository(ctx, config)
    return await job_store.run(ctx.services.store, _save, config, text, body.path, None, ctx.me.id, target), 201


def owned_project_or_404(ctx: Ctx, project_id: int) -> Project:
    """Inside a unit: the caller's project (any for an admin), else the 404 of one that does not exist."""
    project = job_store.project_by_id(project_id)
    if project is None or not owns(ctx.me, project.owner_id):
        raise ApiError(404, "PROJECT_NOT_FOUND")
    return project


async def list_projects(ctx: Ctx) -> dict[str, Any]:
    def listing() -> list[dict[str, Any]]:
        return [project_json(p, job_store.pipelines_of(p.id), job_store.chains_of(p.id))
                for p in job_store.list_projects(owner_filter(ctx.me))]

    return {"projects": await job_store.run(ctx.services.store, listing)}


async def get_project(ctx: Ctx, project_id: int) -> dict[str, Any]:
    def read() -> dict[str, Any]:
        project = owned_project_or_404(ctx, project_id)
        return project_json(project, job_store.pipelines_of(project.id), job_store.chains_of(project.id))

    return await job_store.run(ctx.services.store, read)


async def delete_project(ctx: Ctx, project_id: int) -> None:
    def delete() -> None:
        owned_project_or_404(ctx, project_id)
        job_store.delete_project(project_id)

    await job_store.run(ctx.services.store, delete)


async def reload_project(ctx: Ctx, project_id: int) -> dict[str, Any]:
    """Re-read a path project's YAML (an inline project's stored YAML is re-validated) and store it."""
    project = await job_store.run(ctx.services.store, owned_project_or_404, ctx, project_id)
    text = await _read_source(project.source_path) if project.source_path else project.config_yaml
    config = _parse(text)
    target = await check_repository(ctx, config)
    return await job_store.run(ctx.services.store, _save, config, text, project.source_path, project.id,
                               project.owner_id, target)


async def project_icon(ctx: Ctx, project_id: int) -> Response:
    """The icon file named in the YAML beside a path project's config, else a generated monogram."""
    project = await job_store.run(ctx.services.store, owned_project_or_404, ctx, project_id)
    if project.icon and project.source_path:
        icon = trio.Path(Path(project.source_path).parent / project.icon)
        kind = ICON_TYPES.get(icon.suffix.lower())
        if kind and await icon.is_file() and (await icon.stat()).st_size <= MAX_ICON_BYTES:
            return Response(await icon.read_bytes(), content_type=kind,
                            headers={"Cache-Control": "private, max-age=300"})
    letter = html.escape(project.name[:1].upper())
    svg = ('<svg xmlns="http://www.w3.org/2000/svg" width="64" height="64" viewBox="0 0 64 64">'
           '<rect width="64" height="64" rx="12" fill="#3b5bdb"/><text x="32" y="42" font-size="32" '
           f'text-anchor="middle" fill="#fff" font-family="sans-serif">{letter}</text></svg>')
    return Response(svg, content_type="image/svg+xml", headers={"Cache-Control": "private, max-age=300"})
