"""Every route the reference agent serves on its main port, in one list.

The agent's parts own the handlers; this file only says which path and method reach which one, so
the whole agent contract can be read in one screen (and checked against docs/agent-contract.md).
Authentication happens before routing, in `agent.py`.
"""

from __future__ import annotations

from dataclasses import dataclass

from bench.agent.backups import BackupManager
from bench.agent.codeserver import CodeServer
from bench.agent.console import ConsoleRoutes
from bench.agent.files import FileManager
from bench.agent.mods import ModRegistry
from bench.agent.power import PowerRoutes
from bench.agent.routing import Route
from bench.agent.status import StatusReporter
from bench.agent.uploads import UploadSessions


@dataclass(frozen=True)
class AgentParts:
    status: StatusReporter
    power: PowerRoutes
    console: ConsoleRoutes
    files: FileManager
    uploads: UploadSessions
    mods: ModRegistry
    backups: BackupManager
    codeserver: CodeServer


def agent_routes(parts: AgentParts) -> list[Route]:
    status, power, console, files = parts.status, parts.power, parts.console, parts.files
    uploads, mods, backups, ide = parts.uploads, parts.mods, parts.backups, parts.codeserver
    return [
        Route("GET", "/health", status.health),
        Route("GET", "/ready", status.ready),
        Route("GET", "/status", status.status),
        Route("GET", "/version", status.version),
        Route("GET", "/update", status.update_info),
        Route("POST", "/update", status.apply_update),
        Route("GET", "/players", status.list_players),
        Route("POST", "/start", power.start),
        Route("POST", "/stop", power.stop),
        Route("POST", "/restart", power.restart),
        Route("POST", "/console/command", console.command),
        Route("GET", "/console", console.connect),
        Route("GET", "/files", files.list_dir),
        Route("DELETE", "/files", files.delete),
        Route("GET", "/files/download", files.download),
        Route("PUT", "/files/upload", files.upload),
        Route("POST", "/files/upload", files.upload),
        Route("GET", "/files/content", files.read_text),
        Route("PUT", "/files/content", files.write_text),
        Route("POST", "/files/rename", files.rename),
        Route("POST", "/files/mkdir", files.mkdir),
        Route("POST", "/files/uploads", uploads.create),
        Route("GET", "/files/uploads/{upload_id}", uploads.describe),
        Route("PATCH", "/files/uploads/{upload_id}", uploads.append),
        Route("DELETE", "/files/uploads/{upload_id}", uploads.abort),
        Route("GET", "/mods", mods.list_mods),
        Route("POST", "/mods", mods.install),
        Route("DELETE", "/mods/{mod_id}", mods.remove),
        Route("POST", "/mods/{mod_id}/enable", mods.enable),
        Route("POST", "/mods/{mod_id}/disable", mods.disable),
        Route("GET", "/backups", backups.list_backups),
        Route("POST", "/backups", backups.create),
        Route("POST", "/backups/restore", backups.restore),
        Route("DELETE", "/backups/{backup_id}", backups.delete),
        Route("GET", "/backups/{backup_id}/download", backups.download),
        Route("GET", "/dev/codeserver", ide.status_route),
        Route("POST", "/dev/codeserver/start", ide.start_route),
        Route("POST", "/dev/codeserver/stop", ide.stop_route),
        Route("POST", "/dev/codeserver/restart", ide.restart_route),
    ]
