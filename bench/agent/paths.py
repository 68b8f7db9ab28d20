"""Turning a client-supplied file path into a path under the agent's `DATA/files/` directory.

Every file route goes through `FilesRoot.resolve`. It must never hand back a path whose real
location (symlinks followed) is outside the root: `..`, absolute paths, NUL bytes and symlinks that
lead out are refused with 400 `INVALID_PATH`, and so are names no Linux filesystem can hold (a
component over 255 bytes, a path over 4096): those would fail later as ENAMETOOLONG.
"""

from __future__ import annotations

import os
from pathlib import Path

from bench.agent.http import ApiError

NAME_MAX = 255  # bytes per component (ext4, xfs, btrfs, tmpfs)
PATH_MAX = 4096  # bytes, the kernel's limit for a path it is handed


def invalid_path(path: str, reason: str) -> ApiError:
    return ApiError(400, "INVALID_PATH", {"path": path, "reason": reason})


class FilesRoot:
    def __init__(self, root: Path) -> None:
        self.root = root
        self.real_root = Path(os.path.realpath(root))

    def resolve(self, relative: str | None, *, allow_root: bool = True) -> Path:
        """The lexical path for `relative` ("" or None is the root itself)."""
        parts = self.components(relative or "")
        if not parts and not allow_root:
            raise invalid_path(relative or "", "the files root itself")
        path = self.root.joinpath(*parts)
        real = os.path.realpath(path)
        if real != str(self.real_root) and not real.startswith(str(self.real_root) + os.sep):
            raise invalid_path(relative or "", "resolves outside the files root")
        return path

    def relative(self, path: Path) -> str:
        """The client-facing form of a path under the root: `a/b`, "" for the root."""
        return path.relative_to(self.root).as_posix() if path != self.root else ""

    @staticmethod
    def components(relative: str) -> list[str]:
        if "\x00" in relative:
            raise invalid_path(relative.replace("\x00", "\\0"), "NUL byte")
        if relative.startswith(("/", "\\")):
            raise invalid_path(relative, "absolute path")
        parts = [part for part in relative.replace("\\", "/").split("/") if part not in ("", ".")]
        if ".." in parts:
            raise invalid_path(relative, "'..' component")
        if len(os.fsencode(relative)) > PATH_MAX:
            raise invalid_path(relative[:64] + "…", "path too long")
        if any(len(os.fsencode(part)) > NAME_MAX for part in parts):
            raise invalid_path(relative[:64] + "…", "name too long")
        return parts
